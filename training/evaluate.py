"""``python -m training.evaluate``: test-set evaluation of one or more bundles, laid out like the LM paper.

For every bundle and every record file: greedy-decode each prompt with the bundle's model and chat format, label
the generation, cut where the server's output ends (its first verified element), with the task's correctness
function (y = r(generation, reference), SDM_SPEC §4.3), build the verification input exactly as the server does
(the response truncated after its ``<verified>``, or with one appended, wrapped in the chat template), embed it with the bundle's hidden-state recipe and score it
with the bundle's SDM head. Alongside, the generation's surface metrics (§4.3): sentence accuracy, exact-match
accuracy, "no response" count, word-level accuracy and the model's own Yes/No tag against sentence correctness.

Outputs under ``--out``:

    metrics.json                              every number, per bundle x dataset (Table 2, 3, 4 data)
    report.md                                 Table 2 (SDM_HR at alpha), Table 3 (surface), Table 4 per pair
    predictions_<bundle>_<dataset>.jsonl      one line per document
    admitted_vs_alpha_<dataset>.png           admitted proportion (and accuracy) against alpha, one line per bundle
    q_prime_by_correctness_<bundle>_<dataset>.png   q' of correct vs wrong generations

    python -m training.evaluate --preset tiny --bundles /tmp/bundle_tiny \\
        --data wiki=data/test.jsonl,harvard=data/harvard.jsonl --out eval/tiny
    python -m training.evaluate --bundles sdm=bundles/sdm,ce=bundles/ce --data wiki=data/test.jsonl --out eval/cmp
"""

from __future__ import annotations

import gc
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from sdm_core.calibration import admissions_unchecked, same_alpha
from sdm_core.lm.embedding import embed_texts, verification_text
from sdm_core.lm.models import resolve_device
from sdm_core.report import render_markdown, selective_report
from training.baselines import METHODS, ScoredGenerations, aurocs, compare_methods, risk_coverage
from training.config import build_parser, config_from_args
from training.correctness import CORRECTNESS_HELP, first_sentence, get_correctness
from training.generation import decode_and_label
from training.records import Record, load_records
from training.tag_probability import tag_probabilities

__all__ = ["EvaluateConfig", "PRESETS", "evaluate", "parse_named_paths", "surface_metrics", "main"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SENTENCE_OPEN_RE = re.compile(r"<sentence>(.*?)</sentence>", re.DOTALL)


@dataclass(frozen=True)
class EvaluateConfig:
    bundles: tuple[str, ...] = ()  # "NAME=PATH" or a bundle folder (named after the folder)
    data: tuple[str, ...] = ()  # "NAME=PATH" JSONL record files, or a path (named after the file stem)
    out: str = ""
    correctness: str = "word_order"
    max_docs: int = 0  # per dataset; 0: all
    max_new_tokens: int = 512
    generate_batch_size: int = 16
    embed_batch_size: int = 16
    alpha: float | None = None  # None: each bundle's default alpha; otherwise it must be on every bundle's ladder
    device: str = "auto"  # auto: the first GPU when there is one, else the CPU
    progress: bool = True

    # One line of --help per field (a test checks that every field has one).
    HELP: ClassVar[dict[str, str]] = {
        "bundles": "comma-separated NAME=PATH bundles (or bundle folders, named after the folder) to compare",
        "data": "comma-separated NAME=PATH JSONL record files (or paths, named after the file stem)",
        "out": "folder for metrics.json, report.md, predictions and plots (required)",
        "correctness": CORRECTNESS_HELP,
        "max_docs": "use the first N documents of each dataset (0: all)",
        "max_new_tokens": "tokens to generate at most per prompt",
        "generate_batch_size": "prompts per batched greedy generation",
        "embed_batch_size": "instances per no-grad hidden-state pass",
        "alpha": "alpha to report at (on every bundle's ladder); default: each bundle's own",
        "device": "auto (the first GPU when there is one, else the CPU), cpu, cuda or cuda:N",
        "progress": "show progress bars",
    }

    def __post_init__(self) -> None:
        # The CLI hands strings for fields whose default is None or a tuple; normalise them here.
        for name in ("bundles", "data"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.alpha, str):
            text = self.alpha.strip().lower()
            if text in ("", "none", "default"):
                object.__setattr__(self, "alpha", None)
            else:
                try:
                    object.__setattr__(self, "alpha", float(text))
                except ValueError:
                    raise ValueError(f"alpha must be a number in (0.5, 1] or 'default', got {self.alpha!r}") from None

    def validate(self) -> None:
        if not self.bundles:
            raise ValueError("--bundles is required: one or more NAME=PATH (or bundle folders), comma-separated")
        if not self.data:
            raise ValueError("--data is required: one or more NAME=PATH JSONL record files, comma-separated")
        if not self.out:
            raise ValueError("--out (the folder for metrics.json, report.md, predictions and plots) is required")
        for name in ("max_new_tokens", "generate_batch_size", "embed_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.max_docs) < 0:
            raise ValueError(f"max_docs must be >= 0 (0: all), got {self.max_docs!r}")
        if self.alpha is not None and not 0.5 < float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0.5, 1], got {self.alpha}")
        get_correctness(self.correctness)
        bundles = parse_named_paths(self.bundles, "bundle")
        data = parse_named_paths(self.data, "data")
        for name, path in bundles.items():
            if not (path / "bundle.json").is_file():
                raise ValueError(f"bundle {name!r}: {path} is not an sdm-lm bundle (bundle.json is missing); "
                                 "build one with python -m training.calibrate")
        for name, path in data.items():
            if not path.is_file():
                raise ValueError(f"data {name!r}: {path} does not exist (expected a JSONL record file)")


PRESETS: dict[str, dict] = {
    "paper": {},
    # Sizes matched to training.calibrate's presets of the same name.
    "smollm2-cpu": {"max_new_tokens": 96},
    "tiny": {"max_new_tokens": 12, "max_docs": 16, "generate_batch_size": 8, "embed_batch_size": 8, "progress": False},
}
# The arithmetic task's presets: labelled by its correctness function (exact value).
PRESETS["arithmetic-tiny"] = {**PRESETS["tiny"], "correctness": "arithmetic"}
PRESETS["arithmetic-cpu"] = {"max_new_tokens": 32, "correctness": "arithmetic"}


def parse_named_paths(specs: Sequence[str], kind: str) -> dict[str, Path]:
    """``("NAME=PATH" | "PATH", ...)`` -> {name: path}, in order. A plain path is named after its folder
    (bundles) or file stem (data). Names become parts of file names, so they are restricted to
    letters, digits, ``_``, ``.`` and ``-``; duplicates are an error."""
    out: dict[str, Path] = {}
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            raise ValueError(f"empty {kind} entry; give NAME=PATH or a path")
        if "=" in spec:
            name, path_text = (part.strip() for part in spec.split("=", 1))
            if not name or not path_text:
                raise ValueError(f"bad {kind} entry {spec!r}: expected NAME=PATH with a non-empty name and path")
        else:
            path_text = spec
            p = Path(spec)
            name = (p.stem if kind == "data" else p.name) or p.resolve().name
        if not _NAME_RE.match(name):
            raise ValueError(f"bad {kind} entry {spec!r}: the name {name!r} must start with a letter or digit and use "
                             "only letters, digits, '_', '.' and '-' (it is used in output file names)")
        if name in out:
            raise ValueError(f"duplicate {kind} name {name!r}; name each entry explicitly with NAME=PATH")
        out[name] = Path(path_text).expanduser()
    return out


# -- surface metrics (SDM_SPEC §4.3, Table 3) ----------------------------------------------------------------

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


def _aggregate_surface(rows: list[dict]) -> dict:
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


# -- evaluation -----------------------------------------------------------------------------------------------

def _row_at(report: dict, alpha: float) -> dict:
    for row in report["alphas"]:
        if same_alpha(row["alpha"], alpha):
            return row
    raise ValueError(f"alpha {alpha} is not in the report")


def _evaluate_pair(bundle, bundle_name: str, dataset_name: str, records: list[Record], config: EvaluateConfig,
                   alpha: float, out: Path) -> dict:
    info, model, tokenizer, head = bundle.info, bundle.model, bundle.tokenizer, bundle.head
    correct = get_correctness(config.correctness)
    prompts = [r.prompt if r.prompt is not None else [dict(m) for m in r.messages] for r in records]

    started = time.perf_counter()
    generated = decode_and_label(model, tokenizer, records, info.chat, correct, config.max_new_tokens, config.generate_batch_size,
                                 config.progress, f"{bundle_name}/{dataset_name}: generating")
    generations = generated.texts
    generate_seconds = time.perf_counter() - started

    positive, negative = info.tags.positive_class, 1 - info.tags.positive_class
    labels = torch.tensor([positive if y else negative for y in generated.labels], dtype=torch.long)
    texts = [verification_text(tokenizer, p, g, info.chat, info.recipe) for p, g in zip(prompts, generations)]
    started = time.perf_counter()
    h = embed_texts(model, tokenizer, texts, info.recipe, config.embed_batch_size, config.progress)
    embed_seconds = time.perf_counter() - started
    s = head.predict_scores(h, alpha=alpha)
    p_yes = tag_probabilities(model, tokenizer, prompts, generations, info.chat, info.tags.yes, info.recipe.max_length,
                              config.embed_batch_size)
    report = selective_report(s.probabilities, s.probabilities_lower, s.predictions, s.q_prime, s.q_prime_lower, labels,
                              head.ladder, head.class_names)

    surface_rows = [surface_metrics(g, r, info.tags.yes, info.tags.no) for g, r in zip(generations, records)]
    n = len(records)
    reasons: dict[str, int] = {}
    for reason in s.abstention_reason:
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    row = _row_at(report, alpha)
    q_prime = s.q_prime.double()
    own_lower = admissions_unchecked(s.probabilities_lower, s.predictions, s.q_prime_lower, [head.ladder.regions[a] for a in head.ladder.alphas])
    own = head.ladder.admissions(s.probabilities, s.predictions, s.q_prime)
    scored = ScoredGenerations(
        labels=(labels == positive).long(), own_tag=[r["own_tag"] for r in surface_rows], p_yes=p_yes,
        softmax_yes=torch.softmax(s.logits.double(), dim=1)[:, positive].float(), sdm_yes=s.probabilities[:, positive],
        head_predictions=(s.predictions == positive).long(), alphas=tuple(head.ladder.alphas),
        hr=torch.stack([head.ladder.admitted_at(own, a) for a in head.ladder.alphas], dim=1),
        hr_lower=torch.stack([head.ladder.admitted_at(own_lower, a) for a in head.ladder.alphas], dim=1),
    )
    thresholds = (info.raw.get("baselines") or {}).get("tag_probability", {}).get("thresholds")
    result = {
        "n": n,
        "alpha": alpha,
        "generation_correct": int((labels == positive).sum()),
        "generation_acc": float((labels == positive).float().mean()) if n else 0.0,
        **_aggregate_surface(surface_rows),
        "sdm_hr": {"alpha": alpha, "accuracy": row["HR"]["marginal"]["accuracy"],
                   "admitted_proportion": row["HR"]["marginal"]["proportion"], "admitted": row["HR"]["marginal"]["admitted"],
                   "q_prime_min": row["q_prime_min"]},
        "sdm_hr_lower": {"alpha": alpha, "accuracy": row["HR_lower"]["marginal"]["accuracy"],
                         "admitted_proportion": row["HR_lower"]["marginal"]["proportion"],
                         "admitted": row["HR_lower"]["marginal"]["admitted"]},
        # Admitted with yhat = Yes: the generations a selective-generation server returns as verified.
        "verified_yes": row["HR"]["prediction_conditional"][positive],
        "no_reject": report["no_reject"]["marginal"],
        "abstention_reasons": dict(sorted(reasons.items())),
        "ood_proportion": float(s.is_ood.float().mean()) if n else 0.0,
        "q_prime_mean": {"correct": _mean(q_prime[labels == positive]), "wrong": _mean(q_prime[labels == negative])},
        "report": report,
        # The alternatives on the same generations (training.baselines), and how well each score ranks them.
        "methods": compare_methods(scored, thresholds),
        "auroc": aurocs(scored),
        "seconds": {"generate": round(generate_seconds, 3), "embed": round(embed_seconds, 3)},
    }

    path = out / f"predictions_{bundle_name}_{dataset_name}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, (record, text) in enumerate(zip(records, generations)):
            row_i = {
                "id": record.id,
                "generation": text,
                "label": int(labels[i]),
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
                "lm_p_yes": float(p_yes[i]),
            }
            handle.write(json.dumps(row_i, ensure_ascii=False) + "\n")
    _plot_q_prime(out / f"q_prime_by_correctness_{bundle_name}_{dataset_name}.png", q_prime, labels, positive,
                  row["q_prime_min"], f"{bundle_name} on {dataset_name}: q' by correctness (alpha={alpha:g})")
    result["risk_coverage"] = {name: risk_coverage(score, scored.labels)
                               for name, score in (("lm_probability", p_yes), ("softmax", scored.softmax_yes), ("sdm", scored.sdm_yes))}
    return result


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


# -- plots ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_q_prime(path: Path, q_prime: torch.Tensor, labels: torch.Tensor, positive: int, q_prime_min: float | None, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    groups = [("correct (y=1)", q_prime[labels == positive], "tab:green"), ("wrong (y=0)", q_prime[labels != positive], "tab:red")]
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


def _plot_admitted(path: Path, dataset: str, per_bundle: dict[str, dict]) -> None:
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
        left.plot(alphas, [r["HR_lower"]["marginal"]["proportion"] for r in rows], linestyle=":", color=line.get_color())
        acc = [r["HR"]["marginal"]["accuracy"] for r in rows]
        right.plot([a for a, v in zip(alphas, acc) if v is not None], [v for v in acc if v is not None], marker="o",
                   color=line.get_color(), label=name)
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


def _plot_risk_coverage(path: Path, dataset: str, per_bundle: dict[str, dict]) -> None:
    """Risk (share of wrong answers among those admitted as verified) against coverage when admitting the
    top-scored answers, per bundle: SDM(z')_Yes solid, softmax(z')_Yes dash-dot, the LM's P(Yes) dashed; SDM_HR at
    each alpha of the ladder as points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, result in per_bundle.items():
        curves = result["risk_coverage"]
        line = ax.plot(*curves["sdm"], label=f"{name}: SDM(z')", linewidth=1.4)[0]
        ax.plot(*curves["softmax"], color=line.get_color(), linestyle="-.", linewidth=1, label=f"{name}: softmax(z')")
        ax.plot(*curves["lm_probability"], color=line.get_color(), linestyle="--", linewidth=1, label=f"{name}: LM P(Yes)")
        points = [(r["verified"]["share"], 1.0 - r["verified"]["accuracy"]) for r in result["methods"]["sdm_hr"] if r["verified"]["admitted"]]
        if points:
            ax.scatter(*zip(*points), color=line.get_color(), marker="o", s=18, zorder=3, label=f"{name}: SDM_HR (ladder)")
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


def _methods_section(metrics: dict) -> list[str]:
    """Held-out validity of SDM_HR (every alpha that admitted something, with its exact binomial test), the
    AUROC of each score, and every method's verified answers side by side."""
    lines = ["## Held-out validity of SDM_HR", "",
             "Answers admitted as verified (in the served region, predicted Yes) against alpha: the one-sided exact binomial "
             "p-value of H0 accuracy >= alpha and the 95 % Clopper-Pearson lower bound. **VIOLATION**: p < 0.01 with at least 10 "
             "admitted.", "", "| Dataset | Bundle | alpha | admitted | correct | accuracy | p | lower bound |", "|---|---|---|---|---|---|---|---|"]
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            rows = [r for r in metrics["results"][b][d]["methods"]["sdm_hr"] if r["verified"]["admitted"]]
            for r in rows:
                v = r["verified"]
                flag = " **VIOLATION**" if v["p_value"] < 0.01 and v["admitted"] >= 10 else ""
                lines.append(f"| {d} | {b} | {r['alpha']:g} | {v['admitted']} | {v['correct']} | {_fmt(v['accuracy'])} | "
                             f"{v['p_value']:.3g}{flag} | {v['lower_bound']:.2f} |")
            if not rows:
                lines.append(f"| {d} | {b} | – | 0 | – | – | – | – |")
    lines += ["", "## AUROC of right against wrong generations", "",
              "| Dataset | Bundle | LM P(Yes) | softmax(z')_Yes | SDM(z')_Yes |", "|---|---|---|---|---|"]
    for d in metrics["datasets"]:
        for b in metrics["bundles"]:
            a = metrics["results"][b][d]["auroc"]
            lines.append(f"| {d} | {b} | {_fmt(a['lm_probability'])} | {_fmt(a['softmax'])} | {_fmt(a['sdm'])} |")
    lines += ["", "## Methods side by side", "",
              "Accuracy (against r) of the answers each method admits as verified, and how many (of the dataset), at each alpha. "
              "Methods: training/baselines.py. Full Table 4 cells per method and alpha are in metrics.json.", ""]
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
    bundles = list(metrics["bundles"])
    datasets = list(metrics["datasets"])
    results = metrics["results"]

    lines = ["# SDM LM evaluation", ""]
    lines.append(f"Correctness: `{metrics['config']['correctness']}`; max_new_tokens {metrics['config']['max_new_tokens']}. "
                 "Bundles: " + "; ".join(f"**{b}** = `{metrics['bundles'][b]['path']}` (α = {metrics['bundles'][b]['alpha']:g})"
                                         for b in bundles) + ".")
    lines.append("")
    for b in bundles:
        certified = metrics["bundles"][b].get("certified_alphas")
        if certified is None:
            lines.append(f"- {b}: no certification recorded (a bundle from before held-out certification).")
        else:
            withdrawn = metrics["bundles"][b].get("withdrawn_alphas") or []
            lines.append(f"- {b}: certified alphas {', '.join(f'{a:g}' for a in certified) or 'none'}; withdrawn "
                         f"{', '.join(f'{a:g}' for a in withdrawn) or 'none'} (the served ladder, evaluated here).")
    lines.append("")
    lines.append("## Table 2: SDM_HR (accuracy, admitted proportion n/|D|)")
    lines.append("")
    lines.append("Marginal accuracy of the verification prediction among admitted documents, and the admitted proportion, "
                 "at each bundle's α. '–' means nothing was admitted.")
    lines.append("")
    lines.append("| Dataset | " + " | ".join(f"{b} (α={metrics['bundles'][b]['alpha']:g})" for b in bundles) + " |")
    lines.append("|" + "---|" * (len(bundles) + 1))
    for d in datasets:
        cells = []
        for b in bundles:
            hr = results[b][d]["sdm_hr"]
            cells.append(f"{_fmt(hr['accuracy'])}, {_fmt(hr['admitted_proportion'])}")
        lines.append(f"| {d} ({metrics['datasets'][d]['n']}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Table 3: generation (Sentence acc / Exact-match acc)")
    lines.append("")
    lines.append("No SDM layer: the first `<sentence>` against the reference, and the whole generation against the positive.")
    lines.append("")
    lines.append("| Dataset | " + " | ".join(bundles) + " |")
    lines.append("|" + "---|" * (len(bundles) + 1))
    for d in datasets:
        cells = [f"{results[b][d]['sentence_acc']:.2f} / {results[b][d]['exact_match_acc']:.2f}" for b in bundles]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Raw counts: exact / sentence / no response / own tag TP,FP,FN,TN (missing) / word acc mean ± sd / "
                 "correct under the correctness function.")
    lines.append("")
    lines.append("| Dataset | Bundle | counts |")
    lines.append("|---|---|---|")
    for d in datasets:
        for b in bundles:
            r = results[b][d]
            c = r["own_tag_vs_sentence"]
            lines.append(f"| {d} | {b} | {r['exact_match']} / {r['sentence_correct']} / {r['no_response']} / "
                         f"{c['tp']},{c['fp']},{c['fn']},{c['tn']} ({c['missing']}) / {r['word_acc_mean']:.4f} ± {r['word_acc_sd']:.4f} / "
                         f"{r['generation_correct']} of {r['n']} |")
    lines.append("")
    lines.append("## Abstentions at α")
    lines.append("")
    lines.append("| Dataset | Bundle | admitted | OOD proportion | abstention reasons |")
    lines.append("|---|---|---|---|---|")
    for d in datasets:
        for b in bundles:
            r = results[b][d]
            reasons = ", ".join(f"{k}: {v}" for k, v in r["abstention_reasons"].items()) or "–"
            lines.append(f"| {d} | {b} | {r['sdm_hr']['admitted']} of {r['n']} | {r['ood_proportion']:.2f} | {reasons} |")
    lines.append("")
    lines.extend(_methods_section(metrics))
    lines.append("## Table 4: class-, prediction-conditional and marginal results")
    lines.append("")
    for b in bundles:
        for d in datasets:
            table = render_markdown(results[b][d]["report"], title=f"{b} on {d}")
            # render_markdown's level-1 title becomes a level-3 heading under this section.
            lines.append("##" + table if table.startswith("# ") else table)
            lines.append(f"![admitted vs alpha](admitted_vs_alpha_{d}.png) ![q' by correctness](q_prime_by_correctness_{b}_{d}.png)")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def evaluate(config: EvaluateConfig) -> dict:
    """Run the evaluation and write its outputs; returns the metrics dict (also written as metrics.json)."""
    from sdm_core.lm.bundle import load_bundle

    config.validate()
    bundle_paths = parse_named_paths(config.bundles, "bundle")
    data_paths = parse_named_paths(config.data, "data")
    datasets: dict[str, list[Record]] = {}
    for name, path in data_paths.items():
        records = load_records(path)
        if config.max_docs:
            records = records[: config.max_docs]
        if not records:
            raise ValueError(f"data {name!r}: {path} holds no records")
        datasets[name] = records
    device = resolve_device(config.device)  # a bad --device is the flag's error, before any bundle loads
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    metrics: dict = {
        "config": asdict(config),
        "bundles": {},
        "datasets": {name: {"path": str(path), "n": len(datasets[name])} for name, path in data_paths.items()},
        "results": {},
    }
    for bundle_name, bundle_path in bundle_paths.items():
        try:
            bundle = load_bundle(bundle_path, device=device)
        except ValueError as exc:
            raise ValueError(f"bundle {bundle_name!r}: {exc}") from None
        head = bundle.head
        if head.num_classes != 2:
            raise ValueError(f"bundle {bundle_name!r}: its head has {head.num_classes} classes; a verification head has 2")
        try:
            alpha = head.ladder.resolve_alpha(config.alpha)
        except ValueError as exc:
            raise ValueError(f"bundle {bundle_name!r}: {exc}") from None
        certification = bundle.info.certification
        metrics["bundles"][bundle_name] = {
            "path": str(bundle_path), "alpha": alpha, "ladder": list(head.ladder.alphas), "model": bundle.info.model,
            "provenance_git_revision": bundle.info.provenance.get("git_revision"),
            "certified_alphas": list(certification.certified) if certification else None,
            "withdrawn_alphas": list(certification.withdrawn) if certification else None,
        }
        metrics["results"][bundle_name] = {}
        for dataset_name, records in datasets.items():
            metrics["results"][bundle_name][dataset_name] = _evaluate_pair(bundle, bundle_name, dataset_name, records, config, alpha, out)
        del bundle
        gc.collect()

    for dataset_name in datasets:
        per_bundle = {b: metrics["results"][b][dataset_name] for b in bundle_paths}
        _plot_admitted(out / f"admitted_vs_alpha_{dataset_name}.png", dataset_name, per_bundle)
        _plot_risk_coverage(out / f"risk_coverage_{dataset_name}.png", dataset_name, per_bundle)
        for result in per_bundle.values():
            del result["risk_coverage"]  # plotted; the curves are as long as the dataset
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(metrics), encoding="utf-8")
    return metrics


def _summary(metrics: dict, out: str) -> dict:
    return {
        "out": out,
        "results": {
            b: {d: {"n": r["n"], "sentence_acc": round(r["sentence_acc"], 4), "exact_match_acc": round(r["exact_match_acc"], 4),
                    "alpha": r["alpha"], "hr_accuracy": r["sdm_hr"]["accuracy"],
                    "hr_admitted_proportion": round(r["sdm_hr"]["admitted_proportion"], 4)}
                for d, r in per.items()}
            for b, per in metrics["results"].items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m training.evaluate", __doc__, cls=EvaluateConfig, env_prefix="SDM_EVALUATE_", presets=PRESETS)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, cls=EvaluateConfig, env_prefix="SDM_EVALUATE_", presets=PRESETS)
        metrics = evaluate(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_summary(metrics, config.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
