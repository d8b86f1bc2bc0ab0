"""edgeclr.runtime.embedder: the backends behind Embedder."""

import numpy as np


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
