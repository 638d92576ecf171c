"""training.evaluate's report.md (Tables 2, 3 and 4 of the LM paper, the held-out validity of SDM_HR, the AUROCs,
the methods side by side), rendered from the metrics dict, and its plots: admitted proportion and accuracy against
alpha, q' by correctness, risk against coverage."""

from __future__ import annotations

from pathlib import Path

import torch

from sdm_core.calibration import same_alpha
from sdm_core.report import render_markdown
from training.baselines import METHODS

__all__ = ["REPORT_ALPHAS", "plot_admitted", "plot_q_prime", "plot_risk_coverage", "render_report"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_q_prime(
    path: Path, q_prime: torch.Tensor, labels: torch.Tensor, positive: int, q_prime_min: float | None, title: str
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    groups = [
        ("correct (y=1)", q_prime[labels == positive], "tab:green"),
        ("wrong (y=0)", q_prime[labels != positive], "tab:red"),
    ]
    values = q_prime[torch.isfinite(q_prime)]
    top = float(values.max()) if values.numel() else 1.0
    bins = torch.linspace(0.0, max(top, 1.0), 31).tolist()
    for name, data, color in groups:
        data = data[torch.isfinite(data)]
        if data.numel():
            ax.hist(data.tolist(), bins=bins, alpha=0.55, color=color, label=f"{name}, n={data.numel()}")
        else:
            ax.plot([], [], color=color, label=f"{name}, n=0")
    if q_prime_min is not None:
        ax.axvline(q_prime_min, color="black", linestyle="--", linewidth=1, label=f"q'_min = {q_prime_min:.2f}")
    ax.set_xlabel("q' (rescaled similarity)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_admitted(path: Path, dataset: str, per_bundle: dict[str, dict]) -> None:
    """Left: SDM_HR admitted proportion against alpha; right: accuracy among admitted against alpha (with the
    y = alpha line the regions aim for). One line per bundle."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    lo = 1.0
    for name, result in per_bundle.items():
        rows = sorted(result["report"]["alphas"], key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in rows]
        lo = min([lo] + alphas)
        line = left.plot(alphas, [r["HR"]["marginal"]["proportion"] for r in rows], marker="o", label=name)[0]
        left.plot(
            alphas, [r["HR_lower"]["marginal"]["proportion"] for r in rows], linestyle=":", color=line.get_color()
        )
        acc = [r["HR"]["marginal"]["accuracy"] for r in rows]
        right.plot(
            [a for a, v in zip(alphas, acc) if v is not None],
            [v for v in acc if v is not None],
            marker="o",
            color=line.get_color(),
            label=name,
        )
    right.plot([lo, 1.0], [lo, 1.0], color="grey", linestyle="--", linewidth=1, label="accuracy = alpha")
    left.set_xlabel("alpha")
    left.set_ylabel("admitted proportion n/|D| (dotted: HR_lower)")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"{dataset}: SDM_HR admitted proportion", fontsize=10)
    right.set_xlabel("alpha")
    right.set_ylabel("accuracy among admitted")
    right.set_ylim(-0.02, 1.02)
    right.set_title(f"{dataset}: SDM_HR accuracy", fontsize=10)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_risk_coverage(path: Path, dataset: str, per_bundle: dict[str, dict]) -> None:
    """Risk (share of wrong answers among those admitted as verified) against coverage when admitting the
    top-scored answers, per bundle: SDM(z')_Yes solid, softmax(z')_Yes dash-dot, the LM's P(Yes) dashed; SDM_HR at
    each alpha of the ladder as points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, result in per_bundle.items():
        curves = result["risk_coverage"]
        line = ax.plot(*curves["sdm"], label=f"{name}: SDM(z')", linewidth=1.4)[0]
        ax.plot(*curves["softmax"], color=line.get_color(), linestyle="-.", linewidth=1, label=f"{name}: softmax(z')")
        ax.plot(
            *curves["lm_probability"], color=line.get_color(), linestyle="--", linewidth=1, label=f"{name}: LM P(Yes)"
        )
        points = [
            (r["verified"]["share"], 1.0 - r["verified"]["accuracy"])
            for r in result["methods"]["sdm_hr"]
            if r["verified"]["admitted"]
        ]
        if points:
            ax.scatter(
                *zip(*points), color=line.get_color(), marker="o", s=18, zorder=3, label=f"{name}: SDM_HR (ladder)"
            )
    ax.set_xlabel("coverage (share admitted as verified)")
    ax.set_ylabel("risk (share of admitted that are wrong)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{dataset}: risk-coverage", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- report ---------------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if 0.0 < value < 0.01:
        return "<0.01"
    return f"{value:.2f}"


REPORT_ALPHAS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def _validity_lines(metrics: dict) -> list[str]:
    """Held-out validity of SDM_HR: every alpha that admitted something, with its exact binomial test."""
    lines = [
        "## Held-out validity of SDM_HR",
        "",
        "Answers admitted as verified (in the served region, predicted Yes) against alpha: the one-sided exact "
        "binomial p-value of H0 accuracy >= alpha and the 95 % Clopper-Pearson lower bound. **VIOLATION**: p < 0.01 "
        "with at least 10 admitted.",
        "",
        "| Dataset | Bundle | alpha | admitted | correct | accuracy | p | lower bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            rows = [r for r in metrics["results"][b][d]["methods"]["sdm_hr"] if r["verified"]["admitted"]]
            for r in rows:
                v = r["verified"]
                flag = " **VIOLATION**" if v["p_value"] < 0.01 and v["admitted"] >= 10 else ""
                lines.append(
                    f"| {d} | {b} | {r['alpha']:g} | {v['admitted']} | {v['correct']} | {_fmt(v['accuracy'])} | "
                    f"{v['p_value']:.3g}{flag} | {v['lower_bound']:.2f} |"
                )
            if not rows:
                lines.append(f"| {d} | {b} | – | 0 | – | – | – | – |")
    return lines


def _auroc_lines(metrics: dict) -> list[str]:
    """The AUROC of each score (the LM's P(Yes), softmax(z'), SDM(z')) of right against wrong generations."""
    lines = [
        "",
        "## AUROC of right against wrong generations",
        "",
        "| Dataset | Bundle | LM P(Yes) | softmax(z')_Yes | SDM(z')_Yes |",
        "|---|---|---|---|---|",
    ]
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            a = metrics["results"][b][d]["auroc"]
            lines.append(f"| {d} | {b} | {_fmt(a['lm_probability'])} | {_fmt(a['softmax'])} | {_fmt(a['sdm'])} |")
    return lines


def _methods_lines(metrics: dict) -> list[str]:
    """Every method's verified answers side by side, per pair, at the report's alphas on the pair's ladder."""
    lines = [
        "",
        "## Methods side by side",
        "",
        "Accuracy (against r) of the answers each method admits as verified, and how many (of the dataset), at "
        "each alpha. Methods: training/baselines.py. Full Table 4 cells per method and alpha are in metrics.json.",
        "",
    ]
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            methods = metrics["results"][b][d]["methods"]
            alphas = [a for a in REPORT_ALPHAS if any(same_alpha(r["alpha"], a) for r in methods["sdm_hr"])]
            lines.append(f"### {b} on {d} ({metrics['datasets'][d]['n']})")
            lines.append("")
            lines.append("| Method | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
            lines.append("|" + "---|" * (len(alphas) + 1))
            for name in METHODS:
                if name not in methods:
                    continue
                cells = []
                for a in alphas:
                    v = next(r["verified"] for r in methods[name] if same_alpha(r["alpha"], a))
                    cells.append(f"{_fmt(v['accuracy'])} ({v['admitted']})")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            lines.append(f"![risk-coverage](risk_coverage_{d}.png)")
            lines.append("")
    return lines


def render_report(metrics: dict) -> str:
    """report.md from the metrics dict: the bundles, Tables 2 and 3, abstentions, the methods side by side and
    Table 4 per pair, in the paper's order."""
    lines = _header_lines(metrics)
    lines += _table2_lines(metrics)
    lines += _table3_lines(metrics)
    lines += _abstention_lines(metrics)
    lines += _validity_lines(metrics)
    lines += _auroc_lines(metrics)
    lines += _methods_lines(metrics)
    lines += _table4_lines(metrics)
    return "\n".join(lines).rstrip() + "\n"


def _header_lines(metrics: dict) -> list[str]:
    """The title, the correctness function, each bundle with its alpha, and each bundle's certified ladder."""
    bundles = list(metrics["bundles"])
    lines = ["# SDM LM evaluation", ""]
    lines.append(
        f"Correctness: `{metrics['config']['correctness']}`; max_new_tokens {metrics['config']['max_new_tokens']}. "
        "Bundles: "
        + "; ".join(
            f"**{b}** = `{metrics['bundles'][b]['path']}` (α = {metrics['bundles'][b]['alpha']:g})" for b in bundles
        )
        + "."
    )
    lines.append("")
    for b in bundles:
        certified = metrics["bundles"][b].get("certified_alphas")
        if certified is None:
            lines.append(f"- {b}: no certification recorded (a bundle from before held-out certification).")
        else:
            withdrawn = metrics["bundles"][b].get("withdrawn_alphas") or []
            lines.append(
                f"- {b}: certified alphas {', '.join(f'{a:g}' for a in certified) or 'none'}; withdrawn "
                f"{', '.join(f'{a:g}' for a in withdrawn) or 'none'} (the served ladder, evaluated here)."
            )
    lines.append("")
    return lines


def _table2_lines(metrics: dict) -> list[str]:
    """Table 2: SDM_HR accuracy and admitted proportion at each bundle's alpha, one row per dataset."""
    bundles = list(metrics["bundles"])
    results = metrics["results"]
    lines = ["## Table 2: SDM_HR (accuracy, admitted proportion n/|D|)", ""]
    lines.append(
        "Marginal accuracy of the verification prediction among admitted documents, and the admitted proportion, "
        "at each bundle's α. '–' means nothing was admitted."
    )
    lines.append("")
    lines.append("| Dataset | " + " | ".join(f"{b} (α={metrics['bundles'][b]['alpha']:g})" for b in bundles) + " |")
    lines.append("|" + "---|" * (len(bundles) + 1))
    for d in metrics["datasets"]:
        cells = []
        for b in bundles:
            hr = results[b][d]["sdm_hr"]
            cells.append(f"{_fmt(hr['accuracy'])}, {_fmt(hr['admitted_proportion'])}")
        lines.append(f"| {d} ({metrics['datasets'][d]['n']}) | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _table3_lines(metrics: dict) -> list[str]:
    """Table 3: the generation's sentence and exact-match accuracy without the SDM layer, then the raw counts."""
    bundles = list(metrics["bundles"])
    datasets = list(metrics["datasets"])
    results = metrics["results"]
    lines = ["## Table 3: generation (Sentence acc / Exact-match acc)", ""]
    lines.append(
        "No SDM layer: the first `<sentence>` against the reference, and the whole generation against the positive."
    )
    lines.append("")
    lines.append("| Dataset | " + " | ".join(bundles) + " |")
    lines.append("|" + "---|" * (len(bundles) + 1))
    for d in datasets:
        cells = [f"{results[b][d]['sentence_acc']:.2f} / {results[b][d]['exact_match_acc']:.2f}" for b in bundles]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Raw counts: exact / sentence / no response / own tag TP,FP,FN,TN (missing) / word acc mean ± sd / "
        "correct under the correctness function."
    )
    lines.append("")
    lines.append("| Dataset | Bundle | counts |")
    lines.append("|---|---|---|")
    for d in datasets:
        for b in bundles:
            r = results[b][d]
            c = r["own_tag_vs_sentence"]
            lines.append(
                f"| {d} | {b} | {r['exact_match']} / {r['sentence_correct']} / {r['no_response']} / "
                f"{c['tp']},{c['fp']},{c['fn']},{c['tn']} ({c['missing']}) / "
                f"{r['word_acc_mean']:.4f} ± {r['word_acc_sd']:.4f} / "
                f"{r['generation_correct']} of {r['n']} |"
            )
    lines.append("")
    return lines


def _abstention_lines(metrics: dict) -> list[str]:
    """How many each bundle admits at its alpha, its OOD proportion and why it abstains, per dataset."""
    lines = ["## Abstentions at α", ""]
    lines.append("| Dataset | Bundle | admitted | OOD proportion | abstention reasons |")
    lines.append("|---|---|---|---|---|")
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            r = metrics["results"][b][d]
            reasons = ", ".join(f"{k}: {v}" for k, v in r["abstention_reasons"].items()) or "–"
            lines.append(
                f"| {d} | {b} | {r['sdm_hr']['admitted']} of {r['n']} | {r['ood_proportion']:.2f} | {reasons} |"
            )
    lines.append("")
    return lines


def _table4_lines(metrics: dict) -> list[str]:
    """Table 4: each pair's class-, prediction-conditional and marginal results, with its plots."""
    lines = ["## Table 4: class-, prediction-conditional and marginal results", ""]
    for b in metrics["bundles"]:
        for d in metrics["datasets"]:
            table = render_markdown(metrics["results"][b][d]["report"], title=f"{b} on {d}")
            # render_markdown's level-1 title becomes a level-3 heading under this section.
            lines.append("##" + table if table.startswith("# ") else table)
            lines.append(
                f"![admitted vs alpha](admitted_vs_alpha_{d}.png) "
                f"![q' by correctness](q_prime_by_correctness_{b}_{d}.png)"
            )
            lines.append("")
    return lines
