"""The speed table of issue 7: the compressed Fashion-MNIST student against its ResNet-18 teacher
and against unmodified torchvision networks, 1 thread, batch 1, at 224 px and at the native 28 px.

    python benchmarks/speed_table.py --compress runs/all/compress --student runs/all/distill/distilled \
        --teacher runs/all/teacher

Every latency comes from one `edgeclr bench` run per resolution (each configuration in its own
process, interleaved rounds, p50), so every ratio is measured in one run. The configurations:
  - the teacher checkpoint in torch eager (the baseline);
  - `torchvision:resnet18` and `torchvision:mobilenet_v3_large`: unmodified torchvision networks
    (3 channels, random weights, ImageNet strides) in torch eager;
  - the distilled student, the pruned student and its INT8 models (onnxruntime QDQ and OpenVINO
    NNCF, with compress's float scope) exported at that size.
At 224 px the student runs twice: as trained (a stride-1 first conv, which keeps 28-px
Fashion-MNIST at full resolution; at 224 px it does 4x the arithmetic of the same network as
`edgeclr distill` builds it for inputs >= 64 px) and "224-px build" (the same pruned weights with
the first conv at stride 2: the stem a student trained at 224 px gets, MobileNet stride 2, ResNet
4). The teacher runs as trained only, so the 224-px build's ratio to it is not like-for-like. The
kNN accuracies are those of the 28-px models (`edgeclr compress`'s report on the 10,000 test
images); a 224-px build has no accuracy of its own.
Writes benchmarks/results/speed_table/latest.{json,md} (TAG.{json,md} with --tag TAG) and the two bench folders under --out.
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
REFS = ("torchvision:resnet18", "torchvision:mobilenet_v3_large")
BUILD_NOTE = ("`pruned-224build` = the pruned weights with the first conv at stride 2, the stem a student trained at "
              "224 px gets; the teacher runs as trained, so that row's ratio to it is not like-for-like (compare the "
              "as-trained rows), and it has no kNN accuracy of its own.")


def export_at(size: int, student: Path, comp: Path, folder: Path, data: str, calib_n: int) -> list[Path]:
    """FP32/INT8 ONNX and OpenVINO files of the student and pruned student at `size` px."""
    import torch

    from edgeclr import compress
    from edgeclr.loading import load_encoder
    from edgeclr.runtime import Preprocess

    man = json.loads((comp / "compress" / "manifest.json").read_text())
    q = man["artifacts"]["onnx-int8"]["quantization"]
    target = "x86" if q["activations"] == "QUInt8" else "arm"
    files = []
    builds = [("student", student, 1), ("pruned", comp / "compress", 1)] + ([("pruned-224build", comp / "compress", 2)]
                                                                        if size >= 64 else [])
    for name, src, stem in builds:
        made = [folder / f"{name}-{k}{ext}" for k in (("fp32",) if name == "student" else ("fp32", "int8")) for ext in (".onnx", ".xml")]
        if all(f.exists() for f in made):  # a re-run (e.g. after an interrupted bench) reuses the exports
            files += made
            continue
        model, ck, _ = load_encoder(src, "cpu", role="student")
        model.eval()
        if stem != 1:  # the same weights with the first conv at stride 2: the stem edgeclr builds for
            # inputs >= 64 px (MobileNet: stride 2; ResNet: 4 = conv 2 x maxpool 2)
            first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
            if first.stride != (1, 1):
                continue  # trained with a strided first conv already: the model as trained is the 224-px one
            first.stride = (stem, stem)
        pp = Preprocess.from_dict(ck["preprocess"]).at_size(size)
        calib = compress.calibration_inputs(data, pp, calib_n, 0, {})
        files += export_set(model, pp, folder, name, calib, int8=name != "student", target=target).values()
    return files


def knn_of(row: dict, report: dict) -> float | None:
    """The 28-px kNN accuracy of the network a bench row timed (None for the torchvision references
    and the 224-px builds, whose stem stride differs from the trained network's)."""
    label = row["label"]
    if label.startswith("torchvision:") or "224build" in label:
        return None
    if label == "teacher":
        return report["teacher"]["knn_top1"]
    if label.startswith("student"):
        return report["student"]["knn_top1"]
    if row["format"].endswith("-int8"):
        return report[row["format"]]["knn_top1"]
    return report["pruned"]["knn_top1"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="run folder of the teacher (fashion_mnist_teacher.py)")
    ap.add_argument("--student", required=True, help="run folder of the distilled student")
    ap.add_argument("--compress", required=True, help="run folder of `edgeclr compress` (compress_fashion_mnist.py)")
    ap.add_argument("--out", default=None, help="folder for the exports and bench runs (default: COMPRESS/speed)")
    ap.add_argument("--sizes", default="224,28")
    ap.add_argument("--rounds", default="5")
    ap.add_argument("--runs", default="20")
    ap.add_argument("--calib", type=int, default=300, help="calibration images for the INT8 files")
    ap.add_argument("--data", default="fashion-mnist", help="calibration images (the student's dataset)")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    a = ap.parse_args()
    teacher, student, comp = Path(a.teacher), Path(a.student), Path(a.compress)
    out = Path(a.out or comp / "speed")
    report = json.loads((comp / "compress" / "report.json").read_text())
    from edgeclr import checkpoint

    ckpt = checkpoint.find(teacher, ("train",))
    tables = {}
    for size in (int(s) for s in a.sizes.split(",")):
        folder = out / f"at{size}"
        files = export_at(size, student, comp, folder / "models", a.data, a.calib)
        link = folder / "teacher" / "checkpoints"  # bench labels a checkpoint by its run folder: "teacher"
        link.mkdir(parents=True, exist_ok=True)
        if not (link / "last.pt").exists():
            (link / "last.pt").symlink_to(ckpt.resolve())
        cmd = [sys.executable, "-m", "edgeclr", "bench", str(link / "last.pt"), *REFS, *map(str, files), "--threads", "1",
               "--batch", "1", "--input-size", str(size), "--rounds", a.rounds, "--runs", a.runs, "--baseline", "teacher:torch",
               "--out", str(folder / "bench")]
        secs = run(cmd)
        res = json.loads((folder / "bench" / "bench.json").read_text())
        rows = res["rows"]
        p50 = {r["label"]: r["p50_ms"] for r in rows if r["format"] == "torch"}
        for r in rows:
            r["knn_28px"] = knn_of(r, report)
            for ref in REFS:
                r[f"speedup_vs_{ref.split(':')[1]}"] = p50[ref] / r["p50_ms"]
        tables[size] = {"command": "edgeclr " + shlex.join(cmd[3:]), "seconds": secs, "rows": rows, "machine": res["machine"],
                        "matmul_peak": res["matmul_peak_macs_per_s"]}
    res = {"machine": machine(), "command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "report": report, "tables": tables}
    record_path("speed_table", a.tag, "json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    tk = report["teacher"]["knn_top1"]
    md = ["# Speed table: the compressed Fashion-MNIST student, its teacher, and torchvision references", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores, AVX-512: {res['machine']['avx512']}), {res['date']}. "
          f"Command: `{res['command']}`. Each table is one `edgeclr bench` run (its command below): every configuration in "
          "its own process, interleaved rounds, p50 at 1 thread, batch 1; OpenVINO pinned to f32 inference precision "
          "(the column 'ran as' is what the runtime reported). Teacher = the ResNet-18 (width 16) SimCLR teacher of "
          "`fashion_mnist_teacher.py` in torch eager; torchvision references have random weights (latency does not "
          "depend on them). kNN = top-1 on Fashion-MNIST's 10,000 test images at 28 px from `edgeclr compress`'s report "
          f"(teacher {tk:.2f}%). {BUILD_NOTE}", ""]
    for size, t in tables.items():
        md += [f"## {size} px", "", f"`{t['command']}` ({t['seconds']:.0f} s)", "",
               "| model | format | ran as | MMACs | p50 ms | vs teacher | vs torchvision ResNet-18 | vs torchvision MobileNetV3-Large "
               "| kNN (28 px) | kNN vs teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            k = r["knn_28px"]
            md.append(f"| {r['label']} | {r['format']} | {r['precision_ran']} | {(r.get('macs') or 0) / 1e6:.1f} | {r['p50_ms']:.3f} | "
                      f"{r['speedup_vs_baseline']:.2f}x | {r['speedup_vs_resnet18']:.2f}x | {r['speedup_vs_mobilenet_v3_large']:.2f}x | "
                      + (f"{k:.2f} | {k - tk:+.2f} |" if k is not None else " | |"))
        md.append("")
    record_path("speed_table", a.tag).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
