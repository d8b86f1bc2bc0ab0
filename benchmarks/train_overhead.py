"""Does the toolchain cost training speed? edgeclr's training loop (train.train_one_epoch: metrics,
finite-loss check, progress, periodic checkpoints) against a bare PyTorch loop with the same model,
batches, augmentations, loss and optimiser, and nothing else.

Blocks of `--steps` steps alternate A B A B ... for `--rounds` rounds in one process, so both see
the same machine noise; the figure is the ratio of median steps/s. Target: edgeclr >= 0.95x.

    python benchmarks/train_overhead.py                 # Fashion-MNIST recipe model, CPU
    python benchmarks/train_overhead.py --device cuda --width 64 --input-size 96 --data stl10:DIR

Writes benchmarks/results/train_overhead/latest.{json,md} (TAG.{json,md} with --tag TAG).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    a = ap.parse_args()

    import numpy as np
    import torch

    from edgeclr import config, data, engine, loading, train
    from edgeclr.losses import nt_xent

    out = tempfile.mkdtemp()
    cfg = config.TrainConfig(data=a.data, out=out, width=a.width, stem_stride=a.stem_stride, input_size=a.input_size,
                             batch_size=a.batch_size, epochs=1000, knn_every=0, tensorboard=False, device=a.device)
    device = engine.resolve_device(cfg.device)
    full, pp = loading.load_data(cfg)
    n = a.steps * a.batch_size
    ds = data.ArrayDataset(full.name, np.ascontiguousarray(full.images[:n]))  # one epoch = one block
    torch.manual_seed(0)
    model = train.build_model(cfg, ds.channels).to(device).to(memory_format=torch.channels_last)
    tr = train.SimCLRTrainer(cfg, "train", model, ds, pp, device, Path(out) / "train")
    metrics_log = [].append

    def edgeclr_block():
        engine.train_one_epoch(tr, tr.simclr_loss, lambda m, e, s: metrics_log(m))

    from edgeclr.augment import view_generator

    bare_opt = tr.opt  # same optimiser object and parameters: the bare loop only drops the toolchain

    epoch = [0]  # the bare loop's own epoch counter (fresh batches and views every block)

    def bare_block():
        model.train()
        for step, b in enumerate(data.epoch_batches(len(ds), a.batch_size, 0, epoch[0])):
            x = torch.from_numpy(ds.images[b]).permute(0, 3, 1, 2).to(device)
            v = torch.cat([tr.augment(x, view_generator(0, epoch[0], step, 0)),
                           tr.augment(x, view_generator(0, epoch[0], step, 1))]).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=tr.amp or torch.float32, enabled=tr.amp is not None):
                z = model.project(v)
            z1, z2 = z.float().chunk(2)
            loss = nt_xent(z1, z2, cfg.temperature)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        epoch[0] += 1

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return a.steps / (time.perf_counter() - t)

    timed(bare_block), timed(edgeclr_block)  # warm-up
    rates = {"bare": [], "edgeclr": []}
    for _ in range(a.rounds):
        rates["bare"].append(timed(bare_block))
        rates["edgeclr"].append(timed(edgeclr_block))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["edgeclr"] / med["bare"]
    result = {"benchmark": "train_overhead", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": shlex.join(["python", "benchmarks/train_overhead.py"] + sys.argv[1:]),
              "device": str(device), "model_spec": model.spec.to_dict(), "batch_size": a.batch_size,
              "steps_per_block": a.steps, "rounds": a.rounds,
              "steps_per_s": {k: [round(x, 3) for x in v] for k, v in rates.items()},
              "median_steps_per_s": {k: round(v, 3) for k, v in med.items()},
              "images_per_s_median": {k: round(v * a.batch_size, 1) for k, v in med.items()},
              "ratio_edgeclr_over_bare": round(ratio, 4), "target": 0.95, "meets_target": ratio >= 0.95}
    record_path("train_overhead", a.tag, "json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"""# Training-loop overhead: edgeclr vs a bare PyTorch loop

Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, torch {result['machine'].get('torch')}), device {device}.

```
{result['command']}
```

Same model ({model.spec.name}, width {model.spec.width}, stem stride {model.spec.stem_stride}, {a.input_size} px), batch {a.batch_size},
augmentations, NT-Xent and optimiser; {a.rounds} interleaved rounds of {a.steps} steps each.

| loop | median steps/s | median images/s | all rounds (steps/s) |
|---|---|---|---|
| bare PyTorch | {med['bare']:.3f} | {med['bare'] * a.batch_size:.1f} | {', '.join(f'{x:.3f}' for x in rates['bare'])} |
| edgeclr train_one_epoch | {med['edgeclr']:.3f} | {med['edgeclr'] * a.batch_size:.1f} | {', '.join(f'{x:.3f}' for x in rates['edgeclr'])} |

edgeclr / bare = **{ratio:.3f}** (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}).
"""
    record_path("train_overhead", a.tag).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
