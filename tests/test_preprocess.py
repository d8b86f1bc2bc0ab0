import numpy as np
import pytest
import torch

from edgeclr import data, heldout
from edgeclr.runtime import Preprocess, load_image, preprocess


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
