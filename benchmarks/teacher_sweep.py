"""Short-budget recipe sweep for the Fashion-MNIST teacher: each variant trains for a fixed number of
epochs (sized to a few minutes) and is evaluated with the full protocol (weighted kNN, k=20,
T=0.1, bank = 60,000 train images, queries = 10,000 test images). A variant that wins here is
then run at the full budget by fashion_mnist_teacher.py.

    python benchmarks/teacher_sweep.py --variants base,jitter1,t01 --epochs 5
    python benchmarks/teacher_sweep.py --list

Writes benchmarks/results/teacher_sweep/latest.{json,md} (appending variants already measured).
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
from _common import machine, record_path

# the recipe every variant below changes: fashion_mnist_teacher.py's first recipe (84.58% kNN in
# 38 epochs); the sweep's winner (J-t0.1-l4s1) became that script's RECIPE
BASE = dict(model="resnet18", width=16, stem_stride=2, input_size=28, batch_size=256, epochs=38, optimizer="adamw",
            lr=2e-3, weight_decay=1e-4, temperature=0.2, crop_scale="0.3 1.0", warmup_epochs=1)

HERE = Path(__file__).parent

# name -> options that change from the recipe in fashion_mnist_teacher.py
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "jitter1": ["--jitter", "1.0"],
    "jitter1-crop0.2": ["--jitter", "1.0", "--crop-scale", "0.2", "1.0"],
    "crop0.5": ["--crop-scale", "0.5", "1.0"],
    "t0.1": ["--temperature", "0.1"],
    "t0.5": ["--temperature", "0.5"],
    "batch128": ["--batch-size", "128"],
    "w24": ["--width", "24"],
    "w32-24px": ["--width", "32", "--input-size", "24"],
    "stem1-20px": ["--stem-stride", "1", "--input-size", "20"],
    "lars": ["--optimizer", "lars", "--lr", "1.0", "--weight-decay", "1e-6"],
    # on top of jitter1-crop0.2 (the best 5-epoch variant so far)
    "J-h512": ["--jitter", "1.0", "--crop-scale", "0.2", "1.0", "--head-hidden", "512"],
    "J-t0.1": ["--jitter", "1.0", "--crop-scale", "0.2", "1.0", "--temperature", "0.1"],
    "J-t0.1-l4s1": ["--jitter", "1.0", "--crop-scale", "0.2", "1.0", "--temperature", "0.1", "--last-stride", "1"],
}
# on top of J-t0.1-l4s1 (R, the recipe of fashion_mnist_teacher.py)
R = VARIANTS["J-t0.1-l4s1"]
VARIANTS.update({
    "R-lr4e-3": R + ["--lr", "0.004"],
    "R-h512": R + ["--head-hidden", "512"],
    "R-b128": R + ["--batch-size", "128", "--lr-scaling", "none"],
    "R-wd0.05": R + ["--weight-decay", "0.05"],
})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--epochs", default="5")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:18s} {shlex.join(v)}")
        return
    res_f = record_path("teacher_sweep", ext="json")
    results = json.loads(res_f.read_text()) if res_f.exists() else {"machine": machine(), "runs": []}
    exe = [sys.executable, "-m", "edgeclr"]
    for name in a.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name}; --list shows them")
        out = Path(a.out) / f"{name}-e{a.epochs}"
        args = []
        for k, v in {**BASE, "epochs": a.epochs}.items():
            args += [f"--{k.replace('_', '-')}", *str(v).split()]
        cmd = exe + ["train", "--data", "fashion-mnist", "--out", str(out), "--knn-every", "0", "--no-tensorboard", *args, *VARIANTS[name]]
        t = time.time()
        subprocess.run(cmd, check=True)
        train_min = (time.time() - t) / 60
        subprocess.run(exe + ["eval", str(out / "train"), "--baselines", "", "--no-tsne", "--no-linear-probe"], check=True)
        ev = json.loads((out / "train" / "eval.json").read_text())
        results["runs"].append({"variant": name, "epochs": int(a.epochs), "options": VARIANTS[name],
                                "command": shlex.join(["python", "-m", "edgeclr"] + cmd[3:]), "train_minutes": round(train_min, 1),
                                "knn_top1": round(ev["rows"][0]["knn_top1"], 2), "date": time.strftime("%Y-%m-%d %H:%M")})
        res_f.write_text(json.dumps(results, indent=2) + "\n")
        write_md(results)  # after every variant: a sweep cut short keeps its table
        print(results["runs"][-1], flush=True)


def write_md(results: dict) -> None:
    md = ["# Fashion-MNIST teacher: short-budget recipe sweep", "",
          f"Machine: {results['machine']['cpu']} ({results['machine']['cores']} cores). Base recipe: "
          f"`{shlex.join(f'--{k}={v}' for k, v in BASE.items())}`; full kNN protocol (60k bank, 10k queries). "
          "Training minutes are wall time on a shared machine (other work ran beside some variants): compare kNN, "
          "not minutes. R = J-t0.1-l4s1.", "",
          "| variant | changes | epochs | training min | kNN top-1 |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        md.append(f"| {r['variant']} | `{shlex.join(r['options'])}` | {r['epochs']} | {r['train_minutes']} | {r['knn_top1']:.2f} |")
    record_path("teacher_sweep").write_text("\n".join(md) + "\n")
    print("\n".join(md))

if __name__ == "__main__":
    main()
