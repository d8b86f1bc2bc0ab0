"""The torch-free device path: image inputs, `edgeclr embed`, `edgeclr search`, Index."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run
from PIL import Image

from edgeclr.runtime import Embedder, ImageError, Index, Preprocess, load_image


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An exported (ONNX) tiny teacher trained on digits (a random-init network's embeddings
    collapse: every image would be everyone's nearest neighbour)."""
    from helpers import TINY

    d = tmp_path_factory.mktemp("model")
    run(["train", *TINY, "--out", str(d / "run")])
    run(["export", str(d / "run"), "--check-images", "4"])
    return d / "run" / "export" / "model.onnx"


@pytest.fixture
def gallery(tmp_path):
    """Real images: digits at 32 px in class folders, PNG and JPEG."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "gallery"
    for i in range(30):
        sub = root / str(d.target[i])
        sub.mkdir(parents=True, exist_ok=True)
        a = (d.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(np.kron(a, np.ones((4, 4), np.uint8))).save(sub / f"{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


# -- inputs --------------------------------------------------------------------------------------


def test_preprocess_at_another_size_keeps_the_resize_to_crop_ratio():
    pp = Preprocess(input_size=224, resize_size=256, mean=(0.5,), std=(0.5,), channels=1)
    assert (pp.at_size(112).input_size, pp.at_size(112).resize_size) == (112, 128)
    assert pp.at_size(28).resize_size == 32 and pp.at_size(28).mean == pp.mean
    same = Preprocess(input_size=28, resize_size=28, mean=(0.5,), std=(0.5,), channels=1).at_size(224)
    assert (same.input_size, same.resize_size) == (224, 224)


def test_bad_files_are_named_errors(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good)
    raw = good.read_bytes()
    cases = {"zero.jpg": b"", "text.jpg": b"hello, not an image", "cut.jpg": raw[: raw.index(b"\xff\xda") + 30],
             "garbage.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_huge_image_is_refused_not_decoded(tmp_path):
    big = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(big)  # 196 Mpixel, a few kB on disk: a decompression bomb
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(big)


def test_a_large_jpeg_decodes_at_a_reduced_scale_and_evaluation_sees_the_same_pixels(tmp_path, model):
    from edgeclr import data, evaluate
    from edgeclr.runtime import preprocess

    rng = np.random.default_rng(0)
    big = tmp_path / "imgs" / "big.jpg"
    big.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), np.uint8)).save(big, quality=90)
    assert load_image(big, 3).size == (3000, 2000)
    assert load_image(big, 3, min_side=64).size == (375, 250)  # DCT scale 1/8, both sides still >= 64
    e = Embedder.load(model)
    ds = data.open_dataset(str(tmp_path / "imgs"), "pretrain")
    x, _ = evaluate.eval_inputs(ds, e.meta.preprocess)  # the torch-side path
    assert np.array_equal(x[0].numpy(), preprocess(load_image(big, 1, e.meta.preprocess.resize_size), e.meta.preprocess))
    assert np.allclose(e.embed([big]), e.embed_arrays(x.numpy()), atol=1e-6)


def test_grayscale_16bit_rgba_palette_and_exif_inputs(tmp_path):
    a16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png", 3).mode == "RGB"
    assert abs(np.asarray(load_image(tmp_path / "g16.png", 1)).max() - round(a16.max() / 257)) <= 1
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png", 3))[0, 0].tolist() == [255, 0, 0]
    Image.new("P", (10, 10), 3).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", 1).mode == "L"
    im = Image.new("L", (20, 10), 0)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg", 1).size == (10, 20)


# -- embed -------------------------------------------------------------------------------------


def test_embed_writes_ids_resumes_and_skips_corrupt_files(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    (gallery / "0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out), "--batch-size", "7"])
    assert "broken.jpg" in r.output and "30 x" in r.output
    emb = np.load(out)
    ids = (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert emb.shape == (30, 64) and len(ids) == 30 and all(Path(i).exists() for i in ids)
    direct = Embedder.load(model).embed(ids[:5])
    assert np.allclose(direct, emb[:5], atol=1e-5)
    # a grown folder: only the new file is embedded, earlier rows are kept as they are
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(gallery / "0" / "new.png")
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    assert "(1 new, 30 already done, 1 unreadable)" in r.output
    assert np.array_equal(np.load(out)[:30], emb)
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(tmp_path / "x.npy"), "--on-error", "raise"], ok=False)
    assert r.exit_code == 2 and "broken.jpg" in r.output


def test_embed_killed_midway_resumes_without_redoing(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "edgeclr", "embed", str(gallery), "--model", str(model), "--out", str(out),
                          "--batch-size", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ids = tmp_path / "emb.partial.ids.txt"
    while not ids.exists() or ids.read_text().count("\n") < 2:  # two images done
        assert p.poll() is None, p.stdout.read().decode()
    p.kill()
    p.wait()
    assert not out.exists()
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    done = int(r.output.split(" already done")[0].split(", ")[-1])
    assert 1 <= done < 30 and "30 x" in r.output
    full = Embedder.load(model).embed((tmp_path / "emb.ids.txt").read_text().splitlines())
    assert np.allclose(np.load(out), full, atol=1e-5)


@pytest.mark.parametrize("cut", ["row written, id not", "half a row", "half an id line"])
def test_a_run_cut_between_its_two_writes_resumes_with_every_row_beside_its_own_id(model, gallery, tmp_path, cut):
    """The progress files of a killed `embed` (rows, then ids, per batch): the next run cuts both back
    to what they hold in full before it appends (a stale row once shifted every later row by one)."""
    from edgeclr.runtime import PartialEmbeddings, embed_files_to, list_inputs

    out = tmp_path / "emb.npy"
    e = Embedder.load(model)
    files = [str(f) for f in list_inputs([gallery])][:6]
    part = PartialEmbeddings(out, e.dim)
    part.append(e.embed(files[:2]), files[:2])
    stale = e.embed(files[2:3])
    if cut == "row written, id not":
        part.rows_f.open("ab").write(stale.tobytes())
    elif cut == "half a row":
        part.rows_f.open("ab").write(stale.tobytes()[: e.dim * 2])
    else:
        part.rows_f.open("ab").write(stale.tobytes())
        part.ids_f.open("a").write(files[2][:10])
    embed_files_to(model, files, out)
    got, ids = np.load(out), (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(files) and len(got) == 6
    assert np.allclose(got, e.embed(ids), atol=1e-5)


# -- search ------------------------------------------------------------------------------------


def test_index_search_matches_brute_force_and_saves_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((50, 8)), rng.standard_normal((4, 8))
    idx = Index(g, [f"g{i}" for i in range(50)], [str(i % 3) for i in range(50)])
    scores, nn = idx.search(q, 5)
    gn, qn = g / np.linalg.norm(g, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ gn.T), axis=1)[:, :5]
    assert np.array_equal(nn, ref) and np.allclose(scores, np.take_along_axis(qn @ gn.T, ref, 1), atol=1e-6)
    idx.save(tmp_path / "i.npz")
    with np.load(tmp_path / "i.npz", allow_pickle=False) as f:
        assert f["ids"].dtype.kind == "U"
    back = Index.load(tmp_path / "i.npz")
    assert np.array_equal(back.search(q, 5)[1], nn) and back.classify(q).tolist() == idx.classify(q).tolist()


def test_search_cli_finds_the_image_itself_and_classifies(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    q = sorted((gallery / "3").iterdir())[0]
    r = run(["search", str(q), "--gallery", str(out), "--model", str(model), "--labels", "folder", "--k", "3", "--json",
             "--save-index", str(tmp_path / "g.npz")])
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["neighbours"][0]["id"] == str(q) and res["neighbours"][0]["score"] > 0.9999
    assert res["neighbours"][0]["label"] == "3" and "class" in res
    r = run(["search", "--gallery", str(tmp_path / "g.npz"), "--query-embeddings", str(out), "--k", "1"])
    assert r.output.count("1.0000") == 30
    r = run(["search", str(q), "--gallery", str(out)], ok=False)
    assert r.exit_code == 2 and "need --model" in r.output


def test_a_runtime_only_install_has_no_torch_and_embeds(model, gallery, tmp_path):
    """`pip install .[runtime]` in a fresh virtual environment: no torch, and `edgeclr embed` works."""
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{repo}[runtime]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    out = tmp_path / "e.npy"
    r = subprocess.run([str(venv / "bin" / "edgeclr"), "embed", str(gallery), "--model", str(model), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.load(out).shape == (30, 64)
    # and `edgeclr bench` on the exported model, in the same torch-free install
    r = subprocess.run([str(venv / "bin" / "edgeclr"), "bench", str(model), "--rounds", "1", "--runs", "3", "--warmup", "0",
                        "--out", str(tmp_path / "bench")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"][0]
    assert row["format"] == "onnx" and row["p50_ms"] > 0 and row["runtime"].startswith("onnxruntime")


def test_usearch_backend_agrees_with_exact_search():
    pytest.importorskip("usearch")  # in the dev extra; optional on a device
    rng = np.random.default_rng(0)
    g, q = rng.standard_normal((2000, 32)), rng.standard_normal((50, 32))
    exact, ann = Index(g), Index(g, backend="usearch")
    (se, ie), (sa, ia) = exact.search(q, 10), ann.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ia)])
    assert recall >= 0.95, recall
    same = ie[:, 0] == ia[:, 0]
    assert np.allclose(se[same, 0], sa[same, 0], atol=1e-4)  # scores are cosines in both
    with pytest.raises(ValueError, match="unknown index backend"):
        Index(g, backend="faiss2")


def test_a_dynamic_batch_openvino_model_runs_each_batch_size_as_a_static_compilation(tmp_path):
    """OpenVINO's CPU plugin pays shape inference on every call of a dynamic-shape model (0.4-1.3 ms
    in benchmarks/results/bench_vs_benchmark_app-static-shape-fix.md): each batch size gets its own static compile,
    at most MAX_SHAPES of them, with the same embeddings."""
    from helpers import make_checkpoint, run

    from edgeclr.runtime import Embedder

    make_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    run(["export", str(tmp_path / "run"), "--format", "openvino", "--check-images", "4"])
    e = Embedder.load(tmp_path / "run" / "export" / "model.xml", threads=1)
    b = e.backend
    assert b.batch is None and list(b._requests) == [1]
    x = np.random.default_rng(0).standard_normal([5] + b.input_shape[1:]).astype(np.float32)
    one = np.concatenate([b(x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(b(x), one, atol=1e-5)
    for n in (2, 3, 4):
        b(x[:n])
    assert len(b._requests) == b.MAX_SHAPES and 1 in b._requests
    for k, (compiled, _) in b._requests.items():
        assert compiled.inputs[0].get_partial_shape().is_static and compiled.inputs[0].shape[0] == k
