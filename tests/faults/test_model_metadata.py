"""Exported models whose metadata is missing, malformed or inconsistent with the graph: the runtime
refuses them with an error naming the file and the fix, in ONNX and OpenVINO alike."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers import make_checkpoint, run

from edgeclr.runtime import Embedder, ModelError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta")
    ck = make_checkpoint(d / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    for fmt in ("onnx", "openvino"):
        run(["export", str(ck), "--out", str(d / "export"), "--format", fmt, "--check-images", "2"])
    return d / "export"


def _edit_onnx(src, dst, change):
    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    change(props)
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(dst))
    return dst


def test_the_untouched_exports_load(exported):
    for f in ("model.onnx", "model.xml"):
        e = Embedder.load(exported / f)
        assert e.dim == e.meta.embedding_dim


@pytest.mark.parametrize("case,change,match", [
    ("missing", lambda p: p.clear(), "carries no usable edgeclr metadata"),
    ("malformed", lambda p: p.update(input_size="sixteen"), "carries no usable edgeclr metadata"),
    ("wrong size", lambda p: p.update(input_size="32", resize_size="32"), "metadata input height 32, model 16"),
    ("wrong channels", lambda p: p.update(channels="3", mean="[0.5, 0.5, 0.5]", std="[0.2, 0.2, 0.2]"), "metadata channels 3, model 1"),
    ("wrong width", lambda p: p.update(embedding_dim="999"), "metadata embedding_dim 999, model output"),
    ("nonsense", lambda p: p.update(embedding_dim="0"), "must be >= 1"),
])
def test_bad_onnx_metadata_is_a_clear_error(exported, tmp_path, case, change, match):
    bad = _edit_onnx(exported / "model.onnx", tmp_path / "bad.onnx", change)
    with pytest.raises(ModelError, match=match) as e:
        Embedder.load(bad)
    assert str(bad) in str(e.value)


def test_bad_openvino_metadata_is_a_clear_error(exported, tmp_path):
    import openvino as ov

    m = ov.Core().read_model(str(exported / "model.xml"))
    m.set_rt_info(json.dumps(7), ["model_info", "embedding_dim"])
    ov.save_model(m, str(tmp_path / "bad.xml"), compress_to_fp16=False)
    with pytest.raises(ModelError, match="metadata embedding_dim 7, model output"):
        Embedder.load(tmp_path / "bad.xml")


def test_a_truncated_model_file_is_a_clear_error(exported, tmp_path):
    raw = (exported / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelError, match="cannot load model .*cut.onnx"):
        Embedder.load(tmp_path / "cut.onnx")
