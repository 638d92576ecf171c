"""The SDM next-token loss (LM paper Eq. 1, as the reference computes it; SDM_SPEC §3.4) and its CE baseline.

For each sequence n with base b_n = 2 + SDM(z')_{y_n} (detached), each unmasked target token i contributes
-log_b( b^{z_i} / sum_v b^{z_v} ) = -log_softmax(z * ln b)_i / ln b. This is not CE / ln b: the logits are
also scaled by ln b. With b = e it is exactly cross-entropy.

Both functions return the SUM over unmasked tokens and the token count, so that a caller can divide by the
number of unmasked tokens of the whole optimiser step and stay exact under gradient accumulation.

``logits`` may cover only the last K positions of the sequence (transformers' ``logits_to_keep=K``, with K from
:func:`logits_to_keep`): the vocabulary projection and the softmax over the prompt, which no label reads, are then
never computed, and the loss is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.encoding import IGNORE_INDEX

__all__ = ["sdm_token_loss", "ce_token_loss", "logits_to_keep"]


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many final positions' logits the loss needs: from the first one that predicts an unmasked label (B, T)."""
    trained = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)  # per position, over the batch
    if not bool(trained.any()):
        return 1  # nothing is trained; one position keeps the forward's output well formed
    return labels.shape[1] - int(trained.float().argmax())


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of positions T-K..T-2 with the labels they predict (positions T-K+1..T-1)."""
    if (
        logits.dim() != 3
        or labels.dim() != 2
        or logits.shape[0] != labels.shape[0]
        or not 1 <= logits.shape[1] <= labels.shape[1]
    ):
        raise ValueError(
            f"logits must be (B, K, V) for the last K <= T positions and labels (B, T); "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    kept = logits.shape[1]
    return logits[:, :-1, :], labels[:, labels.shape[1] - kept + 1 :]


def sdm_token_loss(logits: torch.Tensor, labels: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of per-token SDM losses, number of unmasked tokens). ``base``: (B,) values in [2, 3] (or e)."""
    z, y = _shift(logits, labels)
    b = torch.as_tensor(base, dtype=torch.float32, device=logits.device).detach()
    if b.shape != (logits.shape[0],):
        raise ValueError(f"base must have shape ({logits.shape[0]},), got {tuple(b.shape)}")
    if bool((b <= 1).any()) or not bool(torch.isfinite(b).all()):
        raise ValueError("base must be finite and > 1 (it is 2 + an SDM probability)")
    log_base = torch.log(b).view(-1, 1, 1)
    log_probs = torch.log_softmax(z.float() * log_base, dim=-1) / log_base
    mask = y != IGNORE_INDEX
    picked = log_probs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(), int(mask.sum())


def ce_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of unmasked tokens): the baseline on the same encoding."""
    z, y = _shift(logits, labels)
    loss = F.cross_entropy(
        z.float().reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((y != IGNORE_INDEX).sum())
