"""The generation's surface metrics of SDM_SPEC §4.3 (the LM paper's Table 3), without the SDM layer: sentence
and exact-match accuracy, "no response", word-level accuracy and the model's own Yes/No tag against sentence
correctness, per document and over a dataset."""

from __future__ import annotations

import math
import re

from training.correctness import first_sentence
from training.records import Record

__all__ = ["aggregate_surface", "surface_metrics"]

_SENTENCE_OPEN_RE = re.compile(r"<sentence>(.*?)</sentence>", re.DOTALL)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _own_tag(generation: str, yes: str, no: str) -> str | None:
    """The model's own verification word: the first ``<verified>...</verified>`` (the one paired with the first
    sentence), "Yes"/"No", or None when there is none or it holds something else."""
    match = re.search(r"<verified>(.*?)</verified>", generation, re.DOTALL)
    if match is None:
        return None
    word = match.group(1).strip()
    return "Yes" if word == yes else "No" if word == no else None


def _reference_sentence(record: Record) -> str:
    if record.reference is not None:
        return record.reference
    return first_sentence(record.positive, require_verified=False) or record.positive


def surface_metrics(generation: str, record: Record, yes: str = "Yes", no: str = "No") -> dict:
    """Per-document surface metrics of §4.3: sentence match (first <sentence>, no paired tag required),
    exact match (whitespace-collapsed whole generation vs positive), no response (no sentence tag at all),
    word-level accuracy (position-wise, 0 when the lengths differ) and the model's own tag."""
    reference = _reference_sentence(record).strip().split()
    sentence = first_sentence(generation, require_verified=False).strip().split()
    if len(reference) == len(sentence) and reference:
        word_acc = sum(a == b for a, b in zip(reference, sentence)) / len(reference)
    else:
        word_acc = 1.0 if not reference and not sentence else 0.0
    return {
        "sentence_correct": sentence == reference,
        "exact_match": _collapse(generation) == _collapse(record.positive),
        "no_response": _SENTENCE_OPEN_RE.search(generation) is None,
        "word_acc": word_acc,
        "own_tag": _own_tag(generation, yes, no),
    }


def aggregate_surface(rows: list[dict]) -> dict:
    """Table 3's numbers over one dataset's per-document rows: sentence and exact-match counts and accuracies,
    "no response" count, word accuracy mean and sd, and the own tag against sentence correctness."""
    n = len(rows)
    word = [r["word_acc"] for r in rows]
    mean = sum(word) / n if n else 0.0
    sd = math.sqrt(sum((w - mean) ** 2 for w in word) / n) if n else 0.0
    confusion = {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "missing": 0}
    for r in rows:
        if r["no_response"]:
            continue  # as in the reference counts, a response without a sentence is outside the confusion matrix
        if r["own_tag"] is None:
            confusion["missing"] += 1
        elif r["own_tag"] == "Yes":
            confusion["tp" if r["sentence_correct"] else "fp"] += 1
        else:
            confusion["fn" if r["sentence_correct"] else "tn"] += 1
    sentence = sum(r["sentence_correct"] for r in rows)
    exact = sum(r["exact_match"] for r in rows)
    return {
        "sentence_correct": sentence,
        "sentence_acc": sentence / n if n else 0.0,
        "exact_match": exact,
        "exact_match_acc": exact / n if n else 0.0,
        "no_response": sum(r["no_response"] for r in rows),
        "word_acc_mean": mean,
        "word_acc_sd": sd,
        "own_tag_vs_sentence": confusion,
    }
