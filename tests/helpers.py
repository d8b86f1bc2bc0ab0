"""Shared by the tests (importable because pytest puts tests/ on sys.path)."""

from click.testing import CliRunner

from edgeclr.cli import cli

# a tiny but real run: ResNet-18 layout at width 8 on 8x8 digits, 22 steps per epoch (1,347 images)
TINY = ["--data", "digits", "--width", "8", "--stem-stride", "1", "--input-size", "8", "--batch-size", "64",
        "--epochs", "2", "--knn-every", "0", "--no-tensorboard", "--threads", "1", "--warmup-epochs", "0.5"]


def run(args, ok=True):
    """Invoke the CLI in-process; with ok=True, assert it exited 0."""
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r
