import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import PP, make_checkpoint, run
from PIL import Image

from edgeclr import checkpoint, export
from edgeclr.models import list_models
from edgeclr.runtime import Embedder, ModelError


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_and_passes_parity(tmp_path, name, fmt):
    ck = make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", name)
    r = run(["export", str(tmp_path / "run"), "--format", fmt, "--check-images", "8"])
    assert "min cosine" in r.output
    d = tmp_path / "run" / "export"
    main = d / ("model.onnx" if fmt == "onnx" else "model.xml")
    assert main.exists() and not list(d.glob(".*partial*"))
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("model")) == (
        ["model.onnx"] if fmt == "onnx" else ["model.bin", "model.xml"])  # one file (IR: its xml + bin pair)
    e = Embedder.load(main)
    assert e.meta.preprocess == PP and e.meta.normalized and e.meta.source_stage == "train"
    assert e.meta.checkpoint_sha256 == checkpoint.sha256(ck) and e.meta.model_spec["name"] == name
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    y3, y1 = e.embed_arrays(x), e.embed_arrays(x[:1])  # dynamic batch: 3 and 1
    assert y3.shape == (3, e.dim) and np.allclose(y3[:1], y1, atol=1e-4)
    assert np.allclose(np.linalg.norm(y3, axis=1), 1, atol=1e-4)
    man = json.loads((d / "manifest.json").read_text())
    assert man["artifacts"][main.name]["parity"]["min_cosine"] >= 0.9999
    assert json.loads((d / "metadata.json").read_text())[main.name]["embedding_dim"] == e.dim


def test_static_batch_and_torchscript_and_no_normalize(tmp_path):
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    run(["export", str(tmp_path / "run"), "--static-batch", "--no-normalize", "--check-images", "4"])
    e = Embedder.load(tmp_path / "run" / "export" / "model.onnx")
    assert e.backend.batch == 1 and not e.meta.dynamic_batch and not e.meta.normalized
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    assert e.embed_arrays(x).shape == (3, 64)  # a fixed-batch model is run image by image
    run(["export", str(tmp_path / "run"), "--format", "torchscript", "--check-images", "4"])
    files = {"edgeclr.json": ""}
    m = torch.jit.load(str(tmp_path / "run" / "export" / "model.pt"), _extra_files=files)
    assert json.loads(files["edgeclr.json"])["input_size"] == 16
    assert m(torch.from_numpy(x)).shape == (3, 64)


def test_a_failed_parity_check_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    real = export.exported_outputs
    monkeypatch.setattr(export, "exported_outputs", lambda f, p, x: real(f, p, x) + np.float32(0.3) * np.roll(real(f, p, x), 1, 1))
    r = run(["export", str(tmp_path / "run"), "--check-images", "4"], ok=False)
    assert r.exit_code == 2 and "fails the parity check" in r.output
    assert not [p for p in (tmp_path / "run" / "export").iterdir() if "model" in p.name]


def test_bad_export_requests(tmp_path):
    r = run(["export", str(tmp_path / "nothing")], ok=False)
    assert r.exit_code == 2 and "does not exist" in r.output
    r = run(["export", str(tmp_path), "--format", "tflite"], ok=False)
    assert r.exit_code == 2 and "tflite" in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load model"):
        Embedder.load(bad)
    with pytest.raises(ModelError, match="unknown model format"):
        Embedder.load(_touch(tmp_path / "m.tflite"))


def _touch(p):
    p.write_bytes(b"x")
    return p


def test_exported_model_on_files_equals_torch_on_eval_inputs(tmp_path):
    """The device path (file -> runtime preprocessing -> onnxruntime) equals torch evaluation."""
    from edgeclr.heldout import eval_inputs
    from edgeclr.loading import load_encoder

    ck = make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "mobilenet_v3_small")
    run(["export", str(tmp_path / "run"), "--check-images", "4"])
    files = []
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(40, 30), (16, 16), (25, 70)]):
        f = tmp_path / "imgs" / f"{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(f)  # RGB files into a 1-channel model
        files.append(f)
    from edgeclr import data

    ds = data.open_dataset(str(tmp_path / "imgs"), "pretrain")
    ds.channels = 1
    x, _ = eval_inputs(ds, PP)
    model, _, _ = load_encoder(ck)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.embed(x), dim=1).numpy()
    got = Embedder.load(tmp_path / "run" / "export" / "model.onnx").embed([str(p) for p in ds.paths])
    assert np.allclose(ref, got, atol=1e-5)


def test_the_runtime_works_with_torch_blocked(tmp_path):
    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "mobilenet_v2")
    run(["export", str(tmp_path / "run"), "--check-images", "4"])
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20), np.uint8) + 90).save(img)
    code = (f"import sys; sys.modules['torch'] = None\n"
            f"from edgeclr.runtime import Embedder\n"
            f"e = Embedder.load({str(tmp_path / 'run' / 'export' / 'model.onnx')!r})\n"
            f"v = e.embed([{str(img)!r}])\n"
            f"assert v.shape == (1, e.dim), v.shape\n"
            f"import edgeclr.cli\n"
            f"print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
