"""``bench/compare_losses.py``: which runs each arm reads, and that a reused run is never fine-tuned again."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare_losses  # noqa: E402


@pytest.fixture
def trained(monkeypatch) -> list[str]:
    """Records the fine-tunes compare_losses would start, instead of starting them."""
    started: list[str] = []

    def finetune(preset, loss, out, progress, overrides):
        started.append(loss)
        return out, 1.0

    monkeypatch.setattr(compare_losses, "finetune", finetune)
    return started


def runs(argv: list[str], tmp_path: Path) -> dict[str, Path]:
    args = compare_losses.parse_args(["--out", str(tmp_path), *argv])
    return compare_losses.fine_tuned_runs(args, tmp_path, {}, {})


def test_the_base_arm_reads_a_reused_run_even_with_a_data_folder(trained, tmp_path) -> None:
    got = runs(["--arms", "base", "--sdm-run", "runs/sdm", "--data", "runs/sdm/data"], tmp_path)
    assert got == {"sdm": Path("runs/sdm")} and trained == []


def test_the_base_arm_alone_fine_tunes_the_sdm_run_it_takes_its_settings_from(trained, tmp_path) -> None:
    assert runs(["--arms", "base"], tmp_path) == {"sdm": tmp_path / "run_sdm"} and trained == ["sdm"]
    # With a data folder and no run to read, the base arm has nothing to take its settings from: nothing is trained
    # (main() then says to pass --sdm-run or --ce-run).
    assert runs(["--arms", "base", "--data", "runs/sdm/data"], tmp_path) == {} and trained == ["sdm"]


def test_only_the_arms_asked_for_are_fine_tuned(trained, tmp_path) -> None:
    got = runs(["--arms", "ce", "--sdm-run", "runs/sdm", "--data", "runs/sdm/data"], tmp_path)
    assert got == {"sdm": Path("runs/sdm"), "ce": tmp_path / "run_ce"} and trained == ["ce"]
