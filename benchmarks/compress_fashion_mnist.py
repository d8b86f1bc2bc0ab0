"""Compression on Fashion-MNIST: `edgeclr compress` on the distilled benchmark student (prune to
<= 50% MACs with recovery, ONNX and OpenVINO INT8), then speed at 224 px, 1 thread, batch 1.

    python benchmarks/distill_fashion_mnist.py --teacher runs/bench-fmnist --out runs/bench-distill   # first
    python benchmarks/compress_fashion_mnist.py --student runs/bench-distill/distilled

Targets (issue 6): pruned + INT8 student keeps >= 98% of the FP32 student's kNN accuracy; pruning
to <= 50% of the MACs gives >= 1.4x measured speed-up at 1 thread at 224 px; the INT8 model is
>= 1.5x faster than its own FP32 model on the same runtime at 1 thread, batch 1, 224 px.

Speed at 224 px: the student, the pruned student and its INT8 model are exported at 224 px
(`edgeclr export --input-size 224`; INT8 calibrated on the same real images resized to 224) and
timed interleaved (A B C A B C ...) in one process; medians of the rounds. The report of
`edgeclr compress` itself gives the native-resolution (28 px) figures.
Writes benchmarks/results/compress_fashion_mnist[-TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_ms, machine, run  # noqa: E402

HERE = Path(__file__).parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="runs/bench-distill/distilled", help="run folder of the distilled student")
    ap.add_argument("--out", default="runs/bench-compress")
    ap.add_argument("--target-macs", default="0.5")
    ap.add_argument("--prune-steps", default="2")
    ap.add_argument("--recover-epochs", default="2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--extra", default="", help="more `edgeclr compress` options")
    ap.add_argument("--tag", default="")
    ap.add_argument("--skip-compress", action="store_true", help="reuse OUT/compress from an earlier run")
    a = ap.parse_args()

    from edgeclr import compress
    from edgeclr.runtime import Embedder

    exe = [sys.executable, "-m", "edgeclr"]
    out = Path(a.out)
    cmd = exe + ["compress", a.student, "--out", str(out), "--target-macs", a.target_macs, "--prune-steps", a.prune_steps,
                 "--recover-epochs", a.recover_epochs, *a.extra.split()]
    compress_s = None if a.skip_compress else run(cmd)
    rep = json.loads((out / "compress" / "report.json").read_text())
    man = json.loads((out / "compress" / "manifest.json").read_text())

    # the same networks at a.size px: FP32 student, FP32 pruned, INT8 pruned (onnxruntime)
    big = out / f"at{a.size}"
    for name, target in (("student", Path(a.student) / "distill"), ("pruned", out / "compress")):
        if not (big / f"{name}.onnx").exists():
            run(exe + ["export", str(target), "--format", "onnx", "--input-size", str(a.size), "--out", str(big), "--name", name])
    pp = Embedder.load(big / "pruned.onnx").meta.preprocess
    calib = compress.calibration_inputs("fashion-mnist", pp, 300, 0, {})
    q = man["artifacts"]["onnx-int8"]["quantization"]
    exclude = sorted({n for v in q["float_scope"].values() for n in v})
    compress.quantize_onnx(big / "pruned.onnx", big / "pruned-int8.onnx", calib, "x86" if q["activations"] == "QUInt8" else "arm", exclude)
    sess = {k: Embedder.load(big / f"{k}.onnx", threads=1, precision="f32") for k in ("student", "pruned", "pruned-int8")}
    ms = interleaved_ms({k: (lambda x, e=e: e.embed_arrays(x, 1)) for k, e in sess.items()}, calib[:1], a.rounds, a.runs)
    macs = {k: compress.count_macs(compress.load_student(t, "cpu")[0], __import__("torch").zeros(1, 1, a.size, a.size))[0]
            for k, t in (("student", Path(a.student) / "distill"), ("pruned", out / "compress"))}

    res = {"machine": machine(), "command": "python " + shlex.join(sys.argv), "compress_command": shlex.join(cmd[1:]),
           "compress_seconds": compress_s, "report": rep, "size": a.size, "latency_ms": ms, "macs_at_size": macs,
           "pruning_speedup": ms["student"] / ms["pruned"], "int8_speedup": ms["pruned"] / ms["pruned-int8"],
           "total_speedup": ms["student"] / ms["pruned-int8"], "mac_ratio": macs["pruned"] / macs["student"],
           "int8_retention": rep["onnx-int8"]["knn_top1"] / rep["student"]["knn_top1"],
           "openvino_int8_retention": rep.get("openvino-int8", {}).get("knn_top1", float("nan")) / rep["student"]["knn_top1"],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    stem = HERE / "results" / f"compress_fashion_mnist{'-' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Compression of the Fashion-MNIST student", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores). Commands: `{res['command']}`, which ran "
          f"`{res['compress_command']}`" + (f" ({compress_s / 60:.1f} min)" if compress_s else "") + ".", "",
          "## Native resolution (28 px): the `edgeclr compress` report", "",
          (out / "compress" / "report.md").read_text().strip(), "",
          f"## {a.size} px, onnxruntime, 1 thread, batch 1 (medians of {a.rounds} interleaved rounds of {a.runs} runs)", "",
          "| model | MMACs | latency ms | speed-up vs student |", "|---|---|---|---|"]
    for k in ("student", "pruned", "pruned-int8"):
        mm = macs.get(k, macs["pruned"]) / 1e6
        md.append(f"| {k} | {mm:.0f} | {ms[k]:.3f} | {ms['student'] / ms[k]:.2f}x |")
    md += ["", f"- MACs after pruning: {res['mac_ratio']:.2f} of the student's; measured pruning speed-up "
               f"{res['pruning_speedup']:.2f}x (target >= 1.4x at <= 0.5 MACs).",
           f"- INT8 vs its own FP32 model: {res['int8_speedup']:.2f}x (target >= 1.5x).",
           f"- kNN retention of the pruned INT8 model: onnxruntime {res['int8_retention']:.3f}, OpenVINO "
           f"{res['openvino_int8_retention']:.3f} of the FP32 student (target >= 0.98)."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
