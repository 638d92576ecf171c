"""The backend interface: what the verification pipeline needs from a language model.

A backend owns a loaded bundle (LM, tokenizer, SDM head, bundle.json). It generates (batched across concurrent
requests, each with its own sampling parameters and stop strings) and computes the SDM head's input with
:func:`sdm_core.lm.embedding.embed_texts` and the bundle's :class:`~sdm_core.lm.embedding.HiddenStateRecipe`, exactly as
at training time.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from sdm_core.estimator import SDMEstimator
from sdm_core.lm.bundle import BundleInfo
from sdm_core.lm.embedding import chat_messages

__all__ = ["Backend", "SamplingParams", "GenerationRequest", "GenerationResult", "BackendError", "BatchObserver"]

# (kind, size): called once per batch a backend runs ("generate" or "embed"), and with "reused" for head inputs
# pooled from states captured while generating (no batch ran for those).
BatchObserver = Callable[[str, int], None]


# Temperatures below this sample greedily (vLLM's own threshold, _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


class BackendError(RuntimeError):
    """The backend could not load or run."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature`` below :data:`GREEDY_BELOW` is greedy (as vLLM treats it: dividing
    logits by a vanishing temperature overflows to inf); ``seed`` None draws a fresh random seed."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationRequest:
    """One generation. ``stop`` strings end the text and are cut off; ``stop_inclusive`` ones (the verification
    tag) end it and are kept. ``on_text`` receives streamed text deltas (from a worker thread); setting ``cancel``
    stops the generation at its next token. ``adapter`` names the LoRA adapter to generate with on a backend that
    holds several (server/backends/adapters.py); None: the backend's own model. ``record_states``: the caller passes
    the result to ``embed_generation`` (which frees them), so a backend that keeps the generation's states outside
    the result (the vLLM engine's worker) may record them."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stop_inclusive: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None
    record_states: bool = False


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the completion, cut at the first stop string (inclusive ones kept)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop string or EOS), "length" (max_tokens) or "cancelled"
    stop_reason: str | None = None  # the stop string that ended it, "eos", or None
    # The generated token ids and, when the backend captured them while generating, the final-layer states
    # (after the final norm) of the prompt tokens followed by as many generated tokens as were fed back (T, H).
    # Not part of equality: results compare by what was generated, whichever backend produced them.
    token_ids: tuple[int, ...] = field(default=(), compare=False)
    states: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # time.perf_counter() when the first token and the last came (None: no token), for TTFT and time per token.
    first_token_at: float | None = field(default=None, compare=False)
    last_token_at: float | None = field(default=None, compare=False)
    # The vLLM backend's handle on the states its engine recorded while generating (the head input reads them), and
    # how many positions (prompt, then generated tokens) they cover: every token the engine fed back.
    states_id: str | None = field(default=None, compare=False)
    states_positions: int = field(default=0, compare=False)


class Backend(ABC):
    """A loaded bundle behind generation and hidden-state methods. Create, then ``await load()``."""

    bundle_path: str

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @abstractmethod
    async def load(self) -> None:
        """Load the bundle (idempotent). Raises on an invalid bundle."""

    @abstractmethod
    async def close(self) -> None:
        """Release the model and stop background work."""

    @abstractmethod
    def with_bundle(self, bundle_path: str) -> Backend:
        """A new, unloaded backend of the same kind and settings for another bundle (used by reload)."""

    @property
    @abstractmethod
    def loaded(self) -> bool: ...

    # -- what the pipeline reads -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def info(self) -> BundleInfo: ...

    @property
    @abstractmethod
    def head(self) -> SDMEstimator: ...

    @property
    @abstractmethod
    def tokenizer(self):
        """A tokenizer safe to use from the event loop thread (never the one a worker thread uses)."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + completion the model accepts, in tokens."""

    # -- work --------------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str | Sequence[dict]) -> str:
        """The chat-templated prompt generation continues (the bundle's chat format, as training rendered it)."""
        messages = chat_messages(prompt, self.info.chat)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, without added special tokens (the template carries them; decisions.md §7.15)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one completion, batched with concurrent calls. Cancelling the caller cancels the generation."""

    @abstractmethod
    async def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 head inputs for rendered verification texts: ``embed_texts`` with the bundle's recipe."""

    async def embed_generation(
        self, text: str, prompt_ids: Sequence[int], generation: GenerationResult
    ) -> torch.Tensor:
        """(1, D) head input for the verification text of a generation. Backends that keep the states of the
        generation's own forward passes reuse them when they cover exactly the text's tokens; this default runs
        the separate hidden-state pass."""
        return await self.embed([text])
