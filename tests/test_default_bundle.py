"""The committed default bundle (deploy/bundles/smollm2-word-order): intact, small, certified on held-out
generations, and built by today's presets. Nothing here snapshots figures that any retraining would change."""

from __future__ import annotations

import json
from pathlib import Path

from sdm_core import SDMEstimator
from sdm_core.lm.bundle import load_head, read_bundle_info

BUNDLE = Path(__file__).resolve().parents[1] / "deploy" / "bundles" / "smollm2-word-order"


def test_default_bundle_verifies_and_is_an_adapter_over_smollm2():
    info = read_bundle_info(BUNDLE)  # checks the sha256 of every file
    assert info.model["kind"] == "adapter" and info.model["base"] == {"kind": "smollm2"}
    assert info.recipe.sequence_end == "verified"


def test_default_bundle_stays_under_the_25_mb_budget():
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024, size


def test_default_bundle_is_calibrated_on_generations_and_certified_on_disjoint_documents():
    info = read_bundle_info(BUNDLE)
    calibrate = info.provenance["calibrate_config"]
    assert calibrate["calibration_instances"] == "generations"
    split = info.provenance["documents_by_split"]
    assert split["certification"] >= 256 and split["support"] + split["calibration"] >= 1024
    certification = info.certification
    assert certification is not None and certification.documents == split["certification"]
    head = SDMEstimator.load(BUNDLE / "head")
    assert [r.alpha for r in certification.rows] == list(head.ladder.alphas)
    # Each half holds its own documents (a support document may bring two instances, "ID" and "ID#generation"), the
    # halves are disjoint, and with the certification split they account for every calibration document.
    support_docs = {i.split("#")[0] for i in head.support.ids}
    assert len(support_docs) == split["support"] and len(head.calibration_ids) == split["calibration"]
    assert not support_docs & set(head.calibration_ids)
    assert sum(split.values()) == info.provenance["calibration_docs"]


def test_default_bundle_serves_only_regions_its_certification_did_not_reject():
    info = read_bundle_info(BUNDLE)
    certification = info.certification
    served = load_head(info).ladder
    for row in certification.rows:
        violated = row.groups and any(
            n >= certification.min_admitted and p < certification.violation_p for n, _, p in row.groups.values()
        )
        assert row.withdrawn == bool(violated), row
        if row.withdrawn:
            assert not served.regions[row.alpha].exists
    # What is certified is served, with enough evidence behind it.
    for alpha in certification.certified:
        assert served.regions[alpha].exists and certification.row(alpha).admitted >= certification.min_admitted


def test_default_bundle_was_fine_tuned_by_the_smollm2_gpu_preset_and_calibrated_by_the_cpu_recipe():
    from training.calibrate_config import PRESETS as CALIBRATE_PRESETS
    from training.config import PRESETS

    provenance = json.loads((BUNDLE / "bundle.json").read_text())["provenance"]
    trained = provenance["training_config"]
    preset = PRESETS["smollm2-gpu"]
    assert {k: trained[k] for k in preset} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.items()}
    # The two calibrate presets share the recipe and differ in batch sizes only, so either reproduces the head.
    recipe = CALIBRATE_PRESETS["smollm2-cpu"]
    sizes = {"generate_batch_size", "embed_batch_size"}
    assert {k: v for k, v in CALIBRATE_PRESETS["smollm2-gpu"].items() if k not in sizes} == recipe
    calibrated = provenance["calibrate_config"]
    assert {k: calibrated[k] for k in recipe} == recipe
    assert provenance["calibration_docs"] == preset["max_calibration_docs"] + preset["task_holdout_docs"]
