"""Multi-digit arithmetic: a second task, generated from a seed, checked by exact value.

Unlike word ordering (restore a sentence from shuffled words), the answer is a number the
prompt never shows, and correctness is a value, not a string: the task's correctness
function ``arithmetic`` (training.correctness) compares the integer in the first paired
``<answer>`` with the reference. Nothing is read from disk, so there is no licence question.

    python -m training.data arithmetic --out data/arith [--seed 0] [--train 5000]
        [--calibration 2000] [--test 1000] [--holdout 0] [--shift 500] [--min-digits 2] [--max-digits 4]
        [--operations +,-,*] [--tag-drop-prob 0.1]

Writes train.jsonl, calibration.jsonl, test.jsonl (operands of min..max digits), holdout.jsonl
when --holdout is given (more problems of the same kind that fine-tuning never sees, for calibration and
certification, as word ordering's holdout split), digits_shift.jsonl (operands of max+1..max+2 digits: out of
distribution, as word ordering's length-shift set is) and manifest.json.

How the problems are drawn: each split has its own RNG (seeded with "<seed>:<split>") and
the splits are drawn in the order test, calibration, train, holdout, digits_shift; a problem
(a, operation, b) already taken by an earlier split is drawn again, so the splits are
disjoint and resizing one split never changes the records of the splits drawn before it.
Each operand's digit count is uniform in the range, then its value uniform among numbers of
that many digits. Subtraction may go below zero. The static negative is a typical slip (a
digit off by one, a dropped carry of a power of ten, or the wrong sign), never the right
value; with probability ``tag_drop_prob`` it also loses one or both ``<answer>`` tags.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from training.records import NO_TAG, YES_TAG, Record, write_records

PROMPT_TEMPLATE = (
    "Compute {a} {op} {b}. Only reply with the result as an integer in the XML <answer> </answer> "
    "followed by <verified>Yes</verified> if your answer correctly addressed the instructions, and "
    "<verified>No</verified> if it did not."
)
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TAG_DROPS = ("open", "close", "both")
SPLITS = ("test", "calibration", "train", "holdout", "digits_shift")
# How many draws a split may spend per record before the digit range is declared too small for it.
_MAX_DRAWS_PER_RECORD = 100


@dataclass
class ArithmeticConfig:
    """Settings for :func:`build_arithmetic`."""

    seed: int = 0
    train: int = 5000
    calibration: int = 2000
    test: int = 1000
    holdout: int = 0  # problems after train that fine-tuning never sees (holdout.jsonl, written when > 0)
    shift: int = 500  # digits_shift records (operands of max_digits+1 .. max_digits+2 digits)
    min_digits: int = 2
    max_digits: int = 4
    operations: tuple[str, ...] = ("+", "-", "*")
    tag_drop_prob: float = 0.1
    quiet: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for name in ("train", "calibration", "test", "holdout", "shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if self.max_digits > 18:
            raise ValueError(f"max_digits must be <= 18 (the digits-shift set adds 2), got {self.max_digits}")
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(
                f"operations must be a non-empty subset of {sorted(OPERATIONS)}, got {list(self.operations)}"
            )
        if not 0.0 <= self.tag_drop_prob <= 1.0:
            raise ValueError(f"tag_drop_prob must be in [0, 1], got {self.tag_drop_prob}")


def format_prompt(a: int, op: str, b: int) -> str:
    return PROMPT_TEMPLATE.format(a=a, op=op, b=b)


def format_answer(value: int, tag: str, drop: str = "none") -> str:
    """``<answer>value</answer>`` and the verification tag, optionally without one or both answer tags."""
    open_, close = ("" if drop in ("open", "both") else "<answer>"), ("" if drop in ("close", "both") else "</answer>")
    return f"{open_}{value}{close}\n{tag}"


def slip(value: int, op: str, rng: random.Random) -> tuple[int, str]:
    """A wrong value a solver plausibly writes for ``value``, and the kind of slip."""
    digits = str(abs(value))
    kinds = ["digit", "carry"] + (["sign"] if op == "-" and value != 0 else [])
    kind = rng.choice(kinds)
    if kind == "sign":
        return -value, kind
    if kind == "carry":
        power = 10 ** rng.randrange(1, len(digits) + 1)
        wrong = value + rng.choice((-power, power))
        return wrong, kind
    position = rng.randrange(len(digits))
    digit = int(digits[position])
    changed = digit + rng.choice((-1, 1)) if 0 < digit < 9 else (1 if digit == 0 else 8)
    if position == 0 and changed == 0 and len(digits) > 1:
        changed = digit + 1  # a leading digit never becomes 0
    wrong = int(digits[:position] + str(changed) + digits[position + 1 :])
    return (-wrong if value < 0 else wrong), kind


def make_record(
    a: int, op: str, b: int, rng: random.Random, *, record_id: str, tag_drop_prob: float, extra_meta: dict | None = None
) -> Record:
    """One arithmetic Record. Draws happen in a fixed order (slip, then tag drop), so a seeded rng gives the same
    record."""
    value = OPERATIONS[op](a, b)
    wrong, kind = slip(value, op, rng)
    assert wrong != value, "a slip always changes the value"
    drop = rng.choice(TAG_DROPS) if rng.random() < tag_drop_prob else "none"
    meta = {
        "a": a,
        "op": op,
        "b": b,
        "digits": [len(str(a)), len(str(b))],
        "negative_value": wrong,
        "negative_slip": kind,
        "negative_tag_drop": drop,
    }
    meta.update(extra_meta or {})
    return Record(
        id=record_id,
        prompt=format_prompt(a, op, b),
        positive=format_answer(value, YES_TAG),
        negative=format_answer(wrong, NO_TAG, drop),
        reference=str(value),
        meta=meta,
    )


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    n = rng.randint(min_digits, max_digits)
    low = 0 if n == 1 else 10 ** (n - 1)
    return rng.randrange(low, 10**n)


def _draw_split(
    split: str, size: int, digits: tuple[int, int], config: ArithmeticConfig, taken: set[tuple[int, str, int]]
) -> list[Record]:
    rng = random.Random(f"{config.seed}:{split}")
    records: list[Record] = []
    draws = 0
    while len(records) < size:
        draws += 1
        if draws > _MAX_DRAWS_PER_RECORD * max(size, 1):
            raise ValueError(
                f"could not draw {size} distinct '{split}' problems with {digits[0]}-{digits[1]}-digit operands "
                f"(got {len(records)}); widen the digit range or lower the split sizes"
            )
        op = rng.choice(config.operations)
        a, b = _operand(rng, *digits), _operand(rng, *digits)
        if (a, op, b) in taken:
            continue
        taken.add((a, op, b))
        records.append(
            make_record(
                a,
                op,
                b,
                rng,
                record_id=f"arith-{split}-{len(records) + 1:06d}",
                tag_drop_prob=config.tag_drop_prob,
                extra_meta={"split": split},
            )
        )
    return records


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_arithmetic(out_dir: str | Path, config: ArithmeticConfig | None = None) -> dict:
    """Build the arithmetic task into ``out_dir`` and return the manifest (also written to
    ``out_dir/manifest.json``). Deterministic for a given config."""
    config = config or ArithmeticConfig()
    config.validate()
    out = Path(out_dir)
    log = (lambda msg: None) if config.quiet else (lambda msg: print(f"[arithmetic] {msg}", file=sys.stderr))
    taken: set[tuple[int, str, int]] = set()
    in_range = (config.min_digits, config.max_digits)
    splits: dict[str, dict] = {}
    for split in SPLITS:
        if split == "holdout" and not config.holdout:
            continue
        size = config.shift if split == "digits_shift" else getattr(config, split)
        digits = (config.max_digits + 1, config.max_digits + 2) if split == "digits_shift" else in_range
        records = _draw_split(split, size, digits, config, taken)
        path = out / f"{split}.jsonl"
        write_records(path, records)
        splits[split] = {
            "file": path.name,
            "records": len(records),
            "operand_digits": list(digits),
            "operations": {op: sum(r.meta["op"] == op for r in records) for op in config.operations},
            "negatives_tag_dropped": sum(r.meta["negative_tag_drop"] != "none" for r in records),
            "sha256": _sha256(path),
        }
        log(f"{split}: {len(records)} records")
    config_dict = asdict(config)
    config_dict["operations"] = list(config.operations)
    del config_dict["quiet"]
    manifest = {
        "task": "arithmetic",
        "correctness": "arithmetic",
        "seed": config.seed,
        "config": config_dict,
        "splits": splits,
        "licence": "generated from a seed; no third-party text",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {sum(s['records'] for s in splits.values())} records to {out}")
    return manifest
