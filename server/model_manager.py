"""The served models' lifecycle: background load and warm-up (readiness), reference-counted use by requests, and
hot reload (a new bundle is loaded and warmed up beside the old one, swapped in atomically, and the old one is
closed only once its last in-flight request has finished).

One server serves one bundle, or several adapter bundles on one base model (``--extra-bundles``): each served
model has its own name, backend, pipeline and facts; a request holds the one its ``model`` names, and a reload
swaps one while the others keep serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from server.backends.base import Backend, BackendError
from server.errors import APIError, internal_error, invalid_request, not_found, not_ready
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
    """Owns the :class:`ServedModel` of every served name. States: loading, warming_up, ready, failed, closed;
    ``on_ready`` hears :attr:`ready` at every change of state. ``model_states`` says where each name is: waiting
    (loads after the names before it), loading, warming_up, ready, failed, not_loaded (another name failed first) or
    closed.

    ``backend`` serves ``model_name`` (the default: requests that name no model); ``extra`` maps more names to
    their backends (adapter views on one shared ``engine``, server/backends/adapters.py), which is closed last."""

    def __init__(
        self,
        backend: Backend,
        *,
        model_name: str,
        extra: Mapping[str, Backend] | None = None,
        engine: Backend | None = None,
        warmup: bool = True,
        warmup_max_tokens: int = 4,
        on_loaded: Callable[[dict], None] | None = None,
        on_ready: Callable[[bool], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._initial: dict[str, Backend] = {model_name: backend, **(extra or {})}
        self._engine = engine
        self.model_name = model_name
        self.warmup = warmup
        self.warmup_max_tokens = warmup_max_tokens
        self.on_loaded = on_loaded
        self.on_ready = on_ready
        self.logger = logger or logging.getLogger("sdm.server")
        self.error: str | None = None
        self.served: dict[str, ServedModel] = {}
        # The default loads first: it is "loading" from the start, as the manager is.
        self.model_states = {n: "loading" if n == model_name else "waiting" for n in self._initial}
        self.state = "loading"
        self._task: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, ServedModel] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Every served model's name, the default first."""
        return tuple(self._initial)

    @property
    def current(self) -> ServedModel | None:
        """The default model (the one requests that name no model get)."""
        return self.served.get(self.model_name)

    @property
    def ready(self) -> bool:
        """Every served name loaded and warmed up (what /ready and the sdm_ready gauge say)."""
        return self.state == "ready" and len(self.served) == len(self._initial)

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        # Readiness changes only with the state: "ready" is set once every name is served, any other state is not.
        self._state = value
        if self.on_ready is not None:
            self.on_ready(self.ready)

    def _stage(self, name: str, stage: str, whole: bool) -> None:
        """``name`` reached ``stage``; ``whole``: the manager's state follows. A served name stays "ready" while its
        next bundle loads beside it."""
        if name not in self.served:
            self.model_states[name] = stage
        if whole:
            self.state = stage

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
        for name, backend in self._initial.items():
            try:
                self.served[name] = await self._prepare(backend, name, set_state=True)
                self.model_states[name] = "ready"
            except Exception as exc:  # noqa: BLE001 - reported by /ready and the log
                self.model_states = {n: "failed" if n == name else "not_loaded" for n in self._initial}
                self.state = "failed"
                detail = str(exc)
                for other in self._initial.values():  # errors reach /ready and 503s: bundles by name, not host path
                    detail = _without_paths(detail, other.bundle_path, Path(other.bundle_path).name)
                which = f"model {name!r}: " if len(self._initial) > 1 else ""
                self.error = f"{which}{type(exc).__name__}: {detail}"
                self.logger.error("loading the bundle failed: %s", self.error, exc_info=True)
                for loaded in self.served.values():
                    loaded.pipeline.close()
                self.served.clear()
                for other in self._initial.values():
                    await other.close()
                if self._engine is not None:
                    await self._engine.close()
                return
        self.state = "ready"
        self.logger.info(
            "ready",
            extra={
                "bundle": self._initial[self.model_name].bundle_path,
                "models": list(self._initial),
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    async def _prepare(self, backend: Backend, name: str, set_state: bool) -> ServedModel:
        self._stage(name, "loading", set_state)
        self.logger.info("loading bundle", extra={"bundle": backend.bundle_path, "model": name})
        await backend.load()
        pipeline = SelectivePipeline(backend)
        try:
            served = ServedModel(backend=backend, pipeline=pipeline, facts=bundle_facts(backend, name))
            if self.warmup:
                self._stage(name, "warming_up", set_state)
                prompt = pipeline.prepare(WARMUP_PROMPT)
                result = await pipeline.run(VerificationRequest(prompt, max_tokens=self.warmup_max_tokens))
                self.logger.info(
                    "warm-up passed",
                    extra={"model": name, "verified": result.best.verified, "probability": result.best.probability},
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
        for served in self.served.values():
            served.pipeline.close()
            await served.backend.close()
        self.served.clear()
        for backend in self._initial.values():
            await backend.close()  # idempotent
        if self._engine is not None:
            await self._engine.close()
        self.model_states = dict.fromkeys(self._initial, "closed")
        self.state = "closed"

    # -- use by requests ---------------------------------------------------------------------------------------
    def unknown_model(self, name: str) -> APIError:
        """The 404 for a request naming a model this server does not serve."""
        served = ", ".join(repr(n) for n in self._initial)
        return not_found(
            f"the model {name!r} does not exist; this server serves {served} (GET /v1/models)",
            "model",
            "model_not_found",
        )

    def hold(self, name: str | None = None) -> ServedModel:
        """The model ``name`` names (None: the default), counted as in use until :meth:`release`. 404 for a name
        this server does not serve, 503 when not ready."""
        if name is not None and name not in self._initial:
            raise self.unknown_model(name)
        if not self.ready:
            if self.state == "failed":
                raise not_ready(
                    f"the model failed to load ({self.error}); fix the bundle and restart or POST /admin/reload"
                )
            raise not_ready()
        served = self.served[name if name is not None else self.model_name]
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
    async def reload(self, bundle_path: str | None = None, name: str | None = None) -> ServedModel:
        """Load ``bundle_path`` (default: the one served, re-read) for the model ``name`` (default: the default
        model) beside the one it serves, warm it up, swap it in. The old one keeps serving until the swap and is
        closed after its in-flight requests finish; the other served models are not touched."""
        name = name if name is not None else self.model_name
        if name not in self._initial:
            raise self.unknown_model(name)
        async with self._reload_lock:
            current = self.served.get(name)
            base = current.backend if current is not None else self._initial[name]
            path = bundle_path or base.bundle_path
            folder = Path(path).name  # what errors call it: they go to clients, host paths must not
            if not (Path(path) / "bundle.json").is_file():
                raise invalid_request(
                    f"bundle {folder!r} is not an sdm-lm bundle (no bundle.json)", "bundle", "invalid_bundle"
                )
            backend = base.with_bundle(path)
            try:
                served = await self._prepare(backend, name, set_state=not self.served)
            except Exception as exc:  # noqa: BLE001 - the old model keeps serving
                await backend.close()
                if name not in self.served:
                    self.model_states[name] = "failed"
                    if not self.served:  # _prepare moved the whole manager to loading: nothing serves, say so
                        self.state = "failed"
                self.logger.error("reload failed; still serving the previous bundle", exc_info=True)
                if isinstance(exc, APIError):
                    raise
                detail = _without_paths(str(exc), path, folder)
                if isinstance(exc, (ValueError, OSError, BackendError)):
                    raise invalid_request(
                        f"could not load bundle {folder!r}: {detail}", "bundle", "invalid_bundle"
                    ) from exc
                raise internal_error(f"could not load bundle {folder!r}: {type(exc).__name__}: {detail}") from exc
            old = current
            self.served[name] = served
            self.model_states[name] = "ready"
            if len(self.served) == len(self._initial):
                self.state = "ready"
                self.error = None
            self.logger.info(
                "reloaded",
                extra={
                    "model": name,
                    "bundle": served.backend.bundle_path,
                    "head_version": served.facts["head_version"],
                },
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
