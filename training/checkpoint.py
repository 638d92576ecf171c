"""Atomic, pickle-free training checkpoints for ``--resume``.

A checkpoint folder holds the trainable weights and the optimiser state as safetensors, the scheduler and trainer
state as JSON, and the current training-set SDM layer as an sdm_core artifact. It is written under a temporary
name and renamed into place, so a crash (even kill -9) leaves either the previous checkpoint or the new one,
never a torn one.

Under FSDP2 the parameters and the optimiser state are sharded DTensors: they are gathered into full CPU tensors
on rank 0 (torch.distributed.checkpoint.state_dict), so the files are the same as a one-process run's and a
checkpoint resumes with any number of processes. Gathering is collective: every rank calls :func:`save_checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdm_core import SDMEstimator
from sdm_core.artifact import sha256_file
from sdm_core.folders import atomic_folder
from sdm_core.lm.embedding import is_sharded

__all__ = ["save_checkpoint", "load_checkpoint", "trainable_state"]

COMPLETE = "checkpoint.json"


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors, by name. Sharded: collective; rank 0 gets them, the others {}."""
    if not is_sharded(model):
        return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=True))
    return {name: full[name].contiguous() for name, p in model.named_parameters() if p.requires_grad and name in full}


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _parameter_names(model, optimizer) -> list[str]:
    """The names of the optimiser's parameters in its own order: the index order of ``optimizer.state_dict()``."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in _torch_optimizer(optimizer).param_groups for p in group["params"]]


def _optimizer_state(model, optimizer) -> dict:
    """``optimizer.state_dict()`` (parameters by index). Sharded: gathered on rank 0 and re-keyed from parameter
    names to the same indices, so the files match an unsharded run's; the other ranks get an empty state."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_full_options(cpu_offload=True))
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: values for name, values in full.get("state", {}).items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in full.get("param_groups", [])
        ],
    }


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(model, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    if not is_sharded(model):
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # Every rank read the full state; each keeps its own shards. The DCP API keys parameters by name.
    names = _parameter_names(model, optimizer)
    if len(names) != sum(len(group["params"]) for group in meta["param_groups"]):
        raise ValueError(
            "the checkpoint's optimiser has another number of parameters; was it written with another configuration?"
        )
    full = {
        "state": {names[i]: values for i, values in state.items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in meta["param_groups"]],
    }
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), full, options=_full_options())


def save_checkpoint(
    folder: Path,
    *,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    train_layer: SDMEstimator | None,
    write: bool = True,
) -> None:
    """Write the checkpoint atomically. Call it on every rank with ``write`` true on rank 0 alone: a sharded model's
    state is gathered collectively; an unsharded one returns at once where ``write`` is false."""
    sharded = is_sharded(model)
    if not write and not sharded:
        return
    weights = trainable_state(model)
    optimizer_state = _optimizer_state(model, optimizer)
    if not write:
        return

    def write_files(tmp: Path) -> None:
        save_file(weights, str(tmp / "trainable.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        if train_layer is not None:
            train_layer.save(tmp / "train_layer")
        body = {"trainer": trainer_state, "scheduler": scheduler.state_dict()}
        body["files"] = {p.name: sha256_file(p) for p in tmp.iterdir() if p.is_file()}
        # Written last: a folder without it is incomplete and is never resumed from.
        (tmp / COMPLETE).write_text(json.dumps(body))
        for handle in tmp.iterdir():
            if handle.is_file():
                with open(handle, "rb") as f:
                    os.fsync(f.fileno())

    atomic_folder(folder, write_files, if_exists="replace")


def load_checkpoint(folder: Path, *, model, optimizer, scheduler) -> tuple[dict, SDMEstimator | None]:
    """Restore weights, optimiser, scheduler and RNG; returns (trainer state, train layer or None)."""
    marker = folder / COMPLETE
    if not marker.is_file():
        raise FileNotFoundError(f"no complete checkpoint in {folder}; start without --resume")
    body = json.loads(marker.read_text())
    for name, digest in body["files"].items():
        if sha256_file(folder / name) != digest:
            raise ValueError(f"checkpoint file {folder / name} is corrupted; start without --resume")
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(
            f"the checkpoint lacks trainable parameters {missing[:3]}...; was it written with another configuration?"
        )
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # Every rank read the full tensors; each keeps its own shards (frozen weights are not in the file).
        set_model_state_dict(model, weights, options=_full_options(strict=False))
    else:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
    _restore_optimizer(
        model,
        optimizer,
        load_file(str(folder / "optimizer.safetensors")),
        json.loads((folder / "optimizer.json").read_text()),
    )
    scheduler.load_state_dict(body["scheduler"])
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_rng"])
    layer = SDMEstimator.load(folder / "train_layer") if (folder / "train_layer").is_dir() else None
    return body["trainer"], layer
