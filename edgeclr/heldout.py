"""The held-out kNN scorer every stage uses, and the embedding helpers around it.

    HeldOut.open(data, pp, run_cfg) -> .score(embed_fn, ref, linear=)   kNN (and linear-probe) top-1; against a
                                                                        reference: kNN agreement, cosine, top-10 overlap
                                     -> .score_model(model)             kNN top-1 of an Encoder (training monitor)

One scorer, one set of keys: compress's Scorecard (against the FP32 student), deploy's Quality and
`eval --compare` (against the teacher) all score through HeldOut.score / score_features.

kNN follows Wu et al. 2018 (InstDisc), the protocol SimCLR codebases report: L2-normalised
features, cosine similarity, the k nearest bank images vote with weight exp(sim / T). The bank is
the dataset's labeled train split and the queries its test split, preprocessed once through the
runtime's preprocessing (the one path from image file to model input).

BatchNorm re-estimation lives here too: a student trained on strongly augmented views is scored,
and exported, with statistics re-estimated on clean images (see `recalibrate_bn`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from edgeclr import data
from edgeclr.loading import open_like_run
from edgeclr.runtime import ImageError, Preprocess, preprocess


def eval_inputs(ds: data.Dataset, pp: Preprocess, indices=None) -> tuple[torch.Tensor, np.ndarray]:
    """Model inputs through the one preprocessing path (runtime.preprocess).

    Returns (N, C, S, S) float32 and the dataset indices kept (unreadable files are skipped).
    """
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    out, kept = [], []
    for i in idx:
        try:
            out.append(preprocess(ds.pil(int(i), pp.resize_size), pp))
            kept.append(int(i))
        except ImageError as e:
            warnings.warn(f"skipped in evaluation: {e}")
    if not out:
        raise data.DataError(f"{ds.name}: no readable image to evaluate")
    return torch.from_numpy(np.stack(out)), np.asarray(kept, np.int64)


@torch.no_grad()
def embed(fn, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Apply `fn` (e.g. model.embed, in eval mode) in batches. x: (N, C, S, S) -> (N, D) float32 on CPU."""
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(fn(x[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, k: int = 20, t: float = 0.1,
                num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN. bank (M, D), bank_y (M,), query (N, D) -> predicted labels (N,): the top-k by
    cosine in torch, the vote by runtime.index.weighted_vote (the rule's one owner)."""
    from edgeclr.runtime.index import weighted_vote

    num_classes = num_classes or int(bank_y.max()) + 1
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(query), chunk):
        q = F.normalize(query[i:i + chunk].float(), dim=1)
        sim, nn_idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        preds.append(torch.from_numpy(weighted_vote(sim.cpu().numpy(), bank_y[nn_idx].cpu().numpy(), num_classes, t)))
    return torch.cat(preds)


def knn_accuracy(bank, bank_y, query, query_y, k: int = 20, t: float = 0.1) -> float:
    """Accuracy in percent."""
    bank_y, query_y = torch.as_tensor(bank_y), torch.as_tensor(query_y)
    n_cls = int(max(bank_y.max(), query_y.max())) + 1
    pred = knn_predict(torch.as_tensor(bank), bank_y, torch.as_tensor(query), k, t, n_cls)
    return 100.0 * (pred == query_y).float().mean().item()


OVERLAP_IMAGES = 200  # the top-10 overlap is a mean over seeded samples of this many images: it falls with the
OVERLAP_SAMPLES = 20  # number of images (benchmarks/results/overlap_size), so one threshold needs one N; 200 fits every held-out split


def overlap_draws(n: int) -> tuple[int, int]:
    """(images per draw, draws) of `agreement`'s top-10 overlap on n images."""
    return (OVERLAP_IMAGES, OVERLAP_SAMPLES) if n > OVERLAP_IMAGES else (n, 1)


@torch.no_grad()
def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10, n: int | None = OVERLAP_IMAGES,
              samples: int = OVERLAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """How far two embedders of the same N images agree. a: (N, Da), b: (N, Db).

    Returns topk_overlap: the fraction of each image's k nearest neighbours (cosine, itself
    excluded) that both embedders share (any widths), averaged over the images and over `samples`
    seeded draws of n of them (all N at once where N <= n, or n is None); and cosine_agreement:
    mean cos(a_i, b_i) over all N when the widths are equal (NaN otherwise). Judge an INT8 or
    distilled model by the overlap: a collapsed embedding can have a high cosine and useless
    neighbours. The same models share fewer neighbours among more images, so the overlap is
    computed at one size n, whatever the data's size: one `--min-overlap` then means one thing.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    if len(a) != len(b):
        raise ValueError(f"agreement needs embeddings of the same images, got {len(a)} and {len(b)}")
    if min(k, len(a) - 1) < 1:
        raise ValueError("agreement needs at least 2 images")

    def overlap(a, b):
        kk = min(k, len(a) - 1)

        def neighbours(x):
            sim = x @ x.T
            sim.fill_diagonal_(-float("inf"))
            return sim.topk(kk, dim=1).indices  # (M, kk)

        na, nb = neighbours(a), neighbours(b)
        return (na.unsqueeze(2) == nb.unsqueeze(1)).any(2).float().sum(1).mean().item() / kk

    if n is None or len(a) <= n:
        ov = overlap(a, b)
    else:
        rng = np.random.default_rng(seed)
        draws = [torch.from_numpy(rng.choice(len(a), n, replace=False)) for _ in range(samples)]
        ov = float(np.mean([overlap(a[i], b[i]) for i in draws]))
    cos = (a * b).sum(1).mean().item() if a.shape == b.shape else float("nan")
    return {"topk_overlap": ov, "cosine_agreement": cos}


PROBE_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the linear probe's inverse regularisation strengths, chosen by CV
PROBE_CV_MAX = 5000  # labelled images up to which C is cross-validated; above, C = 1 (plenty of labels, and the fits are slow)
PROBE_FOLDS = 5


def probe_c(train_f: np.ndarray, train_y: np.ndarray, seed: int = 0) -> tuple[float, str]:
    """The linear probe's C and how it was chosen: on a small labelled set the C of PROBE_CS with
    the best mean accuracy in stratified k-fold cross-validation on those labels alone (k = 5, or
    the smallest class's count; a tie goes to the larger C); 1.0 with a single image in some class
    (nothing to hold out) or above PROBE_CV_MAX images."""
    y = np.asarray(train_y)
    counts = np.bincount(y)[np.unique(y)]
    if len(y) > PROBE_CV_MAX:
        return 1.0, f"C=1 ({len(y)} labelled images, no CV above {PROBE_CV_MAX})"
    if len(counts) < 2:
        return 1.0, "C=1 (a single class: nothing to cross-validate)"
    if counts.min() < 2:
        return 1.0, "C=1 (a class with one labelled image: nothing to cross-validate)"
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(train_f)
    k = int(min(PROBE_FOLDS, counts.min()))
    folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y))
    scores = []
    for c in PROBE_CS:
        hits = 0
        for tr, va in folds:
            hits += int((_fit(x[tr], y[tr], c, seed).predict(x[va]) == y[va]).sum())
        scores.append(hits / len(y))
    best = max(range(len(PROBE_CS)), key=lambda i: (scores[i], i))
    return PROBE_CS[best], f"C={PROBE_CS[best]:g} by {k}-fold CV on {len(y)} labelled images ({100 * scores[best]:.1f}%)"


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=c, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def fit_linear(train_f: np.ndarray, train_y: np.ndarray, seed: int = 0, c: float | None = None):
    """The linear probe: logistic regression on standardised features (the one edgeclr fits
    everywhere), C from probe_c unless given. The fitted pipeline's `probe_c` says how C was chosen."""
    if c is None:
        c, why = probe_c(train_f, train_y, seed)
    else:
        why = f"C={c:g} (given)"
    clf = _fit(np.asarray(train_f), np.asarray(train_y), c, seed)
    clf.probe_c = why
    return clf


def linear_probe(train_f, train_y, test_f, test_y, seed: int = 0, c: float | None = None) -> float:
    """Test accuracy in percent of fit_linear on the training features (C as fit_linear takes it)."""
    clf = fit_linear(train_f, train_y, seed, c)
    return 100.0 * float((clf.predict(np.asarray(test_f)) == np.asarray(test_y)).mean())


# ----------------------------------------------------------------------------------------------
# BatchNorm statistics

def overlap_sample(spec: str, pp: Preprocess, run_cfg: Mapping, seed: int, n: int) -> torch.Tensor:
    """(M, C, S, S) model inputs of at most n (and 2,000) images of the data's test split (its
    held-out part, or all of it for unlabeled data), drawn with `seed`: where there are no labels, a
    model is judged by its top-10 neighbour overlap with the teacher on these (deploy, distill)."""
    ds = open_like_run(spec, "test", pp.resize_size, run_cfg, seed)
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(len(ds), n, 2000), replace=False))
    x, _ = eval_inputs(ds, pp, idx)
    if len(x) < 11:
        raise data.DataError(f"{spec}: {len(x)} readable image(s); the top-10 neighbour overlap that judges a model on "
                             "unlabeled data needs at least 11")
    return x


def batchnorms(model) -> list:
    """The model's BatchNorm layers (any dimension)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn_on(model, x: torch.Tensor, device, batch_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running mean/variance on the preprocessed images x, as an exact
    average over them (momentum None); returns the images used (see recalibrate_bn)."""
    bns = batchnorms(model)
    if not bns or not len(x):
        return 0
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
    model.train()
    with torch.no_grad():
        # batches of equal size (to within 1): the cumulative average weighs each batch alike
        for xb in torch.tensor_split(x, -(-len(x) // batch_size)):
            if len(xb) >= 2:
                model.embed(xb.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return len(x)


def recalibrate_bn(model, ds: data.Dataset, pp: Preprocess, device, n: int, seed: int = 0, batch_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running mean/variance on n clean training images (the
    evaluation transform), as an exact average over them (momentum None); returns the images used.

    A student trained on strongly augmented views keeps running statistics of those views; on a
    short schedule, with a small-batch MobileNet, these can be far from the statistics of the images
    it embeds at evaluation (kNN on 16-px digits: MobileNetV3-Small 50.7% -> 86.0%, its pruned
    copy 37.3% -> 81.1%, measured; the ResNet teacher: 92.9% -> 92.7%, so teachers are left alone).
    """
    if n <= 0 or not batchnorms(model):  # no images to prepare
        return 0
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(n, len(ds)), replace=False))
    x, _ = eval_inputs(ds, pp, idx)
    return recalibrate_bn_on(model, x, device, batch_size)


# ----------------------------------------------------------------------------------------------
# the scorer


@dataclasses.dataclass
class HeldOut:
    """Labeled bank (the train split) and queries (the test split), preprocessed once.

    x: (N, C, S, S) float32 tensors; y: (N,) int64 tensors. `k` and `t` are the kNN's.
    """

    bank_x: torch.Tensor
    bank_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    k: int = 20
    t: float = 0.1
    bn_recalibrate: bool = False  # score_model: re-estimate a copy's BatchNorm statistics on the bank first
    classes: list[str] | None = None  # class names, when the dataset has them

    @classmethod
    def open(cls, spec: str, pp: Preprocess, run_cfg: Mapping, seed: int = 0, max_bank: int | None = None,
             max_query: int | None = None, **kw) -> HeldOut | None:
        """The labeled splits of `spec`, opened as the run with config `run_cfg` opened them; at most
        max_bank / max_query images of each (a seeded sample, bank first). None when unlabeled."""
        bank = open_like_run(spec, "train", pp.resize_size, run_cfg, seed)
        query = open_like_run(spec, "test", pp.resize_size, run_cfg, seed)
        if not (data.has_labels(bank) and data.has_labels(query)):
            return None
        return cls.from_datasets(bank, query, pp, seed, max_bank, max_query, **kw)

    @classmethod
    def from_datasets(cls, bank: data.Dataset, query: data.Dataset, pp: Preprocess, seed: int = 0,
                      max_bank: int | None = None, max_query: int | None = None, **kw) -> HeldOut:
        rng = np.random.default_rng(seed)

        def pick(ds, n):
            return np.sort(rng.choice(len(ds), n, replace=False)) if n is not None and len(ds) > n else None

        bank_x, bk = eval_inputs(bank, pp, pick(bank, max_bank))
        query_x, qk = eval_inputs(query, pp, pick(query, max_query))
        return cls(bank_x, torch.as_tensor(bank.labels[bk]), query_x, torch.as_tensor(query.labels[qk]),
                   classes=getattr(query, "classes", None), **kw)

    @property
    def num_classes(self) -> int:
        return int(max(self.bank_y.max(), self.query_y.max())) + 1

    def features(self, embed_fn: Callable, batch_size: int = 256, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(bank (M, D), query (N, D)) embeddings of embed_fn (torch in, torch out, applied in batches)."""
        return embed(embed_fn, self.bank_x, batch_size, device), embed(embed_fn, self.query_x, batch_size, device)

    def score_features(self, bank: torch.Tensor, query: torch.Tensor, ref: dict | None = None, linear: bool = False,
                       seed: int = 0) -> dict:
        """The held-out figures of an embedding, one set of keys for every stage: `knn_top1` and,
        with `linear`, `linear_top1` (the linear probe on every bank label, C = 1); against `ref` (another
        score's output: the teacher's, or the FP32 student's) `knn_agreement` (same kNN predictions),
        `cosine_mean` / `cosine_min` of the query embeddings (NaN between widths) and `topk_overlap`
        (shared top-10 neighbours, agreement's fixed sample size). Keys starting with '_' hold the predictions
        and query embeddings a later score compares with (`public` drops them)."""
        pred = knn_predict(bank, self.bank_y, query, self.k, self.t, self.num_classes)
        out = {"knn_top1": 100.0 * float((pred == self.query_y).float().mean()), "_pred": pred, "_q": query}
        if linear:
            out["linear_top1"] = linear_probe(bank.numpy(), self.bank_y.numpy(), query.numpy(), self.query_y.numpy(), seed,
                                              c=1.0)  # every label: the column stays comparable (and deploy scores dozens)
        if ref is not None:  # the cosine only between embeddings of one width (a student with its own --embed-dim has another)
            same = query.shape == ref["_q"].shape
            cos = (F.normalize(query.float(), dim=1) * F.normalize(ref["_q"].float(), dim=1)).sum(1) if same else None
            out.update(cosine_mean=float(cos.mean()) if same else float("nan"), cosine_min=float(cos.min()) if same else float("nan"),
                       knn_agreement=float((pred == ref["_pred"]).float().mean()),
                       topk_overlap=agreement(query, ref["_q"])["topk_overlap"] if len(query) > 1 else float("nan"))
        return out

    def score(self, embed_fn: Callable, ref: dict | None = None, batch_size: int = 256, device="cpu", linear: bool = False,
              seed: int = 0) -> dict:
        """score_features of embed_fn's embeddings of the bank and the queries."""
        return self.score_features(*self.features(embed_fn, batch_size, device), ref, linear, seed)

    def score_model(self, model, device, batch_size: int = 512, recalibrate: bool | None = None) -> float:
        """kNN top-1 of model.embed in eval mode (the training model's mode is restored after).

        With recalibration (the scorer's bn_recalibrate unless given), a copy of the model is scored
        after its BatchNorm statistics are re-estimated on the bank's clean images, as the final
        student will be: the running statistics of strongly augmented views can be far off
        mid-training (MobileNetV3-Large distilled on 16-px digits: 3.3% kNN at epoch 10 and 28.4% at
        epoch 30 from them, 91.3% once re-estimated), so a monitor would report a model that does
        not exist. False scores the model's own statistics (a teacher, or a re-estimated student).
        """
        recalibrate = self.bn_recalibrate if recalibrate is None else recalibrate
        if recalibrate and batchnorms(model):
            model = copy.deepcopy(model)  # the training model's statistics stay as they are
            recalibrate_bn_on(model, self.bank_x, device)
        was_training = model.training
        model.eval()
        try:
            return self.score(model.embed, None, batch_size, device)["knn_top1"]
        finally:
            model.train(was_training)

    __call__ = score_model  # the training loop's monitor


def public(scores: dict) -> dict:
    """A score without its '_' keys (predictions, embeddings): what reports and manifests record."""
    return {k: v for k, v in scores.items() if not k.startswith("_")}
