"""Atomic folder writes: a folder is built under a temporary name beside its target and renamed into place, so a
crash (even kill -9) leaves either no folder or a complete one, never half of one.

One helper serves every folder the project writes whole: bundles, training checkpoints and converted-model caches.
They differ only in what an existing target means, which ``if_exists`` names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

__all__ = ["atomic_folder"]

IfExists = Literal["error", "keep", "replace"]


def atomic_folder(target: str | os.PathLike, write: Callable[[Path], None], *, if_exists: IfExists = "error") -> Path:
    """Call ``write(tmp)`` on an empty temporary folder beside ``target``, then rename it to ``target``.

    ``if_exists`` says what an existing target means:

    - ``"error"``: a non-empty target raises FileExistsError before anything is written (an empty one is replaced);
    - ``"keep"``: an existing folder is a finished build (a cache): it is returned without calling ``write``, and a
      build that loses a race against a concurrent one keeps the winner's folder;
    - ``"replace"``: the new folder is swapped in and the old one is removed only after the swap.

    The temporary folder is removed whatever happens.
    """
    if if_exists not in ("error", "keep", "replace"):
        raise ValueError(f"if_exists must be 'error', 'keep' or 'replace', got {if_exists!r}")
    target = Path(target)
    if if_exists == "keep" and target.is_dir():
        return target
    if if_exists == "error" and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; choose another output folder (--out) or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new."))
    try:
        write(tmp)
        if if_exists == "keep":
            _rename_unless_built(tmp, target)
        elif if_exists == "replace":
            _swap(tmp, target)
        else:
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _rename_unless_built(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; when a concurrent build got there first, its folder stands."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise


def _swap(tmp: Path, target: Path) -> None:
    """Move an existing ``target`` aside, rename ``tmp`` into place, then remove the old folder."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
