"""bf16 against fp32 inside `edgeclr train`'s own loop: does bf16 autocast pay on this CPU, and what
do its first steps cost?

Two SimCLR trainers of the same model (same initial weights, batches, augmentations, optimiser),
one with `--amp off` and one with `--amp bf16`, run blocks of `--steps` steps of
engine.train_one_epoch in turn (A B A B ...) in one process, so both see the same machine. The
first block of each is timed on its own (oneDNN builds its kernels on the first steps of a new
shape and precision), then `--rounds` interleaved blocks give the steady-state ratio.

    python benchmarks/train_precision.py                                   # the Fashion-MNIST teacher recipe
    python benchmarks/train_precision.py --width 64 --input-size 96 --batch-size 64 --data stl10:DIR

Writes benchmarks/results/train_precision/<tag or latest>.{json,md}. Run it alone: another
process on the same cores changes both figures by more than the ratio.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    a = ap.parse_args()

    import numpy as np
    import torch

    from edgeclr import config, data, engine, loading, train

    if a.threads:
        torch.set_num_threads(a.threads)
    out = tempfile.mkdtemp()
    trainers = {}
    for amp in ("off", "bf16"):
        cfg = config.TrainConfig(data=a.data, out=out, model=a.model, width=a.width, stem_stride=a.stem_stride,
                                 input_size=a.input_size, batch_size=a.batch_size, epochs=1000, knn_every=0,
                                 tensorboard=False, device="cpu", amp=amp)
        full, pp = loading.load_data(cfg)
        ds = data.ArrayDataset(full.name, np.ascontiguousarray(full.images[:a.steps * a.batch_size]))  # a block = an epoch
        torch.manual_seed(0)
        model = engine.set_layout(cfg, train.build_model(cfg, ds.channels), torch.device("cpu"))
        trainers[amp] = train.SimCLRTrainer(cfg, "train", model, ds, pp, torch.device("cpu"), Path(out) / amp)
    sink = [].append

    def block(tr) -> float:
        t = time.perf_counter()
        engine.train_one_epoch(tr, tr.simclr_loss, lambda m, e, s: sink(m))
        return a.steps * a.batch_size / (time.perf_counter() - t)

    first = {k: block(tr) for k, tr in trainers.items()}  # cold: kernels built on these steps
    rates = {k: [] for k in trainers}
    for _ in range(a.rounds):
        for k, tr in trainers.items():
            rates[k].append(block(tr))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["bf16"] / med["off"]
    res = {"benchmark": "train_precision", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": shlex.join(["python", "benchmarks/train_precision.py"] + sys.argv[1:]),
           "threads": torch.get_num_threads(), "model_spec": trainers["off"].model.spec.to_dict(),
           "input_size": a.input_size, "batch_size": a.batch_size, "steps_per_block": a.steps, "rounds": a.rounds,
           "first_block_images_per_s": {k: round(v, 1) for k, v in first.items()},
           "images_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
           "median_images_per_s": {k: round(v, 1) for k, v in med.items()}, "bf16_over_fp32": round(ratio, 3)}
    record_path("train_precision", a.tag, "json").write_text(json.dumps(res, indent=2) + "\n")
    md = f"""# bf16 against fp32 in `edgeclr train`'s loop{' (' + a.tag + ')' if a.tag else ''}

Measured {res['date']} on {res['machine']['cpu']} ({res['machine']['cores']} cores, {res['threads']} torch threads,
torch {res['machine'].get('torch')}).

```
{res['command']}
```

{a.model} width {a.width}, stem stride {a.stem_stride}, {a.input_size} px, batch {a.batch_size}; blocks of {a.steps} steps.

| precision | first block img/s | median img/s ({a.rounds} interleaved blocks) | all blocks |
|---|---|---|---|
| fp32 (`--amp off`) | {first['off']:.1f} | {med['off']:.1f} | {', '.join(f'{x:.0f}' for x in rates['off'])} |
| bf16 (`--amp bf16`) | {first['bf16']:.1f} | {med['bf16']:.1f} | {', '.join(f'{x:.0f}' for x in rates['bf16'])} |

bf16 / fp32 = **{ratio:.2f}x** in steady state.
"""
    record_path("train_precision", a.tag).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
