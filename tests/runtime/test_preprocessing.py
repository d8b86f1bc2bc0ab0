"""edgeclr.runtime.preprocessing: Preprocess, and the one preprocessing path that evaluation and the runtime share."""

import numpy as np
import pytest
import torch
from PIL import Image

from edgeclr import data, heldout
from edgeclr.runtime import Embedder, Preprocess, load_image, preprocess


@pytest.mark.parametrize("channels", [1, 3])
def test_eval_inputs_equal_runtime_and_torchvision(tmp_path, channels):
    """One preprocessing path: torch evaluation, the runtime, and an independent torchvision reference."""
    import torchvision.transforms as T
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, size in enumerate([(50, 37), (64, 64), (33, 90)]):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / ("a" if i % 2 else "b") / f"{i}.png")
    pp = Preprocess(24, 27, (0.4,) * channels, (0.2,) * channels, channels)
    ds = data.open_dataset(str(tmp_path), "pretrain")
    ds.channels = channels
    x, kept = heldout.eval_inputs(ds, pp)
    ref = T.Compose([T.Resize(27), T.CenterCrop(24), T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    for i, row in zip(kept, x):
        rt = preprocess(load_image(ds.paths[i], channels), pp)
        assert np.array_equal(row.numpy(), rt)
        img = load_image(ds.paths[i], channels)
        assert torch.allclose(row, ref(img), atol=1e-5)


def test_preprocess_validation():
    with pytest.raises(ValueError, match="mean/std"):
        Preprocess(24, 27, (0.4, 0.4), (0.2, 0.2), 3)
    with pytest.raises(ValueError, match="resize_size"):
        Preprocess(24, 20, (0.4,), (0.2,), 1)
    pp = Preprocess(24, 27, (0.4,), (0.2,), 1)
    assert Preprocess.from_dict(pp.to_dict()) == pp


def test_preprocess_at_another_size_keeps_the_resize_to_crop_ratio():
    pp = Preprocess(input_size=224, resize_size=256, mean=(0.5,), std=(0.5,), channels=1)
    assert (pp.at_size(112).input_size, pp.at_size(112).resize_size) == (112, 128)
    assert pp.at_size(28).resize_size == 32 and pp.at_size(28).mean == pp.mean
    same = Preprocess(input_size=28, resize_size=28, mean=(0.5,), std=(0.5,), channels=1).at_size(224)
    assert (same.input_size, same.resize_size) == (224, 224)


def test_a_large_jpeg_decodes_at_a_reduced_scale_and_evaluation_sees_the_same_pixels(tmp_path, model):
    from edgeclr import data, heldout
    from edgeclr.runtime import preprocess

    rng = np.random.default_rng(0)
    big = tmp_path / "imgs" / "big.jpg"
    big.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (2000, 3000, 3), np.uint8)).save(big, quality=90)
    assert load_image(big, 3).size == (3000, 2000)
    assert load_image(big, 3, min_side=64).size == (375, 250)  # DCT scale 1/8, both sides still >= 64
    e = Embedder.load(model)
    ds = data.open_dataset(str(tmp_path / "imgs"), "pretrain")
    x, _ = heldout.eval_inputs(ds, e.meta.preprocess)  # the torch-side path
    assert np.array_equal(x[0].numpy(), preprocess(load_image(big, 1, e.meta.preprocess.resize_size), e.meta.preprocess))
    assert np.allclose(e.embed([big]), e.embed_arrays(x.numpy()), atol=1e-6)
