"""``python -m sdm_core {fit,score,evaluate,recalibrate,add-exemplars}`` over embeddings and JSONL labels.

Embeddings: .npy or .safetensors (N, D). Labels: JSONL, one ``{"id": ..., "label": ...}`` per embedding row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sdm_core.artifact import ArtifactError
from sdm_core.config import SDMConfig
from sdm_core.estimator import SDMEstimator
from sdm_core.io import InputError, load_embeddings, load_labels, write_jsonl
from sdm_core.report import render_markdown, selective_report

__all__ = ["main", "build_parser"]


def _alphas(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.99,0.95,0.9, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    defaults = SDMConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sdm_core", description="Fit and apply SDM estimators over embeddings."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_fit_command(sub, defaults)

    score = sub.add_parser("score", help="write one JSON line per document with every estimator quantity")
    score.add_argument("--artifact", required=True)
    score.add_argument("--embeddings", required=True)
    score.add_argument("--ids", help="JSONL with an id per row (labels optional); default: row numbers")
    score.add_argument("--out", required=True, help="output JSONL")
    score.add_argument("--alpha", type=float, default=None, help="an alpha of the artifact's ladder")
    score.add_argument("--exemplars", type=int, default=0, help="nearest support exemplars to include per document")

    evaluate = sub.add_parser("evaluate", help="selective-classification report (JSON + Markdown) at each alpha")
    evaluate.add_argument("--artifact", required=True)
    evaluate.add_argument("--embeddings", required=True)
    evaluate.add_argument("--labels", required=True)
    evaluate.add_argument("--out-dir", required=True)
    evaluate.add_argument("--title", default="SDM estimator evaluation")

    recal = sub.add_parser("recalibrate", help="re-run Algorithm 1 at a new alpha ladder without retraining")
    recal.add_argument("--artifact", required=True)
    recal.add_argument("--alphas", type=_alphas, required=True)
    recal.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the new default alpha (default: keep the current one, which joins the ladder)",
    )
    recal.add_argument("--independent-regions", action="store_true")
    recal.add_argument("--out", default=None, help="write here instead of replacing the artifact")

    add = sub.add_parser("add-exemplars", help="append labelled exemplars (label 'ood' allowed) to the support")
    add.add_argument("--artifact", required=True)
    add.add_argument("--embeddings", required=True)
    add.add_argument("--labels", required=True, help="JSONL {id, label}; label may be 'ood'")
    add.add_argument("--out", default=None)
    return parser


def _add_fit_command(sub: argparse._SubParsersAction, defaults: SDMConfig) -> None:
    """``fit``: the data files, SDMConfig's settings (with its defaults) and the output folder."""
    fit = sub.add_parser("fit", help="fit an SDM layer and its regions; write an artifact folder")
    fit.add_argument("--train-embeddings", required=True, help=".npy or .safetensors (N, D): the support set")
    fit.add_argument("--train-labels", required=True, help="JSONL {id, label} per training row")
    fit.add_argument("--calibration-embeddings", required=True)
    fit.add_argument("--calibration-labels", required=True)
    fit.add_argument("--out", required=True, help="artifact folder to write")
    fit.add_argument("--num-classes", type=int, default=None, help="default: 1 + the largest label")
    fit.add_argument("--class-names", default="", help="comma-separated names, index order (labels may use them)")
    fit.add_argument("--exemplar-dim", type=int, default=defaults.exemplar_dim)
    fit.add_argument("--epochs", type=int, default=defaults.epochs)
    fit.add_argument("--batch-size", type=int, default=defaults.batch_size)
    fit.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    fit.add_argument("--max-q", type=int, default=defaults.max_q)
    fit.add_argument("--iterations", type=int, default=defaults.iterations, help="J random splits/initialisations")
    fit.add_argument(
        "--shuffle-splits", action="store_true", help="pool train + calibration and re-split each iteration"
    )
    fit.add_argument("--alpha", type=float, default=defaults.alpha)
    fit.add_argument(
        "--alphas", type=_alphas, default=list(defaults.alpha_ladder), help="the alpha ladder, comma-separated"
    )
    fit.add_argument("--independent-regions", action="store_true", help="use each alpha's own region (not nested)")
    fit.add_argument("--ess-rule", choices=("paper", "reference"), default=defaults.effective_sample_size_rule)
    fit.add_argument("--no-normalize", action="store_true", help="skip the scalar mean/std input normalisation")
    fit.add_argument("--backend", choices=("torch", "faiss", "auto"), default=defaults.backend)
    fit.add_argument("--seed", type=int, default=defaults.seed)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit(args: argparse.Namespace) -> dict:
    names = tuple(n.strip() for n in args.class_names.split(",") if n.strip())
    config = SDMConfig(
        exemplar_dim=args.exemplar_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_q=args.max_q,
        iterations=args.iterations,
        shuffle_splits=args.shuffle_splits,
        alpha=args.alpha,
        alpha_ladder=tuple(args.alphas),
        nested_regions=not args.independent_regions,
        effective_sample_size_rule=args.ess_rule,
        normalize=not args.no_normalize,
        backend=args.backend,
        seed=args.seed,
        progress=not args.quiet,
        class_names=names,
    )
    x_tr = load_embeddings(args.train_embeddings)
    x_ca = load_embeddings(args.calibration_embeddings)
    tr = load_labels(args.train_labels, names)
    ca = load_labels(args.calibration_labels, names)
    for x, rows, what in ((x_tr, tr, "train"), (x_ca, ca, "calibration")):
        if len(rows.ids) != x.shape[0]:
            raise InputError(f"the {what} labels have {len(rows.ids)} rows but the embeddings have {x.shape[0]}")
    est = SDMEstimator(config).fit(
        x_tr,
        tr.labels,
        x_ca,
        ca.labels,
        num_classes=args.num_classes or (len(names) or None),
        train_ids=tr.ids,
        calibration_ids=ca.ids,
    )
    est.save(args.out)
    return {
        "artifact": str(args.out),
        **est.summary(),
        "best_epoch": est.metadata["best_epoch"],
        "fit_seconds": est.metadata["fit_seconds"],
    }


def _rows_ids(args_ids: str | None, n: int, class_names: Sequence[str]) -> list[str]:
    if not args_ids:
        return [str(i) for i in range(n)]
    rows = load_labels(args_ids, class_names, require_labels=False)
    if len(rows.ids) != n:
        raise InputError(f"{args_ids} has {len(rows.ids)} rows but the embeddings have {n}")
    return rows.ids


def _score(args: argparse.Namespace) -> dict:
    est = SDMEstimator.load(args.artifact)
    x = load_embeddings(args.embeddings)
    ids = _rows_ids(args.ids, x.shape[0], est.class_names)
    scores = est.predict_scores(x, alpha=args.alpha, return_exemplars=args.exemplars)
    rows = ({"id": identifier, **scores.record(i)} for i, identifier in enumerate(ids))
    count = write_jsonl(args.out, rows)
    return {"scored": count, "out": args.out, "alpha": scores.alpha, "admitted": int(scores.admitted.sum())}


def _evaluate(args: argparse.Namespace) -> dict:
    est = SDMEstimator.load(args.artifact)
    x = load_embeddings(args.embeddings)
    rows = load_labels(args.labels, est.class_names)
    if len(rows.ids) != x.shape[0]:
        raise InputError(f"{args.labels} has {len(rows.ids)} rows but the embeddings have {x.shape[0]}")
    labels = torch.tensor(rows.labels, dtype=torch.long)
    if bool((labels >= est.num_classes).any()):
        raise InputError(f"{args.labels}: labels must be < {est.num_classes}")
    s = est.predict_scores(x)
    ladder = est.fitted_parts().ladder
    report = selective_report(
        s.probabilities,
        s.probabilities_lower,
        s.predictions,
        s.q_prime,
        s.q_prime_lower,
        labels,
        ladder,
        est.class_names,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report, args.title))
    default = next(r for r in report["alphas"] if r["alpha"] == ladder.default_alpha)
    return {"out_dir": str(out), "alpha": ladder.default_alpha, "HR_marginal": default["HR"]["marginal"]}


def _recalibrate(args: argparse.Namespace) -> dict:
    est = SDMEstimator.load(args.artifact)
    # Without --alpha the current default alpha stays the default (and stays on the ladder).
    est.recalibrate(args.alphas, args.alpha, not args.independent_regions)
    target = args.out or args.artifact
    est.save(target)
    return {"artifact": str(target), **est.summary()}


def _add_exemplars(args: argparse.Namespace) -> dict:
    est = SDMEstimator.load(args.artifact)
    x = load_embeddings(args.embeddings)
    path = Path(args.labels)
    ids, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids.append(str(row["id"]))
            labels.append(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: expected a JSON object with 'id' and 'label'") from None
    if len(ids) != x.shape[0]:
        raise InputError(f"{path} has {len(ids)} rows but the embeddings have {x.shape[0]}")
    names = {n: i for i, n in enumerate(est.class_names)}
    labels = [
        names.get(label, label) if isinstance(label, str) and label.lower() != "ood" else label for label in labels
    ]
    est.add_exemplars(x, labels, ids)
    target = args.out or args.artifact
    est.save(target)
    return {"artifact": str(target), "n_support": len(est.fitted_parts().support)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "fit": _fit,
        "score": _score,
        "evaluate": _evaluate,
        "recalibrate": _recalibrate,
        "add-exemplars": _add_exemplars,
    }
    try:
        result = handlers[args.command](args)
    except (InputError, ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0
