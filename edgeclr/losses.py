"""Contrastive and distillation losses.

NT-Xent (normalised temperature-scaled cross entropy), SimCLR: Chen, Kornblith, Norouzi, Hinton,
"A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020, eq. (1):

    l(i, j) = -log  exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)

over 2N views, averaged over all 2N anchors (each view is once an anchor).

Distillation of a frozen teacher's embeddings into a student (edgeclr distill):
- `cosine_distill`: regression of the student's embedding onto the teacher's direction,
  mean(1 - cos(s_i, t_i)) (the "feature" objective of CompRess / SimCLRv2-style embedding KD).
- `relational_distill`: SEED, Fang et al., "SEED: Self-supervised Distillation for Visual
  Representation", ICLR 2021: for each image, the teacher's softmax similarity distribution
  over an instance set (a queue of past teacher embeddings plus the batch's) is the target of
  the student's, KL(p_T || p_S), each at its own temperature.
"""

from __future__ import annotations

from collections.abc import Callable

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


def cosine_distill(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(s_i, t_i)). s: (B, D) student embeddings, t: (B, D) teacher embeddings -> scalar in [0, 2]."""
    if s.shape != t.shape:
        raise ValueError(f"student and teacher embeddings must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=1)).mean()


def relational_distill(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor | None = None,
                       student_temperature: float = 0.1, teacher_temperature: float = 0.05) -> torch.Tensor:
    """SEED's loss, KL(p_T || p_S) averaged over the batch.

    Args:
        s: (B, D) student embeddings (in the teacher's space: after the adapter, if any).
        t: (B, D) teacher embeddings of the same views.
        queue: (K, D) L2-normalised teacher embeddings of earlier batches, or None / empty.
        student_temperature, teacher_temperature: softmax temperatures (the teacher's sharper).

    Returns:
        Scalar, >= 0; 0 when the student's similarities equal the teacher's.
    """
    if s.shape != t.shape:
        raise ValueError(f"student and teacher embeddings must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    s, t = F.normalize(s.float(), dim=1), F.normalize(t.float(), dim=1)
    bank = t if queue is None or len(queue) == 0 else torch.cat([queue.to(t), t])  # (K + B, D)
    log_p_t = F.log_softmax(t @ bank.T / teacher_temperature, dim=1)  # (B, K + B)
    log_p_s = F.log_softmax(s @ bank.T / student_temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


class EmbeddingQueue:
    """FIFO ring buffer of the last `size` L2-normalised teacher embeddings, (K, D)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        self.buf = torch.zeros(size, dim, device=device)
        self.ptr, self.count = 0, 0

    def items(self) -> torch.Tensor:
        return self.buf[:self.count]

    @torch.no_grad()
    def push(self, t: torch.Tensor) -> None:
        size = len(self.buf)
        if size == 0:
            return
        t = F.normalize(t.detach().float(), dim=1)[-size:]
        idx = (self.ptr + torch.arange(len(t), device=self.buf.device)) % size
        self.buf[idx] = t.to(self.buf)
        self.ptr = int((self.ptr + len(t)) % size)
        self.count = min(size, self.count + len(t))

    def state_dict(self) -> dict:
        return {"buf": self.buf.cpu(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        if d["buf"].shape != self.buf.shape:
            raise ValueError(f"queue of shape {tuple(d['buf'].shape)} does not fit {tuple(self.buf.shape)}")
        self.buf.copy_(d["buf"])
        self.ptr, self.count = int(d["ptr"]), int(d["count"])
