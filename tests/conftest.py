import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def image_folder(tmp_path):
    """A labeled folder of small real images (digits, saved as PNG/JPEG) in two class sub-folders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "imgs"
    for i in range(40):
        c = int(d.target[i]) % 2
        sub = root / f"class{c}" / ("nested" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        a = (d.images[i] * 255 / 16).astype(np.uint8)
        img = Image.fromarray(np.kron(a, np.ones((4, 4), np.uint8)), "L")
        img.save(sub / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root
