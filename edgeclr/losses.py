"""Contrastive losses.

NT-Xent (normalised temperature-scaled cross entropy), SimCLR: Chen, Kornblith, Norouzi, Hinton,
"A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020, eq. (1):

    l(i, j) = -log  exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)

over 2N views, averaged over all 2N anchors (each view is once an anchor).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0) -> torch.Tensor:
    """NT-Xent over two views.

    Args:
        z1: (B, P) projections of view 1; row i and row i of z2 come from the same image.
        z2: (B, P) projections of view 2.
        temperature: t > 0.
        gather: for distributed training, a function (B, P) -> (W*B, P) that concatenates every
            rank's rows in rank order and keeps the gradient. None = single process.
        rank: this process's rank (position of its rows in the gathered batch).

    Returns:
        Scalar loss, the mean over this rank's 2B anchors, computed in float32 (safe under
        bf16 autocast and at temperature 0.05: a log-softmax, never exp of raw logits).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, P), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    if b < 2 and gather is None:
        raise ValueError("NT-Xent needs at least 2 images per batch (each needs a negative)")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    k1, k2 = (gather(z1), gather(z2)) if gather is not None else (z1, z2)  # (N, P), N = W*B
    n = k1.shape[0]
    anchors = torch.cat([z1, z2])  # (2B, P)
    keys = torch.cat([k1, k2])  # (2N, P)
    logits = anchors @ keys.T / temperature  # (2B, 2N)
    idx = torch.arange(b, device=z1.device) + rank * b
    self_col = torch.cat([idx, idx + n])  # column of each anchor itself
    pos_col = torch.cat([idx + n, idx])  # column of its positive
    logits = logits.masked_fill(F.one_hot(self_col, 2 * n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_col)
