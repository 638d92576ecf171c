"""Keeping the ranks of a data-parallel run in step: every collective (DDP's gradient reduction in each backward,
FSDP's weight gathering in each forward) must be entered by every rank the same number of times, and the values
that decide a step (token counts, whether b comes from the training forward) must agree across ranks."""

from __future__ import annotations

import torch

__all__ = ["RankSync"]


class RankSync:
    """The reductions the fine-tuning loop needs, each a no-op in a one-process run."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def single(self) -> bool:
        return self.accelerator.num_processes == 1

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks, in one reduction."""
        if self.single:
            return list(values)
        return self.accelerator.reduce(
            torch.tensor(values, dtype=torch.float64, device=self.accelerator.device), "sum"
        ).tolist()

    def missing_passes(self, passes: int) -> int:
        """How many passes this rank runs with no documents of its own so that every rank runs as many forward and
        backward passes as the busiest one: a rank short of documents in an epoch's last step would otherwise leave
        the others waiting for ever."""
        if self.single:
            return 0
        count = torch.tensor([passes], device=self.accelerator.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item()) - passes

    def step_agreement(self, tokens: int, micro_batches: int, shared: bool) -> tuple[int, int, bool]:
        """What the ranks must agree on before a step's passes, in one collective: the step's unmasked tokens over
        all ranks, how many idle passes this rank runs (see :meth:`missing_passes`), and whether every rank can
        take b from the training forward."""
        if self.single:
            return tokens, 0, shared
        rows = self.accelerator.gather(
            torch.tensor([[tokens, micro_batches, int(shared)]], device=self.accelerator.device)
        )
        return int(rows[:, 0].sum()), int(rows[:, 1].max()) - micro_batches, bool(rows[:, 2].min())

    def union(self, store: dict[str, list[str]]) -> dict[str, list[str]]:
        """The union of every rank's {document id: hard negatives} (each document belongs to one rank a step)."""
        if self.single:
            return store
        from accelerate.utils import gather_object

        merged: dict[str, list[str]] = {}
        for part in gather_object([store]):
            for doc_id, negatives in part.items():
                kept = merged.setdefault(doc_id, [])
                kept.extend(n for n in negatives if n not in kept)
        return merged
