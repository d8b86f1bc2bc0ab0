"""`edgeclr finetune --task classify`, `edgeclr predict` and `edgeclr eval --label-efficiency` on a
tiny real digits run: the draw, the three modes, checkpoint / resume / SIGTERM / NaN, the exported
classifier (read back with plain onnxruntime), the wrong-task errors and the label-efficiency curve."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, run
from PIL import Image

from edgeclr import checkpoint, faults
from edgeclr.errors import DataError, ModelError
from edgeclr.finetune import VAL_FROM, draw_labeled
from edgeclr.runtime import Classifier, Embedder

FT = ["--threads", "1", "--steps", "30", "--eval-every", "10", "--labels-per-class", "5"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny teacher trained on digits at 16 px, and its embedding export."""
    d = tmp_path_factory.mktemp("ft")
    run(["train", *TINY, "--input-size", "16", "--epochs", "3", "--out", str(d / "run")])
    run(["export", str(d / "run"), "--check-images", "4"])
    return d / "run"


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """Real digits written as 8x8 PNG files (the runtime resizes them as training did), with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("pngs")
    labels = {}
    for i in range(1700, 1730):
        p = root / f"{i}.png"
        Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8)).save(p)
        labels[str(p)] = int(d.target[i])
    return root, labels


def edgeclr(args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "edgeclr", *args], capture_output=True, text=True, env=e, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


# -- the draw ----------------------------------------------------------------------------------


def test_the_draw_is_stratified_seeded_and_holds_out_validation_only_from_20_per_class():
    y = np.repeat(np.arange(4), [50, 40, 30, 25])
    tr, va = draw_labeled(y, per_class=5, seed=1, val_fraction=0.2)
    assert np.bincount(y[tr]).tolist() == [5, 5, 5, 5] and len(va) == 0  # below VAL_FROM every label trains
    tr2, _ = draw_labeled(y, per_class=5, seed=1, val_fraction=0.2)
    assert np.array_equal(tr, tr2) and not np.array_equal(tr, draw_labeled(y, per_class=5, seed=2)[0])
    tr, va = draw_labeled(y, per_class=VAL_FROM, seed=0, val_fraction=0.2)
    assert np.bincount(y[tr]).tolist() == [16] * 4 and np.bincount(y[va]).tolist() == [4] * 4
    assert not set(tr) & set(va)
    tr, _ = draw_labeled(y, fraction=0.1, seed=0)
    assert np.bincount(y[tr]).tolist() == [5, 4, 3, 2]  # a fraction of each class, rounded
    with pytest.raises(DataError, match="class 3 has 25 labeled image"):
        draw_labeled(y, per_class=30)


# -- finetune, export, predict -----------------------------------------------------------------


def test_full_finetune_exports_a_classifier_that_plain_onnxruntime_and_predict_agree_on(digits_run, digit_pngs, tmp_path):
    out = tmp_path / "ft"
    r = run(["finetune", str(digits_run), *FT, "--out", str(out), "--int8", "--calib-images", "300"])
    assert "test accuracy" in r.output and "onnx-int8" in r.output
    res = json.loads((out / "result.json").read_text())
    assert res["train_images"] == 50 and res["val_images"] == 0 and res["test_images"] == 450 and res["steps_run"] == 30
    assert res["test_top1"] > 40  # 10 classes: chance is 10%
    assert res["classes"] == [str(i) for i in range(10)] and res["bn_frozen"]
    fp32, int8 = res["artifacts"]["onnx-fp32"], res["artifacts"]["onnx-int8"]
    assert abs(fp32["test_top1"] - res["test_top1"]) <= 0.5  # the file classifies like the checkpoint
    assert int8["test_top1"] >= res["test_top1"] - 10
    ck = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ck["completed"] and ck["task"] == "classify" and ck["tuner"] is None
    assert ck["source"]["sha256"] == checkpoint.sha256(digits_run / "train" / "checkpoints" / "last.pt")
    assert "loss" in (out / "metrics.csv").read_text()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "finetune"

    model = out / "export" / "classifier.onnx"
    root, labels = digit_pngs
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    try:
        r = run(["predict", str(root), "--model", str(model), "--top-k", "3", "--out", str(tmp_path / "p.csv")])
    finally:
        (root / "broken.png").unlink()
    assert "broken.png" in r.output and "30 image(s) classified into 10 classes (1 unreadable)" in r.output
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["path", "top1", "p_top1", "top2", "p_top2", "top3", "p_top3"] and len(rows) == 31
    ps = np.array([[float(v) for v in row[2::2]] for row in rows[1:]])
    assert (np.diff(ps, axis=1) <= 0).all() and (ps.sum(1) <= 1 + 1e-5).all()
    hits = np.mean([row[1] == str(labels[row[0]]) for row in rows[1:]])
    assert hits > 0.4

    # a plain onnxruntime script that reads only the file's metadata gives the same probabilities
    script = f"""
import json, sys, numpy as np, onnxruntime as ort
from PIL import Image
s = ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
m = {{k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}}
assert m["task"] == "classify"
out = {{}}
for p in sys.argv[1:]:
    img = Image.open(p).convert(m["channel_order"])
    w, h = img.size
    r = m["resize_size"]
    if min(w, h) != r:
        w, h = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        img = img.resize((w, h), Image.BILINEAR)
    c = m["input_size"]
    left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
    a = np.asarray(img.crop((left, top, left + c, top + c)), np.float32) / 255
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    a = (a - np.array(m["mean"], np.float32)[:, None, None]) / np.array(m["std"], np.float32)[:, None, None]
    out[p] = s.run([m["output_name"]], {{m["input_name"]: a[None].astype(np.float32)}})[0][0].tolist()
print(json.dumps({{"classes": m["classes"], "probs": out}}))
"""
    files = sorted(labels)[:8]
    p = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, check=True)
    plain = json.loads(p.stdout)
    clf = Classifier.load(model)
    assert clf.classes == plain["classes"]
    ours = clf.predict_proba(files)
    assert np.abs(ours - np.array([plain["probs"][f] for f in files])).max() <= 1e-5
    assert clf.predict(files) == [clf.classes[i] for i in ours.argmax(1)]
    assert clf.top_k(files[:1], k=2)[0][0][0] == clf.predict(files[:1])[0]

    r = run(["predict", *files[:3], "--model", str(model), "--top-k", "2", "--out", str(tmp_path / "p.json")])
    js = json.loads((tmp_path / "p.json").read_text())
    assert [j["path"] for j in js] == files[:3] and all(len(j["top"]) == 2 for j in js)
    assert np.allclose([j["top"][0][1] for j in js], ours[:3].max(1), atol=1e-6)

    # the wrong file for the command: a clear error, exit code 2, nothing written
    r = run(["embed", str(root), "--model", str(model), "--out", str(tmp_path / "e.npy")], ok=False)
    assert r.exit_code == 2 and "is a classifier: use `edgeclr predict`" in r.output
    assert not (tmp_path / "e.npy").exists()
    emb_model = digits_run / "export" / "model.onnx"
    r = run(["predict", str(root), "--model", str(emb_model), "--out", str(tmp_path / "q.csv")], ok=False)
    assert r.exit_code == 2 and "is an embedding model: use `edgeclr embed`" in r.output
    assert not (tmp_path / "q.csv").exists()
    with pytest.raises(ModelError, match="is a classifier"):
        Embedder.load(model)
    r = run(["predict", str(root), "--model", str(model), "--out", str(tmp_path / "p.txt")], ok=False)
    assert r.exit_code == 2 and ".csv or .json" in r.output


def test_linear_mode_is_the_linear_probe_and_random_init_starts_from_other_weights(digits_run, tmp_path):
    from edgeclr.heldout import PROBE_CS
    from edgeclr.models import classifier_from_checkpoint

    run(["finetune", str(digits_run), *FT, "--mode", "linear", "--formats", "", "--out", str(tmp_path / "lin")])
    lin = json.loads((tmp_path / "lin" / "result.json").read_text())
    assert lin["steps_run"] == 0 and lin["mode"] == "linear" and lin["artifacts"] == {}
    assert lin["probe"]["c"] in PROBE_CS and "5-fold CV" in lin["probe"]["how"]  # 5 labels per class: C is cross-validated
    ck = checkpoint.load(tmp_path / "lin" / "checkpoints" / "last.pt")
    src = checkpoint.load(digits_run / "train" / "checkpoints" / "last.pt")
    assert all(torch.equal(ck["model"][k], v) for k, v in src["model"].items())  # the encoder is untouched
    net = classifier_from_checkpoint(ck)
    assert net.head.weight.shape == (10, net.encoder.embed_dim)

    run(["finetune", str(digits_run), *FT, "--mode", "frozen", "--init", "random", "--formats", "", "--out", str(tmp_path / "rnd")])
    rnd = checkpoint.load(tmp_path / "rnd" / "checkpoints" / "last.pt")
    assert rnd["source"]["init"] == "random"
    conv = next(k for k, v in src["model"].items() if v.ndim == 4)
    assert not torch.equal(rnd["model"][conv], src["model"][conv])


def test_sigterm_then_resume_equals_an_uninterrupted_run(digits_run, tmp_path):
    args = ["finetune", str(digits_run), *FT, "--formats", ""]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    rc, log = edgeclr([*args, "--out", str(ref)])
    assert rc == 0, log[-2000:]
    rc, log = edgeclr([*args, "--out", str(cut)], env={faults.ENV: "term:stage=finetune:step=20"})
    assert rc == 143 or rc == -15 or "stopped at step 20" in log, log[-2000:]
    ck = checkpoint.load(cut / "checkpoints" / "last.pt")
    assert not ck["completed"] and ck["step"] == 20
    rc, log = edgeclr([*args, "--out", str(cut)])
    assert rc == 2 and "--resume" in log  # an unfinished run is not overwritten silently
    rc, log = edgeclr([*args, "--out", str(cut), "--resume"])
    assert rc == 0, log[-2000:]
    a, b = (checkpoint.load(p / "checkpoints" / "last.pt") for p in (ref, cut))
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    assert all(torch.allclose(a["head"][k], b["head"][k], atol=1e-6) for k in a["head"])
    assert json.loads((ref / "result.json").read_text())["test_top1"] == json.loads((cut / "result.json").read_text())["test_top1"]
    rc, log = edgeclr(["finetune", str(digits_run), *FT, "--labels-per-class", "6", "--formats", "", "--out", str(cut), "--resume"])
    assert rc == 2 and "other labelled images" in log


def test_a_nan_loss_stops_with_a_clear_error_and_no_poisoned_checkpoint(digits_run, tmp_path):
    out = tmp_path / "nan"
    rc, log = edgeclr(["finetune", str(digits_run), *FT, "--formats", "", "--out", str(out)],
                      env={faults.ENV: "nan_loss:stage=finetune:step=15"})
    assert rc == 2 and "the fine-tuning loss became nan at step 15" in log and "Lower --lr" in log
    ck = checkpoint.load(out / "checkpoints" / "last.pt")  # the step-10 checkpoint, finite
    assert ck["step"] == 10 and not ck["completed"]
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (out / "result.json").exists()


def test_bad_sources_and_data_are_refused_before_training(digits_run, tmp_path):
    r = run(["finetune", str(tmp_path / "nowhere"), *FT], ok=False)
    assert r.exit_code == 2 and "nowhere does not exist" in r.output
    r = run(["finetune", str(digits_run), *FT, "--stage", "student"], ok=False)
    assert r.exit_code == 2 and "holds no student checkpoint" in r.output
    r = run(["finetune", str(digits_run), *FT, "--labels-per-class", "500", "--out", str(tmp_path / "x")], ok=False)
    assert r.exit_code == 2 and "fewer than the 500 asked for" in r.output
    unlabeled = tmp_path / "imgs"
    unlabeled.mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), np.uint8)).save(unlabeled / f"{i}.png")
    r = run(["finetune", str(digits_run), *FT, "--data", str(unlabeled), "--out", str(tmp_path / "y")], ok=False)
    assert r.exit_code == 2 and "has no class labels" in r.output
    assert not (tmp_path / "y" / "checkpoints").exists()
    run(["finetune", str(digits_run), *FT, "--mode", "linear", "--formats", "", "--out", str(tmp_path / "lin")])
    r = run(["finetune", str(tmp_path / "lin" / "checkpoints" / "last.pt"), *FT], ok=False)
    assert r.exit_code == 2 and "already a fine-tuned classifier" in r.output


# -- the label-efficiency curve ----------------------------------------------------------------


def test_label_efficiency_curve_in_eval_and_the_report(digits_run):
    from edgeclr import report

    r = run(["eval", str(digits_run), "--threads", "1", "--no-tsne", "--label-efficiency", "1,3", "--draws", "2",
             "--finetune-steps", "10"])
    assert "label efficiency (1,3 per class, 2 draws)" in r.output
    le = json.loads((digits_run / "train" / "label_efficiency.json").read_text())
    got = {(row["method"], row["features"]) for row in le["rows"]}
    assert got == {(m, f) for m in ("knn", "linear") for f in ("model", "random", "pixels")} | {("finetune", "model"), ("finetune", "random")}
    for row in le["rows"]:
        assert [p["per_class"] for p in row["points"]] == [1, 3]
        assert all(len(p["values"]) == 2 and 0 <= p["mean"] <= 100 for p in row["points"])
    pix = next(row for row in le["rows"] if row["method"] == "knn" and row["features"] == "pixels")
    assert pix["points"][1]["mean"] > pix["points"][0]["mean"] > 20  # more labels help; the harness is not broken
    assert (digits_run / "train" / "label_efficiency.png").stat().st_size > 5000
    assert "| full fine-tuning |" in (digits_run / "train" / "label_efficiency.md").read_text()
    assert json.loads((digits_run / "train" / "eval.json").read_text())["label_efficiency"].endswith("label_efficiency.json")
    blocks = report.build_blocks(digits_run)
    text = "\n".join(str(b[2]) if b[0] == "h" else str(b[1]) for b in blocks if b[0] in ("h", "p", "table"))
    assert "Few labels" in text and "3 / class" in text and "Best of each: at 1 per class" in text
    r = run(["eval", str(digits_run), "--threads", "1", "--no-tsne", "--label-efficiency", "2000"], ok=False)
    assert r.exit_code == 2 and "the smallest class has" in r.output
