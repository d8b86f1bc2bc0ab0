"""edgeclr.runtime.commands: `edgeclr embed` (resumable) and `edgeclr search`, and a runtime-only install."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run
from PIL import Image

from edgeclr.runtime import Embedder


@pytest.fixture
def gallery(tmp_path):
    """Real images: digits at 32 px in class folders, PNG and JPEG."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "gallery"
    for i in range(30):
        sub = root / str(d.target[i])
        sub.mkdir(parents=True, exist_ok=True)
        a = (d.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(np.kron(a, np.ones((4, 4), np.uint8))).save(sub / f"{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


# -- embed -------------------------------------------------------------------------------------


def test_embed_writes_ids_resumes_and_skips_corrupt_files(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    (gallery / "0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out), "--batch-size", "7"])
    assert "broken.jpg" in r.output and "30 x" in r.output
    emb = np.load(out)
    ids = (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert emb.shape == (30, 64) and len(ids) == 30 and all(Path(i).exists() for i in ids)
    direct = Embedder.load(model).embed(ids[:5])
    assert np.allclose(direct, emb[:5], atol=1e-5)
    # a grown folder: only the new file is embedded, earlier rows are kept as they are
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(gallery / "0" / "new.png")
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    assert "(1 new, 30 already done, 1 unreadable)" in r.output
    assert np.array_equal(np.load(out)[:30], emb)
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(tmp_path / "x.npy"), "--on-error", "raise"], ok=False)
    assert r.exit_code == 2 and "broken.jpg" in r.output


def test_embed_killed_midway_resumes_without_redoing(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "edgeclr", "embed", str(gallery), "--model", str(model), "--out", str(out),
                          "--batch-size", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ids = tmp_path / "emb.partial.ids.txt"
    while not ids.exists() or ids.read_text().count("\n") < 2:  # two images done
        assert p.poll() is None, p.stdout.read().decode()
    p.kill()
    p.wait()
    assert not out.exists()
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    done = int(r.output.split(" already done")[0].split(", ")[-1])
    assert 1 <= done < 30 and "30 x" in r.output
    full = Embedder.load(model).embed((tmp_path / "emb.ids.txt").read_text().splitlines())
    assert np.allclose(np.load(out), full, atol=1e-5)


@pytest.mark.parametrize("cut", ["row written, id not", "half a row", "half an id line"])
def test_a_run_cut_between_its_two_writes_resumes_with_every_row_beside_its_own_id(model, gallery, tmp_path, cut):
    """The progress files of a killed `embed` (rows, then ids, per batch): the next run cuts both back
    to what they hold in full before it appends (a stale row once shifted every later row by one)."""
    from edgeclr.runtime import PartialEmbeddings, embed_files_to, list_inputs

    out = tmp_path / "emb.npy"
    e = Embedder.load(model)
    files = [str(f) for f in list_inputs([gallery])][:6]
    part = PartialEmbeddings(out, e.dim)
    part.append(e.embed(files[:2]), files[:2])
    stale = e.embed(files[2:3])
    if cut == "row written, id not":
        part.rows_f.open("ab").write(stale.tobytes())
    elif cut == "half a row":
        part.rows_f.open("ab").write(stale.tobytes()[: e.dim * 2])
    else:
        part.rows_f.open("ab").write(stale.tobytes())
        part.ids_f.open("a").write(files[2][:10])
    embed_files_to(model, files, out)
    got, ids = np.load(out), (tmp_path / "emb.ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(files) and len(got) == 6
    assert np.allclose(got, e.embed(ids), atol=1e-5)


# -- search ------------------------------------------------------------------------------------


def test_search_cli_finds_the_image_itself_and_classifies(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    q = sorted((gallery / "3").iterdir())[0]
    r = run(["search", str(q), "--gallery", str(out), "--model", str(model), "--labels", "folder", "--k", "3", "--json",
             "--save-index", str(tmp_path / "g.npz")])
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["neighbours"][0]["id"] == str(q) and res["neighbours"][0]["score"] > 0.9999
    assert res["neighbours"][0]["label"] == "3" and "class" in res
    r = run(["search", "--gallery", str(tmp_path / "g.npz"), "--query-embeddings", str(out), "--k", "1"])
    assert r.output.count("1.0000") == 30
    r = run(["search", str(q), "--gallery", str(out)], ok=False)
    assert r.exit_code == 2 and "need --model" in r.output


def test_a_runtime_only_install_has_no_torch_and_embeds(model, classifier, gallery, tmp_path):
    """`pip install .[runtime]` in a fresh virtual environment: no torch, and `edgeclr embed`, `bench`
    and `predict` work."""
    repo = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{repo}[runtime]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    out = tmp_path / "e.npy"
    r = subprocess.run([str(venv / "bin" / "edgeclr"), "embed", str(gallery), "--model", str(model), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.load(out).shape == (30, 64)
    # and `edgeclr bench` on the exported model, in the same torch-free install
    r = subprocess.run([str(venv / "bin" / "edgeclr"), "bench", str(model), "--rounds", "1", "--runs", "3", "--warmup", "0",
                        "--out", str(tmp_path / "bench")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"][0]
    assert row["format"] == "onnx" and row["p50_ms"] > 0 and row["runtime"].startswith("onnxruntime")
    # and `edgeclr predict` with a fine-tuned classifier
    r = subprocess.run([str(venv / "bin" / "edgeclr"), "predict", str(gallery), "--model", str(classifier), "--top-k", "2",
                        "--out", str(tmp_path / "p.csv")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,top1,p_top1,top2,p_top2" and len(rows) == 31
    from edgeclr.runtime import Classifier

    first = rows[1].split(",")
    assert first[1] == Classifier.load(classifier).predict([first[0]])[0]


# -- one writer per output (edgeclr.lock) -------------------------------------------------------


def _digit_folder(root: Path, n: int) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    root.mkdir()
    for i in range(n):
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def _refusal_names_the_holder(stderr: str) -> None:
    msg = stderr.strip()
    assert msg.startswith("error: the embeddings file") and "being written by another edgeclr process (pid " in msg
    assert "command: edgeclr embed" in msg and "wait for it to finish, or choose another --out" in msg


def _rows_equal_a_single_run(model, root: Path, out: Path, tmp_path: Path) -> None:
    ids = out.with_suffix(".ids.txt").read_text().splitlines()
    assert len(ids) == len(set(ids)) == 600 and np.load(out).shape == (600, Embedder.load(model).dim)
    alone = tmp_path / "alone.npy"
    run(["embed", str(root), "--model", str(model), "--out", str(alone)])
    order = {k: i for i, k in enumerate((tmp_path / "alone.ids.txt").read_text().splitlines())}
    assert np.array_equal(np.load(out), np.load(alone)[[order[i] for i in ids]])  # rows equal to a single run's


def test_two_embeds_into_one_file_started_together_lose_nothing(model, tmp_path):
    """The overlapping cron job: before the lock, each read the same 'done' set and the file ended
    with 56 of 600 rows. Started together, either the second refuses at once (exit 2, naming the
    holder) or, when the first finished before the second looked (a loaded machine starts one
    late), the second finds every image done; either way every id is there exactly once."""
    root = _digit_folder(tmp_path / "many", 600)
    out = tmp_path / "same.npy"
    cmd = [sys.executable, "-m", "edgeclr", "embed", str(root), "--model", str(model), "--out", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted(((p.wait(timeout=300), *p.communicate()) for p in procs), key=lambda r: (r[0], "(0 new" in r[1]))
    codes = [r[0] for r in results]
    assert codes in ([0, 2], [0, 0]), results
    assert "600 x" in results[0][1] and "(600 new" in results[0][1], results
    if codes == [0, 2]:
        _refusal_names_the_holder(results[1][2])
    else:
        assert "600 x" in results[1][1] and "(0 new, 600 already done" in results[1][1], results
    _rows_equal_a_single_run(model, root, out, tmp_path)


def test_an_embed_started_while_another_writes_the_file_refuses_at_once(model, tmp_path):
    """The overlap made certain: the first embed is stopped (SIGSTOP) once it has written rows, so it
    holds the file while the second starts; then it continues and finishes."""
    root = _digit_folder(tmp_path / "many", 600)
    out = tmp_path / "same.npy"
    cmd = [sys.executable, "-m", "edgeclr", "embed", str(root), "--model", str(model), "--out", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    first = subprocess.Popen([*cmd, "--batch-size", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "same.partial.ids.txt"
    while not partial.exists() or not partial.read_text():
        assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, (second.stdout, second.stderr)
    _refusal_names_the_holder(second.stderr)
    assert first.wait(timeout=300) == 0
    assert "(600 new" in first.communicate()[0]
    _rows_equal_a_single_run(model, root, out, tmp_path)


def test_an_embed_killed_while_holding_the_file_does_not_block_the_next(model, gallery, tmp_path):
    out = tmp_path / "emb.npy"
    p = subprocess.Popen([sys.executable, "-m", "edgeclr", "embed", str(gallery), "--model", str(model), "--out", str(out),
                          "--batch-size", "1"], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = tmp_path / "emb.partial.ids.txt"
    while not ids.exists() or not ids.read_text():
        assert p.poll() is None
    p.kill()  # SIGKILL: the kernel drops its lock
    p.wait()
    r = run(["embed", str(gallery), "--model", str(model), "--out", str(out)])
    assert "30 x" in r.output
