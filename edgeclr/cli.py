"""`edgeclr` command line: a thin map from command to stage.main(config).

Options are generated from the config dataclasses (edgeclr/config.py), so a field's help line is
written once. Stages are imported inside their command: `edgeclr --help` does not import torch.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from edgeclr import __version__, config

# errors that are the user's to fix: printed as one clear line, exit code 2, no traceback
USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "ImageError", "NonFiniteLoss")


def _option(fld: dataclasses.Field):
    name = fld.name.replace("_", "-")
    help_ = fld.metadata.get("help", "")
    default = fld.default
    help_ += "  [default: from the dataset preset]" if default is None and fld.name != "progress" else (
        f"  [default: {default}]" if default not in ("", None) else "")
    t = str(fld.type)
    if "bool" in t:
        return click.option(f"--{name}/--no-{name}", default=None, help=help_)
    if "tuple" in t:
        return click.option(f"--{name}", nargs=2, type=float, default=None, help=help_)
    choices = fld.metadata.get("choices")
    typ = click.Choice(choices) if choices else int if t.startswith("int") else float if t.startswith("float") else str
    return click.option(f"--{name}", type=typ, default=None, help=help_)


def config_options(cls):
    """Decorate a command with one option per config field, plus --config FILE."""

    def deco(f):
        for fld in reversed(dataclasses.fields(cls)):
            if fld.metadata.get("cli", True):
                f = _option(fld)(f)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML or TOML file of options; the command line overrides it")(f)

    return deco


def run_stage(fn, *args, **kwargs):
    """Call a stage; user errors become one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if type(e).__name__ in USER_ERRORS or any(c.__name__ in USER_ERRORS for c in type(e).__mro__):
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edgeclr")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool):
    """edgeclr: unlabeled images -> SimCLR teacher -> small, fast, benchmarked embedding model."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


@cli.command()
@config_options(config.TrainConfig)
def train(config_file, **options):
    """SimCLR pretraining of an encoder (the teacher) on unlabeled images.

    Writes OUT/train/{config.yaml, manifest.json, metrics.csv, checkpoints/last.pt, tb/}.
    """
    cfg = run_stage(config.build, config.TrainConfig, config_file, **options)
    from edgeclr import train as stage

    result = run_stage(stage.main, cfg)
    click.echo(f"checkpoint: {result['checkpoint']}" + (f"  kNN top-1: {result['knn_top1']:.2f}%" if "knn_top1" in result else ""))


@cli.command("eval")
@click.argument("target")
@config_options(config.EvalConfig)
def eval_(target, config_file, **options):
    """kNN and linear-probe accuracy of TARGET's embeddings, with random-init and raw-pixel baselines.

    TARGET is a checkpoint file, a stage folder (runs/NAME/train) or a run folder (runs/NAME).
    """
    cfg = run_stage(config.build, config.EvalConfig, config_file, target=target, **options)
    from edgeclr import evaluate as stage

    result = run_stage(stage.main, cfg)
    click.echo(f"{result['data']}: {result['train_images']} labeled bank / {result['test_images']} test images, "
               f"kNN k={result['knn_k']} T={result['knn_t']}")
    click.echo(result["table"])


def main():
    cli(prog_name="edgeclr")


if __name__ == "__main__":
    main()
