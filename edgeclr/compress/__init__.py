"""Compression: `edgeclr compress` = structural pruning with recovery, then INT8 that is really faster.

    check_output -> Scorecard.start (held-out scores of the student and teacher)
      -> prune_or_resume: [prune.prune_step -> recover (distill.DistillTrainer, engine.fit)] x steps
      -> export_and_quantize: export FP32 (export.main) -> quantize_onnx / quantize_openvino (real calibration images)
      -> measure_latency -> write_results: report.json, report.md, one manifest

prune.py holds the pruning and the plan replay, quantize.py the INT8 tool chains; this file chains
them and evaluates every artifact.

Pruning uses torch-pruning's dependency graph (`BasePruner`, group L2-magnitude importance):
channels are removed consistently through residuals and squeeze-excitation blocks, widths stay
multiples of 8, and the layer that produces the embedding is never pruned, so the embedding keeps
its width. Each step prunes from the current (recovered) weights with a fresh pruner; its
history (module name, output/input side, channel indices) is a plain list, so a pruned
checkpoint holds weights + that plan and `apply_pruning` replays it on a freshly built model
(no pickled modules; outputs identical). After each step the student recovers by distillation
from the teacher with a fresh optimiser.

INT8 (docs/compression.md):
- onnxruntime: `quant_pre_process`, then static QDQ with per-channel weights, calibrated on real
  images preprocessed exactly as the runtime does. Activations u8 on x86 (U8S8), s8 on ARM (S8S8).
  Left in float and reported: the first convolution (one input channel, accuracy-sensitive, cheap),
  the layer that writes the embedding, and squeeze-excitation branches (their HardSigmoid/Mul stay
  float in onnxruntime, and Q/DQ pairs around them made INT8 MobileNetV3 slower than FP32).
- OpenVINO: NNCF post-training quantisation (`nncf.quantize`, performance preset, fast bias
  correction) of the FP32 IR, the same scope left in float; saved with FP32 weights elsewhere.
Every artifact is evaluated before it is written as done; `--max-drop` refuses one whose kNN
accuracy falls more than the budget below the FP32 student's (nothing is overwritten).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeclr import checkpoint, config, export
from edgeclr.bench import latencies
from edgeclr.compress.prune import WORK, count_macs, prune_and_recover, prune_step, ratio_for_macs
from edgeclr.compress.quantize import calibration_inputs, float_scope, quantize_onnx, quantize_openvino, scope_nodes, write_int8
from edgeclr.engine import resolve_device
from edgeclr.errors import CompressError
from edgeclr.formats import format_of
from edgeclr.heldout import HeldOut, public
from edgeclr.loading import load_encoder
from edgeclr.lock import hold
from edgeclr.models import EmbeddingModel, Encoder, example_input, model_from_checkpoint
from edgeclr.report import compress_table
from edgeclr.rundir import make_writable_dir, write_json_atomic, write_manifest
from edgeclr.runtime import Embedder, ModelMeta, Preprocess

log = logging.getLogger(__name__)
# the package's face: the pruning and INT8 steps a script composes (benchmarks/ do)
__all__ = ["main", "count_macs", "prune_step", "ratio_for_macs", "prune_and_recover", "calibration_inputs", "float_scope",
           "quantize_onnx", "quantize_openvino", "scope_nodes", "write_int8"]


def runtime_embed(path: Path):
    """(N, C, S, S) tensor -> embeddings through edgeclr.runtime (what the device runs), all cores."""
    emb = Embedder.load(path, threads=0, precision="f32")
    return lambda x: torch.from_numpy(emb.embed_arrays(x.numpy(), 256))


@dataclasses.dataclass
class Scorecard:
    """Every artifact scored on the same held-out images against the FP32 student (`base`); the
    report rows, and the --max-drop budget."""

    cfg: config.CompressConfig
    held: HeldOut | None
    device: torch.device
    base: dict | None = None
    report: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, cfg, student: Encoder, sck: dict, pp: Preprocess, data_spec: str, device) -> Scorecard:
        """The scorer on the student's data, with the FP32 student's and the teacher's rows."""
        held = HeldOut.open(data_spec, pp, sck.get("config") or {}, cfg.seed, cfg.eval_images, cfg.eval_images)
        if held is None:
            log.warning("%s has no labels: the report gives embedding agreement only, and --max-drop cannot be checked", data_spec)
        card = cls(cfg, held, device)
        card.base = card.score_torch(student) if held else None
        tpath = card.teacher_path(sck)
        if held and tpath and Path(tpath).exists():
            teacher = load_encoder(tpath, device, role="teacher")[0]
            card.report["teacher"] = card.row(card.score_torch(teacher, card.base), teacher, pp)
        card.report["student"] = card.row(card.base, student, pp) if card.base else {}
        return card

    def teacher_path(self, sck: dict) -> str | None:
        return self.cfg.teacher or (sck.get("teacher") or {}).get("path")

    def score_torch(self, model: Encoder, ref: dict | None = None) -> dict:
        return self.held.score(model.embed, ref, 512, self.device)

    def score_file(self, path: Path) -> dict:
        return self.held.score(runtime_embed(path), self.base, 256)

    @staticmethod
    def row(scores: dict | None, model: nn.Module | None, pp: Preprocess | None) -> dict:
        out = public(scores or {})
        if model is not None:
            out["macs"], out["params"] = count_macs(model, example_input(model, pp))
        return out

    def check_budget(self, name: str, r: dict) -> None:
        """CompressError when `r`'s kNN accuracy is more than --max-drop below the FP32 student's."""
        if self.base is None or self.cfg.max_drop is None:
            return
        drop = self.base["knn_top1"] - r["knn_top1"]
        if drop > self.cfg.max_drop:
            raise CompressError(f"{name}: kNN accuracy {r['knn_top1']:.2f}% is {drop:.2f} points below the FP32 student's "
                                f"{self.base['knn_top1']:.2f}%, over --max-drop {self.cfg.max_drop}; it was not written (nothing "
                                "overwritten). Prune less (--prune-ratio/--target-macs), recover longer (--recover-epochs), "
                                "or use more --calib-images")

    def add_retention(self) -> None:
        if self.base is not None:
            for key, r in self.report.items():
                if "knn_top1" in r and key != "teacher":
                    r["retention"] = r["knn_top1"] / self.base["knn_top1"]


# ----------------------------------------------------------------------------------------------
# the steps


def check_output(cfg: config.CompressConfig, spath: Path) -> tuple[Path, bool, Path | None]:
    """(stage folder, pruning already finished, pruning checkpoint to resume); refuses to overwrite a
    finished or interrupted compress run, before any work."""
    stage_dir = Path(cfg.out) / "compress"
    if spath.resolve().is_relative_to(stage_dir.resolve()):
        raise config.ConfigError(f"{spath} is inside {stage_dir}: compress a distilled student (runs/NAME/distill), "
                                 "or pass --out to write elsewhere")
    ck_dir = stage_dir / "checkpoints"
    finished = (stage_dir / "manifest.json").exists()
    # pruning done, export/INT8 interrupted: --resume starts again from the pruned checkpoint
    pruned_done = cfg.pruning and cfg.resume and not finished and (ck_dir / "last.pt").exists()
    if finished or (not pruned_done and ((ck_dir / "last.pt").exists() or (stage_dir / "models").exists())):
        raise config.ConfigError(f"{stage_dir} already holds a compressed model: choose another --out (nothing was overwritten)")
    resume_from = ck_dir / WORK if cfg.pruning and cfg.resume and not pruned_done else None
    if resume_from is not None and not resume_from.exists():
        raise checkpoint.CheckpointError(f"--resume: no interrupted pruning in {ck_dir}; drop --resume to start")
    if cfg.pruning and not cfg.resume and (ck_dir / WORK).exists():
        raise config.ConfigError(f"{ck_dir / WORK} is an interrupted compress run: pass --resume to continue it, "
                                 "or choose another --out (nothing was overwritten)")
    make_writable_dir(stage_dir)
    return stage_dir, pruned_done, resume_from


def prune_or_resume(cfg, card: Scorecard, student: Encoder, sck: dict, spath: Path, pp: Preprocess, stage_dir: Path,
                    pruned_done: bool, resume_from: Path | None) -> tuple[Encoder, dict | None, Path]:
    """(model to export, pruning plan or None, its checkpoint): pruned and recovered, re-loaded when
    pruning finished before an interruption, or the student itself when there is nothing to prune."""
    ck_dir, device = stage_dir / "checkpoints", card.device
    if pruned_done:  # the pruned model passed its checks before the interruption: export it again
        model_ckpt = ck_dir / "last.pt"
        ck = checkpoint.load(model_ckpt, map_location=device)
        model, plan = model_from_checkpoint(ck).to(device).eval(), dict(ck["pruning"])
        x = example_input(model, pp).to(device)
        (plan["macs"], plan["params"]), (base_macs, base_params) = count_macs(model, x), count_macs(student, x)
        plan.update(mac_ratio=plan["macs"] / base_macs, param_ratio=plan["params"] / base_params)
        if card.held:
            card.report["pruned"] = card.row(card.score_torch(model, card.base), model, pp)
        shutil.rmtree(stage_dir / "models", ignore_errors=True)  # a partial export, rewritten from the checkpoint
        log.info("resumed: pruning had finished (%s); exporting it again", model_ckpt)
        return model, plan, model_ckpt
    if not cfg.pruning:
        return student, None, spath
    model, plan, model_ckpt = prune_and_recover(cfg, student, sck, spath, device, stage_dir, resume_from)
    if card.held:
        r = card.score_torch(model, card.base)
        card.report["pruned"] = card.row(r, model, pp)
        try:
            card.check_budget("the pruned student", r)
        except CompressError as e:
            rejected = model_ckpt.with_name("rejected.pt")
            os.replace(model_ckpt, rejected)
            raise CompressError(f"{e} (kept for inspection as {rejected})") from None
    final_ckpt = model_ckpt.with_name("last.pt")
    os.replace(model_ckpt, final_ckpt)
    log.info("pruned: %.2fM -> %.2fM MACs (%.2fx fewer)", plan["base_macs"] / 1e6, plan["macs"] / 1e6, 1 / plan["mac_ratio"])
    return model, plan, final_ckpt


def int8_scope(model: Encoder, fp32_path: Path, models_dir: Path, calib: np.ndarray, pp: Preprocess) -> dict[str, list[str]]:
    """ONNX node names left in float, by reason (quantize.float_scope), read from the FP32 ONNX export
    (or, for OpenVINO, from an ONNX export of the same model: OpenVINO keeps the node names)."""
    onnx_fp32 = fp32_path if fp32_path.suffix == ".onnx" else models_dir / ".scope.onnx"
    if onnx_fp32 != fp32_path:
        export.write_onnx(EmbeddingModel(model, True).eval(), torch.from_numpy(calib[:1]), True, 17,
                          ModelMeta(preprocess=pp, embedding_dim=model.embed_dim, normalized=True), onnx_fp32)
    try:
        return float_scope(onnx_fp32, EmbeddingModel(model, True))
    finally:
        if onnx_fp32 != fp32_path:
            onnx_fp32.unlink()


def carries_int8_metadata(path: Path) -> None:
    """CompressError unless the quantised file at `path` loads through the runtime as INT8 (its
    metadata carried over from the FP32 export)."""
    if Embedder.load(path, threads=0, precision="f32").meta.precision != "int8":
        raise CompressError(f"{path}: the quantised model does not carry its metadata")


def quantize_one(cfg, card: Scorecard, fmt: str, fp32_path: Path, calib: np.ndarray, scope: dict, name: str = "int8") -> dict:
    """INT8 of one FP32 export, written as NAME.* beside it only once it carries its metadata and is
    within --max-drop; returns its artifact entry."""
    final = fp32_path.parent / f"{name}{fp32_path.suffix}"

    def check(tmp: Path) -> None:
        carries_int8_metadata(tmp)
        if card.held:
            r = card.score_file(tmp)
            card.check_budget(f"the {fmt} INT8 model", r)
            card.report[f"{fmt}-int8"] = card.row(r, None, None)

    qinfo = write_int8(fp32_path, final, calib, cfg.target, scope_nodes(scope), check)
    qinfo["float_scope"] = scope
    return {"path": str(final), "bytes": format_of(final).size_bytes(final), "quantization": qinfo}


def export_and_quantize(cfg, card: Scorecard, model: Encoder, model_ckpt: Path, pp: Preprocess, data_spec: str,
                        scfg: dict, models_dir: Path, calib: np.ndarray | None = None) -> tuple[dict[str, dict], np.ndarray | None]:
    """FP32 export per format, then its INT8 model; (artifacts, calibration images or None)."""
    artifacts: dict[str, dict] = {}
    for fmt in [f for f in cfg.formats.split(",") if f]:
        e = export.main(config.ExportConfig(target=str(model_ckpt), format=fmt, out=str(models_dir), name="fp32", data=data_spec))
        fp32_path = Path(e["path"])
        artifacts[f"{fmt}-fp32"] = {"path": str(fp32_path), "bytes": format_of(fp32_path).size_bytes(fp32_path),
                                    "parity": e["parity"]}
        if card.held:
            card.report[f"{fmt}-fp32"] = card.row(card.score_file(fp32_path), None, None)
        if not cfg.int8:
            continue
        if calib is None:
            calib = calibration_inputs(cfg.calib_data or data_spec, pp, cfg.calib_images, cfg.seed, scfg)
        scope = int8_scope(model, fp32_path, models_dir, calib, pp) if cfg.auto_exclude else {}
        artifacts[f"{fmt}-int8"] = quantize_one(cfg, card, fmt, fp32_path, calib, scope)
    return artifacts, calib


def measure_latency(cfg, report: dict, artifacts: dict[str, dict]) -> None:
    """1-thread batch-1 latency of every artifact (one interleaved measurement, bench.latencies), and
    each INT8 model's speed-up over its own FP32 one."""
    ms = latencies({key: a["path"] for key, a in artifacts.items()}, threads=1, batch=1, runs=cfg.latency_runs)
    for key, a in artifacts.items():
        a["latency_ms_1thread"] = ms[key]
        report.setdefault(key, {}).update(bytes=a["bytes"], latency_ms_1thread=a["latency_ms_1thread"])
    for fmt in [f for f in cfg.formats.split(",") if f]:
        if f"{fmt}-int8" in artifacts:
            report[f"{fmt}-int8"]["speedup_vs_fp32"] = (artifacts[f"{fmt}-fp32"]["latency_ms_1thread"]
                                                        / artifacts[f"{fmt}-int8"]["latency_ms_1thread"])


def write_results(stage_dir: Path, card: Scorecard, artifacts: dict, model: Encoder, plan: dict | None, model_ckpt: Path,
                  spath: Path, sck: dict, pp: Preprocess, data_spec: str, t0: float) -> None:
    report = card.report
    tpath = card.teacher_path(sck)
    write_json_atomic(report, stage_dir / "report.json")
    (stage_dir / "report.md").write_text(compress_table(report) + "\n")
    write_manifest(stage_dir, "compress",
                   inputs={"student": str(spath), "student_sha256": checkpoint.sha256(spath), "data": data_spec,
                           "teacher": str(tpath) if tpath else None},
                   spec=model.spec.to_dict(), preprocess=pp.to_dict(), embed_dim=model.embed_dim,
                   metrics={k: {m: v for m, v in r.items() if isinstance(v, (int, float))} for k, r in report.items()},
                   wall_time_s=time.time() - t0,
                   artifacts={**({"checkpoint": str(model_ckpt), "checkpoint_sha256": checkpoint.sha256(model_ckpt)} if plan else {}),
                              **artifacts},
                   extra={"pruning": {k: v for k, v in (plan or {}).items() if k != "history"}})


def main(cfg: config.CompressConfig) -> dict:
    """`edgeclr compress`: prune -> recover -> export FP32 -> INT8 -> report; OUT/compress."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    student, sck, spath = load_encoder(cfg.student, device, role="student")
    cfg.out = cfg.out or str(checkpoint.run_dir_of(spath))
    with hold(cfg.out, "the run folder", is_dir=True):  # one writer per run folder
        return _compress(cfg, student, sck, spath, device, t0)


def _compress(cfg: config.CompressConfig, student: Encoder, sck: dict, spath: Path, device, t0: float) -> dict:
    stage_dir, pruned_done, resume_from = check_output(cfg, spath)
    pp = Preprocess.from_dict(sck["preprocess"])
    scfg = sck.get("config") or {}
    data_spec = cfg.data or scfg.get("data")
    # the calibration images before any pruning: too few readable images fail here, not after the recovery
    calib = calibration_inputs(cfg.calib_data or data_spec, pp, cfg.calib_images, cfg.seed, scfg) if cfg.int8 else None
    card = Scorecard.start(cfg, student, sck, pp, data_spec, device)
    model, plan, model_ckpt = prune_or_resume(cfg, card, student, sck, spath, pp, stage_dir, pruned_done, resume_from)
    artifacts, calib = export_and_quantize(cfg, card, model, model_ckpt, pp, data_spec, scfg, stage_dir / "models", calib)
    measure_latency(cfg, card.report, artifacts)
    card.add_retention()
    write_results(stage_dir, card, artifacts, model, plan, model_ckpt, spath, sck, pp, data_spec, t0)
    return {"stage_dir": str(stage_dir), "report": card.report, "table": compress_table(card.report), "artifacts": artifacts}
