"""``python -m training.calibrate``: the final test-time SDM head, its certification, and the deployable bundle.

Greedy-decodes every calibration document with the model as the server runs it (an adapter merged into its
base) and labels each generation with the task's correctness function r. The documents are split three ways
(``training.splits``): the head's support, its calibration half, and a certification split that the head never
sees. By default (docs/decisions.md, "What the final head is calibrated on"):

- the support holds the paper's drawn instances (SDM_SPEC §3.7: the positive with probability 0.5, else the
  document's hard negative, a wrong generation normalised to end in No, else its static negative);
- the calibration half holds each document's own generation labelled by r, the distribution the server
  scores, so that Algorithm 1's regions are estimated on what they are used for (``--calibration-instances
  mixture`` is the paper's recipe, which over-claims on held-out generations);
- the certification split checks every region of the ladder (sdm_core.certification); a region whose accuracy
  is significantly below its alpha is withdrawn from the ladder the server uses, and ``bundle.json`` records
  the whole table under ``certification``.

It also fits the split-conformal baseline's thresholds on the LM's own P(Yes) (``baselines`` in bundle.json),
which training.evaluate reports beside the head.

    python -m training.calibrate --run runs/tiny --out bundles/tiny           # the run's best checkpoint
    # the un-fine-tuned baseline:
    python -m training.calibrate --model smollm2 --calibration data/calibration.jsonl --out bundles/base
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdm_core import SDMConfig, SDMEstimator
from sdm_core.artifact import sha256_file
from sdm_core.calibration import RegionLadder
from sdm_core.certification import (
    CERTIFICATION_POLICIES,
    Certification,
    certify_ladder,
    fit_score_threshold,
    withdraw_regions,
)
from sdm_core.lm.bundle import VerificationTags, write_bundle
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe
from sdm_core.lm.models import load_model, load_tokenizer, resolve_device
from sdm_core.settings import DEVICE_HELP, CommandLine, flatten, group, parse_device, setting
from training.config import parse_model_source
from training.correctness import CORRECTNESS_HELP, get_correctness, is_verbatim, normalize_hard_negative
from training.generation import LabelledGenerations, greedy_generate, label_generations
from training.records import Record, load_records
from training.splits import split_documents
from training.tag_probability import tag_probabilities
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


INSTANCE_CHOICES = ("generations", "mixture", "both")
SPLITS = ("support", "calibration", "certification")


def _resolve(config: CalibrateConfig) -> tuple[dict, list[str], dict]:
    """(model source, calibration record files, training config dict) from --run or --model."""
    training: dict = {}
    files = [f.strip() for f in config.calibration.split(",") if f.strip()]
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
        if not files:
            if training.get("calibration"):
                files = [training["calibration"]]
            else:
                # The task the run built: its calibration split and the holdout documents it never trained on.
                data = run / "data"
                files = [str(data / name) for name in ("calibration.jsonl", "holdout.jsonl") if (data / name).is_file()]
        return source, files, training
    if not files:
        raise ValueError("--calibration is required with --model")
    return dict(config.model), files, training


def _load(source: dict):
    """(model to save, model to compute with, tokenizer). An adapter is saved as such but computes merged into its
    base, as the server and training.evaluate load it, so that calibration decodes and embeds exactly as they do."""
    if source["kind"] == "adapter":
        from peft import PeftModel

        def adapter():
            return PeftModel.from_pretrained(load_model(source["base"]), source["path"], is_trainable=False)

        tokenizer_source = (
            {"kind": "hf", "path": source["path"]}
            if (Path(source["path"]) / "tokenizer.json").is_file()
            else source["base"]
        )
        return adapter(), adapter().merge_and_unload(), load_tokenizer(tokenizer_source)
    model = load_model(source)
    return model, model, load_tokenizer(source)


def _load_records(files: Sequence[str], limit: int) -> list[Record]:
    records: list[Record] = []
    for path in files:
        records.extend(load_records(path))
    if limit:
        records = records[:limit]
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(
                f"calibration record id {record.id!r} appears twice across {list(files)}; ids must be unique"
            )
        seen.add(record.id)
    if not records:
        raise ValueError(f"no calibration records in {list(files)}")
    return records


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
# The arithmetic task's presets: the same sizes, labelled by its correctness function (exact value).
PRESETS["arithmetic-tiny"] = {**PRESETS["tiny"], "correctness": "arithmetic"}
PRESETS["arithmetic-cpu"] = {**PRESETS["smollm2-cpu"], "correctness": "arithmetic", "max_new_tokens": 32}


def _model_fingerprint(source: dict) -> str:
    """Identifies the weights that decoded a generations file: the source, and the sha256 of its weight files."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    folder = source.get("path")
    if folder and Path(folder).is_dir():
        for path in sorted(Path(folder).glob("*.safetensors")):
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def _generations(
    config: CalibrateConfig, model, tokenizer, records: list[Record], chat: ChatFormat, correct, fingerprint: str
) -> LabelledGenerations:
    """Every record's greedy generation, labelled by r: decoded now, or reused from ``--reuse-generations`` when
    that file was written for the same model, decoding limit and prompts."""
    reused: dict[str, str] = {}
    if config.reuse_generations:
        for line in Path(config.reuse_generations).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("model") != fingerprint or row.get("max_new_tokens") != config.max_new_tokens:
                raise ValueError(
                    f"{config.reuse_generations} was decoded by another model or decoding limit "
                    f"(model {row.get('model')}, max_new_tokens {row.get('max_new_tokens')}; this run: {fingerprint}, "
                    f"{config.max_new_tokens}); drop --reuse-generations to decode afresh"
                )
            reused[row["id"]] = row
    missing = [r for r in records if r.id not in reused or reused[r.id].get("prompt_sha256") != _prompt_sha(r)]
    decoded = greedy_generate(
        model,
        tokenizer,
        [prompt_of(r) for r in missing],
        chat,
        config.max_new_tokens,
        config.generate_batch_size,
        config.progress,
        "decoding calibration set",
    )
    fresh = {r.id: text for r, text in zip(missing, decoded)}
    texts = [fresh[r.id] if r.id in fresh else reused[r.id]["generation"] for r in records]
    return label_generations(records, texts, correct)


def _prompt_sha(record: Record) -> str:
    return hashlib.sha256(json.dumps(prompt_of(record), sort_keys=True).encode()).hexdigest()[:16]


def _instances(
    config: CalibrateConfig,
    records: list[Record],
    generated: LabelledGenerations,
    splits: dict[str, str],
    hard_negatives: dict[str, list[str]],
) -> tuple[list[Instance], dict[str, bool]]:
    """The head's instances and their support flags, from the documents of the support and calibration splits."""
    drawn = {
        d.doc_id: d
        for d in draw_layer_instances(
            records, hard_negatives, random.Random(config.instance_seed), 0.5, prefer_hard_negatives=True
        )
    }
    own = {
        r.id: Instance(r.id, prompt_of(r), text, label)
        for r, text, label in zip(records, generated.texts, generated.labels)
    }
    choice = {"support": config.support_instances, "calibration": config.calibration_instances}
    instances: list[Instance] = []
    flags: dict[str, bool] = {}
    for record in records:
        split = splits[record.id]
        if split == "certification":
            continue
        kinds = ("mixture", "generations") if choice[split] == "both" else (choice[split],)
        for kind in kinds:
            instance = drawn[record.id] if kind == "mixture" else own[record.id]
            if len(kinds) == 2 and kind == "generations":
                # Two instances of one document in the support: the generation gets its own id.
                instance = Instance(f"{record.id}#generation", instance.prompt, instance.response, instance.label)
            instances.append(instance)
            flags[instance.doc_id] = split == "support"
    return instances, flags


def _tag_thresholds(
    compute_model,
    tokenizer,
    instances: list[Instance],
    flags: dict[str, bool],
    chat: ChatFormat,
    yes: str,
    alphas: Sequence[float],
    config: CalibrateConfig,
) -> dict:
    """The split-conformal baseline's thresholds on the LM's P(Yes), fitted on the head's calibration half."""
    half = [i for i in instances if not flags[i.doc_id]]
    scores = tag_probabilities(
        compute_model,
        tokenizer,
        [i.prompt for i in half],
        [i.response for i in half],
        chat,
        yes,
        config.max_length,
        config.embed_batch_size,
    )
    correct = torch.tensor([i.label for i in half], dtype=torch.bool)
    return {
        "score": "lm_yes_probability",
        "calibration_size": len(half),
        "confidence": 0.95,
        "thresholds": {f"{a:g}": fit_score_threshold(scores, correct, a) for a in alphas if a < 1.0},
    }


def calibrate(config: CalibrateConfig) -> dict:
    config.validate()
    started = time.perf_counter()
    source, files, training = _resolve(config)
    records = _load_records(files, config.max_calibration_docs)
    device = resolve_device(config.device)
    model, compute_model, tokenizer = _load(source)
    compute_model.to(device).eval()
    chat, recipe = _chat_and_recipe(config, training)
    correctness = config.correctness or training.get("correctness") or "word_order"
    correct = get_correctness(correctness)
    tags = VerificationTags()
    fingerprint = _model_fingerprint(source)

    generated = _generations(config, compute_model, tokenizer, records, chat, correct, fingerprint)
    decode_seconds = time.perf_counter() - started
    hard_negatives = _hard_negatives(records, generated)
    splits = split_documents([r.id for r in records], config.certification_docs, config.split_seed)
    instances, flags = _instances(config, records, generated, splits, hard_negatives)
    h = embed_instances(compute_model, tokenizer, instances, chat, recipe, config.embed_batch_size, config.progress)
    alphas = config.sdm.alpha_ladder
    head = fit_verification_layer(
        h, instances, flags, replace(config.sdm, seed=config.seed, progress=config.progress, class_names=CLASS_NAMES)
    )

    certification = _certify_held(
        config, head, records, generated, splits, files, (compute_model, tokenizer, chat, recipe), tags
    )
    baselines = {
        "tag_probability": _tag_thresholds(compute_model, tokenizer, instances, flags, chat, tags.yes, alphas, config)
    }

    out = Path(config.out)
    counts = {split: sum(1 for r in records if splits[r.id] == split) for split in SPLITS}
    seconds = {"decode": round(decode_seconds, 1), "total": round(time.perf_counter() - started, 1)}
    provenance = _provenance(
        config, training, files, correctness, records, counts, generated, hard_negatives, fingerprint, device, seconds
    )
    base = source.get("base") if source["kind"] == "adapter" else (training.get("model") or source)
    # A model source given with --model (not a run) is used unchanged: the bundle records the source, not a copy.
    reference_only = not config.run and source["kind"] in ("smollm2", "tiny", "hf")
    write_bundle(
        out,
        model=model,
        tokenizer=tokenizer,
        head=head,
        chat=chat,
        recipe=recipe,
        tags=tags,
        base_model=base,
        provenance=provenance,
        reference_only=reference_only,
        certification=certification.to_dict() if certification else None,
        baselines=baselines,
    )
    _write_generations(out, records, generated, splits, hard_negatives, fingerprint, config)
    served = withdraw_regions(head.ladder, certification.withdrawn) if certification else head.ladder
    if certification is not None:
        print(certification.summary(), file=sys.stderr)
    return _summary(out, records, counts, generated, hard_negatives, served, certification, provenance["seconds"])


def _chat_and_recipe(config: CalibrateConfig, training: dict) -> tuple[ChatFormat, HiddenStateRecipe]:
    """The chat format and hidden-state recipe training used (its config wins over this command's defaults)."""
    chat = ChatFormat(system_prompt=training.get("system_prompt", config.system_prompt))
    recipe = HiddenStateRecipe(
        layer=config.recipe_layer,
        sequence_end=training.get("recipe_sequence_end", config.recipe_sequence_end),
        max_length=config.max_length,
    )
    return chat, recipe


def _hard_negatives(records: list[Record], generated: LabelledGenerations) -> dict[str, list[str]]:
    """The wrong, non-verbatim generations, as hard negatives for the head's instances (SDM_SPEC §3.7)."""
    return {
        r.id: [normalize_hard_negative(text)]
        for r, text, label in zip(records, generated.texts, generated.labels)
        if not label and not is_verbatim(text, r.positive)
    }


def _provenance(
    config: CalibrateConfig,
    training: dict,
    files: Sequence[str],
    correctness: str,
    records: list[Record],
    counts: dict[str, int],
    generated: LabelledGenerations,
    hard_negatives: dict[str, list[str]],
    fingerprint: str,
    device: str,
    seconds: dict,
) -> dict:
    """What the bundle records of how it was calibrated."""
    return {
        "calibrate_config": flatten(config),
        "training_config": training,
        "git_revision": git_revision(),
        "calibration_files": list(files),
        "correctness": correctness,
        "calibration_docs": len(records),
        "documents_by_split": counts,
        "calibration_generation_accuracy": generated.accuracy,
        "hard_negatives": len(hard_negatives),
        "model_fingerprint": fingerprint,
        "torch": torch.__version__,
        "device": device,
        "seconds": seconds,
    }


def _certify_held(
    config: CalibrateConfig,
    head: SDMEstimator,
    records: list[Record],
    generated: LabelledGenerations,
    splits: dict[str, str],
    files: Sequence[str],
    embedder: tuple,
    tags: VerificationTags,
) -> Certification | None:
    """Certify the head's ladder on the certification split's own generations (None when the split is empty)."""
    compute_model, tokenizer, chat, recipe = embedder
    certification = None
    held = [k for k, r in enumerate(records) if splits[r.id] == "certification"]
    if held:
        cert_instances = [
            Instance(records[k].id, prompt_of(records[k]), generated.texts[k], generated.labels[k]) for k in held
        ]
        h_cert = embed_instances(
            compute_model, tokenizer, cert_instances, chat, recipe, config.embed_batch_size, config.progress
        )
        scores = head.predict_scores(h_cert)
        certification, _ = certify_ladder(
            head.ladder,
            scores.probabilities,
            scores.predictions,
            scores.q_prime,
            torch.tensor([generated.labels[k] for k in held], dtype=torch.bool),
            tags.positive_class,
            policy=config.certification_policy,
            min_admitted=config.certification_min_admitted,
            violation_p=config.certification_violation_p,
            source={
                "kind": "calibrate",
                "documents": len(held),
                "files": list(files),
                "split_seed": config.split_seed,
                "generation_accuracy": sum(generated.labels[k] for k in held) / len(held),
            },
        )
    return certification


def _write_generations(
    out: Path,
    records: list[Record],
    generated: LabelledGenerations,
    splits: dict[str, str],
    hard_negatives: dict[str, list[str]],
    fingerprint: str,
    config: CalibrateConfig,
) -> None:
    """``<out>.calibration_generations.jsonl``: every generation with its label and split (reusable by
    ``--reuse-generations``)."""
    with open(out.parent / f"{out.name}.calibration_generations.jsonl", "w") as handle:
        for record, text, label in zip(records, generated.texts, generated.labels):
            handle.write(
                json.dumps(
                    {
                        "id": record.id,
                        "split": splits[record.id],
                        "generation": text,
                        "label": label,
                        "hard_negative": record.id in hard_negatives,
                        "model": fingerprint,
                        "max_new_tokens": config.max_new_tokens,
                        "prompt_sha256": _prompt_sha(record),
                    }
                )
                + "\n"
            )


def _summary(
    out: Path,
    records: list[Record],
    counts: dict[str, int],
    generated: LabelledGenerations,
    hard_negatives: dict[str, list[str]],
    served: RegionLadder,
    certification: Certification | None,
    seconds: dict,
) -> dict:
    """The command's JSON line: the ladder as served and the certification table."""
    region = served.regions[served.default_alpha]
    return {
        "bundle": str(out),
        "calibration_docs": len(records),
        "documents_by_split": counts,
        "generation_accuracy": generated.accuracy,
        "hard_negatives": len(hard_negatives),
        "alpha": served.default_alpha,
        "q_prime_min": region.q_prime_min if region.exists else None,
        "calibration_hr_proportion": region.calibration_admitted / max(region.calibration_size, 1)
        if region.exists
        else 0.0,
        # Every alpha of the ladder as served: the admitted share of the head's calibration half, or None where no
        # region exists (never found, or withdrawn by certification).
        "regions": {
            f"{a:g}": (r.calibration_admitted / max(r.calibration_size, 1) if r.exists else None)
            for a, r in sorted(served.regions.items(), reverse=True)
        },
        "certification": (
            {
                f"{r.alpha:g}": {
                    "admitted": r.admitted,
                    "correct": r.correct,
                    "p_value": r.p_value,
                    "status": r.status,
                    "withdrawn": r.withdrawn,
                }
                for r in certification.rows
                if r.status != "no_region"
            }
            if certification
            else None
        ),
        "certified_alphas": list(certification.certified) if certification else None,
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    command_line = CommandLine(
        CalibrateConfig,
        prog="python -m training.calibrate",
        env_prefix="SDM_CALIBRATE_",
        presets=PRESETS,
        description=__doc__ or "",
    )
    args = command_line.parser().parse_args(argv)
    try:
        config = command_line.resolve(args)
        result = calibrate(config)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
