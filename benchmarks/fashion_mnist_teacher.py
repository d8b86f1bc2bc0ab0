"""Pretrain a SimCLR teacher on Fashion-MNIST (60,000 train images, labels unused) and evaluate it
on the 10,000 test images: weighted kNN (k=20, cosine, T=0.1) and linear probe, against a
random-init network of the same spec and raw pixels.

    python benchmarks/fashion_mnist_teacher.py                     # the CPU recipe (<= 60 min on 2 cores)
    python benchmarks/fashion_mnist_teacher.py --epochs 200 --width 64 --device cuda   # the GPU recipe
    python benchmarks/fashion_mnist_teacher.py --epochs 64 --lightly   # and lightly's SimCLR example, same budget

--lightly also trains lightly's stock SimCLR example (`pip install -e ".[baseline]"`: lightly 1.6.0) for
the same wall-clock budget on the same machine, scores its backbone with the same kNN and linear
probe, and records both (target: edgeclr's teacher ahead by >= 3 kNN points). --skip-teacher
records an existing OUT/train (its manifest.json and eval.json) instead of training it again.

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


# lightly 1.6.0's examples/pytorch/simclr.py, as a user would copy it: the only change is the input
# size (28 px, the images given as RGB) and the loop bounded by the wall clock instead of 10 epochs.
LOG_EVERY = 50  # lightly_baseline logs every this many steps
LIGHTLY_RECIPE = ("lightly 1.6.0 examples/pytorch/simclr.py: torchvision resnet18 without its fc, SimCLRProjectionHead(512, 512, 128), "
                  "NTXentLoss() (temperature 0.5), SGD(lr=0.06), SimCLRTransform(input_size={size}) on the images as RGB, "
                  "batch {batch_size}, shuffle, drop_last")


def lightly_baseline(train, test, budget_min: float, seed: int = 0, workers: int = 2, batch_size: int = 256,
                     max_steps: int | None = None, log=print) -> dict:
    """Train lightly's SimCLR example on `train` (an edgeclr dataset) for budget_min minutes of wall
    clock (or max_steps steps), then score its backbone on `test` with edgeclr's kNN (k=20, cosine,
    T=0.1, bank: `train` with its labels) and linear probe (C = 1, every label)."""
    import numpy as np
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from lightly.transforms.utils import IMAGENET_NORMALIZE
    from torch import nn

    from edgeclr.heldout import embed, knn_accuracy, linear_probe

    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(512, 512, 128)

        def forward(self, x):
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    class Views(torch.utils.data.Dataset):
        def __init__(self, ds, transform):
            self.ds, self.transform = ds, transform

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.transform(self.ds.pil(i).convert("RGB"))

    torch.manual_seed(seed)
    size = int(train.images.shape[1])
    resnet = torchvision.models.resnet18()
    model = SimCLR(nn.Sequential(*list(resnet.children())[:-1]))
    loader = torch.utils.data.DataLoader(Views(train, SimCLRTransform(input_size=size)), batch_size=batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    t0 = time.time()
    deadline = t0 + budget_min * 60
    steps = epochs = seen = 0
    loss = float("nan")
    model.train()
    while True:
        for x0, x1 in loader:
            z0, z1 = model(x0), model(x1)
            loss = criterion(z0, z1)
            loss.backward()
            loss = loss.detach()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            seen += len(x0)
            if steps % LOG_EVERY == 0:
                log(f"lightly: epoch {epochs + 1} step {steps} loss {float(loss):.4f} {seen / (time.time() - t0):.0f} img/s")
            if time.time() >= deadline or steps == max_steps:
                break
        else:
            epochs += 1
            continue
        break
    train_s = time.time() - t0
    if not np.isfinite(float(loss)):
        raise SystemExit(f"lightly's SimCLR ended with a non-finite loss ({float(loss)}) after {steps} steps")

    mean = torch.tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def backbone(x):  # a batch of (B, C, S, S) uint8 images
        x = x.float().div(255)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # the grey images as RGB, as in training
        return model.backbone((x - mean) / std).flatten(start_dim=1)

    model.eval()
    bank, query = (embed(backbone, torch.from_numpy(ds.images).permute(0, 3, 1, 2), 512) for ds in (train, test))
    return {"recipe": LIGHTLY_RECIPE.format(size=size, batch_size=batch_size), "budget_minutes": budget_min, "training_wall_minutes": round(train_s / 60, 1),
            "steps": steps, "epochs_done": epochs, "images_per_s": round(seen / max(train_s, 1e-9), 1),
            "final_loss": round(float(loss), 4), "parameters": sum(p.numel() for p in model.parameters()),
            "dim": int(bank.shape[1]), "knn_top1": round(knn_accuracy(bank, train.labels, query, test.labels, 20, 0.1), 2),
            "linear_top1": round(linear_probe(bank.numpy(), train.labels, query.numpy(), test.labels, seed, c=1.0), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", default="runs/bench-fmnist")
    ap.add_argument("--tag", default="", help="name of the record, e.g. gpu [latest]")
    ap.add_argument("--budget-min", type=float, default=60.0, help="training stops with a checkpoint after this")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lightly", action="store_true", help="also train lightly's SimCLR example for --budget-min and record both")
    ap.add_argument("--skip-teacher", action="store_true", help="record the existing OUT/train instead of training it again")
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

    if a.lightly:  # fail now, not after the teacher's hour
        try:
            import lightly  # noqa: F401
        except ImportError:
            raise SystemExit("--lightly needs lightly 1.6.0: pip install -e '.[baseline]'") from None
        if a.data.partition(":")[0] != "fashion-mnist":
            raise SystemExit("--lightly: the baseline reads Fashion-MNIST (--data fashion-mnist[:DIR])")
    if a.skip_teacher and not (Path(a.out) / "train" / "manifest.json").is_file():
        raise SystemExit(f"--skip-teacher: {Path(a.out) / 'train'} holds no finished teacher (manifest.json); train it first")
    t0 = time.time()
    if not a.skip_teacher:
        print("+", shlex.join(train_cmd), flush=True)
        subprocess.run(train_cmd, check=True)
    train_s = time.time() - t0
    if not a.skip_teacher or not (Path(a.out) / "train" / "eval.json").exists():
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
        "train_command_wall_minutes": None if a.skip_teacher else round(train_s / 60, 1), "completed_schedule": manifest["completed"],
        "epochs_done": manifest["epoch"], "model_spec": manifest["model_spec"], "parameters": manifest["parameters"],
        "knn_top1": {k: round(r["knn_top1"], 2) for k, r in rows.items()},
        "linear_top1": {k: round(r["linear_top1"], 2) for k, r in rows.items() if r["linear_top1"] is not None},
        "target": {"min_knn": 86.5, "aim_knn": 89.0},
    }
    result["meets_target"] = result["knn_top1"]["model"] >= 86.5 and result["training_wall_minutes"] <= a.budget_min
    if a.lightly:
        from edgeclr import data

        print(f"+ lightly's SimCLR example for {a.budget_min:g} min", flush=True)
        lt = lightly_baseline(data.open_dataset(a.data, "train"), data.open_dataset(a.data, "test"), a.budget_min)
        result["lightly"] = lt
        result["target"]["lightly_margin_knn"] = 3.0
        result["ahead_of_lightly_knn"] = round(result["knn_top1"]["model"] - lt["knn_top1"], 2)
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
    if a.lightly:
        lt = result["lightly"]
        md += ["## lightly's SimCLR example, same machine and budget", "", lt["recipe"] + ".", "",
               f"Training: {lt['training_wall_minutes']} min wall ({lt['epochs_done']} full epochs, {lt['steps']} steps, "
               f"{lt['images_per_s']:g} img/s, final loss {lt['final_loss']}); {lt['parameters'] / 1e6:.2f}M parameters.", "",
               "| features | dim | knn_top1 | linear_top1 |", "|---|---|---|---|",
               f"| edgeclr teacher | {rows['model'].get('dim', '')} | {result['knn_top1']['model']:.2f} | "
               f"{result['linear_top1'].get('model', float('nan')):.2f} |",
               f"| lightly SimCLR example | {lt['dim']} | {lt['knn_top1']:.2f} | {lt['linear_top1']:.2f} |", "",
               f"edgeclr ahead by {result['ahead_of_lightly_knn']:+.2f} kNN points (target >= 3): "
               f"{'met' if result['ahead_of_lightly_knn'] >= 3 else 'not met'}.", ""]
    record_path("fashion_mnist_teacher", a.tag).write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
