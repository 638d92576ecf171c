"""Every fine-tuning preset has a calibrate, evaluate and certify preset of the same name, so that one --preset
carries a run through the whole pipeline (docs/training.md)."""

from __future__ import annotations

from training.calibrate_config import PRESETS as CALIBRATE
from training.certify import PRESETS as CERTIFY
from training.config import PRESETS as FINETUNE
from training.evaluate import PRESETS as EVALUATE


def test_each_command_knows_every_fine_tuning_preset() -> None:
    for command, presets in (("calibrate", CALIBRATE), ("evaluate", EVALUATE), ("certify", CERTIFY)):
        assert set(presets) == set(FINETUNE), (command, set(FINETUNE) ^ set(presets))


def test_a_presets_correctness_agrees_across_commands() -> None:
    for name, finetune in FINETUNE.items():
        r = finetune.get("correctness", "word_order")
        assert CALIBRATE[name].get("correctness", r) == r, name
        assert EVALUATE[name].get("correctness", r) == r, name
