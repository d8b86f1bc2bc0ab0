"""What a Python call adds to an OpenVINO inference (issue 7: `edgeclr bench` against benchmark_app).

For each model, in turns (A B A B ...), 1 thread, batch 1, one process:
  - "infer([x])": the call edgeclr's runtime made before stop 19 (OpenVINO copies the input and
    the output through Python);
  - "edgeclr": `Embedder.backend(x)` as it is now (the request reads x in place and lends its
    output buffer; edgeclr copies the result out);
and, for each call, OpenVINO's own request latency (`InferRequest.latency`, measured in C++ as
benchmark_app reports it). Overhead = the call's median minus the request's median.

    python benchmarks/ov_call_overhead.py

Random weights (latency does not depend on them). Writes benchmarks/results/ov_call_overhead/latest.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import export_set, machine, record_path  # noqa: E402

from edgeclr.models import ModelSpec, create_model  # noqa: E402
from edgeclr.runtime import Embedder, Preprocess  # noqa: E402

HERE = Path(__file__).parent
MODELS = (("mnv3s-28", 28, dict(name="mobilenet_v3_small", stem_stride=1)),
          ("resnet18w16-28", 28, dict(name="resnet18", width=16, stem_stride=2)),
          ("mnv3s-224", 224, dict(name="mobilenet_v3_small", stem_stride=2)))


def main(rounds: int = 7, runs: int = 300):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size, spec in MODELS:
            torch.manual_seed(0)
            model = create_model(ModelSpec(in_chans=1, embed_dim=128, head_layers=0, **spec)).eval()
            pp = Preprocess(input_size=size, resize_size=size, mean=(0.5,), std=(0.5,), channels=1)
            x = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
            xml = export_set(model, pp, tmp, label, x, runtimes=("openvino",), int8=False)["openvino"]
            backend = Embedder.load(xml, threads=1, precision="f32").backend
            req = backend._request(1)[1]
            calls = {"infer([x])": lambda req=req, x=x: np.asarray(req.infer([x])[0]), "edgeclr": lambda b=backend, x=x: b(x)}
            np.testing.assert_allclose(calls["infer([x])"](), calls["edgeclr"](), atol=1e-6)
            wall: dict[str, list[float]] = {k: [] for k in calls}
            inner: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    for _ in range(20):
                        fn()
                    ts, lat = [], []
                    for _ in range(runs):
                        t = time.perf_counter()
                        fn()
                        ts.append(1000 * (time.perf_counter() - t))
                        lat.append(req.latency)
                    wall[k].append(statistics.median(ts))
                    inner[k].append(statistics.median(lat))
            row = {"model": label, "size": size}
            for k in calls:
                row[k] = {"call_ms": statistics.median(wall[k]), "request_ms": statistics.median(inner[k])}
                row[k]["overhead_ms"] = row[k]["call_ms"] - row[k]["request_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv), "rounds": rounds, "runs": runs,
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    record_path("ov_call_overhead", ext="json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# What a Python call adds to an OpenVINO inference, 1 thread, batch 1", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), {res['date']}. Command: `{res['command']}`. "
          f"Medians of {rounds} interleaved rounds of {runs} calls; request = OpenVINO's own `InferRequest.latency` "
          "of the same calls (what benchmark_app reports).", "",
          "| model | infer([x]) call ms | its request ms | overhead ms | edgeclr call ms | its request ms | overhead ms | call speed-up |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["infer([x])"], r["edgeclr"]
        md.append(f"| {r['model']} | {a['call_ms']:.3f} | {a['request_ms']:.3f} | {a['overhead_ms']:.3f} | {b['call_ms']:.3f} | "
                  f"{b['request_ms']:.3f} | {b['overhead_ms']:.3f} | {a['call_ms'] / b['call_ms']:.2f}x |")
    record_path("ov_call_overhead").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
