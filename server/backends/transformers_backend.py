"""The transformers backend: a bundle's LM on CPU or GPU, with dynamic batching for generation and hidden states.

Generation: concurrent requests are batched (left padding) into one ``model.generate`` call in greedy mode. A
per-row logits processor samples the rows that asked for sampling, each with its own temperature, top_p and seeded
``torch.Generator`` (so a seeded request gives the same text whatever it is batched with), and masks every other
token, so greedy decoding then picks the sampled token. A per-row stopping criterion ends each row at its own
``max_tokens``, EOS, stop strings (the verification tag included) or cancellation, and streams text deltas.

Hidden states: by default (``hidden_states="auto"`` with a float32 model) the final-layer states that generation
computes anyway are captured (a hook on the final norm) and pooled with the recipe's
:func:`sdm_core.lm.embedding.pool_states`, when the verification text tokenises to exactly the prompt's tokens followed
by generated ones; each row is fed one more step after its stop so its last token's state exists. Otherwise
(a tag the model did not write, a truncated sequence, another recipe layer, ``"forward"``) verification texts of
concurrent requests are batched into one :func:`sdm_core.lm.embedding.embed_texts` call, the function training used.
The two agree to float rounding (a test checks 1e-4); see docs/decisions.md.

Several adapter bundles (``adapters=True``): the base model is loaded once and each bundle's LoRA adapter is loaded
beside the others, unmerged (:class:`server.backends.adapters.AdapterSet`); each request names its adapter, the
batchers form batches of one adapter each, and the batch runs with that adapter active, its generation and its
captured or recomputed hidden states alike. :class:`server.backends.adapters.AdapterBackend` is one bundle's view.

All model calls run in one worker thread; a second tokenizer instance serves the event loop thread (fast
tokenizers must not be shared across threads).

Size: the sampling processor, the stopping criterion and the state capture are three parts of one
``model.generate`` call: each reads the rows the others write, and they change together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sdm_core.estimator import SDMEstimator
from sdm_core.lm.bundle import Bundle, BundleInfo, load_bundle
from sdm_core.lm.embedding import HiddenStateRecipe, embed_texts, final_norm, pool_states
from server.backends.adapters import AdapterSet, load_adapter_engine
from server.backends.base import Backend, BackendError, BatchObserver, GenerationRequest, GenerationResult
from server.backends.row import GenerationRow
from server.batching import DynamicBatcher

__all__ = ["TransformersBackend"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HIDDEN_STATE_MODES = ("auto", "reuse", "forward")


class _RowSampler:
    """Logits processor: sampled rows draw their token with their own generator; greedy rows pass through."""

    def __init__(self, rows: list[GenerationRow]) -> None:
        self.rows = rows
        self.sampled = [i for i, r in enumerate(rows) if not r.request.params.greedy]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.sampled:
            return scores
        out = scores.clone()
        for i in self.sampled:
            row = self.rows[i]
            if row.done:
                continue
            params = row.request.params
            if row.generator is None:
                seed = params.seed if params.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(device=scores.device)
                row.generator.manual_seed(int(seed) % (2**63))
            logits = scores[i].float() / params.temperature
            probs = torch.softmax(logits, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                cumulative = torch.cumsum(sorted_probs, dim=-1)
                drop = cumulative - sorted_probs > params.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            token = torch.multinomial(probs, 1, generator=row.generator)
            out[i].fill_(float("-inf"))
            out[i, token] = 0.0
        return out


class _RowStopper:
    """Stopping criterion: per-row max_tokens, EOS, stop strings and cancellation; streams text deltas."""

    def __init__(
        self, rows: list[GenerationRow], tokenizer, eos_ids: set[int], width: int, linger: bool = False
    ) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.width = width
        # With captured states, a row that stops stays in the batch for one more step, so its last token is fed
        # back and gets a hidden state (the extra token is discarded).
        self.linger = linger

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i, row in enumerate(self.rows):
            if row.done:
                done[i] = True
                continue
            row.counted(row.count + 1)
            token = int(input_ids[i, -1])
            if row.request.cancel.is_set():
                row.finish("cancelled", None, row.text)
            elif token in self.eos_ids:
                row.text = self.tokenizer.decode(input_ids[i, self.width :], skip_special_tokens=True)
                row.finish("stop", "eos", row.text)
            else:
                row.text = self.tokenizer.decode(input_ids[i, self.width :], skip_special_tokens=True)
                stopped = row.finish_at_stop()
                if not stopped and row.count >= row.request.params.max_tokens:
                    row.finish("length", None, row.text)
                elif not stopped:
                    row.stream()
            done[i] = row.done and not (
                self.linger and row.finish_reason == "stop" and row.stop_reason in row.request.stop_inclusive
            )
        return done.to(input_ids.device)


class TransformersBackend(Backend):
    """A bundle served with Hugging Face transformers (CPU or GPU)."""

    def __init__(
        self,
        bundle_path: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        verify: bool = True,
        observer: BatchObserver | None = None,
        hidden_states: str = "auto",
        adapters: bool = False,
        batch_rejoin_ms: float = 250.0,
    ) -> None:
        if hidden_states not in HIDDEN_STATE_MODES:
            raise BackendError(f"hidden_states must be one of {HIDDEN_STATE_MODES}, got {hidden_states!r}")
        self.hidden_states = hidden_states
        self.reused_states = 0  # verifications served from captured generation states (the rest ran a forward pass)
        self.bundle_path = str(bundle_path)
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.batch_wait_ms = float(batch_wait_ms)
        self.batch_rejoin_ms = float(batch_rejoin_ms)
        self.verify = verify
        self.observer = observer
        self._bundle: Bundle | None = None
        self._loop_tokenizer = None
        self._executor: ThreadPoolExecutor | None = None
        self._generator: DynamicBatcher | None = None
        self._embedder: DynamicBatcher | None = None
        self._eos_ids: set[int] = set()
        self._pad_id = 0
        self._load_lock = threading.Lock()
        self._norm: torch.nn.Module | None = None
        # adapters=True: the LoRA adapters of several bundles stay unmerged on one base model, switched per batch.
        self.adapters = adapters
        self._adapters: AdapterSet | None = None

    def with_bundle(self, bundle_path: str) -> TransformersBackend:
        return TransformersBackend(
            bundle_path,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            batch_wait_ms=self.batch_wait_ms,
            verify=self.verify,
            observer=self.observer,
            hidden_states=self.hidden_states,
            adapters=self.adapters,
            batch_rejoin_ms=self.batch_rejoin_ms,
        )

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._bundle is not None and self._generator is not None

    async def load(self) -> None:
        if self.loaded:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdm-model")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_sync)
        lock = asyncio.Lock()
        wait_s = self.batch_wait_ms / 1000.0
        self._generator = DynamicBatcher(
            self._generate_batch,
            self._executor,
            max_batch=self.batch_size,
            max_wait_s=wait_s,
            lock=lock,
            on_batch=self._observe("generate"),
            name="generate",
            key=lambda request: request.adapter,
            rejoin_s=self.batch_rejoin_ms / 1000.0,
        )
        self._embedder = DynamicBatcher(
            self._embed_batch,
            self._executor,
            max_batch=self.batch_size,
            max_wait_s=wait_s,
            lock=lock,
            on_batch=self._observe("embed"),
            name="embed",
            key=lambda item: item[0],
        )

    def _observe(self, kind: str):
        observer = self.observer
        return (lambda n: observer(kind, n)) if observer is not None else None

    def _resolve_dtype(self, info: BundleInfo) -> torch.dtype:
        name = self.dtype if self.dtype != "auto" else str(info.model.get("dtype", "float32"))
        if name not in _DTYPES:
            raise BackendError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]

    def _load_sync(self) -> None:
        from transformers import AutoTokenizer

        from sdm_core.lm.bundle import read_bundle_info

        with self._load_lock:
            if self._bundle is not None:
                return
            info = read_bundle_info(self.bundle_path, verify=False)
            if self.adapters:
                bundle, self._adapters = load_adapter_engine(
                    self.bundle_path, dtype=self._resolve_dtype(info), verify=self.verify, device=self.device
                )
            else:
                bundle = load_bundle(
                    self.bundle_path, dtype=self._resolve_dtype(info), verify=self.verify, device=self.device
                )
            tokenizer = bundle.tokenizer
            eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
            config_eos = getattr(bundle.model.generation_config, "eos_token_id", None)
            if config_eos is not None:
                eos |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
            if not eos:
                raise BackendError(f"{self.bundle_path}: the tokenizer has no EOS token; generation could not stop")
            self._eos_ids = {int(e) for e in eos}
            self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_ids)
            self._loop_tokenizer = AutoTokenizer.from_pretrained(str(Path(self.bundle_path) / "tokenizer"))
            self._bundle = bundle
            self._norm = self._capture_point(bundle)

    def _capture_point(self, bundle: Bundle) -> torch.nn.Module | None:
        """The final norm to capture generation states from, or None when verification runs its own pass."""
        if self.hidden_states == "forward" or bundle.info.recipe.layer != -1:
            return None
        if self.hidden_states == "auto" and next(bundle.model.parameters()).dtype != torch.float32:
            return None  # low-precision cached decoding drifts further from a fresh pass than float32 does
        return final_norm(bundle.model)

    async def close(self) -> None:
        for batcher in (self._generator, self._embedder):
            if batcher is not None:
                await batcher.close()
        self._generator = self._embedder = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        cuda = self._bundle is not None and str(self.device).startswith("cuda")
        self._bundle = None
        self._adapters = None
        self._loop_tokenizer = None
        gc.collect()
        if cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- what the pipeline reads -------------------------------------------------------------------------------
    def _loaded(self) -> Bundle:
        if self._bundle is None:
            raise BackendError("the backend is not loaded yet: await load() first")
        return self._bundle

    def _bundle_for(self, adapter: str | None) -> Bundle:
        """The bundle a batch runs for (worker thread): the backend's own, or an adapter's, made the active one."""
        if adapter is None and self._adapters is None:
            return self._loaded()
        if self._adapters is None or adapter is None:
            raise BackendError("a request must name its adapter exactly when the backend holds adapters")
        return self._adapters.activate(adapter)

    @property
    def adapter_set(self) -> AdapterSet:
        """The adapters of a backend made with ``adapters=True`` (server/backends/adapters.py)."""
        self._loaded()
        if self._adapters is None:
            raise BackendError("this backend holds no adapters: make it with adapters=True")
        return self._adapters

    async def run_on_model_thread(self, function, *args):
        """``function(*args)`` on the one thread that runs every model call, so between two batches (adapters are
        added and removed there)."""
        if self._executor is None:
            raise BackendError("the backend is not loaded (or was closed)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def add_adapter(self, path: str) -> tuple[str, Bundle]:
        """Load the adapter bundle at ``path`` beside the others (between two batches); (its name, its bundle)."""
        return await self.run_on_model_thread(self.adapter_set.add, path)

    async def remove_adapter(self, name: str) -> None:
        """Unload an adapter no request uses any more (between two batches)."""
        if self.loaded:
            await self.run_on_model_thread(self.adapter_set.remove, name)

    @property
    def info(self) -> BundleInfo:
        return self._loaded().info

    @property
    def head(self) -> SDMEstimator:
        return self._loaded().head

    @property
    def tokenizer(self):
        self._loaded()
        return self._loop_tokenizer

    @property
    def model(self):
        """The LM (for tests and tools; never call it from the event loop while serving)."""
        return self._loaded().model

    @property
    def worker_tokenizer(self):
        return self._loaded().tokenizer

    @property
    def max_model_len(self) -> int:
        return int(getattr(self._loaded().model.config, "max_position_embeddings", 2048))

    # -- work --------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._generator is None:
            raise BackendError("the backend is not loaded (or was closed)")
        try:
            return await self._generator.submit(request)
        except asyncio.CancelledError:
            request.cancel.set()
            raise

    async def embed(self, texts: Sequence[str], adapter: str | None = None) -> torch.Tensor:
        if self._embedder is None:
            raise BackendError("the backend is not loaded (or was closed)")
        return await self._embedder.submit((adapter, list(texts)))

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        bundle = self._bundle_for(requests[0].adapter)  # the batcher gives every request of a batch one adapter
        rows = [GenerationRow(r) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(requests):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        device = next(bundle.model.parameters()).device
        # As training's greedy generation: explicit greedy + EOS + pad, the model's generation_config for the rest.
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in requests),
            do_sample=False,
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=self._pad_id,
        )
        captured: list[torch.Tensor] = []
        hook = None
        if self._norm is not None:
            hook = self._norm.register_forward_hook(
                lambda _m, _a, out: captured.append(out.detach()) if isinstance(out, torch.Tensor) else None
            )
        try:
            sequences = bundle.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList(
                    [_RowStopper(rows, bundle.tokenizer, self._eos_ids, width, linger=hook is not None)]
                ),
            )
        finally:
            if hook is not None:
                hook.remove()
        sequences = sequences.cpu()
        results = [row.result() for row in rows]
        prompt_states, step_states = self._split_captured(captured, len(rows), width)
        out = []
        for i, (row, result) in enumerate(zip(rows, results)):
            tokens = tuple(int(t) for t in sequences[i, width : width + row.count])
            states = None
            if prompt_states is not None:
                n, fed = len(row.request.prompt_ids), min(row.count, step_states.shape[1])
                states = torch.cat([prompt_states[i, width - n :], step_states[i, :fed]])
            out.append(dataclasses.replace(result, token_ids=tokens, states=states))
        return out

    @staticmethod
    def _split_captured(
        captured: list[torch.Tensor], batch: int, width: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prompt states (B, width, H), fed-back generated tokens' states (B, S, H)) from the hook's outputs: the
        prefill first, then one state per row per decoding step; (None, None) when the calls do not look like that."""
        if not captured or tuple(captured[0].shape[:2]) != (batch, width):
            return None, None
        steps = captured[1:]
        if any(tuple(c.shape[:2]) != (batch, 1) for c in steps):
            return None, None
        prompt = captured[0].float().cpu()
        fed = torch.cat(steps, dim=1).float().cpu() if steps else prompt.new_zeros(batch, 0, prompt.shape[-1])
        return prompt, fed

    async def embed_generation(
        self, text: str, prompt_ids: Sequence[int], generation: GenerationResult, adapter: str | None = None
    ) -> torch.Tensor:
        info = self.info if adapter is None else self.adapter_set.bundles[adapter].info
        h = self._reuse_states(text, prompt_ids, generation, info.recipe)
        if h is None:
            return await self.embed([text], adapter=adapter)
        self.reused_states += 1
        if self.observer is not None:
            self.observer("reused", 1)
        return h

    def _reuse_states(
        self, text: str, prompt_ids: Sequence[int], generation: GenerationResult, recipe: HiddenStateRecipe
    ) -> torch.Tensor | None:
        """h from the generation's captured states when they cover exactly the tokens ``embed_texts`` would feed
        for ``text`` (the prompt's tokens, then a prefix of the generated ones); None otherwise."""
        if generation.states is None:
            return None
        ids = self.encode(text)
        n = len(prompt_ids)
        if len(ids) > recipe.max_length or len(ids) > generation.states.shape[0] or len(ids) <= n:
            return None
        if tuple(ids[:n]) != tuple(prompt_ids) or tuple(ids[n:]) != tuple(generation.token_ids[: len(ids) - n]):
            return None
        return pool_states(generation.states[: len(ids)], recipe).unsqueeze(0)

    def _embed_batch(self, groups: list[tuple[str | None, list[str]]]) -> list[torch.Tensor]:
        bundle = self._bundle_for(groups[0][0])  # the batcher gives every group of a batch one adapter
        texts = [t for _, group in groups for t in group]
        h = embed_texts(bundle.model, bundle.tokenizer, texts, bundle.info.recipe, batch_size=self.batch_size)
        out, start = [], 0
        for _, group in groups:
            out.append(h[start : start + len(group)])
            start += len(group)
        return out
