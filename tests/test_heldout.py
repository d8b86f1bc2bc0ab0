"""The held-out kNN scorer every stage uses, against a slow reference of the protocol."""

import numpy as np
import pytest
import torch

from edgeclr import data
from edgeclr.heldout import HeldOut, agreement, knn_predict
from edgeclr.runtime import Preprocess


def reference_knn(bank, bank_y, query, k, t):
    """One query at a time: cosine similarities, the k nearest vote with exp(sim / T)."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in query:
        sim = b @ (q / np.linalg.norm(q))
        nn = np.argsort(-sim)[:k]
        votes = np.zeros(bank_y.max() + 1)
        for i in nn:
            votes[bank_y[i]] += np.exp(sim[i] / t)
        out.append(votes.argmax())
    return np.array(out)


def test_knn_matches_the_reference():
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    bank_y = rng.integers(0, 5, 200)
    got = knn_predict(torch.tensor(bank), torch.tensor(bank_y), torch.tensor(query), 7, 0.1, 5, chunk=16).numpy()
    assert (got == reference_knn(bank, bank_y, query, 7, 0.1)).all()


def test_evaluation_and_the_device_index_apply_one_knn_rule():
    """heldout.knn_predict (evaluation, torch) and runtime.Index.classify (the task scorer, `edgeclr
    search`) both vote through runtime.index.weighted_vote: the same predictions on the same data."""
    from edgeclr.runtime import Index
    from edgeclr.runtime.index import weighted_vote

    # one neighbour at 0.9 against two at 0.85: exp(9) < 2 exp(8.5), so the pair wins; a tie goes to the first class
    assert weighted_vote(np.array([[0.9, 0.85, 0.85]]), np.array([[0, 1, 1]]), 2, 0.1).tolist() == [1]
    assert weighted_vote(np.array([[0.5, 0.5]]), np.array([[1, 0]]), 2, 0.1).tolist() == [0]
    rng = np.random.default_rng(1)
    bank, query = rng.normal(size=(300, 12)).astype(np.float32), rng.normal(size=(80, 12)).astype(np.float32)
    bank_y = rng.integers(0, 4, 300)
    ours = knn_predict(torch.tensor(bank), torch.tensor(bank_y), torch.tensor(query), 9, 0.1, 4).numpy()
    device = Index(bank, labels=bank_y).classify(query, 9, 0.1).astype(int)
    assert (ours == device).all() and (ours == reference_knn(bank, bank_y, query, 9, 0.1)).all()


def held(n_bank=300, n_query=100, **kw):
    bank, query = data.open_dataset("digits", "train"), data.open_dataset("digits", "test")
    return HeldOut.from_datasets(bank, query, Preprocess(8, 8, (0.3,), (0.3,), 1), 0, n_bank, n_query, **kw)


def test_pixels_score_far_above_chance_and_a_score_agrees_with_itself():
    h = held()
    assert h.bank_x.shape == (300, 1, 8, 8) and len(h.query_y) == 100 and h.classes
    pixels = h.score(lambda x: x.flatten(1))
    assert pixels["knn_top1"] > 80
    again = h.score(lambda x: x.flatten(1), ref=pixels)
    assert again["knn_agreement"] == 1.0 and again["cosine_min"] == pytest.approx(1.0)
    noise = h.score(lambda x: torch.randn(len(x), 8, generator=torch.Generator().manual_seed(len(x))), ref=pixels)
    assert noise["knn_top1"] < 40 and noise["knn_agreement"] < 0.5
    assert noise["cosine_mean"] != noise["cosine_mean"]  # NaN: another width has no per-image cosine (it raised before)


def test_the_sample_is_seeded_and_the_bank_drawn_first():
    a, b = held(), held()
    assert torch.equal(a.bank_x, b.bank_x) and torch.equal(a.query_y, b.query_y)


def test_agreement_of_an_embedding_with_itself_and_with_noise():
    x = torch.randn(64, 12)
    assert agreement(x, x)["topk_overlap"] == 1.0
    assert agreement(x, torch.randn(64, 12))["topk_overlap"] < 0.5


def test_the_overlap_is_computed_at_one_size_whatever_the_number_of_images():
    """The same two embedders (digits pixels, their 8-component PCA) share fewer top-10 neighbours among
    more images; deploy compares the overlap with one --min-overlap, so it is taken at OVERLAP_IMAGES."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    from edgeclr.heldout import OVERLAP_IMAGES, OVERLAP_SAMPLES, overlap_draws

    x = load_digits().data.astype(np.float32)
    x = x[np.random.default_rng(1).permutation(len(x))]
    a, b = torch.from_numpy(x), torch.from_numpy(PCA(8, random_state=0).fit_transform(x).astype(np.float32))
    raw = {n: agreement(a[:n], b[:n], n=None)["topk_overlap"] for n in (600, len(x))}
    fixed = {n: agreement(a[:n], b[:n])["topk_overlap"] for n in (600, len(x))}
    assert raw[600] - raw[len(x)] > 0.08  # the raw overlap falls with N ...
    assert abs(fixed[600] - fixed[len(x)]) < 0.02  # ... the one at a fixed size does not
    small = a[:OVERLAP_IMAGES], b[:OVERLAP_IMAGES]  # up to the size, all images at once
    assert agreement(*small)["topk_overlap"] == agreement(*small, n=None)["topk_overlap"]
    assert overlap_draws(OVERLAP_IMAGES) == (OVERLAP_IMAGES, 1) and overlap_draws(len(x)) == (OVERLAP_IMAGES, OVERLAP_SAMPLES)
    assert agreement(a, b)["topk_overlap"] == agreement(a, b)["topk_overlap"]  # seeded: every candidate is judged on the same draws
    with pytest.raises(ValueError, match="same images"):
        agreement(a, b[:100])


def test_an_unlabeled_folder_has_no_scorer(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    assert HeldOut.open(str(tmp_path), Preprocess(8, 9, (0.5,), (0.2,), 1), {}) is None


def test_the_probe_cross_validates_c_on_few_labels_only():
    """probe_c is the C of the best stratified-CV accuracy on the labelled images (a tie to the
    larger C), computed here by sklearn's own cross_val_score; one image in a class, or a large
    labelled set, keeps C = 1."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgeclr import heldout

    x, y = load_digits(return_X_y=True)
    idx = np.concatenate([np.flatnonzero(y == k)[:8] for k in range(10)])
    c, why = heldout.probe_c(x[idx], y[idx], seed=3)
    means = [cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=cc, random_state=3)),
                             x[idx], y[idx], cv=StratifiedKFold(5, shuffle=True, random_state=3)).mean() for cc in heldout.PROBE_CS]
    best = max(range(len(means)), key=lambda i: (round(means[i], 9), i))
    assert c == heldout.PROBE_CS[best] and "5-fold CV on 80" in why
    clf = heldout.fit_linear(x[idx], y[idx], seed=3)
    assert clf[-1].C == c and clf.probe_c == why
    assert heldout.fit_linear(x[idx], y[idx], c=0.5)[-1].C == 0.5
    one = np.array([np.flatnonzero(y == k)[0] for k in range(10)])
    assert heldout.probe_c(x[one], y[one])[0] == 1.0
    assert heldout.probe_c(np.zeros((heldout.PROBE_CV_MAX + 1, 2)), np.arange(heldout.PROBE_CV_MAX + 1) % 2)[0] == 1.0
