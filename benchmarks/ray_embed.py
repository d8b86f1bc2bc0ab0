"""Images/s of `edgeclr embed` on this machine: the local engine against `--engine ray` with 1 and 2
workers (a private Ray started by the command, then a running one), and what starting Ray costs.

    pip install 'edgeclr[ray]'
    RAY_AUTH_MODE=token python benchmarks/ray_embed.py --model runs/demo/export/teacher.onnx [--images 6000]

The images are real: scikit-learn's digits written as PNG files (repeated, mirrored, to --images).
Each configuration embeds all of them into a fresh output; wall time is the command's, in-process
(`api.embed`), median of --repeats runs. Writes benchmarks/results/ray_embed/TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_record  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported


def write_images(folder: Path, n: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = digits[i % len(digits)]
        a = a if (i // len(digits)) % 2 == 0 else a[:, ::-1]
        Image.fromarray((a * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:05d}.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    import ray

    from edgeclr import api

    tmp = Path(tempfile.mkdtemp(prefix="ray-embed-"))
    write_images(tmp / "img", a.images)
    rows = []

    def timed(label: str, **kw) -> None:
        ts = []
        for r in range(a.repeats):
            out = tmp / f"{label.replace(' ', '-')}-{r}"
            t = time.perf_counter()
            res = api.embed(inputs=(str(tmp / "img"),), model=a.model, out=str(out) + (".npy" if "engine" not in kw else ""), **kw)
            ts.append(time.perf_counter() - t)
            assert res["total"] == a.images, res
        wall = statistics.median(ts)
        rows.append({"config": label, "wall_s": round(wall, 2), "images_per_s": round(a.images / wall, 1),
                     "runs_s": [round(t, 2) for t in ts]})
        print(rows[-1], flush=True)

    timed("local, 1 thread", threads=1)
    timed("local, 2 threads", threads=2)
    timed("ray private, 1 worker", engine="ray", workers=1, threads=1, shard_size=a.shard_size)
    timed("ray private, 2 workers", engine="ray", workers=2, threads=1, shard_size=a.shard_size)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    start_s = time.perf_counter() - t
    try:
        timed("ray running, 2 workers", engine="ray", workers=2, threads=1, shard_size=a.shard_size)
    finally:
        ray.shutdown()
    rec = {"benchmark": "ray_embed", "machine": machine(), "ray": ray.__version__, "images": a.images,
           "command": shlex.join([Path(sys.executable).name] + sys.argv), "rows": rows, "ray_init_s": round(start_s, 2)}
    mc = rec["machine"]
    md = [f"# `edgeclr embed`: local against Ray ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {mc['cpu']}, {mc['cores']} cores; ray {ray.__version__}; code {mc.get('git')}. Command: `{rec['command']}`.", "",
          f"{a.images} real images (digits as PNG files), model `{a.model}`; median wall time of {a.repeats} runs each, "
          "into a fresh output.", "", "| configuration | wall s | images/s |", "|---|---|---|"]
    md += [f"| {r['config']} | {r['wall_s']:.2f} | {r['images_per_s']:.0f} |" for r in rows]
    md += ["", f"Starting a private Ray (`ray.init`, 2 CPUs, no dashboard) took {start_s:.2f} s; the \"ray private\" rows pay it "
               "in every run, the \"ray running\" row connects to one already started."]
    write_record("ray_embed", a.tag, rec, md)


if __name__ == "__main__":
    main()
