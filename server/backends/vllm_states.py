"""Final-layer hidden states out of a running vLLM engine: a worker extension that records them per request.

vLLM 0.32 returns no hidden states from a generating request, and one engine runs one runner type (generation or
pooling: ``GPUModelRunner.get_supported_tasks``), so the SDM head's input would otherwise need a second copy of
the weights (a transformers model, or a pooling engine). This extension is loaded into vLLM's own worker with the
engine argument ``worker_extension_cls`` (vLLM's extension point for ``collective_rpc``). Its
:meth:`StateCaptureExtension.sdm_capture_install` wraps the model runner's ``_model_forward`` (the method vLLM
documents as the one to override for model execution) on that runner instance: after every forward it copies the
states of requests whose id starts with :data:`CAPTURE_PREFIX` (the model's output: the final norm's output, what
``embed_texts`` reads with layer -1), placed by position, so chunked prefills and decode steps all land in one
table per request. :meth:`sdm_capture_pop` pools a request's first ``n`` positions with the recipe's
:func:`sdm_core.lm.embedding.pool_states` in the worker (only the pooled (2H,) vector crosses the process
boundary) and forgets the request.

Only the positions the engine computes are recorded: a request must not read the prefix cache
(``SamplingParams(skip_reading_prefix_cache=True)``), or its cached positions are missing and the pop returns None.
With tensor parallelism every rank holds the full states after the all-reduce; rank 0 answers. Pipeline
parallelism (the last stage alone holds them) is not supported: install refuses it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["CAPTURE_PREFIX", "EXTENSION_QUALNAME", "StateCaptureExtension"]

logger = logging.getLogger("sdm.server.vllm")

CAPTURE_PREFIX = "sdm-cap-"
EXTENSION_QUALNAME = "server.backends.vllm_states.StateCaptureExtension"
# Requests whose states are kept at most (their owner pops or drops them; this bounds what a lost one costs).
MAX_CAPTURED_REQUESTS = 1024


class _Table:
    """One request's recorded states: chunks of (positions, states) in the order the engine ran them."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def states(self, n: int) -> torch.Tensor | None:
        """(n, H) float32 states of positions 0..n-1, or None when one of them was never computed."""
        return _merged_states([self], n)[0]


def _merged_states(tables: list[_Table], n: int, limit: int | None = None) -> tuple[torch.Tensor | None, int]:
    """(n, H) float32 states of positions 0..n-1 from ``tables`` (a position the first of them holds is taken from
    it, else from the next that holds it; tables after the first give positions below ``limit`` only), or None when
    a position is in none; and how many positions the first table held."""
    chunks = [chunk for table in tables for chunk in table.chunks]
    if not chunks or n < 1:
        return None, 0
    out = torch.empty((n, chunks[0][1].shape[1]), dtype=torch.float32, device=chunks[0][1].device)
    seen = torch.zeros(n, dtype=torch.bool, device=out.device)
    first = 0
    for k, table in enumerate(tables):
        bound = n if k == 0 or limit is None else min(n, limit)
        for positions, states in table.chunks:
            keep = (positions < bound) & ~seen[positions.clamp(max=n - 1)]
            out[positions[keep]] = states[keep]
            seen[positions[keep]] = True
        if k == 0:
            first = int(seen.sum())
    return (out if bool(seen.all()) else None), first


class StateCaptureExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``; its methods are called by ``collective_rpc``."""

    def sdm_capture_install(self) -> bool:
        """Start recording (idempotent). Returns True on the rank whose states :meth:`sdm_capture_pop` reads."""
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        if get_pp_group().world_size > 1:
            raise RuntimeError(
                "the engine head input does not support pipeline parallelism; use --vllm-hidden-states transformers"
            )
        runner = self.model_runner  # type: ignore[attr-defined]
        if getattr(runner, "_sdm_tables", None) is not None:
            return get_tp_group().rank_in_group == 0
        tables: OrderedDict[str, _Table] = OrderedDict()
        runner._sdm_tables = tables
        if get_tp_group().rank_in_group != 0:
            return False
        original = runner._model_forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            try:
                _record(runner, tables, kwargs.get("positions"), output)
            except Exception:
                logger.exception("recording hidden states failed")
            return output

        runner._model_forward = forward
        return True

    def sdm_capture_pop(self, request_id: str, n: int, recipe: dict) -> list[float] | None:
        """The recipe-pooled (2H,) float32 vector of ``request_id``'s first ``n`` positions as a list (float32
        values are exact in Python floats; the RPC carries plain lists), or None when they were not all computed
        (or this rank records nothing); the request's states are forgotten either way."""
        from sdm_core.lm.embedding import HiddenStateRecipe, pool_states

        tables = getattr(self.model_runner, "_sdm_tables", None)  # type: ignore[attr-defined]
        if not tables:
            return None
        table = _take(tables, request_id)
        if table is None:
            return None
        states = table.states(int(n))
        if states is None:
            return None
        return pool_states(states, HiddenStateRecipe.from_dict(recipe)).cpu().tolist()

    def sdm_capture_pop_merged(self, request_ids: list[str], n: int, recipe: dict, limit: int) -> dict | None:
        """As :meth:`sdm_capture_pop` for a verification request that read the prefix cache: its first ``n``
        positions taken from its own states where it computed them, else from the states of the earlier requests in
        ``request_ids[1:]`` (the generation whose tokens the text repeats up to position ``limit``). ``{"h": (2H,)
        list, "computed": positions the verification request computed}``, or None when a position is in none of
        them; all are forgotten."""
        from sdm_core.lm.embedding import HiddenStateRecipe, pool_states

        tables = getattr(self.model_runner, "_sdm_tables", None)  # type: ignore[attr-defined]
        if not tables:
            return None
        taken = [_take(tables, rid) for rid in request_ids]
        if taken[0] is None:
            return None
        states, computed = _merged_states([t for t in taken if t is not None], int(n), int(limit))
        if states is None:
            return None
        return {"h": pool_states(states, HiddenStateRecipe.from_dict(recipe)).cpu().tolist(), "computed": computed}

    def sdm_capture_drop(self, request_ids: list[str]) -> int:
        """Forget the states of ``request_ids`` (finished without a pop); returns how many were held."""
        tables = getattr(self.model_runner, "_sdm_tables", None)  # type: ignore[attr-defined]
        if not tables:
            return 0
        return sum(_take(tables, rid) is not None for rid in request_ids)

    def sdm_capture_count(self) -> int:
        """Requests whose states are held (for tests: nothing may leak)."""
        tables = getattr(self.model_runner, "_sdm_tables", None)  # type: ignore[attr-defined]
        return len(tables) if tables else 0


def _take(tables: OrderedDict[str, _Table], request_id: str) -> _Table | None:
    # vLLM appends "-<8 random chars>" to the caller's request id inside the engine (InputProcessor).
    for key in list(tables):
        if key == request_id or key.startswith(request_id + "-"):
            return tables.pop(key)
    return None


def _record(runner, tables: OrderedDict[str, _Table], positions: torch.Tensor | None, output: Any) -> None:
    if not isinstance(output, torch.Tensor) or positions is None:
        return
    batch = runner.input_batch
    num_reqs = int(batch.num_reqs)
    req_ids = batch.req_ids[:num_reqs]
    if not any(r.startswith(CAPTURE_PREFIX) for r in req_ids):
        return
    if positions.ndim == 2:  # M-RoPE: (3, N); the first row is the text position
        positions = positions[0]
    starts = runner.query_start_loc.np[: num_reqs + 1]
    for i, rid in enumerate(req_ids):
        if not rid.startswith(CAPTURE_PREFIX):
            continue
        lo, hi = int(starts[i]), int(starts[i + 1])
        if hi <= lo:
            continue
        table = tables.get(rid)
        if table is None:
            table = tables[rid] = _Table()
            while len(tables) > MAX_CAPTURED_REQUESTS:
                dropped, _ = tables.popitem(last=False)
                logger.warning(
                    "dropped the recorded states of %s (more than %d requests held)", dropped, MAX_CAPTURED_REQUESTS
                )
        table.chunks.append((positions[lo:hi].to(torch.long).clone(), output[lo:hi].float().clone()))
