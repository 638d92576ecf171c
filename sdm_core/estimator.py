"""The SDM estimator: an SDM layer plus Algorithm 1 regions, with scikit-learn's fit / predict / save / load.

``SDMEstimator.score`` returns every quantity of SDM_SPEC §2.4–§2.6 for each input: logits, q, d, SDM
probabilities, q', the OOD flag, the HIGH-RELIABILITY decision at the requested alpha, the highest ladder alpha
whose region admits the prediction, the abstention reason, the DKW band (SDM_lower/upper, q'_lower, HR_lower),
and optionally the nearest exemplars.

Size: one class, scikit-learn's interface (fit, predict, score, save, load) over one fitted layer and its ladder,
with the scores it returns; the parts that stand alone (fitting, support, calibration, artifact) are modules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import sdm_core._kernels as kernels
from sdm_core import __version__
from sdm_core.adaptor import ExemplarAdaptor
from sdm_core.artifact import ArtifactError, read_artifact, write_artifact
from sdm_core.calibration import RegionLadder, fit_ladder
from sdm_core.config import SDMConfig
from sdm_core.fitting import FittedLayer, LayerStatistics, example_ids, fit_estimator_layers
from sdm_core.math import as_tensor
from sdm_core.support import OOD_LABEL, SupportIndex

__all__ = [
    "SDMEstimator",
    "SDMScores",
    "Exemplar",
    "FittedParts",
    "NotFittedError",
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
]

ARTIFACT_FORMAT = "sdm-core-estimator"
ARTIFACT_VERSION = 1


class NotFittedError(RuntimeError):
    """The estimator was used before ``fit`` or ``load``."""


@dataclass(frozen=True)
class Exemplar:
    """A nearest support exemplar, for interpretability by exemplar."""

    id: str
    label: int
    predicted: int
    distance: float

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "predicted": self.predicted, "distance": self.distance}


@dataclass
class SDMScores:
    """Per-input estimator outputs (row i describes input i). Tensors are CPU tensors.

    ``probabilities_lower`` / ``probabilities_upper`` are the whole SDM output at d_lower / d_upper (ACT Eqs. 16-17):
    they bound the predicted class's probability (lower <= point <= upper), while the other classes' entries move
    the opposite way, since a smaller d flattens the distribution. ``probability_lower`` / ``probability_upper`` in
    :meth:`record` are the predicted class's bounds.
    """

    alpha: float
    logits: torch.Tensor
    predictions: torch.Tensor
    q: torch.Tensor
    d_nearest: torch.Tensor
    d: torch.Tensor
    probabilities: torch.Tensor
    q_prime: torch.Tensor
    is_ood: torch.Tensor
    admitted: torch.Tensor
    region_alpha: list[float | None]
    abstention_reason: list[str | None]
    effective_sample_sizes: torch.Tensor
    epsilon: torch.Tensor
    d_lower: torch.Tensor
    d_upper: torch.Tensor
    probabilities_lower: torch.Tensor
    probabilities_upper: torch.Tensor
    q_prime_lower: torch.Tensor
    admitted_lower: torch.Tensor
    nearest_index: torch.Tensor
    nearest_id: list[str | None]
    exemplars: list[list[Exemplar]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.predictions.shape[0])

    @property
    def probability_predicted(self) -> torch.Tensor:
        return self.probabilities.gather(1, self.predictions.unsqueeze(1)).squeeze(1)

    @property
    def probability_predicted_lower(self) -> torch.Tensor:
        return self.probabilities_lower.gather(1, self.predictions.unsqueeze(1)).squeeze(1)

    def record(self, i: int) -> dict:
        """Row i as JSON-ready Python values."""
        return {
            "prediction": int(self.predictions[i]),
            "logits": [float(v) for v in self.logits[i]],
            "q": int(self.q[i]),
            "d_nearest": float(self.d_nearest[i]),
            "d": float(self.d[i]),
            "sdm_output": [float(v) for v in self.probabilities[i]],
            "probability": float(self.probabilities[i, self.predictions[i]]),
            "q_prime": float(self.q_prime[i]),
            "floor_q_prime": int(math.floor(float(self.q_prime[i]))),
            "is_ood": bool(self.is_ood[i]),
            "alpha": self.alpha,
            "admitted": bool(self.admitted[i]),
            "region_alpha": self.region_alpha[i],
            "abstention_reason": self.abstention_reason[i],
            "effective_sample_sizes": [float(v) for v in self.effective_sample_sizes[i]],
            "epsilon": float(self.epsilon[i]),
            "d_lower": float(self.d_lower[i]),
            "d_upper": float(self.d_upper[i]),
            "sdm_output_lower": [float(v) for v in self.probabilities_lower[i]],
            "sdm_output_upper": [float(v) for v in self.probabilities_upper[i]],
            "probability_lower": float(self.probabilities_lower[i, self.predictions[i]]),
            "probability_upper": float(self.probabilities_upper[i, self.predictions[i]]),
            "q_prime_lower": float(self.q_prime_lower[i]),
            "admitted_lower": bool(self.admitted_lower[i]),
            "nearest_id": self.nearest_id[i],
            "exemplars": [e.to_dict() for e in self.exemplars[i]] if self.exemplars else [],
        }

    def records(self) -> list[dict]:
        return [self.record(i) for i in range(len(self))]


def _neighbour_exemplars(
    support: SupportIndex, exemplars: torch.Tensor, k: int, exclude: torch.Tensor
) -> list[list[Exemplar]]:
    """The k nearest support exemplars of each row of ``exemplars``, nearest first (fewer when the support is
    smaller)."""
    neighbours: list[list[Exemplar]] = []
    dist, pos = support.neighbors(exemplars, k, exclude=exclude)
    for row_d, row_p in zip(dist.tolist(), pos.tolist()):
        neighbours.append(
            [
                Exemplar(support.ids[p], int(support.labels[p]), int(support.predictions[p]), float(dv))
                for dv, p in zip(row_d, row_p)
                if p >= 0
            ]
        )
    return neighbours


def _labels_tensor(labels: object, n: int, num_classes: int | None, name: str) -> torch.Tensor:
    y = as_tensor(labels, name, dtype=torch.long).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per embedding), got {y.shape[0]}")
    if y.numel() and bool((y < 0).any()):
        raise ValueError(f"{name} must be class indices >= 0")
    if num_classes is not None and y.numel() and bool((y >= num_classes).any()):
        raise ValueError(f"{name} must be < num_classes ({num_classes})")
    return y


def _embeddings_tensor(x: object, name: str, dim: int | None = None) -> torch.Tensor:
    t = as_tensor(x, name, dtype=torch.float32)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} must have dimension {dim} (the fitted input dimension), got {t.shape[1]}")
    return t.contiguous()


def _load_adaptor(
    folder: str | os.PathLike, weights: dict[str, torch.Tensor], d_in: int, m: int, c: int
) -> ExemplarAdaptor:
    """The artifact's adaptor, its weights checked against the manifest's dimensions."""
    adaptor = ExemplarAdaptor(d_in, m, c)
    expected = {k: tuple(v.shape) for k, v in adaptor.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        raise ArtifactError(
            f"{folder}: weights do not match input_dim={d_in}, exemplar_dim={m}, num_classes={c} ({found} != "
            f"{expected})"
        )
    adaptor.load_state_dict(weights)
    adaptor.eval()
    return adaptor


class FittedParts(NamedTuple):
    """The parts of a fitted (or loaded) estimator, none of them None (on an unfitted one the attributes are)."""

    adaptor: ExemplarAdaptor
    support: SupportIndex
    ladder: RegionLadder
    calibration: LayerStatistics


class SDMEstimator:
    """An SDM activation layer with its support set, calibration eCDFs and HIGH-RELIABILITY regions."""

    def __init__(self, config: SDMConfig | None = None) -> None:
        self.config = config or SDMConfig()
        self.adaptor: ExemplarAdaptor | None = None
        self.support: SupportIndex | None = None
        self.ladder: RegionLadder | None = None
        self.train_cdfs: list[torch.Tensor] = []
        self.calibration_cdfs: list[torch.Tensor] = []
        self.calibration_ids: list[str] = []
        self.calibration_labels = torch.empty(0, dtype=torch.long)
        self.calibration: LayerStatistics | None = None
        self.metadata: dict = {}
        self._q_prime_cdf_cache: list[torch.Tensor] | None = None
        # (source lists, calibration, training and q' eCDFs as float64): see _scoring_cdfs
        self._scoring_cdf_cache: tuple | None = None

    # -- fitting --------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.fitted_parts().adaptor.num_classes

    @property
    def input_dim(self) -> int:
        return self.fitted_parts().adaptor.input_dim

    @property
    def class_names(self) -> list[str]:
        names = list(self.config.class_names)
        return names if len(names) == self.num_classes else [str(c) for c in range(self.num_classes)]

    def fitted_parts(self) -> FittedParts:
        """The adaptor, support, ladder and calibration statistics; raises NotFittedError before fit or load."""
        if self.adaptor is None or self.support is None or self.ladder is None or self.calibration is None:
            raise NotFittedError("this SDMEstimator is not fitted yet: call fit(...) or SDMEstimator.load(path)")
        return FittedParts(self.adaptor, self.support, self.ladder, self.calibration)

    def fit(
        self,
        train_embeddings: object,
        train_labels: object,
        calibration_embeddings: object,
        calibration_labels: object,
        *,
        num_classes: int | None = None,
        train_ids: Sequence[str] | None = None,
        calibration_ids: Sequence[str] | None = None,
    ) -> SDMEstimator:
        """Fit the layer on the training split (the support) and calibrate on the calibration split."""
        x_tr = _embeddings_tensor(train_embeddings, "train_embeddings")
        x_ca = _embeddings_tensor(calibration_embeddings, "calibration_embeddings", x_tr.shape[1])
        y_tr = _labels_tensor(train_labels, x_tr.shape[0], num_classes, "train_labels")
        y_ca = _labels_tensor(calibration_labels, x_ca.shape[0], num_classes, "calibration_labels")
        if x_tr.shape[0] < 2 or x_ca.shape[0] < 1:
            raise ValueError("fit needs at least 2 training and 1 calibration embeddings")
        c = num_classes if num_classes is not None else int(max(int(y_tr.max()), int(y_ca.max())) + 1)
        if c < 2:
            raise ValueError("fit needs at least 2 classes; pass num_classes when a split lacks a class")
        tr_ids = example_ids(train_ids, x_tr.shape[0], "train", "train_ids")
        ca_ids = example_ids(calibration_ids, x_ca.shape[0], "calibration", "calibration_ids")
        if set(tr_ids) & set(ca_ids):
            raise ValueError("train_ids and calibration_ids must be disjoint")
        started = time.perf_counter()
        layer, iterations = fit_estimator_layers(x_tr, y_tr, x_ca, y_ca, c, self.config, tr_ids, ca_ids)
        self._adopt(layer)
        self.metadata = {
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fit_seconds": round(time.perf_counter() - started, 3),
            "n_train": int(x_tr.shape[0]),
            "n_calibration": int(x_ca.shape[0]),
            "best_epoch": layer.best_epoch,
            "best_calibration_loss": layer.best_calibration_loss,
            "best_iteration": layer.iteration,
            "iterations": iterations,
            "history": layer.history,
            "sdm_lm_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        }
        return self

    def _adopt(self, layer: FittedLayer) -> None:
        self.adaptor = layer.adaptor
        self.support = layer.support
        self.train_cdfs = layer.train_cdfs
        self.calibration_cdfs = layer.calibration_cdfs
        self.calibration_ids = layer.calibration_ids
        self.calibration_labels = layer.calibration_labels
        self.calibration = layer.calibration
        self.recalibrate(self.config.alpha_ladder, self.config.alpha, self.config.nested_regions)

    def recalibrate(
        self, alphas: Sequence[float], default_alpha: float | None = None, nested: bool | None = None
    ) -> RegionLadder:
        """Run Algorithm 1 at a new alpha ladder over the stored calibration outputs, without retraining."""
        if self.calibration is None:
            raise NotFittedError("recalibrate needs a fitted estimator")
        default = self.config.alpha if default_alpha is None else default_alpha
        nested = self.config.nested_regions if nested is None else nested
        self._q_prime_cdf_cache = None
        ladder = fit_ladder(
            self.calibration.probabilities,
            self.calibration.q_prime,
            self.calibration_labels,
            self.calibration.predictions,
            list(alphas) + [default],
            default,
            nested,
        )
        self.ladder = ladder
        self.config = SDMConfig.from_dict(
            {
                **self.config.to_dict(),
                "alpha": ladder.default_alpha,
                "alpha_ladder": list(ladder.alphas),
                "nested_regions": nested,
            }
        )
        return ladder

    # -- scoring --------------------------------------------------------------------------------------------
    def _q_prime_cdfs(self) -> list[torch.Tensor]:
        # Over all calibration points, OOD included (Eq. 11's |D_ca|_c eCDF_c); cached, as scoring needs it per call.
        if self._q_prime_cdf_cache is None:
            q_prime = self.fitted_parts().calibration.q_prime
            self._q_prime_cdf_cache = [
                torch.sort(q_prime[self.calibration_labels == c].to(torch.float64)).values
                for c in range(self.num_classes)
            ]
        return self._q_prime_cdf_cache

    def _scoring_cdfs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Calibration and training distance eCDFs and the q' eCDFs as float64, converted once per state."""
        # The key holds the source lists themselves (compared by identity): fit, load and recalibrate replace them.
        key = (self.calibration_cdfs, self.train_cdfs, self._q_prime_cdfs())
        cached = self._scoring_cdf_cache
        if cached is None or any(a is not b for a, b in zip(cached[0], key)):
            as64 = lambda cdfs: [c.to(torch.float64) for c in cdfs]  # noqa: E731
            cached = (key, as64(self.calibration_cdfs), as64(self.train_cdfs), self._q_prime_cdfs())
            self._scoring_cdf_cache = cached
        return cached[1], cached[2], cached[3]

    def predict(self, embeddings: object) -> torch.Tensor:
        """yhat = argmax z' (never the argmax of the SDM output, SDM_SPEC §1.3)."""
        adaptor = self.fitted_parts().adaptor
        x = _embeddings_tensor(embeddings, "embeddings", self.input_dim)
        logits, _ = adaptor.infer(x, self.config.eval_batch_size)
        return logits.argmax(dim=1)

    def predict_scores(
        self,
        embeddings: object,
        *,
        alpha: float | None = None,
        support_ids: Sequence[str | None] | None = None,
        return_exemplars: int = 0,
    ) -> SDMScores:
        """Every quantity of the estimator for embeddings (N, D), per row: predictions, the SDM output, q, d, q',
        the HIGH-RELIABILITY decision. ``alpha`` must be on the calibrated ladder (default: the estimator's alpha).

        ``support_ids[i]``, when it names a support exemplar, marks row i as that training point: it is excluded
        from its own neighbours and its distance quantile uses the training eCDFs (training-time statistics).
        """
        fitted = self.fitted_parts()
        a = fitted.ladder.resolve_alpha(alpha)
        x = _embeddings_tensor(embeddings, "embeddings", self.input_dim)
        n = x.shape[0]
        if int(return_exemplars) < 0:
            raise ValueError(f"return_exemplars must be >= 0, got {return_exemplars}")
        exclude = (
            fitted.support.positions(support_ids) if support_ids is not None else torch.full((n,), -1, dtype=torch.long)
        )
        if exclude.shape[0] != n:
            raise ValueError(f"support_ids must have {n} entries (one per embedding), got {exclude.shape[0]}")
        # Inference mode skips autograd's per-op bookkeeping (~0.4 ms of a ~5 ms single-document call); the
        # results are cloned outside it so callers get ordinary tensors they may modify or use in autograd.
        with torch.inference_mode():
            scores = self._score_validated(x, a, exclude, support_ids is not None, int(return_exemplars))
        return dataclasses.replace(
            scores,
            **{
                f.name: getattr(scores, f.name).clone()
                for f in dataclasses.fields(scores)
                if isinstance(getattr(scores, f.name), torch.Tensor)
            },
        )

    def score(
        self,
        embeddings: object,
        *,
        alpha: float | None = None,
        support_ids: Sequence[str | None] | None = None,
        return_exemplars: int = 0,
    ) -> SDMScores:
        """Deprecated alias of :meth:`predict_scores`, kept for one release.

        scikit-learn's ``score(X, y)`` returns one float; this method returns per-row records, hence the new name."""
        warnings.warn(
            "SDMEstimator.score is deprecated and will be removed in the next release; use predict_scores "
            "(same arguments, same result)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.predict_scores(embeddings, alpha=alpha, support_ids=support_ids, return_exemplars=return_exemplars)

    def _score_validated(
        self, x: torch.Tensor, a: float, exclude: torch.Tensor, from_support: bool, return_exemplars: int
    ) -> SDMScores:
        """``predict_scores`` for validated inputs: x (N, D) float32, alpha on the ladder, exclusion positions
        (-1: none)."""
        adaptor, support, ladder, _ = self.fitted_parts()
        logits, exemplars = adaptor.infer(x, self.config.eval_batch_size)
        predictions = logits.argmax(dim=1)
        # Inputs are validated above: the formulas run as kernels on the intermediate tensors, unvalidated.
        sim = support.similarity(exemplars, predictions, exclude, check_input=False)
        q = sim.q.to(logits.dtype)
        calibration_cdfs, train_cdfs, q_prime_cdfs = self._scoring_cdfs()
        d = kernels.distance_quantile(sim.d_nearest, calibration_cdfs)
        if from_support:
            in_train = exclude >= 0
            if bool(in_train.any()):
                d = torch.where(in_train, kernels.distance_quantile(sim.d_nearest, train_cdfs), d)
        d = d.to(logits.dtype)
        probabilities = kernels.sdm_probabilities(logits, q, d)
        q_prime = kernels.rescaled_similarity(q, probabilities.gather(1, predictions.unsqueeze(1)).squeeze(1))
        admitted, region_alpha, reasons = ladder.decide(probabilities, predictions, q_prime, a, check_input=False)

        ess = kernels.effective_sample_sizes(q_prime, q_prime_cdfs, self.config.effective_sample_size_rule)
        epsilon = kernels.dkw_epsilon(ess, a).max(dim=1).values.to(logits.dtype)
        d_lower = torch.clamp(d - epsilon, 0.0, 1.0)
        d_upper = torch.clamp(d + epsilon, 0.0, 1.0)
        p_lower = kernels.sdm_probabilities(logits, q, d_lower)
        p_upper = kernels.sdm_probabilities(logits, q, d_upper)
        q_prime_lower = kernels.rescaled_similarity(q, p_lower.gather(1, predictions.unsqueeze(1)).squeeze(1))
        own_lower = ladder.admissions(p_lower, predictions, q_prime_lower, check_input=False)
        admitted_lower = ladder.admitted_at(own_lower, a)

        neighbours = (
            _neighbour_exemplars(support, exemplars, int(return_exemplars), exclude) if return_exemplars else []
        )
        return SDMScores(
            alpha=a,
            logits=logits,
            predictions=predictions,
            q=sim.q,
            d_nearest=sim.d_nearest,
            d=d,
            probabilities=probabilities,
            q_prime=q_prime,
            is_ood=torch.floor(q_prime) <= 0,
            admitted=admitted,
            region_alpha=region_alpha,
            abstention_reason=reasons,
            effective_sample_sizes=ess,
            epsilon=epsilon,
            d_lower=d_lower,
            d_upper=d_upper,
            probabilities_lower=p_lower,
            probabilities_upper=p_upper,
            q_prime_lower=q_prime_lower,
            admitted_lower=admitted_lower,
            nearest_index=sim.nearest_index,
            nearest_id=[support.ids[i] if i >= 0 else None for i in sim.nearest_index.tolist()],
            exemplars=neighbours,
        )

    def nearest_exemplars(self, embeddings: object, k: int = 5) -> list[list[Exemplar]]:
        return self.predict_scores(embeddings, return_exemplars=k).exemplars

    # -- updating the support -------------------------------------------------------------------------------
    def add_exemplars(self, embeddings: object, labels: Sequence[int | str], ids: Sequence[str]) -> None:
        """Append labelled exemplars to the support without retraining. A label of "ood" (or ``OOD_LABEL``)
        marks an exemplar that no prediction can match, which lowers q near it. eCDFs and regions are unchanged.
        """
        adaptor, support, _, _ = self.fitted_parts()
        x = _embeddings_tensor(embeddings, "embeddings", self.input_dim)
        values = []
        for label in labels:
            if isinstance(label, str) and label.lower() == "ood":
                values.append(OOD_LABEL)
            else:
                try:
                    value = int(label)
                except (TypeError, ValueError):
                    raise ValueError(f"labels must be class indices or 'ood', got {label!r}") from None
                if value != OOD_LABEL and not 0 <= value < self.num_classes:
                    raise ValueError(f"labels must be in [0, {self.num_classes - 1}] or 'ood', got {label!r}")
                values.append(value)
        if len(values) != x.shape[0]:
            raise ValueError(f"labels must have {x.shape[0]} entries, got {len(values)}")
        logits, exemplars = adaptor.infer(x, self.config.eval_batch_size)
        support.add(exemplars, torch.tensor(values, dtype=torch.long), logits.argmax(dim=1), ids)

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        adaptor, support, ladder, cal = self.fitted_parts()
        tensors = {
            "weights.safetensors": {k: v for k, v in adaptor.state_dict().items()},
            "support.safetensors": {
                "exemplars": support.exemplars,
                "labels": support.labels,
                "predictions": support.predictions,
            },
            "calibration.safetensors": {
                "labels": self.calibration_labels,
                "logits": cal.logits,
                "predictions": cal.predictions,
                "q": cal.q,
                "d_nearest": cal.d_nearest,
                "d": cal.d,
                "probabilities": cal.probabilities,
                "q_prime": cal.q_prime,
            },
        }
        manifest = {
            "input_dim": adaptor.input_dim,
            "exemplar_dim": adaptor.exemplar_dim,
            "num_classes": adaptor.num_classes,
            "class_names": self.class_names,
            "n_support": len(support),
            "n_calibration": int(self.calibration_labels.shape[0]),
            "normalization": {"mean": float(adaptor.input_mean), "std": float(adaptor.input_std)},
            "config": self.config.to_dict(),
            "regions": ladder.to_dict(),
            "distance_cdfs": {
                "calibration": [c.tolist() for c in self.calibration_cdfs],
                "train": [c.tolist() for c in self.train_cdfs],
            },
            "training": self.metadata,
        }
        ids = {"support": support.ids, "calibration": self.calibration_ids}
        return write_artifact(
            folder,
            format_name=ARTIFACT_FORMAT,
            format_version=ARTIFACT_VERSION,
            tensors=tensors,
            json_files={"ids.json": ids},
            manifest=manifest,
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SDMEstimator:
        manifest, tensors, documents = read_artifact(
            folder, format_name=ARTIFACT_FORMAT, supported_versions=(ARTIFACT_VERSION,)
        )
        try:
            config = SDMConfig.from_dict(manifest["config"])
            d_in, m, c = int(manifest["input_dim"]), int(manifest["exemplar_dim"]), int(manifest["num_classes"])
            weights = tensors["weights.safetensors"]
            support = tensors["support.safetensors"]
            cal = tensors["calibration.safetensors"]
            ids = documents["ids.json"]
            adaptor = _load_adaptor(folder, weights, d_in, m, c)
            n_support = int(manifest["n_support"])
            if (
                tuple(support["exemplars"].shape) != (n_support, m)
                or support["labels"].shape != (n_support,)
                or len(ids["support"]) != n_support
            ):
                raise ArtifactError(f"{folder}: the support set does not have {n_support} exemplars of dimension {m}")
            n_cal = int(manifest["n_calibration"])
            if cal["probabilities"].shape != (n_cal, c) or len(ids["calibration"]) != n_cal:
                raise ArtifactError(f"{folder}: the calibration outputs do not have {n_cal} rows of {c} classes")
            cdfs = manifest["distance_cdfs"]
            if len(cdfs["calibration"]) != c or len(cdfs["train"]) != c:
                raise ArtifactError(f"{folder}: distance eCDFs must have one list per class ({c})")
        except KeyError as exc:
            raise ArtifactError(
                f"{folder}: the artifact lacks {exc}; re-create it with this version of sdm-lm"
            ) from None
        est = cls(config)
        est.adaptor = adaptor
        est.support = SupportIndex(
            support["exemplars"],
            support["labels"],
            support["predictions"],
            ids["support"],
            backend=config.backend,
            max_q=config.max_q,
        )
        est.calibration_cdfs = [torch.tensor(v, dtype=torch.float32) for v in cdfs["calibration"]]
        est.train_cdfs = [torch.tensor(v, dtype=torch.float32) for v in cdfs["train"]]
        est.calibration_ids = list(ids["calibration"])
        est.calibration_labels = cal["labels"]
        est.calibration = LayerStatistics(
            cal["logits"],
            cal["predictions"],
            cal["q"],
            cal["d_nearest"],
            cal["d"],
            cal["probabilities"],
            cal["q_prime"],
        )
        est.ladder = RegionLadder.from_dict(manifest["regions"])
        est.metadata = manifest.get("training", {})
        return est

    def summary(self) -> dict:
        """Dimensions, regions and calibration admitted proportions, for logs and dashboards."""
        _, support, ladder, _ = self.fitted_parts()
        return {
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "n_support": len(support),
            "n_calibration": int(self.calibration_labels.shape[0]),
            "alpha": ladder.default_alpha,
            "regions": ladder.to_dict()["regions"],
        }
