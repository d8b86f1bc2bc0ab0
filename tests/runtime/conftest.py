"""Shared by the tests of edgeclr.runtime."""

import pytest
from helpers import run


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """An exported (ONNX) tiny teacher trained on digits (a random-init network's embeddings
    collapse: every image would be everyone's nearest neighbour). Trained once per session:
    test_commands.py and test_preprocessing.py both use it."""
    from helpers import TINY

    d = tmp_path_factory.mktemp("model")
    run(["train", *TINY, "--out", str(d / "run")])
    run(["export", str(d / "run"), "--check-images", "4"])
    return d / "run" / "export" / "model.onnx"


@pytest.fixture(scope="session")
def classifier(model):
    """The tiny teacher fine-tuned on 5 labelled digits per class (`edgeclr finetune`), exported to ONNX."""
    out = model.parent.parent / "finetune"
    run(["finetune", str(model.parent.parent), "--labels-per-class", "5", "--steps", "20", "--threads", "1", "--out", str(out)])
    return out / "export" / "classifier.onnx"
