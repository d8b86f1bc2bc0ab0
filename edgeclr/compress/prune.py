"""Structural pruning with torch-pruning's dependency graph, and pickle-free replay of a pruning plan.

    prune_step(model, x, ratio) -> history;  apply_pruning(fresh model, {"history": ...}) -> same model

Channels are removed consistently through residuals and squeeze-excitation blocks, widths stay
multiples of 8, and the layer that writes the embedding keeps its width. Each call builds a fresh
pruner on the current weights; the histories of successive calls replay in order on a freshly
built model (../shared/FIELD-NOTES.md, torch-pruning).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn

from edgeclr import checkpoint, config, models
from edgeclr.models import Encoder, count_params, model_from_checkpoint
from edgeclr.runtime import Preprocess

log = logging.getLogger("edgeclr.compress")
WORK = "prune.pt"  # the checkpoint of a pruning run in progress (resumable; not yet a stage result)


def _tp():
    try:
        import torch_pruning
    except ImportError as e:
        raise config.ConfigError("pruning needs torch-pruning: pip install 'edgeclr[compress]'") from e
    return torch_pruning


def example_input(model: Encoder, pp: Preprocess | dict) -> torch.Tensor:
    pp = Preprocess.from_dict(pp) if isinstance(pp, dict) else pp
    return torch.zeros(1, model.spec.in_chans, pp.input_size, pp.input_size)


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
    tp = _tp()
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


def apply_pruning(model: Encoder, plan: dict, pp: Preprocess | dict) -> Encoder:
    """Replay a pruning plan (as saved in a checkpoint) on a freshly built model, in place."""
    tp = _tp()
    try:
        dg = tp.DependencyGraph().build_dependency(model.eval(), example_input(model, pp))
        dg.load_pruning_history([tuple(h) for h in plan["history"]])
    except (KeyError, IndexError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the pruning plan does not fit a {model.spec.name} (recorded with torchvision "
                         f"{plan.get('torchvision')}, torch-pruning {plan.get('torch_pruning')}): {str(e)[:200]}") from e
    return model


def pruning_plan(history: list, steps_done: int, info: dict) -> dict:
    import torchvision

    return {"history": history, "steps_done": steps_done, "torch_pruning": _tp().__version__,
            "torchvision": torchvision.__version__, **info}


def prune_and_recover(cfg, student, sck, spath, device, stage_dir, resume_from) -> tuple[Encoder, dict, Path]:
    """Prune in cfg.prune_steps steps, recovering by distillation after each; (model, plan, checkpoint)."""
    from edgeclr.distill import DistillTrainer, load_teacher, recalibrate_bn
    from edgeclr.train import exit_for_signal, fit, load_data

    cfg_start = time.time()
    tpath = cfg.teacher or (sck.get("teacher") or {}).get("path")
    if not tpath:
        raise config.ConfigError(f"{spath} does not record its teacher: pass --teacher (the `edgeclr train` run)")
    teacher, tck, tpath = load_teacher(tpath, device)
    pp = Preprocess.from_dict(sck["preprocess"])
    x = example_input(student, pp).to(device)
    base_macs, base_params = count_macs(student, x)
    target = cfg.target_macs * base_macs if cfg.target_macs is not None else None

    plan = dict(sck.get("pruning") or {"history": []})
    history, first_step = list(plan.get("history", [])), 0
    resumed = None
    if resume_from is not None:
        resumed, resume_from = checkpoint.load_for_resume(resume_from, map_location=device)
        student = model_from_checkpoint(resumed).to(device)
        history = list(resumed["pruning"]["history"])
        first_step = resumed["pruning"]["steps_done"] - 1

    fields = config.DistillConfig.__dataclass_fields__
    dcfg = config.DistillConfig(**{k: v for k, v in (sck.get("config") or {}).items() if k in fields})
    dcfg.teacher, dcfg.out, dcfg.resume = str(tpath), cfg.out, False
    dcfg.epochs = max(cfg.recover_epochs, 1)  # the schedule's length; no training at all when recover_epochs is 0
    dcfg.lr = cfg.recover_lr or dcfg.lr
    dcfg.knn_every, dcfg.cache_teacher, dcfg.device = 0, False, cfg.device
    for k in ("seed", "progress", "tensorboard", "threads"):
        setattr(dcfg, k, getattr(cfg, k))
    if cfg.data:
        dcfg.data = cfg.data
    dcfg.resolve(tck.get("config") or {}, pp.input_size)
    ds, _ = load_data(dcfg)
    teacher_info = {"path": str(Path(tpath).resolve()), "sha256": checkpoint.sha256(tpath), "spec": tck["spec"],
                    "embed_dim": teacher.embed_dim}
    info = {"base_macs": base_macs, "base_params": base_params, "steps": cfg.prune_steps, "prune_ratio": cfg.prune_ratio,
            "target_macs": cfg.target_macs, "global_pruning": cfg.global_pruning, "recover_epochs": cfg.recover_epochs}
    ckpt_path = stage_dir / "checkpoints" / WORK  # becomes last.pt once the pruned model passes its checks

    class PruneTrainer(DistillTrainer):
        def state(self):
            st = super().state()
            st["pruning"] = pruning_plan(history, self.prune_step, info)
            return st

    for k in range(first_step, cfg.prune_steps):
        if resumed is None or k > first_step:
            cur = count_macs(student, x)[0]
            if target is not None:  # step k reaches 1/steps of the way to the MAC target
                goal = base_macs - (base_macs - target) * (k + 1) / cfg.prune_steps
                ratio = ratio_for_macs(student, x, goal, cfg.global_pruning) if cur > goal * 1.01 else 0.0
            else:  # channel ratio schedule relative to the unpruned widths
                done, want = cfg.prune_ratio * k / cfg.prune_steps, cfg.prune_ratio * (k + 1) / cfg.prune_steps
                ratio = 1 - (1 - want) / (1 - done)
            channels = conv_channels(student)
            if ratio > 0:
                history += prune_step(student, x, ratio, cfg.global_pruning)
            log.info("prune step %d/%d: %s", k + 1, cfg.prune_steps,
                     step_summary(student, x, ratio, channels, base_macs, goal if target is not None else None))
        if dcfg.channels_last:  # pruning replaces the parameters: restore the layout the trainer's views use
            student = student.to(memory_format=torch.channels_last)
        adapter = nn.Identity() if student.embed_dim == teacher.embed_dim else nn.Linear(student.embed_dim, teacher.embed_dim)
        tr = PruneTrainer(dcfg, student, adapter, teacher, ds, pp, device, stage_dir, teacher_info)
        tr.stage, tr.ckpt_path, tr.prune_step = "compress", ckpt_path, k + 1
        if resumed is not None and k == first_step:
            tr.restore(resumed, resume_from)
            if "adapter" in resumed and not isinstance(adapter, nn.Identity):
                adapter.load_state_dict(resumed["adapter"])
        if cfg.recover_epochs:
            deadline = cfg_start + cfg.max_minutes * 60 if cfg.max_minutes else None
            completed, _ = fit(tr, tr.distill_loss, None, deadline)
            exit_for_signal(tr.stop_signal)
            if not completed:
                from edgeclr.compress import CompressError

                raise CompressError(f"--max-minutes {cfg.max_minutes} ran out during the recovery after pruning step {k + 1}/"
                                    f"{cfg.prune_steps}; its checkpoint is {ckpt_path}: run the same command with --resume")
        else:
            tr.save()
        if dcfg.bn_recalibrate:  # the recovered student's statistics, on clean images (see distill.recalibrate_bn)
            recalibrate_bn(student, ds, pp, device, dcfg.bn_recalibrate, cfg.seed)
            tr.save()
    macs, params = count_macs(student, x)
    info.update(macs=macs, params=params, mac_ratio=macs / base_macs, param_ratio=params / base_params)
    return student.eval(), pruning_plan(history, cfg.prune_steps, info), ckpt_path
