"""`edgeclr` command line: a thin map from command to its function in edgeclr.api.

Options are generated from the config dataclasses (edgeclr/config.py), so a field's help line is
written once. Stages are imported when they run: `edgeclr --help` does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import click

from edgeclr import __version__, api, config, stages
from edgeclr.errors import EdgeclrError


class InputPath(click.ParamType):
    """An input file or folder (a config field with path=True): shown as PATH, checked by the command."""

    name = "path"

    def convert(self, value, param, ctx):
        return str(value)


INPUT_PATH = InputPath()


def _option(fld: dataclasses.Field, none_default: str):
    name = fld.name.replace("_", "-")
    help_ = fld.metadata.get("help", "")
    default = fld.default
    help_ += f"  [default: {none_default}]" if default is None and fld.name != "progress" else (
        f"  [default: {default}]" if default not in ("", None) else "")
    t = str(fld.type)
    if "bool" in t:
        return click.option(f"--{name}/--{fld.metadata.get('off') or 'no-' + name}", default=None, help=help_)
    if "tuple" in t and fld.default is None:
        return click.option(f"--{name}", nargs=2, type=float, default=None, help=help_)
    choices = fld.metadata.get("choices")
    typ = click.Choice(choices) if choices else int if t.startswith("int") else float if t.startswith("float") else str
    if fld.metadata.get("path"):
        typ = INPUT_PATH
    return click.option(f"--{name}", type=typ, default=None, help=help_)


def config_options(cls, none_default: str = "from the dataset preset"):
    """Decorate a command with one option per config field, plus --config FILE."""

    def deco(f):
        for fld in reversed(dataclasses.fields(cls)):
            if fld.metadata.get("cli", True):
                f = _option(fld, none_default)(f)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML or TOML file of options; the command line overrides it")(f)

    return deco


# how each command continues after a native crash (edgeclr.crash reports it)
RESUME = {"train": "run the same command with --resume", "distill": "run the same command with --resume",
          "compress": "run the same command with --resume", "finetune": "run the same command with --resume",
          "embed": "re-run the same command (the images already embedded are kept)"}
_ENTRY = False  # set by main(): a real `edgeclr` process, not a test's CliRunner


def watch_crashes(out: str | None = None, pipeline: bool = False) -> None:
    """In the edgeclr process itself, report a native crash of this command as one line (edgeclr.crash)."""
    if not _ENTRY:
        return
    from edgeclr import crash

    name = click.get_current_context().info_name
    crash.arm(f"edgeclr {name}", RESUME.get(name, "re-run the same command"), out, pipeline)


def run_stage(fn, *args, interrupted: str | None = None, **kwargs):
    """Call a stage; user errors become one line on stderr and exit code 2; with `interrupted`,
    Ctrl-C prints that line and exits with 130. Processes started by --devices that failed: their
    exit code (they printed why). A native crash is one line too (watch_crashes)."""
    if fn not in (config.build, api.pipeline):  # the pipeline watches with its OUT and stages (pipeline())
        watch_crashes(kwargs.get("out"))
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        click.echo(f"\n{interrupted}", err=True)
        sys.exit(130)
    except EdgeclrError as e:  # the user's to fix: one clear line, exit code 2, no traceback
        if hasattr(e, "returncode"):  # distributed.WorkersFailed
            sys.exit(e.returncode)
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


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
    result = run_stage(api.train, config_file=config_file, **options,
                       interrupted="interrupted: the checkpoint is written; add --resume to continue")
    if os.environ.get("RANK", "0") == "0" and not result.get("launched"):  # under torchrun, rank 0 reports
        click.echo(f"checkpoint: {result['checkpoint']}" + (f"  kNN top-1: {result['knn_top1']:.2f}%" if "knn_top1" in result else ""))


@cli.command()
@config_options(config.DistillConfig, "from the teacher's training run")
def distill(config_file, **options):
    """Distil a SimCLR teacher's embeddings into a small student (MobileNet).

    Writes OUT/distill/{config.yaml, manifest.json, metrics.csv, checkpoints/last.pt, tb/}; the
    manifest links the teacher and records retention (student kNN / teacher kNN) and agreement.
    """
    result = run_stage(api.distill, config_file=config_file, **options,
                       interrupted="interrupted: the checkpoint is written; add --resume to continue")
    msg = f"checkpoint: {result['checkpoint']}"
    if "retention" in result:
        msg += (f"  kNN top-1: student {result['knn_top1']:.2f}% / teacher {result['teacher_knn_top1']:.2f}% "
                f"(retention {result['retention']:.3f}; top-10 neighbour overlap {result['topk_overlap']:.3f})")
    click.echo(msg)


@cli.command()
@click.argument("target")
@config_options(config.ExportConfig)
def export(target, config_file, **options):
    """Export TARGET's encoder (no projection head) to --format onnx | openvino | torchscript.

    TARGET is a checkpoint file, a stage folder, or a run folder (its most downstream stage).
    The file carries its preprocessing and provenance, and is checked against torch on real
    images before it is written as done.
    """
    r = run_stage(api.export, config_file=config_file, target=target, **options)
    p = r["parity"]
    click.echo(f"{r['path']}  ({', '.join(Path(f).name for f in r['files'])}); parity vs torch on {r['parity_images']} images: "
               + ", ".join(f"{k.replace('_', ' ')} {v:.6g}" for k, v in p.items()))


@cli.command()
@click.argument("student")
@config_options(config.CompressConfig)
def compress(student, config_file, **options):
    """Prune STUDENT (a distilled run) with recovery, export it and quantise it to INT8.

    Writes OUT/compress/{checkpoints/last.pt, models/{fp32,int8}.{onnx,xml}, report.md, report.json,
    manifest.json}: every artifact with kNN accuracy, agreement with the FP32 student, size, MACs
    and 1-thread latency.
    """
    r = run_stage(api.compress, config_file=config_file, student=student, **options,
                  interrupted="interrupted: the checkpoint is written; add --resume to continue")
    click.echo(r["table"])
    click.echo(f"report: {r['stage_dir']}/report.md")


@cli.command()
@click.argument("source")
@config_options(config.FinetuneConfig, "none")
def finetune(source, config_file, **options):
    """Few-label classifier or segmenter on SOURCE's encoder (a run folder's --stage, a stage folder or a checkpoint).

    classify: draws --labels-per-class labelled images, trains (--mode linear | frozen | full; --init
    random for the baseline), tests on the whole test split and exports the classifier (softmax
    probabilities, class names and preprocessing in the file). segment: --data IMAGES (or slide:FILES)
    with --masks (label maps or GeoJSON polygons), cut into tiles at the encoder's input size; a
    DeepLabV3 or LR-ASPP head (--mode frozen | full), tested by mIoU on --test-data / --test-masks or
    held-out tiles, exported as a segmenter. Writes OUT/{checkpoints/last.pt, result.json,
    metrics.csv, manifest.json, export/classifier.* or segmenter.*}, and for a segmenter overlays.png
    and report.{md,html}. segment --label-efficiency 4,16,0: the curve against random init instead
    (OUT/label_efficiency.{json,md,png}, report.{md,html}).
    """
    from edgeclr.tasks import describe_score

    r = run_stage(api.finetune, config_file=config_file, source=source, **options,
                  interrupted="interrupted: the checkpoint is written; add --resume to continue")
    if r.get("label_efficiency"):
        click.echo(f"{r['table']}\n{r['verdict']}\nreport: {r['report']}")
        return
    if not r["completed"]:
        click.echo(f"stopped at step {r['step']}: {r['checkpoint']} (add --resume to continue)")
        return
    val = next((f", validation {v:.2f}%" for k, v in r.items() if k.startswith("val_") and k != "val_images" and v is not None), "")
    unit = "tiles" if r.get("task") == "segment" else "images"
    click.echo(f"test {describe_score(r)} on {r['test_images']} {unit} ({r['train_images']} labelled for training{val}); "
               f"checkpoint: {r['checkpoint']}")
    for k, a in r["artifacts"].items():
        click.echo(f"  {k}: {a['path']}  test {describe_score(a)}")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@config_options(config.PredictConfig)
def predict(inputs, config_file, **options):
    """Classify image files and folders (INPUTS) with an exported classifier; torch-free.

    Writes --out: .csv (path, top1, p_top1, ...) or .json; unreadable images are skipped and listed.
    """
    _echo_files(run_stage(api.predict, config_file=config_file, inputs=tuple(inputs), **options), "predicted", "classified")


def _echo_files(r: dict, count: str, verb: str) -> None:
    """A runtime command's skipped files (stderr), then its one-line summary."""
    for e in r["errors"]:
        click.echo(f"skipped: {e}", err=True)
    click.echo(f"{r['out']}: {r[count]} image(s) {verb} into {len(r['classes'])} classes ({len(r['errors'])} unreadable)")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@config_options(config.SegmentConfig)
def segment(inputs, config_file, **options):
    """Segment image files and folders (INPUTS) of any size with an exported segmenter; torch-free.

    Writes into the folder --out: per image STEM.png (8-bit label map, one class id per pixel) and
    STEM.overlay.png, classes.txt and segments.csv (each image's share of every class). Large images
    are tiled at the model's input size with overlap and stitched; unreadable images are skipped.
    """
    _echo_files(run_stage(api.segment, config_file=config_file, inputs=tuple(inputs), **options), "segmented", "segmented")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@config_options(config.EmbedConfig)
def embed(inputs, config_file, **options):
    """Embed image files and folders (INPUTS) with an exported model; torch-free.

    Writes OUT (.npy) and OUT.ids.txt; re-running skips files already embedded (also after a kill).
    --engine ray: a pool of Ray actors (--workers; a private Ray on 127.0.0.1 unless --address) writes
    OUT/part-NNNNN.parquet shards, each whole or not at all; a re-run embeds only the files no shard holds.
    """
    r = run_stage(api.embed, config_file=config_file, inputs=tuple(inputs), **options)
    for e in r["errors"]:
        click.echo(f"skipped: {e}", err=True)
    where = f"in {r['shards']} Parquet shards (id, embedding)" if r.get("engine") == "ray" else f"ids in {r['ids']}"
    click.echo(f"{r['out']}: {r['total']} x {r['dim']} embeddings ({r['new']} new, {r['skipped_done']} already done, "
               f"{len(r['errors'])} unreadable); {where}")


@cli.command()
@click.argument("queries", nargs=-1)
@config_options(config.SearchConfig)
def search(queries, config_file, **options):
    """Top-k gallery neighbours (cosine) of QUERIES (images), or of --query-embeddings; torch-free.

    With --labels, also the weighted-kNN class of each query.
    """
    cfg = run_stage(config.build, config.SearchConfig, config_file, queries=tuple(queries), **options)  # for --json
    r = run_stage(api.search, config_file=config_file, queries=tuple(queries), **options)
    for q in r:
        if cfg.json:
            click.echo(json.dumps(q))
            continue
        click.echo(f"{q['query']}" + (f"  -> class {q['class']}" if "class" in q else ""))
        for n in q["neighbours"]:
            click.echo(f"  {n['score']:.4f}  {n['id']}" + (f"  [{n['label']}]" if "label" in n else ""))


@cli.command()
@click.argument("models", nargs=-1, required=True)
@config_options(config.BenchConfig)
def bench(models, config_file, **options):
    """Latency (p50/p90/p99), images/s, peak memory, size, MACs and efficiency of MODELS.

    MODELS are exported files, checkpoints or run folders. Each configuration runs in its own
    process; configurations are interleaved and compared as ratios to a baseline. ONNX and
    OpenVINO models need no torch.
    """
    r = run_stage(api.bench, config_file=config_file, models=tuple(models), **options)
    click.echo(r["table"])
    click.echo(f"written: {r['out']}/bench.json, bench.md" + (", bench.png" if r.get("chart") else ""))


@cli.command()
@click.argument("run")
@config_options(config.DeployConfig, "none")
def deploy(run, config_file, **options):
    """Measure every deployment candidate of RUN and ship the fastest within the accuracy budget.

    Candidates: the teacher's own exports, the distilled student and each pruning level, FP32 and
    INT8 per runtime, all timed in one interleaved run at --threads / --batch. Writes
    RUN/deploy/{model.onnx|model.xml, selection.json, selection.md, README.md, candidates/}.
    """
    r = run_stage(api.deploy, config_file=config_file, run=run, **options)
    click.echo(r["table"])
    click.echo(f"selected: {r['summary']}")
    click.echo(f"shipped: {', '.join(r['shipped'])}")


@cli.command("select")
@click.argument("selection")
@config_options(config.SelectConfig, "the selection's")
def select_(selection, config_file, **options):
    """Re-rank the candidates of SELECTION (RUN/deploy) with latencies measured on the board.

    On the board: `edgeclr bench RUN/deploy/candidates --profile pi5 --out b`; then here:
    `edgeclr select RUN/deploy --bench b/bench.json`.
    """
    r = run_stage(api.select, config_file=config_file, selection=selection, **options)
    click.echo(r["table"])
    click.echo(f"selected: {r['summary']}")


@cli.command("eval")
@click.argument("target")
@config_options(config.EvalConfig)
def eval_(target, config_file, **options):
    """kNN and linear-probe accuracy of TARGET's embeddings, with random-init and raw-pixel baselines.

    TARGET is a checkpoint file, a stage folder (runs/NAME/train) or a run folder (runs/NAME: its
    most downstream model; runs/NAME/train for its teacher).
    """
    result = run_stage(api.evaluate, config_file=config_file, target=target, **options)
    if "run" in result:  # --compare
        click.echo(f"{result['run']} on {result['data']}: {result['train_images']} labeled bank / {result['test_images']} test images")
        click.echo(result["table"])
        return
    click.echo(f"{result['data']}: {result['train_images']} labeled bank / {result['test_images']} test images, "
               f"kNN k={result['knn_k']} T={result['knn_t']}")
    click.echo(result["table"])
    if result.get("label_efficiency"):
        le = Path(result["label_efficiency"])
        d = json.loads(le.read_text())
        click.echo(f"\nlabel efficiency ({','.join(map(str, d['levels']))} per class, {d['draws']} draws): {le}")
        click.echo(le.with_suffix(".md").read_text().rstrip())


@cli.command()
@config_options(config.PipelineConfig, "the preset's")
@click.option("--from", "from_stage", type=click.Choice(stages.NAMES), default=None,
              help="re-run this stage and every later one (earlier ones must have finished)")
@click.option("--until", type=click.Choice(stages.NAMES), default=None, help="stop after this stage")
def pipeline(config_file, **options):
    """All stages in one command: train -> distill -> compress -> export -> eval -> bench -> deploy -> report.

    Writes OUT/{train,distill,compress,export,bench,deploy}/, OUT/compare.md and OUT/report.{md,html};
    OUT/deploy/ holds the model to ship.
    Re-running skips finished stages whose options did not change and resumes an interrupted one;
    --config FILE takes top-level options and a section per stage (train:, distill:, ...).
    """
    cfg = run_stage(config.build, config.PipelineConfig, config_file, **options)  # to name OUT when interrupted
    try:
        watch_crashes(cfg.out, pipeline=True)
        r = run_stage(api.pipeline, config_file=config_file, **options)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: re-run the same command to continue ({cfg.out}/pipeline.json records where it stopped)",
                   err=True)
        sys.exit(130)
    click.echo("stages: " + ", ".join(f"{k} {v}" for k, v in r["stages"].items()))
    if r["report"]:
        click.echo(f"report: {r['report']}")


def main():
    global _ENTRY
    _ENTRY = True
    cli(prog_name="edgeclr")


if __name__ == "__main__":
    main()
