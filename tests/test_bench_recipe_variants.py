"""``bench/recipe_variants.py``: each variant is fine-tuned with its own flags, calibrated and evaluated on the
same held-out prompts; the deadline stops what is still running; what is collected is what the summary reads."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import recipe_variants  # noqa: E402


def test_a_variant_is_a_name_and_its_finetune_flags() -> None:
    variant = recipe_variants.parse_variant("docs2x=--max-train-docs 1728 --loss 'ce'")
    assert variant.name == "docs2x" and variant.flags == ["--max-train-docs", "1728", "--loss", "ce"]
    assert recipe_variants.parse_variant("control=").flags == []
    for bad in ("no-equals-sign", "=--loss ce", "a/b=--loss ce"):
        with pytest.raises(argparse.ArgumentTypeError):
            recipe_variants.parse_variant(bad)
    with pytest.raises(SystemExit):
        recipe_variants.parse_args(["--out", "x", "--variant", "a=", "--variant", "a=--loss ce"])


def test_every_variant_evaluates_on_the_held_out_sets_of_its_own_run(tmp_path) -> None:
    args = recipe_variants.parse_args(
        ["--preset", "tiny", "--out", str(tmp_path), "--variant", "ce=--loss ce", "--max-eval-docs", "3"]
        + ["--calibrate-flags", "--embed-batch-size 4", "--evaluate-flags", "--generate-batch-size 2"]
    )
    commands = dict(recipe_variants.steps(args, args.variant[0], tmp_path / "ce"))
    assert commands["finetune"][-2:] == ["--loss", "ce"]
    assert commands["calibrate"][-2:] == ["--embed-batch-size", "4"]
    data = commands["evaluate"][commands["evaluate"].index("--data") + 1]
    run_data = tmp_path / "ce" / "run" / "data"
    assert data == f"wiki={run_data / 'test.jsonl'},harvard={run_data / 'harvard.jsonl'},length_shift=" + str(
        run_data / "length_shift.jsonl"
    )


@pytest.mark.slow
def test_a_variant_runs_end_to_end_and_its_tar_holds_what_the_summary_read(tmp_path, capsys) -> None:
    collect = tmp_path / "collect"
    recipe_variants.main(
        ["--preset", "tiny", "--out", str(tmp_path / "w"), "--variant", "ce=--loss ce", "--max-eval-docs", "3"]
        + ["--threads", "1", "--collect", str(collect)]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ce = out["variants"]["ce"]
    assert ce["failed"] == "" and set(ce["seconds"]) == {"finetune", "calibrate", "evaluate"}
    assert ce["flags"] == "--loss ce" and ce["finetune_steps"] > 0
    assert set(ce["datasets"]) == {"wiki", "harvard", "length_shift"}
    assert all(d["n"] == 3 for d in ce["datasets"].values())
    trained = json.loads((tmp_path / "w" / "ce" / "run" / "config.json").read_text())["config"]
    assert trained["loss"] == "ce"
    with tarfile.open(collect / "ce.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"ce/eval/metrics.json", "ce/bundle/bundle.json", "ce/run/config.json"} <= names
    assert "ce/bundle.calibration_generations.jsonl" in names
    assert json.loads((collect / "summary.json").read_text()) == out


def test_the_deadline_stops_a_step_that_is_still_running(tmp_path, capsys) -> None:
    recipe_variants.main(
        ["--preset", "tiny", "--out", str(tmp_path), "--variant", "slow=", "--deadline-s", "0.5", "--threads", "1"]
    )
    slow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"]["slow"]
    assert slow["failed"] == "finetune: stopped at the deadline"
    assert set(slow["seconds"]) == {"finetune"} and slow["seconds"]["finetune"] < 30
    assert not (tmp_path / "slow" / "bundle").exists()
