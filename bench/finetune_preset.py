"""Wall time of a fine-tuning preset end to end (fine-tune, then calibrate into a bundle) and the bundle's
calibration-set HIGH-RELIABILITY proportion at alpha = 0.95. Prints one JSON line.

    python bench/finetune_preset.py --preset smollm2-cpu --out runs/bench-smollm2 [--loss sdm|ce]
        [--set gamma_generate=0.5 ...] [--calibrate-set max_new_tokens=64 ...]

``--set`` / ``--calibrate-set`` override one field of the preset's fine-tuning / calibration config (repeatable),
so variants of a preset are measured by the same script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core.settings import build, options, parse_text  # noqa: E402
from training.calibrate import calibrate  # noqa: E402
from training.calibrate_config import PRESETS as CALIBRATE_PRESETS  # noqa: E402
from training.calibrate_config import CalibrateConfig  # noqa: E402
from training.config import PRESETS, FinetuneConfig  # noqa: E402
from training.finetune import run  # noqa: E402


def _overrides(pairs: list[str], cls: type) -> dict:
    values = {}
    names = {option.name for option in options(cls)}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in names:
            raise SystemExit(
                f"error: --set/--calibrate-set takes NAME=VALUE with NAME a setting of {cls.__name__}, got {pair!r}"
            )
        values[name] = parse_text(cls, name, text)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-cpu", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss", default="sdm", choices=("sdm", "ce"))
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a fine-tuning config field"
    )
    parser.add_argument(
        "--calibrate-set", action="append", default=[], metavar="NAME=VALUE", help="override a calibration config field"
    )
    args = parser.parse_args()
    out = Path(args.out)
    overrides = _overrides(args.set, FinetuneConfig)
    calibrate_overrides = _overrides(args.calibrate_set, CalibrateConfig)
    config = build(
        FinetuneConfig,
        {
            **PRESETS[args.preset],
            **overrides,
            "output_dir": str(out / "run"),
            "loss": args.loss,
            "progress": args.progress,
        },
    )
    started = time.perf_counter()
    result = run(config)
    finetune_seconds = time.perf_counter() - started
    cal_config = build(
        CalibrateConfig,
        {
            **CALIBRATE_PRESETS.get(args.preset, {}),
            **calibrate_overrides,
            "run": str(out / "run"),
            "out": str(out / "bundle"),
            "progress": args.progress,
        },
    )
    started = time.perf_counter()
    summary = calibrate(cal_config)
    calibrate_seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "preset": args.preset,
                "loss": args.loss,
                "overrides": {
                    **{k: str(v) for k, v in overrides.items()},
                    **{f"calibrate.{k}": str(v) for k, v in calibrate_overrides.items()},
                },
                "finetune_seconds": round(finetune_seconds, 1),
                "calibrate_seconds": round(calibrate_seconds, 1),
                "total_seconds": round(finetune_seconds + calibrate_seconds, 1),
                "steps": result.steps,
                "best_step": result.best_step,
                "best_eval_loss": result.best_eval_loss,
                # calibrate's own summary, prefixed once ("calibration_docs" stays "calibration_docs", not doubled)
                **{
                    (k if k.startswith("calibration_") else f"calibration_{k}"): v
                    for k, v in summary.items()
                    if k != "bundle"
                },
                "bundle": summary["bundle"],
            }
        )
    )


if __name__ == "__main__":
    main()
