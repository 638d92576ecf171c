"""What the fine-tuning loop carries from step to step (and through a checkpoint), what it returns, and the hook
through which callers observe it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TrainerState", "TrainResult", "TrainerCallback"]


@dataclass
class TrainerState:
    """The loop's position and everything a resumed run needs to make exactly the draws an uninterrupted one makes.

    Hard-negative stores map a document id to its generated hard negatives."""

    epoch: int = 0
    step: int = 0
    best_eval_loss: float = math.inf
    best_step: int = -1
    previous_hard_negatives: dict[str, list[str]] = field(
        default_factory=dict
    )  # the last completed epoch's: feed the next training layer
    epoch_hard_negatives: dict[str, list[str]] = field(default_factory=dict)  # generated in the current epoch
    validation_hard_negatives: dict[str, list[str]] = field(
        default_factory=dict
    )  # the last evaluation's: feed the next validation layer
    pregenerated: dict[str, str] = field(
        default_factory=dict
    )  # generation_timing "epoch": decoded, not yet drawn, by document
    history: list[dict] = field(default_factory=list)  # every metrics record logged so far

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in a checkpoint (``checkpoint.json``'s ``trainer``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"the checkpoint's trainer state has unknown fields {sorted(unknown)}; it was written by "
                "another version of training.trainer: start without --resume"
            )
        return cls(**data)


@dataclass
class TrainResult:
    output_dir: Path
    best_dir: Path
    best_eval_loss: float
    best_step: int
    steps: int
    history: list[dict] = field(default_factory=list)


class TrainerCallback(Protocol):
    """Called by :class:`training.trainer.SDMTrainer` on every rank right after each checkpoint is complete."""

    def on_checkpoint(self, trainer: Any) -> None: ...
