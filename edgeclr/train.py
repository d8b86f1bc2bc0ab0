"""SimCLR pretraining: `edgeclr train`.

    loading.load_data -> build_model -> SimCLRTrainer (engine.Trainer + NT-Xent) -> engine.fit -> manifest

The training engine (optimiser, schedule, epoch loop, checkpoints, signals) is edgeclr.engine's,
shared with distillation and compress's recovery.

Resume is exact: the data order is a function of (seed, epoch) and every view's augmentation of
(seed, epoch, step, view), so a run restarted from a checkpoint written after step s of epoch e
sees exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from edgeclr import checkpoint, config, data, faults
from edgeclr import distributed as dist_
from edgeclr.augment import view_generator
from edgeclr.engine import Trainer, build_monitor, exit_for_signal, fit, prepare_stage_dir, resolve_device, set_layout, write_fit_manifest
from edgeclr.loading import load_data
from edgeclr.lock import hold
from edgeclr.losses import nt_xent
from edgeclr.models import Encoder, ModelSpec, count_params, create_model, describe

log = logging.getLogger("edgeclr.train")


def build_model(cfg, channels: int) -> Encoder:
    resnet = cfg.model.startswith("resnet")  # a preset's ResNet width / last stride mean nothing to a MobileNet
    spec = ModelSpec(cfg.model, in_chans=channels, stem_stride=cfg.stem_stride, width=cfg.width if resnet else None,
                     last_stride=cfg.last_stride if resnet and cfg.last_stride != 2 else None,
                     head_hidden=cfg.head_hidden, head_out=cfg.head_out)
    try:
        return create_model(spec)
    except ValueError as e:  # unknown name, bad stem/width: the user's option to fix
        raise config.ConfigError(str(e)) from e


class SimCLRTrainer(Trainer):
    """engine.Trainer with SimCLR's objective: NT-Xent over two augmented views of each image."""

    def simclr_loss(self, x: torch.Tensor, indices=None) -> torch.Tensor:
        """x: (B, C, H, W) uint8 -> NT-Xent over its two augmented views."""
        cfg = self.cfg
        rank = self.dist.rank
        v1 = self.augment(x, view_generator(cfg.seed, self.epoch, self.step, 0, rank))
        v2 = self.augment(x, view_generator(cfg.seed, self.epoch, self.step, 1, rank))
        v = torch.cat([v1, v2])  # (2B, C, S, S): one forward, BN statistics over both views
        v = faults.poison_batch(v, self.stage, self.global_step, rank)
        if cfg.channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            z = self.project(v)  # (2B, P)
        z1, z2 = z.float().chunk(2)
        if self.dist.enabled:  # this rank's anchors against the negatives of the whole global batch
            return nt_xent(z1, z2, cfg.temperature, gather=dist_.gather_with_grad, rank=rank)
        return nt_xent(z1, z2, cfg.temperature)


def main(cfg: config.TrainConfig) -> dict:
    """`edgeclr train`: pretrain, checkpoint, monitor, and write the run folder.

    Under torchrun (WORLD_SIZE > 1) every process runs this: the process group is joined here and
    left at the end.
    """
    d = dist_.init(cfg.device)
    try:  # one writer per run folder: rank 0 holds it, and no rank writes before it does
        with hold(cfg.out, "the run folder", is_dir=True, rank0_only=True):
            dist_.barrier(d)
            return _main(cfg, d)
    finally:
        dist_.shutdown()


def _main(cfg: config.TrainConfig, d: dist_.Dist) -> dict:
    t0 = time.time()
    if d.enabled and not d.is_main:
        logging.getLogger("edgeclr").setLevel(logging.WARNING)  # rank 0 speaks for the run
    if d.enabled and cfg.batch_size % d.world:
        raise config.ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over the "
                                 f"{d.world} processes: use a multiple of {d.world}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.enabled and not torch.cuda.is_available():  # the machine's cores shared among its processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))
    device = resolve_device(cfg.device, d)
    if cfg.sync_bn and device.type != "cuda":
        raise config.ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation); drop --sync-bn")
    stage_dir = Path(cfg.out) / "train"
    resume_from = prepare_stage_dir(stage_dir, cfg.resume)

    ds, pp = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, ds.channels).to(device)
    if cfg.sync_bn and d.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = set_layout(cfg, model, device)
    if resume_from is not None:  # weights before DDP wraps the model, so every rank starts from them
        ckpt, resume_from = checkpoint.load_for_resume(resume_from, map_location=device)
    tr = SimCLRTrainer(cfg, "train", model, ds, pp, device, stage_dir, dist=d)
    if resume_from is not None:
        tr.restore(ckpt, resume_from)
        log.info("resumed from %s at epoch %d step %d", resume_from, tr.epoch, tr.step)
    if d.is_main:
        config.save_yaml(cfg, stage_dir / "config.yaml")
    monitor = build_monitor(cfg, pp) if d.is_main else None

    log.info("%s: %d images, %d steps/epoch x %d epochs; %s with %.1fM parameters at %d px on %s%s", ds.name, len(ds),
             tr.steps_per_epoch, cfg.epochs, describe(model.spec.to_dict()), count_params(model) / 1e6, cfg.input_size, device,
             f" x {d.world} processes ({d.backend}), {cfg.batch_size // d.world} images each per step" if d.enabled else "")
    if config.data_kind(cfg.data) == "folder" and (fitted := data.folder_input_size(str(cfg.data))) and fitted[0] == cfg.input_size:
        log.info("%s", fitted[1])
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
    completed, train_s = fit(tr, tr.simclr_loss, monitor, deadline)
    final = dict(tr.last_metrics)
    if d.is_main:
        write_fit_manifest(stage_dir, "train", tr, model, pp,
                           {"data": ds.fingerprint(), "resumed_from": str(resume_from) if resume_from else None}, final, t0,
                           completed, train_s, world_size=d.world, augment=tr.aug_cfg.to_dict())
    dist_.barrier(d)  # no rank leaves before rank 0 has written
    exit_for_signal(tr.stop_signal, d.enabled)
    return {"stage_dir": str(stage_dir), "checkpoint": str(tr.ckpt_path), "completed": completed, **final}
