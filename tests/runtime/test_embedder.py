"""edgeclr.runtime.embedder: the backends behind Embedder."""

import numpy as np
import pytest


def test_a_dynamic_batch_openvino_model_runs_each_batch_size_as_a_static_compilation(tmp_path):
    """OpenVINO's CPU plugin pays shape inference on every call of a dynamic-shape model (0.4-1.3 ms
    in benchmarks/results/bench_vs_benchmark_app/static-shape-fix.md): each batch size gets its own static compile,
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


def test_a_file_exported_before_files_named_their_task_still_embeds_identically():
    """tests/fixtures/pre_task/model.onnx was exported by edgeclr before the model contract gained
    `task` (a random-init ResNet-10 at width 8, 16 px digits); expected.npy holds the embeddings that
    edgeclr's runtime gave four digits images then. A file without `task` reads as an embedding model."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgeclr.errors import ModelError
    from edgeclr.runtime import Classifier, Embedder

    fx = Path(__file__).parents[1] / "fixtures" / "pre_task"
    emb = Embedder.load(fx / "model.onnx")
    assert emb.meta.task == "embed" and emb.dim == 64
    dig = load_digits()
    imgs = [Image.fromarray((dig.images[i] * 255 / 16).astype(np.uint8), "L") for i in range(4)]
    np.testing.assert_allclose(emb.embed(imgs), np.load(fx / "expected.npy"), atol=1e-6)
    with pytest.raises(ModelError, match="an embedding model: use `edgeclr embed`"):
        Classifier.load(fx / "model.onnx")
