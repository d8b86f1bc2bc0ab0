"""The one model loader, and opening a dataset the way a checkpoint's run opened it.

    find_checkpoint(target, role=None) -> the checkpoint a file, stage folder or run folder means (ROLES)
    load_encoder(target, role="teacher")  -> (Encoder in eval mode, checkpoint dict, path)
    open_like_run(data, split, base_size, run_cfg) -> Dataset
    load_data(train_cfg) -> (pretraining Dataset, Preprocess)
    stage_checkpoints(run_dir) -> {stage: checkpoint path}

A target is a checkpoint file, a stage folder (runs/NAME/train) or a run folder (runs/NAME).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from edgeclr import checkpoint, data
from edgeclr.errors import CheckpointError
from edgeclr.models import Encoder, describe, model_from_checkpoint
from edgeclr.rundir import read_manifest
from edgeclr.runtime import Preprocess
from edgeclr.stages import MODEL_STAGES

# The one rule for which checkpoint a target means. A checkpoint file is itself and a stage folder
# (runs/NAME/train) its own checkpoint; a run folder (runs/NAME) means the stage its role names:
# role -> (stages searched in a run folder, in order; stages accepted, None for any; what to say when another stage's is given)
# None is every command without a role (eval, export, bench, finetune --stage model): the run's most
# downstream model, the one it would deploy.
ROLES: dict[str | None, tuple] = {
    None: (tuple(reversed(MODEL_STAGES)), None, ""),
    "teacher": (("train",), ("train",), "not a SimCLR teacher: pass the checkpoint or run folder written by `edgeclr train` "
                                        "(runs/NAME/train)"),
    "student": (("distill", "compress"), ("distill", "compress"),
                "compress takes a distilled student (`edgeclr distill`), e.g. runs/NAME or runs/NAME/distill"),
    "pruned": (("compress",), ("compress",), "not a pruned student: pass the run folder or checkpoint written by `edgeclr compress`"),
}


def find_checkpoint(target: str | Path, role: str | None = None) -> Path:
    """The checkpoint `target` means for `role` (see ROLES): the file itself, a stage folder's
    checkpoint, or a run folder's checkpoint of the first stage its role searches.

    Raises:
        CheckpointError: the target does not exist, or holds no checkpoint that the role takes.
    """
    stages = ROLES[role][0]
    try:
        return checkpoint.find(target, stages)
    except CheckpointError:
        p = Path(target)
        if not p.is_dir():
            raise
        found = [s for s in MODEL_STAGES if (p / s / "checkpoints").is_dir()]
        raise CheckpointError(f"{p} holds no {role or 'model'} checkpoint ({' or '.join(s + '/checkpoints/last.pt' for s in stages)})"
                              + (f"; it holds {', '.join(found)}" if found else "")
                              + ": give a run folder with that stage, a stage folder or a checkpoint file") from None


def load_encoder(target: str | Path, device="cpu", role: str | None = None) -> tuple[Encoder, dict, Path]:
    """(model in eval mode on `device`, its checkpoint dict, the checkpoint's path).

    role "teacher": a frozen `edgeclr train` checkpoint (a run folder gives its train stage);
    role "student": a distilled (or compressed) student (a run folder gives its distilled one, also
    once it holds a compressed one); "pruned": a compressed student; None: any stage (a run folder
    gives its most downstream model). `find_checkpoint` is the rule.

    Raises:
        CheckpointError: not found, truncated, a checkpoint of another stage than the role takes,
            or a model spec / pruning plan / weights that do not fit together.
    """
    _, accepted, hint = ROLES[role]
    path = find_checkpoint(target, role)
    ckpt = checkpoint.load(path)
    flag = f"--{role} " if role == "teacher" else ""
    if accepted and ckpt["stage"] not in accepted:
        raise CheckpointError(f"{flag}{path} is a {ckpt['stage']} checkpoint ({describe(ckpt['spec'])}), {hint}")
    try:
        pp = Preprocess.from_dict(ckpt["preprocess"])
        model = model_from_checkpoint(ckpt)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{flag}{path}: its model cannot be rebuilt from its spec {ckpt.get('spec')} and weights: "
                              f"{str(e)[:300]}") from e
    if pp.channels != ckpt["spec"]["in_chans"]:
        raise CheckpointError(f"{flag}{path}: preprocessing has {pp.channels} channels but the model takes "
                              f"{ckpt['spec']['in_chans']}")
    if role == "teacher":
        model.requires_grad_(False)
    return model.to(device).eval(), ckpt, path


def open_like_run(spec: str, split: str, base_size: int, run_cfg: Mapping, seed: int | None = None) -> data.Dataset:
    """A split of `spec` opened the way a training run with config `run_cfg` opened its data
    (the tiling options of a `tiles:` spec; folders at `base_size`)."""
    kw = dict(base_size=base_size, tile_size=run_cfg.get("tile_size", 64), tile_stride=run_cfg.get("tile_stride", 64),
              tile_min_foreground=run_cfg.get("tile_min_foreground", 0.5))
    if seed is not None:
        kw["seed"] = seed
    return data.open_dataset(spec, split, **kw)


def open_pretrain(cfg) -> data.Dataset:
    """The unlabeled training images of a TrainConfig (folders decoded at 1.25x the input size)."""
    return open_like_run(cfg.data, "pretrain", round(cfg.input_size * 1.25), vars(cfg), cfg.seed)


def load_data(cfg) -> tuple[data.Dataset, Preprocess]:
    """The pretraining dataset and the preprocessing that travels with the model.

    Folder images are decoded at 1.25x the input size for the random resized crop; tiles are
    stored at that size too.
    """
    ds = open_pretrain(cfg)
    mean, std = data.channel_stats(ds)
    # arrays hold whole images at their native size: evaluate on the whole image resized to the input;
    # folders hold photographs of any size: resize to input/0.875 and centre-crop, as ImageNet evaluation does
    resize = cfg.input_size if isinstance(ds, data.ArrayDataset) else round(cfg.input_size / 0.875)
    return ds, Preprocess(cfg.input_size, resize, mean, std, ds.channels)


def stage_checkpoints(run_dir: Path) -> dict[str, Path]:
    """{stage: checkpoint} of a run, in pipeline order, following the links a stage records when
    its inputs live in another run folder (compress -> its student, a student -> its teacher)."""
    found = {s: run_dir / s / "checkpoints" / "last.pt" for s in MODEL_STAGES
             if (run_dir / s / "checkpoints" / "last.pt").is_file()}
    if "compress" in found and "distill" not in found:
        st = ((read_manifest(run_dir / "compress") or {}).get("inputs") or {}).get("student")
        if st and Path(st).is_file():
            found["distill"] = Path(st)
    if "train" not in found:
        for s in ("distill", "compress"):
            tp = (checkpoint.load(found[s]).get("teacher") or {}).get("path") if s in found else None
            if tp and Path(tp).is_file():
                found["train"] = Path(tp)
                break
    return {s: found[s] for s in MODEL_STAGES if s in found}
