"""Server building blocks without a model: config, batcher, admission, stop strings and streaming, seeds, logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_server_support import ROOT  # noqa: F401  (sets the cache environment)


@pytest.fixture()
def fake_bundle(tmp_path: Path) -> Path:
    (tmp_path / "bundle.json").write_text("{}")
    return tmp_path


# -- configuration ------------------------------------------------------------------------------------------------
def test_config_flags_win_over_environment(fake_bundle: Path, tmp_path: Path) -> None:
    from server.config import ServerConfig

    keys = tmp_path / "keys.txt"
    keys.write_text("# ops keys\nfile-key\n\n")
    env = {"SDM_BUNDLE": str(fake_bundle), "SDM_PORT": "9000", "SDM_API_KEYS": "a, b", "SDM_WARMUP": "false", "SDM_BATCH_WAIT_MS": "2.5"}
    config = ServerConfig.from_sources(["--port", "9100", "--api-key-file", str(keys), "--no-metrics-require-key"], env)
    assert config.port == 9100  # flag wins
    assert config.bundle == str(fake_bundle)  # from the environment
    assert config.warmup is False and config.batch_wait_ms == 2.5 and config.metrics_require_key is False
    assert config.api_keys == ("a", "b", "file-key")
    assert config.to_dict()["api_keys"] == ["<3 keys>"]  # never logged in clear
    assert ServerConfig.from_sources([], {"SDM_BUNDLE": str(fake_bundle)}).port == 8000


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        ([], {}, "--bundle (env SDM_BUNDLE) is required"),
        (["--bundle", "/nonexistent/bundle"], {}, "does not exist"),
        (["--port", "70000"], {"SDM_BUNDLE": "@"}, "--port (env SDM_PORT) must be between 1 and 65535"),
        ([], {"SDM_BUNDLE": "@", "SDM_PORT": "eighty"}, "SDM_PORT must be an integer"),
        (["--max-tokens-cap", "8", "--default-max-tokens", "16"], {"SDM_BUNDLE": "@"}, "must not exceed --max-tokens-cap"),
        (["--batch-size", "0"], {"SDM_BUNDLE": "@"}, "--batch-size (env SDM_BATCH_SIZE) must be an integer >= 1"),
        (["--device", "tpu"], {"SDM_BUNDLE": "@"}, "--device (env SDM_DEVICE) must be auto, cpu"),
        (["--api-key-file", "/nonexistent/keys"], {"SDM_BUNDLE": "@"}, "--api-key-file (env SDM_API_KEY_FILE)"),
        ([], {"SDM_BUNDLE": "@", "SDM_WARMUP": "maybe"}, "SDM_WARMUP must be one of"),
        (["--request-timeout-s", "0"], {"SDM_BUNDLE": "@"}, "must be > 0 seconds"),
        ([], {"SDM_BUNDLE": "@", "SDM_VLLM_GPU_MEMORY_UTILIZATION": "1.5"}, "SDM_VLLM_GPU_MEMORY_UTILIZATION) must be in [0, 1)"),
        (["--vllm-tensor-parallel-size", "0"], {"SDM_BUNDLE": "@"}, "--vllm-tensor-parallel-size (env SDM_VLLM_TENSOR_PARALLEL_SIZE)"),
        (["--vllm-max-model-len", "-1"], {"SDM_BUNDLE": "@"}, "--vllm-max-model-len (env SDM_VLLM_MAX_MODEL_LEN) must be an integer >= 0"),
    ],
)
def test_config_errors_say_what_to_do(fake_bundle: Path, argv, env, fragment) -> None:
    from server.config import ConfigError, ServerConfig

    environ = {k: (str(fake_bundle) if v == "@" else v) for k, v in env.items()}
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_sources(argv, environ)
    assert fragment in str(info.value)


def test_vllm_settings_pass_only_what_was_set(fake_bundle: Path) -> None:
    from server.config import ServerConfig

    assert ServerConfig(bundle=str(fake_bundle)).vllm_settings() == {"max_model_len": None, "engine_args": {}}
    config = ServerConfig.from_sources(["--vllm-max-model-len", "512"], {"SDM_BUNDLE": str(fake_bundle),
                                        "SDM_VLLM_GPU_MEMORY_UTILIZATION": "0.7", "SDM_VLLM_TENSOR_PARALLEL_SIZE": "2"})
    assert config.vllm_settings() == {"max_model_len": 512, "engine_args": {"gpu_memory_utilization": 0.7, "tensor_parallel_size": 2}}


def test_help_lists_every_setting_and_its_variable(capsys) -> None:
    from dataclasses import fields

    from server.config import ServerConfig, build_parser

    text = build_parser().format_help()
    for f in fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"SDM_{f.name.upper()}" in text.replace("\n", "").replace(" ", "")


def test_cli_reports_config_errors_with_exit_code_2(capsys) -> None:
    from server.cli import main

    assert main(["--bundle", "/nonexistent/bundle"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- dynamic batching ---------------------------------------------------------------------------------------------
def test_batcher_groups_concurrent_items_and_keeps_order() -> None:
    from server.batching import DynamicBatcher

    batches: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.01)
        return [i * 10 for i in items]

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=4, max_wait_s=0.05)
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            await batcher.close()
            return results

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert max(len(b) for b in batches) == 4 and sum(len(b) for b in batches) == 10
    assert len(batches) <= 4


def test_batcher_skips_cancelled_items_and_reports_errors() -> None:
    from server.batching import DynamicBatcher

    seen: list[int] = []

    def process(items: list[int]) -> list[int]:
        seen.extend(items)
        if 99 in items:
            raise RuntimeError("boom")
        return items

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(process, pool, max_batch=8, max_wait_s=0.05)
            dropped = asyncio.ensure_future(batcher.submit(1))
            kept = asyncio.ensure_future(batcher.submit(2))
            await asyncio.sleep(0)
            dropped.cancel()
            assert await kept == 2
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(99)
            await batcher.close()

    asyncio.run(main())
    assert 1 not in seen


# -- admission ----------------------------------------------------------------------------------------------------
def test_admission_queues_then_refuses_with_retry_after() -> None:
    from server.admission import AdmissionController, Overloaded

    changes: list[tuple[int, int]] = []

    async def main() -> None:
        gate = AdmissionController(1, 1, lambda a, w: changes.append((a, w)))
        assert await gate.acquire() == 0.0
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        with pytest.raises(Overloaded) as info:
            await gate.acquire()
        assert 1 <= info.value.retry_after_s <= 60
        gate.release(0.5)
        assert await waiter >= 0.0 and gate.active == 1
        gate.release()
        assert gate.active == 0
        # a cancelled waiter leaves the queue
        await gate.acquire()
        cancelled = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert gate.waiting == 0
        gate.release()
        assert gate.active == 0

    asyncio.run(main())
    assert (1, 1) in changes


# -- stop strings and streaming -------------------------------------------------------------------------------------
def _run_rows(tokenizer, text: str, stop=(), inclusive=("<verified>",), max_tokens=64, cancel_at=None):
    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow
    from server.backends.transformers_backend import _RowStopper

    deltas: list[str] = []
    prompt = [1, 2, 3]
    request = GenerationRequest(prompt, SamplingParams(max_tokens), stop=tuple(stop), stop_inclusive=tuple(inclusive), on_text=deltas.append)
    row = GenerationRow(request)
    stopper = _RowStopper([row], tokenizer, {tokenizer.eos_token_id}, len(prompt))
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    for step, token in enumerate(tokens, start=1):
        if cancel_at == step:
            request.cancel.set()
        ids = torch.tensor([prompt + tokens[:step]])
        if bool(stopper(ids, None)[0]):
            break
    return row.result(), "".join(deltas), row


def test_generation_stops_at_verified_tag_and_streams_a_prefix(tiny_tokenizer) -> None:
    result, streamed, _ = _run_rows(tiny_tokenizer, "The words in order: a b c\n<verified>Yes</verified> trailing")
    assert result.text == "The words in order: a b c\n<verified>"
    assert result.finish_reason == "stop" and result.stop_reason == "<verified>"
    assert result.text.startswith(streamed) and streamed.startswith("The words")


def test_user_stop_strings_are_cut_and_never_streamed(tiny_tokenizer) -> None:
    result, streamed, _ = _run_rows(tiny_tokenizer, "alpha beta STOP gamma <verified>", stop=("STOP",))
    assert result.text == "alpha beta " and result.stop_reason == "STOP"
    assert "STOP" not in streamed and result.text.startswith(streamed)


def test_max_tokens_eos_and_cancel_end_a_row(tiny_tokenizer) -> None:
    result, _, row = _run_rows(tiny_tokenizer, "one two three four five six", max_tokens=3)
    assert result.finish_reason == "length" and result.completion_tokens == 3
    eos = tiny_tokenizer.eos_token
    result, _, _ = _run_rows(tiny_tokenizer, f"done{eos}more")
    assert result.finish_reason == "stop" and result.stop_reason == "eos" and result.text == "done"
    result, _, _ = _run_rows(tiny_tokenizer, "one two three four five six", cancel_at=2)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 2


def test_sampler_is_seeded_per_row_and_respects_top_p() -> None:
    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.row import GenerationRow
    from server.backends.transformers_backend import _RowSampler

    scores = torch.randn(3, 50)

    def draw(params_list):
        rows = [GenerationRow(GenerationRequest([1], p)) for p in params_list]
        out = _RowSampler(rows)(torch.zeros(len(rows), 1, dtype=torch.long), scores[: len(rows)].clone())
        return out.argmax(dim=1).tolist(), out

    first, out = draw([SamplingParams(4, 0.0), SamplingParams(4, 1.0, seed=7), SamplingParams(4, 1.0, 0.01, seed=3)])
    assert first[0] == int(scores[0].argmax())  # greedy rows untouched
    assert torch.equal(out[0], scores[0])
    assert first[2] == int(scores[2].argmax())  # top_p this small keeps only the argmax
    again, _ = draw([SamplingParams(4, 0.0), SamplingParams(4, 1.0, seed=7)])
    assert again[1] == first[1]  # same seed, same draw, whatever the batch


def test_derived_seeds_differ_per_attempt() -> None:
    from server.pipeline import derive_seed

    assert derive_seed(5, 0) == 5 and derive_seed(None, 3) is None
    seeds = {derive_seed(5, k) for k in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


# -- logs ---------------------------------------------------------------------------------------------------------
def test_json_logs_carry_the_request_id() -> None:
    from server.logs import JsonFormatter, RequestIdFilter, request_id_var

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("sdm.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        token = request_id_var.set("req-abc")
        logger.info("inside", extra={"route": "/generate"})
        request_id_var.reset(token)
        logger.info("outside")
        seen = []
        thread = threading.Thread(target=lambda: logger.info("thread"))
        thread.start()
        thread.join()
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["request_id"] == "req-abc" and lines[0]["route"] == "/generate" and lines[0]["message"] == "inside"
    assert lines[1]["request_id"] is None and not seen


# -- structure ----------------------------------------------------------------------------------------------------
def test_server_never_imports_training() -> None:
    import ast

    for path in (ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "training" or n.startswith("training.") for n in names), f"{path} imports {names}"


def test_vllm_backend_explains_what_is_missing(fake_bundle: Path) -> None:
    import importlib.util

    from server.backends import BackendError, make_backend
    from server.config import ConfigError, ServerConfig

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(BackendError, match="pip install 'sdm-lm\\[vllm\\]'"):
        make_backend("vllm", str(fake_bundle))
    with pytest.raises(ConfigError, match="--backend"):
        ServerConfig(bundle=str(fake_bundle), backend="vllm").check_runtime()


def test_openapi_documents_every_route(fake_bundle: Path) -> None:
    from server.app import ROUTES, create_app
    from server.config import ServerConfig

    schema = create_app(ServerConfig(bundle=str(fake_bundle), device="cpu")).openapi()
    assert set(ROUTES) <= set(schema["paths"])
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "messages", "alpha", "on_abstain", "return_exemplars", "max_attempts"} <= set(body["properties"])
    assert "ChatMessage" in schema["components"]["schemas"]
