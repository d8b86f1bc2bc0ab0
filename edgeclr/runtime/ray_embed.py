"""`edgeclr embed --engine ray`: an archive embedded by a pool of Ray actors, into Parquet shards.

    embed_with_ray(model, inputs, "out/", workers=2)   # a local Ray on 127.0.0.1, or address="HOST:6379"
    read_shards("out/")                                # (N, D) embeddings and their ids, as read_embeddings

Each actor loads the model once (the same `Embedder`, preprocessing path and backends as the local
`edgeclr embed`, its intra-op threads set to the actor's CPUs: onnxruntime runs slower inside Ray
when they differ) and embeds a shard of files at a time: `OUT/part-NNNNN.parquet` (columns `id`,
the file path, and `embedding`, a fixed-size list of float32), written under a temporary name and
renamed once whole. So a re-run, after a killed worker, driver or node, reads the ids of the shards
that exist, embeds only the others into new shards, and never writes an id twice. Unreadable
images are skipped and listed, as in the local embed.

Security: Ray's dashboard and job API have no authentication. A Ray edgeclr starts itself has no
dashboard and listens on 127.0.0.1 only (`_start`); a cluster of several machines belongs on a
private network (docs/ray.md).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeclr import faults
from edgeclr.errors import ModelError
from edgeclr.runtime.images import list_inputs, none_readable

log = logging.getLogger(__name__)
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, its node on 127.0.0.1
SHARD = re.compile(r"^part-(\d{5,})\.parquet$")


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ModelError("Parquet shards need pyarrow: pip install 'edgeclr[ray]'") from e
    return pa, pq


def shard_files(folder: str | Path) -> list[Path]:
    """The finished shards of a folder, in shard order (temporary files of a killed run are not shards)."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if SHARD.match(p.name)), key=lambda p: int(SHARD.match(p.name).group(1))) \
        if folder.is_dir() else []


def write_shard(folder: Path, index: int, ids: list[str], vectors: np.ndarray) -> Path:
    """OUT/part-NNNNN.parquet, whole or not at all (a temporary name, then a rename)."""
    pa, pq = _arrow()
    vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), -1)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])
    final = folder / f"part-{index:05d}.parquet"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "embedding": emb}), tmp)
    os.replace(tmp, final)
    return final


def read_shards(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """(N, D) float32 embeddings and their ids from a folder of shards written by `embed --engine ray`."""
    _, pq = _arrow()
    files = shard_files(folder)
    if not files:
        raise ModelError(f"{folder} holds no embedding shards (part-NNNNN.parquet from `edgeclr embed --engine ray`)")
    embs, ids = [], []
    for f in files:
        try:
            t = pq.read_table(f)
            col = t.column("embedding").combine_chunks()
            d = col.type.list_size
            embs.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d))
            ids += t.column("id").to_pylist()
        except Exception as e:  # noqa: BLE001  (arrow raises several types on a damaged file)
            raise ModelError(f"{f} is not a readable embedding shard ({type(e).__name__}: {str(e)[:150]}): delete it and "
                             "re-run the embed, which embeds its files again") from e
    if len({e.shape[1] for e in embs}) > 1:
        raise ModelError(f"{folder} mixes embeddings of widths {sorted({e.shape[1] for e in embs})}: one model per folder")
    return np.concatenate(embs), ids


def _start(address: str | None, cpus: int):
    import ray

    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return ray, True
    # A private Ray of this process, every server on 127.0.0.1. On Linux Ray gives its node the
    # machine's own address (a node address of 127.0.0.1 is replaced by it) and listens on every
    # interface; its single-machine mode, the one it runs on macOS and Windows, keeps the node on the
    # loopback. Ray reads the switch at import (ray_constants) and its processes from the environment.
    from ray._private import ray_constants

    saved = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    finally:
        if saved[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
    return ray, True


def embed_with_ray(model: str | Path, inputs: Sequence[str | Path], out: str | Path, workers: int = 2, address: str | None = None,
                   threads: int = 1, batch_size: int = 32, shard_size: int = 1000, on_error: str = "skip",
                   precision: str = "f32") -> dict:
    """Embed image files into OUT/part-*.parquet with `workers` Ray actors of `threads` CPUs each
    (see the module docstring); returns the local embed's summary fields."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ModelError("--engine ray needs Ray: pip install 'edgeclr[ray]'") from e
    from edgeclr.lock import hold
    from edgeclr.runtime.embedder import Embedder

    out = Path(out)
    if out.suffix == ".npy":
        raise ModelError(f"--out {out}: the ray engine writes a folder of Parquet shards; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    dim = Embedder.load(model, threads=1, precision=precision).dim  # a bad model fails here, before Ray starts
    with hold(out, "the embeddings folder", is_dir=True):
        files = list_inputs(inputs)
        done_files = shard_files(out)
        done_emb, done_ids = read_shards(out) if done_files else (np.zeros((0, dim), np.float32), [])
        if done_emb.shape[1] != dim:
            raise ModelError(f"{out} holds {done_emb.shape[1]}-d embeddings, {model} makes {dim}-d: use another --out")
        done = set(done_ids)
        todo = [str(f) for f in files if str(f) not in done]
        first = int(SHARD.match(done_files[-1].name).group(1)) + 1 if done_files else 0
        chunks = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
        errors: list[str] = []
        new = 0
        if chunks:
            ray, started = _start(address, workers * threads)
            try:
                fits = int(ray.cluster_resources().get("CPU", 0) // threads)
                if fits < 1:
                    raise ModelError(f"the Ray cluster has {ray.cluster_resources().get('CPU', 0)} CPU(s): too few for one worker of "
                                     f"--threads {threads}")
                if workers > fits:  # an actor the cluster cannot place would wait for ever, its shards with it
                    log.warning("--workers %d: the cluster has CPUs for %d worker(s) of %d thread(s); using %d", workers, fits,
                                threads, fits)
                Worker = ray.remote(num_cpus=threads)(_Worker)
                pool = ray.util.ActorPool([Worker.remote(str(model), threads, precision)
                                           for _ in range(min(workers, fits, len(chunks)))])
                jobs = [(first + i, c) for i, c in enumerate(chunks)]
                for n, errs in pool.map_unordered(lambda a, j: a.run.remote(j[0], j[1], str(out), batch_size, on_error), jobs):
                    new += n
                    errors += errs
            except Exception as e:
                if type(e).__name__ in ("RayActorError", "ActorDiedError", "WorkerCrashedError", "NodeDiedError"):
                    raise ModelError(f"a Ray worker died ({type(e).__name__}); the finished shards in {out} are kept: run the same "
                                     "command again to embed the rest") from e
                raise
            finally:
                if started:
                    ray.shutdown()
        total = len(done_ids) + new
        if total == 0 and errors:
            raise none_readable(errors)
    return {"out": str(out), "ids": str(out), "total": total, "new": new, "skipped_done": len(files) - len(todo),
            "errors": errors, "dim": dim, "model": str(model), "shards": len(shard_files(out)), "engine": "ray"}


class _Worker:
    """One Ray actor: the model loaded once, then a shard of files at a time."""

    def __init__(self, model: str, threads: int, precision: str):
        from edgeclr.runtime.embedder import Embedder

        self.emb = Embedder.load(model, threads=threads, precision=precision)

    def run(self, index: int, paths: list[str], out: str, batch_size: int, on_error: str) -> tuple[int, list[str]]:
        ids, vecs, errors = [], [], []
        for i, v, e in self.emb.embed_files([Path(p) for p in paths], batch_size, on_error):
            ids += [str(x) for x in i]
            vecs.append(v)
            errors += e
        if ids:
            write_shard(Path(out), index, ids, np.concatenate(vecs))
        faults.maybe_kill("ray_embed", index)  # tests: a worker killed once its shard is written
        return len(ids), errors
