"""The run-folder contract shared by every stage (docs/architecture.md, "Run directory").

    runs/<name>/<stage>/config.yaml     resolved config
    runs/<name>/<stage>/manifest.json   stage, version, inputs (+ sha256), model spec, preprocessing,
                                        embedding dim, metrics, wall time
    runs/<name>/<stage>/metrics.csv     long format: time, stage, epoch, step, name, value
                                        (so training, monitors and `edgeclr eval` all append to it)

Kept apart from the stages so that every stage writes the same files the same way.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import edgeclr
from edgeclr.errors import DataError, OutputError  # noqa: F401  (raised here; defined with the others)
from edgeclr.formats import RUNTIME_SUFFIXES

METRICS_HEADER = ["time", "stage", "epoch", "step", "name", "value"]


def make_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` (and parents) and prove a file can be written there, before any work.

    Raises:
        OutputError: read-only file system, no permission, or a file where a folder should be.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = __import__("tempfile").mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to the {what} {path}: {e.strerror or e}. Choose another --out (a folder "
                          "you can write to), or fix its permissions; nothing was done") from None
    return path


class MetricsLog:
    """Append-only metrics.csv; each row is flushed so a killed run keeps what it logged."""

    def __init__(self, path: str | Path, stage: str):
        self.path, self.stage = Path(path), stage
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(METRICS_HEADER)

    def log(self, metrics: dict[str, float], epoch: int | None = None, step: int | None = None) -> None:
        t = f"{time.time():.3f}"
        for k, v in metrics.items():
            self.w.writerow([t, self.stage, "" if epoch is None else epoch, "" if step is None else step, k, f"{float(v):.6g}"])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_atomic(content: str | bytes, path: str | Path) -> None:
    """Write a file whole or not at all (a temporary beside it, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    write_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)


def write_manifest(stage_dir: str | Path, stage: str, *, inputs: dict, spec: dict | None, preprocess: dict | None,
                   embed_dim: int | None, metrics: dict, wall_time_s: float, artifacts: dict | None = None,
                   extra: dict | None = None) -> Path:
    m = {
        "stage": stage,
        "edgeclr_version": edgeclr.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "inputs": inputs,
        "model_spec": spec,
        "preprocess": preprocess,
        "embedding_dim": embed_dim,
        "artifacts": artifacts or {},
        "metrics": metrics,
        "wall_time_s": round(wall_time_s, 2),
    }
    m.update(extra or {})
    path = Path(stage_dir) / "manifest.json"
    write_json_atomic(m, path)
    return path


def exported_files(run_dir: str | Path, suffixes=RUNTIME_SUFFIXES) -> list[Path]:
    """Exported models under a run folder, sorted; skips hidden files and folders (partial writes,
    OUT/.replaced/ of the pipeline) and a run folder's deploy/ (its candidates are copies or
    variants of these files, measured by `edgeclr deploy` itself; `edgeclr bench RUN/deploy/candidates`
    times them)."""
    root = Path(run_dir)
    return sorted(f for f in root.rglob("*") if f.suffix in suffixes
                  and not any(part.startswith(".") for part in f.relative_to(root).parts)
                  and f.relative_to(root).parts[0] != "deploy")


def read_json(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object file that edgeclr wrote (`what` says which, with the command that writes it); an
    empty, damaged, non-JSON file, or one without `keys`, is a DataError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: give {what}")
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not JSON ({' '.join(str(e).split())[:120]}): give {what}") from e
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if not isinstance(d, dict) or missing:
        raise DataError(f"{path} is JSON but not {what.split(' (')[0]} ({'no ' + ', '.join(missing) if missing else 'not an object'}): "
                        f"give {what}")
    return d


def read_manifest(stage_dir: str | Path) -> dict:
    p = Path(stage_dir) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}
