"""Self-supervised distillation: `edgeclr distill`.

    loading.load_encoder(role="teacher") -> build_student -> DistillTrainer (engine.Trainer + adapter, queue,
    cache) -> engine.fit -> BatchNorm re-estimation -> manifest

The teacher (a `edgeclr train` checkpoint) is frozen in eval mode. Each step, one augmented view
of every image goes through both networks; the student learns (a) to point its embedding where
the teacher's points (cosine regression) and (b) to reproduce the teacher's similarity
distribution over a queue of teacher embeddings (SEED), with weights. The student's embedding
width defaults to the teacher's, so its embeddings live in the teacher's space and no adapter is
needed; with another `--embed-dim`, a linear adapter maps the student's to the teacher's width for
the losses (it is saved in the checkpoint, never exported).

`--cache-teacher` embeds every training image's clean (evaluation) view once and distils the
augmented student views onto those targets: the teacher's cost is paid once, at the price of
targets that do not follow the augmentation.

Training facilities (optimiser, schedule, AMP, resume, atomic checkpoints, metrics, TensorBoard,
kNN monitor, SIGTERM) are edgeclr.engine's, shared with `train`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeclr import checkpoint, config, data, faults
from edgeclr.augment import view_generator
from edgeclr.engine import Trainer, build_monitor, exit_for_signal, fit, prepare_stage_dir, resolve_device, set_layout, write_fit_manifest
from edgeclr.heldout import HeldOut, agreement, embed, eval_inputs, overlap_sample, recalibrate_bn
from edgeclr.loading import load_data, load_encoder
from edgeclr.lock import hold
from edgeclr.losses import EmbeddingQueue, cosine_distill, relational_distill
from edgeclr.models import Encoder, ModelSpec, count_params, create_model, describe
from edgeclr.runtime import Preprocess

log = logging.getLogger("edgeclr.distill")


# ----------------------------------------------------------------------------------------------
# set-up


def build_student(cfg: config.DistillConfig, channels: int, teacher_dim: int) -> tuple[Encoder, nn.Module]:
    """The student (no projection head; embedding width cfg.embed_dim or the teacher's) and the
    adapter from its embedding to the teacher's width (identity when they are equal)."""
    dim = cfg.embed_dim or teacher_dim
    spec = ModelSpec(cfg.model, in_chans=channels, stem_stride=cfg.stem_stride, width=cfg.width, last_stride=cfg.last_stride,
                     embed_dim=dim, head_layers=0)
    try:
        student = create_model(spec)
    except ValueError as e:
        raise config.ConfigError(str(e)) from e
    adapter = nn.Identity() if dim == teacher_dim else nn.Linear(dim, teacher_dim)
    return student, adapter


@torch.no_grad()
def teacher_targets(teacher: Encoder, ds: data.Dataset, pp: Preprocess, device, cache_dir: Path, teacher_sha: str,
                    batch_size: int = 512) -> torch.Tensor:
    """(N, D) teacher embeddings of every image's clean view, cached in cache_dir and reused while
    the teacher and the data are the same. Unreadable images get zeros (they are never trained on)."""
    key = {"teacher_sha256": teacher_sha, "data": ds.fingerprint(), "count": len(ds)}
    meta_f, arr_f = cache_dir / "teacher_cache.json", cache_dir / "teacher_cache.npy"
    if meta_f.exists() and arr_f.exists():
        try:
            if json.loads(meta_f.read_text()) == json.loads(json.dumps(key)):
                return torch.from_numpy(np.load(arr_f))
        except (ValueError, OSError):
            pass
        log.info("teacher cache in %s is stale or unreadable: recomputing", cache_dir)
    t0 = time.time()
    out = torch.zeros(len(ds), teacher.embed_dim)
    for i in range(0, len(ds), 4096):  # bounded memory for large folders
        x, kept = eval_inputs(ds, pp, np.arange(i, min(i + 4096, len(ds))))
        out[torch.as_tensor(kept)] = embed(teacher.embed, x, batch_size, device)
    tmp = arr_f.with_name(".teacher_cache.tmp.npy")
    np.save(tmp, out.numpy())
    tmp.replace(arr_f)
    meta_f.write_text(json.dumps(key))
    log.info("cached teacher embeddings of %d images in %.0fs", len(ds), time.time() - t0)
    return out


class DistillTrainer(Trainer):
    """engine.Trainer with the teacher, the adapter, the relational queue and the optional cache."""

    def __init__(self, cfg, student: Encoder, adapter: nn.Module, teacher: Encoder, ds, pp, device, stage_dir,
                 teacher_info: dict, targets: torch.Tensor | None = None):
        self.adapter = adapter.to(device)
        super().__init__(cfg, "distill", student, ds, pp, device, stage_dir, trainable=nn.ModuleList([student, self.adapter]))
        self.teacher, self.teacher_info, self.targets = teacher, teacher_info, targets
        self.queue = EmbeddingQueue(cfg.queue_size if cfg.relational_weight else 0, teacher.embed_dim, device)

    def step_state(self) -> dict:
        st = super().step_state()
        st["queue"] = (self.queue.buf.clone(), self.queue.ptr, self.queue.count)
        return st

    def restore_step_state(self, state: dict) -> None:
        super().restore_step_state(state)
        buf, self.queue.ptr, self.queue.count = state["queue"]
        self.queue.buf.copy_(buf)

    def state(self) -> dict:
        st = super().state()
        st.update(teacher=self.teacher_info, adapter=self.adapter.state_dict(), queue=self.queue.state_dict())
        return st

    def restore(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("teacher", {}).get("sha256") != self.teacher_info["sha256"]:
            raise checkpoint.CheckpointError(
                f"cannot resume from {path}: it was distilled from teacher {ckpt.get('teacher', {}).get('path')} "
                f"(sha256 {str(ckpt.get('teacher', {}).get('sha256'))[:12]}), not {self.teacher_info['path']} "
                f"(sha256 {self.teacher_info['sha256'][:12]}); resume with the same --teacher or choose another --out")
        super().restore(ckpt, path)
        self.adapter.load_state_dict(ckpt["adapter"])
        self.queue.load_state_dict(ckpt["queue"])

    def frozen_forward(self):
        """The teacher's forward of every step (none with --cache-teacher): the precision probe times it too."""
        return self.teacher.embed if self.targets is None else None

    def distill_loss(self, x: torch.Tensor, indices) -> torch.Tensor:
        """x: (B, C, H, W) uint8 -> weighted cosine + relational loss of one augmented view."""
        cfg = self.cfg
        v = self.augment(x, view_generator(cfg.seed, self.epoch, self.step, 0))  # (B, C, S, S)
        v = faults.poison_batch(v, self.stage, self.global_step, self.dist.rank)
        if cfg.channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if self.targets is not None:
                t = self.targets[torch.as_tensor(indices)].to(self.device)  # (B, D_t)
            else:
                with torch.no_grad():
                    t = self.teacher.embed(v)  # (B, D_t)
            s = self.adapter(self.project(v))  # (B, D_t); project = embed for a head-less student
        s, t = s.float(), t.float()
        loss = torch.zeros((), device=self.device)
        parts = {}
        if cfg.cosine_weight:
            parts["loss_cosine"] = cosine_distill(s, t)
            loss = loss + cfg.cosine_weight * parts["loss_cosine"]
        if cfg.relational_weight:
            parts["loss_relational"] = relational_distill(s, t, self.queue.items(), cfg.temperature, cfg.teacher_temperature)
            loss = loss + cfg.relational_weight * parts["loss_relational"]
            self.queue.push(t)
        logged = (self.global_step + 1) % cfg.log_every == 0 or self.step + 1 == self.steps_per_epoch  # as fit logs
        self.step_metrics = {k: float(v.detach()) for k, v in parts.items()} if logged else {}
        return loss


def student_vs_teacher(student: Encoder, adapter: nn.Module, teacher: Encoder, monitor: HeldOut, device) -> dict:
    """Retention and agreement on the monitor's held-out (test-split) images."""
    return student_vs_teacher_on(student, adapter, teacher, monitor.query_x, device)


def student_vs_teacher_on(student: Encoder, adapter: nn.Module, teacher: Encoder, x: torch.Tensor, device) -> dict:
    """Cosine agreement and top-10 neighbour overlap of the student with the teacher on inputs x."""
    was = student.training, adapter.training
    student.eval(), adapter.eval()
    try:
        s = embed(lambda v: adapter(student.embed(v)), x, 512, device)
        t = embed(teacher.embed, x, 512, device)
    finally:
        student.train(was[0]), adapter.train(was[1])
    return agreement(s, t)


# ----------------------------------------------------------------------------------------------


def main(cfg: config.DistillConfig) -> dict:
    """`edgeclr distill`: train a student on the teacher's embeddings; write OUT/distill."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.teacher:
        raise config.ConfigError("--teacher is required: a checkpoint or run folder written by `edgeclr train`")
    device = resolve_device(cfg.device)
    teacher, tck, tpath = load_encoder(cfg.teacher, device, role="teacher")
    tpp = Preprocess.from_dict(tck["preprocess"])
    cfg.resolve(tck.get("config") or {}, tpp.input_size)
    if cfg.out is None:  # runs/NAME/train/checkpoints/last.pt -> runs/NAME
        cfg.out = str(checkpoint.run_dir_of(tpath))
    with hold(cfg.out, "the run folder", is_dir=True):  # one writer per run folder
        return _distill(cfg, teacher, tck, tpath, device, t0)


def _distill(cfg: config.DistillConfig, teacher: Encoder, tck: dict, tpath: Path, device, t0: float) -> dict:
    tpp = Preprocess.from_dict(tck["preprocess"])
    stage_dir = Path(cfg.out) / "distill"
    resume_from = prepare_stage_dir(stage_dir, cfg.resume)

    ds, _ = load_data(cfg)
    if ds.channels != tpp.channels:
        raise data.DataError(f"{ds.name} has {ds.channels}-channel images but the teacher {tpath} was trained on "
                             f"{tpp.channels}-channel images: distil on data like the teacher's (--data)")
    pp = tpp  # the student's inputs are exactly the teacher's: same size, mean, std, channels
    teacher_info = {"path": str(tpath.resolve()), "sha256": checkpoint.sha256(tpath), "spec": tck["spec"],
                    "embed_dim": teacher.embed_dim}
    torch.manual_seed(cfg.seed)
    student, adapter = build_student(cfg, ds.channels, teacher.embed_dim)
    student = student.to(device)
    student = set_layout(cfg, student, device)
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    targets = teacher_targets(teacher, ds, pp, device, stage_dir, teacher_info["sha256"]) if cfg.cache_teacher else None
    tr = DistillTrainer(cfg, student, adapter, teacher, ds, pp, device, stage_dir, teacher_info, targets)
    if resume_from is not None:
        ckpt, resume_from = checkpoint.load_for_resume(resume_from, map_location=device)
        tr.restore(ckpt, resume_from)
        log.info("resumed from %s at epoch %d step %d", resume_from, tr.epoch, tr.step)
    config.save_yaml(cfg, stage_dir / "config.yaml")
    monitor = build_monitor(cfg, pp)

    log.info("%s: %d images, %d steps/epoch x %d epochs; teacher %s -> student %s (%.2fM parameters) on %s",
             ds.name, len(ds), tr.steps_per_epoch, cfg.epochs, describe(tck["spec"]), describe(student.spec.to_dict()),
             count_params(student) / 1e6, device)
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
    completed, train_s = fit(tr, tr.distill_loss, monitor, deadline)
    # the student as it will be used: at the end of the schedule, or where --max-minutes stopped it (a
    # signal stops at once instead). Re-estimating BatchNorm statistics does not change what a resumed
    # run computes: training normalises with each batch's own statistics, never the running ones.
    if (completed or tr.stop_signal is None) and cfg.bn_recalibrate:
        used = recalibrate_bn(student, ds, pp, device, cfg.bn_recalibrate, cfg.seed)
        tr.save()
        log.info("BatchNorm statistics re-estimated on %d clean training images", used)
    if monitor is not None and tr.stop_signal is None and (cfg.bn_recalibrate or not completed):
        tr.last_metrics["knn_top1"] = monitor(student, device, recalibrate=False)  # the final weights, not the last epoch's monitor

    final = dict(tr.last_metrics)
    if monitor is not None and tr.stop_signal is None:  # a preempted run leaves at once
        final["teacher_knn_top1"] = monitor(teacher, device, recalibrate=False)
        if "knn_top1" not in final:
            final["knn_top1"] = monitor(student, device, recalibrate=False)
        final["retention"] = final["knn_top1"] / max(final["teacher_knn_top1"], 1e-9)
        final.update(student_vs_teacher(student, tr.adapter, teacher, monitor, device))
        log.info("student kNN %.2f%% / teacher %.2f%% = retention %.3f; cosine agreement %.3f, top-10 overlap %.3f",
                 final["knn_top1"], final["teacher_knn_top1"], final["retention"], final["cosine_agreement"],
                 final["topk_overlap"])
    elif tr.stop_signal is None and completed:  # no labels: the student is judged by its neighbours (deploy's rule)
        try:
            x = overlap_sample(cfg.data, pp, vars(cfg), cfg.seed, 2000)
        except data.DataError as e:
            log.info("no top-10 overlap with the teacher: %s", e)
        else:
            final.update(student_vs_teacher_on(student, tr.adapter, teacher, x, device))
            log.info("student against the teacher on %d held-out images: cosine agreement %.3f, top-10 overlap %.3f", len(x),
                     final["cosine_agreement"], final["topk_overlap"])
    write_fit_manifest(stage_dir, "distill", tr, student, pp,
                       {"data": ds.fingerprint(), "teacher": teacher_info, "resumed_from": str(resume_from) if resume_from else None},
                       final, t0, completed, train_s, adapter=not isinstance(tr.adapter, nn.Identity))
    exit_for_signal(tr.stop_signal)
    return {"stage_dir": str(stage_dir), "checkpoint": str(tr.ckpt_path), "completed": completed, **final}
