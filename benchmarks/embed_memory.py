"""Peak resident memory of embedding a folder of images on the device: `edgeclr embed` (the
torch-free runtime, onnxruntime) against the same embedding done with torch eager (the checkpoint
loaded in PyTorch, the same preprocessing, the same batch size).

Each measurement runs in its own fresh process, which reports its own peak RSS (VmHWM) when
done; modes alternate (runtime, torch, runtime, torch, ...) and medians are quoted.

    python benchmarks/embed_memory.py --run runs/all/distill/distilled       # a student run (its newest stage)
    python benchmarks/embed_memory.py                                         # random-init MobileNetV3-Large, 224 px

Images: Fashion-MNIST test images written as PNG files (--images N). Target (issue 5): the
runtime's peak <= 1/3 of torch's. Writes benchmarks/results/embed_memory/latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path

HERE = Path(__file__).parent


def model_checkpoint(run: str | None, work: Path) -> Path:
    """The checkpoint to embed with: --run's newest stage, or a random-init MobileNetV3-Large at
    224 px, RGB, saved under work (memory does not depend on the weights' values)."""
    from edgeclr import checkpoint

    if run:
        from edgeclr.loading import find_checkpoint

        return find_checkpoint(run)
    from edgeclr.models import ModelSpec, create_model
    from edgeclr.runtime import Preprocess

    spec = ModelSpec("mobilenet_v3_large", in_chans=3)
    ckpt = work / "run" / "train" / "checkpoints" / "last.pt"
    checkpoint.save({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "stage": "train",
                     "model": create_model(spec).state_dict(), "spec": spec.to_dict(), "config": {"data": "fashion-mnist"},
                     "preprocess": Preprocess(224, 256, (0.5,) * 3, (0.25,) * 3, 3).to_dict()}, ckpt)
    return ckpt


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's high-water
    mark across fork + exec into it, so a child of a big process would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(mode: str, model: str, folder: str, batch: int) -> None:
    """Embed every image of `folder` in this process, then print the process's peak RSS."""
    t = time.perf_counter()
    if mode == "runtime":
        from edgeclr.runtime import embed_files_to

        r = embed_files_to(model, [folder], Path(tempfile.mkdtemp()) / "e.npy", batch_size=batch, threads=1)
        n = r["total"]
        assert "torch" not in sys.modules
    else:
        import numpy as np
        import torch

        from edgeclr.loading import load_encoder
        from edgeclr.runtime import Preprocess, list_inputs, load_image, preprocess

        torch.set_num_threads(1)
        enc, ck, _ = load_encoder(model)
        pp = Preprocess.from_dict(ck["preprocess"])
        files = list_inputs([folder])
        out = []
        with torch.no_grad():
            for i in range(0, len(files), batch):
                x = np.stack([preprocess(load_image(f, pp.channels, pp.resize_size), pp) for f in files[i:i + batch]])
                out.append(torch.nn.functional.normalize(enc.embed(torch.from_numpy(x)), dim=1).numpy())
        n = sum(len(o) for o in out)
    print(json.dumps({"mode": mode, "images": n, "peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.perf_counter() - t, 2)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run folder or checkpoint of a student (default: a random-init MobileNetV3-Large)")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("MODE", "MODEL", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], a.one[2], a.batch_size)

    import numpy as np
    from PIL import Image

    from edgeclr import checkpoint, data

    work = Path(tempfile.mkdtemp(prefix="embed-mem-"))
    ckpt = model_checkpoint(a.run, work)
    subprocess.run([sys.executable, "-m", "edgeclr", "export", str(ckpt), "--out", str(work / "export"), "--check-images", "8"], check=True)
    model = work / "export" / "model.onnx"
    ds = data.open_dataset("fashion-mnist", "test")
    folder = work / "images"
    folder.mkdir()
    for i in range(a.images):
        Image.fromarray(np.asarray(ds.pil(i))).save(folder / f"{i:05d}.png")

    rows = {"runtime": [], "torch": []}
    for _ in range(a.rounds):
        for mode in ("runtime", "torch"):
            target = str(model) if mode == "runtime" else str(ckpt)
            out = subprocess.run([sys.executable, __file__, "--batch-size", str(a.batch_size), "--one", mode, target, str(folder)],
                                 check=True, capture_output=True, text=True).stdout
            rows[mode].append(json.loads(out.strip().splitlines()[-1]))
    med = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in rows.items()}
    ratio = med["runtime"] / med["torch"]
    ck = checkpoint.load(ckpt)
    spec, pp = ck["spec"], ck["preprocess"]
    result = {"benchmark": "embed_memory", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": shlex.join(["python", "benchmarks/embed_memory.py"] + sys.argv[1:]),
              "model": spec, "input_size": pp["input_size"], "images": a.images, "batch_size": a.batch_size, "runs": rows,
              "median_peak_rss_mb": med, "ratio_runtime_over_torch": round(ratio, 3), "target": "<= 0.333",
              "meets_target": ratio <= 1 / 3}
    record_path("embed_memory", ext="json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"""# Peak memory of embedding images: runtime (onnxruntime) vs torch eager

Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores).

```
{result['command']}
```

{spec['name']} at {pp['input_size']} px ({pp['channels']} channel(s)), {a.images} Fashion-MNIST test images as PNG files,
batch {a.batch_size}, 1 thread; each measurement in a fresh process ({a.rounds} rounds, alternating).

| path | median peak RSS (MB) | runs (MB) | seconds (median) |
|---|---|---|---|
| `edgeclr embed` (runtime: numpy + PIL + onnxruntime) | {med['runtime']:.0f} | {', '.join(str(r['peak_rss_mb']) for r in rows['runtime'])} | {statistics.median(r['seconds'] for r in rows['runtime']):.2f} |
| torch eager (same preprocessing, checkpoint in PyTorch) | {med['torch']:.0f} | {', '.join(str(r['peak_rss_mb']) for r in rows['torch'])} | {statistics.median(r['seconds'] for r in rows['torch']):.2f} |

runtime / torch = **{ratio:.3f}** (target <= 0.333: {'met' if ratio <= 1 / 3 else 'NOT met'}).
"""
    record_path("embed_memory").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
