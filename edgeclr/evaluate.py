"""`edgeclr eval`: kNN and linear-probe accuracy of frozen embeddings, baselines, t-SNE; and
`--compare`, the retention table of every stage and exported artifact of a run.

    main: HeldOut.open -> [model, random init, raw pixels] -> kNN + linear probe -> eval.json, t-SNE
    compare_main: stage checkpoints + exported files -> compare_row each -> compare.json / compare.md

The kNN scorer is edgeclr.heldout's, the one every stage uses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeclr import checkpoint, finetune
from edgeclr.bench import latencies
from edgeclr.engine import resolve_device
from edgeclr.errors import CheckpointError, DataError
from edgeclr.formats import format_of
from edgeclr.heldout import HeldOut, public
from edgeclr.loading import load_encoder, stage_checkpoints
from edgeclr.lock import hold
from edgeclr.models import count_macs, count_params, create_model
from edgeclr.report import compare_table, eval_table, write_label_efficiency
from edgeclr.rundir import MetricsLog, exported_files, write_json_atomic
from edgeclr.runtime import Embedder, Preprocess

log = logging.getLogger("edgeclr.evaluate")


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


def labeled_heldout(data_spec: str, pp: Preprocess, run_cfg: dict, cfg, what: str) -> HeldOut:
    """The whole labeled test split against the labeled train split (at most cfg.max_train of it)."""
    held = HeldOut.open(data_spec, pp, run_cfg, cfg.seed, cfg.max_train or None, k=cfg.knn_k, t=cfg.knn_t)
    if held is None:
        raise DataError(f"{data_spec} has no class labels: {what} needs a labeled split (sub-folders per class, or a "
                        "labeled dataset via --data)")
    return held


# ----------------------------------------------------------------------------------------------
# --compare: every stage and artifact of a run


def run_entries(run_dir: Path) -> list[tuple[str, str, Path]]:
    """(name, "torch" | "runtime", path) of every stage checkpoint and exported file of a run, teacher first."""
    if not run_dir.is_dir():
        raise DataError(f"--compare takes a run folder (runs/NAME), got {run_dir}")
    entries = [({"train": "teacher", "distill": "student", "compress": "pruned"}[s], "torch", f)
               for s, f in stage_checkpoints(run_dir).items()]
    entries += [(str(f.relative_to(run_dir)), "runtime", f) for f in exported_files(run_dir)]
    if not entries or entries[0][0] != "teacher":
        raise CheckpointError(f"{run_dir} has no teacher checkpoint (train/checkpoints/last.pt): --compare "
                              "needs a run folder written by `edgeclr train` and later stages")
    return entries


def measure_entry(kind: str, path: Path, pp: Preprocess, held: HeldOut, cfg) -> dict | None:
    """Embeddings, size, MACs and runtime of one entry; None when its preprocessing differs from the
    teacher's (another input size: not comparable on the same images)."""
    if kind == "torch":
        model, ck, _ = load_encoder(path, "cpu")
        if Preprocess.from_dict(ck["preprocess"]).input_size != pp.input_size:
            return None
        params = count_params(model)
        out = {"macs": count_macs(model, (pp.channels, pp.input_size, pp.input_size)), "params": params, "size_bytes": params * 4,
               "runtime": "torch", "source_stage": ck["stage"]}
        out["features"] = held.features(model.embed, cfg.batch_size)
        return out
    emb = Embedder.load(path, threads=0, precision="f32")
    if emb.meta.preprocess != pp:
        log.info("skipping %s: its preprocessing differs from the teacher's", path)
        return None
    out = {"macs": emb.meta.macs, "params": emb.meta.params, "size_bytes": format_of(path).size_bytes(path),
           "runtime": format_of(path).name, "source_stage": emb.meta.source_stage, "precision": emb.meta.precision}
    out["features"] = held.features(lambda x: torch.from_numpy(emb.embed_arrays(x.numpy(), cfg.batch_size)), cfg.batch_size)
    return out


def add_latency(rows: list[dict], runs: int) -> None:
    """Every row's 1-thread batch-1 latency, from one interleaved measurement of all of them
    (bench.latencies), and its speed-up over the teacher in the same runtime: the teacher's own
    export for a file (`edgeclr export`), the teacher in torch eager for a checkpoint, or the
    teacher in torch eager when the run has no export of it in that runtime."""
    ms = latencies({r["model"]: r["path"] for r in rows}, threads=1, batch=1, runs=runs)
    for r in rows:
        r["latency_ms_1thread"] = ms[r["model"]]
    teacher = rows[0]
    for r in rows:
        ref = next((t for t in rows if t["runtime"] == r["runtime"] and t["source_stage"] == "train"
                    and t.get("precision", "fp32") == "fp32"), teacher)
        r["speedup_vs_teacher"] = ref["latency_ms_1thread"] / r["latency_ms_1thread"]
        r["speedup_reference"] = ref["model"]


def compare_row(name: str, kind: str, path: Path, m: dict, held: HeldOut, cfg, ref: dict | None) -> dict:
    """One row of the retention table: HeldOut.score_features' figures (against the teacher's row
    `ref`: kNN agreement, cosine, top-10 overlap), retention, size (speed: add_latency)."""
    f_tr, f_te = m.pop("features")
    scores = held.score_features(f_tr, f_te, ref, cfg.linear_probe, cfg.seed)
    row = {"model": name, "kind": kind, "path": str(path), "linear_top1": None, **scores, **m}
    if ref is not None:
        row["retention"] = row["knn_top1"] / ref["knn_top1"]
    return row


def compare_main(cfg) -> dict:
    """`edgeclr eval --compare RUN`: every stage and exported artifact of a run on the same held-out
    images: kNN and linear-probe accuracy, agreement with the teacher (kNN predictions, top-10
    neighbours, cosine), size, MACs, 1-thread batch-1 latency and speed-up vs the teacher in the
    same runtime (add_latency)."""
    t0 = time.time()
    run_dir = Path(cfg.target)
    entries = run_entries(run_dir)
    with hold(run_dir, "the run folder", is_dir=True):  # compare.json / compare.md: one writer
        return _compare(cfg, run_dir, entries, t0)


def _compare(cfg, run_dir: Path, entries: list, t0: float) -> dict:
    _, tck, _ = load_encoder(entries[0][2], "cpu")
    pp = Preprocess.from_dict(tck["preprocess"])
    tcfg = tck.get("config") or {}
    data_spec = cfg.data or tcfg.get("data")
    held = labeled_heldout(data_spec, pp, tcfg, cfg, "--compare")
    rows, ref = [], None
    for name, kind, path in entries:
        m = measure_entry(kind, path, pp, held, cfg)
        if m is None:
            continue
        row = compare_row(name, kind, path, m, held, cfg, ref)
        ref = ref or row
        rows.append(row)
    add_latency(rows, cfg.latency_runs)
    for row in rows:
        log.info("%s: kNN %.2f%%, %.3f ms", row["model"], row["knn_top1"], row["latency_ms_1thread"])
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    result = {"run": str(run_dir), "data": data_spec, "train_images": len(held.bank_y), "test_images": len(held.query_y),
              "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(result, run_dir / "compare.json")
    result["table"] = compare_table(rows)
    (run_dir / "compare.md").write_text(result["table"] + "\n")
    return result


# ----------------------------------------------------------------------------------------------
# one model against its baselines


def feature_functions(model, ckpt: dict, pp: Preprocess, cfg, device) -> list[tuple[str, str, object]]:
    """(key, name, embed function) of the model and the baselines asked for (random init, raw pixels)."""
    spec_name = ckpt["spec"]["name"]
    fns = [("model", f"{spec_name} ({ckpt['stage']})", model.embed)]
    baselines = list(filter(None, cfg.baselines.split(",")))
    if "random" in baselines:
        torch.manual_seed(cfg.seed)
        rnd = create_model(model.spec).to(device).eval()
        fns.append(("random", f"{spec_name} random init", rnd.embed))
    if "pixels" in baselines:
        fns.append(("pixels", f"raw pixels {pp.input_size}px", lambda x: x.flatten(1)))
    return fns


def main(cfg) -> dict:
    """`edgeclr eval`: print and record kNN / linear-probe accuracy of a checkpoint and baselines."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.compare:
        return compare_main(cfg)
    device = resolve_device(cfg.device)
    model, ckpt, path = load_encoder(cfg.target, device)
    tcfg = ckpt.get("config") or {}
    pp = Preprocess.from_dict(ckpt["preprocess"])
    data_spec = cfg.data or tcfg.get("data")
    if not data_spec:
        raise DataError(f"{path} does not record its dataset: pass --data")
    held = labeled_heldout(data_spec, pp, tcfg, cfg, "kNN and linear-probe accuracy")
    stage_dir = path.parent.parent
    with hold(stage_dir, "the stage folder", is_dir=True):  # eval.json, metrics.csv, tsne.png: one writer
        return _evaluate(cfg, model, ckpt, path, pp, data_spec, held, stage_dir, device, t0)


def _evaluate(cfg, model, ckpt: dict, path: Path, pp: Preprocess, data_spec: str, held: HeldOut, stage_dir: Path, device,
              t0: float) -> dict:
    y_tr, y_te = held.bank_y.numpy(), held.query_y.numpy()
    rows, feats = [], {}
    for key, name, fn in feature_functions(model, ckpt, pp, cfg, device):
        f_tr, f_te = held.features(fn, cfg.batch_size, device)
        feats[key] = (name, f_tr, f_te)
        row = {"key": key, "features": name, "dim": f_tr.shape[1], "linear_top1": None,
               **public(held.score_features(f_tr, f_te, None, cfg.linear_probe, cfg.seed))}
        rows.append(row)
        log.info("%s: kNN %.2f%%", name, row["knn_top1"])
        if cfg.tsne and key == "model":
            tsne_plot(f_te.numpy(), y_te, stage_dir / "tsne.png", held.classes, f"{name}: test embeddings", cfg.seed)

    if cfg.label_efficiency:
        result_le = finetune.label_efficiency(model, ckpt, pp, held, feats, cfg.levels(), cfg.draws, cfg.finetune_steps,
                                              ckpt.get("config") or {}, device, cfg.seed)
        write_label_efficiency(result_le, stage_dir)
        log.info("label efficiency: %s (%.0f s)", stage_dir / "label_efficiency.md", result_le["wall_time_s"])
    result = {"checkpoint": str(path), "checkpoint_sha256": checkpoint.sha256(path), "data": data_spec,
              "train_images": int(len(y_tr)), "test_images": int(len(y_te)), "knn_k": cfg.knn_k, "knn_t": cfg.knn_t,
              "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
    if cfg.label_efficiency:
        result["label_efficiency"] = str(stage_dir / "label_efficiency.json")
    write_json_atomic(result, stage_dir / "eval.json")
    ml = MetricsLog(stage_dir / "metrics.csv", "eval")
    for r in rows:
        key = r["key"]
        ml.log({f"eval/{key}/knn_top1": r["knn_top1"], **({f"eval/{key}/linear_top1": r["linear_top1"]} if r["linear_top1"] is not None else {})})
    ml.close()
    result["table"] = eval_table(rows)
    return result
