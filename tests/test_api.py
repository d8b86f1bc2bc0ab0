"""edgeclr.api: one function per command, keyword arguments named like the options, the CLI's own path."""

import dataclasses
import inspect

import pytest
from helpers import TINY

from edgeclr import api, config
from edgeclr.errors import CheckpointError, ConfigError

COMMANDS = {"train": config.TrainConfig, "distill": config.DistillConfig, "compress": config.CompressConfig,
            "export": config.ExportConfig, "evaluate": config.EvalConfig, "bench": config.BenchConfig,
            "pipeline": config.PipelineConfig, "embed": config.EmbedConfig, "search": config.SearchConfig}


def kwargs(argv: list[str]) -> dict:
    """CLI options -> keyword arguments (--input-size 8 -> input_size="8"; --no-x -> x=False)."""
    out, i = {}, 0
    while i < len(argv):
        name = argv[i][2:]
        if name.startswith("no-"):
            out[name[3:].replace("-", "_")] = False
            i += 1
        else:
            out[name.replace("-", "_")] = argv[i + 1]
            i += 2
    return out


def typed(d: dict, cls) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: (int(v) if "int" in str(types[k]) else float(v) if "float" in str(types[k]) else v) if isinstance(v, str) else v
            for k, v in d.items()}


@pytest.mark.parametrize("name,cls", COMMANDS.items())
def test_every_command_has_a_function_whose_keywords_are_its_options(name, cls):
    fn = getattr(api, name)
    params = inspect.signature(fn).parameters
    assert set(params) == {f.name for f in dataclasses.fields(cls)} | {"config_file"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert "Options" in fn.__doc__ and "config_file" in fn.__doc__


def test_train_export_and_evaluate_from_python(tmp_path):
    out = tmp_path / "run"
    r = api.train(**typed(kwargs(TINY), config.TrainConfig), out=str(out))
    assert r["completed"] and (out / "train" / "checkpoints" / "last.pt").is_file()
    e = api.export(target=str(out), format="onnx", check_images=4)
    assert e["parity"]["min_cosine"] > 0.9999
    ev = api.evaluate(target=str(out), baselines="", tsne=False, linear_probe=False, threads=1)
    assert ev["rows"][0]["knn_top1"] > 30  # 10 classes; a 2-epoch 8-px model is well above chance


def test_errors_are_raised_not_printed(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        api.distill(teacher=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="unknown option"):
        api.train(out=str(tmp_path / "x"), no_such_option=1)
