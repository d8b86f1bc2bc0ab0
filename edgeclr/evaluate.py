"""Evaluation of frozen embeddings: weighted kNN, linear probe, t-SNE; baselines.

kNN follows Wu et al. 2018 (InstDisc), the protocol SimCLR codebases report: L2-normalised
features, cosine similarity, the k nearest bank images vote with weight exp(sim / T).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeclr import checkpoint, data
from edgeclr.rundir import STAGES
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


def batchnorms(model) -> list:
    """The model's BatchNorm layers (any dimension)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn_on(model, x: torch.Tensor, device, batch_size: int = 256) -> int:
    """Re-estimate every BatchNorm's running mean/variance on the preprocessed images x, as an exact
    average over them (momentum None); returns the images used (see distill.recalibrate_bn)."""
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


class KnnMonitor:
    """kNN accuracy on a labeled split during training (inputs preprocessed once).

    With bn_recalibrate, a copy of the model is scored after its BatchNorm statistics are
    re-estimated on the bank's clean images, as the final student will be (distill.recalibrate_bn):
    the running statistics of strongly augmented views can be far off mid-training (MobileNetV3-Large
    distilled on 16-px digits: 3.3% kNN at epoch 10 and 28.4% at epoch 30 from them, 91.3% once
    re-estimated), so the monitor would report a model that does not exist.
    """

    def __init__(self, bank_ds: data.Dataset, query_ds: data.Dataset, pp: Preprocess, k: int, t: float,
                 max_bank: int, seed: int = 0, bn_recalibrate: bool = False):
        rng = np.random.default_rng(seed)

        def pick(ds, n):
            return np.sort(rng.choice(len(ds), n, replace=False)) if len(ds) > n else None

        self.bank_x, kept = eval_inputs(bank_ds, pp, pick(bank_ds, max_bank))
        self.bank_y = torch.as_tensor(bank_ds.labels[kept])
        self.query_x, kept = eval_inputs(query_ds, pp, pick(query_ds, max(max_bank // 5, 1)))
        self.query_y = torch.as_tensor(query_ds.labels[kept])
        self.k, self.t, self.bn_recalibrate = k, t, bn_recalibrate

    def __call__(self, model, device, batch_size: int = 512, recalibrate: bool | None = None) -> float:
        """kNN top-1 of model; recalibrate overrides the monitor's bn_recalibrate (False: score the
        model's own statistics, e.g. a teacher, or a student whose statistics were just re-estimated)."""
        recalibrate = self.bn_recalibrate if recalibrate is None else recalibrate
        if recalibrate and batchnorms(model):
            model = copy.deepcopy(model)  # the training model's statistics stay as they are
            recalibrate_bn_on(model, self.bank_x, device)
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
    from edgeclr.models import model_from_checkpoint

    path = checkpoint.find(target, "train")
    ckpt = checkpoint.load(path)
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{path}: its weights do not fit its own model spec {ckpt['spec']}: {str(e)[:300]}") from e
    return model.to(device).eval(), ckpt, path


def format_table(rows: list[dict]) -> str:
    cols = ["features", "dim", "knn_top1", "linear_top1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["features"]), str(r["dim"])] + [f"{r[c]:.2f}" if r.get(c) is not None else "-" for c in cols[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labeled_splits(data_spec: str, pp: Preprocess, train_cfg: dict, seed: int, splits=("train", "test")) -> list:
    """The labeled splits of a checkpoint's dataset, opened the way its training run opened them."""
    kw = dict(base_size=pp.resize_size, tile_size=train_cfg.get("tile_size", 64), tile_stride=train_cfg.get("tile_stride", 64),
              tile_min_foreground=train_cfg.get("tile_min_foreground", 0.5), seed=seed)
    return [data.open_dataset(data_spec, s, **kw) for s in splits]


def stage_checkpoints(run_dir: Path) -> dict[str, Path]:
    """{stage: checkpoint} of a run, in pipeline order, following the links a stage records when
    its inputs live in another run folder (compress -> its student, a student -> its teacher)."""
    from edgeclr.rundir import read_manifest

    found = {s: run_dir / s / "checkpoints" / "last.pt" for s in STAGES if (run_dir / s / "checkpoints" / "last.pt").is_file()}
    if "compress" in found and "distill" not in found:
        st = ((read_manifest(run_dir / "compress") or {}).get("inputs") or {}).get("student")
        if st and Path(st).is_file():
            found["distill"] = Path(st)
    if "train" not in found:
        for s in ("distill", "compress"):
            tp = (checkpoint.load(found[s]).get("teacher") or {}).get("path") if s in found else None
            if tp and Path(tp).is_file():
                found["train"] = Path(tp)
                break
    return {s: found[s] for s in STAGES if s in found}


def compare_main(cfg) -> dict:
    """`edgeclr eval --compare RUN`: every stage and exported artifact of a run on the same held-out
    images: kNN and linear-probe accuracy, agreement with the teacher (kNN predictions, top-10
    neighbours, cosine), size, MACs, 1-thread batch-1 latency and speed-up vs the teacher (torch
    eager for checkpoints, edgeclr.runtime for exported files)."""
    from edgeclr.models import count_macs, count_params
    from edgeclr.rundir import write_json_atomic
    from edgeclr.runtime import Embedder, median_latency_ms

    t0 = time.time()
    run_dir = Path(cfg.target)
    if not run_dir.is_dir():
        raise data.DataError(f"--compare takes a run folder (runs/NAME), got {run_dir}")
    entries = [({"train": "teacher", "distill": "student", "compress": "pruned"}[s], "torch", f)
               for s, f in stage_checkpoints(run_dir).items()]  # (name, kind, path)
    from edgeclr.rundir import exported_files

    entries += [(str(f.relative_to(run_dir)), "runtime", f) for f in exported_files(run_dir)]
    if not entries or entries[0][0] != "teacher":
        raise checkpoint.CheckpointError(f"{run_dir} has no teacher checkpoint (train/checkpoints/last.pt): --compare "
                                         "needs a run folder written by `edgeclr train` and later stages")
    teacher, tck, _ = load_encoder(entries[0][2], "cpu")
    pp = Preprocess.from_dict(tck["preprocess"])
    tcfg = tck.get("config") or {}
    data_spec = cfg.data or tcfg.get("data")
    train_ds, test_ds = labeled_splits(data_spec, pp, tcfg, cfg.seed)
    if not (data.has_labels(train_ds) and data.has_labels(test_ds)):
        raise data.DataError(f"{data_spec} has no class labels: --compare needs a labeled split")
    sub = None
    if cfg.max_train and len(train_ds) > cfg.max_train:
        sub = np.sort(np.random.default_rng(cfg.seed).choice(len(train_ds), cfg.max_train, replace=False))
    x_tr, k_tr = eval_inputs(train_ds, pp, sub)
    x_te, k_te = eval_inputs(test_ds, pp)
    y_tr, y_te = torch.as_tensor(train_ds.labels[k_tr]), torch.as_tensor(test_ds.labels[k_te])
    n_cls = int(max(y_tr.max(), y_te.max())) + 1
    threads = torch.get_num_threads()
    rows, ref = [], None
    for name, kind, path in entries:
        if kind == "torch":
            model, ck, _ = load_encoder(path, "cpu")
            if Preprocess.from_dict(ck["preprocess"]).input_size != pp.input_size:
                continue
            fn = model.embed
            shape = (pp.channels, pp.input_size, pp.input_size)
            macs, params, size = count_macs(model, shape), count_params(model), count_params(model) * 4

            def one(x, m=model):
                with torch.inference_mode():
                    return m.embed(torch.from_numpy(x))
            torch.set_num_threads(1)
            lat = median_latency_ms(one, x_te[:1].numpy(), cfg.latency_runs)
            torch.set_num_threads(threads)
            f_tr, f_te = embed(fn, x_tr, cfg.batch_size), embed(fn, x_te, cfg.batch_size)
        else:
            emb = Embedder.load(path, threads=0, precision="f32")
            if emb.meta.preprocess != pp:
                log.info("skipping %s: its preprocessing differs from the teacher's", path)
                continue
            macs, params = emb.meta.macs, emb.meta.params
            size = sum(f.stat().st_size for f in [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else []))
            f_tr = torch.from_numpy(emb.embed_arrays(x_tr.numpy(), cfg.batch_size))
            f_te = torch.from_numpy(emb.embed_arrays(x_te.numpy(), cfg.batch_size))
            one_emb = Embedder.load(path, threads=1, precision="f32")
            lat = median_latency_ms(lambda x, e=one_emb: e.embed_arrays(x, 1), x_te[:1].numpy(), cfg.latency_runs)
        pred = knn_predict(f_tr, y_tr, f_te, cfg.knn_k, cfg.knn_t, n_cls)
        row = {"model": name, "kind": kind, "path": str(path), "knn_top1": 100.0 * float((pred == y_te).float().mean()),
               "linear_top1": linear_probe(f_tr.numpy(), y_tr.numpy(), f_te.numpy(), y_te.numpy(), cfg.seed) if cfg.linear_probe else None,
               "macs": macs, "params": params, "size_bytes": size, "latency_ms_1thread": lat}
        if ref is None:
            ref = {"pred": pred, "f_te": f_te, "row": row}
        else:
            row["knn_agreement_with_teacher"] = float((pred == ref["pred"]).float().mean())
            row.update({f"{k}_with_teacher": v for k, v in agreement(f_te[:2000], ref["f_te"][:2000]).items()})
            row["retention"] = row["knn_top1"] / ref["row"]["knn_top1"]
        row["speedup_vs_teacher"] = ref["row"]["latency_ms_1thread"] / lat
        rows.append(row)
        log.info("%s: kNN %.2f%%, %.3f ms", name, row["knn_top1"], lat)
    result = {"run": str(run_dir), "data": data_spec, "train_images": len(y_tr), "test_images": len(y_te), "rows": rows,
              "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(result, run_dir / "compare.json")
    result["table"] = format_compare(rows)
    (run_dir / "compare.md").write_text(result["table"] + "\n")
    return result


def format_compare(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)

    lines = ["| model | kNN % | linear % | retention | kNN agreement | top-10 overlap | size MB | MMACs | ms (1 thread) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {f(r['knn_top1'], '{:.2f}')} | {f(r['linear_top1'], '{:.2f}')} | {f(r.get('retention'), '{:.3f}')} | "
                     f"{f(r.get('knn_agreement_with_teacher'), '{:.3f}')} | {f(r.get('topk_overlap_with_teacher'), '{:.3f}')} | "
                     f"{r['size_bytes'] / 1e6:.2f} | {f(r['macs'] and r['macs'] / 1e6, '{:.1f}')} | {r['latency_ms_1thread']:.3f} | "
                     f"{r['speedup_vs_teacher']:.2f}x |")
    return "\n".join(lines)


def main(cfg) -> dict:
    """`edgeclr eval`: print and record kNN / linear-probe accuracy of a checkpoint and baselines."""
    from edgeclr.models import create_model
    from edgeclr.rundir import MetricsLog, write_json_atomic
    from edgeclr.train import resolve_device

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.compare:
        return compare_main(cfg)
    device = resolve_device(cfg.device)
    model, ckpt, path = load_encoder(cfg.target, device)
    tcfg = ckpt.get("config") or {}
    spec_name = ckpt["spec"]["name"]
    pp = Preprocess.from_dict(ckpt["preprocess"])
    data_spec = cfg.data or tcfg.get("data")
    if not data_spec:
        raise data.DataError(f"{path} does not record its dataset: pass --data")
    train_ds, test_ds = labeled_splits(data_spec, pp, tcfg, cfg.seed)
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
