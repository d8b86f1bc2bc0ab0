import pickle

import pytest
import torch

from edgeclr import checkpoint


def ckpt(v=1.0):
    return {"format": checkpoint.FORMAT, "format_version": 1, "stage": "train", "model": {"w": torch.full((3,), v)},
            "spec": {"name": "resnet18"}, "preprocess": {}, "rng": checkpoint.rng_state(), "config": {"a": [1, 2]}}


def test_atomic_save_keeps_previous_and_loads_weights_only(tmp_path):
    p = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save(ckpt(1.0), p)
    checkpoint.save(ckpt(2.0), p)
    assert checkpoint.load(p)["model"]["w"][0] == 2.0
    assert checkpoint.load(checkpoint.previous_path(p))["model"]["w"][0] == 1.0
    assert not list(p.parent.glob("*.tmp"))
    # the RNG states (python's included) load back with weights_only
    checkpoint.set_rng_state(checkpoint.load(p)["rng"])


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save(ckpt(1.0), p)
    checkpoint.save(ckpt(2.0), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated.*previous good checkpoint"):
        checkpoint.load(p)


def test_foreign_and_pickled_files_are_refused(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(checkpoint.CheckpointError, match="not an edgeclr checkpoint"):
        checkpoint.load(p)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    q = tmp_path / "evil.pt"
    with open(q, "wb") as f:
        pickle.dump({"format": checkpoint.FORMAT, "x": Evil()}, f)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.load(q)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_find_run_stage_and_file(tmp_path):
    p = tmp_path / "run" / "train" / "checkpoints" / "last.pt"
    checkpoint.save(ckpt(), p)
    assert checkpoint.find(tmp_path / "run", ("distill", "train")) == p
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint \(checkpoints/last.pt or distill/checkpoints"):
        checkpoint.find(tmp_path / "run", "distill")  # only the stages asked for: no guessing among sub-folders
    assert checkpoint.find(tmp_path / "run" / "train") == p
    assert checkpoint.find(p) == p
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.find(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.find(tmp_path / "empty")
