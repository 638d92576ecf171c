"""Reading embeddings (.npy or .safetensors) and labels (JSONL with ids) for the CLI, with clear errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["InputError", "LabelledIds", "load_embeddings", "load_labels", "write_jsonl"]


class InputError(ValueError):
    """An input file is missing or malformed; the message names the file (and line) and what to do."""


def load_embeddings(path: str | os.PathLike, key: str | None = None) -> torch.Tensor:
    """An (N, D) float32 tensor from a .npy file or a .safetensors file (key ``embeddings`` or its only tensor)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such embeddings file")
    if p.suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise InputError(
                f"{p}: not a plain numeric .npy array ({exc}); save it with numpy.save of a float array"
            ) from None
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if key is None:
            key = "embeddings" if "embeddings" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None or key not in tensors:
            raise InputError(f"{p}: expected a tensor named 'embeddings' (or a single tensor), found {sorted(tensors)}")
        tensor = tensors[key]
    else:
        raise InputError(f"{p}: embeddings must be a .npy or .safetensors file")
    if tensor.dim() != 2:
        raise InputError(f"{p}: embeddings must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{p}: embeddings contain NaN or inf")
    return tensor


@dataclass
class LabelledIds:
    ids: list[str]
    labels: list[int | None]


def load_labels(path: str | os.PathLike, class_names: Sequence[str] = (), require_labels: bool = True) -> LabelledIds:
    """JSONL with one object per embedding row: ``{"id": ..., "label": ...}``; ``label`` is a class index or a
    class name from ``class_names``. Ids must be unique."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such labels file")
    ids: list[str] = []
    labels: list[int | None] = []
    seen: dict[str, int] = {}
    names = {str(n): i for i, n in enumerate(class_names)}
    with open(p, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{p}:{number}: malformed JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict) or "id" not in row:
                raise InputError(f'{p}:{number}: each line must be an object with an "id" (and a "label")')
            identifier = str(row["id"])
            if identifier in seen:
                raise InputError(f"{p}:{number}: duplicate id {identifier!r} (first on line {seen[identifier]})")
            seen[identifier] = number
            label = row.get("label")
            if label is None:
                if require_labels:
                    raise InputError(f'{p}:{number}: missing "label"')
                labels.append(None)
            elif isinstance(label, bool) or not isinstance(label, (int, str)):
                raise InputError(f"{p}:{number}: label must be a class index or a class name, got {label!r}")
            elif isinstance(label, str):
                if label in names:
                    labels.append(names[label])
                elif label.isdigit():
                    labels.append(int(label))
                else:
                    raise InputError(
                        f"{p}:{number}: unknown class name {label!r}; known: {sorted(names) or 'none (use indices)'}"
                    )
            else:
                if label < 0:
                    raise InputError(f"{p}:{number}: label must be >= 0, got {label}")
                labels.append(label)
            ids.append(identifier)
    if not ids:
        raise InputError(f"{p}: no rows")
    return LabelledIds(ids, labels)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(p, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
            count += 1
    return count
