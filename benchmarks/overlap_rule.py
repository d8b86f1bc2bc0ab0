"""What top-10 neighbour overlap with the teacher corresponds to 1.5 kNN points? The label-free rule
of `edgeclr deploy` (`--min-overlap`, for data without labels) checked on labelled data.

On a run with labels, a family of real models of graded quality is scored both ways, with deploy's
own scorer (deploy.Quality: the held-out kNN against the teacher's, and the top-10 neighbour overlap
with the teacher on the same held-out images):

- the run's distilled student, the pipeline's other students (RUN/students/*/distill) and every
  pruned level compress recovered (RUN/compress/checkpoints);
- the student with a share of its channels pruned away and no recovery (10% to 60%);
- students distilled from the same teacher for fewer epochs (`edgeclr distill --epochs E`);
- the student's architecture at random initialisation.

For each overlap threshold t the record gives how many models at or above t lose more than 1.5
points (a false accept) and how many within 1.5 points fall below it (a false reject); the
threshold the default should be is the lowest t with no false accept.

    python benchmarks/overlap_rule.py --run runs/digits --tag digits-CPU             # a demo run
    python benchmarks/overlap_rule.py --run runs/bench-fmnist --epochs 1,2 --tag fashion-mnist-CPU

Writes benchmarks/results/overlap_rule/<tag or latest>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, record_path  # noqa: E402
from edgeclr import config  # noqa: E402
from edgeclr.compress import prune  # noqa: E402
from edgeclr.deploy import Quality  # noqa: E402
from edgeclr.heldout import overlap_draws  # noqa: E402
from edgeclr.loading import find_checkpoint, load_encoder  # noqa: E402
from edgeclr.models import create_model  # noqa: E402

BUDGET = 1.5  # deploy's default --max-drop


def score(quality: Quality, model) -> dict:
    """kNN drop against the teacher and top-10 overlap with it: what deploy.Quality.score computes
    for an exported file, here on the torch model (the same held-out images and teacher reference)."""
    s = quality.held.score(model.embed, quality.ref, 256)
    return {"knn_top1": s["knn_top1"], "drop": quality.ref["knn_top1"] - s["knn_top1"], "topk_overlap": s["topk_overlap"]}


def models(run: Path, epochs: list[int], ratios: list[float], work: Path, seed: int):
    """(name, torch model) of the graded family."""
    student, sck, spath = load_encoder(find_checkpoint(run, "student"), "cpu", role="student")
    yield "student", student
    for d in sorted((run / "students").glob("*/distill")):  # the pipeline's ladder of students
        if (d / "checkpoints" / "last.pt").is_file():
            yield f"ladder student {d.parent.name}", load_encoder(d, "cpu", role="student")[0]
    for f in sorted((run / "compress" / "checkpoints").glob("step*.pt")) + [run / "compress" / "checkpoints" / "last.pt"]:
        if f.is_file():
            yield f"pruned {f.stem} (recovered)", load_encoder(f, "cpu")[0]
    x = torch.zeros(2, student.spec.in_chans, sck["preprocess"]["input_size"], sck["preprocess"]["input_size"])
    for r in ratios:
        m = copy.deepcopy(student).eval()
        prune.prune_step(m, x, r, False)
        yield f"student, {round(r * 100)}% channels pruned, no recovery", m.eval()
    scfg = sck["config"]
    for e in epochs:
        out = work / f"e{e}"
        cmd = [sys.executable, "-m", "edgeclr", "distill", "--teacher", str(run / "train"), "--out", str(out),
               "--model", sck["spec"]["name"], "--epochs", str(e), "--seed", str(seed)]
        for k in ("width", "stem_stride", "lr", "batch_size"):
            if scfg.get(k) is not None:
                cmd += [f"--{k.replace('_', '-')}", str(scfg[k])]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        yield f"student distilled {e} epoch(s)", load_encoder(out / "distill", "cpu")[0]
    torch.manual_seed(seed)
    yield "student architecture, random init", create_model(student.spec).eval()


def thresholds(rows: list[dict]) -> list[dict]:
    out = []
    for t in sorted({round(r["topk_overlap"], 3) for r in rows} | {0.3, 0.4, 0.5, 0.6}):
        out.append({"min_overlap": t,
                    "false_accepts": sum(r["topk_overlap"] >= t and r["drop"] > BUDGET for r in rows),
                    "false_rejects": sum(r["topk_overlap"] < t and r["drop"] <= BUDGET for r in rows)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with a teacher (train/) and a distilled student (distill/), labelled data")
    ap.add_argument("--epochs", default="1,2,4", help="short distillations from the same teacher")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.45,0.6", help="channel shares pruned without recovery")
    ap.add_argument("--eval-images", type=int, default=10000, help="as deploy --eval-images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    t0 = time.time()
    run = Path(a.run)
    teacher_ckpt = find_checkpoint(run, "teacher")
    quality = Quality.open(config.DeployConfig(run=str(run), eval_images=a.eval_images, seed=a.seed), teacher_ckpt)
    if not quality.labeled:
        sys.exit(f"{run}'s data has no labels: the rule is checked on labelled data")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        epochs = [int(e) for e in a.epochs.split(",") if e]
        ratios = [float(r) for r in a.ratios.split(",") if r]
        for name, m in models(run, epochs, ratios, Path(work), a.seed):
            with torch.no_grad():
                row = {"model": name, **score(quality, m)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    th = thresholds(rows)
    losing = [r["topk_overlap"] for r in rows if r["drop"] > BUDGET]
    # the lowest threshold with no false accept: just above the highest overlap of a model losing more than the budget
    safe = round(max(losing) + 0.0005, 3) if losing else min(r["topk_overlap"] for r in rows)
    within = [r["topk_overlap"] for r in rows if r["drop"] <= BUDGET]
    draws = overlap_draws(len(quality.held.query_y))
    res = {"benchmark": "overlap_rule", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": "python " + shlex.join(sys.argv), "run": str(run),
           "teacher_knn_top1": quality.ref["knn_top1"], "bank_images": len(quality.held.bank_y),
           "query_images": len(quality.held.query_y), "overlap_images": draws[0], "overlap_samples": draws[1], "budget_points": BUDGET, "rows": rows, "thresholds": th,
           "lowest_safe_min_overlap": safe,
           "highest_overlap_losing_budget": max(losing) if losing else None, "lowest_overlap_within_budget": min(within) if within else None,
           "wall_time_s": round(time.time() - t0, 1)}
    record_path("overlap_rule", a.tag, "json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Top-10 overlap against kNN drop{' (' + a.tag + ')' if a.tag else ''}", "",
          f"Measured {res['date']} on {res['machine']['cpu']} ({res['machine']['cores']} cores). `{res['command']}`", "",
          f"Teacher kNN {res['teacher_knn_top1']:.2f}% ({res['bank_images']} bank / {res['query_images']} query images); "
          f"top-10 overlap: mean over {res['overlap_samples']} seeded samples of {res['overlap_images']} query images "
          "(edgeclr.heldout.agreement, as deploy computes it).", "",
          "| model | kNN % | drop (points) | top-10 overlap | within 1.5 points |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["topk_overlap"]):
        md.append(f"| {r['model']} | {r['knn_top1']:.2f} | {r['drop']:.2f} | {r['topk_overlap']:.3f} | "
                  f"{'yes' if r['drop'] <= BUDGET else 'no'} |")
    md += ["", "| --min-overlap | models >= it losing > 1.5 points | models < it within 1.5 points |", "|---|---|---|"]
    md += [f"| {t['min_overlap']:.3f} | {t['false_accepts']} | {t['false_rejects']} |" for t in th]
    md += ["", f"Highest overlap of a model losing more than 1.5 points: {max(losing) if losing else float('nan'):.3f}, so the "
               f"lowest threshold with no false accept is **{safe}**; lowest overlap of a model within 1.5 points: "
               f"{res['lowest_overlap_within_budget']:.3f}."]
    record_path("overlap_rule", a.tag, "md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
