"""The on-disk artifact format: a folder of safetensors files plus JSON, described by ``manifest.json``.

The manifest records a format name and version and the sha256 of every other file, and carries a sha256 of its
own canonical content, so a modified, truncated or swapped file is refused with a clear error. Nothing is ever
unpickled: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ArtifactError", "write_artifact", "read_artifact", "sha256_file", "canonical_json", "share_like_umask"]

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact is missing, of another format or version, inconsistent, or has been modified."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _manifest_digest(manifest: Mapping) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def share_like_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes plain ``open()`` / ``mkdir()`` would have (0644 / 0755 under
    umask 022). Temporary files and folders (mkstemp, mkdtemp, safetensors) are 0600 / 0700, which a server running
    as another user (the container's uid 10001) cannot read."""
    mask = _umask()
    top = Path(root)
    for path in [top, *top.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _write_json_atomic(path: Path, data: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    # mkstemp creates 0600; the file replaces one open() would have made (a server in a container, running as
    # another user, must be able to read a bundle made on the host).
    os.fchmod(fd, _file_mode())
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)


def write_artifact(
    folder: str | os.PathLike,
    *,
    format_name: str,
    format_version: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    json_files: Mapping[str, object],
    manifest: Mapping[str, object],
) -> Path:
    """Write ``tensors`` (file name -> tensor dict) and ``json_files`` into ``folder``, then the manifest.

    The manifest is written last, so a folder whose writing was interrupted has no valid manifest and is refused.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST
    if stale.exists():
        stale.unlink()
    files: dict[str, str] = {}
    for name, group in tensors.items():
        path = out / name
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(path))
        files[name] = sha256_file(path)
    for name, data in json_files.items():
        path = out / name
        _write_json_atomic(path, data)
        files[name] = sha256_file(path)
    body = dict(manifest)
    body.update({"format": format_name, "format_version": format_version, "files": files})
    body["manifest_sha256"] = _manifest_digest(body)
    _write_json_atomic(out / MANIFEST, body)
    for name in files:
        os.chmod(out / name, _file_mode())  # safetensors writes 0600
    return out


def read_artifact(
    folder: str | os.PathLike, *, format_name: str, supported_versions: tuple[int, ...]
) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Verify and read an artifact: (manifest, tensors per file, JSON per file)."""
    root = Path(folder)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"no such artifact folder: {root} (check the path)")
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} is not an artifact: {MANIFEST} is missing (was writing interrupted? write it again)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} must hold a JSON object")
    if manifest.get("format") != format_name:
        raise ArtifactError(f"{root} holds format {manifest.get('format')!r}, expected {format_name!r}")
    if manifest.get("format_version") not in supported_versions:
        raise ArtifactError(
            f"{root} has format_version {manifest.get('format_version')!r}; this sdm-lm reads versions "
            f"{list(supported_versions)}: "
            "upgrade sdm-lm or re-create the artifact"
        )
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ArtifactError(
            f"{manifest_path} has been modified since it was written (its checksum does not match); re-create the "
            "artifact"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{manifest_path} lists no files")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    documents: dict[str, Any] = {}
    for name, expected in files.items():
        path = root / name
        if Path(name).name != name:
            raise ArtifactError(f"{manifest_path} names a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{root} is incomplete: {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path} has been modified or corrupted (sha256 {actual[:12]}… != {str(expected)[:12]}…); re-create "
                "the artifact"
            )
        if name.endswith(".safetensors"):
            tensors[name] = load_file(str(path))
        elif name.endswith(".json"):
            documents[name] = json.loads(path.read_text())
        else:
            raise ArtifactError(f"{manifest_path} lists {name!r}, which is neither .safetensors nor .json")
    return manifest, tensors, documents
