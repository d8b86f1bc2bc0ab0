"""Does the top-10 neighbour overlap depend on how many images it is computed on? The label-free
rule of `edgeclr deploy` (`--min-overlap`) compares one number with a fixed threshold; this
measures, for a run's teacher and each of its distilled students, the overlap on seeded samples of
N images of the run's data (mean of 3 samples; all images once).

    python benchmarks/overlap_size.py --run runs/he-lab --data runs/he-labelled/tiles --tag he-CPU

Writes benchmarks/results/overlap_size/<tag or latest>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, write_record  # noqa: E402
from edgeclr import data  # noqa: E402
from edgeclr.heldout import agreement, embed, eval_inputs  # noqa: E402
from edgeclr.loading import load_encoder  # noqa: E402
from edgeclr.runtime import Preprocess  # noqa: E402

MAX_ALL = 10000  # all images as one more N up to this many (the N x N similarities: 400 MB at 10,000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with train/ and distill/ (and the pipeline's students/*/distill)")
    ap.add_argument("--data", required=True, help="the run's data, as --data of edgeclr train")
    ap.add_argument("--sizes", default="200,450,1000,2000", help="sample sizes N (those above the data's size are left out; all images "
                    f"are added up to {MAX_ALL})")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    run = Path(a.run)
    teacher, tck, _ = load_encoder(run / "train", "cpu", role="teacher")
    pp = Preprocess.from_dict(tck["preprocess"])
    x, _ = eval_inputs(data.open_dataset(a.data, "pretrain", base_size=pp.resize_size), pp, None)
    sizes = sorted({n for n in (int(s) for s in a.sizes.split(",") if s) if n < len(x)} | ({len(x)} if len(x) <= MAX_ALL else set()))
    with torch.no_grad():
        ft = embed(teacher.embed, x)
    students = {"distill": run / "distill"} | {d.parent.name: d for d in sorted((run / "students").glob("*/distill"))}
    rows = []
    for name, d in students.items():
        if not (d / "checkpoints" / "last.pt").is_file():
            continue
        model = load_encoder(d, "cpu", role="student")[0]
        with torch.no_grad():
            fs = embed(model.embed, x)
        row = {"student": name, "model": model.spec.name, "width": model.spec.width, "overlap": {}}
        for n in sizes:
            vals = []
            for seed in range(a.samples if n < len(x) else 1):
                idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
                vals.append(agreement(fs[idx], ft[idx], n=None)["topk_overlap"])  # on all N drawn
            row["overlap"][str(n)] = round(float(np.mean(vals)), 3)
        rows.append(row)
    cmd = "python benchmarks/overlap_size.py " + " ".join(sys.argv[1:])
    rec = {"benchmark": "overlap_size", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "command": cmd,
           "images": len(x), "sizes": sizes, "samples": a.samples, "rows": rows}
    md = [f"# Top-10 overlap with the teacher against the number of images ({a.tag or 'latest'})", "",
          f"Measured {rec['date']} on {rec['machine']['cpu']} ({rec['machine']['cores']} cores). `{cmd}`", "",
          f"{len(x)} images of `{a.data}`; each figure is the mean over {a.samples} seeded samples of N images (all of them once, up to {MAX_ALL}).", "",
          "| student | " + " | ".join(f"N = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    md += [f"| {r['student']} ({r['model']}{' w' + str(r['width']) if r['width'] else ''}) | "
           + " | ".join(f"{r['overlap'][str(n)]:.3f}" for n in sizes) + " |" for r in rows]
    write_record("overlap_size", a.tag, rec, md)


if __name__ == "__main__":
    main()
