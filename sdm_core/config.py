"""One validated configuration for fitting an SDM layer and its estimator (defaults: SDM_SPEC §1.7, §3.8)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from sdm_core.calibration import DEFAULT_ALPHA_LADDER
from sdm_core.math import check_alpha
from sdm_core.support import MAX_Q

__all__ = ["SDMConfig"]


@dataclass(frozen=True)
class SDMConfig:
    exemplar_dim: int = 1000
    epochs: int = 200
    batch_size: int = 50
    learning_rate: float = 1e-5
    max_q: int = MAX_Q
    # J random splits/initialisations; J > 1 with shuffle_splits pools train + calibration and halves them.
    iterations: int = 1
    shuffle_splits: bool = False
    alpha: float = 0.95
    alpha_ladder: tuple[float, ...] = DEFAULT_ALPHA_LADDER
    nested_regions: bool = True
    # "paper": Eq. 11 (<=, no cap); "reference": the reference code (<, capped at n_c - 1). SDM_SPEC §7 item 6.
    effective_sample_size_rule: str = "paper"
    normalize: bool = True
    backend: str = "torch"
    seed: int = 0
    eval_batch_size: int = 4096
    progress: bool = True
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("exemplar_dim", "epochs", "batch_size", "max_q", "iterations", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        check_alpha(self.alpha, "alpha")
        ladder = tuple(
            sorted(
                {round(check_alpha(a, "alpha_ladder"), 10) for a in self.alpha_ladder} | {round(self.alpha, 10)},
                reverse=True,
            )
        )
        object.__setattr__(self, "alpha_ladder", ladder)
        if self.effective_sample_size_rule not in ("paper", "reference"):
            raise ValueError(
                f"effective_sample_size_rule must be 'paper' or 'reference', got {self.effective_sample_size_rule!r}"
            )
        if self.backend not in ("torch", "faiss", "auto"):
            raise ValueError(f"backend must be 'torch', 'faiss' or 'auto', got {self.backend!r}")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["alpha_ladder"] = list(self.alpha_ladder)
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SDMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SDMConfig keys {unknown}; known keys are {sorted(known)}")
        values = dict(data)
        for key in ("alpha_ladder", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)
