"""INT8 post-training quantisation of exported FP32 graphs, calibrated on real images.

    calibration_inputs -> float_scope (what stays float) -> quantize_onnx | quantize_openvino

onnxruntime: `quant_pre_process`, static QDQ, per-channel weights, u8 activations on x86 and s8 on
ARM. OpenVINO: NNCF `quantize` (performance preset, fast bias correction). Both leave the first
conv, the embedding layer and squeeze-excitation branches in float (docs/compression.md).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeclr import config, data
from edgeclr.heldout import eval_inputs
from edgeclr.loading import open_like_run
from edgeclr.models import Encoder
from edgeclr.runtime import Preprocess

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__package__)  # compress's logger: one name for the whole stage


def calibration_inputs(spec: str, pp: Preprocess, n: int, seed: int, ckpt_cfg: dict) -> np.ndarray:
    """Up to n real images of `spec` (its pretraining split) through the runtime's preprocessing: (m, C, S, S).

    A dataset with fewer readable images than n gives what it has, with a warning, down to
    CompressConfig.MIN_CALIB images.

    Raises:
        DataError: fewer than CompressConfig.MIN_CALIB readable images.
    """
    ds = open_like_run(spec, "pretrain", pp.resize_size, ckpt_cfg)
    pick = np.sort(np.random.default_rng(seed).choice(len(ds), min(len(ds), n), replace=False))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            x, _ = eval_inputs(ds, pp, pick)
        except data.DataError:
            x = np.zeros((0,))
    floor = config.CompressConfig.MIN_CALIB
    if len(x) < floor:
        bad = sum("skipped" in str(m.message) for m in w)
        raise data.DataError(f"INT8 calibration needs at least {floor} readable images; {spec} has {len(ds)} image(s), {bad} of "
                             f"those picked unreadable, {len(x)} usable. Give --calib-data a folder with more images, or "
                             "export FP32 only (--fp32-only)")
    if len(x) < n:
        log.warning("INT8 calibration on the %d readable image(s) of %s (%d asked for with --calib-images)", len(x), spec, n)
    return np.asarray(x, np.float32)


def onnx_scopes(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(submodule, the prefix torch.onnx gives its nodes' names), e.g. MobileNetV3's
    backbone.features.4.block.2 -> "/backbone/features/features.4/block/block.2": a child of a
    container (Sequential, ModuleList, ModuleDict) is named after its parent, "parent.child"."""
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    out = []

    def walk(mod, prefix, comp):
        for name, child in mod.named_children():
            c = f"{comp}.{name}" if comp and isinstance(mod, containers) else name
            out.append((child, f"{prefix}/{c}"))
            walk(child, f"{prefix}/{c}", c)

    walk(model, "", "")
    return out


# ops that may run between the first conv and the next weighted layer, on that conv's output alone
_STEM_TAIL = {"Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid", "BatchNormalization", "MaxPool", "AveragePool"}


def float_scope(onnx_path: Path, model: Encoder) -> dict[str, list[str]]:
    """ONNX node names to leave in float, by reason: first conv (with the activation and pooling on
    its output up to the next weighted layer), embedding layer, squeeze-excitation.

    The stem's tail stays float with it: quantised, a ResNet stem's MaxPool ran on 8-channel u8
    maps at full resolution 4x slower than in f32 (OpenVINO CPU, AVX2) after an f32->u8 reorder of
    the 4x larger map; kept float, the pruned ResNet-18 w16 student's INT8 IR went from 1.57x to
    1.73x its FP32 IR at 224 px (benchmarks/results/compress_fashion_mnist/resnet18-w16.md).
    """
    import onnx
    from torchvision.ops.misc import SqueezeExcitation

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inp = g.input[0].name
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    first, node = [], next((n for n in g.node if n.op_type == "Conv" and inp in n.input), None)
    while node is not None:  # the first conv, then its output's sole consumer while that is a stem op
        first.append(node.name)
        nxt = consumers.get(node.output[0], []) if len(node.output) == 1 else []
        node = nxt[0] if len(nxt) == 1 and nxt[0].op_type in _STEM_TAIL else None
    weighted = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    last = [weighted[-1].name] if weighted else []
    # a module called through a method (EmbeddingModel -> encoder.embed) leaves no scope of its own:
    # match the prefix without its leading parts too
    se_prefixes = tuple({"/" + "/".join(parts[i:]) + "/" for m, p in onnx_scopes(model) if isinstance(m, SqueezeExcitation)
                         for parts in [p.strip("/").split("/")] for i in range(len(parts) - 1)})
    se = [n.name for n in g.node if n.name.startswith(se_prefixes)]
    return {"first_conv": first, "embedding_layer": last, "squeeze_excitation": se}


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed arrays, one image per call."""

    def __init__(self, name: str, x: np.ndarray):
        self.name, self.x, self.i = name, x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def quantize_onnx(fp32: Path, out: Path, calib: np.ndarray, target: str, exclude: list[str]) -> dict:
    """Static QDQ INT8 of an exported FP32 ONNX model; writes `out`; returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    act = QuantType.QUInt8 if target == "x86" else QuantType.QInt8
    pre = out.with_name(f".{out.stem}.pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        quantize_static(str(pre), str(out), _Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    m = onnx.load(str(out))
    props = {p.key: p.value for p in m.metadata_props}
    props["precision"] = json.dumps("int8")
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(out))
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "activations": act.name, "weights": "QInt8", "calibration": "MinMax", "calib_images": len(calib)}


def quantize_openvino(fp32_xml: Path, out: Path, calib: np.ndarray, exclude: list[str]) -> dict:
    """NNCF post-training INT8 of an FP32 OpenVINO IR; writes out (.xml + .bin).

    NNCF runs in a child process: importing it beside torch patches torch's functions, and a later
    torch.onnx export in the same process crashed (segmentation fault) on this machine.
    """
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if not all(importlib.util.find_spec(m) for m in ("nncf", "openvino")):
        raise config.ConfigError("OpenVINO INT8 needs openvino and nncf: pip install 'edgeclr[openvino,compress]'")
    with tempfile.TemporaryDirectory() as tmp:
        arr = Path(tmp) / "calib.npy"
        np.save(arr, np.ascontiguousarray(calib, np.float32))
        job = json.dumps({"fp32": str(fp32_xml), "out": str(out), "calib": str(arr), "exclude": list(exclude)})
        r = subprocess.run([sys.executable, "-m", "edgeclr.compress.quantize", job], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"NNCF quantisation of {fp32_xml} failed (exit {r.returncode}): {r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def scope_nodes(scope: dict[str, list[str]]) -> list[str]:
    """The ONNX node names a float scope ({reason: [names]}, float_scope) leaves in float, sorted: what the quantisers exclude."""
    return sorted({n for names in scope.values() for n in names})


def write_int8(fp32: Path, final: Path, calib: np.ndarray, target: str, exclude: list[str], check=None) -> dict:
    """The one way an INT8 file is written: the FP32 export (ONNX or OpenVINO IR, by its suffix)
    quantised under a temporary name, `check(tmp)` run on it (metadata, parity, a budget: raise to
    refuse), then each of its files renamed to `final`'s name, companions (an IR's .bin) first, so
    a killed or refused run never leaves a file that a re-run takes as built. Returns the
    quantisation record."""
    from edgeclr.formats import format_of

    tmp = final.with_name(f".{final.stem}.partial{final.suffix}")
    try:
        info = (quantize_onnx(fp32, tmp, calib, target, exclude) if fp32.suffix == ".onnx"
                else quantize_openvino(fp32, tmp, calib, exclude))
        if check is not None:
            check(tmp)
        for f in sorted(format_of(tmp).files(tmp), key=lambda f: f.suffix == final.suffix):
            f.replace(final.with_suffix(f.suffix))
    finally:
        for f in final.parent.glob(f".{final.stem}.partial*"):
            f.unlink()
    return info


def _nncf_job(job: dict) -> dict:
    import nncf
    import openvino as ov

    calib = np.load(job["calib"])
    model = ov.Core().read_model(job["fp32"])
    names = {op.get_friendly_name() for op in model.get_ops()}
    # OpenVINO's ONNX frontend splits a biased Conv/Gemm into "<name>/WithoutBiases" (the
    # convolution or matmul) + "<name>" (the bias Add): ignore both, or the layer is quantised anyway
    ignored = sorted(m for n in job["exclude"] for m in (n, n + "/WithoutBiases") if m in names)
    ds = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    q = nncf.quantize(model, ds, subset_size=len(calib), preset=nncf.QuantizationPreset.PERFORMANCE,
                      fast_bias_correction=True, ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    q.set_rt_info(json.dumps("int8"), ["model_info", "precision"])
    ov.save_model(q, job["out"], compress_to_fp16=False)
    return {"tool": "nncf.quantize", "nncf": nncf.__version__, "preset": "performance", "fast_bias_correction": True,
            "calib_images": len(calib), "ignored": ignored}


if __name__ == "__main__":
    import sys

    print(json.dumps(_nncf_job(json.loads(sys.argv[1]))), flush=True)
