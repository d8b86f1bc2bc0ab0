"""The Python API: one function per command, the same function the command line calls.

    from edgeclr import api
    api.train(data="digits", out="runs/x")          # edgeclr train --data digits --out runs/x
    api.distill(teacher="runs/x")                   # edgeclr distill --teacher runs/x
    api.compress(student="runs/x")                  # edgeclr compress runs/x
    api.export(target="runs/x", format="onnx")      # edgeclr export runs/x --format onnx
    api.evaluate(target="runs/x")                   # edgeclr eval runs/x
    api.bench(models=["runs/x"])                    # edgeclr bench runs/x
    api.deploy(run="runs/x")                        # edgeclr deploy runs/x
    api.select(selection="runs/x/deploy", bench="pi5/bench.json")   # edgeclr select runs/x/deploy --bench ...
    api.pipeline(out="runs/demo")                   # edgeclr pipeline --out runs/demo
    api.finetune(source="runs/x", labels_per_class=10)   # edgeclr finetune runs/x --labels-per-class 10
    api.embed(inputs=["imgs/"], model="m.onnx", out="emb.npy")
    api.predict(inputs=["imgs/"], model="runs/x/finetune/export/classifier.onnx", out="preds.csv")
    api.search(queries=["q.png"], gallery="emb.npy", model="m.onnx")

Keyword arguments are the command's options with dashes as underscores (`input_size=96` for
`--input-size 96`), plus `config_file=` (YAML or TOML; the arguments override it). Each function
returns the dict the command prints from. Errors the user can fix are `edgeclr.errors.EdgeclrError`
subclasses. Importing this module does not import torch; a stage imports it when it runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import tempfile
from pathlib import Path

from edgeclr import config
from edgeclr.pipeline import stage_main

__all__ = ["train", "distill", "compress", "export", "evaluate", "bench", "deploy", "select", "pipeline", "finetune", "embed",
           "search", "predict", "segment"]


def _with_options(cls):
    """Give the function a keyword signature and a docstring listing cls's options, so help(api.train)
    and an editor show what the command line's --help shows."""

    def deco(fn):
        params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default if f.default is not dataclasses.MISSING
                                    else None) for f in dataclasses.fields(cls)]
        params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None))
        fn.__signature__ = inspect.Signature(params, return_annotation=dict)
        lines = [f"    {f.name}: {f.metadata.get('help') or '(see the command line)'}" for f in dataclasses.fields(cls)
                 if f.metadata.get("help") is not None]
        fn.__doc__ = (fn.__doc__ or "") + "\n\nOptions (None = the preset's or the upstream stage's):\n" + "\n".join(lines) + \
            "\n    config_file: YAML or TOML file of options; the arguments above override it\n"
        return fn

    return deco


def _run(name: str, cls, config_file, options) -> dict:
    cfg = config.build(cls, config_file, **options)
    return stage_main(name)(cfg)


@_with_options(config.TrainConfig)
def train(config_file=None, **options) -> dict:
    """SimCLR pretraining of the teacher; writes OUT/train. `devices=N` (N > 1) runs N processes under
    torchrun and returns rank 0's manifest figures.

    Returns {"stage_dir", "checkpoint", "completed", "knn_top1", "loss", ...}."""
    cfg = config.build(config.TrainConfig, config_file, **options)
    from edgeclr import distributed

    if cfg.devices > 1 and not distributed.launched_by_torchrun():
        return _launch(cfg)
    from edgeclr import train as stage

    return stage.main(cfg)


def _launch(cfg: config.TrainConfig) -> dict:
    """Run `edgeclr train` in cfg.devices processes (torchrun) with this resolved config."""
    import json

    from edgeclr import distributed

    with tempfile.TemporaryDirectory(prefix="edgeclr-launch-") as tmp:
        f = Path(tmp) / "train.yaml"
        config.save_yaml(dataclasses.replace(cfg, devices=1), f)
        rc = distributed.launch(cfg.devices, ["train", "--config", str(f)])
    if rc:
        raise distributed.WorkersFailed(rc)
    manifest = json.loads((Path(cfg.out) / "train" / "manifest.json").read_text())
    return {"stage_dir": str(Path(cfg.out) / "train"), "checkpoint": manifest["artifacts"]["checkpoint"],
            "completed": manifest.get("completed"), "launched": cfg.devices, **manifest["metrics"]}


@_with_options(config.DistillConfig)
def distill(config_file=None, **options) -> dict:
    """Distil a teacher (`teacher=` a train checkpoint or run folder) into a small student; writes OUT/distill.

    Returns {"stage_dir", "checkpoint", "completed", "knn_top1", "teacher_knn_top1", "retention", ...}."""
    return _run("distill", config.DistillConfig, config_file, options)


@_with_options(config.CompressConfig)
def compress(config_file=None, **options) -> dict:
    """Prune a distilled student (`student=`) with recovery, export it FP32 and INT8; writes OUT/compress.

    Returns {"stage_dir", "report", "table", "artifacts"}."""
    return _run("compress", config.CompressConfig, config_file, options)


@_with_options(config.ExportConfig)
def export(config_file=None, **options) -> dict:
    """Export an encoder (`target=` a checkpoint, stage or run folder) as a self-describing, parity-checked file.

    Returns {"path", "files", "parity", "parity_images", "meta"}."""
    return _run("export", config.ExportConfig, config_file, options)


@_with_options(config.EvalConfig)
def evaluate(config_file=None, **options) -> dict:
    """kNN and linear-probe accuracy of `target=` with baselines; `compare=True` on a run folder gives
    the retention table of every stage and artifact (`edgeclr eval`).

    Returns {"rows", "table", ...}."""
    return _run("eval", config.EvalConfig, config_file, options)


@_with_options(config.BenchConfig)
def bench(config_file=None, **options) -> dict:
    """Latency, throughput, memory and size of `models=` (exported files, checkpoints, run folders).

    Returns {"rows", "table", "machine", ...}; writes OUT/bench.{json,md,png}."""
    return _run("bench", config.BenchConfig, config_file, options)


@_with_options(config.DeployConfig)
def deploy(config_file=None, **options) -> dict:
    """Build, score and time every deployment candidate of a run folder (`run=`): the teacher's own
    exports, the distilled student and each pruning level, FP32 and INT8 per runtime; ship the fastest
    within `max_drop` kNN points of the teacher (or the most accurate under `max_latency_ms`) to
    OUT/deploy/model.*.

    Returns the selection: {"winner", "candidates", "rule", "summary", "table", ...}."""
    return _run("deploy", config.DeployConfig, config_file, options)


@_with_options(config.SelectConfig)
def select(config_file=None, **options) -> dict:
    """Re-rank a deployment (`selection=` RUN/deploy) with the latencies of a `bench=` bench.json measured
    on the target board (`edgeclr bench RUN/deploy/candidates --profile pi5` there); ships the new winner.

    Returns the selection, as `deploy`."""
    cfg = config.build(config.SelectConfig, config_file, **options)
    from edgeclr import deploy as stage

    return stage.rerank(cfg)


@_with_options(config.PipelineConfig)
def pipeline(config_file=None, **options) -> dict:
    """Every stage in order (train -> distill -> compress -> export -> eval -> bench -> deploy -> report), skipping
    finished ones; `from_stage=` / `until=` as the command's --from / --until.

    Returns {"out", "stages", "report"}."""
    cfg = config.build(config.PipelineConfig, config_file, **options)
    from edgeclr import pipeline as stage

    return stage.main(cfg)


@_with_options(config.FinetuneConfig)
def finetune(config_file=None, **options) -> dict:
    """A few-label classifier (`task="classify"`) or segmenter (`task="segment"`, `data=` images, `masks=` label
    maps) on the encoder of `source=` (a run folder's `stage=` teacher | student | pruned): linear probe, frozen
    encoder or full fine-tuning, from its weights or (`init="random"`) from random ones; tested and exported
    (softmax probabilities, class names in the file).

    Returns {"stage_dir", "checkpoint", "task", "test_top1" or "test_miou", "artifacts", ...}; with a
    segmenter's `label_efficiency="4,16,0"`, the curve instead: {"stage_dir", "label_efficiency" (its
    JSON), "table", "verdict", "report"}."""
    cfg = config.build(config.FinetuneConfig, config_file, **options)
    from edgeclr import finetune as stage

    return stage.main(cfg)


@_with_options(config.PredictConfig)
def predict(config_file=None, **options) -> dict:
    """Classify image files and folders (`inputs=`) with an exported classifier `model=` into `out=` (.csv or
    .json); torch-free.

    Returns {"out", "predicted", "errors", "classes", "rows"}."""
    cfg = config.build(config.PredictConfig, config_file, **options)
    from edgeclr import runtime

    return runtime.predict_files_to(cfg.model, cfg.inputs, cfg.out, cfg.top_k, cfg.batch_size, cfg.threads, cfg.on_error,
                                    cfg.precision)


@_with_options(config.SegmentConfig)
def segment(config_file=None, **options) -> dict:
    """Segment image files and folders (`inputs=`) with an exported segmenter `model=` into the folder `out=`
    (label-map PNGs, overlays, classes.txt, segments.csv); torch-free.

    Returns {"out", "segmented", "errors", "classes"}."""
    cfg = config.build(config.SegmentConfig, config_file, **options)
    from edgeclr import runtime

    return runtime.segment_files_to(cfg.model, cfg.inputs, cfg.out, cfg.overlay, cfg.overlap, cfg.threads, cfg.on_error,
                                    cfg.precision, cfg.batch_size, cfg.level, cfg.mpp)


@_with_options(config.EmbedConfig)
def embed(config_file=None, **options) -> dict:
    """Embed image files and folders (`inputs=`) with an exported `model=` into `out=` (.npy + .ids.txt);
    torch-free; re-running skips what is done. `engine="ray"`: `workers=` Ray actors of `threads=`
    CPUs each write Parquet shards into the folder `out=` (`address=` a running cluster).

    Returns {"out", "ids", "total", "new", "skipped_done", "dim", "errors"}."""
    cfg = config.build(config.EmbedConfig, config_file, **options)
    from edgeclr import runtime

    if cfg.engine == "ray":
        from edgeclr.runtime.ray_embed import embed_with_ray

        return embed_with_ray(cfg.model, cfg.inputs, cfg.out, cfg.workers, cfg.address, cfg.threads or 1, cfg.batch_size,
                              cfg.shard_size, cfg.on_error, cfg.precision)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    return runtime.embed_files_to(cfg.model, cfg.inputs, cfg.out, cfg.batch_size, cfg.threads, cfg.on_error, cfg.precision, show)


@_with_options(config.SearchConfig)
def search(config_file=None, **options) -> list[dict]:
    """Top-k gallery neighbours of query images (`queries=`, with `model=`) or `query_embeddings=`; torch-free.

    Returns one dict per query: {"query", "neighbours": [{"id", "score"[, "label"]}], ["class"]}."""
    cfg = config.build(config.SearchConfig, config_file, **options)
    from edgeclr import runtime

    return runtime.search_main(cfg)

