import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, run

from edgeclr import checkpoint, config, train
from edgeclr.errors import NonFiniteLoss


def spawn(args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "edgeclr", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def weights(path):
    return checkpoint.load(path)["model"]


def wait_for(path, proc, timeout=120):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() - t < timeout, "no checkpoint appeared"
        time.sleep(0.005)


def test_train_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    run(["train", *TINY, "--out", str(out), "--knn-every", "1", "--tensorboard"])
    d = out / "train"
    for f in ("config.yaml", "manifest.json", "metrics.csv", "checkpoints/last.pt"):
        assert (d / f).exists(), f
    assert list((d / "tb").iterdir())
    m = json.loads((d / "manifest.json").read_text())
    assert m["stage"] == "train" and m["completed"] and m["model_spec"]["width"] == 8
    assert m["preprocess"]["input_size"] == 8 and m["embedding_dim"] == 64
    assert m["artifacts"]["checkpoint_sha256"] == checkpoint.sha256(d / "checkpoints/last.pt")
    assert 0 <= m["metrics"]["knn_top1"] <= 100
    ck = checkpoint.load(d / "checkpoints/last.pt")
    assert ck["epoch"] == 2 and ck["step"] == 0 and ck["global_step"] == 2 * ck["steps_per_epoch"] == 44
    assert ck["config"]["batch_size"] == 64
    assert "knn_top1" in (d / "metrics.csv").read_text()


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    args = TINY + ["--input-size", "16", "--epochs", "3", "--ckpt-every", "5"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert spawn(args + ["--out", str(ref)]).wait() == 0
    p = spawn(args + ["--out", str(cut)])
    ck = cut / "train" / "checkpoints" / "last.pt"
    wait_for(ck, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = checkpoint.load(ck)
    assert 0 < state["step"] < state["steps_per_epoch"], "the kill must land mid-epoch"
    assert state["global_step"] < 3 * state["steps_per_epoch"]
    assert spawn(args + ["--out", str(cut), "--resume"]).wait() == 0
    a, b = weights(ref / "train/checkpoints/last.pt"), weights(ck)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    out = tmp_path / "run"
    p = spawn(TINY + ["--input-size", "16", "--epochs", "50", "--ckpt-every", "3", "--out", str(out)])
    wait_for(out / "train/checkpoints/last.pt", p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    ck = checkpoint.load(out / "train/checkpoints/last.pt")
    assert 3 <= ck["global_step"] < 50 * ck["steps_per_epoch"]
    assert not json.loads((out / "train/manifest.json").read_text())["completed"]


def test_a_second_train_into_the_same_run_refuses_before_touching_it_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    p = spawn(TINY + ["--input-size", "16", "--epochs", "50", "--ckpt-every", "3", "--out", str(out)])
    wait_for(out / "train/checkpoints/last.pt", p)
    p.send_signal(signal.SIGSTOP)  # hold still: the folder must not change while the second one is refused
    try:
        before = {f: f.stat().st_mtime_ns for f in out.rglob("*")}
        r = run(["train", *TINY, "--out", str(out), "--resume"], ok=False)
        assert r.exit_code == 2 and f"pid {p.pid}" in r.output and "since" in r.output
        assert "the run folder" in r.output and "wait for it to finish, or choose another --out" in r.output
        assert {f: f.stat().st_mtime_ns for f in out.rglob("*")} == before  # refused before touching it
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = run(["train", *TINY, "--out", str(out), "--resume"])  # the kernel dropped the killed run's lock
    assert "checkpoint:" in r.output


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.nt_xent

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(train, "nt_xent", poisoned)
    out = tmp_path / "run"
    cfg = config.TrainConfig(data="digits", width=8, stem_stride=1, input_size=8, batch_size=64, epochs=2,
                             knn_every=0, tensorboard=False, threads=1, out=str(out), ckpt_every=3)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 0, step 7.*last good checkpoint .*--lr"):
        train.main(cfg)
    ck = checkpoint.load(out / "train/checkpoints/last.pt")
    assert ck["global_step"] == 6
    assert all(torch.isfinite(v.float()).all() for v in ck["model"].values())


def test_resume_with_another_architecture_is_refused(tmp_path):
    out = tmp_path / "run"
    run(["train", *TINY, "--epochs", "1", "--out", str(out)])
    r = run(["train", *TINY, "--width", "16", "--out", str(out), "--resume"], ok=False)
    assert r.exit_code == 2
    assert "cannot resume" in r.output and "width=8" in r.output and "width=16" in r.output
    r = run(["train", *TINY, "--out", str(out)], ok=False)  # a finished run is never overwritten
    assert r.exit_code == 2 and "already holds a checkpoint" in r.output
    r = run(["train", *TINY, "--out", str(tmp_path / "fresh"), "--resume"], ok=False)
    assert r.exit_code == 2 and "no checkpoint" in r.output


def test_bad_options_are_clear_errors(tmp_path):
    r = run(["train", *TINY, "--batch-size", "1", "--out", str(tmp_path / "a")], ok=False)
    assert r.exit_code == 2 and "batch_size must be >= 2" in r.output
    r = run(["train", *TINY, "--model", "resnet19", "--out", str(tmp_path / "b")], ok=False)
    assert r.exit_code == 2 and "unknown model 'resnet19'" in r.output and "resnet18" in r.output
    r = run(["train", *TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c")], ok=False)
    assert r.exit_code == 2 and "not a folder that exists" in r.output
    (tmp_path / "empty").mkdir()
    r = run(["train", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "d")], ok=False)
    assert r.exit_code == 2 and "no image files" in r.output


def test_config_files_yaml_and_toml_with_cli_override(tmp_path):
    (tmp_path / "c.yaml").write_text("width: 8\nepochs: 5\nstem-stride: 1\n")
    cfg = config.build(config.TrainConfig, tmp_path / "c.yaml", epochs=1)
    assert cfg.width == 8 and cfg.epochs == 1 and cfg.stem_stride == 1 and cfg.input_size == 16  # preset
    (tmp_path / "c.toml").write_text("width = 16\ncrop_scale = [0.5, 1.0]\n")
    cfg = config.build(config.TrainConfig, tmp_path / "c.toml")
    assert cfg.width == 16 and cfg.crop_scale == (0.5, 1.0)
    (tmp_path / "bad.yaml").write_text("widht: 8\n")
    with pytest.raises(config.ConfigError, match="unknown option.*widht"):
        config.build(config.TrainConfig, tmp_path / "bad.yaml")
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.build(config.TrainConfig, tmp_path / "nope.yaml")
    out = tmp_path / "run"
    run(["train", *TINY, "--config", str(tmp_path / "c.yaml"), "--epochs", "1", "--out", str(out)])
    saved = (out / "train/config.yaml").read_text()
    assert "epochs: 1" in saved and "width: 8" in saved


def test_corrupt_image_in_a_folder_is_skipped_and_the_run_continues(tmp_path, image_folder):
    good = next(image_folder.rglob("*.jpg")).read_bytes()
    sos = good.index(b"\xff\xda")
    (image_folder / "class0" / "cut.jpg").write_bytes(good[: sos + 20])
    out = tmp_path / "run"
    args = [a for a in TINY]
    args[args.index("digits")] = str(image_folder)
    with pytest.warns(UserWarning, match="skipped unreadable image .*cut.jpg"):
        run(["train", *args, "--batch-size", "8", "--num-workers", "0", "--out", str(out)])
    m = json.loads((out / "train/manifest.json").read_text())
    assert m["completed"] and m["skipped_files"] == [str(image_folder / "class0" / "cut.jpg")]
    assert m["metrics"]["skipped_images"] == 1
