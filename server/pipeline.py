"""The verification flow of one request (SDM_SPEC §4): generate until ``<verified>``, build the verification text
exactly as training did, embed it with the bundle's recipe, score it with the SDM head at the requested alpha, and
force-decode the verification tag from the head's prediction.

The returned text is the generation up to and including ``<verified>`` (``"\\n<verified>"`` appended when the
model did not write it, as training's normaliser does) followed by the forced tag (``Yes</verified>`` or
``No</verified>``). An output is admitted iff the head admits its prediction at alpha and the prediction is the
positive class; an admitted ``No`` abstains with reason ``predicted_no``.

Size: the flow and the records it passes between its steps (draft, request, attempt, result) read best together.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from sdm_core.estimator import SDMScores
from sdm_core.lm.embedding import verification_prefix, verification_text
from sdm_core.support import OOD_LABEL
from server.backends.base import GREEDY_BELOW, Backend, GenerationRequest, GenerationResult, SamplingParams
from server.tracing import Tracing

__all__ = [
    "PreparedPrompt",
    "VerificationDraft",
    "VerificationRequest",
    "Attempt",
    "VerificationResult",
    "SelectivePipeline",
    "derive_seed",
]


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as the pipeline uses it: the chat prompt (a user string or messages), its rendering, its tokens."""

    prompt: str | tuple[dict, ...]
    text: str
    ids: tuple[int, ...]

    @property
    def chat_prompt(self) -> str | list[dict]:
        return self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]


@dataclass(frozen=True)
class VerificationDraft:
    """A request of any route as the pipeline will run it, before its prompt is rendered and tokenized (that waits
    for an admission slot). ``prompt_param`` and ``tokens_param`` name the request fields errors point at."""

    prompt: str | list[dict]
    prompt_param: str
    max_tokens: int
    tokens_param: str = "max_tokens"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    alpha: float | None = None
    on_abstain: str = "flag"
    return_exemplars: int = 0
    max_attempts: int = 1

    def prepared(self, prompt: PreparedPrompt) -> VerificationRequest:
        """The request to run, with the rendered and tokenized prompt."""
        return VerificationRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            alpha=self.alpha,
            on_abstain=self.on_abstain,
            return_exemplars=self.return_exemplars,
            max_attempts=self.max_attempts,
        )


@dataclass(frozen=True)
class VerificationRequest:
    prompt: PreparedPrompt
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    alpha: float | None = None
    on_abstain: str = "flag"
    return_exemplars: int = 0
    max_attempts: int = 1


@dataclass
class Attempt:
    """One generation and its verification."""

    generation: GenerationResult
    verification_text: str
    embedding: torch.Tensor
    prediction: int
    verified: str
    text: str
    probability: float
    probability_lower: float
    head_admitted: bool
    admitted: bool
    abstention_reason: str | None
    region_alpha: float | None
    q: int
    q_prime: float
    d: float
    exemplars: list[dict]
    generation_ms: float
    verification_ms: float
    # Tokens of what the server writes after the model's text (the forced tag, and the opening tag when the model did
    # not write it), tokenized on their own: they are part of the returned text, so ``usage`` counts them.
    written_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return self.generation.completion_tokens + self.written_tokens


@dataclass
class VerificationResult:
    """The answer to one request: the best attempt by (admitted, probability), whose verification it reports, and
    what holds over all attempts."""

    best: Attempt
    all_attempts: list[Attempt]
    alpha: float
    withheld: bool  # on_abstain = withhold and the best attempt abstained: no text is returned
    prompt_tokens: int

    @property
    def text(self) -> str | None:
        return None if self.withheld else self.best.text

    @property
    def abstained(self) -> bool:
        return not self.best.admitted

    @property
    def attempts(self) -> int:
        return len(self.all_attempts)

    @property
    def finish_reason(self) -> str:
        return "length" if self.best.generation.finish_reason == "length" else "stop"

    @property
    def completion_tokens(self) -> int:
        """Of the returned attempt (``usage``): the tokens it generated and the tag tokens the server wrote."""
        return self.best.completion_tokens

    @property
    def completion_tokens_all_attempts(self) -> int:
        return sum(a.completion_tokens for a in self.all_attempts)

    @property
    def generation_ms(self) -> float:
        return sum(a.generation_ms for a in self.all_attempts)

    @property
    def verification_ms(self) -> float:
        return sum(a.verification_ms for a in self.all_attempts)


def derive_seed(seed: int | None, attempt: int) -> int | None:
    """Attempt 0 uses the request's seed; later attempts a seed derived from it (None stays random)."""
    if seed is None or attempt == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SelectivePipeline:
    """The verification flow over one loaded backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.info = backend.info
        self.head = backend.head
        self.tags = backend.info.tags
        self.class_names = list(self.head.class_names)
        # The head is scored on its own thread: off the event loop, and never concurrently with itself.
        self._head_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdm-head")
        # Prompts are rendered and tokenized on their own thread too: a long prompt costs hundreds of milliseconds.
        self._prompt_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdm-prompt")
        tokenizer = backend.tokenizer
        # Every string the tokenizer turns into a control token wherever it appears (chat markers, EOS, ...).
        self.special_tokens: tuple[str, ...] = tuple(
            sorted(
                {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
                | {
                    str(t.content)
                    for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                    if getattr(t, "special", False)
                },
                key=len,
                reverse=True,
            )
        )
        # No token covers more characters than its longest vocabulary entry (byte-level entries hold one character
        # per byte), so text longer than max_tokens * this has more than max_tokens tokens: a check without tokenizing.
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_chars_per_token: int = max((len(t) for t in vocab), default=0) or 64
        # The written suffixes are a handful of strings (each tag, with or without the opening tag before it).
        self._written_token_counts: dict[str, int] = {}

    def close(self) -> None:
        self._head_thread.shutdown(wait=False, cancel_futures=True)
        self._prompt_thread.shutdown(wait=False, cancel_futures=True)

    # -- preparation ----------------------------------------------------------------------------------------------
    def prepare(self, prompt: str | Sequence[dict]) -> PreparedPrompt:
        """Render and tokenize (blocking: call :meth:`prepare_async` from the event loop)."""
        text = self.backend.render_prompt(prompt)
        ids = self.backend.encode(text)
        frozen = prompt if isinstance(prompt, str) else tuple(dict(m) for m in prompt)
        return PreparedPrompt(frozen, text, tuple(ids))

    async def prepare_async(self, prompt: str | Sequence[dict]) -> PreparedPrompt:
        """:meth:`prepare` on the prompt thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prompt_thread, self.prepare, prompt)

    def special_token_in(self, text: str) -> str | None:
        """The first special token in ``text`` (it would be tokenized as a control token), or None."""
        found = [(text.find(token), token) for token in self.special_tokens if token in text]
        return min(found)[1] if found else None

    def resolve_alpha(self, alpha: float | None) -> float:
        """The ladder alpha for a requested one; ValueError (naming the ladder) when it is not on it."""
        return self.head.ladder.resolve_alpha(alpha)

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(self.head.ladder.alphas)

    def verification_text(self, prompt: str | Sequence[dict], response: str) -> str:
        return verification_text(self.backend.tokenizer, prompt, response, self.info.chat, self.info.recipe)

    # -- the flow -----------------------------------------------------------------------------------------------
    async def run(
        self,
        request: VerificationRequest,
        on_text: Callable[[str], None] | None = None,
        tracing: Tracing | None = None,
    ) -> VerificationResult:
        """Run the request. ``on_text`` receives generated text as it is produced (from a worker thread), only
        when the text cannot be withheld or replaced (one attempt, ``on_abstain="flag"``). ``tracing`` gets a span
        per attempt, with its generation and verification inside."""
        tracing = tracing or Tracing()  # off: every span a no-op
        alpha = self.resolve_alpha(request.alpha)
        budget = request.max_attempts if request.temperature >= GREEDY_BELOW else 1
        stream = on_text if (budget == 1 and request.on_abstain == "flag") else None
        attempts: list[Attempt] = []
        for k in range(budget):
            params = SamplingParams(
                request.max_tokens, request.temperature, request.top_p, derive_seed(request.seed, k)
            )
            with tracing.span("attempt", attempt=k) as span:
                attempt = await self._attempt(request, params, alpha, stream, tracing)
                span.set(admitted=attempt.admitted, probability=round(attempt.probability, 6))
            attempts.append(attempt)
            if attempt.admitted:
                break
        best = max(attempts, key=lambda a: (a.admitted, a.probability))
        withheld = request.on_abstain == "withhold" and not best.admitted
        return VerificationResult(
            best=best, all_attempts=attempts, alpha=alpha, withheld=withheld, prompt_tokens=len(request.prompt.ids)
        )

    async def _attempt(
        self, request: VerificationRequest, params: SamplingParams, alpha: float, on_text, tracing: Tracing
    ) -> Attempt:
        started = time.perf_counter()
        with tracing.span("generation", max_tokens=params.max_tokens) as span:
            generation = await self.backend.generate(
                GenerationRequest(
                    list(request.prompt.ids),
                    params,
                    stop=tuple(request.stop),
                    stop_inclusive=(self.tags.open,),
                    on_text=on_text,
                    record_states=True,  # embed_generation below frees them
                )
            )
            span.set(completion_tokens=generation.completion_tokens, finish_reason=generation.finish_reason)
        generated = time.perf_counter()
        with tracing.span("verification") as span:
            text = self.verification_text(request.prompt.chat_prompt, generation.text)
            h = await self.backend.embed_generation(text, request.prompt.ids, generation)
            score = functools.partial(
                self.head.predict_scores, h, alpha=alpha, return_exemplars=int(request.return_exemplars)
            )
            scores = await asyncio.get_running_loop().run_in_executor(self._head_thread, score)
            verified = time.perf_counter()
            attempt = self._decide(
                generation, text, h, scores, (generated - started) * 1000.0, (verified - generated) * 1000.0
            )
            span.set(
                probability=round(attempt.probability, 6),
                q=attempt.q,
                d=round(attempt.d, 6),
                admitted=attempt.admitted,
                abstention_reason=attempt.abstention_reason,
            )
        return attempt

    def written_tokens(self, generated: str, returned: str) -> int:
        """Tokens of the text the server appends to ``generated`` to make ``returned`` (the part after their common
        prefix), tokenized on its own."""
        appended = returned[len(os.path.commonprefix([generated, returned])) :]
        count = self._written_token_counts.get(appended)
        if count is None:
            count = len(self.backend.tokenizer(appended, add_special_tokens=False)["input_ids"]) if appended else 0
            if len(self._written_token_counts) < 256:
                self._written_token_counts[appended] = count
        return count

    def _decide(
        self, generation: GenerationResult, text: str, h: torch.Tensor, scores: SDMScores, gen_ms: float, ver_ms: float
    ) -> Attempt:
        prediction = int(scores.predictions[0])
        head_admitted = bool(scores.admitted[0])
        positive = prediction == self.tags.positive_class
        admitted = head_admitted and positive
        reason = scores.abstention_reason[0] if not head_admitted else (None if positive else "predicted_no")
        tag = self.tags.tag(prediction)
        returned = verification_prefix(generation.text, self.tags.open) + tag
        exemplars = []
        if scores.exemplars:
            for e in scores.exemplars[0]:
                name = (
                    "ood"
                    if e.label == OOD_LABEL
                    else (self.class_names[e.label] if 0 <= e.label < len(self.class_names) else str(e.label))
                )
                exemplars.append(
                    {"id": e.id, "label": e.label, "label_name": name, "predicted": e.predicted, "distance": e.distance}
                )
        return Attempt(
            generation=generation,
            verification_text=text,
            embedding=h[0],
            prediction=prediction,
            verified=tag[: -len(self.tags.close)] if tag.endswith(self.tags.close) else tag,
            text=returned,
            probability=float(scores.probabilities[0, prediction]),
            probability_lower=float(scores.probabilities_lower[0, prediction]),
            head_admitted=head_admitted,
            admitted=admitted,
            abstention_reason=reason,
            region_alpha=scores.region_alpha[0],
            q=int(scores.q[0]),
            q_prime=float(scores.q_prime[0]),
            d=float(scores.d[0]),
            exemplars=exemplars,
            generation_ms=gen_ms,
            verification_ms=ver_ms,
            written_tokens=self.written_tokens(generation.text, returned),
        )
