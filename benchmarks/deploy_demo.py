"""The demo's deliverable against doing nothing: `edgeclr pipeline` on the embedded digits from
scratch, then what `edgeclr deploy` shipped against the teacher's own export in the same runtime,
timed in the same interleaved run (1 thread, batch 1), with raw pixels and a random-init network
as the accuracy baselines.

    python benchmarks/deploy_demo.py                  # fresh run in a temporary folder (about 5-8 minutes on 2 cores)
    python benchmarks/deploy_demo.py --out runs/demo  # or an existing finished run: reads it, trains nothing

Record: benchmarks/results/deploy_demo/<tag or latest>.{md,json}. The checks are issue 23's for the
demo: the shipped model >= 2x faster than the teacher's export in the same runtime, smaller on
disk, within 1.5 kNN points of the teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, record_path  # noqa: E402
from edgeclr.report import deploy_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="run folder (default: a fresh one in a temporary folder)")
    ap.add_argument("--tag", default="", help="record name (default: latest)")
    args = ap.parse_args()
    tmp = None
    out = Path(args.out) if args.out else Path(tmp := tempfile.mkdtemp(prefix="edgeclr-demo-")) / "demo"
    t0 = time.time()
    if not (out / "deploy" / "selection.json").exists():
        from edgeclr import api

        api.pipeline(out=str(out))
    wall = time.time() - t0
    sel = json.loads((out / "deploy" / "selection.json").read_text())
    state = json.loads((out / "pipeline.json").read_text())
    ev = json.loads((out / "train" / "eval.json").read_text())
    base = {r["key"]: r["knn_top1"] for r in ev["rows"]}
    win = sel["winner"]
    t = next(r for r in sel["candidates"] if r["level"] == "teacher" and r["runtime"] == win["runtime"])
    checks = {"speedup_vs_teacher_export": t["p50_ms"] / win["p50_ms"], "size_vs_teacher_export": win["size_bytes"] / t["size_bytes"],
              "knn_drop": win["drop"]}
    ok = checks["speedup_vs_teacher_export"] >= 2 and checks["size_vs_teacher_export"] < 1 and win["drop"] <= 1.5
    rec = {"machine": machine(), "command": "edgeclr pipeline --out OUT" if not args.out else f"(read) {out}",
           "wall_s": round(wall, 1), "stage_seconds": {k: v.get("seconds") for k, v in state["stages"].items()},
           "baselines_knn": base, "selection": sel, "checks": checks, "pass": ok}
    record_path("deploy_demo", args.tag, "json").write_text(json.dumps(rec, indent=2) + "\n")
    m = rec["machine"]
    lines = ["# deploy_demo: what the demo ships, against exporting the teacher\n",
             f"Machine: {m['cpu']}, {m['cores']} cores; edgeclr {m.get('git', '')}; torch {m.get('torch')}.",
             f"Command: `python benchmarks/deploy_demo.py{' --out ' + str(args.out) if args.out else ''}` "
             f"({rec['wall_s']:.0f} s; stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in rec["stage_seconds"].items() if v) + ").",
             "",
             f"Baselines (kNN top-1 on the same held-out digits): raw pixels {base.get('pixels', float('nan')):.2f}%, random-init "
             f"network {base.get('random', float('nan')):.2f}%, the SimCLR teacher {base.get('model', float('nan')):.2f}%.",
             "",
             f"**Shipped:** {sel['summary']}",
             "",
             "| check | measured | target |", "|---|---|---|",
             f"| speed-up over the teacher's own {win['runtime']} export (same interleaved run) | "
             f"{checks['speedup_vs_teacher_export']:.2f}x | >= 2x |",
             f"| size on disk against that export | {checks['size_vs_teacher_export']:.2f} | < 1 |",
             f"| kNN points below the teacher | {win['drop']:.2f} | <= 1.5 |",
             "", f"Result: {'PASS' if ok else 'FAIL'}.", "", "Every candidate:", "", deploy_table(sel), ""]
    record_path("deploy_demo", args.tag).write_text("\n".join(lines))
    print("\n".join(lines))
    if tmp:
        print(f"run folder: {out}")


if __name__ == "__main__":
    main()
