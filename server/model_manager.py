"""The served model's lifecycle: background load and warm-up (readiness), reference-counted use by requests, and
hot reload (a new bundle is loaded and warmed up beside the old one, swapped in atomically, and the old one is
closed only once its last in-flight request has finished)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.backends.base import Backend
from server.errors import APIError, internal_error, invalid_request, not_ready
from server.pipeline import SelectivePipeline, VerificationRequest

__all__ = ["ServedModel", "ModelManager", "bundle_facts"]

WARMUP_PROMPT = "Reply with one word."


def bundle_facts(backend: Backend, model_name: str) -> dict:
    """What /v1/models and the sdm_bundle metric report about a loaded bundle."""
    info = backend.info
    ladder = backend.head.ladder
    region = ladder.regions[ladder.default_alpha]
    files = info.raw.get("files", {})
    head_digest = files.get(f"{info.head.get('path', 'head')}/manifest.json", "")
    return {
        "model": model_name,
        "bundle": Path(info.path).resolve().name,  # a name: facts reach responses and metrics, host paths must not
        "bundle_sha256": str(info.raw.get("bundle_sha256", ""))[:16],
        "head_version": head_digest[:16],
        "model_kind": info.model.get("kind"),
        "default_alpha": ladder.default_alpha,
        "alphas": list(ladder.alphas),
        "calibration_admitted": region.calibration_admitted,
        "calibration_size": region.calibration_size,
        "calibration_admitted_proportion": region.calibration_admitted / region.calibration_size
        if region.calibration_size
        else 0.0,
        "certification": certification_facts(info.certification),
    }


def certification_facts(certification) -> dict | None:
    """The bundle's held-out certification as /v1/models shows it: which alphas it certified and withdrew, and per
    alpha the admitted and correct answers on the certification split with the test's p-value and lower bound."""
    if certification is None:
        return None
    return {
        "documents": certification.documents,
        "policy": certification.policy,
        "certified_alphas": list(certification.certified),
        "withdrawn_alphas": list(certification.withdrawn),
        "summary": certification.summary(),
        "alphas": {
            f"{r.alpha:g}": {
                "admitted": r.admitted,
                "correct": r.correct,
                "accuracy": r.accuracy,
                "p_value": r.p_value,
                "lower_bound": r.lower_bound,
                "status": r.status,
            }
            for r in certification.rows
        },
    }


def _without_paths(text: str, path: str, name: str) -> str:
    """``text`` with the bundle's host path (as given and resolved) replaced by its name."""
    for variant in sorted({str(Path(path).expanduser().resolve()), str(path)}, key=len, reverse=True):
        text = text.replace(variant, f"<{name}>")
    return text


@dataclass
class ServedModel:
    backend: Backend
    pipeline: SelectivePipeline
    facts: dict
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


class ModelManager:
    """Owns the current :class:`ServedModel`. States: loading, warming_up, ready, failed."""

    def __init__(
        self,
        backend: Backend,
        *,
        model_name: str,
        warmup: bool = True,
        warmup_max_tokens: int = 4,
        on_loaded: Callable[[dict], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._initial = backend
        self.model_name = model_name
        self.warmup = warmup
        self.warmup_max_tokens = warmup_max_tokens
        self.on_loaded = on_loaded
        self.logger = logger or logging.getLogger("sdm.server")
        self.state = "loading"
        self.error: str | None = None
        self.current: ServedModel | None = None
        self._task: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, ServedModel] = {}

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.current is not None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm up in the background; /ready answers 503 until this finishes."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._initial_load(), name="sdm-initial-load")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return self.ready

    async def _initial_load(self) -> None:
        started = time.perf_counter()
        try:
            served = await self._prepare(self._initial, set_state=True)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and the log
            self.state = "failed"
            path = self._initial.bundle_path  # the error reaches /ready and 503s: the bundle by name, not by host path
            self.error = f"{type(exc).__name__}: {_without_paths(str(exc), path, Path(path).name)}"
            self.logger.error("loading the bundle failed: %s", self.error, exc_info=True)
            await self._initial.close()
            return
        self.current = served
        self.state = "ready"
        self.logger.info(
            "ready", extra={"bundle": served.backend.bundle_path, "seconds": round(time.perf_counter() - started, 2)}
        )

    async def _prepare(self, backend: Backend, set_state: bool) -> ServedModel:
        if set_state:
            self.state = "loading"
        self.logger.info("loading bundle", extra={"bundle": backend.bundle_path})
        await backend.load()
        pipeline = SelectivePipeline(backend)
        try:
            served = ServedModel(backend=backend, pipeline=pipeline, facts=bundle_facts(backend, self.model_name))
            if self.warmup:
                if set_state:
                    self.state = "warming_up"
                prompt = pipeline.prepare(WARMUP_PROMPT)
                result = await pipeline.run(VerificationRequest(prompt, max_tokens=self.warmup_max_tokens))
                self.logger.info(
                    "warm-up passed", extra={"verified": result.best.verified, "probability": result.best.probability}
                )
        except BaseException:
            pipeline.close()
            raise
        if self.on_loaded is not None:
            self.on_loaded(served.facts)
        return served

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for task, old in list(self._retiring.items()):
            task.cancel()
            old.pipeline.close()
            await old.backend.close()
        self._retiring.clear()
        if self.current is not None:
            self.current.pipeline.close()
            await self.current.backend.close()
            self.current = None
        await self._initial.close()  # idempotent
        self.state = "closed"

    # -- use by requests ---------------------------------------------------------------------------------------
    def hold(self) -> ServedModel:
        """The current model, counted as in use until :meth:`release`. 503 when not ready."""
        if not self.ready:
            if self.state == "failed":
                raise not_ready(
                    f"the model failed to load ({self.error}); fix the bundle and restart or POST /admin/reload"
                )
            raise not_ready()
        served = self.current
        assert served is not None
        served.in_flight += 1
        served.idle.clear()
        return served

    @staticmethod
    def release(served: ServedModel) -> None:
        served.in_flight -= 1
        if served.in_flight <= 0:
            served.in_flight = 0
            served.idle.set()

    # -- reload ------------------------------------------------------------------------------------------------
    async def reload(self, bundle_path: str | None = None) -> ServedModel:
        """Load ``bundle_path`` (default: the current one, re-read) beside the current model, warm it up, swap it in.
        The old model keeps serving until the swap and is closed after its in-flight requests finish."""
        async with self._reload_lock:
            base = self.current.backend if self.current is not None else self._initial
            path = bundle_path or base.bundle_path
            name = Path(path).name  # what errors call it: they go to clients, host paths must not
            if not (Path(path) / "bundle.json").is_file():
                raise invalid_request(
                    f"bundle {name!r} is not an sdm-lm bundle (no bundle.json)", "bundle", "invalid_bundle"
                )
            backend = base.with_bundle(path)
            try:
                served = await self._prepare(backend, set_state=self.current is None)
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving
                await backend.close()
                self.logger.error("reload failed; still serving the previous bundle", exc_info=True)
                if isinstance(exc, APIError):
                    raise
                detail = _without_paths(str(exc), path, name)
                if isinstance(exc, (ValueError, OSError)):
                    raise invalid_request(
                        f"could not load bundle {name!r}: {detail}", "bundle", "invalid_bundle"
                    ) from exc
                raise internal_error(f"could not load bundle {name!r}: {type(exc).__name__}: {detail}") from exc
            old = self.current
            self.current = served
            self.state = "ready"
            self.error = None
            self.logger.info(
                "reloaded", extra={"bundle": served.backend.bundle_path, "head_version": served.facts["head_version"]}
            )
            if old is not None:
                task = asyncio.get_running_loop().create_task(self._retire(old), name="sdm-retire")
                self._retiring[task] = old
                task.add_done_callback(lambda t: self._retiring.pop(t, None))
            return served

    async def _retire(self, old: ServedModel) -> None:
        await old.idle.wait()
        old.pipeline.close()
        await old.backend.close()
        self.logger.info("previous bundle closed", extra={"bundle": old.backend.bundle_path})
