"""Compression on Fashion-MNIST: `edgeclr compress` on the distilled benchmark student (prune to
<= 50% MACs with recovery, ONNX and OpenVINO INT8), then speed at 224 px, 1 thread, batch 1.

    python benchmarks/distill_fashion_mnist.py --teacher runs/bench-fmnist --out runs/bench-distill   # first
    python benchmarks/compress_fashion_mnist.py --student runs/bench-distill/distilled

Targets (issue 6): pruned + INT8 student keeps >= 98% of the FP32 student's kNN accuracy; pruning
to <= 50% of the MACs gives >= 1.4x measured speed-up at 1 thread at 224 px; the INT8 model is
>= 1.5x faster than its own FP32 model on the same runtime at 1 thread, batch 1, 224 px.

Speed at 224 px: the student, the pruned student and its INT8 model are exported at 224 px
(`edgeclr export --input-size 224`; INT8 calibrated on the same real images resized to 224, with
the shipped models' float scope) for onnxruntime (QDQ) and OpenVINO (NNCF; FP32 pinned to f32),
and all six are timed interleaved (A B C D E F A B ...), each in its own worker process
(`edgeclr.bench.latencies`, the latency source of `edgeclr bench`); medians of all runs. The
report of `edgeclr compress` itself gives the native-resolution (28 px) figures.

    python benchmarks/distill_fashion_mnist.py --teacher runs/bench-fmnist --out runs/r16 \
        --student resnet18 --width 16 --stem-stride 2                # the x86 benchmark student
    python benchmarks/compress_fashion_mnist.py --student runs/r16/distilled --tag resnet18-w16
Writes benchmarks/results/compress_fashion_mnist/latest.{json,md} (TAG.{json,md} with --tag TAG).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import export_set, machine, record_path, run  # noqa: E402

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
    ap.add_argument("--runtimes", default="onnx,openvino", help="runtimes timed at --size: onnx (onnxruntime QDQ INT8), "
                    "openvino (NNCF INT8, FP32 pinned to f32); all interleaved in one run")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    ap.add_argument("--skip-compress", action="store_true", help="reuse OUT/compress from an earlier run")
    a = ap.parse_args()

    from edgeclr import compress
    from edgeclr.bench import latencies, precision_ran
    from edgeclr.loading import load_encoder
    from edgeclr.runtime import Embedder

    exe = [sys.executable, "-m", "edgeclr"]
    out = Path(a.out)
    cmd = exe + ["compress", a.student, "--out", str(out), "--target-macs", a.target_macs, "--prune-steps", a.prune_steps,
                 "--recover-epochs", a.recover_epochs, *a.extra.split()]
    compress_s = None if a.skip_compress else run(cmd)
    rep = json.loads((out / "compress" / "report.json").read_text())
    man = json.loads((out / "compress" / "manifest.json").read_text())

    # the same networks at a.size px: FP32 student, FP32 pruned, INT8 pruned, per runtime, all timed in one run
    import torch

    big = out / f"at{a.size}"
    rts = a.runtimes.split(",")
    for name, target in (("student", Path(a.student) / "distill"), ("pruned", out / "compress")):
        if not (big / f"{name}.onnx").exists():
            run(exe + ["export", str(target), "--format", "onnx", "--input-size", str(a.size), "--out", str(big), "--name", name])
    pp = Embedder.load(big / "pruned.onnx").meta.preprocess
    calib = compress.calibration_inputs("fashion-mnist", pp, 300, 0, {})
    q = man["artifacts"]["onnx-int8"]["quantization"]
    exclude = sorted({n for v in q["float_scope"].values() for n in v})
    students = {k: load_encoder(t, "cpu", role="student")[0] for k, t in (("student", Path(a.student) / "distill"), ("pruned", out / "compress"))}
    files = {}
    if "onnx" in rts:
        compress.quantize_onnx(big / "pruned.onnx", big / "pruned-int8.onnx", calib, "x86" if q["activations"] == "QUInt8" else "arm", exclude)
        files.update({k: big / f"{k}.onnx" for k in ("student", "pruned", "pruned-int8")})
    if "openvino" in rts:  # NNCF INT8 with the same float scope as the shipped models (compress's manifest)
        files["student-ov"] = export_set(students["student"], pp, big / "ov", "student", calib, ("openvino",), int8=False)["openvino"]
        f = export_set(students["pruned"], pp, big / "ov", "pruned", calib, ("openvino",), exclude=exclude)
        files.update({"pruned-ov": f["openvino"], "pruned-int8-ov": f["openvino-int8"]})
    sess = {k: Embedder.load(f, threads=1, precision="f32") for k, f in files.items()}
    ms = latencies(files, runs=a.rounds * a.runs, rounds=a.rounds)

    ran = {k: precision_ran(e.backend, "int8" in k) for k, e in sess.items()}
    macs = {k: compress.count_macs(m, torch.zeros(1, 1, a.size, a.size))[0] for k, m in students.items()}
    per_rt = {}
    for rt, sfx in (("onnxruntime", ""), ("openvino", "-ov")):
        if f"pruned{sfx}" in ms:
            per_rt[rt] = {"pruning_speedup": ms[f"student{sfx}"] / ms[f"pruned{sfx}"], "int8_speedup": ms[f"pruned{sfx}"] / ms[f"pruned-int8{sfx}"],
                          "total_speedup": ms[f"student{sfx}"] / ms[f"pruned-int8{sfx}"]}

    res = {"machine": machine(), "command": "python " + shlex.join(sys.argv), "compress_command": shlex.join(cmd[1:]),
           "compress_seconds": compress_s, "report": rep, "size": a.size, "latency_ms": ms, "precision_ran": ran,
           "macs_at_size": macs, "speedups": per_rt, "mac_ratio": macs["pruned"] / macs["student"],
           "int8_retention": rep["onnx-int8"]["knn_top1"] / rep["student"]["knn_top1"],
           "openvino_int8_retention": rep.get("openvino-int8", {}).get("knn_top1", float("nan")) / rep["student"]["knn_top1"],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    record_path("compress_fashion_mnist", a.tag, "json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Compression of the Fashion-MNIST student", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores). Commands: `{res['command']}`, which ran "
          f"`python {res['compress_command']}`" + (f" ({compress_s / 60:.1f} min)" if compress_s else "") + ".", "",
          "## Native resolution (28 px): the `edgeclr compress` report", "",
          (out / "compress" / "report.md").read_text().strip(), "",
          f"## {a.size} px, 1 thread, batch 1 (medians of {a.rounds} interleaved rounds of {a.runs} runs, every row in one run)", "",
          "| model | runtime | ran as | MMACs | latency ms | speed-up vs student, same runtime |", "|---|---|---|---|---|---|"]
    for k in ms:
        base = k.replace("-ov", "")
        mm = macs.get(base, macs["pruned"]) / 1e6
        md.append(f"| {base} | {'OpenVINO' if k.endswith('-ov') else 'onnxruntime'} | {ran[k]} | {mm:.0f} | {ms[k]:.3f} | "
                  f"{ms['student' + ('-ov' if k.endswith('-ov') else '')] / ms[k]:.2f}x |")
    md += ["", f"- MACs after pruning: {res['mac_ratio']:.2f} of the student's."]
    for rt, v in per_rt.items():
        md += [f"- {rt}: pruning speed-up {v['pruning_speedup']:.2f}x (target >= 1.4x at <= 0.5 MACs); INT8 vs its own FP32 "
               f"model {v['int8_speedup']:.2f}x (target >= 1.5x)."]
    md += [
           f"- kNN retention of the pruned INT8 model: onnxruntime {res['int8_retention']:.3f}, OpenVINO "
           f"{res['openvino_int8_retention']:.3f} of the FP32 student (target >= 0.98)."]
    record_path("compress_fashion_mnist", a.tag).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
