"""Shared by the tests (importable because pytest puts tests/ on sys.path)."""

import torch
from click.testing import CliRunner

from edgeclr import checkpoint
from edgeclr.cli import cli
from edgeclr.models import ModelSpec, create_model
from edgeclr.runtime import Preprocess

# a tiny but real run: ResNet-18 layout at width 8 on 8x8 digits, 22 steps per epoch (1,347 images)
TINY = ["--data", "digits", "--width", "8", "--stem-stride", "1", "--input-size", "8", "--batch-size", "64",
        "--epochs", "2", "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--warmup-epochs", "0.5"]


def run(args, ok=True):
    """Invoke the CLI in-process; with ok=True, assert it exited 0."""
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


PP = Preprocess(16, 16, (0.3,), (0.3,), 1)


def make_checkpoint(path, name, stage="train", **spec_kw):
    """A real edgeclr checkpoint of a random-init model on 16 px digits (the export input)."""
    torch.manual_seed(0)
    spec = ModelSpec(name, in_chans=1, stem_stride=1 if name.startswith("mobilenet") else 2, **spec_kw)
    m = create_model(spec)
    with torch.no_grad():  # non-trivial BN statistics, so that eval-mode BN is really exported
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    ck = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "stage": stage,
          "model": m.state_dict(), "spec": spec.to_dict(), "preprocess": PP.to_dict(), "config": {"data": "digits"}}
    checkpoint.save(ck, path)
    return path


def digit_fields(root, fields: int = 2, grid: int = 6, seed: int = 0, classes: bool = True):
    """Real images with real masks for segmentation tests: each field is a grid x grid mosaic of
    scikit-learn's 8x8 digits (upscaled to 16 px) as an 8-bit grayscale PNG in ROOT/images, and its
    label map in ROOT/masks: 0 background, 1 + d where a pixel of digit d is inked. Returns ROOT."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for f in range(fields):
        idx = g.choice(len(d.images), grid * grid, replace=False)
        img = np.zeros((grid * 16, grid * 16), np.uint8)
        mask = np.zeros_like(img)
        for k, i in enumerate(idx):
            y, x = 16 * (k // grid), 16 * (k % grid)
            tile = np.kron(d.images[i], np.ones((2, 2)))  # (16, 16) in 0..16
            img[y:y + 16, x:x + 16] = (tile * 15.9).astype(np.uint8)
            mask[y:y + 16, x:x + 16] = np.where(tile > 4, 1 + d.target[i], 0)
        Image.fromarray(img, "L").save(root / "images" / f"field{f}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"field{f}.png")
    if classes:
        (root / "masks" / "classes.txt").write_text("\n".join(["background"] + [f"digit {i}" for i in range(10)]) + "\n")
    return root
