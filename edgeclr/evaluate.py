"""Evaluation of frozen embeddings: weighted kNN, linear probe, t-SNE; baselines.

kNN follows Wu et al. 2018 (InstDisc), the protocol SimCLR codebases report: L2-normalised
features, cosine similarity, the k nearest bank images vote with weight exp(sim / T).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeclr import checkpoint, data
from edgeclr.runtime import ImageError, Preprocess, preprocess

log = logging.getLogger("edgeclr.evaluate")


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
    """Weighted kNN. bank (M, D), bank_y (M,), query (N, D) -> predicted labels (N,)."""
    num_classes = num_classes or int(bank_y.max()) + 1
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(query), chunk):
        q = F.normalize(query[i:i + chunk].float(), dim=1)
        sim, nn_idx = (q @ bank.T).topk(k, dim=1)  # (n, k)
        w = (sim / t).exp()
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_y[nn_idx], w)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(bank, bank_y, query, query_y, k: int = 20, t: float = 0.1) -> float:
    """Accuracy in percent."""
    bank_y, query_y = torch.as_tensor(bank_y), torch.as_tensor(query_y)
    n_cls = int(max(bank_y.max(), query_y.max())) + 1
    pred = knn_predict(torch.as_tensor(bank), bank_y, torch.as_tensor(query), k, t, n_cls)
    return 100.0 * (pred == query_y).float().mean().item()


@torch.no_grad()
def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How far two embedders of the same N images agree. a: (N, Da), b: (N, Db).

    Returns topk_overlap: mean fraction of each image's k nearest neighbours (cosine, itself
    excluded) that both embedders share (any widths); and cosine_agreement: mean cos(a_i, b_i)
    when the widths are equal (NaN otherwise). Judge an INT8 or distilled model by the overlap:
    a collapsed embedding can have a high cosine and useless neighbours.
    """
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    k = min(k, len(a) - 1)
    if k < 1:
        raise ValueError("agreement needs at least 2 images")

    def neighbours(x):
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices  # (N, k)

    na, nb = neighbours(a), neighbours(b)
    overlap = (na.unsqueeze(2) == nb.unsqueeze(1)).any(2).float().sum(1) / k  # (N,)
    cos = (a * b).sum(1).mean().item() if a.shape == b.shape else float("nan")
    return {"topk_overlap": overlap.mean().item(), "cosine_agreement": cos}


def linear_probe(train_f, train_y, test_f, test_y, seed: int = 0) -> float:
    """Logistic regression on standardised frozen features; test accuracy in percent."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(np.asarray(train_f), np.asarray(train_y))
    return 100.0 * float((clf.predict(np.asarray(test_f)) == np.asarray(test_y)).mean())


def tsne_plot(feats, labels, path: str | Path, classes: list[str] | None = None, title: str = "", seed: int = 0,
              max_points: int = 2000) -> Path:
    """2-D t-SNE of the embeddings, coloured by class, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    feats, labels = np.asarray(feats), np.asarray(labels)
    if len(feats) > max_points:
        keep = np.random.default_rng(seed).choice(len(feats), max_points, replace=False)
        feats, labels = feats[keep], labels[keep]
    xy = TSNE(2, init="pca", perplexity=min(30, len(feats) - 1), random_state=seed).fit_transform(
        F.normalize(torch.as_tensor(feats).float(), dim=1).numpy())
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(int(c) % cmap.N), label=classes[c] if classes else str(c))
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


class KnnMonitor:
    """kNN accuracy on a labeled split during training (inputs preprocessed once)."""

    def __init__(self, bank_ds: data.Dataset, query_ds: data.Dataset, pp: Preprocess, k: int, t: float,
                 max_bank: int, seed: int = 0):
        rng = np.random.default_rng(seed)

        def pick(ds, n):
            return np.sort(rng.choice(len(ds), n, replace=False)) if len(ds) > n else None

        self.bank_x, kept = eval_inputs(bank_ds, pp, pick(bank_ds, max_bank))
        self.bank_y = torch.as_tensor(bank_ds.labels[kept])
        self.query_x, kept = eval_inputs(query_ds, pp, pick(query_ds, max(max_bank // 5, 1)))
        self.query_y = torch.as_tensor(query_ds.labels[kept])
        self.k, self.t = k, t

    def __call__(self, model, device, batch_size: int = 512) -> float:
        was_training = model.training
        model.eval()
        try:
            bank = embed(model.embed, self.bank_x, batch_size, device)
            query = embed(model.embed, self.query_x, batch_size, device)
        finally:
            model.train(was_training)
        return knn_accuracy(bank, self.bank_y, query, self.query_y, self.k, self.t)


def load_encoder(target: str | Path, device="cpu"):
    """(model in eval mode, checkpoint dict, checkpoint path) from a checkpoint / stage / run folder."""
    from edgeclr.models import ModelSpec, create_model

    path = checkpoint.find(target, "train")
    ckpt = checkpoint.load(path)
    model = create_model(ModelSpec.from_dict(ckpt["spec"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{path}: its weights do not fit its own model spec {ckpt['spec']}: {str(e)[:300]}") from e
    return model.to(device).eval(), ckpt, path


def format_table(rows: list[dict]) -> str:
    cols = ["features", "dim", "knn_top1", "linear_top1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["features"]), str(r["dim"])] + [f"{r[c]:.2f}" if r.get(c) is not None else "-" for c in cols[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg) -> dict:
    """`edgeclr eval`: print and record kNN / linear-probe accuracy of a checkpoint and baselines."""
    from edgeclr.models import create_model
    from edgeclr.rundir import MetricsLog, write_json_atomic
    from edgeclr.train import resolve_device

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model, ckpt, path = load_encoder(cfg.target, device)
    tcfg = ckpt.get("config") or {}
    spec_name = ckpt["spec"]["name"]
    pp = Preprocess.from_dict(ckpt["preprocess"])
    data_spec = cfg.data or tcfg.get("data")
    if not data_spec:
        raise data.DataError(f"{path} does not record its dataset: pass --data")
    kw = dict(base_size=pp.resize_size, tile_size=tcfg.get("tile_size", 64), tile_stride=tcfg.get("tile_stride", 64),
              tile_min_foreground=tcfg.get("tile_min_foreground", 0.5), seed=cfg.seed)
    train_ds, test_ds = data.open_dataset(data_spec, "train", **kw), data.open_dataset(data_spec, "test", **kw)
    for ds in (train_ds, test_ds):
        if not data.has_labels(ds):
            raise data.DataError(f"{ds.name} has no class labels: kNN and linear-probe accuracy need a labeled "
                                 "split (sub-folders per class, or a labeled dataset via --data)")
    sub = None
    if cfg.max_train and len(train_ds) > cfg.max_train:
        sub = np.sort(np.random.default_rng(cfg.seed).choice(len(train_ds), cfg.max_train, replace=False))
    x_tr, k_tr = eval_inputs(train_ds, pp, sub)
    x_te, k_te = eval_inputs(test_ds, pp)
    y_tr, y_te = train_ds.labels[k_tr], test_ds.labels[k_te]

    feature_fns = [("model", f"{spec_name} ({ckpt['stage']})", model.embed)]
    baselines = list(filter(None, cfg.baselines.split(",")))
    if "random" in baselines:
        torch.manual_seed(cfg.seed)
        rnd = create_model(model.spec).to(device).eval()
        feature_fns.append(("random", f"{spec_name} random init", rnd.embed))
    if "pixels" in baselines:
        feature_fns.append(("pixels", f"raw pixels {pp.input_size}px", lambda x: x.flatten(1)))

    stage_dir = path.parent.parent
    rows = []
    for key, name, fn in feature_fns:
        f_tr, f_te = embed(fn, x_tr, cfg.batch_size, device), embed(fn, x_te, cfg.batch_size, device)
        row = {"key": key, "features": name, "dim": f_tr.shape[1],
               "knn_top1": knn_accuracy(f_tr, y_tr, f_te, y_te, cfg.knn_k, cfg.knn_t)}
        row["linear_top1"] = linear_probe(f_tr.numpy(), y_tr, f_te.numpy(), y_te, cfg.seed) if cfg.linear_probe else None
        rows.append(row)
        log.info("%s: kNN %.2f%%", name, row["knn_top1"])
        if cfg.tsne and key == "model":
            tsne_plot(f_te.numpy(), y_te, stage_dir / "tsne.png", test_ds.classes, f"{name}: test embeddings", cfg.seed)

    result = {"checkpoint": str(path), "checkpoint_sha256": checkpoint.sha256(path), "data": data_spec,
              "train_images": int(len(y_tr)), "test_images": int(len(y_te)), "knn_k": cfg.knn_k, "knn_t": cfg.knn_t,
              "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(result, stage_dir / "eval.json")
    ml = MetricsLog(stage_dir / "metrics.csv", "eval")
    for r in rows:
        key = r["key"]
        ml.log({f"eval/{key}/knn_top1": r["knn_top1"], **({f"eval/{key}/linear_top1": r["linear_top1"]} if r["linear_top1"] is not None else {})})
    ml.close()
    result["table"] = format_table(rows)
    return result
