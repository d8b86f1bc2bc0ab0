"""Every command, every input file or folder it takes, every kind of bad input: exit code 2 and one
line naming the problem, never a traceback. The commands and their inputs come from the CLI itself
(its arguments, --config, and the options whose config field says path=True), so a new command or
input is swept without anyone adding it here."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import digit_fields, make_checkpoint, run
from PIL import Image

from edgeclr import checkpoint
from edgeclr.cli import INPUT_PATH, cli

# each bad input: (name, how to make it under a folder) -> its path
BAD = {
    "missing": lambda d: d / "no" / "such.onnx",
    "empty .onnx": lambda d: _write(d / "empty.onnx", b""),
    "empty .pt": lambda d: _write(d / "empty.pt", b""),
    "empty .json": lambda d: _write(d / "empty.json", b""),
    "empty .xml": lambda d: _write(d / "empty.xml", b""),
    "text .onnx": lambda d: _write(d / "text.onnx", b"not a model\n"),
    "text .pt": lambda d: _write(d / "text.pt", b"not a checkpoint\n"),
    "text .json": lambda d: _write(d / "text.json", b"not json\n"),
    "text .yaml": lambda d: _write(d / "text.yaml", b"- a\n- : b\n  ]\n"),
    "text .png": lambda d: _write(d / "text.png", b"not an image\n"),
    "garbage .onnx": lambda d: _write(d / "garbage.onnx", bytes(range(256)) * 64),
    "garbage .pt": lambda d: _write(d / "garbage.pt", b"PK\x03\x04" + bytes(range(256)) * 64),
    "garbage .npy": lambda d: _write(d / "garbage.npy", b"\x93NUMPY" + bytes(range(200))),
    "truncated .onnx": None,  # the first half of a real model (made in the fixture)
    "truncated .pt": None,  # the first half of a real checkpoint
    "JSON list": lambda d: _write(d / "list.json", b"[1, 2, 3]\n"),
    "JSON object of the wrong shape": lambda d: _write(d / "wrong.json", b'{"rows": "x", "candidates": 3}\n'),
    "empty folder": lambda d: _mkdir(d / "empty_dir"),
    "folder of text files": lambda d: _write(_mkdir(d / "notes") / "a.txt", b"hello\n").parent,
    "folder of the wrong stage": lambda d: _write(_mkdir(d / "wrong_stage" / "compress") / "report.md", b"# no model\n").parent.parent,
}


def _write(p, data: bytes):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid inputs for everything a command needs besides the one under test, and the bad inputs."""
    d = tmp_path_factory.mktemp("bad_inputs")
    run_dir = d / "run"
    make_checkpoint(_mkdir(run_dir / "train" / "checkpoints") / "last.pt", "resnet18", width=8)
    ck = checkpoint.load(make_checkpoint(_mkdir(run_dir / "distill" / "checkpoints") / "last.pt", "resnet18", stage="distill",
                                         width=8))
    ck["teacher"] = {"path": str(run_dir / "train" / "checkpoints" / "last.pt")}
    checkpoint.save(ck, run_dir / "distill" / "checkpoints" / "last.pt")
    run(["export", str(run_dir / "train"), "--check-images", "2", "--out", str(run_dir / "export")])
    # a selection.json of the right shape, so that `select --bench` is reached
    (_mkdir(run_dir / "deploy") / "selection.json").write_text(json.dumps({"candidates": [], "threads": 1, "batch": 1, "rule": {}}))
    model = run_dir / "export" / "model.onnx"
    imgs = _mkdir(d / "imgs")
    for i in range(4):
        Image.fromarray((np.arange(256).reshape(16, 16) * (i + 1) % 256).astype(np.uint8), "L").save(imgs / f"{i}.png")
    gallery = d / "gallery.npy"
    run(["embed", str(imgs), "--model", str(model), "--out", str(gallery)])
    bad_dir = _mkdir(d / "bad")
    bad = {k: (f(bad_dir) if f else None) for k, f in BAD.items()}
    bad["truncated .onnx"] = _write(bad_dir / "truncated.onnx", model.read_bytes()[: model.stat().st_size // 2])
    ck = run_dir / "train" / "checkpoints" / "last.pt"
    bad["truncated .pt"] = _write(bad_dir / "truncated.pt", ck.read_bytes()[: ck.stat().st_size // 2])
    run(["finetune", str(run_dir), "--mode", "linear", "--labels-per-class", "2", "--max-test", "20", "--out", str(d / "ft")])
    fields = digit_fields(d / "fields", fields=1)
    run(["finetune", str(run_dir), "--task", "segment", "--data", str(fields / "images"), "--masks", str(fields / "masks"),
         "--steps", "2", "--threads", "1", "--out", str(d / "seg")])
    valid = {"run": run_dir, "model": model, "images": imgs, "gallery": gallery, "classifier": d / "ft" / "export" / "classifier.onnx",
             "segmenter": d / "seg" / "export" / "segmenter.onnx"}
    return valid, bad


# what a valid value of each argument or required option is (by its name)
def _valid_for(param_name: str, valid: dict):
    return {"student": valid["run"] / "distill", "target": valid["run"], "source": valid["run"], "run": valid["run"],
            "selection": valid["run"] / "deploy", "models": valid["model"], "inputs": valid["images"], "queries": valid["images"],
            "teacher": valid["run"], "model": valid["model"], "gallery": valid["gallery"]}.get(param_name)


def input_params() -> list[tuple[str, str]]:
    """(command, parameter) for every input path the CLI declares."""
    out = []
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Argument) or p.type is INPUT_PATH or p.name == "config_file":
                out.append((name, p.name))
    return out


REQUIRED_OPTIONS = {"distill": ("teacher",), "embed": ("model",), "predict": ("model",), "search": ("gallery", "model"),
                    "select": ("bench",), "segment": ("model",)}


def invocation(command: str, under_test: str, value, valid: dict, out) -> list[str]:
    cmd = cli.commands[command]
    if command in ("predict", "segment"):  # the model a classifying or segmenting command takes
        valid = {**valid, "model": valid["classifier" if command == "predict" else "segmenter"]}
    args = [command]
    for p in cmd.params:
        if isinstance(p, click.Argument):
            args.append(str(value if p.name == under_test else _valid_for(p.name, valid)))
    for name in REQUIRED_OPTIONS.get(command, ()):
        if name != under_test:
            args += [f"--{name}", str(_valid_for(name, valid))]
    opt = next(p for p in cmd.params if p.name == under_test)
    if not isinstance(opt, click.Argument):
        args += [opt.opts[0], str(value)]
    if any(p.name == "out" for p in cmd.params):  # a fresh output; a file output keeps its default's suffix (embeddings.npy)
        import inspect
        from pathlib import Path

        from edgeclr import api

        default = inspect.signature(getattr(api, {"eval": "evaluate"}.get(command, command))).parameters["out"].default
        args += ["--out", str(out / Path(default).name if default and Path(default).suffix else out)]
    return args


def test_the_sweep_covers_every_command():
    params = input_params()
    assert {c for c, _ in params} == set(cli.commands)  # every command takes --config at least
    assert len(params) >= 40


@pytest.mark.parametrize("command,param", input_params())
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, monkeypatch, command, param):
    valid, bad = world
    monkeypatch.chdir(tmp_path)  # a command's default output lands here, not in the repository
    from edgeclr import engine, finetune, pipeline

    def accepted(*a, **k):  # a bad input must stop the command before it trains or runs a pipeline stage
        raise AssertionError("the bad input was accepted: the command went on to train")

    monkeypatch.setattr(engine, "train_one_epoch", accepted)
    monkeypatch.setattr(finetune.Tuner, "run", accepted)
    monkeypatch.setattr(pipeline, "_run_stage", accepted)
    failures = []
    for kind, path in bad.items():
        args = invocation(command, param, path, valid, tmp_path / "out" / kind.replace(" ", "_"))
        r = CliRunner().invoke(cli, args)
        out = r.output
        errors = [ln for ln in out.splitlines() if ln.startswith(("error: ", "Error: "))]
        if r.exit_code != 2 or "Traceback" in out or len(errors) != 1 or not isinstance(r.exception, SystemExit):
            tail = out.strip().splitlines()[-1:] if out.strip() else [repr(r.exception)]
            failures.append(f"{kind}: exit {r.exit_code}, {type(r.exception).__name__}: {tail}")
    assert not failures, f"edgeclr {command} {param}:\n" + "\n".join(failures)
