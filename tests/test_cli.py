import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeclr.cli import cli

COMMANDS = ["train", "distill", "compress", "export", "embed", "search", "bench", "eval", "deploy", "select", "pipeline", "finetune",
            "predict", "segment"]


def test_help_lists_every_command_and_each_has_help():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output
        sub = CliRunner().invoke(cli, [c, "--help"])
        assert sub.exit_code == 0 and "--config" in sub.output
    assert set(cli.commands) == set(COMMANDS)


@pytest.mark.parametrize("command,cls", [("train", "TrainConfig"), ("distill", "DistillConfig"), ("export", "ExportConfig"),
                                         ("embed", "EmbedConfig"), ("search", "SearchConfig"), ("eval", "EvalConfig"),
                                         ("compress", "CompressConfig"), ("bench", "BenchConfig"), ("deploy", "DeployConfig"),
                                         ("select", "SelectConfig"),
                                         ("finetune", "FinetuneConfig"), ("predict", "PredictConfig")])
def test_every_option_has_help_text(command, cls):
    import dataclasses

    from edgeclr import config

    out = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
    for f in dataclasses.fields(getattr(config, cls)):
        if f.metadata["cli"]:
            assert f"--{f.name.replace('_', '-')}" in out
            assert f.metadata["help"], f.name
        else:
            assert f"--{f.name.replace('_', '-')} " not in out


def test_cli_start_does_not_import_torch():
    code = "import sys; from edgeclr.cli import cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_and_runtime_are_torch_free():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgeclr, edgeclr.runtime\n"
            "print(edgeclr.__version__)")
    subprocess.run([sys.executable, "-c", code], check=True)
