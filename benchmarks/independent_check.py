"""An outside check of what `edgeclr deploy` ships, without edgeclr: plain onnxruntime (or
OpenVINO for an .xml), numpy and scikit-learn read the shipped file and the teacher's own export,
take the preprocessing from the files' metadata alone, and measure on scikit-learn's digits
(the demo's data) what a user would:

- accuracy: a 4-fold cosine kNN (k=20, the same for both files) on all 1,797 digits, each digit
  upscaled, normalised and laid out exactly as the metadata says;
- speed: median latency of one image at 1 thread, the two files interleaved over rounds, and the
  ratio teacher / shipped.

    python benchmarks/independent_check.py --run runs/demo [--tag NAME]

Writes benchmarks/results/independent_check/TAG.{json,md} (latest without --tag). Nothing of
edgeclr is imported here: a bug shared by edgeclr's runtime and its evaluation cannot hide.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_record  # noqa: E402  (the record's machine line; no edgeclr inside)


def load(path: Path):
    """(run one batch, metadata dict) for an ONNX file (onnxruntime) or an OpenVINO IR, 1 thread."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta = {k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}
        name = s.get_inputs()[0].name
        return (lambda x: s.run(None, {name: x})[0]), meta
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    keys = ("input_size", "resize_size", "mean", "std", "channels", "precision", "task")
    meta = {k: json.loads(model.get_rt_info(["model_info", k]).astype(str)) for k in keys if model.has_rt_info(["model_info", k])}
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    return (lambda x: next(iter(req.infer({0: x}).values()))), meta


def digits_as(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as the file wants them: 8x8 in 0..16 -> 8-bit grey -> resize_size (bilinear)
    -> centre crop input_size -> [0, 1] -> (x - mean) / std -> (N, C, S, S) float32."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    r, s = int(meta["resize_size"]), int(meta["input_size"])
    mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
    out = []
    for img in d.images:
        im = Image.fromarray((img * 255 / 16).round().astype(np.uint8), "L").resize((r, r), Image.BILINEAR)
        a = np.asarray(im, np.float32)[(r - s) // 2:(r - s) // 2 + s, (r - s) // 2:(r - s) // 2 + s] / 255.0
        a = a[None] if int(meta.get("channels", 1)) == 1 else np.repeat(a[None], 3, 0)
        out.append((a - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1))
    return np.stack(out).astype(np.float32), d.target


def knn_4fold(f: np.ndarray, y: np.ndarray, k: int = 20) -> float:
    """Cosine kNN (majority vote of the k nearest), 4 folds, accuracy % over every digit."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    folds = np.arange(len(f)) % 4
    hits = 0
    for i in range(4):
        q, b = folds == i, folds != i
        nn = np.argsort(-(f[q] @ f[b].T), axis=1)[:, :k]
        votes = y[b][nn]
        hits += int((np.array([np.bincount(v, minlength=10).argmax() for v in votes]) == y[q]).sum())
    return 100.0 * hits / len(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a pipeline run folder (RUN/deploy/model.* and RUN/export/teacher.*)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    run = Path(a.run)
    shipped = next(p for p in (run / "deploy" / "model.onnx", run / "deploy" / "model.xml") if p.exists())
    teacher = run / "export" / f"teacher{shipped.suffix}"
    rows = {}
    for label, path in (("shipped", shipped), ("teacher", teacher)):
        fn, meta = load(path)
        x, y = digits_as(meta)
        f = np.concatenate([fn(x[i:i + 1]) for i in range(len(x))])
        rows[label] = {"path": str(path), "precision": meta.get("precision"), "knn_4fold": round(knn_4fold(f, y), 2),
                       "fn": fn, "x1": x[:1]}
    per_round = {k: [] for k in rows}
    for _ in range(a.rounds):  # interleaved: both files see the same machine state
        for k, r in rows.items():
            for _ in range(20):
                r["fn"](r["x1"])
            ts = []
            for _ in range(a.runs):
                t = time.perf_counter()
                r["fn"](r["x1"])
                ts.append(time.perf_counter() - t)
            per_round[k].append(1000 * statistics.median(ts))
    for k, r in rows.items():
        r["p50_ms"] = round(statistics.median(per_round[k]), 4)
        del r["fn"], r["x1"]
    ratio = rows["teacher"]["p50_ms"] / rows["shipped"]["p50_ms"]
    rec = {"benchmark": "independent_check", "machine": machine(), "python": platform.python_version(),
           "command": " ".join([Path(sys.executable).name] + sys.argv), "rows": rows, "speedup": round(ratio, 2),
           "knn_drop": round(rows["teacher"]["knn_4fold"] - rows["shipped"]["knn_4fold"], 2)}
    mc = rec["machine"]
    md = [f"# An outside check of the shipped model ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {mc['cpu']}, {mc['cores']} cores; code {mc.get('git')}. Command: `{rec['command']}`.", "",
          "Plain onnxruntime / OpenVINO, numpy and scikit-learn; preprocessing from each file's metadata; 4-fold cosine kNN "
          "(k=20) on all 1,797 digits; p50 of one image at 1 thread, the files interleaved over "
          f"{a.rounds} rounds of {a.runs} runs.", "",
          "| file | precision | kNN 4-fold % | p50 ms |", "|---|---|---|---|"]
    md += [f"| `{r['path']}` | {r['precision']} | {r['knn_4fold']:.2f} | {r['p50_ms']:.4f} |" for r in rows.values()]
    drop = rec["knn_drop"]
    md += ["", f"The shipped file is **{ratio:.2f}x** faster than the teacher's own export, {abs(drop):.2f} kNN points "
               f"{'below' if drop > 0 else 'above'} it."]
    write_record("independent_check", a.tag, rec, md)


if __name__ == "__main__":
    main()
