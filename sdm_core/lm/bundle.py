"""The deployable bundle: an LM (full weights, or a base-model source plus a LoRA adapter), its tokenizer, the
SDM head (an sdm_core artifact), and ``bundle.json`` recording everything the server needs to reproduce the
training-time embedding exactly: chat format and template, verification tags, hidden-state recipe, alphas.

Layout::

    bundle/
      bundle.json        format, version, model, chat, tags, recipe, head summary, provenance, sha256 of files
      model/             save_pretrained weights (kind "full"), or
      adapter/           a peft adapter over ``model.base`` (kind "adapter"), or nothing: the unchanged weights of
                         the model source ``model.base`` (kind "base", an un-fine-tuned baseline)
      tokenizer/         the tokenizer, with its chat template
      head/              the SDM estimator artifact (sdm_core.estimator)

Every file's sha256 is recorded and checked on load; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdm_core.artifact import ArtifactError, canonical_json, sha256_file, share_like_umask
from sdm_core.certification import Certification, withdraw_regions
from sdm_core.estimator import SDMEstimator
from sdm_core.folders import atomic_folder
from sdm_core.lm.embedding import ChatFormat, HiddenStateRecipe

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "VerificationTags",
    "BundleInfo",
    "Bundle",
    "write_bundle",
    "read_bundle_info",
    "load_bundle",
    "seal_bundle",
    "load_head",
]

BUNDLE_FORMAT = "sdm-lm-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"


@dataclass(frozen=True)
class VerificationTags:
    open: str = "<verified>"
    close: str = "</verified>"
    yes: str = "Yes"
    no: str = "No"
    # Class index -> tag word: class 1 = instruction followed ("Yes"), class 0 = not ("No").
    positive_class: int = 1

    def tag(self, prediction: int) -> str:
        word = self.yes if prediction == self.positive_class else self.no
        return f"{word}{self.close}"

    def to_dict(self) -> dict:
        return {
            "open": self.open,
            "close": self.close,
            "yes": self.yes,
            "no": self.no,
            "positive_class": self.positive_class,
        }

    @classmethod
    def from_dict(cls, data: dict) -> VerificationTags:
        return cls(**data)


@dataclass
class BundleInfo:
    """The parsed ``bundle.json``."""

    path: Path
    model: dict
    chat: ChatFormat
    tags: VerificationTags
    recipe: HiddenStateRecipe
    head: dict
    provenance: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def certification(self) -> Certification | None:
        """The held-out certification recorded by training.calibrate or training.certify, if any."""
        data = self.raw.get("certification")
        return Certification.from_dict(data) if data else None


@dataclass
class Bundle:
    info: BundleInfo
    model: object
    tokenizer: object
    head: SDMEstimator


def _files_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != BUNDLE_JSON:
            out[rel] = sha256_file(path)
    return out


def write_bundle(
    folder: str | os.PathLike,
    *,
    model,
    tokenizer,
    head: SDMEstimator,
    chat: ChatFormat,
    recipe: HiddenStateRecipe,
    tags: VerificationTags = VerificationTags(),
    base_model: dict | None = None,
    provenance: dict | None = None,
    reference_only: bool = False,
    certification: dict | None = None,
    baselines: dict | None = None,
) -> Path:
    """Write a bundle atomically (built under a temporary name, then renamed into place).

    A peft model is saved as its adapter and needs ``base_model`` (a model source, see sdm_core.lm.models); any
    other model is saved in full.
    """

    def write(tmp: Path) -> None:
        is_adapter = hasattr(model, "peft_config")
        if reference_only:
            # The weights are exactly those of ``base_model`` (an un-fine-tuned baseline): record the source only.
            if base_model is None:
                raise ValueError("reference_only needs base_model (the model source whose weights are used unchanged)")
            model_info = {"kind": "base", "path": None, "base": base_model}
        elif is_adapter:
            if base_model is None:
                raise ValueError("an adapter bundle needs base_model (the model source the adapter applies to)")
            model.save_pretrained(tmp / "adapter")
            model_info = {"kind": "adapter", "path": "adapter", "base": base_model}
        else:
            model.save_pretrained(tmp / "model")
            model_info = {"kind": "full", "path": "model", "base": base_model}
        model_info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        tokenizer.save_pretrained(tmp / "tokenizer")
        head.save(tmp / "head")
        body = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "model": model_info,
            "chat": {**chat.to_dict(), "template": getattr(tokenizer, "chat_template", None)},
            "tags": tags.to_dict(),
            "recipe": recipe.to_dict(),
            "head": {"path": "head", **head.summary()},
            "provenance": provenance or {},
        }
        if certification is not None:
            body["certification"] = certification
        if baselines is not None:
            body["baselines"] = baselines
        _write_manifest(tmp, body)
        share_like_umask(tmp)  # mkdtemp made it 0700: readable by other users (a container's) like any folder

    return atomic_folder(folder, write, if_exists="error")


def _write_manifest(root: Path, body: dict) -> None:
    """Write ``bundle.json`` for the files now under ``root``: their sha256, then the manifest's own."""
    body = {k: v for k, v in body.items() if k not in ("files", "bundle_sha256")}
    body["files"] = _files_digest(root)
    body["bundle_sha256"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    (root / BUNDLE_JSON).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


def _read_manifest(root: Path) -> dict:
    """``bundle.json`` parsed, with its format and version checked (not its checksums)."""
    path = root / BUNDLE_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not an sdm-lm bundle: {BUNDLE_JSON} is missing (build one with python -m training.calibrate)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if raw.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{root} holds format {raw.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if raw.get("format_version") != BUNDLE_VERSION:
        raise ArtifactError(
            f"{root} has bundle format_version {raw.get('format_version')!r}; this sdm-lm reads {BUNDLE_VERSION}"
        )
    return raw


def seal_bundle(folder: str | os.PathLike, updates: dict | None = None) -> BundleInfo:
    """Re-seal a bundle in place after its files were changed on purpose (a recalibrated or extended head, a new
    certification): the head summary is re-read from ``head/``, ``updates`` replace top-level manifest entries
    (e.g. ``certification``, ``provenance``), and every file's sha256 and the manifest's own are recomputed.

    The manifest must still parse and name this format; its old checksums are not checked (that is the point)."""
    root = Path(folder)
    raw = _read_manifest(root)
    head = SDMEstimator.load(root / raw["head"]["path"])
    body = {**raw, **(updates or {})}
    body["head"] = {"path": raw["head"]["path"], **head.summary()}
    _write_manifest(root, body)
    return read_bundle_info(root)


def read_bundle_info(folder: str | os.PathLike, verify: bool = True) -> BundleInfo:
    """Parse and (by default) verify a bundle's manifest and the sha256 of every file it lists."""
    root = Path(folder)
    path = root / BUNDLE_JSON
    raw = _read_manifest(root)
    body = {k: v for k, v in raw.items() if k != "bundle_sha256"}
    if raw.get("bundle_sha256") != hashlib.sha256(canonical_json(body).encode()).hexdigest():
        raise ArtifactError(f"{path} has been modified since it was written; rebuild the bundle")
    if verify:
        listed = raw.get("files", {})
        for rel, expected in listed.items():
            file = root / rel
            if not file.is_file():
                raise ArtifactError(f"{root} is incomplete: {rel} is missing")
            if sha256_file(file) != expected:
                raise ArtifactError(f"{file} has been modified or corrupted; rebuild the bundle")
        extra = set(_files_digest(root)) - set(listed)
        if extra:
            raise ArtifactError(f"{root} holds files the manifest does not list: {sorted(extra)[:5]}")
    return BundleInfo(
        path=root,
        model=raw["model"],
        chat=ChatFormat.from_dict(raw["chat"]),
        tags=VerificationTags.from_dict(raw["tags"]),
        recipe=HiddenStateRecipe.from_dict(raw["recipe"]),
        head=raw["head"],
        provenance=raw.get("provenance", {}),
        raw=raw,
    )


def load_bundle(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = True, device: str = "cpu"
) -> Bundle:
    """Load the LM (merging an adapter into its base), tokenizer and SDM head of a bundle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdm_core.lm.models import load_model

    info = read_bundle_info(folder, verify=verify)
    root = info.path
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    if info.model["kind"] == "full":
        model = AutoModelForCausalLM.from_pretrained(str(root / info.model["path"]), dtype=dtype)
    elif info.model["kind"] == "base":
        model = load_model(info.model["base"], dtype=dtype)
    elif info.model["kind"] == "adapter":
        from peft import PeftModel

        base = load_model(info.model["base"], dtype=dtype)
        model = PeftModel.from_pretrained(base, str(root / info.model["path"])).merge_and_unload()
    else:
        raise ArtifactError(f"{root}: unknown model kind {info.model['kind']!r}")
    # PreTrainedModel.to is wrapped with functools.wraps(nn.Module.to), whose typing leaves self unbound.
    model.to(device).eval()  # type: ignore[arg-type]
    return Bundle(info=info, model=model, tokenizer=tokenizer, head=load_head(info))


def load_head(info: BundleInfo) -> SDMEstimator:
    """The bundle's SDM head as served: the regions its certification withdrew are removed from the ladder."""
    head = SDMEstimator.load(info.path / info.head["path"])
    certification = info.certification
    if certification is not None and certification.withdrawn:
        head.ladder = withdraw_regions(head.fitted_parts().ladder, certification.withdrawn)
    return head
