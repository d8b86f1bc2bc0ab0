"""Which student architecture gets faster with INT8? FP32 vs static INT8 for every registered
student, at 1 thread, batch 1, interleaved (FP32, INT8, FP32, INT8, ...) so the ratio survives a
noisy machine; median of the rounds. --runtime onnxruntime (default): edgeclr's
compress.quantize_onnx (QDQ); --runtime openvino: compress.quantize_openvino (NNCF), the FP32 IR
run at INFERENCE_PRECISION_HINT f32 (the precision each model ran at is recorded).

Weights are random (latency does not depend on them); calibration uses real Fashion-MNIST images
(or digits with --data digits) resized to the benchmark size. Grayscale input, stem stride 2
(what a student is built with for inputs >= 64 px).

    python benchmarks/int8_students.py --size 224
    python benchmarks/int8_students.py --size 28 --stem-stride 1     # Fashion-MNIST's native size
    python benchmarks/int8_students.py --size 224 --runtime openvino

Writes benchmarks/results/int8_students/<size>px[-openvino][-prunedNpct][-TAG].{json,md}: each
configuration is its own record (a re-run of it overwrites it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import export_set, machine, record_path  # noqa: E402

from edgeclr import compress, data  # noqa: E402
from edgeclr.bench import latencies  # noqa: E402
from edgeclr.compress import prune  # noqa: E402
from edgeclr.models import EmbeddingModel, ModelSpec, create_model, list_models  # noqa: E402
from edgeclr.runtime import Embedder, Preprocess  # noqa: E402

HERE = Path(__file__).parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--models", default=",".join(list_models("student")))
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model per round")
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--target", default="x86", choices=("x86", "arm"))
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"))
    ap.add_argument("--width", type=int, default=None, help="ResNet base width (e.g. 8 or 16: a dense-convolution student)")
    ap.add_argument("--prune-macs", type=float, default=0.0,
                    help="prune each model to this fraction of its MACs first (as `edgeclr compress --target-macs`, "
                         "one step, magnitude importance on the random weights): does pruning eat the INT8 gain?")
    ap.add_argument("--tag", default="", help="suffix of the record's name")
    a = ap.parse_args()
    ov = a.runtime == "openvino"

    torch.manual_seed(0)
    pp = Preprocess(input_size=a.size, resize_size=a.size, mean=(0.286,), std=(0.353,), channels=1)
    ds = data.open_dataset(a.data, "pretrain")
    calib = compress.calibration_inputs(a.data, pp, a.calib, 0, {}) if len(ds) else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            extra = dict(width=a.width) if name.startswith("resnet") else {}
            model = create_model(ModelSpec(name, in_chans=1, stem_stride=a.stem_stride, embed_dim=128, head_layers=0, **extra)).eval()
            macs0 = compress.count_macs(model, torch.from_numpy(calib[:1]))[0]
            if a.prune_macs:
                x = torch.from_numpy(calib[:1])
                prune.prune_step(model, x, prune.ratio_for_macs(model, x, a.prune_macs * macs0, False), False)
            rt = ("openvino",) if ov else ("onnx",)
            key = rt[0] + "-int8"
            files = export_set(model, pp, tmp, name, calib, runtimes=rt, target=a.target)
            f32, i8 = files[rt[0]], files[key]
            i8all = export_set(model, pp, tmp, f"{name}-all", calib, runtimes=rt, target=a.target, exclude=[])[key]
            scope = compress.float_scope(Path(tmp) / f"{name}-fp32.onnx", EmbeddingModel(model, True).eval())
            macs = compress.count_macs(model, torch.from_numpy(calib[:1]))[0]
            sess = {k: Embedder.load(p, threads=1) for k, p in (("fp32", f32), ("int8", i8), ("int8-all", i8all))}
            ref = sess["fp32"].embed_arrays(calib[:64], 64)
            cos = {k: float((ref * s.embed_arrays(calib[:64], 64)).sum(1).min()) for k, s in sess.items() if k != "fp32"}
            ms = latencies({"fp32": f32, "int8": i8, "int8-all": i8all}, runs=a.rounds * a.runs, rounds=a.rounds)
            row = {"model": name, "macs_m": macs / 1e6, "unpruned_macs_m": macs0 / 1e6, **{f"{k}_ms": v for k, v in ms.items()},
                   "precision_ran": {k: getattr(s.backend, "precision", "-") for k, s in sess.items()},
                   "float_scope": {k: len(v) for k, v in scope.items()}, "min_cosine_vs_fp32": cos}
            row["speedup_int8"] = row["fp32_ms"] / row["int8_ms"]
            row["speedup_int8_all"] = row["fp32_ms"] / row["int8-all_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv), "size": a.size, "stem_stride": a.stem_stride,
           "prune_macs": a.prune_macs,
           "target": a.target, "runtime": a.runtime, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    name = (f"{a.size}px" + ("-openvino" if ov else "") + (f"-pruned{round(a.prune_macs * 100)}pct" if a.prune_macs else "")
            + (f"-{a.tag}" if a.tag else ""))
    record_path("int8_students", name, "json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# INT8 vs FP32 per student, {a.runtime}, 1 thread, batch 1, {a.size} px, grayscale, stem stride {a.stem_stride}"
          + (f", ResNet width {a.width}" if a.width else "")
          + (f", pruned to {a.prune_macs:g} of the MACs (random weights, one step, channels in multiples of 8)" if a.prune_macs else ""), "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores, AVX-512: {res['machine']['avx512']}). "
          f"Command: `{res['command']}`. Medians of {a.rounds} interleaved rounds of {a.runs} runs. "
          + ("INT8 = NNCF `quantize` (performance preset, fast bias correction) of the FP32 IR, "
             if ov else f"INT8 = static QDQ, per-channel, {'U8S8' if a.target == 'x86' else 'S8S8'}, ")
          + "with edgeclr's float scope (first conv, embedding layer, SE); "
          "INT8-all = every supported node quantised. Random weights, real calibration images."
          + (" OpenVINO inference precision that ran: " + ", ".join(sorted({f"{k} {v}" for r in rows for k, v in r["precision_ran"].items()}))
             + "." if ov else ""), "",
          "| student | MMACs | FP32 ms | INT8 ms | INT8 speed-up | INT8-all ms | INT8-all speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['macs_m']:.1f} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['speedup_int8']:.2f}x | "
                  f"{r['int8-all_ms']:.3f} | {r['speedup_int8_all']:.2f}x |")
    record_path("int8_students", name).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
