"""One checkpoint format for every stage.

A checkpoint is one dict of plain data and tensors, loadable with
`torch.load(path, weights_only=True)` (no pickled classes, so an untrusted file cannot run code):

    format          "edgeclr-checkpoint"
    format_version  1
    stage           "train" | "distill" | ...
    edgeclr_version
    model           model state_dict
    spec            ModelSpec as a dict (rebuilds the model with models.create_model)
    preprocess      runtime.Preprocess as a dict
    optimizer, scheduler, scaler   state_dicts (or None)
    epoch, step     position to resume at: `step` batches of `epoch` are done; global_step overall
    rng             torch / cuda / python generator states (edgeclr draws its own randomness
                    from generators seeded by (seed, epoch, step), so these are a courtesy)
    config          the stage's resolved config (plain dict)
    metrics         last logged metrics

Writes are atomic: a temp file in the same folder, flushed and fsynced, then `os.replace`; the
previous good file is kept as `<name>.prev.pt`.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from edgeclr.errors import CheckpointError  # noqa: F401  (raised here; defined with the others)

FORMAT = "edgeclr-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "stage", "model", "spec", "preprocess")


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python") is not None:
        random.setstate(_tuplify(state["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(obj: dict, path: str | Path, keep_previous: bool = True) -> Path:
    """Atomically write `obj` to `path`; the file already there becomes `<stem>.prev.pt`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:  # disk full, quota, I/O error: the previous checkpoint is untouched
        Path(tmp).unlink(missing_ok=True)
        kept = path if path.exists() else previous_path(path)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}. "
                              + (f"The previous checkpoint {kept} is intact; " if kept.exists() else "")
                              + "free space (or choose another --out) and run the same command with --resume") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate an edgeclr checkpoint (weights_only: no code runs).

    Raises:
        CheckpointError: missing, truncated, not a checkpoint, or not an edgeclr checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on bad files
        prev = previous_path(path)
        hint = f" The previous good checkpoint is {prev}." if prev.exists() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupt or contains "
                              f"pickled objects that weights_only loading refuses ({type(e).__name__}: {str(e)[:200]}).{hint}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgeclr checkpoint (no 'format: {FORMAT}' key); "
                              "edgeclr reads only checkpoints it wrote")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt['format_version']}, newer than this "
                              f"edgeclr reads ({FORMAT_VERSION}); upgrade edgeclr")
    return ckpt


def load_for_resume(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path]:
    """Load the checkpoint to resume from; when it is truncated or corrupt (a disk error, a copy
    cut short), fall back to the previous good one beside it and say so.

    Returns (checkpoint, the path actually loaded).
    """
    import warnings

    path = Path(path)
    try:
        return load(path, map_location), path
    except CheckpointError as e:
        prev = previous_path(path)
        if path.name.endswith(".prev.pt") or not prev.is_file():
            raise
        try:
            ckpt = load(prev, map_location)
        except CheckpointError:
            raise e from None
        warnings.warn(f"{path} cannot be read ({str(e).split(': ', 1)[-1][:160]}); resuming from the previous "
                      f"checkpoint {prev} instead (one save earlier: the steps after it are trained again)")
        return ckpt, prev


def find(target: str | Path, stage: str | tuple[str, ...] | None = None) -> Path:
    """A checkpoint file from a path: the file itself, a stage folder, or a run folder.

    For a run folder, `stage` says which stage folders to search (a name, or names in order of
    preference; `loading.find_checkpoint` says which for each role). Looks for `checkpoints/last.pt` (falling back to `last.prev.pt` when the last
    write was cut).
    """
    p = Path(target)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a checkpoint file, a stage folder or a run folder")
    prefer = (stage,) if isinstance(stage, str) else tuple(stage or ())
    candidates = [p] + [p / s for s in prefer]
    for d in candidates:
        for name in ("last.pt", "last.prev.pt"):
            f = d / "checkpoints" / name
            if f.is_file():
                return f
    where = " or ".join(f"{s}/checkpoints/last.pt" for s in ("", *prefer)).replace("/checkpoints", "checkpoints", 1)
    raise CheckpointError(f"no checkpoint ({where}) under {p}")


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run folder of a checkpoint: RUN for RUN/STAGE/checkpoints/last.pt, else the file's folder."""
    p = Path(ckpt_path).resolve()
    return p.parent.parent.parent if p.parent.name == "checkpoints" else p.parent


def sha256(path: str | Path) -> str:
    from edgeclr.data import sha256_file

    return sha256_file(path)
