"""kNN accuracy of checkpoints before and after re-estimating their BatchNorm statistics on clean
training images (edgeclr.heldout.recalibrate_bn, which `edgeclr distill` and `compress` now run).

    python benchmarks/bn_recalibration.py RUN/distill RUN/compress RUN/train ...

Each checkpoint is evaluated as saved, then after the re-estimation on 2,048 clean images of its
own training set (weighted kNN, k=20, T=0.1, the dataset's labeled train/test splits). Writes
benchmarks/results/bn_recalibration/latest.{json,md}.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, record_path  # noqa: E402

HERE = Path(__file__).parent


def main():
    from edgeclr import data
    from edgeclr.heldout import embed, eval_inputs, knn_accuracy, recalibrate_bn
    from edgeclr.loading import load_encoder
    from edgeclr.runtime import Preprocess

    rows = []
    for target in sys.argv[1:]:
        m, ck, path = load_encoder(target, "cpu")
        pp = Preprocess.from_dict(ck["preprocess"])
        spec = ck["config"]["data"]
        tr, te = data.open_dataset(spec, "train"), data.open_dataset(spec, "test")
        xtr, ktr = eval_inputs(tr, pp)
        xte, kte = eval_inputs(te, pp)

        ytr, yte = tr.labels[ktr], te.labels[kte]
        before = knn_accuracy(embed(m.eval().embed, xtr), ytr, embed(m.embed, xte), yte)
        m2 = copy.deepcopy(m)
        recalibrate_bn(m2, data.open_dataset(spec, "pretrain"), pp, "cpu", 2048, 0)  # its training images
        rows.append({"checkpoint": str(path), "stage": ck["stage"], "model": ck["spec"]["name"], "data": spec,
                     "knn_as_saved": round(before, 2), "knn_recalibrated": round(knn_accuracy(embed(m2.eval().embed, xtr), ytr, embed(m2.embed, xte), yte), 2)})
        print(rows[-1], flush=True)
    res = {"machine": machine(), "command": shlex.join(["python", "benchmarks/bn_recalibration.py", *sys.argv[1:]]), "rows": rows}
    record_path("bn_recalibration", ext="json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# BatchNorm statistics re-estimated on clean images: kNN before and after", "", "```", res["command"], "```", "",
          "| checkpoint | stage | model | data | kNN as saved | kNN re-estimated |", "|---|---|---|---|---|---|"]
    md += [f"| `{r['checkpoint']}` | {r['stage']} | {r['model']} | {r['data']} | {r['knn_as_saved']:.2f} | {r['knn_recalibrated']:.2f} |"
           for r in rows]
    record_path("bn_recalibration").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
