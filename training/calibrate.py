"""``python -m training.calibrate``: the final test-time SDM head and the deployable bundle (SDM_SPEC §3.7).

Greedy-decode the calibration set with the chosen model; every generation that is neither a verbatim positive
nor a verbatim negative and that the task's correctness function marks wrong becomes that document's hard
negative (gamma_gen = gamma_diversity = 1). One instance per document (positive with probability 0.5, else its
hard negative when it has one, else its static negative), split 50/50 into the head's support and calibration
sets, one SDM layer fitted, and the bundle written. ``--calibration-instances generations`` puts each calibration-set
document's own generation (labelled by the correctness function) in the head's calibration half instead.

    python -m training.calibrate --run runs/tiny --out bundles/tiny           # the run's best checkpoint
    python -m training.calibrate --model smollm2 --calibration data/calibration.jsonl --out bundles/base  # un-fine-tuned baseline
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from sdm_core import SDMConfig
from sdm_core.lm.bundle import VerificationTags, write_bundle
from sdm_core.calibration import DEFAULT_ALPHA_LADDER
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe
from sdm_core.lm.models import load_model, load_tokenizer, resolve_device
from training.config import build_parser, config_from_args
from training.correctness import get_correctness, is_verbatim, normalize_hard_negative
from training.generation import greedy_generate
from training.records import load_records
from training.trainer import git_revision
from training.verification_layer import (
    CLASS_NAMES,
    PAPER_INSTANCE_SEED,
    PAPER_SPLIT_SEED,
    Instance,
    draw_layer_instances,
    embed_instances,
    fit_verification_layer,
    prompt_of,
)

__all__ = ["CalibrateConfig", "calibrate", "main"]


@dataclass(frozen=True)
class CalibrateConfig:
    run: str = ""  # a training.finetune output folder: its checkpoint, config and data are used
    checkpoint: str = "best"  # "best" or "final" within --run
    model: dict = field(default_factory=dict)  # or a model source (e.g. smollm2) for an un-fine-tuned baseline
    calibration: str = ""  # default: the run's calibration data
    out: str = ""
    correctness: str = "word_order"
    max_calibration_docs: int = 0
    max_new_tokens: int = 512
    generate_batch_size: int = 16
    embed_batch_size: int = 16
    sdm_epochs: int = 200
    sdm_exemplar_dim: int = 1000
    sdm_batch_size: int = 50
    sdm_learning_rate: float = 1e-5
    alpha: float = 0.95
    alphas: tuple[str, ...] = tuple(str(a) for a in DEFAULT_ALPHA_LADDER)
    system_prompt: str | None = "You are a helpful AI assistant."
    recipe_sequence_end: str = "template"
    max_length: int = 2048
    split_seed: int = PAPER_SPLIT_SEED
    instance_seed: int = PAPER_INSTANCE_SEED
    # "mixture" (SDM_SPEC §3.7): both halves of the head hold the drawn instances (reference, hard or static
    # negative). "generations": the calibration half holds each document's own greedy generation labelled by r,
    # the distribution the server scores, so that Algorithm 1's region is estimated on it (docs/decisions.md).
    calibration_instances: str = "mixture"
    seed: int = 0
    device: str = "auto"  # auto: the first GPU when there is one, else the CPU
    progress: bool = True

    # One line of --help per field (a test checks that every field has one).
    HELP: ClassVar[dict[str, str]] = {
        "run": "a training.finetune output folder: its checkpoint, config and data are used",
        "checkpoint": "best or final (within --run)",
        "model": "instead of --run: a model source (smollm2, tiny, a Hugging Face folder), e.g. the un-fine-tuned baseline",
        "calibration": "calibration records (JSONL); default: the run's",
        "out": "bundle folder to write (required)",
        "correctness": "correctness function r by name (decides hard negatives)",
        "max_calibration_docs": "use the first N calibration documents (0: all)",
        "max_new_tokens": "tokens to generate at most per calibration prompt",
        "generate_batch_size": "prompts per batched greedy generation",
        "embed_batch_size": "instances per no-grad hidden-state pass",
        "sdm_epochs": "epochs of the final SDM head",
        "sdm_exemplar_dim": "exemplar dimension M of the head",
        "sdm_batch_size": "mini-batch size of the head",
        "sdm_learning_rate": "Adam learning rate of the head",
        "alpha": "the bundle's default alpha (must be on the ladder)",
        "alphas": "comma-separated alpha ladder of the nested regions",
        "system_prompt": "system turn put before every prompt; default: the run's",
        "recipe_sequence_end": "where h's sequence ends (template or verified); default: the run's",
        "max_length": "longest hidden-state sequence in tokens",
        "split_seed": "seed of the head's 50/50 support/calibration split",
        "instance_seed": "seed of the per-document instance draw",
        "calibration_instances": "the head's calibration half: mixture (the paper's drawn instances) or generations (each document's own greedy generation, labelled by r)",
        "seed": "seed of the head's fit",
        "device": "auto (the first GPU when there is one, else the CPU), cpu, cuda or cuda:N",
        "progress": "show progress bars",
    }

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out (the bundle folder to write) is required")
        if not self.run and not self.model:
            raise ValueError("give --run (a fine-tuning output folder) or --model (a model source such as smollm2)")
        if self.checkpoint not in ("best", "final"):
            raise ValueError(f"checkpoint must be 'best' or 'final', got {self.checkpoint!r}")
        if self.calibration_instances not in ("mixture", "generations"):
            raise ValueError(f"calibration_instances must be 'mixture' or 'generations', got {self.calibration_instances!r}")


def _resolve(config: CalibrateConfig) -> tuple[dict, str, dict]:
    """(model source, calibration path, training config dict) from --run or --model."""
    training: dict = {}
    if config.run:
        run = Path(config.run)
        meta = run / "config.json"
        if not meta.is_file():
            raise ValueError(f"{run} is not a training.finetune output folder (config.json is missing)")
        training = json.loads(meta.read_text())["config"]
        folder = run / config.checkpoint
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise ValueError(f"{folder} holds no saved model; did the run finish an evaluation?")
        source = {"kind": "hf", "path": str(folder)}
        if training.get("lora"):
            source = {"kind": "adapter", "path": str(folder), "base": training["model"]}
        calibration = config.calibration or training.get("calibration") or str(run / "data" / "calibration.jsonl")
        return source, calibration, training
    if not config.calibration:
        raise ValueError("--calibration is required with --model")
    return dict(config.model), config.calibration, training


def _load(source: dict):
    if source["kind"] == "adapter":
        from peft import PeftModel

        base = load_model(source["base"])
        model = PeftModel.from_pretrained(base, source["path"], is_trainable=False)
        return model, load_tokenizer({"kind": "hf", "path": source["path"]}) if (Path(source["path"]) / "tokenizer.json").is_file() else load_tokenizer(source["base"])
    return load_model(source), load_tokenizer(source)


# Sizes matched to training.config's presets of the same name.
PRESETS: dict[str, dict] = {
    "paper": {},
    "smollm2-cpu": {"max_new_tokens": 48, "sdm_epochs": 300, "sdm_learning_rate": 3e-4, "max_length": 256},
    "tiny": {"max_new_tokens": 12, "sdm_epochs": 3, "sdm_exemplar_dim": 32, "sdm_learning_rate": 1e-3, "max_length": 256,
             "generate_batch_size": 8, "embed_batch_size": 8, "progress": False},
}


def calibrate(config: CalibrateConfig) -> dict:
    config.validate()
    source, cal_path, training = _resolve(config)
    records = load_records(cal_path)
    limit = config.max_calibration_docs or int(training.get("max_calibration_docs") or 0)
    if limit:
        records = records[:limit]
    device = resolve_device(config.device)
    model, tokenizer = _load(source)
    model.to(device).eval()
    chat = ChatFormat(system_prompt=training.get("system_prompt", config.system_prompt))
    recipe = HiddenStateRecipe(sequence_end=training.get("recipe_sequence_end", config.recipe_sequence_end), max_length=config.max_length)
    correct = get_correctness(config.correctness)

    generations = greedy_generate(model, tokenizer, [prompt_of(r) for r in records], chat, config.max_new_tokens,
                                  config.generate_batch_size, config.progress, "decoding calibration set")
    hard_negatives: dict[str, list[str]] = {}
    labels: list[int] = []
    for record, text in zip(records, generations):
        label = int(bool(correct(text, record.reference or record.positive)))
        labels.append(label)
        if not label and not is_verbatim(text, record.positive):
            hard_negatives[record.id] = [normalize_hard_negative(text)]
    n_correct = sum(labels)
    ids = [r.id for r in records]
    split_rng = random.Random(config.split_seed)
    flags = {doc_id: split_rng.random() < 0.5 for doc_id in ids}
    instances = draw_layer_instances(records, hard_negatives, random.Random(config.instance_seed), 0.5, prefer_hard_negatives=True)
    if config.calibration_instances == "generations":
        # The raw generation, as the server and training.evaluate pass it to the recipe.
        instances = [drawn if flags[drawn.doc_id] else Instance(drawn.doc_id, drawn.prompt, text, label)
                     for drawn, text, label in zip(instances, generations, labels)]
    h = embed_instances(model, tokenizer, instances, chat, recipe, config.embed_batch_size, config.progress)
    alphas = tuple(float(a) for a in config.alphas)
    sdm_config = SDMConfig(
        exemplar_dim=config.sdm_exemplar_dim, epochs=config.sdm_epochs, batch_size=config.sdm_batch_size,
        learning_rate=config.sdm_learning_rate, alpha=config.alpha, alpha_ladder=alphas, seed=config.seed,
        progress=config.progress, class_names=CLASS_NAMES,
    )
    head = fit_verification_layer(h, instances, flags, sdm_config)

    out = Path(config.out)
    provenance = {
        "calibrate_config": {k: v for k, v in asdict(config).items()},
        "training_config": training,
        "git_revision": git_revision(),
        "calibration_file": str(cal_path),
        "calibration_docs": len(records),
        "calibration_generation_accuracy": n_correct / max(len(records), 1),
        "hard_negatives": len(hard_negatives),
        "torch": torch.__version__,
        "device": device,
    }
    base = source.get("base") if source["kind"] == "adapter" else (training.get("model") or source)
    # A model source given with --model (not a run) is used unchanged: the bundle records the source, not a copy.
    reference_only = not config.run and source["kind"] in ("smollm2", "tiny", "hf")
    write_bundle(out, model=model, tokenizer=tokenizer, head=head, chat=chat, recipe=recipe, tags=VerificationTags(),
                 base_model=base, provenance=provenance, reference_only=reference_only)
    with open(out.parent / f"{out.name}.calibration_generations.jsonl", "w") as handle:
        for record, text in zip(records, generations):
            handle.write(json.dumps({"id": record.id, "generation": text, "hard_negative": record.id in hard_negatives}) + "\n")
    region = head.ladder.regions[head.ladder.default_alpha]
    return {
        "bundle": str(out),
        "calibration_docs": len(records),
        "generation_accuracy": provenance["calibration_generation_accuracy"],
        "hard_negatives": len(hard_negatives),
        "alpha": head.ladder.default_alpha,
        "q_prime_min": region.q_prime_min if region.exists else None,
        "calibration_hr_proportion": region.calibration_admitted / max(region.calibration_size, 1),
        # Every alpha of the ladder: the admitted share of the head's calibration split, or None where no region exists.
        "regions": {str(a): (r.calibration_admitted / max(r.calibration_size, 1) if r.exists else None)
                    for a, r in sorted(head.ladder.regions.items(), reverse=True)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m training.calibrate", __doc__, cls=CalibrateConfig, env_prefix="SDM_CALIBRATE_", presets=PRESETS)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, cls=CalibrateConfig, env_prefix="SDM_CALIBRATE_", presets=PRESETS)
        result = calibrate(config)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
