"""The calibration documents' greedy generations, labelled by r: decoded, or reused from the generations file an
earlier calibration wrote for the same model, decoding limit and prompts; that file; and the hard negatives taken
from the wrong generations.

The file is ``<out>.calibration_generations.jsonl`` beside the bundle, one line per document; ``--reuse-generations``
reads it back, so what it is written with and what a reuse checks (the model's fingerprint, ``max_new_tokens`` and
each prompt's sha256) are kept together here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from sdm_core.artifact import sha256_file
from sdm_core.lm.embedding import ChatFormat
from training.calibrate_config import CalibrateConfig
from training.correctness import is_verbatim, normalize_hard_negative
from training.generation import LabelledGenerations, greedy_generate, label_generations
from training.records import Record
from training.verification_layer import prompt_of

__all__ = ["decode_or_reuse", "hard_negatives_of", "model_fingerprint", "write_generations"]


def model_fingerprint(source: dict) -> str:
    """Identifies the weights that decoded a generations file: the source, and the sha256 of its weight files."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    folder = source.get("path")
    if folder and Path(folder).is_dir():
        for path in sorted(Path(folder).glob("*.safetensors")):
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def decode_or_reuse(
    config: CalibrateConfig,
    model,
    tokenizer,
    records: list[Record],
    chat: ChatFormat,
    correct: Callable[[str, str], bool],
    fingerprint: str,
) -> LabelledGenerations:
    """Every record's greedy generation, labelled by r: decoded now, or reused from ``--reuse-generations`` when
    that file was written for the same model, decoding limit and prompts."""
    reused: dict[str, dict] = {}  # id -> the row the generations file holds for it
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


def hard_negatives_of(records: list[Record], generated: LabelledGenerations) -> dict[str, list[str]]:
    """The wrong, non-verbatim generations, as hard negatives for the head's instances (SDM_SPEC §3.7)."""
    return {
        r.id: [normalize_hard_negative(text)]
        for r, text, label in zip(records, generated.texts, generated.labels)
        if not label and not is_verbatim(text, r.positive)
    }


def write_generations(
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
