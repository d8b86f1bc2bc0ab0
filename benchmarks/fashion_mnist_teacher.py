"""Pretrain a SimCLR teacher on Fashion-MNIST (60,000 train images, labels unused) and evaluate it
on the 10,000 test images: weighted kNN (k=20, cosine, T=0.1) and linear probe, against a
random-init network of the same spec and raw pixels.

    python benchmarks/fashion_mnist_teacher.py                     # the CPU recipe (<= 60 min on 2 cores)
    python benchmarks/fashion_mnist_teacher.py --epochs 200 --width 64 --device cuda   # the GPU recipe

Writes benchmarks/results/fashion_mnist_teacher/latest.{json,md} (TAG.{json,md} with --tag TAG). Needs the IDX files
(`apt-get install dataset-fashion-mnist`, or --data fashion-mnist:DIR).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402

HERE = Path(__file__).parent

# The recipe measured in results/fashion_mnist_teacher/latest.md; every value is also a CLI option.
RECIPE = dict(model="resnet18", width=16, stem_stride=2, last_stride=1, input_size=28, batch_size=256, epochs=32,
              optimizer="adamw", lr=4e-3, weight_decay=1e-4, temperature=0.1, crop_scale="0.2 1.0", jitter=1.0, warmup_epochs=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default="runs/bench-fmnist")
    ap.add_argument("--tag", default="", help="name of the record, e.g. gpu [latest]")
    ap.add_argument("--budget-min", type=float, default=60.0, help="training stops with a checkpoint after this")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true")
    for k, v in RECIPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", default=str(v))
    a = ap.parse_args()

    exe = [sys.executable, "-m", "edgeclr"]
    train_cmd = exe + ["train", "--data", a.data, "--out", a.out, "--device", a.device, "--knn-every", "5",
                       "--max-minutes", str(a.budget_min)]
    for k in RECIPE:
        train_cmd += [f"--{k.replace('_', '-')}", *str(getattr(a, k)).split()]
    if a.resume:
        train_cmd.append("--resume")
    eval_cmd = exe + ["eval", str(Path(a.out) / "train"), "--device", a.device]

    t0 = time.time()
    print("+", shlex.join(train_cmd), flush=True)
    subprocess.run(train_cmd, check=True)
    train_s = time.time() - t0
    print("+", shlex.join(eval_cmd), flush=True)
    subprocess.run(eval_cmd, check=True)
    manifest = json.loads((Path(a.out) / "train" / "manifest.json").read_text())
    ev = json.loads((Path(a.out) / "train" / "eval.json").read_text())
    rows = {r["key"]: r for r in ev["rows"]}

    result = {
        "benchmark": "fashion_mnist_teacher", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "train_command": shlex.join(["python", "-m", "edgeclr"] + train_cmd[3:]),
        "eval_command": shlex.join(["python", "-m", "edgeclr"] + eval_cmd[3:]),
        "budget_minutes": a.budget_min, "training_wall_minutes": round(manifest["train_seconds"] / 60, 1),
        "train_command_wall_minutes": round(train_s / 60, 1), "completed_schedule": manifest["completed"],
        "epochs_done": manifest["epoch"], "model_spec": manifest["model_spec"], "parameters": manifest["parameters"],
        "knn_top1": {k: round(r["knn_top1"], 2) for k, r in rows.items()},
        "linear_top1": {k: round(r["linear_top1"], 2) for k, r in rows.items() if r["linear_top1"] is not None},
        "target": {"min_knn": 86.5, "aim_knn": 89.0},
    }
    result["meets_target"] = result["knn_top1"]["model"] >= 86.5 and result["training_wall_minutes"] <= a.budget_min
    record_path("fashion_mnist_teacher", a.tag, "json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Fashion-MNIST SimCLR teacher{' (' + a.tag + ')' if a.tag else ''}", "",
          f"Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
          f"torch {result['machine'].get('torch')}, GPU: {result['machine'].get('gpu')}).", "",
          "```", result["train_command"], result["eval_command"], "```", "",
          f"Training: {result['training_wall_minutes']} min wall ({result['epochs_done']} epochs, budget "
          f"{a.budget_min:g} min, schedule completed: {result['completed_schedule']}); "
          f"{result['parameters'] / 1e6:.2f}M parameters.", "",
          "Test accuracy on the 10,000 test images (bank: the 60,000 training images with their labels):", "",
          ev.get("table") or "", ""]
    from edgeclr.report import eval_table as format_table

    md[-2] = format_table(ev["rows"])
    md += [f"Target: kNN >= 86.5% (raw pixels + 2), aim 89%. Met: {result['meets_target']}.", ""]
    record_path("fashion_mnist_teacher", a.tag).write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
