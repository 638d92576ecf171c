"""The second task end to end on the tiny model: arithmetic data built by the arithmetic-tiny preset, fine-tuned,
calibrated, evaluated and served, every step labelling generations by exact value (the arithmetic correctness)."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_support import UvicornThread, make_config

from sdm_core.settings import build
from training.calibrate import calibrate
from training.calibrate_config import PRESETS as CALIBRATE_PRESETS
from training.calibrate_config import CalibrateConfig
from training.config import PRESETS, FinetuneConfig
from training.correctness import arithmetic
from training.evaluate import PRESETS as EVALUATE_PRESETS
from training.evaluate import EvaluateConfig, evaluate
from training.finetune import run
from training.records import load_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    # One epoch with generation from the first, so that hard negatives occur in a one-epoch run.
    config = build(
        FinetuneConfig,
        {**PRESETS["arithmetic-tiny"], "output_dir": str(root / "run"), "epochs": 1, "generate_from_epoch": 0},
    )
    result = run(config)
    bundle = root / "bundle"
    summary = calibrate(
        build(CalibrateConfig, {**CALIBRATE_PRESETS["arithmetic-tiny"], "run": str(root / "run"), "out": str(bundle)})
    )
    test_file = root / "run" / "data" / "test.jsonl"
    metrics = evaluate(
        build(
            EvaluateConfig,
            {
                **EVALUATE_PRESETS["arithmetic-tiny"],
                "bundles": (f"arith={bundle}",),
                "data": (f"test={test_file}",),
                "out": str(root / "eval"),
                "max_docs": 8,
            },
        )
    )
    return root, result, summary, metrics


def test_the_arithmetic_preset_builds_and_trains_on_the_arithmetic_task(pipeline):
    root, result, _, _ = pipeline
    manifest = json.loads((root / "run" / "data" / "manifest.json").read_text())
    assert manifest["task"] == "arithmetic" and manifest["config"]["max_digits"] == 3
    train = load_records(root / "run" / "data" / "train.jsonl")
    assert all(r.prompt.startswith("Compute ") and arithmetic(r.positive, r.reference) for r in train)
    saved = json.loads((root / "run" / "config.json").read_text())["config"]
    assert saved["task"] == "arithmetic" and saved["correctness"] == "arithmetic"
    assert result.steps > 0 and (root / "run" / "best" / "model.safetensors").is_file()
    history = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("hard_negatives", 0) for r in history) > 0


def test_calibration_labels_generations_by_exact_value(pipeline):
    root, _, summary, _ = pipeline
    bundle_info = json.loads((root / "bundle" / "bundle.json").read_text())
    assert bundle_info["provenance"]["calibrate_config"]["correctness"] == "arithmetic"
    references = {r.id: r.reference for r in load_records(root / "run" / "data" / "calibration.jsonl")}
    rows = [json.loads(line) for line in (root / "bundle.calibration_generations.jsonl").read_text().splitlines()]
    assert len(rows) == summary["calibration_docs"] == 16
    assert [row["label"] for row in rows] == [int(arithmetic(row["generation"], references[row["id"]])) for row in rows]
    assert summary["generation_accuracy"] == sum(row["label"] for row in rows) / len(rows)
    assert bundle_info["certification"]["documents"] == CALIBRATE_PRESETS["arithmetic-tiny"]["certification_docs"]


def test_evaluation_labels_each_prediction_by_exact_value(pipeline):
    root, _, _, metrics = pipeline
    assert metrics["config"]["correctness"] == "arithmetic"
    references = {r.id: r.reference for r in load_records(root / "run" / "data" / "test.jsonl")}
    rows = [json.loads(line) for line in (root / "eval" / "predictions_arith_test.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert [row["label"] for row in rows] == [int(arithmetic(row["generation"], references[row["id"]])) for row in rows]
    assert metrics["results"]["arith"]["test"]["generation_correct"] == sum(row["label"] for row in rows)


def test_the_server_serves_the_arithmetic_bundle_unchanged(pipeline):
    from server.app import create_app

    root, _, _, _ = pipeline
    prompt = load_records(root / "run" / "data" / "test.jsonl")[0].prompt
    with UvicornThread(create_app(make_config(root / "bundle"))) as server:
        body = httpx.post(f"{server.url}/generate", json={"prompt": prompt, "on_abstain": "flag"}, timeout=120).json()
    assert body["verified"] in ("Yes", "No"), body
    assert body["text"].endswith(f"<verified>{body['verified']}</verified>")
    assert 0.0 <= body["probability"] <= 1.0 and isinstance(body["admitted"], bool)
