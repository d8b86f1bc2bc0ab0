"""`edgeclr embed --engine ray` on a real two-node Ray cluster on this machine (a head and a second
node process): the same ids and embeddings as the local embed, and a worker killed mid-run, then
the command re-run, leaves every id exactly once. Slow (Ray starts in seconds per node): run with
`pytest -m slow tests/test_ray_embed.py` after `pip install 'edgeclr[ray]'`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_checkpoint, run
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's token authentication, on every node and this driver: read at import
pytest.importorskip("ray")
pytest.importorskip("pyarrow")
pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """2,000 real images as PNG files (scikit-learn's 1,797 digits, then the first 203 mirrored), an
    unreadable file, and an exported model."""
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("ray")
    (d / "img").mkdir()
    digits = load_digits().images
    for i in range(2000):
        a = digits[i] if i < len(digits) else digits[i - len(digits)][:, ::-1]
        Image.fromarray((a * 255 / 16).astype(np.uint8), "L").save(d / "img" / f"{i:04d}.png")
    (d / "img" / "broken.png").write_bytes(b"not a png")
    ck = make_checkpoint(d / "run" / "train" / "checkpoints" / "last.pt", "resnet18", width=8)
    run(["export", str(ck), "--format", "onnx", "--out", str(d / "m"), "--name", "model"])
    return d


def test_a_two_node_cluster_embeds_like_local_and_a_killed_worker_loses_nothing(archive, tmp_path):
    from ray._private.services import get_node_ip_address

    from edgeclr.runtime import read_embeddings

    d, model = archive, str(archive / "m" / "model.onnx")
    run(["embed", str(d / "img"), "--model", model, "--out", str(tmp_path / "local.npy")])
    local, local_ids = read_embeddings(tmp_path / "local.npy")
    assert len(local_ids) == 2000
    # the workers' environment is their node's: the fault kills the worker that wrote shard 1, once
    env = {**os.environ, "EDGECLR_FAULT": "kill:stage=ray_embed:step=1", "RAY_USAGE_STATS_ENABLED": "0"}
    port = 6400 + os.getpid() % 500
    addr = f"{get_node_ip_address()}:{port}"
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], env=env,
                       check=True, capture_output=True)
        subprocess.run([RAY, "start", f"--address={addr}", "--num-cpus=1"], env=env, check=True, capture_output=True)
        args = ["embed", str(d / "img"), "--model", model, "--engine", "ray", "--address", addr, "--workers", "2",
                "--threads", "1", "--shard-size", "400", "--out", str(tmp_path / "shards")]
        r = run(args, ok=False)
        assert r.exit_code == 2 and "a Ray worker died" in r.output and "run the same command again" in r.output
        kept = sorted(p.name for p in (tmp_path / "shards").glob("part-*.parquet"))
        assert "part-00001.parquet" in kept and len(kept) < 5 and not list((tmp_path / "shards").glob(".part-*"))
        r = run(args)
        assert "1 unreadable" in r.output and "2000 x" in r.output
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    emb, ids = read_embeddings(tmp_path / "shards")
    assert len(ids) == len(set(ids)) == 2000 and set(ids) == set(local_ids)  # every id exactly once
    order = {i: k for k, i in enumerate(local_ids)}
    assert np.abs(emb - local[[order[i] for i in ids]]).max() <= 1e-6
    r = run(["search", str(d / "img" / "0007.png"), "--model", model, "--gallery", str(tmp_path / "shards"), "--k", "1"])
    assert "0007.png" in r.output.splitlines()[1]


def test_bad_ray_requests(archive, tmp_path):
    model = str(archive / "m" / "model.onnx")
    r = run(["embed", str(archive / "img"), "--model", model, "--address", "10.0.0.1:6379"], ok=False)
    assert r.exit_code == 2 and "--address belongs to --engine ray" in r.output
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-00000.parquet").write_bytes(b"garbage")
    r = run(["embed", str(archive / "img"), "--model", model, "--engine", "ray", "--out", str(tmp_path / "shards")], ok=False)
    assert r.exit_code == 2 and "is not a readable embedding shard" in r.output and "delete it" in r.output


def test_a_private_ray_listens_on_the_loopback_only():
    """Ray 2.60 on Linux listens on every interface; the Ray edgeclr starts for itself must not."""
    import ray

    from edgeclr.runtime.ray_embed import _start

    ray_, started = _start(None, 1)
    try:
        assert started and ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        pids = {str(p) for p in _ray_pids()}
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
        mine = [ln.split()[3] for ln in out if any(f"pid={p}," in ln for p in pids)]
        assert mine and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in mine), mine
    finally:
        ray_.shutdown()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # the switch is not left behind


def _ray_pids() -> list[int]:
    """This process and its descendants (the private Ray's GCS, raylet and workers)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout.split()
    children: dict[int, list[int]] = {}
    for pid, ppid in zip(map(int, out[::2]), map(int, out[1::2])):
        children.setdefault(ppid, []).append(pid)
    todo, seen = [os.getpid()], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    return seen
