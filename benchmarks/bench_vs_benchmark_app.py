"""Does `edgeclr bench` time an OpenVINO model as OpenVINO's own `benchmark_app` does? (issue 7)

For every model and thread count, in turns (ours, benchmark_app, ours, benchmark_app, ...):
  - ours: edgeclr.bench.run_bench, the code behind `edgeclr bench` (a worker process, warm-up,
    interleaved chunks of timed runs, p50), at INFERENCE_PRECISION_HINT f32, batch 1;
  - theirs: `benchmark_app -m MODEL -d CPU -api sync -hint none -nstreams 1 -nthreads T -pin YES
    -infer_precision f32 -b 1 -t SECONDS`, the same settings as the model `edgeclr bench` compiles
    (LATENCY hint = 1 stream, pinned threads; both recorded), its median latency read from its
    JSON report.
The figure is the median over the turns of each side's median, and their ratio (target: within 20%).
`edgeclr bench` reports two latencies for an OpenVINO model: the Python call's p50 (what a caller of
edgeclr.runtime pays) and the runtime's own p50 (each request's `latency`, what benchmark_app
reads); both are compared. A third column is the control: benchmark_app against itself (the median
of its even turns over that of its odd turns). Where that is already outside 20%, this shared
machine drifts more between turns than the tolerance, and no pair of tools can be shown to agree there.

    python benchmarks/bench_vs_benchmark_app.py                    # random-weight students/teacher, 224 px and 28 px
    python benchmarks/bench_vs_benchmark_app.py --models a.xml b.xml --threads 1,2

Without --models, it exports (random weights; latency does not depend on them) MobileNetV3-Small at
224 px (stem stride 2) and at 28 px (stem stride 1, Fashion-MNIST's), each as an FP32 IR and an NNCF
INT8 IR calibrated on digits images, and the teacher's ResNet-18 (width 16) at 224 px.
Writes benchmarks/results/bench_vs_benchmark_app/latest.{json,md} (TAG.{json,md} with --tag TAG).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import export_set, machine, record_path  # noqa: E402

HERE = Path(__file__).parent


def benchmark_app(model: Path, threads: int, seconds: float, folder: Path) -> dict:
    """benchmark_app's median latency (ms) and the settings it reports, for one model."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    if not Path(exe).is_file():
        raise SystemExit(f"benchmark_app not found (not on PATH, not beside {sys.executable}): it is installed with the "
                         "openvino package (`pip install 'edgeclr[openvino]'`); activate that environment or put its bin/ on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "-m", str(model), "-d", "CPU", "-api", "sync", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
           "-pin", "YES", "-infer_precision", "f32", "-b", "1", "-t", str(seconds), "-report_type", "no_counters",
           "-json_stats", "-report_folder", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark_app failed ({out.returncode}): {out.stdout[-800:]}{out.stderr[-800:]}")
    res = json.loads((folder / "benchmark_report.json").read_text())["execution_results"]
    return {"median_ms": float(res["latency (ms)"]), "iterations": int(res["total number of iterations"]),
            "command": " ".join(cmd[1:]).replace(str(folder), "DIR")}


def ours(model: Path, fmt: str, threads: int, rounds: int, runs: int) -> dict:
    from edgeclr import bench

    row = bench.run_bench([bench.Config(model.name, str(model), fmt, threads, 1)], rounds, runs, 1.0)[0]
    return {k: row[k] for k in ("p50_ms", "runtime_p50_ms", "runs", "precision_ran", "threads_setting", "threads_in_process",
                                "performance_hint", "streams")}


def make_models(folder: Path) -> list[Path]:
    import torch

    from edgeclr import compress
    from edgeclr.models import ModelSpec, create_model
    from edgeclr.runtime import Preprocess

    torch.manual_seed(0)
    made = []
    for name, size, stem, spec in (("mnv3s-224", 224, 2, dict(name="mobilenet_v3_small", embed_dim=128, head_layers=0)),
                                   ("mnv3s-28", 28, 1, dict(name="mobilenet_v3_small", embed_dim=128, head_layers=0)),
                                   ("resnet18w16-224", 224, 2, dict(name="resnet18", width=16, last_stride=1, head_layers=0))):
        pp = Preprocess(input_size=size, resize_size=size, mean=(0.5,), std=(0.5,), channels=1)
        model = create_model(ModelSpec(in_chans=1, stem_stride=stem, **spec)).eval()
        calib = compress.calibration_inputs("digits", pp, 300, 0, {})
        files = export_set(model, pp, folder, name, calib, runtimes=("openvino",), int8=name.startswith("mnv3s"))
        made += files.values()
    return made


def summarise(row: dict) -> dict:
    """The figures of one configuration from its turns (also re-derives an older record's)."""
    mine, theirs, own = row["edgeclr_turns_ms"], row["benchmark_app_turns_ms"], row["edgeclr_runtime_turns_ms"]
    row.update(edgeclr_p50_ms=statistics.median(mine), edgeclr_runtime_p50_ms=statistics.median(own),
               benchmark_app_median_ms=statistics.median(theirs))
    row["ratio"] = row["edgeclr_p50_ms"] / row["benchmark_app_median_ms"]
    row["within_20pct"] = abs(row["ratio"] - 1) <= 0.20
    row["runtime_ratio"] = row["edgeclr_runtime_p50_ms"] / row["benchmark_app_median_ms"]
    row["runtime_within_20pct"] = abs(row["runtime_ratio"] - 1) <= 0.20
    # the controls: benchmark_app against itself, the median of its even turns over that of its odd
    # ones, and its slowest turn over its fastest (at 2 threads on this 2-vCPU machine a turn's median
    # jumped between ~0.6 and ~1.2 ms for either tool, as a neighbour came and went)
    row["benchmark_app_self_ratio"] = statistics.median(theirs[::2]) / statistics.median(theirs[1::2]) if len(theirs) > 1 else 1.0
    row["benchmark_app_self_within_20pct"] = abs(row["benchmark_app_self_ratio"] - 1) <= 0.20
    row["benchmark_app_spread"] = max(theirs) / min(theirs)
    # each tool's fastest turn was tried as the statistic once (2026-12-01): it agreed less often (6/10) than the medians (9/10)
    return row


def report(res: dict) -> str:
    rows, st = res["rows"], {**DEFAULTS, **res.get("settings", {})}
    rep = rows[0]["edgeclr_reported"]
    md = ["# `edgeclr bench` against OpenVINO's `benchmark_app`, same models, threads and precision", "",
          f"Machine: {res['machine']['cpu']} ({res['machine']['cores']} cores). Command: `{res['command']}` ({res['date']}).",
          f"Each figure is the median over {st['turns']} alternating turns (edgeclr, benchmark_app, ...) of that turn's median "
          f"latency at batch 1: edgeclr = {st['rounds']} interleaved rounds x {st['runs']} runs after 1 s warm-up, as `edgeclr bench` "
          f"times; benchmark_app = `-t {st['seconds']}` of `{rows[0]['benchmark_app_command']}`. What edgeclr's compiled model "
          f"reported: precision {rep['precision_ran']}, hint {rep['performance_hint']}, {rep['streams']} stream(s).", "",
          "| model | format | threads (set/seen) | benchmark_app median ms | edgeclr runtime's own p50 ms | ratio | within 20% "
          "| edgeclr Python-call p50 ms | ratio | within 20% | control: benchmark_app even/odd turns "
          "| control: benchmark_app slowest/fastest turn |", "|---" * 12 + "|"]
    for r in rows:
        e = r["edgeclr_reported"]
        md.append(f"| {r['model']} | {r['format']} | {e['threads_setting']}/{e['threads_in_process']} | "
                  f"{r['benchmark_app_median_ms']:.3f} | {r['edgeclr_runtime_p50_ms']:.3f} | {r['runtime_ratio']:.3f} | "
                  f"{'yes' if r['runtime_within_20pct'] else '**no**'} | {r['edgeclr_p50_ms']:.3f} | {r['ratio']:.3f} | "
                  f"{'yes' if r['within_20pct'] else '**no**'} | {r['benchmark_app_self_ratio']:.3f}"
                  f"{'' if r['benchmark_app_self_within_20pct'] else ' (outside 20%)'} | {r['benchmark_app_spread']:.2f} |")
    md += ["", f"Rows within 20%: runtime's own latency {sum(r['runtime_within_20pct'] for r in rows)} of {len(rows)}, "
               f"Python call {sum(r['within_20pct'] for r in rows)} of {len(rows)}; benchmark_app against itself "
               f"{sum(r['benchmark_app_self_within_20pct'] for r in rows)} of {len(rows)}. Of the rows where the control is within "
               f"20%, the runtime's own latency agrees in {sum(r['runtime_within_20pct'] for r in rows if r['benchmark_app_self_within_20pct'])}"
               f" of {sum(r['benchmark_app_self_within_20pct'] for r in rows)}. The runtime's own latency is each "
               "InferRequest's `latency`, read in the same timed runs as the Python call around it; the difference is what "
               "Python adds per call (numpy in, the request, one copy of the output).",
           "", "The last column is how far benchmark_app's own turns spread on this shared 2-vCPU machine (slowest turn's "
               "median over the fastest's): a neighbour only ever adds time, and a turn lands in a quiet or a contended "
               "stretch. Where it is wide, the median of turns is what the comparison can rest on.",
           "", "threads seen = threads alive in the edgeclr worker process during the timed runs (the runtime's pool plus "
               "Python's own), not the number busy."]
    return "\n".join(md) + "\n"


DEFAULTS = {"turns": 9, "seconds": 2, "rounds": 2, "runs": 40}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="OpenVINO IR files (.xml); default: export the set described above")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--turns", type=int, default=DEFAULTS["turns"], help="alternations of ours and benchmark_app per configuration")
    ap.add_argument("--seconds", type=int, default=DEFAULTS["seconds"], help="benchmark_app's -t per turn")
    ap.add_argument("--rounds", type=int, default=DEFAULTS["rounds"], help="edgeclr bench rounds per turn")
    ap.add_argument("--runs", type=int, default=DEFAULTS["runs"], help="edgeclr bench runs per round")
    ap.add_argument("--tag", default="", help="name of the record [latest]")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the .md of a recorded .json (its turns re-summarised)")
    a = ap.parse_args()

    if a.report:
        path = Path(a.report)
        res = json.loads(path.read_text())
        res["rows"] = [summarise(r) for r in res["rows"]]
        path.write_text(json.dumps(res, indent=2) + "\n")
        md = report(res)
        path.with_suffix(".md").write_text(md)
        print(md)
        return

    from edgeclr.bench import classify

    with tempfile.TemporaryDirectory() as tmp:
        models = [Path(m) for m in a.models] if a.models else make_models(Path(tmp))
        rows = []
        for m in models:
            fmt = classify(m)
            for t in (int(x) for x in a.threads.split(",")):
                mine, theirs = [], []
                for i in range(a.turns):
                    mine.append(ours(m, fmt, t, a.rounds, a.runs))
                    theirs.append(benchmark_app(m, t, a.seconds, Path(tmp) / f"rep-{m.stem}-{t}-{i}"))
                row = summarise({"model": m.name, "format": fmt, "threads": t,
                                 "edgeclr_turns_ms": [x["p50_ms"] for x in mine], "benchmark_app_turns_ms": [x["median_ms"] for x in theirs],
                                 "edgeclr_runtime_turns_ms": [x["runtime_p50_ms"] for x in mine],
                                 "edgeclr_reported": {k: v for k, v in mine[0].items() if k not in ("p50_ms", "runtime_p50_ms")},
                                 "benchmark_app_command": theirs[0]["command"]})
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("model", "threads", "edgeclr_p50_ms", "edgeclr_runtime_p50_ms",
                                                      "benchmark_app_median_ms", "ratio", "runtime_ratio")}),
                      flush=True)
    res = {"machine": machine(), "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "settings": {k: getattr(a, k) for k in DEFAULTS}, "rows": rows}
    record_path("bench_vs_benchmark_app", a.tag, "json").write_text(json.dumps(res, indent=2) + "\n")
    md = report(res)
    record_path("bench_vs_benchmark_app", a.tag).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
