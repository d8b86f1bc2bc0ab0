"""Structural pruning with torch-pruning's dependency graph, and pickle-free replay of a pruning plan.

    prune_step(model, x, ratio) -> history;  apply_pruning(fresh model, {"history": ...}) -> same model

Channels are removed consistently through residuals and squeeze-excitation blocks, widths stay
multiples of 8, and the layer that writes the embedding keeps its width. Each call builds a fresh
pruner on the current weights; the histories of successive calls replay in order on a freshly
built model (docs/compression.md).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from edgeclr import checkpoint, config, models
from edgeclr.distill import DistillTrainer
from edgeclr.engine import exit_for_signal, fit, set_layout
from edgeclr.errors import CompressError
from edgeclr.heldout import recalibrate_bn
from edgeclr.loading import load_data, load_encoder
from edgeclr.models import Encoder, count_params, example_input, model_from_checkpoint, torch_pruning
from edgeclr.runtime import Preprocess

log = logging.getLogger(__package__)  # compress's logger: one name for the whole stage
WORK = "prune.pt"  # the checkpoint of a pruning run in progress (resumable; not yet a stage result)


def protected_layers(model: Encoder) -> list[nn.Module]:
    """Layers whose output channels pruning must keep: the one that writes the embedding (the neck,
    or the backbone's last conv when there is no neck) and the projection head."""
    keep = list(model.head.modules())
    if isinstance(model.neck, nn.Linear):
        keep.append(model.neck)
    else:
        convs = [m for m in model.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        keep.append(convs[-1])
    return keep


def count_macs(model: Encoder, x: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one image shaped like x[0] through model.embed."""
    return models.count_macs(model, tuple(x.shape[1:])), count_params(model)


def _pruner(model: Encoder, x: torch.Tensor, ratio: float, global_pruning: bool):
    tp = torch_pruning()
    return tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                iterative_steps=1, ignored_layers=protected_layers(model), round_to=8,
                                global_pruning=global_pruning)


def ratio_for_macs(model: Encoder, x: torch.Tensor, target_macs: float, global_pruning: bool, tol: float = 0.01) -> float:
    """The channel ratio that brings model's MACs to target_macs (bisection on copies)."""
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model).eval()
        with torch.enable_grad():
            _pruner(m, x, mid, global_pruning).step()
        macs = count_macs(m, x)[0]
        if abs(macs - target_macs) <= tol * target_macs:
            return mid
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return hi


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def step_summary(model: Encoder, x: torch.Tensor, ratio: float, channels_before: int, base_macs: float,
                 goal: float | None) -> str:
    """What a pruning step did, in channels and MACs; says so when it overshot its MAC goal (widths go
    in multiples of 8, so on a narrow network the smallest cut can take more than the step asked)."""
    macs, params = count_macs(model, x)
    after = conv_channels(model)
    msg = (f"channel ratio {ratio:.3g}, {channels_before - after} of {channels_before} conv channels removed -> "
           f"{macs / 1e6:.2f}M MACs ({100 * macs / base_macs:.0f}% of {base_macs / 1e6:.2f}M), {params / 1e6:.2f}M parameters")
    if goal is not None and macs < 0.95 * goal:
        msg += (f"; below this step's goal of {goal / 1e6:.2f}M ({100 * goal / base_macs:.0f}%): channels go in multiples "
                "of 8 and the smallest cut takes more (fewer --prune-steps, or a wider model, gives finer steps)")
    return msg


def prune_step(model: Encoder, x: torch.Tensor, ratio: float, global_pruning: bool) -> list:
    """Remove a `ratio` of the prunable channels of model in place; returns this step's history."""
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            pruner = _pruner(model, x, ratio, global_pruning)
            pruner.step()
    finally:
        model.train(was)
    return [list(h) for h in pruner.pruning_history()]


def pruning_plan(history: list, steps_done: int, info: dict) -> dict:
    import torchvision

    return {"history": history, "steps_done": steps_done, "torch_pruning": torch_pruning().__version__,
            "torchvision": torchvision.__version__, **info}


class PruneTrainer(DistillTrainer):
    """The recovery after a pruning step: distillation whose checkpoint carries the pruning plan so far."""

    def __init__(self, *args, history: list, info: dict, prune_step: int, ckpt_path: Path, **kw):
        super().__init__(*args, **kw)
        self.history, self.info, self.prune_step = history, info, prune_step
        self.stage, self.ckpt_path = "compress", ckpt_path

    def state(self):
        st = super().state()
        st["pruning"] = pruning_plan(self.history, self.prune_step, self.info)
        return st


def recovery_config(cfg, sck: dict, tpath: Path, tck: dict, pp: Preprocess) -> config.DistillConfig:
    """The distillation config of the recovery: the student's own, with compress's epochs, lr,
    seed and device, and the teacher's data unless --data is given."""
    fields = config.DistillConfig.__dataclass_fields__
    dcfg = config.DistillConfig(**{k: v for k, v in (sck.get("config") or {}).items() if k in fields})
    dcfg.teacher, dcfg.out, dcfg.resume = str(tpath), cfg.out, False
    dcfg.epochs = max(cfg.recover_epochs, 1)  # the schedule's length; no training at all when recover_epochs is 0
    dcfg.lr = cfg.recover_lr or dcfg.lr
    dcfg.knn_every, dcfg.cache_teacher, dcfg.device = 0, False, cfg.device
    dcfg.fit_minutes = cfg.fit_minutes / max(cfg.prune_steps, 1)  # the student's own distillation budget does not carry over
    for k in ("seed", "progress", "tensorboard", "threads"):
        setattr(dcfg, k, getattr(cfg, k))
    if cfg.data:
        dcfg.data = cfg.data
    return dcfg.resolve(tck.get("config") or {}, pp.input_size)


def step_ratio(cfg, student: Encoder, x: torch.Tensor, k: int, base_macs: float) -> tuple[float, float | None]:
    """(channel ratio, MAC goal or None) of pruning step k: with a MAC target, step k reaches (k+1)/steps
    of the way to it; with a channel ratio, the schedule is relative to the unpruned widths."""
    if cfg.target_macs is not None:
        goal = base_macs - (base_macs - cfg.target_macs * base_macs) * (k + 1) / cfg.prune_steps
        cur = count_macs(student, x)[0]
        return (ratio_for_macs(student, x, goal, cfg.global_pruning) if cur > goal * 1.01 else 0.0), goal
    done, want = cfg.prune_ratio * k / cfg.prune_steps, cfg.prune_ratio * (k + 1) / cfg.prune_steps
    return 1 - (1 - want) / (1 - done), None


def recover(cfg, tr: PruneTrainer, k: int, deadline: float | None) -> None:
    """Distil the pruned student from the teacher (cfg.recover_epochs), then re-estimate its BatchNorm."""
    if cfg.recover_epochs:
        completed, _ = fit(tr, tr.distill_loss, None, deadline)
        exit_for_signal(tr.stop_signal)
        if not completed:
            raise CompressError(f"--max-minutes {cfg.max_minutes} ran out during the recovery after pruning step {k + 1}/"
                                f"{cfg.prune_steps}; its checkpoint is {tr.ckpt_path}: run the same command with --resume")
    else:
        tr.save()
    if tr.cfg.bn_recalibrate:  # the recovered student's statistics, on clean images (see heldout.recalibrate_bn)
        recalibrate_bn(tr.model, tr.ds, tr.pp, tr.device, tr.cfg.bn_recalibrate, cfg.seed)
        tr.save()


def level_checkpoint(stage_dir: Path, step: int) -> Path:
    """The recovered model after pruning step `step` (of several): compress/checkpoints/step{step}.pt."""
    return Path(stage_dir) / "checkpoints" / f"step{step}.pt"


def keep_level(ckpt_path: Path, step: int) -> None:
    """Copy the checkpoint of the recovered model after `step` beside it, atomically."""
    dest = level_checkpoint(ckpt_path.parent.parent, step)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, dest)


def prune_and_recover(cfg, student, sck, spath, device, stage_dir, resume_from) -> tuple[Encoder, dict, Path]:
    """Prune in cfg.prune_steps steps, recovering by distillation after each; (model, plan, checkpoint)."""
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    tpath = cfg.teacher or (sck.get("teacher") or {}).get("path")
    if not tpath:
        raise config.ConfigError(f"{spath} does not record its teacher: pass --teacher (the `edgeclr train` run)")
    teacher, tck, tpath = load_encoder(tpath, device, role="teacher")
    pp = Preprocess.from_dict(sck["preprocess"])
    x = example_input(student, pp).to(device)
    base_macs, base_params = count_macs(student, x)

    history, first_step, resumed = list((sck.get("pruning") or {}).get("history", [])), 0, None
    if resume_from is not None:
        resumed, resume_from = checkpoint.load_for_resume(resume_from, map_location=device)
        student = model_from_checkpoint(resumed).to(device)
        history = list(resumed["pruning"]["history"])
        first_step = resumed["pruning"]["steps_done"] - 1

    dcfg = recovery_config(cfg, sck, tpath, tck, pp)
    ds, _ = load_data(dcfg)
    teacher_info = {"path": str(Path(tpath).resolve()), "sha256": checkpoint.sha256(tpath), "spec": tck["spec"],
                    "embed_dim": teacher.embed_dim}
    info = {"base_macs": base_macs, "base_params": base_params, "steps": cfg.prune_steps, "prune_ratio": cfg.prune_ratio,
            "target_macs": cfg.target_macs, "global_pruning": cfg.global_pruning, "recover_epochs": cfg.recover_epochs}
    ckpt_path = stage_dir / "checkpoints" / WORK  # becomes last.pt once the pruned model passes its checks
    for k in range(first_step, cfg.prune_steps):
        if resumed is None or k > first_step:
            ratio, goal = step_ratio(cfg, student, x, k, base_macs)
            channels = conv_channels(student)
            if ratio > 0:
                history += prune_step(student, x, ratio, cfg.global_pruning)
            log.info("prune step %d/%d: %s", k + 1, cfg.prune_steps, step_summary(student, x, ratio, channels, base_macs, goal))
        student = set_layout(dcfg, student, device)  # pruning replaces the parameters: the layout rule again
        adapter = nn.Identity() if student.embed_dim == teacher.embed_dim else nn.Linear(student.embed_dim, teacher.embed_dim)
        tr = PruneTrainer(dcfg, student, adapter, teacher, ds, pp, device, stage_dir, teacher_info,
                          history=history, info=info, prune_step=k + 1, ckpt_path=ckpt_path)
        if resumed is not None and k == first_step:
            tr.restore(resumed, resume_from)
            if "adapter" in resumed and not isinstance(adapter, nn.Identity):
                adapter.load_state_dict(resumed["adapter"])
        recover(cfg, tr, k, deadline)
        if k + 1 < cfg.prune_steps:  # an intermediate pruning level, recovered: a deployment candidate (edgeclr deploy)
            keep_level(ckpt_path, k + 1)
    macs, params = count_macs(student, x)
    info.update(macs=macs, params=params, mac_ratio=macs / base_macs, param_ratio=params / base_params)
    return student.eval(), pruning_plan(history, cfg.prune_steps, info), ckpt_path
