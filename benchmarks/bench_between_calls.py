"""Does work between timed calls slow the next inference? (issue 7: `edgeclr bench` against benchmark_app)

`edgeclr bench`'s worker used to count its process's threads (a listing of /proc/self/task) after
every timed call, outside the clock. For each model, in turns, two fresh processes time the same
OpenVINO model at 1 thread, batch 1, f32, 600 calls after 1 s of warm-up, reading each request's
own latency (`InferRequest.latency`, what benchmark_app reports):
  - "quiet": nothing between calls but the clock (the worker's loop now);
  - "count threads": /proc/self/task listed after each call (the worker's loop before).
Each turn's ratio is count-threads / quiet; the figure is the median over turns (the order of the
two alternates between turns, so a drifting machine favours neither).

    python benchmarks/bench_between_calls.py                  # two 28-px MobileNetV3-Small IRs, FP32 and INT8
    python benchmarks/bench_between_calls.py --models a.xml

Writes benchmarks/results/bench_between_calls/latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402

HERE = Path(__file__).parent

TIMER = """
import json, sys, time
import numpy as np
from edgeclr import bench
from edgeclr.runtime import Embedder
path, mode, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = Embedder.load(path, threads=1, precision="f32").backend
pp = b.input_shape
x = np.random.default_rng(0).standard_normal([1] + pp[1:]).astype(np.float32)
t_end = time.perf_counter() + 1.0
while time.perf_counter() < t_end:
    b(x)
own = []
for _ in range(runs):
    b(x)
    own.append(b.last_latency_ms)
    if mode == "count-threads":
        bench._threads_running()
print(json.dumps({"median_ms": float(np.median(own))}))
"""


def timed(model: Path, mode: str, runs: int) -> float:
    out = subprocess.run([sys.executable, "-c", TIMER, str(model), mode, str(runs)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{model} ({mode}): {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="OpenVINO IR files (.xml); default: the 28-px MobileNetV3-Small pair")
    ap.add_argument("--turns", type=int, default=7)
    ap.add_argument("--runs", type=int, default=600)
    a = ap.parse_args()

    import bench_vs_benchmark_app as cross

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in a.models] if a.models else [m for m in cross.make_models(Path(tmp)) if m.stem.startswith("mnv3s-28")]
        for m in models:
            quiet, counting = [], []
            for i in range(a.turns):
                order = ("quiet", "count-threads") if i % 2 == 0 else ("count-threads", "quiet")
                got = {mode: timed(m, mode, a.runs) for mode in order}
                quiet.append(got["quiet"])
                counting.append(got["count-threads"])
            ratios = [c / q for c, q in zip(counting, quiet)]
            rows.append({"model": m.name, "quiet_ms": quiet, "count_threads_ms": counting, "ratios": ratios,
                         "median_quiet_ms": statistics.median(quiet), "median_count_threads_ms": statistics.median(counting),
                         "median_ratio": statistics.median(ratios)})
            print(json.dumps({k: rows[-1][k] for k in ("model", "median_quiet_ms", "median_count_threads_ms", "median_ratio")}),
                  flush=True)
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "turns": a.turns, "runs": a.runs, "rows": rows}
    record_path("bench_between_calls", ext="json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Work between timed calls: does it slow the next inference?", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), git {res['machine'].get('git')}. "
          f"Command: `{res['command']}` ({res['date']}). OpenVINO, 1 thread, batch 1, f32; each figure is a median of "
          f"the request's own latency over {a.runs} calls in a fresh process; {a.turns} turns, the order alternating.", "",
          "| model | nothing between calls, ms | /proc/self/task listed after each call, ms | ratio (median of the turns' ratios) | turns' ratios |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['median_quiet_ms']:.3f} | {r['median_count_threads_ms']:.3f} | {r['median_ratio']:.3f} | "
                  + ", ".join(f"{x:.2f}" for x in r["ratios"]) + " |")
    md += ["", "`edgeclr bench`'s worker counted threads after every call until this was measured; it counts once per "
               "chunk of runs now (tests/test_bench.py::test_the_timed_loop_does_nothing_between_calls_but_read_the_clock)."]
    record_path("bench_between_calls").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
