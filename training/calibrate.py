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

# The configuration and its presets are training.calibrate_config; the generations (decoded or reused, and the file
# that records them) training.calibration_generations; the provenance and the printed summary
# training.calibration_report. The docstring above is --help's description, so this note is a comment.

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sdm_core import SDMEstimator
from sdm_core.certification import Certification, certify_ladder, fit_score_threshold, withdraw_regions
from sdm_core.lm.bundle import VerificationTags, write_bundle
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe
from sdm_core.lm.models import load_model, load_tokenizer, resolve_device
from sdm_core.settings import CommandLine
from training.calibrate_config import PRESETS, CalibrateConfig
from training.calibration_generations import decode_or_reuse, hard_negatives_of, model_fingerprint, write_generations
from training.calibration_report import calibration_provenance, calibration_summary
from training.correctness import get_correctness
from training.generation import LabelledGenerations
from training.records import Record, load_records
from training.splits import split_documents
from training.tag_probability import tag_probabilities
from training.verification_layer import (
    CLASS_NAMES,
    Instance,
    draw_layer_instances,
    embed_instances,
    fit_verification_layer,
    prompt_of,
)

__all__ = ["CalibrateConfig", "calibrate", "main"]


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
    fingerprint = model_fingerprint(source)

    generated = decode_or_reuse(config, compute_model, tokenizer, records, chat, correct, fingerprint)
    decode_seconds = time.perf_counter() - started
    hard_negatives = hard_negatives_of(records, generated)
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
    provenance = calibration_provenance(
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
    write_generations(out, records, generated, splits, hard_negatives, fingerprint, config)
    served = withdraw_regions(head.ladder, certification.withdrawn) if certification else head.ladder
    if certification is not None:
        print(certification.summary(), file=sys.stderr)
    return calibration_summary(out, records, counts, generated, hard_negatives, served, certification, seconds)


def _chat_and_recipe(config: CalibrateConfig, training: dict) -> tuple[ChatFormat, HiddenStateRecipe]:
    """The chat format and hidden-state recipe training used (its config wins over this command's defaults)."""
    chat = ChatFormat(system_prompt=training.get("system_prompt", config.system_prompt))
    recipe = HiddenStateRecipe(
        layer=config.recipe_layer,
        sequence_end=training.get("recipe_sequence_end", config.recipe_sequence_end),
        max_length=config.max_length,
    )
    return chat, recipe


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
