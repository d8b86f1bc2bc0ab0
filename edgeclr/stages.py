"""The stage table: the one list of edgeclr's stages, in pipeline order.

The CLI's --from/--until choices, the pipeline's order, keys, skip and resume rules, the run
folder's "most downstream model" and the report all derive from it. Torch-free, and it imports
nothing of edgeclr and names no module: a stage's config class is resolved by
edgeclr.config.stage_config and its function by edgeclr.pipeline.stage_main.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: str | None  # class name in edgeclr.config (None: the report takes the run folder only)
    outputs: tuple[str, ...]  # files (relative to the run folder) that a finished stage leaves
    owned: tuple[str, ...]  # what it writes: set aside in OUT/.replaced/ when it runs again from scratch
    resumable: bool = False  # an interrupted run continues from its checkpoint
    model: bool = False  # writes a model checkpoint (RUN/NAME/checkpoints/last.pt)
    help: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("train", "TrainConfig", ("train/manifest.json", "train/checkpoints/last.pt"), ("train",),
          resumable=True, model=True, help="SimCLR pretraining of the teacher"),
    Stage("distill", "DistillConfig", ("distill/manifest.json", "distill/checkpoints/last.pt"),
          ("distill", "students"), resumable=True, model=True,
          help="the teacher's embeddings distilled into small students (the distill section's, in distill/, and the "
               "ladder's, in students/NAME/distill/)"),
    Stage("compress", "CompressConfig", ("compress/manifest.json", "compress/report.json"),
          ("compress",), resumable=True, model=True, help="pruning with recovery, FP32 and INT8 exports"),
    Stage("export", "ExportConfig", ("export/manifest.json",), ("export",),
          help="the teacher's own exports, for same-runtime comparisons"),
    Stage("eval", "EvalConfig", ("compare.json", "train/eval.json"), ("compare.json", "compare.md"),
          help="teacher vs random init and raw pixels; the retention table of every artifact"),
    Stage("bench", "BenchConfig", ("bench/bench.json",), ("bench",),
          help="latency, throughput, memory and size of every model"),
    Stage("deploy", "DeployConfig", ("deploy/selection.json",), ("deploy",), resumable=True,
          help="every candidate measured on the deployment settings; the fastest within the accuracy budget shipped"),
    Stage("report", None, ("report.html", "report.md"), (), help="report.md and report.html"),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# stages that write a model, most downstream last: a run folder's deployable model is its last one
MODEL_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.model)
# stages that take a section of options in a pipeline config file
SECTIONS: tuple[str, ...] = tuple(s.name for s in STAGES if s.config)


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")
