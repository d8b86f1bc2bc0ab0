"""One optimiser step of edgeclr's distributed SimCLR, checked against a single-process reference.

Run under torchrun (tests/test_distributed.py does):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT.json

Every rank builds the same model and the real Trainer (DDP, gather_with_grad, sharded digits
batch, per-rank augmentations) and takes one step. Rank 0 also computes the reference in one
process: the same global batch (each rank's shard forwarded on its own, as DDP does without
SyncBatchNorm), NT-Xent over all 2N views at once, one step of the same optimiser. A third
model takes the step with a gather *without* gradient (the common mistake) to show that the
comparison would catch it. Rank 0 writes the differences to OUT.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from edgeclr import config, data
from edgeclr import distributed as dist_
from edgeclr.augment import view_generator
from edgeclr.loading import load_data
from edgeclr.losses import nt_xent
from edgeclr.train import SimCLRTrainer as Trainer
from edgeclr.train import build_model


def naive_gather(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient, re-inserting the local rows: loses the other ranks' gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def main(out: str) -> None:
    d = dist_.init("cpu")
    torch.set_num_threads(1)
    cfg = config.TrainConfig(data="digits", out=str(Path(out).parent / "unused"), width=8, input_size=16, batch_size=32,
                             epochs=1, optimizer="sgd", lr=0.5, weight_decay=0.0, momentum=0.9, warmup_epochs=0.0,
                             channels_last=False, tensorboard=False, knn_every=0, device="cpu")
    ds, pp = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds.channels)
    ref_model, naive_model = copy.deepcopy(model), copy.deepcopy(model)

    def one_step(m):
        tr = Trainer(cfg, "train", m, ds, pp, torch.device("cpu"), Path(out).parent, dist=d)
        _, x, _, idx = next(data.iterate_batches(ds, cfg.batch_size, cfg.seed, 0, 0, 0, d.rank, d.world))
        loss = tr.simclr_loss(x, idx)
        tr.optimise(loss)
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        return dist_.all_mean(loss.item(), d, torch.device("cpu")), grads, {n: p.detach().clone() for n, p in m.named_parameters()}, len(x)

    loss_d, grads_d, weights_d, local = one_step(model)
    real_gather = dist_.gather_with_grad
    dist_.gather_with_grad = naive_gather
    try:
        loss_n, grads_n, weights_n, _ = one_step(naive_model)
    finally:
        dist_.gather_with_grad = real_gather

    if d.is_main:  # the single-process reference on the same global batch
        tr = Trainer(cfg, "train", ref_model, ds, pp, torch.device("cpu"), Path(out).parent)
        batch = data.epoch_batches(len(ds), cfg.batch_size, cfg.seed, 0)[0]  # the first global batch
        z1s, z2s = [], []
        for r in range(d.world):
            idx = data.shard_batches([batch], r, d.world)[0]
            x = torch.as_tensor(ds.load_batch(idx)[0]).permute(0, 3, 1, 2)
            v1 = tr.augment(x, view_generator(cfg.seed, 0, 0, 0, r))
            v2 = tr.augment(x, view_generator(cfg.seed, 0, 0, 1, r))
            z = ref_model.project(torch.cat([v1, v2]))  # one forward per shard: BatchNorm statistics as on rank r
            z1, z2 = z.chunk(2)
            z1s.append(z1)
            z2s.append(z2)
        loss_r = nt_xent(torch.cat(z1s), torch.cat(z2s), cfg.temperature)
        tr.optimise(loss_r)
        grads_r = {n: p.grad for n, p in ref_model.named_parameters()}
        weights_r = {n: p.detach() for n, p in ref_model.named_parameters()}

        def maxdiff(a, b):
            return max(float((a[n] - b[n]).abs().max()) for n in a)

        def relgrad(a, b):
            return max(float((a[n] - b[n]).norm() / (b[n].norm() + 1e-12)) for n in a)

        Path(out).write_text(json.dumps({
            "world": d.world, "local_batch": local, "global_batch": cfg.batch_size,
            "loss_distributed": loss_d, "loss_reference": float(loss_r),
            "grad_maxdiff": maxdiff(grads_d, grads_r), "weight_maxdiff": maxdiff(weights_d, weights_r),
            "grad_reldiff": relgrad(grads_d, grads_r),
            "naive_loss": loss_n, "naive_grad_maxdiff": maxdiff(grads_n, grads_r),
            "naive_grad_reldiff": relgrad(grads_n, grads_r), "naive_weight_maxdiff": maxdiff(weights_n, weights_r),
        }, indent=1))
    dist_.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
