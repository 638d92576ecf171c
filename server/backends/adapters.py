"""Several adapter bundles on one base model: one engine holds the base model once and every bundle's LoRA adapter
beside it, unmerged; each bundle is served through its own :class:`AdapterBackend`, which has the bundle's manifest
and SDM head and sends its work to the engine under its adapter's name. Two engines do this:

- ``TransformersBackend(adapters=True)``: peft, one adapter name per loaded bundle; each batch runs with one adapter
  active (docs/decisions.md, "Adapters are switched per batch").
- ``VLLMBackend(adapters=True)``: vLLM's multi-LoRA; every request carries its adapter's ``LoRARequest`` and batches
  mix adapters (server/backends/vllm_adapters.py).

Bundles can share an engine only when they are adapter bundles over the same base model source, with the same
tokenizer and chat format (:func:`check_compatible`); anything else is served by a server of its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sdm_core.estimator import SDMEstimator
from sdm_core.lm.bundle import Bundle, BundleInfo, load_head, read_bundle_info
from server.backends.base import Backend, BackendError, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from server.backends.transformers_backend import TransformersBackend
    from server.backends.vllm_backend import VLLMBackend

__all__ = ["AdapterSet", "AdapterBackend", "check_compatible", "load_adapter_engine"]


def _tokenizer_files(info: BundleInfo) -> dict[str, str]:
    return {rel: digest for rel, digest in info.raw.get("files", {}).items() if rel.startswith("tokenizer/")}


def check_compatible(default: BundleInfo, other: BundleInfo, name: str) -> None:
    """Raise BackendError (naming ``name``, the bundle, and what differs) unless ``other`` can share the engine of
    ``default``: an adapter bundle over the same base model source, with the same tokenizer and chat format."""
    apart = "serve it from a server of its own (its own --bundle) instead of --extra-bundles"
    kind = other.model.get("kind")
    if kind != "adapter":
        raise BackendError(
            f"bundle {name!r} is a {kind!r} bundle, not a LoRA adapter: only adapter bundles over one base model "
            f"share an engine; {apart}"
        )
    if other.model.get("base") != default.model.get("base"):
        raise BackendError(
            f"bundle {name!r} is an adapter of base model {other.model.get('base')}, but the default bundle's base "
            f"model is {default.model.get('base')}: bundles served together must share one base model; {apart}"
        )
    if _tokenizer_files(other) != _tokenizer_files(default):
        raise BackendError(
            f"bundle {name!r} has another tokenizer than the default bundle (its tokenizer/ files differ): bundles "
            f"served together share one tokenizer; {apart}"
        )
    if other.raw.get("chat") != default.raw.get("chat"):
        raise BackendError(
            f"bundle {name!r} has another chat format or chat template than the default bundle: bundles served "
            f"together render prompts alike; {apart}"
        )


class AdapterSet:
    """The LoRA adapters loaded on one base model, each with its bundle. Used from the engine's model thread only
    (adding, removing and activating an adapter changes the model every batch runs)."""

    def __init__(self, default: BundleInfo, model, tokenizer, verify: bool) -> None:
        self.default = default
        self.model = model  # the base model, a peft model once the first adapter is added
        self.tokenizer = tokenizer
        self.verify = verify
        self.bundles: dict[str, Bundle] = {}
        self.active: str | None = None
        self._added = 0

    def add(self, path: str | os.PathLike) -> tuple[str, Bundle]:
        """Load the adapter bundle at ``path`` beside the others; (its adapter name, its bundle)."""
        from peft import PeftModel

        info = read_bundle_info(path, verify=self.verify)
        check_compatible(self.default, info, info.path.name)
        name = f"bundle-{self._added}"  # a fresh name per load: a reloaded bundle's old adapter serves until retired
        self._added += 1
        folder = str(info.path / info.model["path"])
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(folder, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
        self.model.eval()
        bundle = Bundle(info=info, model=self.model, tokenizer=self.tokenizer, head=load_head(info))
        self.bundles[name] = bundle
        return name, bundle

    def remove(self, name: str) -> None:
        """Unload an adapter no request uses any more (the last one stays: peft keeps at least one)."""
        if name in self.bundles and len(self.bundles) > 1:
            if self.model.active_adapter == name:  # peft warns when the active adapter is deleted: switch first
                self.activate(next(other for other in self.bundles if other != name))
            self.model.delete_adapter(name)
            del self.bundles[name]

    def activate(self, name: str) -> Bundle:
        """The bundle of adapter ``name``, its adapter made the one the model runs with."""
        bundle = self.bundles.get(name)
        if bundle is None:
            raise BackendError(f"no adapter {name!r} is loaded (it was removed, or never added)")
        if self.active != name:
            self.model.set_adapter(name)
            self.active = name
        return bundle


def load_adapter_engine(
    path: str | os.PathLike, *, dtype: torch.dtype, verify: bool, device: str
) -> tuple[Bundle, AdapterSet]:
    """The engine's bundle (the default bundle's manifest, tokenizer and head over its base model, no adapter yet)
    and its empty :class:`AdapterSet`. The default bundle must itself be an adapter bundle."""
    from transformers import AutoTokenizer

    from sdm_core.lm.models import load_model

    info = read_bundle_info(path, verify=verify)
    if info.model.get("kind") != "adapter":
        raise BackendError(
            f"the default bundle {info.path.name!r} is a {info.model.get('kind')!r} bundle, not a LoRA adapter: "
            "--extra-bundles needs adapter bundles over one base model, the default one included; serve a merged or "
            "base bundle alone"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(info.path / "tokenizer"))
    model = load_model(info.model["base"], dtype=dtype)
    model.to(device).eval()  # type: ignore[arg-type]
    bundle = Bundle(info=info, model=model, tokenizer=tokenizer, head=load_head(info))
    return bundle, AdapterSet(info, model, tokenizer, verify)


class AdapterBackend(Backend):
    """One adapter bundle served on a shared engine (a transformers or vLLM backend made with ``adapters=True``): its
    own manifest, head and adapter; the engine's model, tokenizer and scheduling. Closing it unloads its adapter,
    never the engine."""

    def __init__(self, engine: TransformersBackend | VLLMBackend, bundle_path: str) -> None:
        if not engine.adapters:
            raise BackendError("an AdapterBackend needs an engine made with adapters=True")
        self.engine = engine
        self.bundle_path = str(bundle_path)
        self.adapter: str | None = None
        self._bundle: Bundle | None = None  # or a vllm_adapters.LoRAAdapter: what is read is info and head

    def with_bundle(self, bundle_path: str) -> AdapterBackend:
        return AdapterBackend(self.engine, bundle_path)

    @property
    def observer(self):
        return self.engine.observer

    @observer.setter
    def observer(self, value) -> None:
        self.engine.observer = value

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._bundle is not None and self.engine.loaded

    async def load(self) -> None:
        if self.loaded:
            return
        await self.engine.load()
        self.adapter, self._bundle = await self.engine.add_adapter(self.bundle_path)

    async def close(self) -> None:
        adapter, self._bundle, self.adapter = self.adapter, None, None
        if adapter is not None and self.engine.loaded:
            await self.engine.remove_adapter(adapter)

    # -- what the pipeline reads -------------------------------------------------------------------------------
    def _loaded(self):
        if self._bundle is None:
            raise BackendError("the adapter is not loaded yet: await load() first")
        return self._bundle

    @property
    def info(self) -> BundleInfo:
        return self._loaded().info

    @property
    def head(self) -> SDMEstimator:
        return self._loaded().head

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        """The transformers model the adapter runs on (the peft model with every adapter on it; for tests and
        tools); a vLLM engine has none and says so."""
        model = getattr(self._loaded(), "model", None)
        return model if model is not None else self.engine.model

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- work --------------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._loaded()
        return await self.engine.generate(dataclasses.replace(request, adapter=self.adapter))

    async def embed(self, texts: Sequence[str]) -> torch.Tensor:
        self._loaded()
        return await self.engine.embed(texts, adapter=self.adapter)

    async def embed_generation(
        self, text: str, prompt_ids: Sequence[int], generation: GenerationResult
    ) -> torch.Tensor:
        self._loaded()
        return await self.engine.embed_generation(text, prompt_ids, generation, adapter=self.adapter)
