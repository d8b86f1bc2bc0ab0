"""Which stage of a Fashion-MNIST teacher holds the best features for kNN? Weighted kNN (k=20,
cosine, T=0.1; 60,000-image bank, 10,000 test queries) on the globally pooled output of layer2,
layer3 and layer4, on the embedding as it is, centred, and standardised, and on the projection.

    python benchmarks/layer_probe.py runs/bench-fmnist

This probe is why `--last-stride 1` exists: with a 2x2 last stage at 28 px, layer3's pooled
features beat the final embedding (results/layer_probe/latest.md).
"""

from __future__ import annotations

import sys

import torch

from edgeclr import data
from edgeclr.heldout import embed, eval_inputs, knn_accuracy
from edgeclr.loading import load_encoder
from edgeclr.runtime import Preprocess


def main():
    torch.set_num_threads(2)
    model, ckpt, path = load_encoder(sys.argv[1], "cpu")
    pp = Preprocess.from_dict(ckpt["preprocess"])
    spec = ckpt["config"].get("data", "fashion-mnist")
    tr, te = data.open_dataset(spec, "train"), data.open_dataset(spec, "test")
    xtr, _ = eval_inputs(tr, pp)
    xte, _ = eval_inputs(te, pp)
    feats: dict[str, list] = {}
    for n in ("layer2", "layer3", "layer4"):
        getattr(model.backbone, n).register_forward_hook(lambda m, i, o, n=n: feats.setdefault(n, []).append(o.mean((2, 3))))
    f_tr = embed(model.embed, xtr)
    l_tr = {k: torch.cat(v) for k, v in feats.items()}
    feats.clear()
    f_te = embed(model.embed, xte)
    l_te = {k: torch.cat(v) for k, v in feats.items()}
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    print(f"{path}\n| features | dim | kNN top-1 |\n|---|---|---|")
    print(f"| embedding | {f_tr.shape[1]} | {knn_accuracy(f_tr, tr.labels, f_te, te.labels):.2f} |")
    print(f"| embedding, centred | {f_tr.shape[1]} | {knn_accuracy(f_tr - mu, tr.labels, f_te - mu, te.labels):.2f} |")
    print(f"| embedding, standardised | {f_tr.shape[1]} | {knn_accuracy((f_tr - mu) / sd, tr.labels, (f_te - mu) / sd, te.labels):.2f} |")
    for k in l_tr:
        print(f"| {k} pooled | {l_tr[k].shape[1]} | {knn_accuracy(l_tr[k], tr.labels, l_te[k], te.labels):.2f} |")
    print(f"| projection head | {model.spec.head_out} | "
          f"{knn_accuracy(embed(model.project, xtr), tr.labels, embed(model.project, xte), te.labels):.2f} |")


if __name__ == "__main__":
    main()
