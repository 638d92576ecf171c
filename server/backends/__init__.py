"""Generation backends behind one interface (:class:`Backend`): ``transformers`` (CPU/GPU) and ``vllm``."""

from __future__ import annotations

from server.backends.base import (
    Backend,
    BackendError,
    BatchObserver,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)

__all__ = [
    "Backend",
    "BackendError",
    "BatchObserver",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "make_backend",
]


def make_backend(
    kind: str,
    bundle_path: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    batch_rejoin_ms: float = 250.0,
    verify: bool = True,
    observer: BatchObserver | None = None,
    vllm: dict | None = None,
    hidden_states: str = "auto",
    adapters: bool = False,
    adapter_bundles: tuple[str, ...] = (),
) -> Backend:
    """An unloaded backend of ``kind`` ("transformers" or "vllm") for ``bundle_path``; ``vllm`` holds the vllm
    backend's ``max_model_len``, ``engine_args`` and ``head_input``; ``hidden_states`` is the transformers backend's
    source of head inputs (``auto``, ``reuse`` or ``forward``); ``adapters`` makes an engine that holds the LoRA
    adapters of several bundles (server/backends/adapters.py), ``adapter_bundles`` being the others served at start
    (the vLLM engine is sized for them); ``batch_rejoin_ms`` is the transformers backend's only (vLLM batches
    continuously)."""
    settings = dict(
        device=device, dtype=dtype, batch_size=batch_size, batch_wait_ms=batch_wait_ms, verify=verify, observer=observer
    )
    if kind == "transformers":
        from server.backends.transformers_backend import TransformersBackend

        return TransformersBackend(
            bundle_path, **settings, hidden_states=hidden_states, adapters=adapters, batch_rejoin_ms=batch_rejoin_ms
        )
    if kind == "vllm":
        from server.backends.vllm_backend import VLLMBackend

        return VLLMBackend(
            bundle_path,
            **settings,
            **(vllm or {}),
            adapters=adapters,
            adapter_bundles=adapter_bundles,
            generation_states=hidden_states != "forward",
        )
    raise BackendError(f"unknown backend {kind!r}; use 'transformers' or 'vllm'")
