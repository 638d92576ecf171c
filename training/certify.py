"""``python -m training.certify``: re-certify a bundle's ladder on new labelled prompts and write a new sealed bundle.

Decodes every prompt of ``--data`` with the bundle's model exactly as training.calibrate and training.evaluate do,
labels each generation with the correctness function, scores it with the bundle's head (its full ladder, before
any earlier withdrawal) and certifies every alpha (sdm_core.certification). The new bundle at ``--out`` is a copy
of ``--bundle`` whose ``certification`` is the new table, re-sealed; the served ladder follows it (a region
withdrawn earlier comes back if the new data certify it, and the reverse). The data must be documents the head
never saw: not its support, calibration or an earlier certification split.

    python -m training.certify --preset smollm2-cpu --bundle deploy/bundles/smollm2-word-order \\
        --data data/fresh.jsonl --out bundles/recertified
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdm_core import SDMEstimator
from sdm_core.certification import CERTIFICATION_POLICIES, Certification, certify_ladder
from sdm_core.folders import atomic_folder
from sdm_core.lm.bundle import Bundle, load_bundle, read_bundle_info, seal_bundle
from sdm_core.lm.embedding import embed_texts, verification_text
from sdm_core.lm.models import resolve_device
from sdm_core.settings import DEVICE_HELP, CommandLine, flatten, parse_device, setting
from training.correctness import bundle_correctness, get_correctness
from training.generation import decode_and_label
from training.records import Record, load_records

__all__ = ["CertifyConfig", "PRESETS", "certify", "main"]


@dataclass(frozen=True)
class CertifyConfig:
    bundle: str = setting("", help="the bundle to re-certify (left unchanged)")
    data: str = setting("", help="comma-separated JSONL record files of prompts the head never saw, with references")
    out: str = setting("", help="folder for the re-certified bundle (required; must not exist or be empty)")
    correctness: str = setting(
        "", help="correctness function r by name (labels the generations); empty: the one the bundle records"
    )
    max_docs: int = setting(0, help="use the first N documents (0: all)")
    max_new_tokens: int = setting(
        0, help="tokens to generate at most per prompt; 0: the limit the bundle was calibrated with (else 512)"
    )
    generate_batch_size: int = setting(16, help="prompts per batched greedy generation")
    embed_batch_size: int = setting(16, help="instances per no-grad hidden-state pass")
    policy: str = setting(
        "violation",
        help="which regions stay on the ladder: violation, evidence or lower-bound (see sdm_core.certification)",
    )
    min_admitted: int = setting(10, help="admitted answers a region needs for its test to count")
    violation_p: float = setting(
        0.01, help="exact binomial p-value below which a region's accuracy is significantly below alpha"
    )
    device: str = setting("auto", help=DEVICE_HELP, parse=parse_device)
    progress: bool = setting(True, help="show progress bars")

    def validate(self) -> None:
        if not self.bundle or not self.data or not self.out:
            raise ValueError("--bundle, --data and --out are all required")
        if not (Path(self.bundle) / "bundle.json").is_file():
            raise ValueError(f"{self.bundle} is not an sdm-lm bundle (bundle.json is missing)")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not empty; choose another --out")
        if out.resolve() == Path(self.bundle).resolve():
            raise ValueError("--out must differ from --bundle: certification writes a new bundle")
        if self.policy not in CERTIFICATION_POLICIES:
            raise ValueError(f"policy must be one of {list(CERTIFICATION_POLICIES)}, got {self.policy!r}")
        if self.min_admitted < 1 or not 0.0 < self.violation_p < 1.0:
            raise ValueError("min_admitted must be >= 1 and violation_p in (0, 1)")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (0: the bundle's), got {self.max_new_tokens}")
        if self.correctness:
            get_correctness(self.correctness)


# Decoding limits and r default to what the bundle records; presets only size the batches.
PRESETS: dict[str, dict] = {
    "paper": {},
    "smollm2-cpu": {},
    "smollm2-gpu": {"generate_batch_size": 128, "embed_batch_size": 64},
    "tiny": {
        "generate_batch_size": 8,
        "embed_batch_size": 8,
        "min_admitted": 2,
        "progress": False,
    },
}


PRESETS["arithmetic-tiny"] = {**PRESETS["tiny"]}
PRESETS["arithmetic-cpu"] = {**PRESETS["smollm2-cpu"]}


def _as_calibrated(config: CertifyConfig, provenance: dict) -> CertifyConfig:
    """``config`` with r and the decoding limit the bundle was calibrated with filled in. Certifying with another r
    would test a different promise than the one the head makes, so a mismatch is an error."""
    recorded = bundle_correctness(provenance)
    if config.correctness and config.correctness != recorded:
        raise ValueError(
            f"the bundle was calibrated with correctness {recorded!r}, not {config.correctness!r}: its regions promise "
            f"accuracy under {recorded!r}; drop --correctness (or pass {recorded!r})"
        )
    limit = config.max_new_tokens or int(provenance.get("calibrate_config", {}).get("max_new_tokens") or 512)
    return replace(config, correctness=recorded, max_new_tokens=limit)


def _records(files: Sequence[str], limit: int) -> list[Record]:
    records = [r for path in files for r in load_records(path)]
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(f"no records in {list(files)}")
    return records


def certify(config: CertifyConfig) -> dict:
    config.validate()
    started = time.perf_counter()
    files = [f.strip() for f in config.data.split(",") if f.strip()]
    records = _records(files, config.max_docs)
    config = _as_calibrated(config, read_bundle_info(config.bundle).provenance)
    bundle = load_bundle(config.bundle, device=resolve_device(config.device))
    info = bundle.info
    # The full ladder as calibrated: an earlier certification's withdrawals are decided afresh.
    head = SDMEstimator.load(info.path / info.head["path"])
    _check_unseen(records, head)
    generated, scores = _decode_and_score(bundle, head, records, config)
    certification, served = certify_ladder(
        head.ladder,
        scores.probabilities,
        scores.predictions,
        scores.q_prime,
        torch.tensor(generated.labels, dtype=torch.bool),
        info.tags.positive_class,
        policy=config.policy,
        min_admitted=config.min_admitted,
        violation_p=config.violation_p,
        source={
            "kind": "certify",
            "documents": len(records),
            "files": files,
            "generation_accuracy": generated.accuracy,
            "recertified_from": info.raw.get("bundle_sha256"),
        },
    )
    out = Path(config.out)
    provenance = {**info.provenance, "certify_config": flatten(config)}

    def write(folder: Path) -> None:
        shutil.copytree(info.path, folder, dirs_exist_ok=True)
        seal_bundle(folder, {"certification": certification.to_dict(), "provenance": provenance})

    atomic_folder(out, write)
    print(certification.summary(), file=sys.stderr)
    return {
        "bundle": str(out),
        "documents": len(records),
        "generation_accuracy": generated.accuracy,
        "certified_alphas": list(certification.certified),
        "withdrawn": list(certification.withdrawn),
        "rows": _rows(certification),
        "default_alpha_has_region": served.regions[served.default_alpha].exists,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _decode_and_score(bundle: Bundle, head: SDMEstimator, records: list[Record], config: CertifyConfig):
    """Decode and label every record with the bundle's model as served, and score each answer with ``head``."""
    info = bundle.info
    generated = decode_and_label(
        bundle.model,
        bundle.tokenizer,
        records,
        info.chat,
        get_correctness(config.correctness),
        config.max_new_tokens,
        config.generate_batch_size,
        config.progress,
        "decoding",
    )
    prompts = [r.prompt if r.prompt is not None else [dict(m) for m in r.messages] for r in records]
    texts = [
        verification_text(bundle.tokenizer, p, g, info.chat, info.recipe) for p, g in zip(prompts, generated.texts)
    ]
    h = embed_texts(bundle.model, bundle.tokenizer, texts, info.recipe, config.embed_batch_size, config.progress)
    scores = head.predict_scores(h)
    return generated, scores


def _check_unseen(records: list[Record], head: SDMEstimator) -> None:
    """Certification is only evidence on documents the head never saw."""
    support = head.fitted_parts().support
    overlap = {r.id for r in records} & (set(support.ids) | set(head.calibration_ids))
    if overlap:
        raise ValueError(
            f"{len(overlap)} documents of --data are in the head's support or calibration (e.g. {sorted(overlap)[0]}); "
            "certify on documents the head never saw"
        )


def _rows(certification: Certification) -> dict:
    """The certification table by alpha, as the command prints it."""
    return {
        f"{r.alpha:g}": {
            "admitted": r.admitted,
            "correct": r.correct,
            "p_value": r.p_value,
            "lower_bound": r.lower_bound,
            "status": r.status,
        }
        for r in certification.rows
    }


def main(argv: Sequence[str] | None = None) -> int:
    command_line = CommandLine(
        CertifyConfig,
        prog="python -m training.certify",
        env_prefix="SDM_CERTIFY_",
        presets=PRESETS,
        description=__doc__ or "",
    )
    args = command_line.parser().parse_args(argv)
    try:
        config = command_line.resolve(args)
        result = certify(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
