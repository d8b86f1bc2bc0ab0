"""Export: `edgeclr export` writes a checkpoint's model as a self-describing FP32 file: for an
embedding model the encoder without its projection head, for a classifier encoder + head (the task
table, `edgeclr.tasks`, says what each task exports and how its parity is checked).

    load_model -> the task's module (tasks.TASKS) -> WRITERS[fmt] -> the task's parity check -> main

`edgeclr.formats.EXPORT_FORMATS` is the single source of truth for formats, their files, the
options each allows and their writers (below). Every export is written under a temporary name, checked (onnx.checker, then its
outputs against torch's on real images of the run's data, through `edgeclr.runtime`, the code
the device runs), and only then renamed into place: a failed check is an error and leaves nothing
that looks finished.

ONNX goes through the TorchScript-based exporter (`dynamo=False`, opset 17 by default): it writes
one file with GlobalAveragePool, which onnxruntime's quantiser handles (the dynamo exporter writes
ReduceMean, which stays float, and needs onnxscript). OpenVINO IR is converted from that ONNX
graph and saved in FP32 (`compress_to_fp16=False`); IR is a pair, model.xml + model.bin.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgeclr
from edgeclr import checkpoint, config, data, tasks
from edgeclr.errors import ExportError
from edgeclr.formats import EXPORT_FORMATS, ExportFormat
from edgeclr.heldout import eval_inputs
from edgeclr.loading import load_encoder, open_like_run
from edgeclr.lock import hold
from edgeclr.models import count_macs, count_params
from edgeclr.rundir import make_writable_dir, read_manifest, write_json_atomic, write_manifest
from edgeclr.runtime import ModelMeta, Preprocess, open_model

log = logging.getLogger("edgeclr.export")



def load_model(target: str | Path) -> tuple[nn.Module, dict, Path]:
    """(encoder in eval mode on CPU, checkpoint, path) from any stage's checkpoint or a run folder
    (whose most downstream stage is taken)."""
    return load_encoder(target, "cpu")


# ----------------------------------------------------------------------------------------------
# writers: (model, example input, dynamic batch, opset, metadata, path) -> written files


def write_onnx(model: nn.Module, x: torch.Tensor, dynamic: bool, opset: int, meta: ModelMeta, path: Path) -> list[Path]:
    import onnx

    axes = {meta.input_name: {0: "batch"}, meta.output_name: {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[meta.input_name],
                      output_names=[meta.output_name], dynamic_axes=axes, do_constant_folding=True)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    onnx.helper.set_model_props(m, meta.to_props())
    m.producer_name, m.producer_version = "edgeclr", edgeclr.__version__
    onnx.save(m, str(path))
    return [path]


def write_openvino(model: nn.Module, x: torch.Tensor, dynamic: bool, opset: int, meta: ModelMeta, path: Path) -> list[Path]:
    import openvino as ov

    onnx_path = path.with_suffix(".tmp.onnx")
    try:
        write_onnx(model, x, dynamic, opset, meta, onnx_path)
        ov_model = ov.convert_model(str(onnx_path))
    finally:
        onnx_path.unlink(missing_ok=True)
    for k, v in meta.to_props().items():
        ov_model.set_rt_info(v, ["model_info", k])
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]


def write_torchscript(model: nn.Module, x: torch.Tensor, dynamic: bool, opset: int, meta: ModelMeta, path: Path) -> list[Path]:
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"edgeclr.json": json.dumps(meta.to_dict())})
    return [path]


# each export format's writer (model, example input, dynamic batch, opset, metadata, path) -> written files
WRITERS = {"onnx": write_onnx, "openvino": write_openvino, "torchscript": write_torchscript}


# ----------------------------------------------------------------------------------------------
# checks


def parity_images(data_spec: str, pp: Preprocess, n: int, ckpt_cfg: dict) -> torch.Tensor:
    """Up to n real images of the run's data through the one preprocessing path: (n, C, S, S)."""
    try:
        ds = open_like_run(data_spec, "test", pp.resize_size, ckpt_cfg)
    except data.DataError:
        ds = open_like_run(data_spec, "pretrain", pp.resize_size, ckpt_cfg)
    idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(np.int64)
    x, _ = eval_inputs(ds, pp, np.unique(idx))
    return x


def exported_outputs(fmt: ExportFormat, path: Path, x: torch.Tensor) -> np.ndarray:
    """Run the exported file the way the device will: edgeclr.runtime's front end of its task (or
    torch.jit for TorchScript)."""
    if fmt.runtime == "torch":
        m = torch.jit.load(str(path))
        with torch.no_grad():
            return m(x).numpy()
    return open_model(path, threads=0, precision="f32").run_arrays(x.numpy(), batch_size=len(x))


# ----------------------------------------------------------------------------------------------


def main(cfg: config.ExportConfig) -> dict:
    """`edgeclr export`: write, check and describe one exported model."""
    t0 = time.time()
    fmt = EXPORT_FORMATS[cfg.format]
    missing = [m for m in fmt.needs if not _importable(m)]
    if missing:
        raise config.ConfigError(f"--format {fmt.name} needs {', '.join(missing)}: pip install 'edgeclr[train,{fmt.extra}]'")
    if cfg.opset < 13 or cfg.opset > 17:
        raise config.ConfigError(f"--opset {cfg.opset}: the ONNX exporter used here writes opsets 13 to 17")
    encoder, ckpt, ckpt_path = load_model(cfg.target)
    out_dir = Path(cfg.out) if cfg.out else checkpoint.run_dir_of(ckpt_path) / "export"
    with hold(out_dir, "the export folder", is_dir=True):  # one writer per folder (its metadata.json and manifest)
        return _export(cfg, fmt, encoder, ckpt, ckpt_path, out_dir, t0)


def _export(cfg: config.ExportConfig, fmt: ExportFormat, encoder: nn.Module, ckpt: dict, ckpt_path: Path, out_dir: Path,
            t0: float) -> dict:
    make_writable_dir(out_dir)
    pp = Preprocess.from_dict(ckpt["preprocess"])
    if cfg.input_size and cfg.input_size != pp.input_size:
        pp = pp.at_size(cfg.input_size)
        log.warning("exporting at %d px; the model was trained at %d px", cfg.input_size, ckpt["preprocess"]["input_size"])
    task = tasks.of_checkpoint(ckpt, str(ckpt_path))
    model, fields = task.module(encoder, ckpt, cfg.normalize)
    path = out_dir / f"{cfg.name}{fmt.suffix}"
    meta = ModelMeta(preprocess=pp, embedding_dim=encoder.embed_dim, task=task.name, output_name=task.output_name,
                     **{"normalized": False, **fields},
                     dynamic_batch=cfg.dynamic_batch or fmt.name == "torchscript", precision="fp32",
                     source_stage=ckpt["stage"], checkpoint_sha256=checkpoint.sha256(ckpt_path),
                     edgeclr_version=edgeclr.__version__, model_spec=ckpt["spec"],
                     macs=count_macs(encoder, (pp.channels, pp.input_size, pp.input_size)), params=count_params(encoder))

    tmp = out_dir / f".{cfg.name}.partial{fmt.suffix}"
    data_spec = cfg.data or (ckpt.get("config") or {}).get("data")
    if not data_spec:
        raise config.ConfigError(f"{ckpt_path} does not record its dataset: pass --data with images for the parity check")
    x = parity_images(data_spec, pp, cfg.check_images, ckpt.get("config") or {})
    example = x[:1]
    try:
        written = WRITERS[fmt.name](model, example, meta.dynamic_batch, cfg.opset, meta, tmp)
        with torch.no_grad():
            ref = model(x).numpy()
        got = exported_outputs(fmt, tmp, x)
        if ref.shape != got.shape:
            raise ExportError(f"the exported model returns shape {got.shape}, torch {ref.shape}")
        check = task.parity(ref, got)
        failure = task.parity_failure(check, cfg.min_cosine)
        if failure:
            raise ExportError(f"{fmt.name} export of {ckpt_path} fails the parity check on {len(x)} real images: "
                              f"{failure}; nothing was written. Try another --opset or report it")
        final = []
        for f in written:
            dest = path.with_suffix(f.suffix) if f.suffix != fmt.suffix else path
            f.replace(dest)
            final.append(dest)
    finally:
        for f in out_dir.glob(f".{cfg.name}.partial*"):
            f.unlink()
    side = out_dir / "metadata.json"
    entries = json.loads(side.read_text()) if side.exists() else {}
    entries[path.name] = {**meta.to_dict(), "format": fmt.name, "opset": cfg.opset if "opset" in fmt.options else None}
    write_json_atomic(entries, side)

    artifacts = (read_manifest(out_dir).get("artifacts") or {})
    artifacts[path.name] = {"format": fmt.name, "files": [str(f) for f in final], "bytes": fmt.size_bytes(path),
                            "sha256": checkpoint.sha256(path), "parity": check, "parity_images": len(x)}
    write_manifest(out_dir, "export", inputs={"checkpoint": str(ckpt_path), "checkpoint_sha256": meta.checkpoint_sha256},
                   spec=ckpt["spec"], preprocess=pp.to_dict(), embed_dim=encoder.embed_dim, metrics={},
                   wall_time_s=time.time() - t0, artifacts=artifacts)
    log.info("%s: parity on %d images: %s", path, len(x), ", ".join(f"{k} {v:.3g}" for k, v in check.items()))
    return {"path": str(path), "files": [str(f) for f in final], "parity": check, "parity_images": len(x), "meta": meta.to_dict()}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
