import subprocess
import sys

from click.testing import CliRunner

from edgeclr.cli import cli

COMMANDS = ["train", "eval"]


def test_help_lists_every_command_and_each_has_help():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output
        sub = CliRunner().invoke(cli, [c, "--help"])
        assert sub.exit_code == 0 and "--config" in sub.output
    assert set(cli.commands) == set(COMMANDS)


def test_every_train_option_has_help_text():
    from edgeclr.config import TrainConfig
    import dataclasses

    out = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in out
        assert f.metadata["help"]


def test_cli_start_does_not_import_torch():
    code = "import sys; from edgeclr.cli import cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_and_runtime_are_torch_free():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgeclr, edgeclr.runtime\n"
            "print(edgeclr.__version__)")
    subprocess.run([sys.executable, "-c", code], check=True)
