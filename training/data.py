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

Writes train.jsonl, calibration.jsonl, test.jsonl (Wikipedia, in distribution),
length_shift.jsonl (50-60-word Wikipedia sentences, standing in for the paper's
60-word WIKIPEDIACVS set), harvard.jsonl (all Harvard sentences) and manifest.json.

How the Wikipedia splits are drawn (mirrors spec §5 at small scale):
- the pool is every sentence of the 5-60-word file, minus the sentences of the
  length-shift file and any Harvard sentence, so all five outputs are disjoint by text;
- ``random.Random(seed)`` shuffles the pool; test, then calibration, then train take
  sentences from the end of the shuffled pool, each until it has its requested number
  of records. Sentences that fail the variety rule or the shuffle sampling are skipped
  and counted in the manifest, so the requested sizes are exact;
- each output file has its own RNG (seeded with "<seed>:<split>") for shuffles and tag
  drops, so resizing one split does not change the records of the splits drawn before it.

Harvard: no length filter and no variety check, as in the paper. If a sentence's last
``suffix`` tokens cannot be shuffled into two distinct new orders, the suffix is widened
one token at a time until they can (meta.suffix_size shows the size used, and the
manifest lists those ids). A sentence with too few distinct orderings even as a whole
is left out, listed in the manifest and reported on stderr. The shipped 720 sentences
need neither fallback.

Corpus files: one sentence per line, UTF-8; blank lines are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from training.arithmetic import ArithmeticConfig, build_arithmetic
from training.records import DataError, Record, write_records
from training.word_order import make_record, make_record_widening

DEFAULT_CORPORA = Path(__file__).resolve().parent / "corpora"

LENGTH_SHIFT_MIN_WORDS = 50

LICENCE_NOTE = (
    "Wikipedia sentences: text by Wikipedia contributors, CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/); files built from them carry the same "
    "licence. Harvard sentences (IEEE 1969): public domain. See training/corpora/README.md."
)


@dataclass
class WordOrderConfig:
    """Settings for :func:`build_word_order`. Defaults follow the paper where the data allow."""

    seed: int = 0
    train: int = 5000
    calibration: int = 5000
    test: int = 2000
    # Documents drawn after the training split, continuing its draw, that fine-tuning never sees: more calibration
    # and certification data for the final head without changing a single training record.
    holdout: int = 0
    length_shift: int | None = None  # None: every sentence of the length-shift file
    suffix: int = 3  # m, the number of trailing tokens to reorder
    tag_drop_prob: float = 0.1
    attempts: int = 50  # rejection-sampling draws per shuffle (Wikipedia)
    harvard_attempts: int = 1000
    min_words: int = 5  # sentence lengths of the Wikipedia train/calibration/test splits
    max_words: int = 60
    length_shift_max_words: int = 60  # the length-shift set holds LENGTH_SHIFT_MIN_WORDS..this
    corpora_dir: Path = field(default_factory=lambda: DEFAULT_CORPORA)
    wiki_file: str = "wikipedia/wiki_sentences_5to60.txt"
    length_shift_file: str = "wikipedia/wiki_sentences_len50to60.txt"
    harvard_file: str = "harvard/harvard_sentences.txt"
    quiet: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for name in ("train", "calibration", "test", "holdout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.length_shift is not None and self.length_shift < 0:
            raise ValueError(f"length_shift must be >= 0 or None, got {self.length_shift}")
        if self.suffix < 2:
            raise ValueError(f"suffix must be at least 2 tokens to allow a reordering, got {self.suffix}")
        if not 0.0 <= self.tag_drop_prob <= 1.0:
            raise ValueError(f"tag_drop_prob must be in [0, 1], got {self.tag_drop_prob}")
        if self.attempts < 1 or self.harvard_attempts < 1:
            raise ValueError("attempts and harvard_attempts must be at least 1")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if self.length_shift_max_words < LENGTH_SHIFT_MIN_WORDS:
            raise ValueError(
                f"length_shift_max_words must be >= {LENGTH_SHIFT_MIN_WORDS} (the length-shift "
                f"set has {LENGTH_SHIFT_MIN_WORDS}-{self.length_shift_max_words}-word sentences)"
            )


@dataclass
class _SplitResult:
    records: list[Record]
    skipped: int = 0
    widened: list[str] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sentences(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped sentence) for every non-blank line of a corpus file."""
    if not path.is_file():
        raise DataError(
            "corpus file not found; pass --corpora DIR pointing at a folder with the training/corpora layout", path
        )
    out: list[tuple[int, str]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError("not valid UTF-8; re-encode the corpus as UTF-8", path, lineno) from None
            if text:
                out.append((lineno, text))
    return out


def _take(
    sentences: Iterable[str],
    wanted: int,
    build: Callable[[str, int], Record | None],
) -> tuple[list[Record], int, int]:
    """Build records from ``sentences`` until ``wanted`` exist; return (records, skipped, consumed)."""
    records: list[Record] = []
    skipped = consumed = 0
    for sentence in sentences:
        if len(records) >= wanted:
            break
        consumed += 1
        record = build(sentence, len(records) + 1)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped, consumed


def build_word_order(out_dir: str | Path, config: WordOrderConfig | None = None) -> dict:
    """Build the word-ordering task into ``out_dir`` and return the manifest (also written
    to ``out_dir/manifest.json``). Deterministic for a given config and corpus files."""
    config = config or WordOrderConfig()
    config.validate()
    out = Path(out_dir)
    corpora = Path(config.corpora_dir)
    log = (lambda msg: None) if config.quiet else (lambda msg: print(f"[word-order] {msg}", file=sys.stderr))

    wiki_path = corpora / config.wiki_file
    shift_path = corpora / config.length_shift_file
    harvard_path = corpora / config.harvard_file
    wiki = read_sentences(wiki_path)
    shift = read_sentences(shift_path)
    harvard = read_sentences(harvard_path)
    log(f"read {len(wiki)} Wikipedia, {len(shift)} length-shift, {len(harvard)} Harvard sentences")

    for lineno, sentence in shift:
        n = len(sentence.split())
        if not LENGTH_SHIFT_MIN_WORDS <= n <= config.length_shift_max_words:
            raise DataError(
                f"length-shift sentence has {n} words, outside "
                f"{LENGTH_SHIFT_MIN_WORDS}-{config.length_shift_max_words}; remove it from the file",
                shift_path,
                lineno,
            )

    # Pool for the in-distribution splits: disjoint by text from the other two sets.
    excluded = {s for _, s in shift} | {s for _, s in harvard}
    pool: list[str] = []
    seen: set[str] = set()
    n_excluded = n_duplicate = n_out_of_length = 0
    for _, sentence in wiki:
        if sentence in excluded:
            n_excluded += 1
        elif sentence in seen:
            n_duplicate += 1
        elif not config.min_words <= len(sentence.split()) <= config.max_words:
            n_out_of_length += 1
        else:
            seen.add(sentence)
            pool.append(sentence)
    wanted = config.train + config.calibration + config.test + config.holdout
    if wanted > len(pool):
        raise ValueError(
            f"requested {wanted} Wikipedia records (train+calibration+test) but "
            f"only {len(pool)} sentences are available; lower the split sizes"
        )

    random.Random(config.seed).shuffle(pool)
    remaining = pool[::-1]  # the paper slices from the end of the shuffled list
    results: dict[str, _SplitResult] = {}
    for split in ("test", "calibration", "train"):
        size = getattr(config, split) + (config.holdout if split == "train" else 0)
        rng = random.Random(f"{config.seed}:{split}")

        def build(sentence: str, index: int, split: str = split, rng: random.Random = rng) -> Record | None:
            return make_record(
                sentence,
                rng,
                record_id=f"wiki-{split}-{index:06d}",
                source="wikipedia",
                suffix_size=config.suffix,
                attempts=config.attempts,
                tag_drop_prob=config.tag_drop_prob,
                extra_meta={"split": split},
            )

        records, skipped, consumed = _take(remaining, size, build)
        remaining = remaining[consumed:]
        if len(records) < size:
            raise ValueError(
                f"ran out of Wikipedia sentences while building '{split}' "
                f"({len(records)} of {size}); lower the split sizes"
            )
        if split == "train":
            extra = records[config.train :]
            records = records[: config.train]
            results["holdout"] = _SplitResult(
                [
                    replace(r, id=f"wiki-holdout-{i:06d}", meta={**(r.meta or {}), "split": "holdout"})
                    for i, r in enumerate(extra, start=1)
                ]
            )
            log(f"holdout: {len(extra)} records")
        results[split] = _SplitResult(records, skipped)
        log(f"{split}: {len(records)} records ({skipped} sentences skipped)")

    shift_rng = random.Random(f"{config.seed}:length_shift")
    shift_wanted = len(shift) if config.length_shift is None else config.length_shift
    if shift_wanted > len(shift):
        raise ValueError(
            f"requested {shift_wanted} length-shift records but the file has only "
            f"{len(shift)} sentences; lower --length-shift"
        )
    shift_records, shift_skipped, _ = _take(
        (s for _, s in shift),
        shift_wanted,
        lambda sentence, index: make_record(
            sentence,
            shift_rng,
            record_id=f"lenshift-{index:06d}",
            source="wikipedia",
            suffix_size=config.suffix,
            attempts=config.attempts,
            tag_drop_prob=config.tag_drop_prob,
            extra_meta={"split": "length_shift"},
        ),
    )
    results["length_shift"] = _SplitResult(shift_records, shift_skipped)
    log(f"length_shift: {len(shift_records)} records ({shift_skipped} sentences skipped)")

    harvard_rng = random.Random(f"{config.seed}:harvard")
    harvard_result = _SplitResult([])
    for index, (lineno, sentence) in enumerate(harvard, start=1):
        record_id = f"harvard-{index:06d}"
        record = make_record_widening(
            sentence,
            harvard_rng,
            record_id=record_id,
            source="harvard",
            suffix_size=config.suffix,
            attempts=config.harvard_attempts,
            tag_drop_prob=config.tag_drop_prob,
            extra_meta={"split": "harvard", "line": lineno},
        )
        if record is None:
            harvard_result.left_out.append({"line": lineno, "sentence": sentence})
            print(
                f"[word-order] warning: {harvard_path}:{lineno}: sentence has too few distinct "
                "word orders to build a record; left out (listed in manifest.json)",
                file=sys.stderr,
            )
            continue
        if record.meta["suffix_size"] != config.suffix:
            harvard_result.widened.append(record_id)
        harvard_result.records.append(record)
    harvard_result.skipped = len(harvard_result.left_out)
    results["harvard"] = harvard_result
    log(
        f"harvard: {len(harvard_result.records)} records ({len(harvard_result.widened)} with a "
        f"widened suffix, {harvard_result.skipped} left out)"
    )

    _check_disjoint(results)

    files = {
        "train": "train.jsonl",
        "calibration": "calibration.jsonl",
        "test": "test.jsonl",
        "length_shift": "length_shift.jsonl",
        "harvard": "harvard.jsonl",
    }
    if config.holdout:
        files["holdout"] = "holdout.jsonl"
    splits_info: dict[str, dict] = {}
    for split, name in files.items():
        result = results[split]
        path = out / name
        write_records(path, result.records)
        info = {
            "file": name,
            "records": len(result.records),
            "skipped_sentences": result.skipped,
            "negatives_tag_dropped": sum(r.meta["negative_tag_drop"] != "none" for r in result.records),
            "sha256": _sha256(path),
        }
        if split == "harvard":
            info["widened_suffix_ids"] = result.widened
            info["left_out"] = result.left_out
        splits_info[split] = info

    config_dict = asdict(config)
    config_dict["corpora_dir"] = str(config.corpora_dir)
    del config_dict["quiet"]
    manifest = {
        "task": "word_order",
        "seed": config.seed,
        "config": config_dict,
        "sources": {
            key: {"file": rel, "sha256": _sha256(path), "sentences": count}
            for key, rel, path, count in (
                ("wikipedia", config.wiki_file, wiki_path, len(wiki)),
                ("length_shift", config.length_shift_file, shift_path, len(shift)),
                ("harvard", config.harvard_file, harvard_path, len(harvard)),
            )
        },
        "wikipedia_pool": {
            "usable": len(pool),
            "excluded_as_length_shift_or_harvard": n_excluded,
            "duplicates": n_duplicate,
            "outside_length_range": n_out_of_length,
            "unused": len(remaining),
        },
        "splits": splits_info,
        "licence": LICENCE_NOTE,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {sum(len(r.records) for r in results.values())} records to {out}")
    return manifest


def _check_disjoint(results: dict[str, _SplitResult]) -> None:
    """Fail loudly if any sentence appears in two outputs (would leak train into test)."""
    owner: dict[str, str] = {}
    for split, result in results.items():
        for record in result.records:
            other = owner.setdefault(record.reference, split)
            if other != split:
                raise RuntimeError(
                    f"sentence appears in both '{other}' and '{split}': "
                    f"{record.reference[:80]!r}; the corpora overlap in a way the "
                    "builder did not exclude"
                )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Build fine-tuning data sets.")
    sub = parser.add_subparsers(dest="task", required=True)
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

    va = sub.add_parser("validate", help="check JSONL record files and report every bad line")
    va.add_argument("files", nargs="+", type=Path, metavar="FILE.jsonl")
    va.add_argument("--max-problems", type=int, default=0, help="print at most N problems per file (0: all)")
    return parser.parse_args(argv)


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
