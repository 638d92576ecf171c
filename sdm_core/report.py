"""Selective-classification reports in the layout of the LM paper's Table 4.

For each alpha of the ladder and each estimator (HR, HR_lower, NO-REJECT): accuracy and admitted proportion
n/|D| conditioned on each true class, on each predicted class, and marginally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from sdm_core.calibration import RegionLadder

__all__ = ["Cell", "selective_report", "selective_row", "render_markdown", "auroc"]


@dataclass(frozen=True)
class Cell:
    """Accuracy among admitted items of a group (None when none is admitted) and admitted proportion n/|D|."""

    accuracy: float | None
    proportion: float
    admitted: int

    def text(self) -> str:
        accuracy = "–" if self.accuracy is None else f"{self.accuracy:.2f}"
        return f"{accuracy} ({self.proportion:.2f})"


def _cell(mask: torch.Tensor, correct: torch.Tensor, total: int) -> Cell:
    n = int(mask.sum())
    accuracy = float(correct[mask].float().mean()) if n else None
    return Cell(accuracy, n / total if total else 0.0, n)


def selective_row(admitted: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> dict:
    """One admission decision's Table 4 cells: class-conditional, prediction-conditional and marginal."""
    correct = predictions == labels
    total = int(labels.shape[0])
    return {
        "class_conditional": [asdict(_cell(admitted & (labels == c), correct, total)) for c in range(num_classes)],
        "prediction_conditional": [
            asdict(_cell(admitted & (predictions == c), correct, total)) for c in range(num_classes)
        ],
        "marginal": asdict(_cell(admitted, correct, total)),
    }


def selective_report(
    probabilities: torch.Tensor,
    probabilities_lower: torch.Tensor,
    predictions: torch.Tensor,
    q_prime: torch.Tensor,
    q_prime_lower: torch.Tensor,
    labels: torch.Tensor,
    ladder: RegionLadder,
    class_names: Sequence[str],
) -> dict:
    """The report as JSON-ready data. ``labels`` are the true classes of the scored documents."""
    num_classes = probabilities.shape[1]
    own = ladder.admissions(probabilities, predictions, q_prime)
    own_lower = ladder.admissions(probabilities_lower, predictions, q_prime_lower)
    rows = []
    for alpha in ladder.alphas:
        hr, hr_lower = ladder.admitted_at(own, alpha), ladder.admitted_at(own_lower, alpha)
        region = ladder.regions[alpha]
        rows.append(
            {
                "alpha": alpha,
                "q_prime_min": region.q_prime_min if region.exists else None,
                "thresholds": list(region.thresholds),
                "HR": selective_row(hr, labels, predictions, num_classes),
                "HR_lower": selective_row(hr_lower, labels, predictions, num_classes),
            }
        )
    return {
        "n": int(labels.shape[0]),
        "class_names": list(class_names),
        "class_counts": [int((labels == c).sum()) for c in range(num_classes)],
        "no_reject": selective_row(torch.ones_like(labels, dtype=torch.bool), labels, predictions, num_classes),
        "ood_proportion": float((torch.floor(q_prime) <= 0).float().mean()) if labels.numel() else 0.0,
        "nested_regions": ladder.nested,
        "alphas": rows,
    }


def _cells(row: dict) -> list[str]:
    def text(c: dict) -> str:
        return Cell(c["accuracy"], c["proportion"], c["admitted"]).text()

    return (
        [text(c) for c in row["class_conditional"]]
        + [text(c) for c in row["prediction_conditional"]]
        + [text(row["marginal"])]
    )


def render_markdown(report: dict, title: str = "SDM estimator evaluation") -> str:
    """Table 4 layout: one row per estimator and alpha; each cell is 'accuracy (admitted proportion)'."""
    names = report["class_names"]
    header = ["Estimator", "alpha", "q'_min"] + [f"y={n}" for n in names] + [f"ŷ={n}" for n in names] + ["marginal"]
    lines = [
        f"# {title}",
        "",
        f"{report['n']} documents (class counts: "
        f"{', '.join(f'{n}: {c}' for n, c in zip(names, report['class_counts']))}); "
        f"OOD (q = 0): {report['ood_proportion']:.2%}. Each cell: accuracy among admitted (admitted proportion n/|D|); "
        "'–' means nothing admitted.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| NO-REJECT | – | – | " + " | ".join(_cells(report["no_reject"])) + " |",
    ]
    for estimator in ("HR", "HR_lower"):
        for row in report["alphas"]:
            q_min = "∞" if row["q_prime_min"] is None else f"{row['q_prime_min']:.2f}"
            lines.append(
                f"| SDM_{estimator} | {row['alpha']:.2f} | {q_min} | " + " | ".join(_cells(row[estimator])) + " |"
            )
    lines.append("")
    return "\n".join(lines)


def auroc(scores: object, labels: object) -> float | None:
    """Area under the ROC curve of ``scores`` ranking positives (label 1) above negatives (label 0): the
    Mann-Whitney probability that a random positive outscores a random negative, ties counting one half.
    None when either class is absent (the area is undefined)."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels).reshape(-1).bool()
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} rows but labels has {y.shape[0]}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks (1-based) make ties count one half.
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    sorted_scores = s[order]
    i = 0
    n = s.shape[0]
    values = sorted_scores.tolist()
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
