"""Training one SDM layer (SDM_SPEC §1.7) and the outer loop over J random splits/initialisations.

Epoch 1 is plain softmax cross-entropy (q = e - 2, d = 1). After every epoch, q and d are recomputed from the
current weights: the training split against itself with self-exclusion (its own distance eCDFs), the
calibration split against the training support (calibration eCDFs). The epoch with the lowest class-balanced
calibration SDM loss is kept (ties go to the later epoch).

Size: one concept, fitting a layer, as named steps that read top-down (initialise, train an epoch, score it,
keep the best; then J of them); the layer's parts (adaptor, support, math) are their own modules.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sdm_core.adaptor import ExemplarAdaptor
from sdm_core.config import SDMConfig
from sdm_core.math import distance_quantile, rescaled_similarity, sdm_loss, sdm_probabilities
from sdm_core.support import SupportIndex

__all__ = [
    "LayerStatistics",
    "FittedLayer",
    "class_cdfs",
    "fit_layer",
    "fit_estimator_layers",
    "balanced_loss",
    "example_ids",
]


def class_cdfs(d_nearest: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per true class, the sorted nearest distances of points with q > 0 (ACT Eq. 5)."""
    return [torch.sort(d_nearest[(labels == c) & (q > 0)]).values.contiguous() for c in range(num_classes)]


def example_ids(ids: Sequence[str] | None, n: int, prefix: str, name: str) -> list[str]:
    """The ids of ``n`` examples: ``ids`` as strings (ValueError naming ``name`` unless there are ``n`` unique ones),
    or ``prefix-0`` ... ``prefix-(n-1)`` when there are none."""
    if ids is None:
        return [f"{prefix}-{i}" for i in range(n)]
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(out)}")
    if len(set(out)) != n:
        raise ValueError(f"{name} must be unique")
    return out


def balanced_loss(logits: torch.Tensor, q: torch.Tensor, d: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the per-class mean SDM loss."""
    per_item = sdm_loss(logits, q.to(logits.dtype), d.to(logits.dtype), labels, reduction="none")
    means = [per_item[labels == c].mean() for c in torch.unique(labels)]
    return float(torch.stack(means).mean()) if means else math.nan


@dataclass
class LayerStatistics:
    """Everything the estimator needs about one split scored by a layer."""

    logits: torch.Tensor
    predictions: torch.Tensor
    q: torch.Tensor
    d_nearest: torch.Tensor
    d: torch.Tensor
    probabilities: torch.Tensor
    q_prime: torch.Tensor


@dataclass
class FittedLayer:
    adaptor: ExemplarAdaptor
    support: SupportIndex
    train_cdfs: list[torch.Tensor]
    calibration_cdfs: list[torch.Tensor]
    calibration_ids: list[str]
    calibration_labels: torch.Tensor
    calibration: LayerStatistics
    best_epoch: int
    best_calibration_loss: float
    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _statistics(logits: torch.Tensor, q: torch.Tensor, d_nearest: torch.Tensor, d: torch.Tensor) -> LayerStatistics:
    predictions = logits.argmax(dim=1)
    probabilities = sdm_probabilities(logits, q.to(logits.dtype), d.to(logits.dtype))
    q_prime = rescaled_similarity(q.to(logits.dtype), probabilities.gather(1, predictions.unsqueeze(1)).squeeze(1))
    return LayerStatistics(logits, predictions, q, d_nearest, d, probabilities, q_prime)


def _adam_step(
    adaptor: ExemplarAdaptor,
    optimizer: torch.optim.Optimizer,
    embeddings: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """One optimizer step on a batch's SDM loss; returns the loss.

    The layer is affine, z' = V(Wx + b) + c, so autograd's route (the batch's exemplars Wx + b forward, then their
    backward) costs two B x M x D products, while the loss needs only x's C directions: with G = dL/dz' (B x C),
    dW = V^T (G^T x), db = V^T (G^T 1), dV = (G^T x) W^T + (G^T 1) b^T and dc = G^T 1, and the forward is
    z' = x (VW)^T + (Vb + c). The same function and gradients at O(C·M·D) a step; what remains is mostly Adam's
    pass over the parameters.
    """
    weight, bias = adaptor.exemplar.weight, adaptor.exemplar.bias
    out_weight, out_bias = adaptor.output.weight, adaptor.output.bias
    with torch.no_grad():
        x = (embeddings - adaptor.input_mean) / adaptor.input_std
        composed = out_weight @ weight  # (C, D)
        offset = out_weight @ bias + out_bias  # (C,)
    logits = torch.addmm(offset, x, composed.T).requires_grad_(True)
    loss = sdm_loss(logits, q, d, labels)
    (g,) = torch.autograd.grad(loss, logits)  # (B, C)
    with torch.no_grad():
        gx = g.T @ x  # (C, D)
        g1 = g.sum(dim=0)  # (C,)
        weight.grad = out_weight.T @ gx
        bias.grad = out_weight.T @ g1
        out_weight.grad = gx @ weight.T + torch.outer(g1, bias)
        out_bias.grad = g1
    optimizer.step()
    return float(loss.detach())


def fit_layer(
    train_embeddings: torch.Tensor,
    train_labels: torch.Tensor,
    calibration_embeddings: torch.Tensor,
    calibration_labels: torch.Tensor,
    num_classes: int,
    config: SDMConfig,
    seed: int,
    train_ids: Sequence[str],
    calibration_ids: Sequence[str],
    iteration: int = 0,
) -> FittedLayer:
    """TRAIN_ONE_SDM_LAYER of SDM_SPEC §1.7 on already-validated float32 inputs and ids (:func:`example_ids`)."""
    started = time.perf_counter()
    train_ids = list(train_ids)
    adaptor, optimizer = _initial_layer(train_embeddings, num_classes, config, seed)
    best, history = _fit_epochs(
        adaptor,
        optimizer,
        train_embeddings,
        train_labels,
        train_ids,
        calibration_embeddings,
        calibration_labels,
        num_classes,
        config,
        seed,
        iteration,
    )
    adaptor.load_state_dict(best["state"])
    adaptor.eval()
    return FittedLayer(
        adaptor=adaptor,
        support=best["support"],
        train_cdfs=best["train_cdfs"],
        calibration_cdfs=best["calibration_cdfs"],
        calibration_ids=list(calibration_ids),
        calibration_labels=calibration_labels,
        calibration=best["calibration"],
        best_epoch=best["epoch"],
        best_calibration_loss=best["loss"],
        iteration=iteration,
        history=history,
        seconds=time.perf_counter() - started,
    )


def _initial_layer(
    train_embeddings: torch.Tensor, num_classes: int, config: SDMConfig, seed: int
) -> tuple[ExemplarAdaptor, torch.optim.Adam]:
    """The layer's initial weights for ``seed``, with the input normalisation from the training embeddings, and
    its optimiser."""
    # Initialise under a forked RNG so that fitting is deterministic for a seed and leaves global state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adaptor = ExemplarAdaptor(train_embeddings.shape[1], config.exemplar_dim, num_classes)
    if config.normalize:
        adaptor.set_normalization(float(train_embeddings.mean()), float(train_embeddings.std(correction=1)))
    # The fused kernel is the same Adam update in one pass over each tensor (about a third of a small layer's step
    # time on CPU); it may round differently from the per-op loop in the last digits, and a seed still gives
    # identical fits.
    optimizer = torch.optim.Adam(
        adaptor.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True
    )
    return adaptor, optimizer


def _fit_epochs(
    adaptor: ExemplarAdaptor,
    optimizer: torch.optim.Optimizer,
    train_embeddings: torch.Tensor,
    train_labels: torch.Tensor,
    train_ids: list[str],
    calibration_embeddings: torch.Tensor,
    calibration_labels: torch.Tensor,
    num_classes: int,
    config: SDMConfig,
    seed: int,
    iteration: int,
) -> tuple[dict, list[dict]]:
    """The epochs: train with the previous epoch's q and d (epoch 1: q = e - 2, d = 1), then score both splits.
    Returns the best epoch (the lowest calibration loss; ties go to the later epoch) and each epoch's losses."""
    n_train = train_embeddings.shape[0]
    generator = torch.Generator().manual_seed(seed)
    q_train = torch.full((n_train,), math.e - 2.0)
    d_train = torch.ones(n_train)
    best: dict | None = None
    history: list[dict] = []
    bar = tqdm(
        range(1, config.epochs + 1), desc=f"SDM layer (J={iteration + 1})", disable=not config.progress, leave=False
    )
    for epoch in bar:
        adaptor.train()
        order = torch.randperm(n_train, generator=generator)
        train_loss = _train_epoch(
            adaptor, optimizer, order, config.batch_size, train_embeddings, q_train, d_train, train_labels
        )
        scored = _score_epoch(
            adaptor,
            train_embeddings,
            train_labels,
            train_ids,
            calibration_embeddings,
            calibration_labels,
            num_classes,
            config,
        )
        q_train, d_train = scored.q_train, scored.d_train
        record = {"epoch": epoch, "train_loss": train_loss, "calibration_loss": scored.calibration_loss}
        history.append(record)
        if best is None or scored.calibration_loss <= best["loss"]:
            best = _best_so_far(adaptor, epoch, scored)
        bar.set_postfix(
            train=f"{record['train_loss']:.4f}",
            cal=f"{scored.calibration_loss:.4f}",
            best=f"{best['loss']:.4f}@{best['epoch']}",
        )
    bar.close()
    assert best is not None
    return best, history


def _train_epoch(
    adaptor: ExemplarAdaptor,
    optimizer: torch.optim.Optimizer,
    order: torch.Tensor,
    batch_size: int,
    embeddings: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """One pass over the training split in ``order``, with q and d from the previous epoch; the mean loss."""
    total, count = 0.0, 0
    for start in range(0, order.numel(), batch_size):
        batch = order[start : start + batch_size]
        loss = _adam_step(adaptor, optimizer, embeddings[batch], q[batch], d[batch], labels[batch])
        total += loss * batch.numel()
        count += batch.numel()
    return total / max(count, 1)


@dataclass
class _EpochScores:
    """The current weights scored: the training split against itself (the next epoch's q and d, and its
    eCDFs), the calibration split against the training support, and the calibration loss that picks the best
    epoch."""

    support: SupportIndex
    train_cdfs: list[torch.Tensor]
    q_train: torch.Tensor
    d_train: torch.Tensor
    calibration_cdfs: list[torch.Tensor]
    calibration_logits: torch.Tensor
    calibration_q: torch.Tensor
    calibration_d_nearest: torch.Tensor
    calibration_d: torch.Tensor
    calibration_loss: float


def _score_epoch(
    adaptor: ExemplarAdaptor,
    train_embeddings: torch.Tensor,
    train_labels: torch.Tensor,
    train_ids: list[str],
    calibration_embeddings: torch.Tensor,
    calibration_labels: torch.Tensor,
    num_classes: int,
    config: SDMConfig,
) -> _EpochScores:
    """q and d of both splits under the current weights (SDM_SPEC §1.7's recomputation after each epoch)."""
    train_logits, train_exemplars = adaptor.infer(train_embeddings, config.eval_batch_size)
    cal_logits, cal_exemplars = adaptor.infer(calibration_embeddings, config.eval_batch_size)
    train_pred = train_logits.argmax(dim=1)
    support = SupportIndex(
        train_exemplars, train_labels, train_pred, train_ids, backend=config.backend, max_q=config.max_q
    )
    train_sim = support.self_similarity()  # each training point excludes itself by identity
    train_cdf = class_cdfs(train_sim.d_nearest, train_labels, train_sim.q, num_classes)
    q_train = train_sim.q.to(torch.float32)
    d_train = distance_quantile(train_sim.d_nearest, train_cdf)

    cal_pred = cal_logits.argmax(dim=1)
    cal_sim = support.similarity(cal_exemplars, cal_pred)
    cal_cdf = class_cdfs(cal_sim.d_nearest, calibration_labels, cal_sim.q, num_classes)
    d_cal = distance_quantile(cal_sim.d_nearest, cal_cdf)
    cal_loss = balanced_loss(cal_logits, cal_sim.q.to(torch.float32), d_cal, calibration_labels)
    return _EpochScores(
        support, train_cdf, q_train, d_train, cal_cdf, cal_logits, cal_sim.q, cal_sim.d_nearest, d_cal, cal_loss
    )


def _best_so_far(adaptor: ExemplarAdaptor, epoch: int, scored: _EpochScores) -> dict:
    """What the layer keeps of its best epoch: a copy of the weights, the support and eCDFs, and the calibration
    split's statistics."""
    return {
        "loss": scored.calibration_loss,
        "epoch": epoch,
        "state": {k: v.detach().clone() for k, v in adaptor.state_dict().items()},
        "support": scored.support,
        "train_cdfs": scored.train_cdfs,
        "calibration_cdfs": scored.calibration_cdfs,
        "calibration": _statistics(
            scored.calibration_logits, scored.calibration_q, scored.calibration_d_nearest, scored.calibration_d
        ),
    }


def fit_estimator_layers(
    train_embeddings: torch.Tensor,
    train_labels: torch.Tensor,
    calibration_embeddings: torch.Tensor,
    calibration_labels: torch.Tensor,
    num_classes: int,
    config: SDMConfig,
    train_ids: Sequence[str],
    calibration_ids: Sequence[str],
) -> tuple[FittedLayer, list[dict]]:
    """TRAIN_SDM_ESTIMATOR: J iterations; keep the lowest balanced calibration loss (ties go to the later one).
    Inputs and ids are validated by the caller (the estimator; ids with :func:`example_ids`).

    With ``shuffle_splits`` each iteration pools train and calibration, permutes them with a seeded generator,
    and takes the first half as the support and the second half as calibration.
    """
    pooled_x = torch.cat([train_embeddings, calibration_embeddings])
    pooled_y = torch.cat([train_labels, calibration_labels])
    pooled_ids = list(train_ids) + list(calibration_ids)
    best: FittedLayer | None = None
    summaries: list[dict] = []
    for j in range(config.iterations):
        seed = config.seed + j
        if config.shuffle_splits and config.iterations > 1:
            order = torch.randperm(pooled_x.shape[0], generator=torch.Generator().manual_seed(seed))
            half = pooled_x.shape[0] // 2
            tr, ca = order[:half], order[half:]
            args = (pooled_x[tr], pooled_y[tr], pooled_x[ca], pooled_y[ca])
            ids = ([pooled_ids[i] for i in tr.tolist()], [pooled_ids[i] for i in ca.tolist()])
        else:
            args = (train_embeddings, train_labels, calibration_embeddings, calibration_labels)
            ids = (list(train_ids), list(calibration_ids))
        for name, y in (("train", args[1]), ("calibration", args[3])):
            if y.numel() == 0:
                raise ValueError(f"the {name} split of iteration {j} is empty; give more data")
        layer = fit_layer(
            *args,
            num_classes=num_classes,
            config=config,
            seed=seed,
            train_ids=ids[0],
            calibration_ids=ids[1],
            iteration=j,
        )
        summaries.append(
            {
                "iteration": j,
                "seed": seed,
                "best_epoch": layer.best_epoch,
                "calibration_loss": layer.best_calibration_loss,
                "seconds": layer.seconds,
            }
        )
        if best is None or layer.best_calibration_loss <= best.best_calibration_loss:
            best = layer
    assert best is not None
    return best, summaries
