"""`Index`: cosine nearest-neighbour search and kNN classification over a gallery of embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeclr.errors import ModelError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_vote(scores: np.ndarray, labels: np.ndarray, num_classes: int, t: float = 0.1) -> np.ndarray:
    """The weighted kNN rule (Wu et al. 2018), the one edgeclr applies everywhere (evaluation in torch,
    the task table's scorer, `edgeclr search --labels` on the device): each of a query's k neighbours
    votes exp(cosine / t) for its class; the class with the most wins (the first on a tie).
    scores (Q, k) cosine similarities, labels (Q, k) class indices in [0, num_classes) -> (Q,) int64."""
    scores = np.asarray(scores, np.float32)
    votes = np.zeros((len(scores), num_classes), np.float32)
    np.add.at(votes, (np.arange(len(scores))[:, None], np.asarray(labels, np.int64)), np.exp(scores / np.float32(t)))
    return votes.argmax(1)


INDEX_BACKENDS = ("numpy", "usearch")


class Index:
    """Cosine nearest-neighbour search over a gallery of embeddings, with optional labels for kNN
    classification. Saved as a pickle-free .npz.

    backend "numpy": exact search (the default). "usearch": an approximate HNSW graph
    (`pip install usearch`), built on first search, for galleries too large to scan.
    """

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                 backend: str = "numpy"):
        if backend not in INDEX_BACKENDS:
            raise ValueError(f"unknown index backend {backend!r}; valid: {', '.join(INDEX_BACKENDS)}")
        self.backend, self._ann = backend, None
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError(f"an index needs (N, D) embeddings with N >= 1, got shape {emb.shape}")
        self.emb = l2_normalize(emb)
        self.ids = np.asarray([str(i) for i in ids] if ids is not None else [str(i) for i in range(len(emb))])
        self.labels = None if labels is None else np.asarray([str(v) for v in labels])
        for name, v in (("ids", self.ids), ("labels", self.labels)):
            if v is not None and len(v) != len(emb):
                raise ValueError(f"{len(v)} {name} for {len(emb)} embeddings")

    def __len__(self) -> int:
        return len(self.emb)

    def search(self, queries: np.ndarray, k: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> (scores (Q, k) cosine similarities, best first; indices (Q, k) into the gallery)."""
        q = l2_normalize(np.atleast_2d(queries))
        if q.shape[1] != self.emb.shape[1]:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.emb.shape[1]}")
        k = min(k, len(self.emb))
        if self.backend == "usearch":
            return self._search_usearch(q, k)
        scores, idx = [], []
        for i in range(0, len(q), chunk):
            sim = q[i:i + chunk] @ self.emb.T  # (q, N)
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(sim, part, 1)
            order = np.argsort(-s, axis=1, kind="stable")
            idx.append(np.take_along_axis(part, order, 1))
            scores.append(np.take_along_axis(s, order, 1))
        return np.concatenate(scores), np.concatenate(idx)

    def _search_usearch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._ann is None:
            try:
                from usearch.index import Index as HNSW
            except ImportError as e:
                raise ModelError("the usearch backend needs usearch: pip install usearch (or use the exact numpy backend)") from e
            self._ann = HNSW(ndim=self.emb.shape[1], metric="cos", dtype="f32")
            self._ann.add(np.arange(len(self.emb)), self.emb)
        m = self._ann.search(q, k)
        keys, dist = np.asarray(m.keys).reshape(len(q), -1), np.asarray(m.distances).reshape(len(q), -1)
        return (1.0 - dist).astype(np.float32), keys.astype(np.int64)

    def classify(self, queries: np.ndarray, k: int = 20, t: float = 0.1) -> np.ndarray:
        """Weighted kNN (votes exp(cos / t)), as `edgeclr eval`. Returns (Q,) labels."""
        if self.labels is None:
            raise ValueError("this index has no labels: build it with labels to classify")
        classes, y = np.unique(self.labels, return_inverse=True)
        scores, idx = self.search(queries, k)
        return classes[weighted_vote(scores, y[idx], len(classes), t)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        arrays = {"embeddings": self.emb, "ids": self.ids}
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy") -> Index:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["embeddings"], f["ids"], f["labels"] if "labels" in f.files else None, backend)
        except (OSError, EOFError, KeyError, ValueError) as e:
            raise ModelError(f"cannot read index {path}: {' '.join(str(e).split())[:200]} (an index .npz is written by "
                             "`edgeclr search --save-index`)") from e
