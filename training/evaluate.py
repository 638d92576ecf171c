"""``python -m training.evaluate``: test-set evaluation of one or more bundles, laid out like the LM paper.

For every bundle and every record file: greedy-decode each prompt with the bundle's model and chat format, label
the generation, cut where the server's output ends (its first verified element), with the task's correctness
function (y = r(generation, reference), SDM_SPEC §4.3), build the verification input exactly as the server does
(the response truncated after its ``<verified>``, or with one appended, wrapped in the chat template), embed it
with the bundle's hidden-state recipe and score it with the bundle's SDM head. Alongside, the generation's surface
metrics (§4.3): sentence accuracy, exact-match accuracy, "no response" count, word-level accuracy and the model's
own Yes/No tag against sentence correctness.

Outputs under ``--out``:

    metrics.json                              every number, per bundle x dataset (Table 2, 3, 4 data)
    report.md                                 Table 2 (SDM_HR at alpha), Table 3 (surface), Table 4 per pair
    predictions_<bundle>_<dataset>.jsonl      one line per document
    admitted_vs_alpha_<dataset>.png           admitted proportion (and accuracy) against alpha, one line per bundle
    q_prime_by_correctness_<bundle>_<dataset>.png   q' of correct vs wrong generations

    python -m training.evaluate --preset tiny --bundles /tmp/bundle_tiny \\
        --data wiki=data/test.jsonl,harvard=data/harvard.jsonl --out eval/tiny
    python -m training.evaluate --bundles sdm=bundles/sdm,ce=bundles/ce --data wiki=data/test.jsonl --out eval/cmp

One bundle on one dataset is scored in training.evaluation_pair; report.md and the plots are drawn in
training.evaluation_report; the surface metrics are training.surface_metrics.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sdm_core.lm.bundle import read_bundle_info
from sdm_core.lm.models import resolve_device
from sdm_core.math import check_alpha
from sdm_core.settings import DEVICE_HELP, CommandLine, flatten, parse_device, setting
from training.correctness import CORRECTNESS_HELP, bundle_correctness, get_correctness
from training.evaluation_pair import evaluate_pair
from training.evaluation_report import plot_admitted, plot_risk_coverage, render_report
from training.records import Record, load_records
from training.surface_metrics import surface_metrics

__all__ = ["EvaluateConfig", "PRESETS", "evaluate", "parse_named_paths", "surface_metrics", "main"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _alpha_or_default(text: str) -> float | None:
    """--alpha's text: a number, or default/none for each bundle's own alpha."""
    value = text.strip().lower()
    if value in ("", "none", "default"):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"alpha must be a number in (0.5, 1] or 'default', got {text!r}") from None


@dataclass(frozen=True)
class EvaluateConfig:
    bundles: tuple[str, ...] = setting(
        (), help="comma-separated NAME=PATH bundles (or bundle folders, named after the folder) to compare"
    )
    data: tuple[str, ...] = setting(
        (), help="comma-separated NAME=PATH JSONL record files (or paths, named after the file stem)"
    )
    out: str = setting("", help="folder for metrics.json, report.md, predictions and plots (required)")
    correctness: str = setting("", help=CORRECTNESS_HELP + " (empty: the one the bundles were calibrated with)")
    max_docs: int = setting(0, help="use the first N documents of each dataset (0: all)")
    max_new_tokens: int = setting(512, help="tokens to generate at most per prompt")
    generate_batch_size: int = setting(16, help="prompts per batched greedy generation")
    embed_batch_size: int = setting(16, help="instances per no-grad hidden-state pass")
    # None: each bundle's default alpha; otherwise it must be on every bundle's ladder
    alpha: float | None = setting(
        None, parse=_alpha_or_default, help="alpha to report at (on every bundle's ladder); default: each bundle's own"
    )
    device: str = setting("auto", help=DEVICE_HELP, parse=parse_device)
    progress: bool = setting(True, help="show progress bars")

    def __post_init__(self) -> None:
        # bundles and data may be given as one comma-separated string, as on the command line.
        for name in ("bundles", "data"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))

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
        if self.alpha is not None:
            check_alpha(self.alpha, "alpha")
        if self.correctness:
            get_correctness(self.correctness)
        bundles = parse_named_paths(self.bundles, "bundle")
        data = parse_named_paths(self.data, "data")
        for name, path in bundles.items():
            if not (path / "bundle.json").is_file():
                raise ValueError(
                    f"bundle {name!r}: {path} is not an sdm-lm bundle (bundle.json is missing); "
                    "build one with python -m training.calibrate"
                )
        for name, path in data.items():
            if not path.is_file():
                raise ValueError(f"data {name!r}: {path} does not exist (expected a JSONL record file)")


PRESETS: dict[str, dict] = {
    "paper": {},
    # Sizes matched to training.calibrate's presets of the same name.
    "smollm2-cpu": {"max_new_tokens": 96},
    "smollm2-gpu": {"max_new_tokens": 96, "generate_batch_size": 128, "embed_batch_size": 64},
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
            raise ValueError(
                f"bad {kind} entry {spec!r}: the name {name!r} must start with a letter or digit and use "
                "only letters, digits, '_', '.' and '-' (it is used in output file names)"
            )
        if name in out:
            raise ValueError(f"duplicate {kind} name {name!r}; name each entry explicitly with NAME=PATH")
        out[name] = Path(path_text).expanduser()
    return out


def evaluate(config: EvaluateConfig) -> dict:
    """Run the evaluation and write its outputs; returns the metrics dict (also written as metrics.json)."""
    config.validate()
    bundle_paths = parse_named_paths(config.bundles, "bundle")
    config = replace(config, correctness=_calibrated_correctness(config.correctness, bundle_paths))
    data_paths = parse_named_paths(config.data, "data")
    datasets = _load_datasets(data_paths, config.max_docs)
    device = resolve_device(config.device)  # a bad --device is the flag's error, before any bundle loads
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    metrics: dict = {
        "config": flatten(config),
        "bundles": {},
        "datasets": {name: {"path": str(path), "n": len(datasets[name])} for name, path in data_paths.items()},
        "results": {},
    }
    for bundle_name, bundle_path in bundle_paths.items():
        bundle, alpha = _load_bundle(bundle_name, bundle_path, device, config.alpha)
        metrics["bundles"][bundle_name] = _bundle_entry(bundle, bundle_path, alpha)
        metrics["results"][bundle_name] = {}
        for dataset_name, records in datasets.items():
            metrics["results"][bundle_name][dataset_name] = evaluate_pair(
                bundle, bundle_name, dataset_name, records, config, alpha, out
            )
        del bundle
        gc.collect()

    for dataset_name in datasets:
        per_bundle = {b: metrics["results"][b][dataset_name] for b in bundle_paths}
        plot_admitted(out / f"admitted_vs_alpha_{dataset_name}.png", dataset_name, per_bundle)
        plot_risk_coverage(out / f"risk_coverage_{dataset_name}.png", dataset_name, per_bundle)
        for result in per_bundle.values():
            del result["risk_coverage"]  # plotted; the curves are as long as the dataset
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(metrics), encoding="utf-8")
    return metrics


def _calibrated_correctness(asked: str, bundle_paths: dict[str, Path]) -> str:
    """The r every bundle was calibrated with: a held-out check of a bundle's promise must label answers as its
    calibration did, so bundles that disagree, or an ``asked`` r that differs, are errors."""
    recorded = {name: bundle_correctness(read_bundle_info(path).provenance) for name, path in bundle_paths.items()}
    wanted = asked or next(iter(recorded.values()))
    differ = {name: r for name, r in recorded.items() if r != wanted}
    if differ:
        raise ValueError(
            f"correctness {wanted!r} differs from what these bundles were calibrated with: {differ}; evaluate bundles "
            "of one task together and leave --correctness empty (or pass the bundles' own)"
        )
    return wanted


def _load_datasets(data_paths: dict[str, Path], max_docs: int) -> dict[str, list[Record]]:
    """Each named record file's records (the first ``max_docs`` when it is set); an empty one is an error."""
    datasets: dict[str, list[Record]] = {}
    for name, path in data_paths.items():
        records = load_records(path)
        if max_docs:
            records = records[:max_docs]
        if not records:
            raise ValueError(f"data {name!r}: {path} holds no records")
        datasets[name] = records
    return datasets


def _load_bundle(bundle_name: str, bundle_path: Path, device, alpha_setting: float | None):
    """The bundle on ``device`` and the alpha to report it at; errors name the bundle."""
    from sdm_core.lm.bundle import load_bundle

    try:
        bundle = load_bundle(bundle_path, device=device)
    except ValueError as exc:
        raise ValueError(f"bundle {bundle_name!r}: {exc}") from None
    head = bundle.head
    if head.num_classes != 2:
        raise ValueError(f"bundle {bundle_name!r}: its head has {head.num_classes} classes; a verification head has 2")
    try:
        alpha = head.ladder.resolve_alpha(alpha_setting)
    except ValueError as exc:
        raise ValueError(f"bundle {bundle_name!r}: {exc}") from None
    return bundle, alpha


def _bundle_entry(bundle, bundle_path: Path, alpha: float) -> dict:
    """metrics.json's entry for a bundle: where it is, its alpha and ladder, its model, provenance and certification."""
    head, certification = bundle.head, bundle.info.certification
    return {
        "path": str(bundle_path),
        "alpha": alpha,
        "ladder": list(head.ladder.alphas),
        "model": bundle.info.model,
        "provenance_git_revision": bundle.info.provenance.get("git_revision"),
        "certified_alphas": list(certification.certified) if certification else None,
        "withdrawn_alphas": list(certification.withdrawn) if certification else None,
    }


def _summary(metrics: dict, out: str) -> dict:
    return {
        "out": out,
        "results": {
            b: {
                d: {
                    "n": r["n"],
                    "sentence_acc": round(r["sentence_acc"], 4),
                    "exact_match_acc": round(r["exact_match_acc"], 4),
                    "alpha": r["alpha"],
                    "hr_accuracy": r["sdm_hr"]["accuracy"],
                    "hr_admitted_proportion": round(r["sdm_hr"]["admitted_proportion"], 4),
                }
                for d, r in per.items()
            }
            for b, per in metrics["results"].items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    command_line = CommandLine(
        EvaluateConfig,
        prog="python -m training.evaluate",
        env_prefix="SDM_EVALUATE_",
        presets=PRESETS,
        description=__doc__ or "",
    )
    args = command_line.parser().parse_args(argv)
    try:
        config = command_line.resolve(args)
        metrics = evaluate(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_summary(metrics, config.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
