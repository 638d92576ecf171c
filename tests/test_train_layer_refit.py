"""``--train-layer-refit-steps N`` (issue 14): the training-set SDM layer is refitted every N optimiser steps into an
epoch, the steps' bases come from the refitted layer, N = 0 keeps the paper's once-per-epoch fit, the option is
refused where it cannot apply, and a run resumed after a crash matches an uninterrupted one with refits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdm_core.settings import build
from training.config import FINETUNE, PRESETS, FinetuneConfig
from training.verification_layer import refit_due

ROOT = Path(__file__).resolve().parents[1]
# The tiny preset's 16 documents at 2 x 2 a step: 4 steps an epoch, 8 in two epochs; with N = 2 the layer is
# refitted before each epoch's third step (0-based local step 2: global steps 2 and 6). At the preset's learning rate
# (1e-3) h leaves any layer's range after one step, so most bases are 2.5 whichever layer scores them; at 1e-5 the
# bases depend on the layer, so a step scored by the wrong layer shows in its mean b and loss.
RUN = dict(epochs=2, micro_batch_size=2, generate_from_epoch=0, eval_steps=100, learning_rate=1e-5)
VOLATILE = ("seconds", "layer_refit_seconds")  # wall times


def tiny_config(out: Path, **overrides) -> FinetuneConfig:
    return build(FinetuneConfig, {**PRESETS["tiny"], "output_dir": str(out), **RUN, **overrides})


def test_the_option_defaults_to_the_papers_once_per_epoch_fit_and_has_a_flag_and_a_variable() -> None:
    assert FinetuneConfig().train_layer_refit_steps == 0
    assert all("train_layer_refit_steps" not in preset for preset in PRESETS.values())
    assert FINETUNE.parse(["--preset", "tiny"], {"SDM_TRAIN_LAYER_REFIT_STEPS": "3"}).train_layer_refit_steps == 3
    parsed = FINETUNE.parse(["--train-layer-refit-steps", "5"], {"SDM_TRAIN_LAYER_REFIT_STEPS": "3"})
    assert parsed.train_layer_refit_steps == 5 and parsed.to_dict()["train_layer_refit_steps"] == 5


def test_invalid_refit_settings_are_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="train_layer_refit_steps must be >= 0, got -1"):
        FinetuneConfig(train_layer_refit_steps=-1)
    with pytest.raises(ValueError, match="the CE loss fits none: pass --train-layer-refit-steps 0"):
        FinetuneConfig(loss="ce", train_layer_refit_steps=4)
    assert FinetuneConfig(loss="ce", train_layer_refit_steps=0).loss == "ce"


def test_refits_fall_every_n_steps_after_the_epoch_start_fit() -> None:
    assert [local for local in range(10) if refit_due(local, 3)] == [3, 6, 9]
    assert [local for local in range(10) if refit_due(local, 1)] == list(range(1, 10))
    assert not any(refit_due(local, 0) for local in range(10))


class _LayerLog:
    """Records which fit (by its tag) produced each layer, and which layer gave each training step's bases."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from training import trainer as trainer_module

        self.fits: list[str] = []
        self.bases: list[tuple[int, str, float]] = []  # (steps done, layer tag, mean b)
        tags: dict[int, str] = {}
        trainers: list = []
        fit, bases_from_h = trainer_module.SDMTrainer._fit_layer, trainer_module.bases_from_h

        def fit_layer(trainer, records, flags, hard_negatives, tag):
            layer = fit(trainer, records, flags, hard_negatives, tag)
            trainers.append(trainer)
            tags[id(layer)] = tag
            self.fits.append(tag)
            return layer

        def bases(h, instances, layer, flags):
            out = bases_from_h(h, instances, layer, flags)
            if tags[id(layer)].startswith("train-layer"):
                self.bases.append((trainers[-1].state.step, tags[id(layer)], float(out.mean())))
            return out

        monkeypatch.setattr(trainer_module.SDMTrainer, "_fit_layer", fit_layer)
        monkeypatch.setattr(trainer_module, "bases_from_h", bases)


@pytest.mark.slow
def test_the_layer_is_refitted_every_n_steps_and_the_steps_bases_come_from_the_refit(tmp_path, monkeypatch):
    from training.finetune import run

    layers = _LayerLog(monkeypatch)
    refitted = run(tiny_config(tmp_path / "n2", train_layer_refit_steps=2))
    assert [t for t in layers.fits if t.startswith("train-layer")] == [
        "train-layer:0",
        "train-layer:0:2",
        "train-layer:1",
        "train-layer:1:6",
    ]
    used = {step: tag for step, tag, _ in layers.bases}
    assert used == {
        0: "train-layer:0",
        1: "train-layer:0",
        2: "train-layer:0:2",
        3: "train-layer:0:2",
        4: "train-layer:1",
        5: "train-layer:1",
        6: "train-layer:1:6",
        7: "train-layer:1:6",
    }
    records = refitted.history
    assert [r["step"] for r in records if "layer_refit_seconds" in r] == [3, 7]
    assert all(r["layer_refit_seconds"] > 0 for r in records if "layer_refit_seconds" in r)
    # Each step's logged mean b is the mean of the bases its layer gave (one rank, one bases pass a step).
    assert [r["mean_base"] for r in records] == pytest.approx([mean for _, _, mean in layers.bases], abs=1e-6)

    layers.fits.clear()
    layers.bases.clear()
    once = run(tiny_config(tmp_path / "n0"))
    assert [t for t in layers.fits if t.startswith("train-layer")] == ["train-layer:0", "train-layer:1"]
    assert not any("layer_refit_seconds" in r for r in once.history)
    # Up to the first refit the runs are the same run; from it on, the bases (and so the losses) differ.
    for a, b in zip(once.history[:2], records[:2]):
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
    for refit in (slice(2, 4), slice(6, 8)):  # the steps each refitted layer scores
        assert [r["mean_base"] for r in once.history[refit]] != [r["mean_base"] for r in records[refit]]


@pytest.mark.slow
def test_n_at_least_an_epoch_never_refits_and_matches_the_default(tmp_path):
    from training.finetune import run

    default = run(tiny_config(tmp_path / "n0", epochs=1))
    long = run(tiny_config(tmp_path / "n4", epochs=1, train_layer_refit_steps=4))
    assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in long.history] == [
        {k: v for k, v in r.items() if k not in VOLATILE} for r in default.history
    ]


def _finetune(out: Path, *extra: str, crash_after_step: int | None = None) -> subprocess.CompletedProcess:
    """``python -m training.finetune`` with refits every 2 steps, or the same run killed after a checkpoint."""
    entry = (
        ["-m", "training.finetune"]
        if crash_after_step is None
        else [str(ROOT / "tests" / "crashing_finetune.py"), str(crash_after_step)]
    )
    flags = ["--preset", "tiny", "--output-dir", str(out), "--train-layer-refit-steps", "2"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    return subprocess.run(
        [sys.executable, *entry, *flags, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


@pytest.mark.slow
def test_resume_with_refits_matches_the_uninterrupted_run(tmp_path):
    # Killed after step 3: the checkpoint holds the layer refitted before step 3, which the resumed run's step 4
    # scores with; epoch 2's refit (before step 7) then happens in the resumed run.
    straight = _finetune(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = _finetune(tmp_path / "crashed", crash_after_step=3)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    resumed = _finetune(tmp_path / "crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "crashed") == _records(tmp_path / "straight")
    refits = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in refits if "layer_refit_seconds" in r] == [3, 7]
