"""One bundle on one dataset, for training.evaluate: greedy-decode and label each prompt, score the verification
input with the bundle's head and the LM's own P(Yes), then the pair's metrics, its predictions file and its q' plot.
The run over bundles x datasets, the configuration and the cross-bundle plots stay in training.evaluate."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdm_core.calibration import admissions_unchecked, same_alpha
from sdm_core.estimator import SDMScores
from sdm_core.lm.embedding import embed_texts, verification_text
from sdm_core.report import selective_report
from training.baselines import ScoredGenerations, aurocs, compare_methods, risk_coverage
from training.correctness import get_correctness
from training.evaluation_report import plot_q_prime
from training.generation import decode_and_label
from training.records import Record
from training.surface_metrics import aggregate_surface, surface_metrics
from training.tag_probability import tag_probabilities

if TYPE_CHECKING:  # training.evaluate imports this module; the config is only an annotation here
    from training.evaluate import EvaluateConfig

__all__ = ["evaluate_pair"]


@dataclass
class _PairScores:
    """One bundle's generations on one dataset: labelled by r, scored by the head at alpha and by the LM's own
    P(Yes), with the seconds decoding and embedding took."""

    generations: list[str]
    labels: torch.Tensor  # the head's class of each generation: positive_class when r says it is correct
    scores: SDMScores
    p_yes: torch.Tensor
    seconds: dict[str, float]


def _row_at(report: dict, alpha: float) -> dict:
    for row in report["alphas"]:
        if same_alpha(row["alpha"], alpha):
            return row
    raise ValueError(f"alpha {alpha} is not in the report")


def evaluate_pair(
    bundle, bundle_name: str, dataset_name: str, records: list[Record], config: EvaluateConfig, alpha: float, out: Path
) -> dict:
    """One bundle on one dataset: decode, label and score, then its metrics, predictions_<bundle>_<dataset>.jsonl
    and its q' plot. The result keeps the risk-coverage curves, which evaluate() plots across bundles and drops."""
    info, head = bundle.info, bundle.head
    positive = info.tags.positive_class
    pair = _generate_and_score(bundle, records, config, alpha, f"{bundle_name}/{dataset_name}")
    s = pair.scores
    report = selective_report(
        s.probabilities,
        s.probabilities_lower,
        s.predictions,
        s.q_prime,
        s.q_prime_lower,
        pair.labels,
        head.ladder,
        head.class_names,
    )
    surface_rows = [surface_metrics(g, r, info.tags.yes, info.tags.no) for g, r in zip(pair.generations, records)]
    row = _row_at(report, alpha)
    scored = _scored_generations(head, pair, surface_rows, positive)
    thresholds = (info.raw.get("baselines") or {}).get("tag_probability", {}).get("thresholds")
    result = {
        **_pair_metrics(pair, surface_rows, report, row, alpha, positive),
        "report": report,
        # The alternatives on the same generations (training.baselines), and how well each score ranks them.
        "methods": compare_methods(scored, thresholds),
        "auroc": aurocs(scored),
        "seconds": pair.seconds,
    }
    _write_predictions(out / f"predictions_{bundle_name}_{dataset_name}.jsonl", records, pair, surface_rows)
    plot_q_prime(
        out / f"q_prime_by_correctness_{bundle_name}_{dataset_name}.png",
        s.q_prime.double(),
        pair.labels,
        positive,
        row["q_prime_min"],
        f"{bundle_name} on {dataset_name}: q' by correctness (alpha={alpha:g})",
    )
    result["risk_coverage"] = {
        name: risk_coverage(score, scored.labels)
        for name, score in (("lm_probability", pair.p_yes), ("softmax", scored.softmax_yes), ("sdm", scored.sdm_yes))
    }
    return result


def _generate_and_score(bundle, records: list[Record], config: EvaluateConfig, alpha: float, desc: str) -> _PairScores:
    """Greedy-decode and label every record as the server's model does, embed each verification input with the
    bundle's hidden-state recipe, score it with the head at alpha, and ask the LM for its own P(Yes)."""
    info, model, tokenizer, head = bundle.info, bundle.model, bundle.tokenizer, bundle.head
    correct = get_correctness(config.correctness)
    prompts = [r.prompt if r.prompt is not None else [dict(m) for m in r.messages] for r in records]

    started = time.perf_counter()
    generated = decode_and_label(
        model,
        tokenizer,
        records,
        info.chat,
        correct,
        config.max_new_tokens,
        config.generate_batch_size,
        config.progress,
        f"{desc}: generating",
    )
    generations = generated.texts
    generate_seconds = time.perf_counter() - started

    positive, negative = info.tags.positive_class, 1 - info.tags.positive_class
    labels = torch.tensor([positive if y else negative for y in generated.labels], dtype=torch.long)
    texts = [verification_text(tokenizer, p, g, info.chat, info.recipe) for p, g in zip(prompts, generations)]
    started = time.perf_counter()
    h = embed_texts(model, tokenizer, texts, info.recipe, config.embed_batch_size, config.progress)
    embed_seconds = time.perf_counter() - started
    scores = head.predict_scores(h, alpha=alpha)
    p_yes = tag_probabilities(
        model,
        tokenizer,
        prompts,
        generations,
        info.chat,
        info.tags.yes,
        info.recipe.max_length,
        config.embed_batch_size,
    )
    return _PairScores(
        generations, labels, scores, p_yes, {"generate": round(generate_seconds, 3), "embed": round(embed_seconds, 3)}
    )


def _scored_generations(head, pair: _PairScores, surface_rows: list[dict], positive: int) -> ScoredGenerations:
    """Every score training.baselines compares, on the same generations: the own tag, the LM's P(Yes),
    softmax(z') and SDM(z') of Yes, and SDM_HR's admissions (and HR_lower's) at each alpha of the ladder."""
    s = pair.scores
    own_lower = admissions_unchecked(
        s.probabilities_lower, s.predictions, s.q_prime_lower, [head.ladder.regions[a] for a in head.ladder.alphas]
    )
    own = head.ladder.admissions(s.probabilities, s.predictions, s.q_prime)
    return ScoredGenerations(
        labels=(pair.labels == positive).long(),
        own_tag=[r["own_tag"] for r in surface_rows],
        p_yes=pair.p_yes,
        softmax_yes=torch.softmax(s.logits.double(), dim=1)[:, positive].float(),
        sdm_yes=s.probabilities[:, positive],
        head_predictions=(s.predictions == positive).long(),
        alphas=tuple(head.ladder.alphas),
        hr=torch.stack([head.ladder.admitted_at(own, a) for a in head.ladder.alphas], dim=1),
        hr_lower=torch.stack([head.ladder.admitted_at(own_lower, a) for a in head.ladder.alphas], dim=1),
    )


def _pair_metrics(
    pair: _PairScores, surface_rows: list[dict], report: dict, row: dict, alpha: float, positive: int
) -> dict:
    """The pair's headline numbers: generation accuracy under r, the surface metrics, SDM_HR (and HR_lower) at
    alpha, why the head abstained, and q' of right against wrong generations."""
    s, labels, n = pair.scores, pair.labels, len(pair.generations)
    q_prime = s.q_prime.double()
    return {
        "n": n,
        "alpha": alpha,
        "generation_correct": int((labels == positive).sum()),
        "generation_acc": float((labels == positive).float().mean()) if n else 0.0,
        **aggregate_surface(surface_rows),
        "sdm_hr": {
            "alpha": alpha,
            "accuracy": row["HR"]["marginal"]["accuracy"],
            "admitted_proportion": row["HR"]["marginal"]["proportion"],
            "admitted": row["HR"]["marginal"]["admitted"],
            "q_prime_min": row["q_prime_min"],
        },
        "sdm_hr_lower": {
            "alpha": alpha,
            "accuracy": row["HR_lower"]["marginal"]["accuracy"],
            "admitted_proportion": row["HR_lower"]["marginal"]["proportion"],
            "admitted": row["HR_lower"]["marginal"]["admitted"],
        },
        # Admitted with yhat = Yes: the generations a selective-generation server returns as verified.
        "verified_yes": row["HR"]["prediction_conditional"][positive],
        "no_reject": report["no_reject"]["marginal"],
        "abstention_reasons": _abstention_counts(s.abstention_reason),
        "ood_proportion": float(s.is_ood.float().mean()) if n else 0.0,
        "q_prime_mean": {
            "correct": _mean(q_prime[labels == positive]),
            "wrong": _mean(q_prime[labels == 1 - positive]),
        },
    }


def _abstention_counts(reasons: Sequence[str | None]) -> dict[str, int]:
    """How many documents the head abstained on for each reason, sorted by reason."""
    counts: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def _write_predictions(path: Path, records: list[Record], pair: _PairScores, surface_rows: list[dict]) -> None:
    """predictions_<bundle>_<dataset>.jsonl: one line per document with its generation, label and scores."""
    s = pair.scores
    with open(path, "w", encoding="utf-8") as handle:
        for i, (record, text) in enumerate(zip(records, pair.generations)):
            row_i = {
                "id": record.id,
                "generation": text,
                "label": int(pair.labels[i]),
                "prediction": int(s.predictions[i]),
                "probability": float(s.probabilities[i, s.predictions[i]]),
                "q": int(s.q[i]),
                "q_prime": float(s.q_prime[i]),
                "d": float(s.d[i]),
                "is_ood": bool(s.is_ood[i]),
                "admitted": bool(s.admitted[i]),
                "admitted_lower": bool(s.admitted_lower[i]),
                "abstention_reason": s.abstention_reason[i],
                "region_alpha": s.region_alpha[i],
                "sentence_correct": surface_rows[i]["sentence_correct"],
                "exact_match": surface_rows[i]["exact_match"],
                "own_tag": surface_rows[i]["own_tag"],
                "lm_p_yes": float(pair.p_yes[i]),
            }
            handle.write(json.dumps(row_i, ensure_ascii=False) + "\n")


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None
