"""Build fine-tuning data sets, and check record files.

    python -m training.data validate FILE.jsonl [FILE.jsonl ...]
        every bad line with file:line and what to fix (exit status 1), against the published
        schema training/schemas/record.schema.json; see training/records.py for the rules
    python -m training.data arithmetic --out DIR [...]
        the multi-digit arithmetic task (training/arithmetic.py; --help lists its settings)
    python -m training.data word-order --out DIR [--seed 0] [--train 5000]
        [--calibration 5000] [--test 2000] [--length-shift N] [--suffix 3]
        [--tag-drop-prob 0.1] [--attempts 50] [--harvard-attempts 1000]
        [--corpora DIR] [--quiet]
        the paper's word-ordering task (training/word_order_data.py says how its splits are drawn)

This module is the command line; each task's builder lives with its task. It re-exports the word-order
builder's names, which training.finetune, the bench scripts and the tests import from here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.arithmetic import ArithmeticConfig, build_arithmetic
from training.records import DataError
from training.word_order_data import DEFAULT_CORPORA, WordOrderConfig, build_word_order, read_sentences

__all__ = ["DEFAULT_CORPORA", "WordOrderConfig", "build_word_order", "main", "read_sentences"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Build fine-tuning data sets.")
    sub = parser.add_subparsers(dest="task", required=True)
    _add_word_order_command(sub)
    _add_arithmetic_command(sub)
    va = sub.add_parser("validate", help="check JSONL record files and report every bad line")
    va.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    va.add_argument("--max-problems", type=int, default=0, help="print at most N problems per file (0: all)")
    return parser.parse_args(argv)


def _add_word_order_command(sub: argparse._SubParsersAction) -> None:
    """``word-order``: WordOrderConfig's settings as flags, with its defaults."""
    wo = sub.add_parser("word-order", help="the paper's word-ordering task (spec section 5)")
    defaults = WordOrderConfig()
    wo.add_argument("--out", required=True, type=Path, help="output folder")
    wo.add_argument("--seed", type=int, default=defaults.seed)
    wo.add_argument("--train", type=int, default=defaults.train)
    wo.add_argument("--calibration", type=int, default=defaults.calibration)
    wo.add_argument("--test", type=int, default=defaults.test)
    wo.add_argument(
        "--holdout",
        type=int,
        default=defaults.holdout,
        help="documents after the training split that fine-tuning never sees (calibration/certification data)",
    )
    wo.add_argument("--length-shift", type=int, default=None, help="number of length-shift records (default: all)")
    wo.add_argument("--suffix", type=int, default=defaults.suffix, help="tokens to reorder (m)")
    wo.add_argument("--tag-drop-prob", type=float, default=defaults.tag_drop_prob)
    wo.add_argument("--attempts", type=int, default=defaults.attempts)
    wo.add_argument("--harvard-attempts", type=int, default=defaults.harvard_attempts)
    wo.add_argument(
        "--min-words",
        type=int,
        default=defaults.min_words,
        help="shortest Wikipedia sentence for train/calibration/test (words)",
    )
    wo.add_argument(
        "--max-words",
        type=int,
        default=defaults.max_words,
        help="longest Wikipedia sentence for train/calibration/test (words; the paper: 60)",
    )
    wo.add_argument(
        "--corpora", type=Path, default=defaults.corpora_dir, help="folder with the training/corpora layout"
    )
    wo.add_argument("--quiet", action="store_true", help="no progress output")


def _add_arithmetic_command(sub: argparse._SubParsersAction) -> None:
    """``arithmetic``: ArithmeticConfig's settings as flags, with its defaults."""
    ar = sub.add_parser(
        "arithmetic", help="multi-digit arithmetic from a seed, checked by exact value (training/arithmetic.py)"
    )
    ad = ArithmeticConfig()
    ar.add_argument("--out", required=True, type=Path, help="output folder")
    ar.add_argument("--seed", type=int, default=ad.seed)
    ar.add_argument("--train", type=int, default=ad.train)
    ar.add_argument("--calibration", type=int, default=ad.calibration)
    ar.add_argument("--test", type=int, default=ad.test)
    ar.add_argument(
        "--holdout",
        type=int,
        default=ad.holdout,
        help="problems after the training split that fine-tuning never sees (calibration/certification data)",
    )
    ar.add_argument(
        "--shift", type=int, default=ad.shift, help="digits-shift records (operands of max+1..max+2 digits)"
    )
    ar.add_argument("--min-digits", type=int, default=ad.min_digits, help="fewest digits of an operand")
    ar.add_argument("--max-digits", type=int, default=ad.max_digits, help="most digits of an operand")
    ar.add_argument("--operations", default=",".join(ad.operations), help="comma-separated subset of +,-,*")
    ar.add_argument(
        "--tag-drop-prob",
        type=float,
        default=ad.tag_drop_prob,
        help="probability that a static negative loses one or both <answer> tags",
    )
    ar.add_argument("--quiet", action="store_true", help="no progress output")


def _validate_main(files: list[Path], max_problems: int) -> int:
    from training.record_schema import validate_file

    status = 0
    for path in files:
        report = validate_file(path)
        shown = report.problems if max_problems <= 0 else report.problems[:max_problems]
        for problem in shown:
            print(problem)
        if len(shown) < len(report.problems):
            print(f"{path}: ... and {len(report.problems) - len(shown)} more problems")
        if report.ok:
            print(f"{path}: {report.records} records, format '{report.format}', OK")
        else:
            status = 1
            lines = len({p.line for p in report.problems})
            print(f"{path}: {len(report.problems)} problems on {lines} lines; {report.records} good records")
    return status


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = _parse_args(argv)
    if args.task == "validate":
        return _validate_main(args.files, args.max_problems)
    if args.task == "arithmetic":
        try:
            arithmetic = ArithmeticConfig(
                seed=args.seed,
                train=args.train,
                calibration=args.calibration,
                test=args.test,
                holdout=args.holdout,
                shift=args.shift,
                min_digits=args.min_digits,
                max_digits=args.max_digits,
                operations=tuple(op.strip() for op in args.operations.split(",") if op.strip()),
                tag_drop_prob=args.tag_drop_prob,
                quiet=args.quiet,
            )
            manifest = build_arithmetic(args.out, arithmetic)
        except (DataError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        counts = ", ".join(f"{k}={v['records']}" for k, v in manifest["splits"].items())
        print(f"wrote {args.out}: {counts}")
        return 0
    config = WordOrderConfig(
        seed=args.seed,
        train=args.train,
        calibration=args.calibration,
        test=args.test,
        holdout=args.holdout,
        length_shift=args.length_shift,
        suffix=args.suffix,
        tag_drop_prob=args.tag_drop_prob,
        attempts=args.attempts,
        harvard_attempts=args.harvard_attempts,
        min_words=args.min_words,
        max_words=args.max_words,
        corpora_dir=args.corpora,
        quiet=args.quiet,
    )
    try:
        manifest = build_word_order(args.out, config)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}={v['records']}" for k, v in manifest["splits"].items())
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
