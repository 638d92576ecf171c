"""Atomic, pickle-free training checkpoints for ``--resume``.

A checkpoint folder holds the trainable weights and the optimiser state as safetensors, the scheduler and trainer
state as JSON, and the current training-set SDM layer as an sdm_core artifact. It is written under a temporary
name and renamed into place, so a crash (even kill -9) leaves either the previous checkpoint or the new one,
never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdm_core import SDMEstimator
from sdm_core.artifact import sha256_file

__all__ = ["save_checkpoint", "load_checkpoint", "trainable_state", "atomic_dir"]

COMPLETE = "checkpoint.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp_folder)``, then swap the folder into ``target`` (old one removed only after the swap)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new."))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, trainer_state: dict, train_layer: SDMEstimator | None) -> None:
    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
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

    atomic_dir(folder, write)


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
        raise ValueError(f"the checkpoint lacks trainable parameters {missing[:3]}...; was it written with another configuration?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), json.loads((folder / "optimizer.json").read_text()))
    scheduler.load_state_dict(body["scheduler"])
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_rng"])
    layer = SDMEstimator.load(folder / "train_layer") if (folder / "train_layer").is_dir() else None
    return body["trainer"], layer
