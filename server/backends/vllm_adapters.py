"""Several adapter bundles on one vLLM engine (vLLM multi-LoRA): the engine loads the unmerged base model once with
``enable_lora``; each bundle's LoRA adapter is registered with the engine under an id of its own, and every request
of that bundle (its generations and the one-token requests whose recorded states are the head input) carries the
adapter's ``LoRARequest``, so vLLM applies that adapter to that request alone, in batches that mix adapters.

Sizing is fixed when the engine starts: ``max_lora_rank`` is the largest rank among the bundles served at start,
rounded up to a size vLLM accepts, and ``max_loras`` leaves one slot beyond them for a reload's new adapter while the
old one finishes its requests. A bundle loaded later (``/admin/reload``) with a larger rank is refused with a clear
error; serve it by restarting with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdm_core.estimator import SDMEstimator
from sdm_core.folders import atomic_folder
from sdm_core.lm.bundle import BundleInfo, load_head, read_bundle_info
from server.backends.adapters import check_compatible
from server.backends.base import BackendError

__all__ = ["LORA_RANKS", "LoRAAdapter", "LoRARegistry", "adapter_rank", "lora_engine_args", "vllm_base_folder"]

# The max_lora_rank values vLLM 0.32 accepts (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(info: BundleInfo) -> int:
    """The largest LoRA rank of the adapter bundle ``info`` (its ``r`` and any per-module ``rank_pattern``)."""
    config_path = info.path / info.model["path"] / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"bundle {info.path.name!r}: cannot read its adapter's {config_path.name}: {exc}") from exc
    ranks = [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def lora_engine_args(infos: Sequence[BundleInfo]) -> dict[str, Any]:
    """The engine arguments that let one vLLM engine serve the adapters of ``infos`` (the bundles served at start)."""
    rank = max(adapter_rank(info) for info in infos)
    fitting = [size for size in LORA_RANKS if size >= rank]
    if not fitting:
        raise BackendError(
            f"an adapter has LoRA rank {rank}, above the largest vLLM serves ({LORA_RANKS[-1]}); serve it merged, "
            "from a server of its own"
        )
    # One slot beyond the bundles: a reload's new adapter joins while the old one finishes its requests.
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": len(infos) + 1}


def vllm_base_folder(base: dict, dtype: torch.dtype) -> Path:
    """The HF safetensors folder of the base model source ``base``: its own folder where it has one, else the base
    built once and saved to ``$SDM_CACHE_DIR/vllm`` (under the name :func:`vllm_model_folder` gives a base bundle)."""
    from sdm_core.lm.models import cache_dir, load_model, source_folder

    folder = source_folder(base)
    if folder is not None:
        return folder
    name = str(dtype).replace("torch.", "")
    digest = hashlib.sha256(f"base\n{json.dumps(base, sort_keys=True)}\n{name}".encode()).hexdigest()[:24]

    def build(target: Path) -> None:
        load_model(base, dtype=dtype).save_pretrained(target, safe_serialization=True)

    return atomic_folder(cache_dir() / "vllm" / f"base-{digest}", build, if_exists="keep")


@dataclass(frozen=True)
class LoRAAdapter:
    """One bundle's adapter on the engine: its manifest, its SDM head and the vLLM request that selects it."""

    name: str
    info: BundleInfo
    head: SDMEstimator
    request: Any  # vllm.lora.request.LoRARequest


class LoRARegistry:
    """The adapters registered with one engine, by name. Ids are never reused, so a reloaded bundle's new adapter and
    the old one (still finishing requests) are distinct to vLLM."""

    def __init__(self, default: BundleInfo, max_rank: int, verify: bool) -> None:
        self.default = default
        self.max_rank = max_rank
        self.verify = verify
        self.adapters: dict[str, LoRAAdapter] = {}
        self._next_id = 1

    def prepare(self, path: str | os.PathLike) -> LoRAAdapter:
        """Read and check the adapter bundle at ``path`` (blocking I/O: call off the event loop); not registered yet."""
        from vllm.lora.request import LoRARequest

        info = read_bundle_info(path, verify=self.verify)
        check_compatible(self.default, info, info.path.name)
        rank = adapter_rank(info)
        if rank > self.max_rank:
            raise BackendError(
                f"bundle {info.path.name!r} has LoRA rank {rank}, above the rank this engine was started for "
                f"({self.max_rank}, from the bundles served at start): restart the server with it to serve it"
            )
        name, lora_id = f"bundle-{self._next_id}", self._next_id
        self._next_id += 1
        request = LoRARequest(name, lora_id, str(info.path / info.model["path"]))
        return LoRAAdapter(name, info, load_head(info), request)

    def get(self, name: str) -> LoRAAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise BackendError(f"no adapter {name!r} is loaded (it was removed, or never added)")
        return adapter
