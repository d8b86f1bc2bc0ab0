"""Compression: `edgeclr compress` = structural pruning with recovery, then INT8 that is really faster.

    load_student -> [prune.prune_step -> recover (distill.DistillTrainer, train.fit)] x steps
      -> export FP32 (export.main) -> quantize.quantize_onnx / quantize_openvino (real calibration images)
      -> retention report against the FP32 student and the teacher -> one manifest

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

INT8 (../shared/FIELD-NOTES.md, INT8):
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

import copy
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeclr import checkpoint, config, data
from edgeclr.compress.prune import WORK, apply_pruning, count_macs, example_input, prune_and_recover, prune_step, ratio_for_macs  # noqa: F401
from edgeclr.compress.quantize import calibration_inputs, float_scope, quantize_onnx, quantize_openvino  # noqa: F401
from edgeclr.errors import CompressError  # noqa: F401  (raised here; defined with the others)
from edgeclr.models import Encoder, model_from_checkpoint
from edgeclr.runtime import Embedder, ModelMeta, Preprocess, median_latency_ms

log = logging.getLogger("edgeclr.compress")


# ----------------------------------------------------------------------------------------------
# evaluation of every artifact on held-out images


@dataclasses.dataclass
class HeldOut:
    """Labeled bank (train split) and queries (test split), preprocessed once."""

    bank_x: np.ndarray
    bank_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray

    @classmethod
    def load(cls, spec: str, pp: Preprocess, max_bank: int, seed: int, ckpt_cfg: dict) -> HeldOut | None:
        from edgeclr.evaluate import eval_inputs

        kw = dict(base_size=pp.resize_size, tile_size=ckpt_cfg.get("tile_size", 64), tile_stride=ckpt_cfg.get("tile_stride", 64),
                  tile_min_foreground=ckpt_cfg.get("tile_min_foreground", 0.5), seed=seed)
        bank, query = data.open_dataset(spec, "train", **kw), data.open_dataset(spec, "test", **kw)
        if not (data.has_labels(bank) and data.has_labels(query)):
            return None
        rng = np.random.default_rng(seed)
        bi = np.sort(rng.choice(len(bank), max_bank, replace=False)) if len(bank) > max_bank else None
        qi = np.sort(rng.choice(len(query), max_bank, replace=False)) if len(query) > max_bank else None
        bx, bk = eval_inputs(bank, pp, bi)
        qx, qk = eval_inputs(query, pp, qi)
        return cls(bx.numpy(), bank.labels[bk], qx.numpy(), query.labels[qk])

    def score(self, embed_fn, ref: dict | None = None) -> dict:
        """kNN accuracy of embed_fn's embeddings; against `ref` (another score's output): cosine
        agreement of the embeddings and agreement of the kNN predictions."""
        from edgeclr.evaluate import knn_predict

        b, q = torch.from_numpy(embed_fn(self.bank_x)), torch.from_numpy(embed_fn(self.query_x))
        pred = knn_predict(b, torch.as_tensor(self.bank_y), q, num_classes=int(max(self.bank_y.max(), self.query_y.max())) + 1)
        out = {"knn_top1": 100.0 * float((pred.numpy() == self.query_y).mean()), "_pred": pred.numpy(), "_q": q.numpy()}
        if ref is not None:
            a = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
            r = torch.from_numpy(ref["_q"])
            r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = (a * r).sum(1)
            out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                       knn_agreement=float((pred.numpy() == ref["_pred"]).mean()))
        return out


def latency_ms(path: Path, x: np.ndarray, threads: int = 1, runs: int = 50, warmup: int = 5) -> float:
    """Median latency of one batch-1 inference of an exported model at `threads` (ms)."""
    emb = Embedder.load(path, threads=threads, precision="f32")
    return median_latency_ms(lambda a: emb.embed_arrays(a, batch_size=1), x[:1], runs, warmup)


def _runtime_embed(path: Path):
    """(N, C, S, S) arrays -> embeddings, through edgeclr.runtime (what the device runs), all cores."""
    emb = Embedder.load(path, threads=0, precision="f32")
    return lambda a: emb.embed_arrays(a, 256)


def _files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


# ----------------------------------------------------------------------------------------------


def load_student(target: str | Path, device) -> tuple[Encoder, dict, Path]:
    """(student, checkpoint, path) from a distill (or compress) checkpoint, stage folder or run folder.

    A run folder gives its distilled student, also once it holds a compressed one: `compress RUN
    --out ELSEWHERE` compresses the same student again, never the pruned model a second time.
    """
    path = checkpoint.find(target, ("distill", "compress"))
    ckpt = checkpoint.load(path)
    if ckpt["stage"] not in ("distill", "compress"):
        raise checkpoint.CheckpointError(
            f"{path} is a {ckpt['stage']} checkpoint: compress takes a distilled student (`edgeclr distill`), "
            "e.g. runs/NAME or runs/NAME/distill")
    try:
        model = model_from_checkpoint(ckpt)
    except (ValueError, RuntimeError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{path}: its model cannot be rebuilt: {str(e)[:300]}") from e
    return model.to(device), ckpt, path


def main(cfg: config.CompressConfig) -> dict:
    """`edgeclr compress`: prune -> recover -> export FP32 -> INT8 -> report; OUT/compress."""
    from edgeclr import export
    from edgeclr.distill import load_teacher
    from edgeclr.rundir import write_json_atomic, write_manifest
    from edgeclr.train import resolve_device

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    student, sck, spath = load_student(cfg.student, device)
    if cfg.out is None:
        cfg.out = str(checkpoint.run_dir_of(spath))
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
    from edgeclr.rundir import make_writable_dir

    make_writable_dir(stage_dir)
    pp = Preprocess.from_dict(sck["preprocess"])
    scfg = sck.get("config") or {}
    data_spec = cfg.data or scfg.get("data")
    fp32_student = copy.deepcopy(student).eval()

    report: dict[str, dict] = {}
    held = HeldOut.load(data_spec, pp, cfg.eval_images, cfg.seed, scfg)
    if held is None:
        log.warning("%s has no labels: the report gives embedding agreement only, and --max-drop cannot be checked", data_spec)

    def torch_embed(m):
        def fn(a):
            with torch.no_grad():
                return torch.cat([m.embed(torch.from_numpy(a[i:i + 512]).to(device)).float().cpu()
                                  for i in range(0, len(a), 512)]).numpy()
        return fn

    base = held.score(torch_embed(fp32_student)) if held else None
    tpath = cfg.teacher or (sck.get("teacher") or {}).get("path")
    if held and tpath and Path(tpath).exists():
        teacher = load_teacher(tpath, device)[0]
        report["teacher"] = _public(held.score(torch_embed(teacher), base), teacher, example_input(teacher, pp))
    report["student"] = _public(base, fp32_student, example_input(fp32_student, pp)) if base else {}

    def check_budget(name: str, r: dict):
        if base is None or cfg.max_drop is None:
            return
        drop = base["knn_top1"] - r["knn_top1"]
        if drop > cfg.max_drop:
            raise CompressError(f"{name}: kNN accuracy {r['knn_top1']:.2f}% is {drop:.2f} points below the FP32 student's "
                                f"{base['knn_top1']:.2f}%, over --max-drop {cfg.max_drop}; it was not written (nothing "
                                "overwritten). Prune less (--prune-ratio/--target-macs), recover longer (--recover-epochs), "
                                "or use more --calib-images")

    # 1. prune + recover
    model, model_ckpt, plan = student, spath, None
    if pruned_done:  # the pruned model passed its checks before the interruption: export it again
        model_ckpt = ck_dir / "last.pt"
        ck = checkpoint.load(model_ckpt, map_location=device)
        model, plan = model_from_checkpoint(ck).to(device).eval(), dict(ck["pruning"])
        x = example_input(model, pp).to(device)
        (plan["macs"], plan["params"]), (base_macs, base_params) = count_macs(model, x), count_macs(fp32_student, x)
        plan.update(mac_ratio=plan["macs"] / base_macs, param_ratio=plan["params"] / base_params)
        if held:
            report["pruned"] = _public(held.score(torch_embed(model), base), model, example_input(model, pp))
        shutil.rmtree(stage_dir / "models", ignore_errors=True)  # a partial export, rewritten from the checkpoint
        log.info("resumed: pruning had finished (%s); exporting it again", model_ckpt)
    elif cfg.pruning:
        model, plan, model_ckpt = prune_and_recover(cfg, student, sck, spath, device, stage_dir, resume_from)
        if held:
            r = held.score(torch_embed(model), base)
            report["pruned"] = _public(r, model, example_input(model, pp))
            try:
                check_budget("the pruned student", r)
            except CompressError as e:
                rejected = model_ckpt.with_name("rejected.pt")
                os.replace(model_ckpt, rejected)
                raise CompressError(f"{e} (kept for inspection as {rejected})") from None
        final_ckpt = model_ckpt.with_name("last.pt")
        os.replace(model_ckpt, final_ckpt)
        model_ckpt = final_ckpt
        log.info("pruned: %.2fM -> %.2fM MACs (%.2fx fewer)", plan["base_macs"] / 1e6, plan["macs"] / 1e6, 1 / plan["mac_ratio"])

    # 2. export FP32, then 3. INT8; each artifact lands in a hidden name until it passes
    models_dir = stage_dir / "models"
    artifacts: dict[str, dict] = {}
    formats = [f for f in cfg.formats.split(",") if f]
    calib = None
    for fmt in formats:
        ecfg = config.ExportConfig(target=str(model_ckpt), format=fmt, out=str(models_dir), name="fp32", data=data_spec)
        e = export.main(ecfg)
        fp32_path = Path(e["path"])
        artifacts[f"{fmt}-fp32"] = {"path": str(fp32_path), "bytes": _size(fp32_path), "parity": e["parity"]}
        if held:
            r = held.score(_runtime_embed(fp32_path), base)
            report[f"{fmt}-fp32"] = _public(r, None, None)
        if not cfg.int8:
            continue
        if calib is None:
            calib = calibration_inputs(cfg.calib_data or data_spec, pp, cfg.calib_images, cfg.seed, scfg)
        onnx_fp32 = models_dir / "fp32.onnx" if fmt == "onnx" else None
        if onnx_fp32 is None:  # node names: from an ONNX export of the same model (OpenVINO keeps them)
            onnx_fp32 = models_dir / ".scope.onnx"
            export._write_onnx(export.EmbeddingModel(model, True).eval(), torch.from_numpy(calib[:1]), True, 17,
                               ModelMeta(preprocess=pp, embedding_dim=model.embed_dim, normalized=True), onnx_fp32)
        scope = float_scope(onnx_fp32, export.EmbeddingModel(model, True)) if cfg.auto_exclude else {}
        if onnx_fp32.name == ".scope.onnx":
            onnx_fp32.unlink()
        exclude = sorted({n for v in scope.values() for n in v})
        final = models_dir / f"int8{fp32_path.suffix}"
        tmp = models_dir / f".int8.partial{fp32_path.suffix}"
        try:
            if fmt == "onnx":
                qinfo = quantize_onnx(fp32_path, tmp, calib, cfg.target, exclude)
            else:
                qinfo = quantize_openvino(fp32_path, tmp, calib, exclude)
            qinfo["float_scope"] = scope
            ok = Embedder.load(tmp, threads=0, precision="f32").meta.precision == "int8"
            if not ok:
                raise CompressError(f"{tmp}: the quantised model does not carry its metadata")
            if held:
                r = held.score(_runtime_embed(tmp), base)
                check_budget(f"the {fmt} INT8 model", r)
                report[f"{fmt}-int8"] = _public(r, None, None)
            for f in _files(tmp):
                f.replace(final.with_suffix(f.suffix))
        finally:
            for f in models_dir.glob(".int8.partial*"):
                f.unlink()
        artifacts[f"{fmt}-int8"] = {"path": str(final), "bytes": _size(final), "quantization": qinfo}

    # 4. latency at 1 thread (batch 1), each runtime against its own FP32 model, and sizes
    x_lat = (calib if calib is not None else held.query_x if held else
             export.parity_images(data_spec, pp, 2, scfg).numpy())
    for key, a in artifacts.items():
        a["latency_ms_1thread"] = latency_ms(Path(a["path"]), x_lat, threads=1, runs=cfg.latency_runs)
        report.setdefault(key, {}).update(bytes=a["bytes"], latency_ms_1thread=a["latency_ms_1thread"])
    for fmt in formats:
        if f"{fmt}-int8" in artifacts:
            sp = artifacts[f"{fmt}-fp32"]["latency_ms_1thread"] / artifacts[f"{fmt}-int8"]["latency_ms_1thread"]
            report[f"{fmt}-int8"]["speedup_vs_fp32"] = sp
    if base is not None:
        for key, r in report.items():
            if "knn_top1" in r and key != "teacher":
                r["retention"] = r["knn_top1"] / base["knn_top1"]

    write_json_atomic(report, stage_dir / "report.json")
    (stage_dir / "report.md").write_text(format_report(report) + "\n")
    write_manifest(stage_dir, "compress",
                   inputs={"student": str(spath), "student_sha256": checkpoint.sha256(spath), "data": data_spec,
                           "teacher": str(tpath) if tpath else None},
                   spec=model.spec.to_dict(), preprocess=pp.to_dict(), embed_dim=model.embed_dim,
                   metrics={k: {m: v for m, v in r.items() if isinstance(v, (int, float))} for k, r in report.items()},
                   wall_time_s=time.time() - t0,
                   artifacts={**({"checkpoint": str(model_ckpt), "checkpoint_sha256": checkpoint.sha256(model_ckpt)} if plan else {}),
                              **artifacts},
                   extra={"pruning": {k: v for k, v in (plan or {}).items() if k != "history"}})
    return {"stage_dir": str(stage_dir), "report": report, "table": format_report(report), "artifacts": artifacts}


def _public(r: dict | None, model: nn.Module | None, x: torch.Tensor | None) -> dict:
    out = {k: v for k, v in (r or {}).items() if not k.startswith("_")}
    if model is not None:
        out["macs"], out["params"] = count_macs(model, x)
    return out


def format_report(report: dict) -> str:
    cols = [("knn_top1", "kNN top-1 %", "{:.2f}"), ("retention", "retention", "{:.3f}"), ("knn_agreement", "kNN agreement", "{:.3f}"),
            ("cosine_mean", "cosine", "{:.4f}"), ("macs", "MACs (M)", None), ("params", "params (M)", None),
            ("bytes", "size (MB)", None), ("latency_ms_1thread", "latency 1 thread (ms)", "{:.3f}"),
            ("speedup_vs_fp32", "INT8 speed-up", "{:.2f}x")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in report.items():
        cells = []
        for key, _, f in cols:
            v = r.get(key)
            if v is None:
                cells.append("")
            elif key in ("macs", "params", "bytes"):
                cells.append(f"{v / 1e6:.2f}")
            else:
                cells.append(f.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

