"""`edgeclr embed`, `search`, `predict` and `segment`: file-level work on top of `Embedder`,
`Index`, `Classifier` and `Segmenter` (resumable embedding into OUT.npy + OUT.ids.txt, gallery
labels, queries, class predictions into CSV or JSON, label maps and overlays into a folder)."""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeclr.errors import ImageError, ModelError
from edgeclr.lock import hold
from edgeclr.runtime.embedder import Classifier, Embedder, Segmenter
from edgeclr.runtime.images import list_inputs, none_readable
from edgeclr.runtime.index import Index


def ids_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".ids.txt")


def read_embeddings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings and their ids from `edgeclr embed`'s OUT.npy + OUT.ids.txt, or from the
    folder of Parquet shards `edgeclr embed --engine ray` writes."""
    path = Path(path)
    if path.is_dir():
        from edgeclr.runtime.ray_embed import read_shards

        return read_shards(path)
    if not path.is_file():
        raise ModelError(f"embeddings file {path} does not exist")
    hint = "give the .npy written by `edgeclr embed` (or an index .npz from `edgeclr search --save-index`)"
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # empty, truncated, not a .npy, or an object array
        raise ModelError(f"{path} is not an embeddings file ({type(e).__name__}: {' '.join(str(e).split())[:200]}): {hint}") from e
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ModelError(f"{path} holds a {getattr(emb, 'shape', '?')} {getattr(emb, 'dtype', '')} array, not (N, D) float "
                         f"embeddings: {hint}")
    try:
        ids = ids_path(path).read_text().splitlines() if ids_path(path).exists() else [str(i) for i in range(len(emb))]
    except UnicodeDecodeError as e:
        raise ModelError(f"{ids_path(path)} is not a text file of ids, one per line: re-run `edgeclr embed`") from e
    if len(ids) != len(emb):
        raise ModelError(f"{path} holds {len(emb)} embeddings but {ids_path(path)} {len(ids)} ids")
    return emb, ids


class PartialEmbeddings:
    """Append-only progress of an embedding run: OUT.partial.f32 (rows of D float32) + OUT.partial.ids.txt."""

    def __init__(self, out: Path, dim: int):
        self.rows_f, self.ids_f, self.dim = out.with_name(out.stem + ".partial.f32"), out.with_name(out.stem + ".partial.ids.txt"), dim

    def read(self) -> tuple[np.ndarray, list[str]]:
        """The rows and ids both files hold in full. A kill between (or during) the two writes of
        append() leaves one file longer, or a row or line cut short: both files are cut back to
        the common part, so the rows appended next line up with their ids."""
        if not self.rows_f.exists():
            self.ids_f.unlink(missing_ok=True)
            return np.zeros((0, self.dim), np.float32), []
        rows = np.fromfile(self.rows_f, np.float32)
        text = self.ids_f.read_bytes() if self.ids_f.exists() else b""
        lines = text.split(b"\n")[:-1]  # complete lines only: the text after the last newline was cut
        n = min(len(rows) // self.dim, len(lines))
        keep = sum(len(x) + 1 for x in lines[:n])
        if self.rows_f.stat().st_size != n * self.dim * 4:
            os.truncate(self.rows_f, n * self.dim * 4)
        if len(text) != keep:  # only when the file exists: a missing one reads as b"" and keeps 0
            os.truncate(self.ids_f, keep)
        return rows[: n * self.dim].reshape(n, self.dim), [x.decode("utf-8") for x in lines[:n]]

    def append(self, emb: np.ndarray, ids: list[str]) -> None:
        with open(self.rows_f, "ab") as f:
            f.write(np.ascontiguousarray(emb, np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())
        with open(self.ids_f, "a", encoding="utf-8") as f:
            f.write("".join(i + "\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        self.rows_f.unlink(missing_ok=True)
        self.ids_f.unlink(missing_ok=True)


def embed_files_to(model: str | Path, inputs: Sequence[str | Path], out: str | Path, batch_size: int = 32, threads: int = 0,
                   on_error: str = "skip", precision: str = "f32", progress: bool = False) -> dict:
    """Embed image files into OUT (.npy, (N, D) float32) + OUT.ids.txt (one path per row).

    Resumable: ids already in OUT or in the progress files of an interrupted run are skipped,
    and new rows are appended, so re-running on a grown folder embeds only the new files. One
    writer at a time: OUT is locked (edgeclr.lock) from before it is read until it is replaced.
    """
    out = Path(out)
    if out.suffix != ".npy":
        raise ImageError(f"--out {out}: embeddings are written as .npy")
    with hold(out, "the embeddings file", is_dir=False):  # another embed into OUT refuses at once: nothing is lost
        return _embed_files_to(out, model, inputs, batch_size, threads, on_error, precision, progress)


def _embed_files_to(out: Path, model, inputs, batch_size, threads, on_error, precision, progress) -> dict:
    emb = Embedder.load(model, threads=threads, precision=precision)
    files = list_inputs(inputs)
    done_emb, done_ids = read_embeddings(out) if out.exists() else (np.zeros((0, emb.dim), np.float32), [])
    if done_emb.shape[1] != emb.dim:
        raise ModelError(f"{out} holds {done_emb.shape[1]}-d embeddings, {model} makes {emb.dim}-d: use another --out")
    part = PartialEmbeddings(out, emb.dim)
    part_emb, part_ids = part.read()
    done = set(done_ids) | set(part_ids)
    todo = [f for f in files if str(f) not in done]
    errors: list[str] = []
    bar = None
    if progress and todo:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc="embed")
        except ImportError:
            bar = None
    for ids, vectors, errs in emb.embed_files(todo, batch_size, on_error):
        part.append(vectors, ids)
        errors += errs
        if bar is not None:
            bar.update(len(ids) + len(errs))
    if bar is not None:
        bar.close()
    part_emb, part_ids = part.read()
    all_ids = done_ids + part_ids
    if not all_ids and errors:  # nothing to write: every input was unreadable
        part.clear()
        raise none_readable(errors)
    tmp = out.with_name(f".{out.name}.tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(all_ids), emb.dim))
    arr[: len(done_ids)], arr[len(done_ids):] = done_emb, part_emb
    arr.flush()
    del arr
    ids_tmp = ids_path(out).with_name(f".{ids_path(out).name}.tmp")
    ids_tmp.write_text("".join(i + "\n" for i in all_ids))
    tmp.replace(out)
    ids_tmp.replace(ids_path(out))
    part.clear()
    return {"out": str(out), "ids": str(ids_path(out)), "total": len(all_ids), "new": len(part_ids), "skipped_done": len(files) - len(todo),
            "errors": errors, "dim": emb.dim, "model": str(model)}


def labels_for(ids: Sequence[str], spec: str | None) -> list[str] | None:
    """Gallery labels: None; "folder" (each id's parent folder name); or a text file, one per line."""
    if not spec:
        return None
    if spec == "folder":
        return [Path(i).parent.name for i in ids]
    p = Path(spec)
    if not p.is_file():
        raise ModelError(f"--labels {spec}: give 'folder' or a text file with one label per gallery row")
    try:
        labels = p.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ModelError(f"--labels {spec} is not a text file (UTF-8): give 'folder' or one label per gallery row") from e
    if len(labels) != len(ids):
        raise ModelError(f"--labels {spec} has {len(labels)} lines for {len(ids)} gallery rows")
    return labels


def search_main(cfg) -> list[dict]:
    """`edgeclr search`: a list of {query, neighbours: [{id, score, label?}], class?} per query."""
    g = Path(cfg.gallery)
    if g.suffix == ".npz":
        index = Index.load(g, cfg.backend)
        if cfg.labels:
            index = Index(index.emb, index.ids, labels_for(index.ids.tolist(), cfg.labels), cfg.backend)
    else:
        emb, ids = read_embeddings(g)
        index = Index(emb, ids, labels_for(ids, cfg.labels), cfg.backend)
    if cfg.save_index:
        index.save(cfg.save_index)
    if cfg.query_embeddings:
        q, qids = read_embeddings(cfg.query_embeddings)
    else:
        embedder = Embedder.load(cfg.model, threads=cfg.threads)
        files = list_inputs(cfg.queries)
        q, qids = embedder.embed(files), [str(f) for f in files]
    scores, idx = index.search(q, cfg.k)
    classes = index.classify(q, cfg.knn_k, cfg.knn_t) if index.labels is not None else None
    out = []
    for i, qid in enumerate(qids):
        nb = [{"id": str(index.ids[j]), "score": round(float(s), 6), **({"label": str(index.labels[j])} if index.labels is not None else {})}
              for s, j in zip(scores[i], idx[i])]
        out.append({"query": qid, "neighbours": nb, **({"class": str(classes[i])} if classes is not None else {})})
    return out


PREDICT_SUFFIXES = (".csv", ".json")


def predict_files_to(model: str | Path, inputs: Sequence[str | Path], out: str | Path, top_k: int = 1, batch_size: int = 32,
                     threads: int = 0, on_error: str = "skip", precision: str = "f32") -> dict:
    """Classify image files with an exported classifier into OUT: .csv (path, top1, p_top1, top2,
    p_top2, ...: one row per readable image) or .json (a list of {path, top: [[class, p], ...]}).

    Unreadable images are skipped and returned in `errors` (on_error="raise": the first raises
    ImageError). OUT is written whole under a temporary name and renamed, under a lock: a killed run
    leaves the previous OUT (or none), never half a file.
    """
    out = Path(out)
    if out.suffix.lower() not in PREDICT_SUFFIXES:
        raise ImageError(f"--out {out}: predictions are written as .csv or .json")
    if top_k < 1:
        raise ImageError(f"--top-k must be >= 1, got {top_k}")
    clf = Classifier.load(model, threads=threads, precision=precision)
    files = list_inputs(inputs)
    with hold(out, "the predictions file", is_dir=False):
        rows, errors = [], []
        for ids, probs, errs in clf.embed_files(files, batch_size, on_error):
            rows += [(i, r) for i, r in zip(ids, clf.rank(probs, top_k))]
            errors += errs
        if not rows and errors:  # nothing to write: every input was unreadable
            raise none_readable(errors)
        k = min(top_k, clf.dim)
        if out.suffix.lower() == ".json":
            text = json.dumps([{"path": i, "top": [[c, round(p, 6)] for c, p in r]} for i, r in rows], indent=1) + "\n"
        else:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["path"] + [x for j in range(1, k + 1) for x in (f"top{j}", f"p_top{j}")])
            for i, r in rows:
                w.writerow([i] + [x for c, p in r for x in (c, f"{p:.6f}")])
            text = buf.getvalue()
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return {"out": str(out), "predicted": len(rows), "errors": errors, "classes": clf.classes, "model": str(model),
            "rows": [{"path": i, "top": r} for i, r in rows]}


def segment_files_to(model: str | Path, inputs: Sequence[str | Path], out: str | Path, overlay: bool = True,
                     overlap: int | None = None, threads: int = 0, on_error: str = "skip", precision: str = "f32",
                     batch_size: int = 16, level: int | None = None, mpp: float | None = None) -> dict:
    """Segment image files with an exported segmenter into the folder OUT: per image STEM.png (an
    8-bit label map of class ids, one per pixel) and, with overlay, STEM.overlay.png (the image with
    the class colours blended in), plus classes.txt (line i = class id i) and segments.csv (path,
    and the share of pixels of each class).

    Images of any size are tiled at the model's input size with overlap and stitched. A whole-slide
    image (runtime.slides) is segmented at `level` (or the level nearest `mpp`; default the finest
    within 64 Mpixels), and pixels outside its detected tissue are background. Each file is
    written under a temporary name and renamed, so a killed run leaves whole files only. Unreadable
    images are skipped and returned in `errors` (on_error="raise": the first raises ImageError).
    """
    from PIL import Image

    from edgeclr.runtime.images import load_image
    from edgeclr.runtime.slides import SLIDE_SUFFIXES, is_slide, read_level

    seg = Segmenter.load(model, threads=threads, precision=precision)
    files = list_inputs(inputs, extra_suffixes=SLIDE_SUFFIXES)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ImageError(f"--out {out} is a file: segment writes a folder of label maps")
    out.mkdir(parents=True, exist_ok=True)
    stems = {}
    with hold(out, "the segmentation folder", is_dir=True):
        rows, errors = [], []
        for f in files:
            tissue = None
            try:
                if is_slide(f):
                    img, tissue, _, _ = read_level(f, level, mpp)
                else:
                    img = load_image(f, seg.meta.preprocess.channels, None)
            except ImageError as e:
                if on_error == "raise":
                    raise
                errors.append(str(e))
                continue
            stem = Path(f).stem
            stems[stem] = stems.get(stem, 0) + 1
            name = stem if stems[stem] == 1 else f"{stem}-{stems[stem]}"  # two inputs with the same name
            labels = seg.segment_image(img, overlap, batch_size)
            if tissue is not None:
                labels[~tissue] = 0  # glass is background
            _write_png(Image.fromarray(labels, "L"), out / f"{name}.png")
            if overlay:
                _write_png(seg.overlay(img, labels), out / f"{name}.overlay.png")
            share = np.bincount(labels.ravel(), minlength=seg.dim) / labels.size
            rows.append([str(f), f"{name}.png"] + [f"{v:.6f}" for v in share])
        if not rows and errors:
            raise none_readable(errors)
        (out / "classes.txt").write_text("\n".join(seg.classes) + "\n", encoding="utf-8")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "labels"] + [f"share_{c}" for c in seg.classes])
        w.writerows(rows)
        tmp = out / ".segments.csv.tmp"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        tmp.replace(out / "segments.csv")
    return {"out": str(out), "segmented": len(rows), "errors": errors, "classes": seg.classes, "model": str(model)}


def _write_png(img, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
