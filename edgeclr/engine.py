"""The training engine every training stage shares: `train`, `distill` and compress's recovery.

    resolve_device -> Trainer(cfg, stage, model, data, ...) -> fit(trainer, loss_fn, monitor) -> exit_for_signal

`Trainer` holds one run's state (model, optimiser, schedule, position, augmentations, checkpoints);
a stage subclasses it for its objective (`train.SimCLRTrainer`, `distill.DistillTrainer`) and
passes `fit` a `loss_fn(images, indices) -> loss`. `fit` is the epoch loop: metrics.csv and
TensorBoard, progress bar, the kNN monitor, a checkpoint at every epoch end and every
`ckpt_every` steps, SIGTERM / SIGINT -> checkpoint and stop, NaN/Inf losses stopped or skipped
before the update. Under torchrun only rank 0 logs, monitors and writes.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from edgeclr import checkpoint, config, data, faults, models
from edgeclr import distributed as dist_
from edgeclr.augment import SimCLRAugment, get_preset, preset_for
from edgeclr.errors import NonFiniteLoss
from edgeclr.heldout import HeldOut
from edgeclr.models import Encoder
from edgeclr.rundir import MetricsLog, make_writable_dir, write_manifest
from edgeclr.runtime import Preprocess

log = logging.getLogger("edgeclr.engine")


# ----------------------------------------------------------------------------------------------
# device and precision


def resolve_device(name: str, d: dist_.Dist = dist_.SINGLE) -> torch.device:
    """The torch device; under torchrun with CUDA, rank LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise config.ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and d.enabled:
        if d.local_rank >= torch.cuda.device_count():
            raise config.ConfigError(f"rank {d.rank} has local rank {d.local_rank}, but this machine has "
                                     f"{torch.cuda.device_count()} GPU(s): lower --nproc_per_node / --devices")
        dev = torch.device("cuda", d.local_rank)
    return dev


# oneDNN's 1x1-convolution weight gradient writes past its workspace when the convolution is strided
# (its "reduce to unit stride" copy), its source is channels_last (NHWC) and it has fewer input
# channels than the kernel's channel block: 16 with AVX-512, 8 with AVX2. The heap is corrupted
# ("double free or corruption", SIGSEGV) or, on AVX2, the gradient is silently wrong. Upstream:
# https://github.com/uxlfoundation/oneDNN/issues/6035 (open; torch 2.14.1 ships the affected code).
# What edgeclr makes hits it: a pruned or narrow ResNet's strided 1x1 downsample with 8 input channels,
# and a channels_last source reaches it even when the model is NCHW (the augmented views are NHWC).
# docs/reliability.md has the standalone reproducer and the measured sweep.
IC_BLOCK = 16  # the widest channel block of the affected kernel (AVX-512); narrower convolutions are guarded on any CPU


def rtus_convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The convolutions oneDNN #6035 can hit: 1x1, strided, ungrouped, fewer than IC_BLOCK input channels."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
            and max(m.stride) > 1 and m.in_channels < IC_BLOCK]


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """t with NCHW strides (a tensor with 1x1 planes counts as contiguous in both layouts, so compare the strides)."""
    want, acc = [], 1
    for n in reversed(t.shape):
        want.append(acc)
        acc *= n
    return t if tuple(t.stride()) == tuple(reversed(want)) else t.clone(memory_format=torch.contiguous_format)


def _nchw_input(module, args):
    return (_nchw(args[0]), *args[1:])


NARROW_CHANNELS = 16  # a 1x1 convolution narrower than this: the model trains in NCHW on the CPU (see set_layout)


def set_layout(cfg, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The one memory-layout rule of every training path (train, distill, compress's recovery,
    finetune). channels_last when cfg.channels_last (a config without the field: NCHW), except on the
    CPU for a model with a 1x1 convolution narrower than NARROW_CHANNELS (a ResNet at width 8, a
    pruned student): NCHW, which trained such models 7-10% faster per step than channels_last on an
    AVX-512 Xeon (benchmarks/results/layout_rule/); cfg.channels_last is set to the answer. And on the
    CPU, whatever the layout around them, the convolutions of rtus_convs() run in NCHW, their weights and
    their inputs (oneDNN's NCHW kernel for them is correct; the views arrive channels_last even for an
    NCHW model). Call it again after anything that replaces parameters (pruning); returns the model."""
    if getattr(cfg, "channels_last", False) and device.type == "cpu":
        narrow = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
                  and min(m.in_channels, m.out_channels) < NARROW_CHANNELS]
        if narrow:
            log.info("training in the NCHW layout, not channels_last: a 1x1 convolution with %d channels (NCHW is faster "
                     "for such narrow models on the CPU)", min(min(m.in_channels, m.out_channels) for m in narrow))
            cfg.channels_last = False
    if getattr(cfg, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    if device.type != "cpu":
        return model
    guarded = rtus_convs(model)
    for m in guarded:
        m.weight.data = _nchw(m.weight.data)
        if not getattr(m, "_edgeclr_nchw", False):
            m.register_forward_pre_hook(_nchw_input)
            m._edgeclr_nchw = True
    if guarded:
        log.info("%d strided 1x1 convolution(s) with fewer than %d input channels run in NCHW (oneDNN issue 6035: "
                 "their channels_last weight gradient corrupts memory)", len(guarded), IC_BLOCK)
    return model


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default; on a CPU, fp32 until `choose_cpu_precision` has measured bf16 (auto)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


# --amp auto on a CPU: bf16 only where a warmed-up probe measures it at least this much faster than fp32
# (on 8x8 digits bf16 was 1.15x faster and cost 0.67 kNN points; the Fashion-MNIST teacher ran 1.48x:
# benchmarks/results/train_precision/), and only for a schedule long enough to pay for the probe
BF16_MIN_GAIN = 1.2
PROBE_MIN_SECONDS = 60.0


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units from /proc/cpuinfo's flags (amx_bf16, avx512_bf16), or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    have = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(have) or None


def choose_cpu_precision(model: Encoder, x: torch.Tensor, steps_left: int, rounds: int = 3, scale: float = 1.0,
                         frozen: Callable | None = None) -> dict:
    """--amp auto on a CPU: time training steps (forward through the projection, backward) of a copy
    of `model` on the real batch x, fp32 and bf16 autocast, each warmed up first (oneDNN builds its
    primitives on the first calls), then alternated `rounds` times; bf16 when its median step is at
    least BF16_MIN_GAIN faster. `frozen` is a forward each step also runs without gradients under the
    same autocast (distillation's teacher): it is part of the step's time and of bf16's gain. A
    schedule that fp32 finishes within PROBE_MIN_SECONDS (a probe step times `scale`: the probe's
    batch is at most 64 images of the step's) is not probed. Returns {precision_ran, why, probe}."""
    units = cpu_bf16_units()
    if units is None:
        return {"precision_ran": "fp32", "why": "--amp auto: this CPU has no bf16 units (amx_bf16, avx512_bf16)"}
    m = copy.deepcopy(model).train()

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if frozen is not None:
                with torch.no_grad():
                    frozen(x)
            out = m.project(x)
        out.float().square().mean().backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(False)
    fp32 = step(False)
    if fp32 * scale * steps_left < PROBE_MIN_SECONDS:
        return {"precision_ran": "fp32", "why": f"--amp auto: the schedule takes about {fp32 * scale * steps_left:.0f} s in fp32, too "
                                                f"short for a bf16 probe to pay ({units})"}
    step(True), step(True)
    times = {False: [fp32], True: []}
    for _ in range(rounds):
        for bf16 in (True, False):
            times[bf16].append(step(bf16))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    gain = med[False] / med[True]
    use = gain >= BF16_MIN_GAIN
    probe = {"fp32_step_s": round(med[False], 4), "bf16_step_s": round(med[True], 4), "bf16_gain": round(gain, 3),
             "batch": list(x.shape), "units": units}
    why = (f"--amp auto: bf16 {gain:.2f}x fp32 in a warmed-up probe ({1e3 * med[True]:.0f} vs {1e3 * med[False]:.0f} ms per "
           f"step, {units}): {'bf16' if use else f'fp32 (bf16 is used from {BF16_MIN_GAIN}x)'}")
    return {"precision_ran": "bf16" if use else "fp32", "why": why, "probe": probe}


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # what the manifest records


# ----------------------------------------------------------------------------------------------
# optimiser and schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: norms' scales and all biases (1-D tensors) are excluded."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR: layer-wise trust ratio eta*||w||/||g + wd*w||,
    skipped for groups marked `lars_exclude` (norms and biases), then SGD momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if not g["lars_exclude"]:
                    wn, dn = p.norm(), d.norm()
                    d.mul_(torch.where((wn > 0) & (dn > 0), g["eta"] * wn / dn, torch.ones_like(wn)))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])
        return loss


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=lr)
    raise config.ConfigError(f"unknown optimizer {name!r}; valid: sgd, lars, adamw")


def build_scheduler(opt, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, at_step: int = 0):
    """Linear warm-up to the peak, then cosine decay to min_ratio * peak, stepped per batch; at_step:
    a schedule rebuilt mid-run (fit_minutes) continues from that step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    if at_step:
        sched.last_epoch = at_step
        for g, base in zip(opt.param_groups, sched.base_lrs):
            g["lr"] = base * f(at_step)
    return sched


FIT_STEPS = 4  # fit_minutes: the training steps timed (after a first, cold one) before the schedule is fitted


# ----------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """State of one training run: model, optimiser, schedule, position, logging, checkpoints.

    The stage's objective is a `loss_fn(images, indices) -> loss` (SimCLR here, distillation in
    distill.py, which subclasses this to add its own state).
    """

    def __init__(self, cfg, stage: str, model: Encoder, ds: data.Dataset, pp: Preprocess, device: torch.device,
                 stage_dir: Path, trainable: torch.nn.Module | None = None, dist: dist_.Dist = dist_.SINGLE):
        # its own copy: a fitted schedule (fit_minutes) changes its epochs, not the caller's config
        self.cfg, self.stage, self.model, self.ds, self.pp = copy.copy(cfg), stage, model, ds, pp
        self.device, self.dir, self.dist = device, stage_dir, dist
        self.steps_per_epoch = data.steps_per_epoch(len(ds), cfg.batch_size, dist.world)
        if self.steps_per_epoch == 0:
            raise data.DataError(f"{ds.name}: {len(ds)} image(s) cannot make a batch of 2"
                                 + (f" across {dist.world} processes" if dist.enabled else "") + "; NT-Xent needs >= 2 images")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.trainable = trainable if trainable is not None else model  # what the optimiser updates
        self.opt = build_optimizer(self.trainable, cfg.optimizer, cfg.scaled_lr, cfg.weight_decay, cfg.momentum)
        self.sched = build_scheduler(self.opt, self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch),
                                     cfg.min_lr_ratio)
        self.fitted: dict | None = None  # fit_minutes: how the schedule was fitted (None: --epochs as given)
        self.fit_started = time.time()  # fit() resets it: the budget of fit_minutes counts from there
        self.amp = amp_dtype(cfg.amp, device)
        self.precision = {"precision_ran": PRECISION_NAMES[self.amp], "why": f"--amp {cfg.amp}"}
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        aug_cfg = replace(get_preset(cfg.augment or preset_for(ds.channels, cfg.input_size)), crop_scale=cfg.crop_scale)
        if cfg.jitter is not None:
            aug_cfg = replace(aug_cfg, jitter_strength=cfg.jitter)
        if cfg.blur is not None:
            aug_cfg = replace(aug_cfg, blur_p=cfg.blur)
        self.augment = SimCLRAugment(aug_cfg, cfg.input_size, pp.mean, pp.std)
        self.aug_cfg = aug_cfg
        project = torch.compile(model.project) if cfg.compile else model.project
        if dist.enabled:  # gradients averaged over ranks by DDP; negatives gathered in simclr_loss
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(_Projector(model, project), device_ids=[device.index] if device.type == "cuda" else None)
            project = self.ddp
        self.project = project
        self.ckpt_path = stage_dir / "checkpoints" / "last.pt"
        self.skipped: set[str] = set()
        self.last_metrics: dict[str, float] = {}
        self.step_metrics: dict[str, float] = {}  # loss parts etc. that a step_fn wants logged
        self.stop_signal: int | None = None
        self.nonfinite_run = 0  # --nonfinite skip: non-finite losses in a row, and in all
        self.nonfinite_skipped = 0

    # -- --nonfinite skip: what a forward pass changes besides the weights -------------------------
    def step_state(self) -> dict:
        """A copy of the state that a forward pass updates (BatchNorm running statistics), so that a
        skipped step leaves no trace of its (non-finite) batch; DistillTrainer adds its queue."""
        seen, bufs = set(), []
        for m in (self.model, self.trainable):
            for b in m.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    bufs.append((b, b.detach().clone()))
        return {"buffers": bufs}

    def restore_step_state(self, state: dict) -> None:
        with torch.no_grad():
            for b, saved in state["buffers"]:
                b.copy_(saved)

    def set_epochs(self, epochs: int) -> None:
        """A schedule of `epochs` from the current step on (the warm-up's steps do not depend on it)."""
        self.cfg.epochs = epochs
        self.total_steps = self.steps_per_epoch * epochs
        self.sched = build_scheduler(self.opt, self.total_steps, round(self.cfg.warmup_epochs * self.steps_per_epoch),
                                     self.cfg.min_lr_ratio, at_step=self.global_step)

    def fit_schedule(self, step_s: float, elapsed_s: float) -> None:
        """fit_minutes: the epochs that the measured step time allows in what is left of the budget,
        at most --epochs and at least 1; the cosine decay is rebuilt to end there."""
        cfg = self.cfg
        budget = cfg.fit_minutes * 60
        steps = self.global_step + max(0.0, budget - elapsed_s) / max(step_s, 1e-9)
        epochs = int(min(cfg.epochs, max(1, steps // self.steps_per_epoch)))
        over_s = (self.steps_per_epoch * epochs - self.global_step) * step_s - max(0.0, budget - elapsed_s)
        self.fitted = {"budget_s": round(budget, 1), "step_s": round(step_s, 4), "asked_epochs": cfg.epochs, "epochs": epochs,
                       "why": f"fit_minutes {cfg.fit_minutes:g}: {1e3 * step_s:.0f} ms per step x {self.steps_per_epoch} "
                              f"steps per epoch: {epochs} of {cfg.epochs} epochs fit"}
        if over_s > 0.1 * budget:  # not even one epoch fits: said now, not when the budget is already spent
            self.fitted["overrun_s"] = round(over_s, 1)
            self.fitted["why"] += (f"; one epoch takes {self.steps_per_epoch * step_s / 60:.1f} min, so this stage runs one and "
                                   f"overruns its {cfg.fit_minutes:g} min by about {over_s / 60:.1f} min: give more minutes, "
                                   "or fewer or smaller images")
        if epochs != cfg.epochs:
            self.set_epochs(epochs)
        (log.warning if self.fitted.get("overrun_s") else log.info)("%s: %s", self.stage, self.fitted["why"])

    def set_precision(self, chosen: dict) -> None:
        self.amp = torch.bfloat16 if chosen["precision_ran"] == "bf16" else None
        self.precision = chosen

    def frozen_forward(self) -> Callable | None:
        """A forward each training step also runs without gradients (distillation's teacher), for the precision probe."""
        return None

    def probe_batch(self) -> torch.Tensor:
        """A training step's input for the precision probe: real images of the data (at most 64,
        the two views of train as two copies), preprocessed as the model sees them."""
        from edgeclr.heldout import eval_inputs

        n = min(len(self.ds), self.cfg.batch_size, 64)
        x, _ = eval_inputs(self.ds, self.pp, range(n))
        if len(x) == 0:
            x = torch.zeros(n, self.pp.channels, self.cfg.input_size, self.cfg.input_size)
        x = torch.cat([x, x]) if self.stage == "train" else x
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "stage": self.stage,
            "edgeclr_version": __import__("edgeclr").__version__,
            "model": self.model.state_dict(), "spec": self.model.spec.to_dict(), "preprocess": self.pp.to_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "rng": checkpoint.rng_state(),
            "config": config.to_dict(self.cfg), "metrics": dict(self.last_metrics),
            "augment": self.aug_cfg.to_dict(), "skipped_files": sorted(self.skipped),
            "nonfinite_skipped": self.nonfinite_skipped, "precision": dict(self.precision), "fitted": self.fitted,
        }

    def save(self) -> Path:
        """Write the checkpoint (rank 0 only: the weights are the same on every rank)."""
        if self.dist.is_main:
            checkpoint.save(self.state(), self.ckpt_path)
        return self.ckpt_path

    def restore(self, ckpt: dict, path: Path) -> None:
        if ckpt["spec"] != self.model.spec.to_dict():
            raise checkpoint.CheckpointError(
                f"cannot resume from {path}: it holds a {models.describe(ckpt['spec'])}, but this run builds a "
                f"{models.describe(self.model.spec.to_dict())}. Resume with the same --model/--width/--stem-stride/"
                "--head-* options (and data channels), or start a new run with another --out.")
        if ckpt["stage"] != self.stage:
            raise checkpoint.CheckpointError(f"cannot resume {self.stage} from {path}: it is a {ckpt['stage']} checkpoint")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("fitted"):  # a schedule fitted to fit_minutes goes on as fitted
            self.fitted = ckpt["fitted"]
            self.cfg.epochs = ckpt["fitted"]["epochs"]
            self.total_steps = self.steps_per_epoch * self.cfg.epochs
            self.sched = build_scheduler(self.opt, self.total_steps, round(self.cfg.warmup_epochs * self.steps_per_epoch),
                                         self.cfg.min_lr_ratio)
        self.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt.get("rng") or {})
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            warnings.warn(f"{path} was written with {ckpt['steps_per_epoch']} steps per epoch, this run has "
                          f"{self.steps_per_epoch} (different data or batch size): the data order will not "
                          "match an uninterrupted run")
        self.epoch, self.step, self.global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        ran = (ckpt.get("precision") or {}).get("precision_ran")
        if self.cfg.amp == "auto" and self.device.type == "cpu" and ran in ("fp32", "bf16"):  # the run goes on as it began
            self.amp = torch.bfloat16 if ran == "bf16" else None
            self.precision = {**ckpt["precision"], "why": ckpt["precision"].get("why", "--amp auto") + " (kept on resume)"}
        self.skipped = set(ckpt.get("skipped_files") or [])
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped") or 0)
        self.last_metrics = dict(ckpt.get("metrics") or {})

    # -- one step ---------------------------------------------------------------------------
    def optimise(self, loss: torch.Tensor) -> float | None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        gnorm = None
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return gnorm


class _Projector(torch.nn.Module):
    """model.project as a module's forward (what DistributedDataParallel wraps)."""

    def __init__(self, model: Encoder, project):
        super().__init__()
        self.model, self._project = model, project

    def forward(self, x):
        return self._project(x)


def exit_for_signal(signum: int | None, distributed: bool = False) -> None:
    """After a stage stopped on a signal and wrote its checkpoint: SIGINT -> KeyboardInterrupt
    (exit 130), SIGTERM -> exit 143 (128 + signal, what a scheduler expects of a preempted job)."""
    if signum is None:
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if distributed:  # torchrun sends SIGTERM again to the ranks still running once one has exited:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this one is leaving with its checkpoint written
    raise SystemExit(128 + signum)



def check_finite(loss: torch.Tensor, trainer: Trainer) -> None:
    if not torch.isfinite(loss).all():
        last = trainer.ckpt_path if trainer.ckpt_path.exists() else None
        raise NonFiniteLoss(
            f"the loss became {loss.item()}"
            + (f" on one of the {trainer.dist.world} processes" if trainer.dist.enabled else "")
            + f" at epoch {trainer.epoch}, step {trainer.step} (global step "
            f"{trainer.global_step}); training stopped without writing a checkpoint. "
            + (f"The last good checkpoint {last} is kept; " if last else "")
            + f"lower --lr (now {trainer.cfg.lr}), raise --temperature (now {trainer.cfg.temperature}), "
              "set --grad-clip, or use --amp off, then --resume (--nonfinite skip drops such steps instead).")


MAX_SKIPPED_IN_A_ROW = 10


def skip_nonfinite(loss: torch.Tensor, tr: Trainer) -> None:
    """A non-finite loss: NonFiniteLoss (check_finite), unless --nonfinite skip, which counts the
    step as skipped (no backward, no update, the optimiser's state untouched) until
    MAX_SKIPPED_IN_A_ROW in a row."""
    give_up = tr.cfg.nonfinite == "skip" and tr.nonfinite_run + 1 >= MAX_SKIPPED_IN_A_ROW
    if give_up:
        log.error("%d non-finite losses in a row: stopping", MAX_SKIPPED_IN_A_ROW)
    if tr.cfg.nonfinite != "skip" or give_up:
        check_finite(loss, tr)
    tr.nonfinite_run += 1
    tr.nonfinite_skipped += 1
    log.warning("the loss became %s at epoch %d, step %d (global step %d): step skipped (--nonfinite skip; %d so far)",
                loss.item(), tr.epoch, tr.step, tr.global_step, tr.nonfinite_skipped)


def train_one_epoch(tr: Trainer, loss_fn, metrics, progress=None, deadline: float | None = None) -> bool:
    """Run the rest of epoch tr.epoch from tr.step. Returns False when stopped early (time or signal)."""
    cfg, d = tr.cfg, tr.dist
    tr.model.train()
    t_last, n_last = time.perf_counter(), 0
    loss = gnorm = None
    fitting = bool(getattr(cfg, "fit_minutes", 0)) and tr.fitted is None
    stamps = [time.perf_counter()]
    for step, x, bad, idx in data.iterate_batches(tr.ds, cfg.batch_size, cfg.seed, tr.epoch, tr.step, cfg.num_workers,
                                                  d.rank, d.world):
        tr.step = step
        new_bad = [b for b in bad if b not in tr.skipped]
        for b in new_bad:
            warnings.warn(f"skipped unreadable image {b}")
        tr.skipped.update(bad)
        if d.enabled and isinstance(tr.ds, data.FolderDataset):  # unreadable files: every rank trains on
            keep = -int(dist_.sync_flags(d, tr.device, -len(x))[0])  # as many images as the emptiest shard
            x, idx = x[:keep], idx[:keep]
        if len(x) * d.world >= 2 and len(x) >= 1:  # a batch left with < 2 readable images is skipped
            before = tr.step_state() if cfg.nonfinite == "skip" else None
            loss = faults.poison_loss(loss_fn(x.to(tr.device, non_blocking=True), idx), tr.stage, tr.global_step, d.rank)
            finite = bool(torch.isfinite(loss).all())
            if d.enabled and dist_.sync_flags(d, tr.device, float(not finite))[0] and finite:
                loss, finite = loss.new_tensor(float("nan")), False  # another rank's is not: all stop (or skip) together
            if finite:
                tr.nonfinite_run = 0
                gnorm = tr.optimise(loss)
                n_last += len(x) * d.world
            else:  # before the update: a NaN never reaches the weights
                skip_nonfinite(loss, tr)  # stops the run, unless --nonfinite skip
                # skipped: no backward, no update; the statistics of the bad batch are undone and the
                tr.restore_step_state(before)  # schedule moves on, so that steps keep their learning rates
                tr.sched.step()
                loss = None
        tr.step, tr.global_step = step + 1, tr.global_step + 1
        if fitting:  # the first, cold step apart: the next FIT_STEPS steps' median time fits the schedule
            stamps.append(time.perf_counter())
            if len(stamps) == FIT_STEPS + 2 or tr.global_step >= tr.total_steps:
                gaps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:])) or [stamps[-1] - stamps[0]]
                tr.fit_schedule(gaps[len(gaps) // 2], time.time() - tr.fit_started)
                fitting = False
        if progress is not None:
            progress.update(1)
        if loss is not None and (tr.global_step % cfg.log_every == 0 or tr.step == tr.steps_per_epoch):
            dt = time.perf_counter() - t_last
            m = {"loss": dist_.all_mean(loss.item(), d, tr.device), "lr": tr.opt.param_groups[0]["lr"], "images_per_s": n_last / max(dt, 1e-9),
                 "skipped_images": len(tr.skipped), **tr.step_metrics}
            if tr.nonfinite_skipped:
                m["skipped_nonfinite_steps"] = tr.nonfinite_skipped
            if gnorm is not None:
                m["grad_norm"] = gnorm
            tr.last_metrics.update(m)
            metrics(m, tr.epoch, tr.global_step)
            if progress is not None:
                progress.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            t_last, n_last = time.perf_counter(), 0
        stop = tr.stop_signal is not None or (deadline is not None and time.time() > deadline)
        if d.enabled:  # a signal on any rank, or rank 0's clock, stops every rank at the same step
            sig, late = dist_.sync_flags(d, tr.device, float(tr.stop_signal or 0),
                                         float(d.is_main and deadline is not None and time.time() > deadline))
            tr.stop_signal = int(sig) or None
            stop = tr.stop_signal is not None or bool(late)
        if stop or (cfg.ckpt_every and tr.global_step % cfg.ckpt_every == 0 and tr.step < tr.steps_per_epoch):
            tr.save()
        faults.maybe_kill(tr.stage, tr.global_step, d.rank)
        if stop:
            return False
    tr.epoch, tr.step = tr.epoch + 1, 0
    return True


def prepare_stage_dir(stage_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite a run's checkpoint
    and to start in a folder it cannot write."""
    ckpt_file = stage_dir / "checkpoints" / "last.pt"
    if resume:
        resume_from = checkpoint.find(stage_dir) if stage_dir.exists() else None
        if resume_from is None:
            raise checkpoint.CheckpointError(f"--resume: no checkpoint in {stage_dir}; drop --resume to start a new run")
        make_writable_dir(stage_dir)
        return resume_from
    if ckpt_file.exists() or checkpoint.previous_path(ckpt_file).exists():
        raise config.ConfigError(f"{stage_dir} already holds a checkpoint: pass --resume to continue it, or "
                                 "choose another --out (nothing was overwritten)")
    make_writable_dir(stage_dir)
    return None


def build_monitor(cfg, pp: Preprocess) -> HeldOut | None:
    """The kNN monitor of a training stage: the held-out scorer on the dataset's labeled train/test
    splits (at most knn_max_bank bank images, a fifth of that as queries), or None without labels."""
    if not cfg.knn_every:
        return None
    try:
        # students are scored as they will be used: BatchNorm re-estimated on clean images (distill)
        return HeldOut.open(cfg.data, pp, vars(cfg), cfg.seed, cfg.knn_max_bank, max(cfg.knn_max_bank // 5, 1), k=cfg.knn_k,
                            t=cfg.knn_t, bn_recalibrate=bool(getattr(cfg, "bn_recalibrate", 0)))
    except data.DataError as e:
        log.info("no kNN monitor: %s", e)
    return None


def fit(tr: Trainer, loss_fn, monitor=None, deadline: float | None = None) -> tuple[bool, float]:
    """The epoch loop shared by every training stage: metrics.csv + TensorBoard, progress bar,
    kNN monitor of tr.model, a checkpoint at every epoch end, SIGTERM or SIGINT -> checkpoint
    after the current step and stop (a second SIGINT interrupts at once). Under torchrun only
    rank 0 logs, shows progress, monitors and writes; a signal on any rank stops all of them.

    Returns (completed the schedule, training seconds).
    """
    cfg, main = tr.cfg, tr.dist.is_main
    metrics = MetricsLog(tr.dir / "metrics.csv", tr.stage) if main else None
    tb = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(tr.dir / "tb"))
        except ImportError:
            log.info("tensorboard is not installed: metrics go to metrics.csv only")

    def log_metrics(m, epoch, step):
        if metrics is None:
            return
        metrics.log(m, epoch, step)
        if tb is not None:
            for k, v in m.items():
                tb.add_scalar(f"{tr.stage}/{k}", v, step)

    show = main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    progress = None
    if show:
        from tqdm import tqdm

        progress = tqdm(total=tr.total_steps, initial=tr.global_step, desc=tr.stage, unit="step", dynamic_ncols=True)

    def on_signal(signum, frame):
        if signum == signal.SIGINT and tr.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: stop now, the last checkpoint stays
        if signum == signal.SIGINT and main:
            log.warning("interrupted: stopping after this step and writing a checkpoint (press Ctrl-C again to stop now)")
        tr.stop_signal = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    completed = True
    t0 = time.time()
    tr.fit_started = t0
    if tr.global_step == 0 and cfg.amp == "auto" and tr.device.type == "cpu" and not tr.dist.enabled and not cfg.compile:
        x = tr.probe_batch()
        images = len(x) // 2 if tr.stage == "train" else len(x)  # train's batch holds two views of each image
        tr.set_precision(choose_cpu_precision(tr.model, x, tr.total_steps, scale=cfg.batch_size / images, frozen=tr.frozen_forward()))
        log.info("%s", tr.precision["why"])
    try:
        while tr.epoch < cfg.epochs:
            if not train_one_epoch(tr, loss_fn, log_metrics, progress, deadline):
                completed = False
                break
            done_epochs = tr.epoch
            if monitor is not None and main and (done_epochs % cfg.knn_every == 0 or done_epochs == cfg.epochs):
                acc = monitor(tr.model, tr.device)
                tr.last_metrics["knn_top1"] = acc
                log_metrics({"knn_top1": acc}, done_epochs, tr.global_step)
                log.info("epoch %d: kNN %.2f%%", done_epochs, acc)
            tr.save()
    finally:
        for s_, h in old_handlers.items():
            signal.signal(s_, h)
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    return completed, time.time() - t0


def write_fit_manifest(stage_dir: Path, stage: str, tr, model: Encoder, pp: Preprocess, inputs: dict, metrics: dict, t0: float,
                       completed: bool, train_s: float, **extra) -> None:
    """The manifest of a stage that fits an encoder with a Trainer (train, distill): its checkpoint,
    the precision it ran in, where the schedule stopped, and the stage's own `extra` fields."""
    write_manifest(stage_dir, stage, inputs=inputs, spec=model.spec.to_dict(), preprocess=pp.to_dict(), embed_dim=model.embed_dim,
                   metrics=metrics, wall_time_s=time.time() - t0,
                   artifacts={"checkpoint": str(tr.ckpt_path), "checkpoint_sha256": checkpoint.sha256(tr.ckpt_path)},
                   extra={**tr.precision, "fitted": tr.fitted, "completed": completed, "epoch": tr.epoch, "step": tr.step,
                          "global_step": tr.global_step, "train_seconds": round(train_s, 1),
                          "parameters": models.count_params(model), "skipped_files": sorted(tr.skipped), **extra})
