"""The SDM LM paper's central claim at our scale: does fine-tuning with the SDM loss let the head admit more,
still validly, than fine-tuning with cross-entropy on the same encoding, or than no fine-tuning at all?

Fine-tunes the preset twice (``--loss sdm`` and ``--loss ce``: the same data, seeds and steps), adds the
un-fine-tuned base model with only a head, calibrates all three with the same recipe (the preset's calibrate
settings, the same calibration and holdout documents, certification included), and evaluates them with
training.evaluate on held-out wiki test, Harvard and length-shift prompts. Prints one JSON line with every arm's
generation accuracy, AUROC of SDM(z')_Yes, certified alphas and admitted answers at each alpha, and wall times;
training.evaluate's report.md (LM paper Tables 2-4, the alternatives, risk-coverage plots) is under OUT/eval.

    python bench/compare_losses.py --preset smollm2-cpu --out runs/compare [--max-eval-docs 256]
    python bench/compare_losses.py --preset tiny --out runs/compare-tiny        # seconds; a smoke run
    python bench/compare_losses.py --preset smollm2-cpu --out runs/compare --sdm-run runs/smollm2/run   # reuse a run

``--sdm-run`` / ``--ce-run`` reuse finished training.finetune output folders of the preset instead of training.
``--arms`` runs a subset, so that arms can run side by side on separate cores, each with its own report
(OUT/eval-<arms>); every arm reads the SDM arm's data folder (``--sdm-run``, or the one fine-tuning builds), so all
arms see the same documents:

    python bench/compare_losses.py --out runs/compare --arms ce --mixed-precision no --data runs/sdm/data
    python bench/compare_losses.py --out runs/compare --arms sdm,base --sdm-run runs/sdm --calibration-docs 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdm_core.settings import build  # noqa: E402
from training.calibrate import calibrate  # noqa: E402
from training.calibrate_config import PRESETS as CALIBRATE_PRESETS  # noqa: E402
from training.calibrate_config import CalibrateConfig  # noqa: E402
from training.config import PRESETS, FinetuneConfig  # noqa: E402
from training.evaluate import PRESETS as EVALUATE_PRESETS  # noqa: E402
from training.evaluate import EvaluateConfig, evaluate  # noqa: E402
from training.finetune import run  # noqa: E402

HELDOUT = (("wiki", "test.jsonl"), ("harvard", "harvard.jsonl"), ("length_shift", "length_shift.jsonl"))


ARMS = ("sdm", "ce", "base")


def finetune(preset: str, loss: str, out: Path, progress: bool, overrides: dict) -> tuple[Path, float]:
    settings = {**PRESETS[preset], **overrides, "output_dir": str(out), "loss": loss, "progress": progress}
    config = build(FinetuneConfig, settings)
    started = time.perf_counter()
    run(config)
    return out, time.perf_counter() - started


def arm_summary(metrics: dict, name: str) -> dict:
    out = {
        "certified_alphas": metrics["bundles"][name]["certified_alphas"],
        "withdrawn_alphas": metrics["bundles"][name]["withdrawn_alphas"],
        "datasets": {},
    }
    for dataset, result in metrics["results"][name].items():
        admitted = {
            f"{r['alpha']:g}": [r["verified"]["admitted"], r["verified"]["correct"]]
            for r in result["methods"]["sdm_hr"]
            if r["verified"]["admitted"]
        }
        out["datasets"][dataset] = {
            "n": result["n"],
            "generation_acc": round(result["generation_acc"], 4),
            "auroc_sdm": result["auroc"]["sdm"],
            "auroc_lm_p_yes": result["auroc"]["lm_probability"],
            "sdm_hr_admitted_correct": admitted,
        }
    return out


def fine_tuned_runs(args: argparse.Namespace, out: Path, overrides: dict, seconds: dict) -> dict[str, Path]:
    """The SDM and CE runs the arms read: a reused run always (the base arm takes its model and prompt settings from
    one), a fresh fine-tune only for an arm that needs it."""
    runs: dict[str, Path] = {}
    for loss, reuse in (("sdm", args.sdm_run), ("ce", args.ce_run)):
        if reuse:
            runs[loss] = Path(reuse)
        elif loss in args.arms or (loss == "sdm" and "base" in args.arms and not args.data):
            runs[loss], seconds[f"finetune_{loss}"] = finetune(
                args.preset, loss, out / f"run_{loss}", args.progress, overrides
            )
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-cpu", choices=sorted(set(PRESETS) & set(CALIBRATE_PRESETS)))
    parser.add_argument("--out", required=True)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of sdm,ce,base")
    parser.add_argument("--sdm-run", default="", help="a finished SDM-loss run of the preset to reuse")
    parser.add_argument("--ce-run", default="", help="a finished CE-loss run of the preset to reuse")
    parser.add_argument(
        "--data", default="", help="the task's data folder (train, calibration, holdout, held-out sets) for every arm"
    )
    parser.add_argument("--mixed-precision", default="", help="overrides the preset's (e.g. 'no' on AVX2-only CPUs)")
    parser.add_argument("--calibration-docs", type=int, default=0, help="calibration documents per arm (0: all)")
    parser.add_argument(
        "--sdm-generations", default="", help="the SDM arm's labelled generations to reuse (--reuse-generations)"
    )
    parser.add_argument("--max-eval-docs", type=int, default=256, help="held-out documents per dataset (0: all)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    arms = tuple(a for a in args.arms.split(",") if a)
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms takes a comma-separated subset of {','.join(ARMS)}, got {args.arms!r}")
    args.arms = tuple(a for a in ARMS if a in arms)
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    seconds: dict[str, float] = {}
    runs: dict[str, Path] = {}
    overrides: dict = {"mixed_precision": args.mixed_precision} if args.mixed_precision else {}
    if args.data:
        data = Path(args.data)
        overrides.update(train=str(data / "train.jsonl"), calibration=str(data / "calibration.jsonl"))
    runs.update(fine_tuned_runs(args, out, overrides, seconds))
    data = Path(args.data) if args.data else runs["sdm"] / "data"
    first = next(iter(runs.values()), None)
    training = json.loads(((first or runs.get("sdm")) / "config.json").read_text())["config"] if first else {}
    settings = {**CALIBRATE_PRESETS[args.preset], "progress": args.progress}
    if args.calibration_docs:
        settings["max_calibration_docs"] = args.calibration_docs
    # Every arm calibrates on the same documents: the data folder's calibration and holdout files.
    files = ",".join(str(data / f) for f in ("calibration.jsonl", "holdout.jsonl") if (data / f).is_file())
    bundles: dict[str, Path] = {}
    for name in ("sdm", "ce"):
        if name not in args.arms:
            continue
        started = time.perf_counter()
        arm = {**settings, "run": str(runs[name]), "calibration": files, "out": str(out / f"bundle_{name}")}
        if name == "sdm" and args.sdm_generations:
            arm["reuse_generations"] = args.sdm_generations
        bundles[name] = Path(calibrate(build(CalibrateConfig, arm))["bundle"])
        seconds[f"calibrate_{name}"] = time.perf_counter() - started
    if "base" in args.arms:
        # The base model: the same documents and recipe as the fine-tuned arms, no fine-tuning.
        if not training:
            raise SystemExit("the base arm takes its model and prompt settings from a run: pass --sdm-run or --ce-run")
        started = time.perf_counter()
        base = {
            **settings,
            "model": dict(training["model"]),
            "calibration": files,
            "out": str(out / "bundle_base"),
            "correctness": training.get("correctness", "word_order"),
            "system_prompt": training.get("system_prompt"),
            "recipe_sequence_end": training.get("recipe_sequence_end", "template"),
        }
        bundles["base"] = Path(calibrate(build(CalibrateConfig, base))["bundle"])
        seconds["calibrate_base"] = time.perf_counter() - started
    started = time.perf_counter()
    report = out / ("eval" if args.arms == ARMS else "eval-" + "-".join(args.arms))
    metrics = evaluate(
        build(
            EvaluateConfig,
            {
                **EVALUATE_PRESETS.get(args.preset, {}),
                "progress": args.progress,
                "max_docs": args.max_eval_docs,
                "bundles": tuple(f"{n}={p}" for n, p in bundles.items()),
                "out": str(report),
                "correctness": training.get("correctness", "word_order"),
                "data": tuple(f"{n}={data / f}" for n, f in HELDOUT if (data / f).is_file()),
            },
        )
    )
    seconds["evaluate"] = time.perf_counter() - started
    print(
        json.dumps(
            {
                "preset": args.preset,
                "out": str(out),
                "report": str(report / "report.md"),
                "seconds": {k: round(v, 1) for k, v in seconds.items()},
                "arms": {name: arm_summary(metrics, name) for name in bundles},
            }
        )
    )


if __name__ == "__main__":
    main()
