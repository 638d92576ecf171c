"""Fine-tuning levers measured end to end: several variants of a preset, each fine-tuned, calibrated and evaluated.

Each variant is the preset plus its own ``training.finetune`` flags (``--variant NAME=FLAGS``); every variant is
then calibrated with the same recipe (the preset's ``training.calibrate`` settings on its own run's calibration and
holdout documents, certification included) and evaluated with ``training.evaluate`` on the same held-out prompts
(wiki test, Harvard, length shift: the data builder draws them before the training split, so they do not move when
the number of training documents does). Variants run side by side as subprocess chains, which is how one GPU is
shared by several small fine-tunes; ``--deadline-s`` stops whatever is still running, so a time-boxed machine
returns what finished. Prints one JSON line: per variant, the wall time of each step, its certified alphas, and per
held-out set the generation accuracy, the AUROC of SDM(z')_Yes and of the LM's P(Yes), and what SDM_HR admits.

    python bench/recipe_variants.py --preset tiny --out runs/variants-tiny --variant a= --variant b="--loss ce"
    python bench/recipe_variants.py --out runs/levers --threads 3 --deadline-s 480 \\
        --variant control= --variant docs2x="--max-train-docs 1728" --variant negs="--gamma-generate 1.0" \\
        --finetune-flags "--generate-batch-size 64" --calibrate-flags "--generate-batch-size 128" \\
        --evaluate-flags "--generate-batch-size 128" --collect out/

``--collect DIR`` writes one ``NAME.tar.gz`` per variant (run config and metrics, bundle.json, the calibration
generations, the evaluation's metrics, report and predictions, the step logs; with ``--collect-adapters`` the
selected checkpoint's adapter too) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_losses import HELDOUT, arm_summary  # noqa: E402


@dataclass
class Variant:
    name: str
    flags: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str = ""


def parse_variant(text: str) -> Variant:
    name, sep, flags = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant takes NAME=FLAGS (NAME in letters, digits, - and _), got {text!r}")
    return Variant(name, shlex.split(flags))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-cpu")
    parser.add_argument("--out", required=True, help="working folder: OUT/NAME/{run,bundle,eval} per variant")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME=FLAGS")
    parser.add_argument("--finetune-flags", default="", help="training.finetune flags every variant gets")
    parser.add_argument("--calibrate-flags", default="", help="training.calibrate flags every variant gets")
    parser.add_argument("--evaluate-flags", default="", help="training.evaluate flags every variant gets")
    parser.add_argument("--max-eval-docs", type=int, default=256, help="held-out documents per dataset (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per variant (0: torch's default)")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="stop every step still running after this")
    parser.add_argument("--collect", default="", help="folder for one NAME.tar.gz per variant and summary.json")
    parser.add_argument("--collect-adapters", action="store_true", help="put the selected checkpoint in the tar")
    args = parser.parse_args(argv)
    names = [v.name for v in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ, got {names}")
    return args


def steps(args: argparse.Namespace, variant: Variant, folder: Path) -> list[tuple[str, list[str]]]:
    """The variant's three commands: fine-tune, calibrate on its own data, evaluate on the held-out sets."""
    python = [sys.executable, "-m"]
    run, bundle, data = folder / "run", folder / "bundle", folder / "run" / "data"
    heldout = ",".join(f"{name}={data / file}" for name, file in HELDOUT)
    return [
        (
            "finetune",
            [*python, "training.finetune", "--preset", args.preset, "--output-dir", str(run)]
            + shlex.split(args.finetune_flags)
            + variant.flags,
        ),
        (
            "calibrate",
            [*python, "training.calibrate", "--preset", args.preset, "--run", str(run), "--out", str(bundle)]
            + shlex.split(args.calibrate_flags),
        ),
        (
            "evaluate",
            [*python, "training.evaluate", "--preset", args.preset, "--bundles", f"{variant.name}={bundle}"]
            + ["--data", heldout, "--max-docs", str(args.max_eval_docs), "--out", str(folder / "eval")]
            + shlex.split(args.evaluate_flags),
        ),
    ]


def run_variant(args: argparse.Namespace, variant: Variant, folder: Path, deadline: float, env: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for step, command in steps(args, variant, folder):
        started = time.monotonic()
        with open(folder / f"{step}.log", "w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            # A session of its own, so that the deadline stops the step's children (dataloader workers) too.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            while process.poll() is None:
                if deadline and time.monotonic() > deadline:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    variant.failed = f"{step}: stopped at the deadline"
                    break
                time.sleep(1.0)
        variant.seconds[step] = round(time.monotonic() - started, 1)
        if variant.failed:
            return
        if process.returncode:
            variant.failed = f"{step}: exit status {process.returncode} (see {folder / (step + '.log')})"
            return


def summary(variant: Variant, folder: Path) -> dict:
    out: dict = {"flags": shlex.join(variant.flags), "seconds": variant.seconds, "failed": variant.failed}
    config = folder / "run" / "config.json"
    if config.is_file():
        out["finetune_steps"] = json.loads(config.read_text()).get("steps")
    bundle = folder / "bundle" / "bundle.json"
    if bundle.is_file():
        info = json.loads(bundle.read_text())
        provenance = info.get("provenance", {})
        out["calibration_generation_accuracy"] = provenance.get("calibration_generation_accuracy")
        out["documents_by_split"] = provenance.get("documents_by_split")
        out["regions"] = [r["alpha"] for r in info["head"]["regions"] if r.get("calibration_admitted")]
    metrics = folder / "eval" / "metrics.json"
    if metrics.is_file():
        out.update(arm_summary(json.loads(metrics.read_text()), variant.name))
    return out


def collect(variant: Variant, folder: Path, target: Path, adapters: bool) -> None:
    """NAME.tar.gz: what the summary was read from, enough to rebuild the head elsewhere (--reuse-generations)."""
    wanted = ["run/config.json", "run/metrics.jsonl", "run/train.log", "bundle/bundle.json"]
    wanted += ["bundle.calibration_generations.jsonl", "eval/metrics.json", "eval/report.md"]
    wanted += ["finetune.log", "calibrate.log", "evaluate.log"]
    with tarfile.open(target / f"{variant.name}.tar.gz", "w:gz") as tar:
        for name in wanted:
            if (folder / name).is_file():
                tar.add(folder / name, arcname=f"{variant.name}/{name}")
        for path in sorted((folder / "eval").glob("predictions_*.jsonl")):
            tar.add(path, arcname=f"{variant.name}/eval/{path.name}")
        if adapters:
            # The adapter alone: the base model's tokenizer files are the same for every variant.
            for path in sorted((folder / "run" / "best").glob("*")):
                if path.name.startswith("adapter") or path.name.endswith(".json") and "tokenizer" not in path.name:
                    tar.add(path, arcname=f"{variant.name}/run/best/{path.name}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.monotonic()
    deadline = started + args.deadline_s if args.deadline_s else 0.0
    threads = [
        threading.Thread(target=run_variant, args=(args, v, out / v.name, deadline, env), name=v.name)
        for v in args.variant
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {
        "preset": args.preset,
        "out": str(out),
        "wall_s": round(time.monotonic() - started, 1),
        "variants": {v.name: summary(v, out / v.name) for v in args.variant},
    }
    if args.collect:
        target = Path(args.collect)
        target.mkdir(parents=True, exist_ok=True)
        for variant in args.variant:
            collect(variant, out / variant.name, target, args.collect_adapters)
        (target / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
