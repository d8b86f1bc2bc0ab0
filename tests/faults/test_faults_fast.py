"""Fault injection, the fast part (CI): storage faults, untrusted files, unwritable outputs, kills
and NaNs at chosen steps through the EDGECLR_FAULT hook (edgeclr/faults.py), then resume.
The long part is benchmarks/fault_campaign.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, run

from edgeclr import checkpoint, faults
from edgeclr.rundir import OutputError, make_writable_dir

ARGS = TINY + ["--input-size", "16", "--epochs", "3", "--ckpt-every", "5"]


def edgeclr(args, env=None, timeout=300):
    e = dict(os.environ, PYTHONWARNINGS="default", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "edgeclr", *args], capture_output=True, text=True, env=e, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def weights(path):
    return checkpoint.load(path)["model"]


def same_weights(a, b, atol=1e-6):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_fault_spec_matches_only_its_conditions(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill:stage=distill:step=5")
    assert faults.armed("kill", stage="distill", step=5, rank=0)
    assert not faults.armed("kill", stage="train", step=5, rank=0)
    assert not faults.armed("nan_loss", stage="distill", step=5)
    monkeypatch.delenv(faults.ENV)
    assert not faults.armed("kill", stage="distill", step=5)


# -- untrusted files --------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: run code while being unpickled
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_a_checkpoint_that_runs_code_on_load_is_refused_and_runs_nothing(tmp_path, writer):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    obj = {"format": checkpoint.FORMAT, "format_version": 1, "stage": "train", "model": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj))
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load(evil)
    assert not marker.exists()
    rc, log = edgeclr(["export", str(evil), "--out", str(tmp_path / "x")])  # and through a command
    assert rc == 2 and "weights_only" in log and not marker.exists()


# -- storage faults ---------------------------------------------------------------------------


def _two_checkpoints(out):
    run(["train", *TINY, "--input-size", "16", "--out", str(out)])  # 2 epochs: last.pt and last.prev.pt
    ck = out / "train" / "checkpoints"
    assert (ck / "last.pt").exists() and (ck / "last.prev.pt").exists()
    return ck


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "empty"])
def test_resume_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path, damage):
    ck = _two_checkpoints(tmp_path / "run")
    last = ck / "last.pt"
    raw = bytearray(last.read_bytes())
    if damage == "truncated":
        last.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "bit-flipped":  # in the zip's central directory (flips inside tensor bytes go unnoticed: no checksum)
        for i in range(len(raw) - 120, len(raw) - 60):
            raw[i] ^= 0xFF
        last.write_bytes(bytes(raw))
    else:
        last.write_bytes(b"")
    prev_epoch = checkpoint.load(ck / "last.prev.pt")["epoch"]
    rc, log = edgeclr(["train", *TINY, "--input-size", "16", "--epochs", "3", "--out", str(tmp_path / "run"), "--resume"])
    assert rc == 0, log[-2000:]
    assert "resuming from the previous checkpoint" in log and "last.prev.pt" in log
    man = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert man["inputs"]["resumed_from"].endswith("last.prev.pt") and man["epoch"] == 3 and prev_epoch == 1


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    good = {"format": checkpoint.FORMAT, "w": torch.arange(1000.0)}
    checkpoint.save(good, path)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # writes part of the file, then the device is full
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device.*previous checkpoint .*last.pt is intact"):
        checkpoint.save({"format": checkpoint.FORMAT, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], good["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind


def test_disk_full_in_a_real_run_exits_cleanly_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    _two_checkpoints(out)
    before = weights(out / "train" / "checkpoints" / "last.pt")
    code = ("import errno, os, sys, torch\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "torch.save = full\n"
            "from edgeclr.cli import main\n"
            f"sys.argv = ['edgeclr', 'train', *{TINY + ['--input-size', '16', '--epochs', '3']!r}, '--out', {str(out)!r}, '--resume']\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "No space left on device" in p.stderr and "intact" in p.stderr, p.stderr[-2000:]
    after = weights(out / "train" / "checkpoints" / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write to the output folder"):
        make_writable_dir(blocker / "run")
    for cmd in (["train", *TINY], ["pipeline"]):
        rc, log = edgeclr([*cmd, "--out", str(blocker / "run")], timeout=120)
        assert rc == 2 and "cannot write to the" in log and "Choose another --out" in log, log[-2000:]
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(OutputError):
            make_writable_dir(ro / "run")


# -- kills and NaNs at chosen steps -------------------------------------------------------------


# both steps fall in the first of the 21 steps of an epoch: one epoch shows it. Step 12 (after two
# checkpoints) is `slow`: test_train.py kills a run mid-epoch after a checkpoint, from outside.
@pytest.mark.parametrize("step", [3, pytest.param(12, marks=pytest.mark.slow)])  # mid-epoch before the first checkpoint, and after two
def test_sigkill_at_a_step_then_resume_equals_an_uninterrupted_run(tmp_path, step):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = [*ARGS, "--epochs", "1"]
    assert edgeclr(["train", *args, "--out", str(ref)])[0] == 0
    rc, _ = edgeclr(["train", *args, "--out", str(cut)], env={faults.ENV: f"kill:stage=train:step={step}"})
    assert rc == -9
    ck = cut / "train" / "checkpoints"
    files = sorted(p.name for p in ck.iterdir()) if ck.exists() else []
    assert all(not n.endswith(".tmp") for n in files)  # nothing half-written
    if files:
        rc, log = edgeclr(["train", *args, "--out", str(cut), "--resume"])
    else:  # killed before the first checkpoint: nothing to resume, start again
        rc, log = edgeclr(["train", *args, "--out", str(cut)])
    assert rc == 0, log[-2000:]
    assert same_weights(ref / "train/checkpoints/last.pt", cut / "train/checkpoints/last.pt")


def test_nan_loss_at_a_step_stops_before_the_update_and_writes_no_poisoned_checkpoint(tmp_path):
    out = tmp_path / "run"
    rc, log = edgeclr(["train", *ARGS, "--epochs", "1", "--out", str(out)], env={faults.ENV: "nan_loss:stage=train:step=7"})
    assert rc == 2 and "the loss became nan at epoch 0, step 7" in log
    ck = checkpoint.load(out / "train" / "checkpoints" / "last.pt")
    assert ck["global_step"] == 5  # the last good one (--ckpt-every 5), never one after the NaN
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    rc, log = edgeclr(["train", *ARGS, "--epochs", "1", "--out", str(out), "--resume"])  # the fault gone, the run continues
    assert rc == 0, log[-2000:]


def finite_checkpoint(path) -> bool:
    """Every floating tensor of the checkpoint's model, BatchNorm statistics included, is finite."""
    return all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())


def test_a_nan_image_in_the_batch_stops_the_run_by_default(tmp_path):
    out = tmp_path / "run"
    rc, log = edgeclr(["train", *ARGS, "--epochs", "1", "--out", str(out)], env={faults.ENV: "nan_batch:stage=train:step=7"})
    assert rc == 2 and "the loss became nan" in log and "--nonfinite skip" in log
    ck = out / "train" / "checkpoints" / "last.pt"
    assert checkpoint.load(ck)["global_step"] == 5 and finite_checkpoint(ck)


@pytest.mark.parametrize("fault", ["nan_batch", "inf_loss"])  # inf_batch takes nan_batch's path (the campaign runs it)
def test_nonfinite_skip_skips_the_step_and_keeps_no_trace_of_the_bad_batch(tmp_path, fault):
    """--nonfinite skip: the step is dropped (no update) and the running statistics that the bad batch's
    forward pass poisoned are restored; the run completes and every checkpoint is finite."""
    out = tmp_path / "run"
    rc, log = edgeclr(["train", *ARGS, "--epochs", "1", "--out", str(out), "--nonfinite", "skip"],
                      env={faults.ENV: f"{fault}:stage=train:step=7"})
    assert rc == 0, log[-2000:]
    assert "step skipped (--nonfinite skip; 1 so far)" in log
    ck = out / "train" / "checkpoints" / "last.pt"
    assert finite_checkpoint(ck) and checkpoint.load(ck)["nonfinite_skipped"] == 1
    assert "skipped_nonfinite_steps" in (out / "train" / "metrics.csv").read_text()


def test_nonfinite_skip_gives_up_after_ten_in_a_row(tmp_path):
    out = tmp_path / "run"
    rc, log = edgeclr(["train", *ARGS, "--out", str(out), "--nonfinite", "skip"], env={faults.ENV: "nan_loss:stage=train"})
    assert rc == 2 and "10 non-finite losses in a row" in log and "the loss became nan" in log
    ck = out / "train" / "checkpoints" / "last.pt"  # step 5's (--ckpt-every 5): skipped steps left the weights as they were
    assert checkpoint.load(ck)["global_step"] == 5 and finite_checkpoint(ck)


def test_distill_skips_a_nan_batch_without_poisoning_its_queue(tmp_path):
    """The relational loss keeps a queue of teacher embeddings: a NaN batch's must not enter it."""
    teacher = tmp_path / "t"
    run(["train", *ARGS, "--epochs", "1", "--out", str(teacher)])
    out = tmp_path / "d"
    rc, log = edgeclr(["distill", "--teacher", str(teacher), "--out", str(out), "--epochs", "1", "--batch-size", "64",
                       "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--queue-size", "256", "--nonfinite", "skip"],
                      env={faults.ENV: "nan_batch:stage=distill:step=3"})
    assert rc == 0, log[-2000:]
    ck = checkpoint.load(out / "distill" / "checkpoints" / "last.pt")
    assert ck["nonfinite_skipped"] == 1 and torch.isfinite(ck["queue"]["buf"]).all() and finite_checkpoint(out / "distill/checkpoints/last.pt")
