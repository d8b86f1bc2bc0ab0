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
