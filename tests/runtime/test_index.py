"""edgeclr.runtime.index: exact and approximate nearest-neighbour search, kNN classification."""

import numpy as np
import pytest

from edgeclr.runtime import Index


def test_index_search_matches_brute_force_and_saves_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((50, 8)), rng.standard_normal((4, 8))
    idx = Index(g, [f"g{i}" for i in range(50)], [str(i % 3) for i in range(50)])
    scores, nn = idx.search(q, 5)
    gn, qn = g / np.linalg.norm(g, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ gn.T), axis=1)[:, :5]
    assert np.array_equal(nn, ref) and np.allclose(scores, np.take_along_axis(qn @ gn.T, ref, 1), atol=1e-6)
    idx.save(tmp_path / "i.npz")
    with np.load(tmp_path / "i.npz", allow_pickle=False) as f:
        assert f["ids"].dtype.kind == "U"
    back = Index.load(tmp_path / "i.npz")
    assert np.array_equal(back.search(q, 5)[1], nn) and back.classify(q).tolist() == idx.classify(q).tolist()


def test_usearch_backend_agrees_with_exact_search():
    pytest.importorskip("usearch")  # in the dev extra; optional on a device
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((2000, 32)), rng.standard_normal((50, 32))
    exact, ann = Index(g), Index(g, backend="usearch")
    (se, ie), (sa, ia) = exact.search(q, 10), ann.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ia)])
    assert recall >= 0.95, recall
    same = ie[:, 0] == ia[:, 0]
    assert np.allclose(se[same, 0], sa[same, 0], atol=1e-4)  # scores are cosines in both
    with pytest.raises(ValueError, match="unknown index backend"):
        Index(g, backend="faiss2")
