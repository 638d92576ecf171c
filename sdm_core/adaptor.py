"""The exemplar adaptor: an affine map R^D -> R^M (the exemplar h') then a linear layer to C logits z'.

The reference builds the first map as a Conv1d with kernel = stride = D, which is one dense affine map with the
same default initialisation as ``nn.Linear(D, M)`` (fan-in D). There is no nonlinearity (SDM_SPEC §1.3).
Inputs are normalised by one scalar mean and one scalar std of the training split (SDM_SPEC §1.2).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExemplarAdaptor"]


class ExemplarAdaptor(nn.Module):
    # Buffers registered in __init__; declared here so type checkers see tensors, not nn.Module.__getattr__'s union.
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, input_dim: int, exemplar_dim: int = 1000, num_classes: int = 2) -> None:
        super().__init__()
        if input_dim < 1 or exemplar_dim < 1:
            raise ValueError(f"input_dim and exemplar_dim must be >= 1, got {input_dim} and {exemplar_dim}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.input_dim = input_dim
        self.exemplar_dim = exemplar_dim
        self.num_classes = num_classes
        self.exemplar = nn.Linear(input_dim, exemplar_dim)
        self.output = nn.Linear(exemplar_dim, num_classes)
        self.register_buffer("input_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("input_std", torch.ones((), dtype=torch.float32))

    def set_normalization(self, mean: float, std: float) -> None:
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}; the training embeddings are constant")
        self.input_mean.fill_(float(mean))
        self.input_std.fill_(float(std))

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits z' of shape (N, C), exemplars h' of shape (N, M))."""
        with torch.no_grad():
            x = (embeddings - self.input_mean) / self.input_std
        exemplars = self.exemplar(x)
        return self.output(exemplars), exemplars

    @torch.no_grad()
    def infer(self, embeddings: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched no-grad forward pass in eval mode."""
        if not self.training and embeddings.shape[0] <= batch_size:
            # The scoring hot path (one request is a few rows): no mode switch, no concatenation copies.
            return self(embeddings)
        was_training = self.training
        self.eval()
        logits, exemplars = [], []
        for start in range(0, embeddings.shape[0], batch_size):
            z, h = self(embeddings[start : start + batch_size])
            logits.append(z)
            exemplars.append(h)
        self.train(was_training)
        if not logits:
            return torch.empty(0, self.num_classes), torch.empty(0, self.exemplar_dim)
        return torch.cat(logits), torch.cat(exemplars)
