"""What `edgeclr deploy` ships, against doing without edgeclr: exporting the teacher as it is.

The pipeline from scratch (or an existing run), then the shipped model against the teacher's own
exports, timed in the same interleaved run (1 thread, batch 1), with raw pixels and a random-init
network as the accuracy baselines when the run evaluated them, and the run's few-label curve when it has one.

    python benchmarks/deploy_selection.py --tag demo-CPU                       # the demo preset, fresh (3-8 min on 2 cores)
    python benchmarks/deploy_selection.py --out runs/fm --tag fashion-mnist-CPU  # an existing run (its deploy stage is run if missing)
    python benchmarks/deploy_selection.py --out runs/fm --also runs/fm-r10 --tag T  # with a second student family
    python benchmarks/deploy_selection.py --out runs/he --speedup 3 --tag T    # a run made with `edgeclr pipeline --data ...`

Record: benchmarks/results/deploy_selection/<tag or latest>.{md,json}. The checks are issue 23's:
demo, >= 2x faster than the teacher's export in the same runtime; Fashion-MNIST at 28 px, >= 4x
faster than the better of the teacher's onnxruntime and OpenVINO exports; smaller on disk; within
1.5 kNN points of the teacher.
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
from edgeclr.report import deploy_table, students_table  # noqa: E402


def checks(sel: dict, want_same: float, want_best: float) -> tuple[dict, bool]:
    win = sel["winner"]
    teachers = [r for r in sel["candidates"] if r["level"] == "teacher"]
    same = next(r for r in teachers if r["runtime"] == win["runtime"])
    best = min(teachers, key=lambda r: r["p50_ms"])
    c = {"speedup_vs_teacher_export_same_runtime": same["p50_ms"] / win["p50_ms"],
         "speedup_vs_best_teacher_export": best["p50_ms"] / win["p50_ms"], "best_teacher_export": best["name"],
         "size_vs_teacher_export": win["size_bytes"] / same["size_bytes"], "knn_drop": win.get("drop")}
    ok = (c["speedup_vs_teacher_export_same_runtime"] >= want_same and c["speedup_vs_best_teacher_export"] >= want_best
          and c["size_vs_teacher_export"] < 1 and (win.get("drop") is None or win["drop"] <= 1.5))
    return c, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="run folder (default: a fresh demo run in a temporary folder)")
    ap.add_argument("--tag", default="", help="record name (default: latest)")
    ap.add_argument("--also", default="", help="other runs distilled from the same teacher (edgeclr deploy --also); deploys again")
    ap.add_argument("--speedup", type=float, default=None, help="target over the best teacher export (default: 4 for a "
                                                                "Fashion-MNIST run, 2 otherwise)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edgeclr-demo-")) / "demo"
    t0 = time.time()
    from edgeclr import api

    if not (out / "pipeline.json").exists():
        api.pipeline(out=str(out))
    if args.also or not (out / "deploy" / "selection.json").exists():
        api.deploy(run=str(out), also=args.also or None)
    wall = time.time() - t0
    sel = json.loads((out / "deploy" / "selection.json").read_text())
    state = json.loads((out / "pipeline.json").read_text())
    ev = out / "train" / "eval.json"
    base = {r["key"]: r["knn_top1"] for r in json.loads(ev.read_text())["rows"]} if ev.exists() else {}
    fm = str(state.get("data", "")).startswith("fashion-mnist")
    c, ok = checks(sel, 2.0, args.speedup or (4.0 if fm else 0.0))
    secs = {k: v.get("seconds") for k, v in state["stages"].items()}
    secs.setdefault("deploy", sel.get("wall_time_s"))
    rec = {"machine": machine(), "command": "python benchmarks/deploy_selection.py " + " ".join(sys.argv[1:]),
           "run": str(out), "data": state.get("data"), "wall_s": round(wall, 1), "stage_seconds": secs,
           "baselines_knn": base, "selection": sel, "checks": c, "pass": ok}
    record_path("deploy_selection", args.tag, "json").write_text(json.dumps(rec, indent=2) + "\n")
    m, win = rec["machine"], sel["winner"]
    drop = f"{win['drop']:.2f}" if win.get("drop") is not None else "(unlabeled)"
    lines = [f"# deploy_selection: what `edgeclr deploy` ships on {state.get('data')}, against exporting the teacher", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; edgeclr {m.get('git', '')}; torch {m.get('torch')}.",
             f"Command: `{rec['command']}`; the run's stages: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if v) + ".", ""]
    budget = state.get("budget")
    if budget:  # `edgeclr pipeline --minutes B`: the plan against what the run took
        plan = budget["plan_minutes"]
        lines += [f"Budget: `--minutes {budget['minutes']:g}`, the run took **{budget.get('took_minutes', float('nan')):.2f} min** "
                  f"(training shares: teacher {plan['train']:.2f} min, students {plan['distill']:.2f}, recoveries "
                  f"{plan['compress']:.2f}; the rest {plan['rest']:.2f})"
                  + ("; each stage's share of the time left when it started: " + ", ".join(
                      f"{k} {v:.2f}" for k, v in budget["given_minutes"].items()) if budget.get("given_minutes") else "") + ".", ""]
        rec["budget"] = budget
    if base:
        lines += [f"Baselines (kNN top-1, same held-out images): raw pixels {base.get('pixels', float('nan')):.2f}%, random-init "
                  f"network {base.get('random', float('nan')):.2f}%, the SimCLR teacher {base.get('model', float('nan')):.2f}%.", ""]
    lines += [f"**Shipped:** {sel['summary']}", "",
              "| check | measured | target |", "|---|---|---|",
              f"| speed-up over the teacher's own {win['runtime']} export (same interleaved run) | "
              f"{c['speedup_vs_teacher_export_same_runtime']:.2f}x | >= 2x |",
              f"| speed-up over the faster teacher export (`{c['best_teacher_export']}`) | {c['speedup_vs_best_teacher_export']:.2f}x | "
              f"{'>= 4x' if fm else '-'} |",
              f"| size on disk against the same-runtime export | {c['size_vs_teacher_export']:.2f} | < 1 |",
              f"| kNN points below the teacher | {drop} | <= 1.5 |",
              "", f"Result: {'PASS' if ok else 'FAIL'}.", "", "Every candidate:", "", deploy_table(sel), ""]
    ladder = ((state["stages"].get("distill") or {}).get("summary") or {}).get("ladder") or []
    if len(ladder) > 1:  # the pipeline's student ladder: each student's network, distillation time and score
        lines += ["The students distilled from the teacher (the pipeline's ladder, `pipeline.json`):", "",
                  students_table(ladder, any(r.get("knn_top1") is not None for r in ladder)), ""]
    le = out / "train" / "label_efficiency.md"
    if le.exists():  # the run's few-label curve (eval --label-efficiency): accuracy on the test split, mean ± std over draws
        d = json.loads(le.with_suffix(".json").read_text())
        rec["label_efficiency"] = d
        lines += [f"The few-label curve of the teacher (`{le.relative_to(out)}`: {d['draws']} draws of the labelled images per level, "
                  f"{d['query_images']} test images, full fine-tuning {d['finetune_steps']} steps):", "", le.read_text().rstrip(), ""]
        record_path("deploy_selection", args.tag, "json").write_text(json.dumps(rec, indent=2) + "\n")
    record_path("deploy_selection", args.tag, "json").write_text(json.dumps(rec, indent=2) + "\n")
    record_path("deploy_selection", args.tag).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
