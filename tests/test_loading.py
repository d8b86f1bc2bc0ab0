"""The one model loader: the right stage for the role, and a clear error for a checkpoint that does not fit."""

import pytest
import torch
from helpers import make_checkpoint

from edgeclr import checkpoint
from edgeclr.errors import CheckpointError
from edgeclr.loading import find_checkpoint, load_encoder


def test_a_teacher_is_frozen_and_in_eval_mode(tmp_path):
    f = make_checkpoint(tmp_path / "t.pt", "resnet18", width=8)
    model, ck, path = load_encoder(f, "cpu", role="teacher")
    assert not model.training and not any(p.requires_grad for p in model.parameters()) and path == f


def test_a_student_given_as_teacher_and_a_teacher_given_as_student_are_refused(tmp_path):
    s = make_checkpoint(tmp_path / "s.pt", "mobilenet_v3_small", stage="distill")
    t = make_checkpoint(tmp_path / "t.pt", "resnet18", width=8)
    with pytest.raises(CheckpointError, match=r"--teacher .*s\.pt is a distill checkpoint .*not a SimCLR teacher"):
        load_encoder(s, "cpu", role="teacher")
    with pytest.raises(CheckpointError, match=r"is a train checkpoint .*compress takes a distilled student"):
        load_encoder(t, "cpu", role="student")
    assert load_encoder(s, "cpu")[1]["stage"] == "distill"  # any stage without a role


def test_weights_of_another_model_name_the_file_and_its_spec(tmp_path):
    f = make_checkpoint(tmp_path / "t.pt", "resnet18", width=8)
    ck = checkpoint.load(f)
    ck["spec"]["width"] = 16  # the spec of another model than the weights
    checkpoint.save(ck, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: its model cannot be rebuilt from its spec .*'width': 16"):
        load_encoder(tmp_path / "other.pt", "cpu")


def test_a_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    f = make_checkpoint(tmp_path / "t.pt", "resnet18", width=8)
    (tmp_path / "cut.pt").write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "cut.pt", "cpu")
    assert torch.get_num_threads() >= 1


def test_one_rule_says_which_checkpoint_a_run_folder_means(tmp_path):
    run = tmp_path / "run"
    t = make_checkpoint(run / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    s = make_checkpoint(run / "distill" / "checkpoints" / "last.pt", "mobilenet_v3_small", stage="distill")
    make_checkpoint(run / "finetune" / "checkpoints" / "last.pt", "resnet18", width=8)  # not a stage of the chain
    assert find_checkpoint(run) == s  # no role: the most downstream model, for eval, export, bench alike
    assert find_checkpoint(run, "teacher") == t and find_checkpoint(run, "student") == s
    assert find_checkpoint(run / "train") == t and find_checkpoint(t, "student") == t  # a file or stage folder is itself
    from edgeclr import export

    assert export.load_model(run)[2] == load_encoder(run)[2] == s
    with pytest.raises(CheckpointError, match=r"holds no pruned checkpoint \(compress/checkpoints/last.pt\); it holds "
                                              r"train, distill: give a run folder"):
        find_checkpoint(run, "pruned")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    (run / "distill" / "checkpoints" / "last.pt").unlink()
    assert find_checkpoint(run) == t  # a run folder whose student is gone means its teacher
