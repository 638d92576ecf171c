"""``python -m training.calibrate``'s configuration: one validated dataclass, its presets, and the choices they
name.

Precedence: default < preset < environment variable (``SDM_CALIBRATE_<FIELD>``) < command-line flag
(sdm_core.settings). The final head is configured by one nested :class:`sdm_core.SDMConfig` (``config.sdm``), whose
flags keep their flat names (``--sdm-epochs``, ``--alpha``). The steps that use it are in training.calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdm_core import SDMConfig
from sdm_core.certification import CERTIFICATION_POLICIES
from sdm_core.settings import DEVICE_HELP, group, parse_device, setting
from training.config import parse_model_source
from training.correctness import CORRECTNESS_HELP, get_correctness
from training.verification_layer import PAPER_INSTANCE_SEED, PAPER_SPLIT_SEED

__all__ = ["CalibrateConfig", "INSTANCE_CHOICES", "PRESETS"]

# What each half of the head can hold (--calibration-instances takes the first two, --support-instances all three).
INSTANCE_CHOICES = ("generations", "mixture", "both")


@dataclass(frozen=True)
class CalibrateConfig:
    run: str = setting("", help="a training.finetune output folder: its checkpoint, config and data are used")
    checkpoint: str = setting("best", help="best or final (within --run)")
    model: dict = setting(
        default_factory=dict,
        parse=parse_model_source,
        help="instead of --run: a model source (smollm2, tiny, a Hugging Face folder), e.g. the un-fine-tuned baseline",
    )
    calibration: str = setting(
        "",
        help="comma-separated calibration record files (JSONL); default: the run's calibration split and its holdout "
        "split",
    )
    out: str = setting("", help="bundle folder to write (required)")
    correctness: str = setting(
        "", help=CORRECTNESS_HELP + " (labels generations, decides hard negatives); default: the run's, else word_order"
    )
    max_calibration_docs: int = setting(0, help="use the first N calibration documents (0: all)")
    max_new_tokens: int = setting(
        512, help="tokens to generate at most per calibration prompt (match the serving and evaluation limit)"
    )
    generate_batch_size: int = setting(16, help="prompts per batched greedy generation")
    embed_batch_size: int = setting(16, help="instances per no-grad hidden-state pass")
    sdm: SDMConfig = group(
        SDMConfig,
        {
            "sdm_epochs": ("epochs", "epochs of the final SDM head"),
            "sdm_exemplar_dim": ("exemplar_dim", "exemplar dimension M of the head"),
            "sdm_batch_size": ("batch_size", "mini-batch size of the head"),
            "sdm_learning_rate": ("learning_rate", "Adam learning rate of the head"),
            "alpha": ("alpha", "the bundle's default alpha (must be on the ladder)"),
            "alphas": ("alpha_ladder", "comma-separated alpha ladder of the nested regions"),
        },
    )
    system_prompt: str | None = setting(
        "You are a helpful AI assistant.", help="system turn put before every prompt; default: the run's"
    )
    recipe_sequence_end: str = setting(
        "template", help="where h's sequence ends (template or verified); default: the run's"
    )
    recipe_layer: int = setting(
        -1,
        help="hidden-state layer of the head's input h (index into hidden_states; -1: the final layer after the final "
        "norm)",
    )
    max_length: int = setting(2048, help="longest hidden-state sequence in tokens")
    split_seed: int = setting(PAPER_SPLIT_SEED, help="seed of the documents' support/calibration/certification split")
    instance_seed: int = setting(PAPER_INSTANCE_SEED, help="seed of the per-document instance draw (mixture instances)")
    # What the head's two halves hold (docs/decisions.md, "What the final head is calibrated on"). "generations":
    # each document's own greedy generation labelled by r, the distribution the server scores, so that Algorithm 1's
    # region is estimated on it; "mixture": the paper's drawn instances (reference, hard or static negative).
    calibration_instances: str = setting(
        "generations",
        help="the head's calibration half: generations (each document's own greedy generation, labelled by r; default) "
        "or mixture (the paper's drawn instances)",
    )
    support_instances: str = setting(
        "mixture",
        help="the head's support half: mixture (the paper's drawn reference/negative instances; default), generations, "
        "or both",
    )
    # Documents held out of both halves to certify the finished ladder (sdm_core.certification).
    certification_docs: int = setting(
        256, help="documents held out of the head to certify its ladder (0: no certification)"
    )
    certification_policy: str = setting(
        "violation",
        help="which regions stay on the ladder: violation (withdraw a significant violation), evidence (also withdraw "
        "regions with too few admitted), lower-bound (keep only regions whose Clopper-Pearson bound reaches alpha)",
    )
    certification_min_admitted: int = setting(
        10, help="admitted answers a region needs on the certification split for its test to count"
    )
    certification_violation_p: float = setting(
        0.01, help="exact binomial p-value below which a region's accuracy is significantly below alpha"
    )
    reuse_generations: str = setting(
        "",
        help="a previous calibration's generations file (JSONL) for the same model and decoding: its decodings are "
        "reused",
    )
    seed: int = setting(0, help="seed of the head's fit")
    device: str = setting("auto", help=DEVICE_HELP, parse=parse_device)
    progress: bool = setting(True, help="show progress bars")

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out (the bundle folder to write) is required")
        if not self.run and not self.model:
            raise ValueError("give --run (a fine-tuning output folder) or --model (a model source such as smollm2)")
        if self.checkpoint not in ("best", "final"):
            raise ValueError(f"checkpoint must be 'best' or 'final', got {self.checkpoint!r}")
        if self.calibration_instances not in INSTANCE_CHOICES[:2]:
            raise ValueError(
                f"calibration_instances must be 'generations' or 'mixture', got {self.calibration_instances!r}"
            )
        if self.support_instances not in INSTANCE_CHOICES:
            raise ValueError(
                f"support_instances must be one of {list(INSTANCE_CHOICES)}, got {self.support_instances!r}"
            )
        if self.certification_policy not in CERTIFICATION_POLICIES:
            raise ValueError(
                f"certification_policy must be one of {list(CERTIFICATION_POLICIES)}, got {self.certification_policy!r}"
            )
        if self.certification_docs < 0 or self.certification_min_admitted < 1:
            raise ValueError("certification_docs must be >= 0 and certification_min_admitted >= 1")
        if not 0.0 < self.certification_violation_p < 1.0:
            raise ValueError(f"certification_violation_p must be in (0, 1), got {self.certification_violation_p}")
        if self.correctness:
            get_correctness(self.correctness)  # a bad --correctness fails before any model loads


# Sizes matched to training.config's presets of the same name.
PRESETS: dict[str, dict] = {
    "paper": {},
    # max_new_tokens as training.evaluate's preset decodes: the head is calibrated on generations like those it is
    # checked and served on.
    "smollm2-cpu": {"max_new_tokens": 96, "sdm_epochs": 300, "sdm_learning_rate": 3e-4, "max_length": 256},
    "tiny": {
        "max_new_tokens": 12,
        "sdm_epochs": 3,
        "sdm_exemplar_dim": 32,
        "sdm_learning_rate": 1e-3,
        "max_length": 256,
        "generate_batch_size": 8,
        "embed_batch_size": 8,
        "certification_docs": 4,
        "certification_min_admitted": 2,
        "progress": False,
    },
}
# The same recipe with GPU-sized batches (batches change speed, not the head).
PRESETS["smollm2-gpu"] = {**PRESETS["smollm2-cpu"], "generate_batch_size": 128, "embed_batch_size": 64}
# The arithmetic task's presets: the same sizes, labelled by its correctness function (exact value).
PRESETS["arithmetic-tiny"] = {**PRESETS["tiny"], "correctness": "arithmetic"}
PRESETS["arithmetic-cpu"] = {**PRESETS["smollm2-cpu"], "correctness": "arithmetic", "max_new_tokens": 32}
