"""Every command line keeps its flags and their SDM_* variables: a snapshot taken before the CLIs moved onto
sdm_core.settings (issue 15 item 4), compared with the parsers the CLIs build now.

A flag maps to the environment variable its --help names (None: the flag has none). Adding a flag means adding it
here; renaming or dropping one breaks scripts and deployments that use it, which this test exists to catch.
training.seal and training.update had no variables before; they gained them with the move (ADDED_VARIABLES).
"""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

SNAPSHOT: dict[str, dict[str, str | None]] = {
    "sdm_core.cli": {
        "add-exemplars --artifact": None,
        "add-exemplars --embeddings": None,
        "add-exemplars --labels": None,
        "add-exemplars --out": None,
        "evaluate --artifact": None,
        "evaluate --embeddings": None,
        "evaluate --labels": None,
        "evaluate --out-dir": None,
        "evaluate --title": None,
        "fit --alpha": None,
        "fit --alphas": None,
        "fit --backend": None,
        "fit --batch-size": None,
        "fit --calibration-embeddings": None,
        "fit --calibration-labels": None,
        "fit --class-names": None,
        "fit --epochs": None,
        "fit --ess-rule": None,
        "fit --exemplar-dim": None,
        "fit --independent-regions": None,
        "fit --iterations": None,
        "fit --learning-rate": None,
        "fit --max-q": None,
        "fit --no-normalize": None,
        "fit --num-classes": None,
        "fit --out": None,
        "fit --quiet": None,
        "fit --seed": None,
        "fit --shuffle-splits": None,
        "fit --train-embeddings": None,
        "fit --train-labels": None,
        "recalibrate --alpha": None,
        "recalibrate --alphas": None,
        "recalibrate --artifact": None,
        "recalibrate --independent-regions": None,
        "recalibrate --out": None,
        "score --alpha": None,
        "score --artifact": None,
        "score --embeddings": None,
        "score --exemplars": None,
        "score --ids": None,
        "score --out": None,
    },
    "server.cli": {
        "--admin-api-keys": "SDM_ADMIN_API_KEYS",
        "--api-key-file": "SDM_API_KEY_FILE",
        "--api-keys": "SDM_API_KEYS",
        "--backend": "SDM_BACKEND",
        "--batch-size": "SDM_BATCH_SIZE",
        "--batch-wait-ms": "SDM_BATCH_WAIT_MS",
        "--bundle": "SDM_BUNDLE",
        "--bundles-root": "SDM_BUNDLES_ROOT",
        "--cors-allow-origins": "SDM_CORS_ALLOW_ORIGINS",
        "--data-dir": "SDM_DATA_DIR",
        "--default-max-tokens": "SDM_DEFAULT_MAX_TOKENS",
        "--device": "SDM_DEVICE",
        "--drain-timeout-s": "SDM_DRAIN_TIMEOUT_S",
        "--dtype": "SDM_DTYPE",
        "--feedback-max-items": "SDM_FEEDBACK_MAX_ITEMS",
        "--feedback-max-note-chars": "SDM_FEEDBACK_MAX_NOTE_CHARS",
        "--hidden-states": "SDM_HIDDEN_STATES",
        "--host": "SDM_HOST",
        "--log-level": "SDM_LOG_LEVEL",
        "--max-attempts-cap": "SDM_MAX_ATTEMPTS_CAP",
        "--max-body-bytes": "SDM_MAX_BODY_BYTES",
        "--max-concurrent-requests": "SDM_MAX_CONCURRENT_REQUESTS",
        "--max-exemplars": "SDM_MAX_EXEMPLARS",
        "--max-prompt-tokens": "SDM_MAX_PROMPT_TOKENS",
        "--max-queue-size": "SDM_MAX_QUEUE_SIZE",
        "--max-tokens-cap": "SDM_MAX_TOKENS_CAP",
        "--metrics-require-key": "SDM_METRICS_REQUIRE_KEY",
        "--model-name": "SDM_MODEL_NAME",
        "--no-metrics-require-key": "SDM_METRICS_REQUIRE_KEY",
        "--no-store-text": "SDM_STORE_TEXT",
        "--no-verify-bundle": "SDM_VERIFY_BUNDLE",
        "--no-warmup": "SDM_WARMUP",
        "--port": "SDM_PORT",
        "--request-timeout-s": "SDM_REQUEST_TIMEOUT_S",
        "--sse-keepalive-s": "SDM_SSE_KEEPALIVE_S",
        "--store-text": "SDM_STORE_TEXT",
        "--traffic-max-rows": "SDM_TRAFFIC_MAX_ROWS",
        "--traffic-queue-size": "SDM_TRAFFIC_QUEUE_SIZE",
        "--traffic-retention-days": "SDM_TRAFFIC_RETENTION_DAYS",
        "--traffic-sample-rate": "SDM_TRAFFIC_SAMPLE_RATE",
        "--traffic-store": "SDM_TRAFFIC_STORE",
        "--verify-bundle": "SDM_VERIFY_BUNDLE",
        "--vllm-gpu-memory-utilization": "SDM_VLLM_GPU_MEMORY_UTILIZATION",
        "--vllm-max-model-len": "SDM_VLLM_MAX_MODEL_LEN",
        "--vllm-tensor-parallel-size": "SDM_VLLM_TENSOR_PARALLEL_SIZE",
        "--warmup": "SDM_WARMUP",
    },
    "training.calibrate": {
        "--alpha": "SDM_CALIBRATE_ALPHA",
        "--alphas": "SDM_CALIBRATE_ALPHAS",
        "--calibration": "SDM_CALIBRATE_CALIBRATION",
        "--calibration-instances": "SDM_CALIBRATE_CALIBRATION_INSTANCES",
        "--certification-docs": "SDM_CALIBRATE_CERTIFICATION_DOCS",
        "--certification-min-admitted": "SDM_CALIBRATE_CERTIFICATION_MIN_ADMITTED",
        "--certification-policy": "SDM_CALIBRATE_CERTIFICATION_POLICY",
        "--certification-violation-p": "SDM_CALIBRATE_CERTIFICATION_VIOLATION_P",
        "--checkpoint": "SDM_CALIBRATE_CHECKPOINT",
        "--correctness": "SDM_CALIBRATE_CORRECTNESS",
        "--device": "SDM_CALIBRATE_DEVICE",
        "--embed-batch-size": "SDM_CALIBRATE_EMBED_BATCH_SIZE",
        "--generate-batch-size": "SDM_CALIBRATE_GENERATE_BATCH_SIZE",
        "--instance-seed": "SDM_CALIBRATE_INSTANCE_SEED",
        "--max-calibration-docs": "SDM_CALIBRATE_MAX_CALIBRATION_DOCS",
        "--max-length": "SDM_CALIBRATE_MAX_LENGTH",
        "--max-new-tokens": "SDM_CALIBRATE_MAX_NEW_TOKENS",
        "--model": "SDM_CALIBRATE_MODEL",
        "--out": "SDM_CALIBRATE_OUT",
        "--preset": "SDM_CALIBRATE_PRESET",
        "--progress": "SDM_CALIBRATE_PROGRESS",
        "--recipe-layer": "SDM_CALIBRATE_RECIPE_LAYER",
        "--recipe-sequence-end": "SDM_CALIBRATE_RECIPE_SEQUENCE_END",
        "--reuse-generations": "SDM_CALIBRATE_REUSE_GENERATIONS",
        "--run": "SDM_CALIBRATE_RUN",
        "--sdm-batch-size": "SDM_CALIBRATE_SDM_BATCH_SIZE",
        "--sdm-epochs": "SDM_CALIBRATE_SDM_EPOCHS",
        "--sdm-exemplar-dim": "SDM_CALIBRATE_SDM_EXEMPLAR_DIM",
        "--sdm-learning-rate": "SDM_CALIBRATE_SDM_LEARNING_RATE",
        "--seed": "SDM_CALIBRATE_SEED",
        "--split-seed": "SDM_CALIBRATE_SPLIT_SEED",
        "--support-instances": "SDM_CALIBRATE_SUPPORT_INSTANCES",
        "--system-prompt": "SDM_CALIBRATE_SYSTEM_PROMPT",
    },
    "training.certify": {
        "--bundle": "SDM_CERTIFY_BUNDLE",
        "--correctness": "SDM_CERTIFY_CORRECTNESS",
        "--data": "SDM_CERTIFY_DATA",
        "--device": "SDM_CERTIFY_DEVICE",
        "--embed-batch-size": "SDM_CERTIFY_EMBED_BATCH_SIZE",
        "--generate-batch-size": "SDM_CERTIFY_GENERATE_BATCH_SIZE",
        "--max-docs": "SDM_CERTIFY_MAX_DOCS",
        "--max-new-tokens": "SDM_CERTIFY_MAX_NEW_TOKENS",
        "--min-admitted": "SDM_CERTIFY_MIN_ADMITTED",
        "--out": "SDM_CERTIFY_OUT",
        "--policy": "SDM_CERTIFY_POLICY",
        "--preset": "SDM_CERTIFY_PRESET",
        "--progress": "SDM_CERTIFY_PROGRESS",
        "--violation-p": "SDM_CERTIFY_VIOLATION_P",
    },
    "training.evaluate": {
        "--alpha": "SDM_EVALUATE_ALPHA",
        "--bundles": "SDM_EVALUATE_BUNDLES",
        "--correctness": "SDM_EVALUATE_CORRECTNESS",
        "--data": "SDM_EVALUATE_DATA",
        "--device": "SDM_EVALUATE_DEVICE",
        "--embed-batch-size": "SDM_EVALUATE_EMBED_BATCH_SIZE",
        "--generate-batch-size": "SDM_EVALUATE_GENERATE_BATCH_SIZE",
        "--max-docs": "SDM_EVALUATE_MAX_DOCS",
        "--max-new-tokens": "SDM_EVALUATE_MAX_NEW_TOKENS",
        "--out": "SDM_EVALUATE_OUT",
        "--preset": "SDM_EVALUATE_PRESET",
        "--progress": "SDM_EVALUATE_PROGRESS",
    },
    "training.finetune": {
        "--alpha": "SDM_ALPHA",
        "--calibration": "SDM_CALIBRATION",
        "--correctness": "SDM_CORRECTNESS",
        "--dtype": "SDM_DTYPE",
        "--embed-batch-size": "SDM_EMBED_BATCH_SIZE",
        "--epochs": "SDM_EPOCHS",
        "--eval-steps": "SDM_EVAL_STEPS",
        "--gamma-generate": "SDM_GAMMA_GENERATE",
        "--gamma-positive": "SDM_GAMMA_POSITIVE",
        "--generate-batch-size": "SDM_GENERATE_BATCH_SIZE",
        "--generate-from-epoch": "SDM_GENERATE_FROM_EPOCH",
        "--generation-timing": "SDM_GENERATION_TIMING",
        "--gradient-accumulation": "SDM_GRADIENT_ACCUMULATION",
        "--gradient-checkpointing": "SDM_GRADIENT_CHECKPOINTING",
        "--learning-rate": "SDM_LEARNING_RATE",
        "--lora": "SDM_LORA",
        "--lora-alpha": "SDM_LORA_ALPHA",
        "--lora-r": "SDM_LORA_R",
        "--lora-targets": "SDM_LORA_TARGETS",
        "--loss": "SDM_LOSS",
        "--max-calibration-docs": "SDM_MAX_CALIBRATION_DOCS",
        "--max-eval-docs": "SDM_MAX_EVAL_DOCS",
        "--max-grad-norm": "SDM_MAX_GRAD_NORM",
        "--max-length": "SDM_MAX_LENGTH",
        "--max-new-tokens": "SDM_MAX_NEW_TOKENS",
        "--max-train-docs": "SDM_MAX_TRAIN_DOCS",
        "--micro-batch-size": "SDM_MICRO_BATCH_SIZE",
        "--mixed-precision": "SDM_MIXED_PRECISION",
        "--model": "SDM_MODEL",
        "--output-dir": "SDM_OUTPUT_DIR",
        "--preset": "SDM_PRESET",
        "--progress": "SDM_PROGRESS",
        "--recipe-sequence-end": "SDM_RECIPE_SEQUENCE_END",
        "--resume": None,
        "--save-steps": "SDM_SAVE_STEPS",
        "--sdm-batch-size": "SDM_SDM_BATCH_SIZE",
        "--sdm-epochs": "SDM_SDM_EPOCHS",
        "--sdm-exemplar-dim": "SDM_SDM_EXEMPLAR_DIM",
        "--sdm-learning-rate": "SDM_SDM_LEARNING_RATE",
        "--seed": "SDM_SEED",
        "--system-prompt": "SDM_SYSTEM_PROMPT",
        "--task": "SDM_TASK",
        "--task-holdout-docs": "SDM_TASK_HOLDOUT_DOCS",
        "--task-max-digits": "SDM_TASK_MAX_DIGITS",
        "--task-max-words": "SDM_TASK_MAX_WORDS",
        "--task-min-digits": "SDM_TASK_MIN_DIGITS",
        "--task-min-words": "SDM_TASK_MIN_WORDS",
        "--task-operations": "SDM_TASK_OPERATIONS",
        "--train": "SDM_TRAIN",
        "--trainable-last-layers": "SDM_TRAINABLE_LAST_LAYERS",
        "--validation-layer-docs": "SDM_VALIDATION_LAYER_DOCS",
        "--warmup-steps": "SDM_WARMUP_STEPS",
        "--weight-decay": "SDM_WEIGHT_DECAY",
    },
    "training.seal": {
        "--bundle": None,
        "--note": None,
    },
    "training.update": {
        "--bundle": None,
        "--calibration-fraction": None,
        "--certification-fraction": None,
        "--head-version": None,
        "--out": None,
        "--seed": None,
        "--since": None,
        "--store": None,
        "--until": None,
    },
}

ADDED_VARIABLES: dict[str, dict[str, str]] = {
    "training.seal": {"--bundle": "SDM_SEAL_BUNDLE", "--note": "SDM_SEAL_NOTE"},
    "training.update": {
        flag: "SDM_UPDATE_" + flag[2:].replace("-", "_").upper() for flag in SNAPSHOT["training.update"]
    },
    # issue 18's GPU settings, added after the snapshot
    "server.cli": {
        "--vllm-enforce-eager": "SDM_VLLM_ENFORCE_EAGER",
        "--no-vllm-enforce-eager": "SDM_VLLM_ENFORCE_EAGER",
        "--vllm-max-num-seqs": "SDM_VLLM_MAX_NUM_SEQS",
        "--vllm-hidden-states": "SDM_VLLM_HIDDEN_STATES",
        "--vllm-block-size": "SDM_VLLM_BLOCK_SIZE",
        # issue 18's OpenTelemetry tracing
        "--otlp-traces-endpoint": "SDM_OTLP_TRACES_ENDPOINT",
        "--otel-service-name": "SDM_OTEL_SERVICE_NAME",
        # issue 18's several adapter bundles on one base model
        "--extra-bundles": "SDM_EXTRA_BUNDLES",
        # issue 18: the transformers backend's batches wait for the clients just answered
        "--batch-rejoin-ms": "SDM_BATCH_REJOIN_MS",
    },
    # issue 14's in-epoch refits of the training-set SDM layer
    "training.finetune": {"--train-layer-refit-steps": "SDM_TRAIN_LAYER_REFIT_STEPS"},
}


class _Captured(Exception):
    pass


def parser_of(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught as it starts parsing (whatever function builds it)."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> argparse.Namespace:
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(module).main([])
    return seen[0]


def flags_of(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(flags_of(sub, f"{prefix}{name} "))
            continue
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                named = re.findall(r"\b(SDM_[A-Z0-9_]+)\b", action.help or "")
                found[prefix + flag] = named[0] if named else None
    return found


@pytest.mark.parametrize("module", sorted(SNAPSHOT))
def test_every_flag_and_variable_keeps_its_name(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    now = flags_of(parser_of(module, monkeypatch))
    before = {**SNAPSHOT[module], **ADDED_VARIABLES.get(module, {})}
    assert sorted(set(before) - set(now)) == [], "flags that disappeared"
    assert sorted(set(now) - set(before)) == [], "new flags: add them to the snapshot"
    assert {f: v for f, v in now.items() if before[f] != v} == {}, "flags whose variable changed"
