"""Does `edgeclr deploy`'s choice flip between runs of the same files? Deploy one run N times (each
builds, scores and times every candidate again) and tabulate what each shipped, against the
teacher's export, with the next-fastest candidate's latency ratio and its interval.

    python benchmarks/deploy_stability.py --run runs/demo --tag T                   # 3 fresh deploys: RUN/deploy-1..3
    python benchmarks/deploy_stability.py --run runs/demo --reuse deploy,deploy-2   # tabulate deploys already made

The run's ladder students are deploy candidates as in the pipeline (every RUN/students/*). Writes
benchmarks/results/deploy_stability/<tag or latest>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402


def summarise(folder: Path) -> dict:
    sel = json.loads((folder / "selection.json").read_text())
    win = sel["winner"]
    teachers = [c for c in sel["candidates"] if c["level"] == "teacher" and c["runtime"] == win["runtime"]]
    others = sorted((c for c in sel["candidates"] if c is not win and c.get("vs_fastest")), key=lambda c: c["vs_fastest"]["ratio"])
    nxt = others[0] if others else None
    return {"deploy": folder.name, "shipped": win["name"], "p50_ms": win["p50_ms"], "size_mb": win["size_bytes"] / 1e6,
            "score": win.get("knn_top1", win.get("topk_overlap")), "reason": win.get("reason"),
            "vs_teacher_export": teachers[0]["p50_ms"] / win["p50_ms"] if teachers else None,
            "next": nxt and {"name": nxt["name"], **nxt["vs_fastest"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a pipeline run folder")
    ap.add_argument("--runs", type=int, default=3, help="fresh deploys to make (RUN/deploy-1 ..)")
    ap.add_argument("--reuse", default="", help="comma list of deploy folders in RUN to tabulate instead")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    run = Path(a.run)
    also = ",".join(str(p) for p in sorted((run / "students").glob("*")) if (p / "distill").is_dir())
    t0 = time.time()
    if a.reuse:
        folders = [run / f for f in a.reuse.split(",") if f]
        cmds = []
    else:
        folders = [run / f"deploy-{i + 1}" for i in range(a.runs)]
        cmds = [[sys.executable, "-m", "edgeclr", "deploy", str(run), "--out", str(f)] + (["--also", also] if also else [])
                for f in folders]
        for cmd in cmds:
            subprocess.run(cmd, check=True)
    rows = [summarise(f) for f in folders]
    same = len({r["shipped"] for r in rows}) == 1
    m = machine()
    lines = [f"# deploy_stability: {len(rows)} deploys of `{run}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; edgeclr {m.get('git', '')}; {time.strftime('%Y-%m-%d')}.",
             "Command: `python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) + "`"
             + (f"; each deploy: `edgeclr deploy {run} --out RUN/deploy-N" + (f" --also {also}`" if also else "`") if cmds else
                " (deploy folders made earlier)") + ".", "",
             "| deploy | shipped | p50 ms | size MB | score | vs the teacher's export | the next fastest, its ratio (95% interval) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["next"]
        lines.append(f"| {r['deploy']} | `{r['shipped']}` | {r['p50_ms']:.3f} | {r['size_mb']:.2f} | {r['score']:.3f} | "
                     f"{r['vs_teacher_export']:.2f}x | " + (f"`{n['name']}` {n['ratio']:.2f}x ({n['low']:.2f}-{n['high']:.2f})" if n else "")
                     + " |")
    lines += ["", f"**{'The same file every time' if same else 'The shipped file changed'}** ({len({r['shipped'] for r in rows})} "
                  f"distinct of {len(rows)}); {time.time() - t0:.0f} s."]
    md = record_path("deploy_stability", a.tag)
    md.write_text("\n".join(lines) + "\n")
    record_path("deploy_stability", a.tag, "json").write_text(json.dumps({"machine": m, "run": str(run), "rows": rows,
                                                                            "same_file": same}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
