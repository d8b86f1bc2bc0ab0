"""A task added through the task table alone (tests/test_tasks.py): raw class scores (logits)
from a linear head on the encoder. Torch-free at import, as a runtime front end must be."""

import numpy as np

from edgeclr import tasks
from edgeclr.runtime import Embedder


class LogitScorer(Embedder):
    """Images -> (N, K) logits."""

    TASK = "logits"
    OUTPUT = "logits"
    USE = "a logit scorer: use runtime.LogitScorer"

    @classmethod
    def meta_problems(cls, meta, out_shape):
        n = len(meta.classes or [])
        return [] if out_shape is None or out_shape[1] in (None, n) else [f"metadata classes {n}, model output {out_shape[1]}"]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.run_arrays(x)


def logits_module(encoder, ckpt, normalize):
    """The head: the encoder's embedding -> Linear(D, K)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.embed_dim, len(ckpt["classes"]))
            self.head.load_state_dict(ckpt["head"])

        def forward(self, x):
            return self.head(self.encoder.embed(x))

    return Logits().eval(), {"classes": list(ckpt["classes"])}


def max_abs(ref, got):
    return {"max_abs_diff": float(np.abs(ref - got).max())}


TASK = tasks.register(tasks.Task("logits", LogitScorer, logits_module, max_abs,
                                 lambda c, _: None if c["max_abs_diff"] <= 1e-4 else f"max abs diff {c['max_abs_diff']:.3g}",
                                 tasks.top1, "top1"))
