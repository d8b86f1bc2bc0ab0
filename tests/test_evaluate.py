"""`edgeclr eval`: a model against its baselines; an unlabeled dataset is a clear error."""

import json

from helpers import TINY, run


def test_eval_prints_model_and_baselines(tmp_path):
    out = tmp_path / "run"
    run(["train", *TINY, "--out", str(out)])
    r = run(["eval", str(out), "--threads", "1"])
    assert "| resnet18 (train)" in r.output and "random init" in r.output and "raw pixels 8px" in r.output
    res = json.loads((out / "train/eval.json").read_text())
    assert [row["key"] for row in res["rows"]] == ["model", "random", "pixels"]
    assert all(0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100 for row in res["rows"])
    assert res["rows"][2]["knn_top1"] > 90  # raw 8px digits are easy: the harness is not broken
    assert (out / "train/tsne.png").stat().st_size > 1000
    assert "eval/pixels/knn_top1" in (out / "train/metrics.csv").read_text()
    r = run(["eval", str(tmp_path / "nothing")], ok=False)
    assert r.exit_code == 2 and "does not exist" in r.output


def test_eval_of_an_unlabeled_folder_says_it_needs_labels(tmp_path):
    import numpy as np
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(70):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12), np.uint8)).save(imgs / f"{i}.png")
    out = tmp_path / "run"
    run(["train", *TINY, "--data", str(imgs), "--out", str(out), "--batch-size", "32", "--epochs", "1"])
    r = run(["eval", str(out), "--threads", "1"], ok=False)
    assert r.exit_code == 2 and "has no class labels" in r.output and "sub-folders per class" in r.output
