"""Reproduce every recorded table from scratch on Fashion-MNIST, in order, and collect them in
benchmarks/results/run_all/<machine>.md:

    teacher (fashion_mnist_teacher.py) -> distillation (distill_fashion_mnist.py)
      -> compression (compress_fashion_mnist.py) -> edgeclr bench on the run (native size)
      -> edgeclr eval --compare on the run -> speed_table.py (224 px and 28 px, against the teacher
      and torchvision references) -> bench_vs_benchmark_app.py, bench_between_calls.py, ov_call_overhead.py
      -> train_overhead.py, embed_memory.py

    python benchmarks/run_all.py --out runs/all          # about 2.5 hours on 2 CPU cores
    python benchmarks/run_all.py --out runs/all --skip teacher,distill   # reuse finished stages

Each step is the script a reader can also run alone; this one only chains them and gathers their
markdown. Every step runs unless it is listed in --skip; the training steps (teacher, distill,
compress) refuse to overwrite a finished run, so an existing output folder of one that is not
skipped stops this script before anything runs (remove it, or skip the step). The collected file
opens with a table of the steps: each one's command and wall time, or that it was reused; only
tables written by this run are gathered (a skipped step's earlier record is named, not copied).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path, run  # noqa: E402

HERE = Path(__file__).parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/all")
    ap.add_argument("--skip", default="", help="comma list of steps to reuse: teacher, distill, compress, bench, compare, "
                                                 "speed, openvino, between, ovcall, overhead, memory")
    a = ap.parse_args()
    out, skip, py = Path(a.out), set(filter(None, a.skip.split(","))), sys.executable
    teacher, student, comp = out / "teacher", out / "distill", out / "compress"
    t0 = time.time()
    steps = [
        ("teacher", [py, str(HERE / "fashion_mnist_teacher.py"), "--out", str(teacher)]),
        # the x86 benchmark student (the `fashion-mnist` pipeline preset's): ResNet-18 at base width 16,
        # whose dense convolutions make its pruned INT8 model >= 1.5x its FP32 one on this AVX2 CPU
        # (MobileNetV3-Small's does 1.1-1.4x: benchmarks/results/compress_fashion_mnist/s18*.md)
        ("distill", [py, str(HERE / "distill_fashion_mnist.py"), "--teacher", str(teacher), "--out", str(student),
                     "--student", "resnet18", "--width", "16", "--stem-stride", "2", "--tag", "resnet18-w16"]),
        ("compress", [py, str(HERE / "compress_fashion_mnist.py"), "--student", str(student / "distilled"), "--out", str(comp)]),
        ("bench", [py, "-m", "edgeclr", "bench", str(comp / "compress" / "models"), "--threads", "1,2", "--batch", "1,32",
                   "--out", str(out / "bench")]),
        ("compare", [py, "-m", "edgeclr", "eval", "--compare", str(comp)]),
        ("speed", [py, str(HERE / "speed_table.py"), "--teacher", str(teacher), "--student", str(student / "distilled"),
                   "--compress", str(comp)]),
        ("openvino", [py, str(HERE / "bench_vs_benchmark_app.py")]),
        ("between", [py, str(HERE / "bench_between_calls.py")]),
        ("ovcall", [py, str(HERE / "ov_call_overhead.py")]),
        ("overhead", [py, str(HERE / "train_overhead.py")]),
        ("memory", [py, str(HERE / "embed_memory.py"), "--run", str(student / "distilled")]),
    ]
    bad = skip - {name for name, _ in steps}
    if bad:
        raise SystemExit(f"--skip {','.join(sorted(bad))}: no such step; steps: {', '.join(name for name, _ in steps)}")
    outputs = {"teacher": teacher, "distill": student, "compress": comp}
    held = [f"{name} ({outputs[name]})" for name, _ in steps if name in outputs and name not in skip and outputs[name].exists()]
    if held:
        raise SystemExit(f"already there: {', '.join(held)}; each refuses to overwrite a finished run: delete the folder to "
                         f"re-run the step, or reuse it with --skip {','.join(h.split()[0] for h in held)}")
    done = []
    for name, cmd in steps:
        done.append((name, cmd, None if name in skip else run(cmd)))
    m = machine()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{m['cpu']}-{m['cores']}c".lower()).strip("-")
    parts = [f"# All benchmarks on {m['cpu']} ({m['cores']} cores)", "",
             f"Command: `python {shlex.join(sys.argv)}` ({(time.time() - t0) / 3600:.1f} h, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"git {m.get('git', '?')}). Each section below is the file its step wrote in this run.", "",
             "| step | wall min | command |", "|---|---|---|"]
    parts += [f"| {name} | {f'{s / 60:.1f}' if s is not None else 'skipped: reused what ' + shlex.quote(str(out)) + ' holds'} "
              f"| `{shlex.join(cmd).replace(py, 'python')}` |" for name, cmd, s in done]
    parts.append("")
    for bench, tag in (("fashion_mnist_teacher", ""), ("distill_fashion_mnist", "resnet18-w16"), ("compress_fashion_mnist", ""),
                       ("speed_table", ""), ("bench_vs_benchmark_app", ""), ("bench_between_calls", ""), ("ov_call_overhead", ""),
                       ("train_overhead", ""), ("embed_memory", "")):
        p = record_path(bench, tag)
        f = f"{bench}/{p.name}"
        if p.exists() and p.stat().st_mtime >= t0:
            parts += [p.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1), ""]
        else:
            parts += [f"## {f}: not written by this run (its step was skipped)", ""]
    for title, p in (("edgeclr bench (the compressed models, native size)", out / "bench" / "bench.md"),
                     ("edgeclr eval --compare", comp / "compare.md")):
        if p.exists() and p.stat().st_mtime >= t0:
            parts += [f"## {title}", "", p.read_text(), ""]
    dest = record_path("run_all", slug)
    dest.write_text("\n".join(parts) + "\n")
    print(f"written: {dest}")


if __name__ == "__main__":
    main()
