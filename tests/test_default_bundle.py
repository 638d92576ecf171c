"""The committed default bundle (deploy/bundles/smollm2-word-order): intact, small, and as documented."""

from __future__ import annotations

from pathlib import Path

from sdm_core import SDMEstimator
from sdm_core.lm.bundle import read_bundle_info

BUNDLE = Path(__file__).resolve().parents[1] / "deploy" / "bundles" / "smollm2-word-order"


def test_default_bundle_verifies_and_is_an_adapter_over_smollm2():
    info = read_bundle_info(BUNDLE)  # checks the sha256 of every file
    assert info.model["kind"] == "adapter" and info.model["base"] == {"kind": "smollm2"}
    assert info.recipe.sequence_end == "verified"


def test_default_bundle_stays_under_the_25_mb_budget():
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024, size


def test_default_bundle_head_has_the_documented_region_at_alpha_095():
    head = SDMEstimator.load(BUNDLE / "head")
    regions = head.ladder.regions
    assert head.config.alpha == 0.95
    assert regions[0.95].exists and regions[0.95].calibration_admitted == 26 and regions[0.95].q_prime_min == 47.0
    assert regions[0.6].calibration_admitted == 57
    assert not any(regions[a].exists for a in regions if a >= 0.97)


def test_default_bundle_was_trained_by_the_smollm2_cpu_preset():
    import json

    from training.config import PRESETS

    trained = json.loads((BUNDLE / "bundle.json").read_text())["provenance"]["training_config"]
    assert {k: trained[k] for k in PRESETS["smollm2-cpu"]} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in PRESETS["smollm2-cpu"].items()}
