"""sdm_core.settings: one dataclass-to-command-line helper for every CLI (flags, SDM_* variables, presets, nesting)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sdm_core import SDMConfig
from sdm_core.settings import (
    CommandLine,
    SettingsError,
    build,
    flatten,
    group,
    options,
    parse_device,
    parse_text,
    setting,
)


@dataclass(frozen=True)
class Example:
    name: str = setting("x", help="a name")
    count: int = setting(1, help="a count")
    rate: float = setting(0.5, help="a rate")
    on: bool = setting(False, help="a switch")
    words: tuple[str, ...] = setting(("a", "b"), help="comma-separated words")
    limit: float | None = setting(None, help="an optional limit")
    sdm: SDMConfig = group(
        SDMConfig,
        {
            "sdm_epochs": ("epochs", "head epochs"),
            "alpha": ("alpha", "head alpha"),
            "alphas": ("alpha_ladder", "head ladder"),
        },
        epochs=7,
    )

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


PRESETS = {"small": {"count": 2, "rate": 0.25, "sdm_epochs": 3}}
LINE = CommandLine(Example, prog="example", env_prefix="SDM_EXAMPLE_", presets=PRESETS)


def test_precedence_is_default_then_preset_then_variable_then_flag() -> None:
    env = {"SDM_EXAMPLE_PRESET": "small", "SDM_EXAMPLE_RATE": "0.75", "SDM_EXAMPLE_SDM_EPOCHS": "4"}
    config = LINE.parse(["--sdm-epochs", "5"], env)
    assert config.name == "x"  # default
    assert config.count == 2  # preset
    assert config.rate == 0.75  # variable over preset
    assert config.sdm.epochs == 5  # flag over variable over preset
    assert LINE.parse(["--preset", "small"], {}).sdm.epochs == 3
    assert LINE.parse([], {}).sdm.epochs == 7  # the group's own default for this use


def test_text_is_parsed_by_the_annotation() -> None:
    config = LINE.parse(
        ["--on", "yes", "--words", " p, q ,,r", "--limit", "none", "--alphas", "0.99,0.9"], {"SDM_EXAMPLE_COUNT": "12"}
    )
    assert config.on is True and config.count == 12 and config.words == ("p", "q", "r") and config.limit is None
    assert config.sdm.alpha_ladder == (0.99, 0.95, 0.9)  # SDMConfig puts its alpha on the ladder
    assert LINE.parse(["--limit", "2.5", "--on", "off"], {}).limit == 2.5
    assert parse_text(Example, "sdm_epochs", "9") == 9


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        (["--count", "many"], {}, "--count must be an integer, got 'many'"),
        ([], {"SDM_EXAMPLE_RATE": "fast"}, "SDM_EXAMPLE_RATE must be a number"),
        ([], {"SDM_EXAMPLE_ON": "maybe"}, "SDM_EXAMPLE_ON must be one of 1/true/yes/on/0/false/no/off"),
        ([], {"SDM_EXAMPLE_PRESET": "huge"}, "SDM_EXAMPLE_PRESET must be one of small"),
    ],
)
def test_a_bad_value_names_where_it_came_from(argv, env, fragment) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        LINE.parse(argv, env)


def test_validation_stays_with_the_class_and_names_the_flags_of_a_group() -> None:
    with pytest.raises(ValueError, match="count must be >= 0"):
        LINE.parse(["--count", "-1"], {})
    with pytest.raises(ValueError, match=r"alpha must be in \(0.5, 1\].*--alpha"):
        LINE.parse(["--alpha", "0.4"], {})


def test_an_empty_variable_counts_as_unset() -> None:
    assert LINE.parse([], {"SDM_EXAMPLE_COUNT": "", "SDM_EXAMPLE_NAME": ""}).count == 1


def test_build_and_flatten_use_the_flat_names() -> None:
    config = build(Example, {"count": 3, "sdm_epochs": 2, "alpha": 0.9})
    assert config.sdm.epochs == 2 and config.sdm.alpha == 0.9
    flat = flatten(config)
    assert set(flat) == {"name", "count", "rate", "on", "words", "limit", "sdm_epochs", "alpha", "alphas"}
    assert flat["words"] == ["a", "b"] and build(Example, {**flat, "words": tuple(flat["words"])}).sdm == config.sdm
    with pytest.raises(SettingsError, match="no setting"):
        build(Example, {"epochs": 2})


def test_help_names_each_variable_and_default() -> None:
    text = " ".join(LINE.parser().format_help().split())
    assert "head epochs [env SDM_EXAMPLE_SDM_EPOCHS; default 7]" in text
    assert "a count [env SDM_EXAMPLE_COUNT; default 1]" in text
    assert "--preset {small}" in text


def test_switches_make_bool_flags_on_and_off() -> None:
    line = CommandLine(Example, prog="example", switches=True)
    assert line.parse(["--on"], {}).on is True and line.parse(["--no-on"], {"SDM_ON": "1"}).on is False
    assert line.parse([], {"SDM_ON": "1"}).on is True


def test_a_field_without_help_is_refused() -> None:
    @dataclass(frozen=True)
    class Bare:
        size: int = 1

    with pytest.raises(TypeError, match="has no help line"):
        options(Bare)


@pytest.mark.parametrize(
    "text, device", [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")]
)
def test_device_names_are_normalised(text: str, device: str) -> None:
    assert parse_device(text) == device


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "tpu"])
def test_unknown_devices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        parse_device(text)


def test_every_cli_settings_class_declares_help_for_every_flag() -> None:
    from server.config import ServerConfig
    from training.calibrate_config import CalibrateConfig
    from training.certify import CertifyConfig
    from training.config import FinetuneConfig
    from training.evaluate import EvaluateConfig

    for cls in (ServerConfig, FinetuneConfig, CalibrateConfig, EvaluateConfig, CertifyConfig):
        assert all(option.help.strip() for option in options(cls)), cls.__name__


def test_finetune_settings_nest_the_sdm_layers_and_keep_the_flat_record() -> None:
    from training.config import FINETUNE, PRESETS, FinetuneConfig

    config = FINETUNE.parse(["--preset", "tiny", "--sdm-learning-rate", "0.002"], {"SDM_ALPHA": "0.9"})
    assert isinstance(config.sdm, SDMConfig)
    assert (config.sdm.epochs, config.sdm.exemplar_dim, config.sdm.learning_rate, config.sdm.alpha) == (
        PRESETS["tiny"]["sdm_epochs"],
        PRESETS["tiny"]["sdm_exemplar_dim"],
        0.002,
        0.9,
    )
    record = config.to_dict()  # config.json: the same flat keys as before the nesting
    assert {"sdm_epochs", "sdm_exemplar_dim", "sdm_batch_size", "sdm_learning_rate", "alpha"} <= set(record)
    assert "sdm" not in record and record["sdm_learning_rate"] == 0.002
    assert (
        build(
            FinetuneConfig,
            {
                **record,
                "lora_targets": tuple(record["lora_targets"]),
                "task_operations": tuple(record["task_operations"]),
            },
        )
        == config
    )


def test_update_takes_repeated_head_versions_times_and_its_store_from_the_environment() -> None:
    from training.update import COMMAND_LINE, UpdateError

    env = {"SDM_UPDATE_STORE": "sqlite:////tmp/traffic.sqlite3", "SDM_UPDATE_SINCE": "2026-12-01T00:00:00"}
    config = COMMAND_LINE.parse(
        ["--bundle", "b", "--out", "o", "--head-version", "v1", "--head-version", "v2,v3", "--until", "1796169600"], env
    )
    assert config.store == "sqlite:////tmp/traffic.sqlite3" and config.head_versions == ("v1", "v2", "v3")
    assert config.since == 1796083200.0 and config.until == 1796169600.0  # a time without a zone is UTC
    with pytest.raises(SettingsError, match="SDM_UPDATE_SINCE: expected an ISO time"):
        COMMAND_LINE.parse(["--bundle", "b", "--out", "o"], {**env, "SDM_UPDATE_SINCE": "yesterday"})
    with pytest.raises(UpdateError, match="--store is required"):
        COMMAND_LINE.parse(["--bundle", "b", "--out", "o"], {})


def test_seal_needs_a_bundle() -> None:
    from training.seal import COMMAND_LINE

    assert COMMAND_LINE.parse([], {"SDM_SEAL_BUNDLE": "b", "SDM_SEAL_NOTE": "hand edit"}).note == "hand edit"
    with pytest.raises(ValueError, match="--bundle .* is required"):
        COMMAND_LINE.parse(["--note", "x"], {})
