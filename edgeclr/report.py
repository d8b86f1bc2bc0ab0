"""The run report: OUT/report.md and OUT/report.html (self-contained: images embedded as base64).

Built only from the files the stages wrote (pipeline.json, train/eval.json, compare.json,
compress/report.json, bench/bench.json, each stage's metrics.csv and t-SNE plots), so it can be
rebuilt at any time with `edgeclr pipeline --from report`.

The report is a list of blocks (heading, text, table, image, code) rendered twice: markdown (the
images as files in OUT/report_files/) and HTML (the same images inline).
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import re
import time
from pathlib import Path

from edgeclr.formats import format_of
from edgeclr.rundir import read_manifest, read_metrics, write_atomic, write_json_atomic

_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}.hl{background:#eef6ee;padding:.6em 1em;border-left:4px solid #4a4}
figure{margin:1em 0}figure.half{display:inline-block;width:48%;vertical-align:top;margin-right:1%}
figcaption{font-size:13px;color:#555}"""


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _series(csv_path: Path, name: str) -> dict[str, list[tuple[float, float]]]:
    """{stage: [(x, value)]} of one metric in a stage's metrics.csv (x = global step, or epoch for kNN)."""
    if not csv_path.exists():
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for r in read_metrics(csv_path):
        if r["name"] == name:
            x = r["epoch"] if name == "knn_top1" else r["step"]
            if x != "":
                out.setdefault(r["stage"], []).append((float(x), float(r["value"])))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def _curves_chart(out: Path, metric: str, ylabel: str, title: str) -> bytes | None:
    series = {}
    for stage in ("train", "distill", "compress"):
        s = _series(out / stage / "metrics.csv", metric).get(stage)
        if s:
            series[stage] = s
    if not series:
        return None
    plt = _plt()
    if metric == "loss":  # different objectives: one panel each
        fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
        for ax, (stage, s) in zip(axes[0], series.items()):
            ax.plot([p[0] for p in s], [p[1] for p in s], lw=1)
            ax.set_title({"train": "SimCLR (NT-Xent)", "distill": "distillation", "compress": "pruning recovery"}[stage], fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
    else:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for stage, s in series.items():
            ax.plot([p[0] for p in s], [p[1] for p in s], marker="o", label={"train": "teacher", "distill": "student"}.get(stage, stage))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _speed_chart(rows: list[dict]) -> bytes | None:
    if not rows:
        return None
    plt = _plt()
    names = [r["model"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.2), sharey=True)
    y = range(len(rows))
    a1.barh(y, [r["latency_ms_1thread"] for r in rows], color="#4a7")
    a1.set_yticks(list(y), names, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("latency, ms (1 thread, batch 1)")
    a2.barh(y, [r["size_bytes"] / 1e6 for r in rows], color="#47a")
    a2.set_xlabel("size on disk, MB")
    fig.tight_layout()
    return _png(fig)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("edgeclr", "torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf", "torch-pruning", "numpy"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return v


# ----------------------------------------------------------------------------------------------
# markdown tables: every table a stage prints or a report shows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table: one header row, one row per list of cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _fmt(v, f="{:.2f}") -> str:
    """A number as a cell: '' for a missing value (None or NaN)."""
    return "" if v is None or (isinstance(v, float) and v != v) else f.format(v)


def eval_table(rows: list[dict]) -> str:
    """`edgeclr eval`: kNN and linear-probe accuracy of a model and its baselines."""
    return markdown_table(["features", "dim", "knn_top1", "linear_top1"],
                          [[str(r["features"]), str(r["dim"])] + [_fmt(r.get(c)) or "-" for c in ("knn_top1", "linear_top1")]
                           for r in rows])


# the label-efficiency curve's methods, as its table, verdict and chart name them
LE_METHODS = {"knn": "kNN", "linear": "linear probe", "frozen": "frozen encoder", "finetune": "full fine-tuning"}


def _level_name(le: dict, i: int, per: str = " / class") -> str:
    """How a curve's i-th level reads: "5 / class" (a classifier's), "16 tiles" / "all 461 tiles" (a segmenter's)."""
    n = le["levels"][i]
    if le.get("unit") == "tiles":
        return f"{n} tiles" if n else f"all {le['level_counts'][i]} tiles"
    return f"{n}{per}"


def label_efficiency_table(le: dict) -> str:
    """The label-efficiency curve as a table: the figure (accuracy, or mIoU for a segmenter; mean ±
    spread over the draws) per level (labelled images per class, or labelled tiles)."""
    return markdown_table(["method", "features"] + [_level_name(le, i) for i in range(len(le["levels"]))],
                          [[LE_METHODS[r["method"]], r["name"]] + [f"{p['mean']:.2f} ± {p['std']:.2f}" for p in r["points"]]
                           for r in le["rows"]])


def label_efficiency_verdict(le: dict) -> str:
    """One sentence per level: the best result from the model's features against random init's and raw pixels'."""
    parts = []
    for i in range(len(le["levels"])):
        best = {}
        for r in le["rows"]:
            m = r["points"][i]["mean"]
            if r["features"] not in best or m > best[r["features"]][0]:
                best[r["features"]] = (m, f"{LE_METHODS[r['method']]}: {r['name']}")
        if "model" not in best:
            continue
        m, how = best["model"]
        others = [f"{name} {best[k][0]:.2f}% ({m - best[k][0]:+.2f} points)" for k, name in (("random", "random init"), ("pixels", "raw pixels"))
                  if k in best]
        lose = [name for k, name in (("random", "random init"), ("pixels", "raw pixels")) if k in best and best[k][0] > m]
        parts.append(f"at {_level_name(le, i, ' per class')} the model's best is {m:.2f}% ({how}); against {', '.join(others) or 'no baseline'}"
                     + (f": {' and '.join(lose)} ahead" if lose else ""))
    return ("Best of each: " + "; ".join(parts) + ".") if parts else ""


def label_efficiency_chart(le: dict) -> bytes:
    """Accuracy against labels per class (log axis), one line per method and features, spread as error bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colours = {"model": "#c33", "random": "#37a", "pixels": "#888"}
    styles = {"knn": ":", "linear": "--", "frozen": "--", "finetune": "-"}
    tiles = le.get("unit") == "tiles"
    at = dict(zip(le["levels"], le.get("level_counts") or le["levels"]))  # "all" tiles drawn at their count
    for r in le["rows"]:
        xs = [at[p["level"]] if tiles else p["per_class"] for p in r["points"]]
        ax.errorbar(xs, [p["mean"] for p in r["points"]], yerr=[p["std"] for p in r["points"]], ls=styles[r["method"]],
                    color=colours.get(r["features"], "#555"), marker="o", ms=3, capsize=2,
                    label=f"{LE_METHODS[r['method']]}: {r['name']}")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([at[n] for n in le["levels"]], [str(at[n]) for n in le["levels"]])
    ax.set_xlabel("labelled tiles" if tiles else "labelled images per class")
    ax.set_ylabel("test mIoU %" if tiles else "test accuracy %")
    ax.set_title(f"Label efficiency (mean and spread over {le['draws']} draws)", fontsize=10)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def write_label_efficiency(le: dict, folder: Path) -> None:
    """FOLDER/label_efficiency.{json,md,png}: a curve (a classifier's from `eval`, a segmenter's from
    `finetune`), each file whole or not at all."""
    write_json_atomic(le, folder / "label_efficiency.json")
    write_atomic(label_efficiency_table(le) + "\n", folder / "label_efficiency.md")
    write_atomic(label_efficiency_chart(le), folder / "label_efficiency.png")


def compare_table(rows: list[dict]) -> str:
    """`edgeclr eval --compare`: the retention table of every stage and artifact of a run."""
    header = ["model", "kNN %", "linear %", "retention", "kNN agreement", "top-10 overlap", "size MB", "MMACs", "ms (1 thread)",
              "speed-up", "vs"]
    return markdown_table(header, [[
        r["model"], _fmt(r["knn_top1"]), _fmt(r["linear_top1"]), _fmt(r.get("retention"), "{:.3f}"),
        _fmt(r.get("knn_agreement", r.get("knn_agreement_with_teacher")), "{:.3f}"),  # the keys of compare.json files before
        _fmt(r.get("topk_overlap", r.get("topk_overlap_with_teacher")), "{:.3f}"),     # HeldOut.score_features named them
        f"{r['size_bytes'] / 1e6:.2f}", _fmt(r["macs"] and r["macs"] / 1e6, "{:.1f}"), f"{r['latency_ms_1thread']:.3f}",
        f"{r['speedup_vs_teacher']:.2f}x", r.get("speedup_reference", "teacher")] for r in rows])


_COMPRESS_COLS = [("knn_top1", "kNN top-1 %", "{:.2f}"), ("retention", "retention", "{:.3f}"),
                  ("knn_agreement", "kNN agreement", "{:.3f}"), ("cosine_mean", "cosine", "{:.4f}"), ("macs", "MACs (M)", None),
                  ("params", "params (M)", None), ("bytes", "size (MB)", None),
                  ("latency_ms_1thread", "latency 1 thread (ms)", "{:.3f}"), ("speedup_vs_fp32", "INT8 speed-up", "{:.2f}x")]


def compress_table(report: dict) -> str:
    """`edgeclr compress`: every artifact against the FP32 student (compress/report.json)."""
    def cell(key, f, v):
        return "" if v is None else f"{v / 1e6:.2f}" if key in ("macs", "params", "bytes") else f.format(v)

    return markdown_table(["model"] + [c[1] for c in _COMPRESS_COLS],
                          [[name] + [cell(k, f, r.get(k)) for k, _, f in _COMPRESS_COLS] for name, r in report.items()])


def bench_table(result: dict) -> str:
    """`edgeclr bench`: the machine line, then one row per configuration (bench/bench.json)."""
    m = result["machine"]
    head = (f"Machine: {m['cpu']} ({m['cores']} cores, {m['arch']}); baseline: {result['baseline']}; "
            f"{result['rounds']} interleaved rounds x {result['runs_per_round']} runs after {result['warmup_s']} s warm-up; "
            "matmul peak (FP32 GMAC/s): " + ", ".join(f"{t} thread(s) {p / 1e9:.1f}" for t, p in result["matmul_peak_macs_per_s"].items()))
    header = ["model", "format", "ran as", "threads (set/seen)", "batch", "p50 ms", "p90 ms", "p99 ms", "runtime's own p50 ms", "img/s",
              "peak RSS MB", "size MB", "MMACs", "efficiency", "speed-up vs baseline"]
    rows = [[r["label"], r["format"], r["precision_ran"], f"{r['threads_setting']}/{r['threads_in_process']}", str(r["batch"]),
             f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", _fmt(r.get("runtime_p50_ms"), "{:.3f}"),
             f"{r['images_per_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['size_bytes'] / 1e6:.2f}",
             f"{r['macs'] / 1e6:.1f}" if r.get("macs") else "", f"{r['efficiency']:.3f}" if r.get("efficiency") else "",
             f"{r['speedup_vs_baseline']:.2f}x" if r.get("speedup_vs_baseline") else ""] for r in result["rows"]]
    return head + "\n\n" + markdown_table(header, rows)


def deploy_table(sel: dict) -> str:
    """`edgeclr deploy`: every candidate with its accuracy, latency, size and why it won or lost (selection.json)."""
    labeled = sel.get("labeled", True)
    head = (f"Rule: {sel.get('rule_text', '')}; {sel.get('latency_source', '')}; target {sel.get('target')}, OpenVINO precision "
            f"{sel.get('precision')}.")
    header = ["candidate", "network", "runtime", "ran as"] + (["kNN %", "vs teacher", "linear %"] if labeled else ["top-10 overlap"]) + \
        ["p50 ms", "p90 ms", "size MB", "model RSS MB", "Pareto", "verdict"]
    rows = []
    for r in sorted(sel["candidates"], key=lambda r: r["p50_ms"]):
        acc = ([_fmt(r.get("knn_top1")), _fmt(0.0 - r["drop"], "{:+.2f}") if "drop" in r else "", _fmt(r.get("linear_top1"))] if labeled
               else [_fmt(r.get("topk_overlap"), "{:.3f}")])
        rows.append([f"`{r['name']}`", r.get("architecture", ""), r["runtime"], str(r.get("precision_ran") or "")] + acc +
                    [f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['size_bytes'] / 1e6:.2f}", _fmt(r.get("model_rss_mb"), "{:.0f}"),
                     "yes" if r.get("pareto") else "", f"**{r['status']}**: {r['reason']}" if r["status"] == "selected"
                     else f"{r['status']}: {r['reason']}"])
    return head + "\n\n" + markdown_table(header, rows)


def pareto_chart(sel: dict) -> bytes | None:
    """Accuracy against latency of every candidate, the Pareto front joined, the selected one ringed."""
    rows = sel.get("candidates") or []
    if not rows:
        return None
    acc = "knn_top1" if sel.get("labeled", True) else "topk_overlap"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"teacher": "#c44", "student": "#47a", "pruned": "#4a7"}
    for r in rows:
        c = colours.get(r["level"].rpartition(".")[2].split("-")[0], "#888")
        ax.scatter(r["p50_ms"], r[acc], s=20 + 40 * r["size_bytes"] / max(x["size_bytes"] for x in rows), color=c,
                   marker="s" if r["runtime"] == "openvino" else "o", alpha=0.8)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["p50_ms"])
    ax.plot([r["p50_ms"] for r in front], [r[acc] for r in front], "k--", lw=0.8, label="Pareto front")
    win = sel.get("winner")
    if win:
        ax.scatter(win["p50_ms"], win[acc], s=220, facecolors="none", edgecolors="k", lw=1.5, label=f"selected: {win['name']}")
    if acc == "knn_top1" and "knn_top1" in (sel.get("teacher") or {}):
        ax.axhline(sel["teacher"]["knn_top1"] - sel["rule"]["max_drop"], color="#c44", lw=0.8, ls=":", label="accuracy budget")
    for level, c in colours.items():
        ax.scatter([], [], color=c, label=level)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency, ms ({sel.get('threads')} thread(s), batch {sel.get('batch')}); circle onnxruntime, square OpenVINO")
    ax.set_ylabel("kNN top-1 %" if acc == "knn_top1" else "top-10 overlap with the teacher")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------
# the report


def _headline(sel: dict | None, teacher_eval: dict | None) -> list[tuple]:
    """The deployment decision in one line (edgeclr deploy's summary, measured in one interleaved run)."""
    if not sel or not sel.get("summary"):
        return []
    base = {r["key"]: r for r in (teacher_eval or {}).get("rows", [])}
    msg = f"Deployed {sel['summary']}."
    if base.get("model"):
        msg = (f"Teacher kNN {base['model']['knn_top1']:.2f}% (raw pixels {_fmt(base.get('pixels', {}).get('knn_top1'))}%, "
               f"random-init network {_fmt(base.get('random', {}).get('knn_top1'))}%). " + msg)
    return [("hl", msg)]


def _teacher_section(teacher_eval: dict | None) -> list[tuple]:
    if not teacher_eval:
        return []
    return [("h", 2, "Teacher against the baselines"),
            ("p", f"Weighted kNN (k={teacher_eval['knn_k']}, T={teacher_eval['knn_t']}) and linear probe on "
                  f"{teacher_eval['train_images']} labeled bank / {teacher_eval['test_images']} test images."),
            ("table", markdown_table(["features", "dim", "kNN top-1 %", "linear probe %"],
                                     [[r["features"], str(r["dim"]), f"{r['knn_top1']:.2f}", _fmt(r["linear_top1"])]
                                      for r in teacher_eval["rows"]]))]


def _label_efficiency_section(out: Path) -> list[tuple]:
    le = _load(out / "train" / "label_efficiency.json")
    if not le:
        return []
    return [("h", 2, "Few labels: the teacher's features against random init and raw pixels"),
            ("p", f"Test accuracy on {le['query_images']} images with N labelled images per class drawn from the "
                  f"{le['bank_images']}-image bank, mean ± spread over {le['draws']} draws; full fine-tuning is "
                  f"`edgeclr finetune --mode full` for {le['finetune_steps']} steps, from the teacher and from random weights."),
            ("table", label_efficiency_table(le)),
            ("p", label_efficiency_verdict(le)),
            ("img", "label_efficiency.png", label_efficiency_chart(le), "Accuracy against labelled images per class")]


def _file_id(path: Path) -> str | None:
    """sha256 of a model file (an OpenVINO .xml with its .bin), None when it is not there."""
    from edgeclr.data import sha256_file  # torch-free, as the report is

    files = [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])
    return "+".join(sha256_file(f) for f in files) if all(f.is_file() for f in files) else None


def deploy_latencies(out: Path, sel: dict | None) -> dict[str, float]:
    """{file sha256: p50 ms} of every file deploy timed at 1 thread and batch 1. Where another table
    of the report shows one of these files at those settings, it shows deploy's figure (its rounds
    interleave every candidate): one file, one latency in one report."""
    if not sel or sel.get("threads") != 1 or sel.get("batch") != 1:
        return {}
    got = {}
    for c in sel.get("candidates") or []:
        p = Path(c["path"]) if Path(c["path"]).is_file() else out / "deploy" / "candidates" / c["name"]
        fid = _file_id(p)
        if fid and c.get("p50_ms"):
            got[fid] = c["p50_ms"]
    return got


def with_deploy_latency(rows: list[dict], lat: dict[str, float], path_of, ms_key: str, ref_of, speed_key: str) -> int:
    """Rows (dicts) whose file deploy also timed take deploy's latency; a row with a speed-up takes
    it only when deploy also timed the file the speed-up is against, and then the ratio of the two
    (a pair measured apart is left as it was). Returns how many rows changed."""
    ids = {id(r): _file_id(p) if (p := path_of(r)) else None for r in rows}
    n = 0
    for r in rows:
        ref = ref_of(r)
        a = ids[id(r)]
        b = ids.get(id(ref)) if ref is not None else None
        if a in lat and (ref is None or b in lat):
            r[ms_key] = lat[a]
            if ref is not None:
                r[speed_key] = lat[b] / lat[a]
            r["latency_from"] = "deploy"
            n += 1
    return n


def _retention_section(rows: list[dict], lat: dict[str, float] | None = None) -> list[tuple]:
    if not rows:
        return []
    rows = [dict(r) for r in rows]
    by_name = {r["model"]: r for r in rows}
    n = with_deploy_latency(rows, lat or {}, lambda r: Path(r["path"]) if r.get("runtime") != "torch" else None, "latency_ms_1thread",
                            lambda r: by_name.get(r.get("speedup_reference")), "speedup_vs_teacher")
    same = (f" The {n} files that deploy also timed show deploy's latency (and the speed-up between two of them), so a file "
            "has one latency in this report.") if n else ""
    blocks = [("h", 2, "Retention across stages"),
              ("p", "Every stage and exported artifact on the same held-out images; retention = kNN accuracy / the "
                    "teacher's; agreement columns compare with the teacher's predictions and neighbours; latency at 1 "
                    "thread, batch 1, every row timed in one interleaved measurement; speed-up against the teacher in the "
                    "same runtime (column vs: its own export for a file, torch eager for a checkpoint)." + same),
              ("table", compare_table(rows))]
    png = _speed_chart(rows)
    return blocks + ([("img", "latency_size.png", png, "Latency and size of every artifact")] if png else [])


def _compression_section(out: Path, creport: dict | None, lat: dict[str, float] | None = None) -> list[tuple]:
    if not creport:
        return []
    creport = {k: dict(v) for k, v in creport.items()}
    models = out / "compress" / "models"
    name_of = {id(v): k for k, v in creport.items()}

    def path_of(r):  # "onnx-int8" -> compress/models/int8.onnx
        fmt, _, variant = name_of[id(r)].partition("-")
        return models / f"{variant}{'.onnx' if fmt == 'onnx' else '.xml'}" if fmt in ("onnx", "openvino") and variant else None

    def fp32_of(r):
        name = name_of[id(r)]
        return creport.get(name.partition("-")[0] + "-fp32") if name.endswith("-int8") else None

    n = with_deploy_latency(list(creport.values()), lat or {}, path_of, "latency_ms_1thread", fp32_of, "speedup_vs_fp32")
    blocks = [("h", 2, "Compression")]
    if n:
        blocks.append(("p", f"The {n} files that deploy also timed show deploy's latency (an INT8 file's speed-up over "
                            "the FP32 file from the same measurement), so a file has one latency in this report."))
    man = read_manifest(out / "compress")
    pr = man.get("pruning") or {}
    src = Path(str((man.get("inputs") or {}).get("student") or ""))
    which = next((f" of `{'/'.join(src.parts[i:i + 2])}/` (the smallest student within the budget)" for i in range(len(src.parts) - 1)
                  if src.parts[i] == "students"), "")
    if pr.get("base_macs"):
        blocks.append(("p", f"Pruning{which}: {pr['base_macs'] / 1e6:.2f}M -> {pr['macs'] / 1e6:.2f}M MACs "
                            f"({100 * pr['mac_ratio']:.0f}%), {pr['base_params'] / 1e6:.3f}M -> {pr['params'] / 1e6:.3f}M "
                            f"parameters, in {pr['steps']} step(s) with {pr['recover_epochs']} recovery epoch(s) each. "
                            "INT8 speed-up is against the same runtime's FP32 model."))
    return blocks + [("table", compress_table(creport))]


def _curves_and_embeddings(out: Path) -> list[tuple]:
    blocks = []
    for metric, ylabel, title, name in (("loss", "loss", "Training losses", "losses.png"),
                                        ("knn_top1", "kNN top-1 %", "kNN accuracy over epochs (monitor split)", "knn.png")):
        png = _curves_chart(out, metric, ylabel, title)
        if png:
            blocks.append(("img", name, png, title))
    tsnes = [(s, out / s / "tsne.png") for s in ("train", "compress", "distill") if (out / s / "tsne.png").exists()]
    if tsnes:
        blocks.append(("h", 2, "Embeddings (t-SNE of the test images)"))
        for s, p in tsnes[:2]:
            blocks.append(("img", f"tsne_{s}.png", p.read_bytes(), {"train": "teacher", "distill": "student",
                                                                   "compress": "final (pruned) student"}[s], "half"))
    return blocks


def _bench_section(out: Path, bench: dict | None) -> list[tuple]:
    if not bench:
        return []
    blocks = [("h", 2, "Benchmark"), ("table", bench_table(bench))]
    if (out / "bench" / "bench.png").exists():
        blocks.append(("img", "bench.png", (out / "bench" / "bench.png").read_bytes(), "p50 latency per configuration"))
    return blocks


def _deployment_section(out: Path, sel: dict | None) -> list[tuple]:
    if not sel:
        return [("h", 2, "Deployment"), ("p", "No deployment selection yet: `edgeclr deploy RUN` measures the candidates.")]
    blocks = [("h", 2, "Deployment"),
              ("p", f"Every candidate timed in one interleaved run; {sel['rule_text']}. The teacher's own exports are "
                    "candidates too, so the selected model is never slower than exporting the teacher."),
              ("table", deploy_table(sel))]
    png = pareto_chart(sel)
    if png:
        blocks.append(("img", "pareto.png", png, "Accuracy against latency of every candidate"))
    if sel.get("not_built"):
        blocks.append(("p", f"Not built (--search-minutes ran out): {', '.join(sel['not_built'])}."))
    win = sel.get("winner")
    if win:
        model = f"model{Path(win['path']).suffix}"
        blocks.append(("p", f"On the device (no torch): `{format_of(model).install}`, then `edgeclr embed images/ --model "
                            f"{out / 'deploy' / model} --out emb.npy` and `edgeclr search`."))
    return blocks


def students_table(ladder: list[dict], labeled: bool) -> str:
    """The pipeline's student ladder (pipeline.json's distill summary): each student's network, size,
    distillation time and accuracy against the teacher, and whether it met deploy's budget."""
    header = ["student", "family", "network", "parameters M", "distillation s"] + \
        (["kNN %", "teacher kNN %"] if labeled else ["top-10 overlap"]) + ["within the budget"]
    rows = []
    for r in ladder:
        folder = "distill/" if r["student"] == "distill" else f"students/{r['student']}/"
        folder = f"`{folder}`" + (" (reserve)" if r.get("reserve") else "")
        if r.get("skipped"):
            rows.append([folder, r["family"], "", "", "", *([""] * (2 if labeled else 1)), f"skipped: {r['skipped']}"])
            continue
        acc = [_fmt(r.get("knn_top1")), _fmt(r.get("teacher_knn_top1"))] if labeled else [_fmt(r.get("topk_overlap"), "{:.3f}")]
        ok = {True: "yes", False: "no", None: "not measured"}[r.get("meets_budget")]
        net = r["model"] + (f" w{r['width']}" if r.get("width") else "")
        rows.append([folder, r["family"], net, _fmt(r.get("parameters") and r["parameters"] / 1e6, "{:.3f}"),
                     _fmt(r.get("seconds"), "{:.0f}"), *acc, ok])
    return markdown_table(header, rows)


def _students_section(state: dict) -> list[tuple]:
    ladder = (((state.get("stages") or {}).get("distill") or {}).get("summary") or {}).get("ladder") or []
    if len(ladder) < 2:
        return []
    labeled = any(r.get("knn_top1") is not None for r in ladder)
    return [("h", 2, "Students"),
            ("p", "Every student distilled from the teacher, by family, smallest first; each one within the budget is a "
                  "deployment candidate (FP32 and INT8), and the distill section's student in `distill/` is one whatever "
                  "it scored; compress prunes the smallest student within the budget (the distill section's when none "
                  "is). A student is skipped when a smaller one of its family already met the "
                  "budget, and the reserve (a wider ResNet-10) unless none before it met it, measured at the end of "
                  "its distillation "
                  + ("(kNN points against the teacher)." if labeled else "(top-10 neighbour overlap with the teacher).")),
            ("table", students_table(ladder, labeled))]


def _provenance_section(out: Path, state: dict) -> list[tuple]:
    blocks = [("h", 2, "Stages, commands and versions")]
    st = state.get("stages") or {}
    budget = state.get("budget")
    if budget:
        plan = budget["plan_minutes"]
        took = (f"; the run took {budget['took_minutes']:.1f} min" if budget.get("took_minutes") is not None else
                f"; the run took {(time.time() - budget['started']) / 60:.1f} min up to this report" if budget.get("started") else "")
        blocks.append(("p", f"Budget (--minutes {budget['minutes']:g}){took}. Each training stage fitted its epochs to its share "
                            f"from its measured step time (train {plan['train']:.1f} min, students {plan['distill']:.1f} min, "
                            f"recoveries {plan['compress']:.1f} min) and deploy built candidates for "
                            f"{plan.get('deploy', 0):.1f} min; the rest ({plan['rest']:.1f} min) covers loading, "
                            "evaluation, export, bench, deploy's timing and the report. Each share is of the time still "
                            "left when its stage starts (the table's share column), so what a stage leaves unused goes "
                            "to the later ones."))
    if st:
        planned = {**((budget or {}).get("plan_minutes") or {}), **((budget or {}).get("given_minutes") or {})}
        blocks.append(("table", markdown_table(["stage", "status", "seconds"] + (["training share s"] if planned else []) + ["key"], [
            [n, f"{s.get('status')}{' (resumed)' if s.get('resumed') else ''}", _fmt(s.get("seconds"), "{:.0f}")]
            + ([_fmt(planned.get(n) and 60 * planned[n], "{:.0f}")] if planned else []) + [f"`{s.get('key')}`"]
            for n, s in st.items()])))
    cmds = [r.get("command") for r in state.get("runs", []) if r.get("command")]
    blocks.append(("code", "\n".join(cmds[-3:] + [f"# reproduce: edgeclr pipeline --config {out / 'pipeline.yaml'}"])))
    blocks.append(("code", "\n".join(f"{k}: {v}" for k, v in _versions().items())))
    return blocks


def build_blocks(out: Path) -> list[tuple]:
    """The report as blocks: ("h", level, text) ("p", text) ("table", md) ("img", name, png, caption[, "half"]) ("code", text)."""
    state = _load(out / "pipeline.json") or {}
    teacher_eval = _load(out / "train" / "eval.json")
    cmp = _load(out / "compare.json")
    rows = cmp["rows"] if cmp else []
    sel = _load(out / "deploy" / "selection.json")
    lat = deploy_latencies(out, sel)
    data = state.get("data") or ((read_manifest(out / "train").get("inputs") or {}).get("data") or {}).get("name")
    return [("h", 1, f"edgeclr run report: {out.name}"),
            ("p", f"Dataset: {data}. Preset: {state.get('preset', '-')}. Built from the files in `{out}`."),
            *_headline(sel, teacher_eval), *_teacher_section(teacher_eval), *_label_efficiency_section(out),
            *_deployment_section(out, sel), *_students_section(state), *_retention_section(rows, lat),
            *_compression_section(out, _load(out / "compress" / "report.json"), lat), *_curves_and_embeddings(out),
            *_bench_section(out, _load(out / "bench" / "bench.json")), *_provenance_section(out, state)]


def _md_table_to_html(md: str) -> str:
    lines = [ln.strip() for ln in md.strip().splitlines()]
    pre = []
    while lines and not lines[0].startswith("|"):
        pre.append(f"<p>{_inline(lines.pop(0))}</p>")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not re.fullmatch(r"\|?(-+\|?)+", ln.replace(" ", ""))]
    if not cells:
        return "".join(pre)
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return "".join(pre) + f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render(blocks: list[tuple], files_dir: Path) -> tuple[str, str]:
    """(markdown, html); the markdown's images are written into files_dir."""
    md, h = [], []
    files_dir.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        kind = b[0]
        if kind == "h":
            md.append("#" * b[1] + " " + b[2])
            h.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind in ("p", "hl"):
            md.append(("**" + b[1] + "**") if kind == "hl" else b[1])
            h.append(f"<p class='hl'>{_inline(b[1])}</p>" if kind == "hl" else f"<p>{_inline(b[1])}</p>")
        elif kind == "table":
            md.append(b[1])
            h.append(_md_table_to_html(b[1]))
        elif kind == "img":
            name, png, caption = b[1:4]
            (files_dir / name).write_bytes(png)
            md.append(f"![{caption}]({files_dir.name}/{name})")
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            h.append(f"<figure{' class=half' if b[4:] == ('half',) else ''}><img alt='{html.escape(caption)}' src='{src}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        elif kind == "code":
            md.append("```\n" + b[1] + "\n```")
            h.append(f"<pre>{html.escape(b[1])}</pre>")
    title = next((b[2] for b in blocks if b[0] == "h"), "edgeclr report")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(h)}</body></html>")
    return "\n\n".join(md) + "\n", page


def segmenter_blocks(out: Path) -> list[tuple]:
    """The report of one `finetune --task segment` folder: the test figures per class, each
    exported file's mIoU and parity, the overlays, and the label-efficiency curve when it was run."""
    res = _load(out / "result.json") or {}
    blocks = [("h", 1, f"edgeclr segmenter report: {out.name}")]
    if res:
        blocks += [("hl", f"Test mIoU {res['test_miou']:.2f}%, mean Dice {res['test_mdice']:.2f}%, pixel accuracy "
                          f"{res['test_pixel_acc']:.2f}% on {res['test_images']} test tiles; trained on {res['train_images']} "
                          f"labelled tiles ({res['val_images']} more validated), mode {res['mode']}, init {res['init']}, "
                          f"{res.get('seg_head', 'deeplabv3')} head at output stride {res.get('output_stride', '-')}."),
                   ("table", markdown_table(["class", "IoU %", "Dice %"],
                                            [[c, _fmt(i) or "-", _fmt(d) or "-"]
                                             for c, i, d in zip(res["classes"], res["test_iou"], res["test_dice"])])),
                   ("p", "A class that occurs neither in the test tiles' truth nor in the predictions has no IoU (-) and is "
                         "left out of the means.")]
        files = res.get("artifacts") or {}
        if files:
            blocks += [("h", 2, "Exported files (run through the torch-free runtime)"),
                       ("table", markdown_table(["file", "test mIoU %", "per-pixel agreement with torch"],
                                                [[f"`{Path(a['path']).name}`", _fmt(a.get("test_miou")),
                                                  _fmt((a.get("parity") or {}).get("pixel_agreement"), "{:.5f}")]
                                                 for a in files.values()]))]
    if (out / "overlays.png").is_file():
        blocks += [("h", 2, "Test tiles"),
                   ("img", "overlays.png", (out / "overlays.png").read_bytes(),
                    "The most labelled test tiles: image, truth and prediction")]
    le = _load(out / "label_efficiency.json")
    if le:
        blocks += [("h", 2, "Label efficiency: the pretrained encoder against random initialisation"),
                   ("p", f"Test mIoU on {le['query_images']} tiles with N labelled tiles drawn from the {le['bank_images']} "
                         f"training tiles, mean ± spread over {le['draws']} draws; each run is `edgeclr finetune "
                         f"--task segment` for {le['finetune_steps']} steps."),
                   ("table", label_efficiency_table(le)), ("p", label_efficiency_verdict(le)),
                   ("img", "label_efficiency.png", (out / "label_efficiency.png").read_bytes()
                    if (out / "label_efficiency.png").is_file() else label_efficiency_chart(le), "Test mIoU against labelled tiles")]
    return blocks


def write(out: str | Path, blocks: list[tuple] | None = None) -> dict:
    """Write OUT/report.md (+ OUT/report_files/*.png) and OUT/report.html (a pipeline run's report,
    or the `blocks` given); returns their paths."""
    out = Path(out)
    md, page = render(build_blocks(out) if blocks is None else blocks, out / "report_files")
    for name, text in (("report.md", md), ("report.html", page)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return {"md": str(out / "report.md"), "html": str(out / "report.html")}
