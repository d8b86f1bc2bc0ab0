"""The task table: a task added through it alone exports, passes its parity check, loads through
the runtime loader and runs in a process without torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PP, make_checkpoint, run

from edgeclr import checkpoint, tasks
from edgeclr.errors import CheckpointError, ModelError
from edgeclr.loading import load_encoder
from edgeclr.runtime import FRONT_ENDS, Embedder, open_model


@pytest.fixture
def logits_task():
    import task_logits

    tasks.register(task_logits.TASK)  # (again, when an earlier test removed it)
    FRONT_ENDS["logits"] = task_logits.LogitScorer
    yield task_logits
    tasks.TASKS.pop("logits", None)
    FRONT_ENDS.pop("logits", None)


def logits_checkpoint(path: Path, k: int = 3) -> Path:
    make_checkpoint(path, "resnet18", width=8)
    ck = checkpoint.load(path)
    torch.manual_seed(1)
    head = torch.nn.Linear(64, k)
    ck.update(task="logits", classes=[f"c{i}" for i in range(k)], head={n: t.detach() for n, t in head.state_dict().items()})
    checkpoint.save(ck, path)
    return path


def test_a_task_registered_through_the_table_alone_exports_checks_parity_and_runs_without_torch(tmp_path, logits_task):
    ck = logits_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt")
    run(["export", str(tmp_path / "run"), "--check-images", "8"])
    out = tmp_path / "run" / "export"
    entry = json.loads((out / "metadata.json").read_text())["model.onnx"]
    assert entry["task"] == "logits" and entry["output_name"] == "logits" and entry["classes"] == ["c0", "c1", "c2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["model.onnx"]["parity"]["max_abs_diff"] <= 1e-4

    x = np.random.default_rng(0).standard_normal((5, 1, PP.input_size, PP.input_size)).astype(np.float32)
    enc, ckd, _ = load_encoder(ck, "cpu")
    with torch.no_grad():
        ref = logits_task.logits_module(enc, ckd, False)[0](torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    code = ("import sys; sys.modules['torch'] = None\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import numpy as np, task_logits\n"
            "from edgeclr.runtime import open_model\n"
            f"m = open_model({str(out / 'model.onnx')!r})\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, m.scores(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "print(type(m).__name__, m.meta.task)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["LogitScorer", "logits"]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= 1e-4
    assert tasks.TASKS["logits"].score(ref, ref.argmax(1))["top1"] == 100.0

    assert isinstance(open_model(out / "model.onnx"), logits_task.LogitScorer)
    with pytest.raises(ModelError, match="is a logit scorer: use runtime.LogitScorer, not an embedding model"):
        Embedder.load(out / "model.onnx")


def test_a_failed_parity_check_of_a_registered_task_writes_nothing(tmp_path, logits_task, monkeypatch):
    logits_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt")
    monkeypatch.setitem(tasks.TASKS, "logits", tasks.Task("logits", logits_task.LogitScorer, logits_task.logits_module,
                                                          logits_task.max_abs, lambda c, _: "always off", tasks.top1, "top1"))
    r = run(["export", str(tmp_path / "run"), "--check-images", "4"], ok=False)
    assert r.exit_code == 2 and "fails the parity check on 4 real images: always off" in r.output
    assert not (tmp_path / "run" / "export" / "model.onnx").exists()


def test_an_unknown_task_is_refused_with_the_fix(tmp_path):
    ck = logits_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="holds a 'logits' model; this edgeclr knows the tasks embed, classify"):
        tasks.of_checkpoint(checkpoint.load(ck), str(ck))
    r = run(["export", str(tmp_path / "run"), "--check-images", "4"], ok=False)
    assert r.exit_code == 2 and "holds a 'logits' model" in r.output
    with pytest.raises(ValueError, match="sets TASK = 'embed'"):
        tasks.register(tasks.Task("other", Embedder, None, None, None, None, "x"))


def test_the_built_in_tasks_and_a_file_without_a_task():
    assert {n: (t.front_end.__name__, t.output_name, t.metric) for n, t in tasks.TASKS.items()} == {
        "embed": ("Embedder", "embeddings", "knn_top1"), "classify": ("Classifier", "probabilities", "top1"),
        "segment": ("Segmenter", "probabilities", "miou")}
    assert tasks.of_checkpoint({}).name == "embed"
    e = np.eye(4, dtype=np.float32)
    assert tasks.TASKS["embed"].score(e, np.arange(4) % 2, bank=(e, np.arange(4) % 2))["knn_top1"] == 100.0
    with pytest.raises(ValueError, match="labelled bank"):
        tasks.TASKS["embed"].score(e, np.arange(4))
