"""The few-label linear probe's C: fixed values against the C cross-validated on the labelled
images (heldout.probe_c, what `edgeclr finetune` and the few-label curve use), on one encoder's
features, over the curve's own draws of the labelled images (finetune.curve_draw, seeds 0..draws-1, every
drawn label trains the probe), tested on the whole test split.

    python benchmarks/probe_c.py runs/bench-fmnist/train --levels 10,100 --tag xeon-avx512

Writes benchmarks/results/probe_c/<tag or latest>.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_record  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a run folder, stage folder or checkpoint (loading.load_encoder)")
    ap.add_argument("--data", default="", help="labelled data (default: the checkpoint's)")
    ap.add_argument("--levels", default="10,100", help="labelled images per class")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--cs", default="0.01,0.03,0.1,0.3,1", help="the fixed C values")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()

    from edgeclr.finetune import curve_draw
    from edgeclr.heldout import HeldOut, fit_linear
    from edgeclr.loading import load_encoder
    from edgeclr.runtime import Preprocess

    t0 = time.time()
    enc, sck, path = load_encoder(a.source, "cpu")
    pp, run_cfg = Preprocess.from_dict(sck["preprocess"]), sck.get("config") or {}
    held = HeldOut.open(a.data or run_cfg["data"], pp, run_cfg, 0)
    fb, fq = (t.numpy() for t in held.features(enc.embed))
    yb, yq = held.bank_y.numpy(), held.query_y.numpy()
    levels, cs = [int(v) for v in a.levels.split(",")], [float(v) for v in a.cs.split(",")]
    cells: dict[str, dict[int, list[float]]] = {}
    chosen: dict[int, list[float]] = {}
    for n in levels:
        for s in range(a.draws):
            _, _, e = curve_draw(yb, n, s)
            for c in [None, *cs]:
                clf = fit_linear(fb[e], yb[e], s, c)
                acc = 100.0 * float((clf.predict(fq) == yq).mean())
                cells.setdefault("CV (probe_c)" if c is None else f"C = {c:g}", {}).setdefault(n, []).append(acc)
                if c is None:
                    chosen.setdefault(n, []).append(float(clf[-1].C))
        print(f"{n} per class done ({time.time() - t0:.0f} s)", flush=True)

    rows = {k: {n: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for n, v in pts.items()} for k, pts in cells.items()}
    rec = {"benchmark": "probe_c", "machine": machine(), "command": shlex.join(["python"] + sys.argv), "source": str(path),
           "draws": a.draws, "levels": levels, "rows": rows, "cv_chosen_c": chosen, "wall_s": round(time.time() - t0, 1)}
    md = [f"# The few-label linear probe's C{' (' + a.tag + ')' if a.tag else ''}", "",
          f"Machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores, torch {rec['machine'].get('torch')}.",
          f"Command: `{rec['command']}` ({rec['wall_s'] / 60:.1f} min). Encoder: `{path}`; {len(yq)} test images; "
          f"{a.draws} draws of the labelled images per level (the few-label curve's draws).", "",
          "| probe | " + " | ".join(f"{n} / class" for n in levels) + " |", "|---|" + "---|" * len(levels)]
    for k, pts in rows.items():
        md.append(f"| {k} | " + " | ".join(f"{pts[n]['mean']:.2f} ± {pts[n]['std']:.2f}" for n in levels) + " |")
    md += ["", "C chosen by the cross-validation, per draw: " + "; ".join(f"{n} per class {chosen[n]}" for n in levels), ""]
    write_record("probe_c", a.tag, rec, md)


if __name__ == "__main__":
    main()
