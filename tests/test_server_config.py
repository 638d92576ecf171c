"""server.config: flags mirrored by SDM_* variables, validated in one place, with errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_config_flags_win_over_environment(fake_bundle: Path, tmp_path: Path) -> None:
    from server.config import ServerConfig

    keys = tmp_path / "keys.txt"
    keys.write_text("# ops keys\nfile-key\n\n")
    env = {
        "SDM_BUNDLE": str(fake_bundle),
        "SDM_PORT": "9000",
        "SDM_API_KEYS": "a, b",
        "SDM_WARMUP": "false",
        "SDM_BATCH_WAIT_MS": "2.5",
    }
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
        (
            ["--max-tokens-cap", "8", "--default-max-tokens", "16"],
            {"SDM_BUNDLE": "@"},
            "must not exceed --max-tokens-cap",
        ),
        (["--batch-size", "0"], {"SDM_BUNDLE": "@"}, "--batch-size (env SDM_BATCH_SIZE) must be an integer >= 1"),
        (["--device", "tpu"], {"SDM_BUNDLE": "@"}, "--device (env SDM_DEVICE) must be auto, cpu"),
        (["--api-key-file", "/nonexistent/keys"], {"SDM_BUNDLE": "@"}, "--api-key-file (env SDM_API_KEY_FILE)"),
        ([], {"SDM_BUNDLE": "@", "SDM_WARMUP": "maybe"}, "SDM_WARMUP must be one of"),
        (["--request-timeout-s", "0"], {"SDM_BUNDLE": "@"}, "must be > 0 seconds"),
        (
            [],
            {"SDM_BUNDLE": "@", "SDM_VLLM_GPU_MEMORY_UTILIZATION": "1.5"},
            "SDM_VLLM_GPU_MEMORY_UTILIZATION) must be in [0, 1)",
        ),
        (
            ["--vllm-tensor-parallel-size", "0"],
            {"SDM_BUNDLE": "@"},
            "--vllm-tensor-parallel-size (env SDM_VLLM_TENSOR_PARALLEL_SIZE)",
        ),
        (
            ["--vllm-max-model-len", "-1"],
            {"SDM_BUNDLE": "@"},
            "--vllm-max-model-len (env SDM_VLLM_MAX_MODEL_LEN) must be an integer >= 0",
        ),
        (
            ["--vllm-max-num-seqs", "-1"],
            {"SDM_BUNDLE": "@"},
            "--vllm-max-num-seqs (env SDM_VLLM_MAX_NUM_SEQS) must be an integer >= 0",
        ),
        (
            [],
            {"SDM_BUNDLE": "@", "SDM_VLLM_BLOCK_SIZE": "-32"},
            "--vllm-block-size (env SDM_VLLM_BLOCK_SIZE) must be an integer >= 0",
        ),
        (
            [],
            {"SDM_BUNDLE": "@", "SDM_VLLM_HIDDEN_STATES": "pooling"},
            "--vllm-hidden-states (env SDM_VLLM_HIDDEN_STATES) must be one of auto, engine, transformers",
        ),
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

    assert ServerConfig(bundle=str(fake_bundle)).vllm_settings() == {
        "max_model_len": None,
        "engine_args": {},
        "head_input": "auto",
    }
    config = ServerConfig.from_sources(
        ["--vllm-max-model-len", "512"],
        {
            "SDM_BUNDLE": str(fake_bundle),
            "SDM_VLLM_GPU_MEMORY_UTILIZATION": "0.7",
            "SDM_VLLM_TENSOR_PARALLEL_SIZE": "2",
            "SDM_VLLM_BLOCK_SIZE": "32",
        },
    )
    assert config.vllm_settings() == {
        "max_model_len": 512,
        "engine_args": {"gpu_memory_utilization": 0.7, "tensor_parallel_size": 2, "block_size": 32},
        "head_input": "auto",
    }
    config = ServerConfig.from_sources(
        ["--vllm-enforce-eager", "--vllm-hidden-states", "transformers"],
        {"SDM_BUNDLE": str(fake_bundle), "SDM_VLLM_MAX_NUM_SEQS": "32"},
    )
    assert config.vllm_settings() == {
        "max_model_len": None,
        "engine_args": {"enforce_eager": True, "max_num_seqs": 32},
        "head_input": "transformers",
    }
    eager = ServerConfig.from_sources(
        [], {"SDM_BUNDLE": str(fake_bundle), "SDM_VLLM_ENFORCE_EAGER": "true", "SDM_VLLM_HIDDEN_STATES": "engine"}
    )
    assert (
        eager.vllm_settings()["engine_args"] == {"enforce_eager": True}
        and eager.vllm_settings()["head_input"] == "engine"
    )


def test_help_lists_every_setting_and_its_variable(capsys) -> None:
    from dataclasses import fields

    from server.config import ServerConfig, build_parser

    text = build_parser().format_help()
    for f in fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"SDM_{f.name.upper()}" in text.replace("\n", "").replace(" ", "")
