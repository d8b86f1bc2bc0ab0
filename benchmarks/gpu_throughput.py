"""SimCLR training throughput on a GPU: ResNet-50 at 96 px, fp32 vs bf16 autocast vs bf16 +
channels_last (+ torch.compile), through edgeclr's own Trainer (augmentations on the GPU,
NT-Xent, LARS step), and the data loader's share of the step time.

    python benchmarks/gpu_throughput.py                          # on a CUDA machine (issue 3: >= 1,500 img/s on one H100, bf16)
    python benchmarks/gpu_throughput.py --data /data/stl10_png   # loader share measured on a real image folder
    python benchmarks/gpu_throughput.py --device cpu --model resnet18 --batch-size 32 --steps 3 --input-size 32   # smoke run

Variants run in turns (A B C A B C ...) for `--rounds` rounds in one process; the figure is the
median images/s of each. The compute blocks feed the GPU uint8 batches already in its memory
(the images' values do not change the arithmetic); the loader line runs the real loader of
`--data` (decode + resize in `--num-workers` processes) with the bf16 + channels_last step and
reports the fraction of wall time spent waiting for batches. Writes
benchmarks/results/gpu_throughput/latest.{json,md} (TAG.{json,md} with --tag TAG).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402

HERE = Path(__file__).parent
VARIANTS = {  # name: (amp, channels_last, compile)
    "fp32": ("off", False, False),
    "bf16": ("bf16", False, False),
    "bf16+channels_last": ("bf16", True, False),
    "bf16+channels_last+compile": ("bf16", True, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default="", help="image folder (or dataset spec) for the loader-share line; empty = skip it")
    ap.add_argument("--num-workers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    a = ap.parse_args()

    import numpy as np
    import torch

    from edgeclr import config, data, engine, loading, train
    from edgeclr.runtime import Preprocess

    device = engine.resolve_device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = Path(tempfile.mkdtemp())
    n = a.batch_size * 2
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset("uint8 noise", rng.integers(0, 256, (n, round(a.input_size * 1.25), round(a.input_size * 1.25), 3),
                                                      dtype=np.uint8))
    pp = Preprocess(a.input_size, round(a.input_size * 1.25), (0.5,) * 3, (0.25,) * 3, 3)
    x_gpu = torch.from_numpy(ds.images[:a.batch_size]).permute(0, 3, 1, 2).contiguous().to(device)

    trainers = {}
    for name in a.variants.split(","):
        amp, cl, comp = VARIANTS[name]
        cfg = config.TrainConfig(data="digits", out=str(out / name), model=a.model, stem_stride=2, input_size=a.input_size,
                                 batch_size=a.batch_size, epochs=100, optimizer="lars", lr=0.3, weight_decay=1e-6,
                                 temperature=0.2, augment="rgb", amp=amp, channels_last=cl, compile=comp, device=a.device,
                                 knn_every=0, tensorboard=False)
        torch.manual_seed(0)
        model = train.build_model(cfg, 3).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        trainers[name] = train.SimCLRTrainer(cfg, "train", model, ds, pp, device, out / name)

    def block(tr, steps):
        tr.model.train()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.optimise(tr.simclr_loss(x_gpu))
            tr.step += 1
        sync()
        return steps * a.batch_size / (time.perf_counter() - t0)

    for tr in trainers.values():  # warm-up: cuDNN autotuning, compilation
        block(tr, 3 if not tr.cfg.compile else 6)
    rounds = {k: [] for k in trainers}
    for _ in range(a.rounds):
        for k, tr in trainers.items():
            rounds[k].append(block(tr, a.steps))
    med = {k: statistics.median(v) for k, v in rounds.items()}

    loader = None
    if a.data:  # the real loader feeding the bf16 + channels_last step: how long the GPU waits for batches
        cfg = config.TrainConfig(data=a.data, out=str(out / "loader"), model=a.model, stem_stride=2, input_size=a.input_size,
                                 batch_size=a.batch_size, epochs=1, optimizer="lars", lr=0.3, amp="bf16", channels_last=True,
                                 device=a.device, num_workers=a.num_workers, knn_every=0, tensorboard=False)
        real, rpp = loading.load_data(cfg)
        torch.manual_seed(0)
        model = train.build_model(cfg, real.channels).to(device).to(memory_format=torch.channels_last)
        tr = train.SimCLRTrainer(cfg, "train", model, real, rpp, device, out / "loader")
        wait = steps = 0.0
        t_all = time.perf_counter()
        t_ask = time.perf_counter()
        for _, x, _, _ in data.iterate_batches(real, a.batch_size, 0, 0, 0, a.num_workers):
            wait += time.perf_counter() - t_ask
            tr.optimise(tr.simclr_loss(x.to(device, non_blocking=True)))
            sync()
            steps += 1
            if steps >= 3 * a.steps:
                break
            t_ask = time.perf_counter()
        total = time.perf_counter() - t_all
        loader = {"data": a.data, "num_workers": a.num_workers, "steps": int(steps),
                  "images_per_s": steps * a.batch_size / total, "loader_wait_share": wait / total}

    m = machine()
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    cmd = "python benchmarks/gpu_throughput.py " + shlex.join(sys.argv[1:])
    result = {"machine": m, "command": cmd, "model": a.model, "input_size": a.input_size, "batch_size": a.batch_size,
              "steps_per_block": a.steps, "rounds": rounds, "median_images_per_s": med, "loader": loader}
    record_path("gpu_throughput", a.tag, "json").write_text(json.dumps(result, indent=2) + "\n")
    base = med.get("fp32") or next(iter(med.values()))
    lines = [f"# SimCLR training throughput: {a.model} at {a.input_size} px, batch {a.batch_size}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {m.get('gpu') or m['cpu']} (torch {m['torch']}).", "",
             "```", cmd, "```", "", "| variant | median images/s | vs first | all rounds |", "|---|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.0f} | {v / base:.2f}x | {', '.join(f'{r:.0f}' for r in rounds[k])} |")
    if loader:
        lines += ["", f"Real loader ({loader['data']}, {loader['num_workers']} workers) feeding the bf16 + channels_last step: "
                      f"{loader['images_per_s']:.0f} images/s, waiting for batches {100 * loader['loader_wait_share']:.1f}% of the time."]
    record_path("gpu_throughput", a.tag).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
