"""edgeclr compress: pruning (widths, MACs, exact save/reload), INT8 (size, agreement), budgets, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, run

from edgeclr import config, models
from edgeclr.compress import prune, quantize
from edgeclr.loading import load_encoder
from edgeclr.models import ModelSpec, create_model, model_from_checkpoint
from edgeclr.runtime import Embedder

pytest.importorskip("torch_pruning")

STUDENT = ["--model", "mobilenet_v2", "--epochs", "3", "--batch-size", "64", "--knn-every", "0", "--no-tensorboard",
           "--threads", "1"]
FAST = ["--threads", "1", "--no-tensorboard", "--latency-runs", "3", "--eval-images", "300", "--calib-images", "64"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    run(["train", *TINY, "--epochs", "3", "--out", str(out)])
    run(["distill", "--teacher", str(out), *STUDENT])
    return out


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "resnet18"])
def test_pruning_keeps_the_embedding_width_and_cuts_macs_as_asked(name):
    width = 16 if name.startswith("resnet") else None
    m = create_model(ModelSpec(name, in_chans=1, stem_stride=1, width=width, embed_dim=32, head_layers=0)).eval()
    x = torch.zeros(1, 1, 16, 16)
    macs0, _ = prune.count_macs(m, x)
    ratio = prune.ratio_for_macs(m, x, 0.5 * macs0, False)
    prune.prune_step(m, x, ratio, False)
    macs1, _ = prune.count_macs(m, x)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 32)
    assert macs1 / macs0 == pytest.approx(0.5, abs=0.05)
    widths = [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths  # round_to=8


def test_a_step_that_overshoots_its_goal_says_so_in_channels():
    """A width-16 ResNet loses at least 8 of a layer's 16 channels: a step asked for 90% of the MACs
    lands far below, at a bisected ratio that printed as "channel ratio 0.000" (nothing pruned, it read)."""

    m = create_model(ModelSpec("resnet18", in_chans=1, stem_stride=2, width=16, embed_dim=32, head_layers=0)).eval()
    x = torch.zeros(1, 1, 28, 28)
    macs0 = prune.count_macs(m, x)[0]
    before = prune.conv_channels(m)
    ratio = prune.ratio_for_macs(m, x, 0.9 * macs0, False)
    prune.prune_step(m, x, ratio, False)
    msg = prune.step_summary(m, x, ratio, before, macs0, 0.9 * macs0)
    removed = before - prune.conv_channels(m)
    assert 0 < ratio < 0.01 and removed > 0 and f"{removed} of {before} conv channels removed" in msg
    assert "below this step's goal" in msg and "multiples of 8" in msg
    assert "below" not in prune.step_summary(m, x, ratio, before, macs0, prune.count_macs(m, x)[0])


def test_channel_ratio_shrinks_parameters_quadratically():
    m = create_model(ModelSpec("mobilenet_v2", in_chans=1, stem_stride=1, embed_dim=32, head_layers=0)).eval()
    x = torch.zeros(1, 1, 16, 16)
    p0 = prune.count_macs(m, x)[1]
    prune.prune_step(m, x, 0.5, False)
    assert prune.count_macs(m, x)[1] / p0 == pytest.approx(0.25, abs=0.08)  # ~ (1 - 0.5)^2


def test_pruned_model_saves_without_pickle_and_reloads_exactly():
    spec = ModelSpec("mobilenet_v3_small", in_chans=1, stem_stride=1, embed_dim=32, head_layers=0)
    m = create_model(spec).eval()
    x = torch.zeros(1, 1, 16, 16)
    hist = prune.prune_step(m, x, 0.3, False)
    hist += prune.prune_step(m, x, 0.2, False)  # two steps replay in order
    pp = {"input_size": 16, "resize_size": 16, "mean": [0.5], "std": [0.25], "channels": 1}
    ck = {"spec": spec.to_dict(), "preprocess": pp, "model": m.state_dict(), "pruning": json.loads(json.dumps({"history": hist}))}
    m2 = model_from_checkpoint(ck).eval()
    xi = torch.randn(4, 1, 16, 16)
    assert torch.equal(m(xi), m2(xi))
    with pytest.raises(RuntimeError):  # the unpruned model does not take these weights
        create_model(spec).load_state_dict(ck["model"])


def test_float_scope_names_every_squeeze_excitation_node_of_the_exported_graph(tmp_path):
    """The SE branches are found in the ONNX graph whichever module is handed in (the prefixes once
    missed torch.onnx's 'features/features.4/block/block.2' naming and left every SE quantised)."""
    import onnx
    from torchvision.ops.misc import SqueezeExcitation

    from edgeclr import export
    from edgeclr.runtime import ModelMeta, Preprocess

    m = create_model(ModelSpec("mobilenet_v3_small", in_chans=1, stem_stride=1, embed_dim=16, head_layers=0)).eval()
    em = models.EmbeddingModel(m, True).eval()
    pp = Preprocess(input_size=32, resize_size=32, mean=(0.5,), std=(0.5,), channels=1)
    f = tmp_path / "m.onnx"
    export.write_onnx(em, torch.zeros(1, 1, 32, 32), True, 17, ModelMeta(preprocess=pp, embedding_dim=16, normalized=True), f)
    g = onnx.load(str(f)).graph
    for mod in (em, m):
        se = quantize.float_scope(f, mod)["squeeze_excitation"]
        convs = [n.name for n in g.node if n.op_type == "Conv" and n.name in se]
        assert len(convs) == 18 and all(("/fc1/" in n) or ("/fc2/" in n) for n in convs)
        assert len({n.rsplit("/", 2)[0] for n in convs}) == sum(isinstance(x, SqueezeExcitation) for x in m.modules()) == 9
        assert {n.op_type for n in g.node if n.name in se} == {"GlobalAveragePool", "Conv", "Relu", "HardSigmoid", "Mul"}
    assert quantize.float_scope(f, create_model(ModelSpec("mobilenet_v3_small_minimal", in_chans=1)))["squeeze_excitation"] == []


def test_the_stem_pooling_stays_float_with_the_first_conv(tmp_path):
    """A ResNet stem's ReLU and MaxPool join the first conv's float scope: quantised, OpenVINO ran
    that MaxPool on u8 maps at full resolution 4x slower than in f32, after an f32->u8 reorder of a
    4x larger map (the INT8 speed-up of the pruned ResNet student went from 1.57x to 1.73x)."""
    import openvino as ov

    from edgeclr import export
    from edgeclr.runtime import ModelMeta, Preprocess

    pytest.importorskip("nncf")
    m = create_model(ModelSpec("resnet18", in_chans=1, stem_stride=2, width=8, embed_dim=16, head_layers=0)).eval()
    em = models.EmbeddingModel(m, True).eval()
    pp = Preprocess(input_size=32, resize_size=32, mean=(0.5,), std=(0.5,), channels=1)
    meta, x = ModelMeta(preprocess=pp, embedding_dim=16, normalized=True), torch.zeros(1, 1, 32, 32)
    export.write_onnx(em, x, True, 17, meta, tmp_path / "m.onnx")
    export.write_openvino(em, x, True, 17, meta, tmp_path / "m.xml")
    scope = quantize.float_scope(tmp_path / "m.onnx", em)
    assert scope["first_conv"] == ["/backbone/conv1/Conv", "/backbone/relu/Relu", "/backbone/maxpool/MaxPool"]
    mobilenet = create_model(ModelSpec("mobilenet_v2", in_chans=1, embed_dim=16, head_layers=0)).eval()
    export.write_onnx(models.EmbeddingModel(mobilenet, True).eval(), x, True, 17, meta, tmp_path / "mb.onnx")
    assert [n.rsplit("/", 1)[1] for n in quantize.float_scope(tmp_path / "mb.onnx", mobilenet)["first_conv"]] == ["Conv", "Clip"]

    calib = np.random.default_rng(0).standard_normal((16, 1, 32, 32)).astype(np.float32)
    quantize.quantize_openvino(tmp_path / "m.xml", tmp_path / "int8.xml", calib, sorted(n for v in scope.values() for n in v))
    ops = ov.Core().compile_model(str(tmp_path / "int8.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).get_runtime_model().get_ordered_ops()
    prec = {op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str) for op in ops
            if "runtimePrecision" in op.get_rt_info()}
    assert prec["/backbone/maxpool/MaxPool"] == "f32"
    assert prec["/backbone/layer1/layer1.0/conv1/Conv/WithoutBiases"] in ("u8", "i8")  # the INT8 starts after the stem


def test_compress_end_to_end(student):
    r = run(["compress", str(student), "--target-macs", "0.5", "--prune-steps", "1", "--recover-epochs", "1", *FAST])
    d = student / "compress"
    rep = json.loads((d / "report.json").read_text())
    man = json.loads((d / "manifest.json").read_text())
    assert "| onnx-int8 |" in r.output and (d / "report.md").exists()
    assert rep["pruned"]["macs"] / rep["student"]["macs"] == pytest.approx(0.5, abs=0.05)
    for fmt, suffix in (("onnx", ".onnx"), ("openvino", ".xml")):
        f32, i8 = d / "models" / f"fp32{suffix}", d / "models" / f"int8{suffix}"
        assert f32.exists()
        assert i8.exists() and rep[f"{fmt}-int8"]["bytes"] < 0.5 * rep[f"{fmt}-fp32"]["bytes"]
        # agreement with the FP32 student on held-out images: pruning costs some, INT8 adds < 0.01 to it
        assert rep[f"{fmt}-fp32"]["cosine_mean"] > 0.9
        assert rep[f"{fmt}-int8"]["cosine_mean"] > rep[f"{fmt}-fp32"]["cosine_mean"] - 0.01
        assert rep[f"{fmt}-int8"]["latency_ms_1thread"] > 0
        e = Embedder.load(i8)
        assert e.meta.precision == "int8" and e.meta.embedding_dim == man["embedding_dim"]
    q = man["artifacts"]["onnx-int8"]["quantization"]
    assert q["per_channel"] and q["activations"] == "QUInt8" and q["float_scope"]["first_conv"]
    # OpenVINO runs the float scope in float: the first conv and the embedding layer read f32 inputs
    # (NNCF's ignored scope once named only their bias Adds, and every layer ran in 8 bits)
    import openvino as ov

    from edgeclr.bench import _ov_int8_layers

    low, total = _ov_int8_layers(ov.Core().compile_model(str(d / "models" / "int8.xml"), "CPU"))
    assert 0 < low <= total - 2, (low, total)
    assert not list((d / "models").glob(".*partial*"))
    # the pruned checkpoint reloads (plan replayed) and exports like any checkpoint
    model, ck, _ = load_encoder(d)
    assert ck["stage"] == "compress" and ck["pruning"]["history"]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, ck["spec"]["embed_dim"])
    run(["export", str(d), "--format", "onnx", "--out", str(student / "re-export")])
    # the retention table across every stage and artifact of the run
    r = run(["eval", "--compare", str(student), "--threads", "1", "--latency-runs", "3", "--max-train", "400"])
    cmp = json.loads((student / "compare.json").read_text())
    names = [x["model"] for x in cmp["rows"]]
    assert names[:3] == ["teacher", "student", "pruned"] and "compress/models/int8.onnx" in names
    assert "compress/models/int8.xml" in names and "| teacher |" in r.output
    for x in cmp["rows"][1:]:
        assert 0 <= x["knn_agreement"] <= 1 and 0 <= x["topk_overlap"] <= 1 and x["latency_ms_1thread"] > 0 and x["size_bytes"] > 0
    assert cmp["rows"][0]["speedup_vs_teacher"] == 1.0
    pruned = next(x for x in cmp["rows"] if x["model"] == "pruned")
    assert pruned["macs"] == rep["pruned"]["macs"]
    # a run folder that now holds a compressed model still names its distilled student (compressing
    # RUN again with another --out must not prune the pruned model a second time)
    assert load_encoder(student, "cpu", role="student")[2].parent.parent.name == "distill"


def test_max_drop_refuses_and_overwrites_nothing(student, tmp_path):
    """A student well above chance (a ResNet-18 at width 16: 44% kNN; the module's MobileNetV2 after 3
    epochs is near 10%, where a pruned copy can score higher by chance) pruned to half its channels."""
    out = tmp_path / "cut"
    run(["distill", "--teacher", str(student), "--model", "resnet18", "--width", "16", *STUDENT[2:], "--out", str(out)])
    r = run(["compress", str(out / "distill"), "--out", str(out), "--prune-ratio", "0.9", "--prune-steps", "1",
             "--recover-epochs", "0", "--max-drop", "0.01", "--formats", "onnx", *FAST], ok=False)
    assert r.exit_code == 2 and "--max-drop" in r.output and "not written" in r.output
    assert not (out / "compress" / "models").exists()


def test_calibration_needs_enough_readable_images(student, tmp_path, caplog):
    from PIL import Image

    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    r = run(["compress", str(student), "--out", str(tmp_path / "c"), "--prune-ratio", "0", "--formats", "onnx",
             "--calib-data", str(folder), *FAST[:-2], "--calib-images", "32"], ok=False)
    assert r.exit_code == 2 and "calibration needs at least 32 readable images" in r.output and "--calib-data" in r.output
    # fewer readable images than asked for, but enough: calibrates on those, and says so
    for i in range(5, 40):
        Image.fromarray(np.full((8, 8), 6 * i, np.uint8)).save(folder / f"ok{i}.png")
    ck = load_encoder(student / "distill", "cpu")[1]
    pp = quantize.Preprocess.from_dict(ck["preprocess"])
    with caplog.at_level("WARNING", logger="edgeclr.compress"):
        x = quantize.calibration_inputs(str(folder), pp, 300, 0, ck["config"])
    assert len(x) == 40 and "INT8 calibration on the 40 readable image(s)" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(["compress", str(student), "--out", str(tmp_path / "c2"), "--prune-ratio", "0", "--formats", "onnx",
             "--calib-data", str(empty), *FAST], ok=False)
    assert r.exit_code == 2 and "error:" in r.output


def test_compress_refuses_a_teacher_checkpoint(student):
    r = run(["compress", str(student / "train"), *FAST], ok=False)
    assert r.exit_code == 2 and "distilled student" in r.output


def test_config_rejects_both_ratio_and_macs():
    with pytest.raises(config.ConfigError, match="not both"):
        config.CompressConfig(student="x", prune_ratio=0.3, target_macs=0.5)
    assert config.CompressConfig(student="x").target_macs == 0.5
    assert not config.CompressConfig(student="x", prune_ratio=0).pruning


def test_an_interrupted_recovery_resumes_and_is_never_taken_for_a_result(student, tmp_path):
    from edgeclr import checkpoint

    out = tmp_path / "cut"
    args = ["compress", str(student / "distill"), "--out", str(out), "--prune-ratio", "0.3", "--prune-steps", "2",
            "--recover-epochs", "1", "--formats", "onnx", "--fp32-only", *FAST]
    r = run(args + ["--max-minutes", "1e-6"], ok=False)
    assert r.exit_code == 2 and "--resume" in r.output
    ck = checkpoint.load(out / "compress" / "checkpoints" / "prune.pt")
    assert ck["pruning"]["steps_done"] == 1 and ck["step"] == 1
    assert not (out / "compress" / "checkpoints" / "last.pt").exists()  # `export RUN` cannot pick a half-recovered model
    r = run(args, ok=False)
    assert r.exit_code == 2 and "interrupted" in r.output and "--resume" in r.output
    run(args + ["--resume"])
    ck = checkpoint.load(out / "compress" / "checkpoints" / "last.pt")
    assert ck["stage"] == "compress" and ck["pruning"]["steps_done"] == 2 and ck["epoch"] == 1
    assert (out / "compress" / "models" / "fp32.onnx").exists() and not (out / "compress" / "models" / "int8.onnx").exists()

    # killed after the pruning passed its checks, while exporting: --resume exports the same pruned model again
    d = out / "compress"
    sha = checkpoint.sha256(d / "checkpoints" / "last.pt")
    (d / "manifest.json").unlink()
    (d / "models" / "fp32.onnx").write_bytes(b"partial")
    r = run(args, ok=False)
    assert r.exit_code == 2 and "already holds" in r.output
    r = run(args + ["--resume"])
    assert checkpoint.sha256(d / "checkpoints" / "last.pt") == sha
    assert Embedder.load(d / "models" / "fp32.onnx").meta.embedding_dim > 0
    man = json.loads((d / "manifest.json").read_text())
    assert man["pruning"]["mac_ratio"] < 1 and man["artifacts"]["checkpoint_sha256"] == sha


@pytest.mark.parametrize("fmt", ["onnx"])  # an OpenVINO IR with its .bin goes the same way in test_compress_end_to_end
def test_write_int8_writes_only_a_file_that_passed_its_check(tmp_path, fmt):
    """write_int8, the one INT8 writer: a refused check leaves neither the file nor a partial one; a
    passed one leaves the whole file, which loads as INT8."""
    from helpers import PP, make_checkpoint

    from edgeclr import compress, export

    ck = make_checkpoint(tmp_path / "r" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    fp32 = export.main(config.ExportConfig(target=str(ck), format=fmt, out=str(tmp_path / "m"), name="fp32"))["path"]
    calib = quantize.calibration_inputs("digits", PP, 32, 0, {})
    final = tmp_path / "m" / f"int8{'.onnx' if fmt == 'onnx' else '.xml'}"

    def refuse(path):
        assert path.is_file() and path.name.startswith(".int8.partial")
        raise compress.CompressError("over budget")

    with pytest.raises(compress.CompressError, match="over budget"):
        compress.write_int8(Path(fp32), final, calib, "x86", [], refuse)
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(("int8", ".int8"))) == []
    info = compress.write_int8(Path(fp32), final, calib, "x86", [], compress.carries_int8_metadata)
    assert info["calib_images"] == 32 and Embedder.load(final, threads=1).meta.precision == "int8"
    assert fmt == "onnx" or final.with_suffix(".bin").is_file()
    assert not list((tmp_path / "m").glob(".int8.partial*"))
