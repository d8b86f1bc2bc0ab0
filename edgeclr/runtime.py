"""The device side of edgeclr, torch-free: image loading, the ONE preprocessing path, exported-model
metadata, `Embedder` (onnxruntime or OpenVINO) and `Index` (nearest-neighbour search).

Only numpy and PIL are imported at module level (onnxruntime / openvino inside the functions that
need them), because this module runs on the device. Training-side evaluation
(`edgeclr.evaluate`) calls the same `preprocess` so that torch and the runtime see the same
input tensor for the same image file.

    emb = Embedder.load("model.onnx")             # or model.xml; preprocessing read from the file
    vectors = emb.embed(["a.jpg", "b.png"])        # (N, D) float32
    index = Index(vectors, ids=["a", "b"])
    scores, idx = index.search(emb.embed(["query.jpg"]), k=5)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgeclr.errors import ImageError, ModelError  # noqa: F401  (raised here; defined with the others)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# PIL modes that carry no colour: a dataset made only of these is trained with 1 channel.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> 8-bit 'L', scaled by the bit depth (not by the content)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) <= 65535):
        a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif img.mode == "I":
        a = a.astype(np.float64) / 16843009.0  # 0..2^32-1 -> 0..255
    elif img.mode == "F":
        a = a.astype(np.float64) * (255.0 if np.nanmax(a, initial=0) <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded PIL image to 8-bit 'L' (channels=1) or 'RGB' (channels=3).

    Alpha is dropped (as torchvision does); palette images are expanded; 16-bit images are
    scaled by their bit depth.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if channels == 3:
        if img.mode == "P":
            img = img.convert("RGBA")
        return img if img.mode == "RGB" else img.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, got {channels}")


# Longest side / shortest side accepted. Resizing the shorter side up to the model's resize size
# multiplies the pixels by that ratio before the centre crop: a 465-byte TIFF declaring 9 x 9,633,804
# pixels (under PIL's bomb limit) took 1.3 GB to embed at 16 px (scripts/fuzz_images.py found it).
# Panoramas stay far below 64:1; a centre crop would keep under 2% of such an image anyway.
MAX_ASPECT = 64


def _check_aspect(size: tuple[int, int], what: str) -> None:
    w, h = size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"cannot decode {what}: {w}x{h} pixels, an aspect ratio beyond {MAX_ASPECT}:1 (refused: its "
                         "centre crop would be a sliver of it, and resizing it costs memory out of proportion)")


def load_image(path: str | Path, channels: int = 3, min_side: int | None = None) -> Image.Image:
    """Open, fully decode and orient an image file.

    Args:
        path: image file.
        channels: 1 for 8-bit grayscale ('L'), 3 for 'RGB'.
        min_side: the smallest shorter side the caller needs (the resize size). A JPEG at least
            twice as large is decoded at a reduced DCT scale (1/2 .. 1/8) that still keeps both
            sides >= min_side, so a 24-Mpixel photo never becomes a 72 MB array. Evaluation and
            the runtime pass the same value, so both see the same pixels. Any format beyond
            PIL's decompression-bomb limit (MAX_IMAGE_PIXELS) is refused, and so is an aspect
            ratio beyond MAX_ASPECT:1, both from the header, before decoding.

    Raises:
        ImageError: the file is missing, not an image, corrupt, truncated, too large or too thin.
            Decoding happens inside the same try as opening, because a truncated JPEG opens fine
            and fails only when its pixels are read.
    """
    import warnings

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_aspect(im.size, f"image {path}")  # from the header, before decoding
                if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                    im.draft(im.mode, (min_side, min_side))
                im = ImageOps.exif_transpose(im)  # honours the EXIF orientation tag; decodes
                im.load()
                return to_mode(im, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot decode image {path}: {e} (images above {Image.MAX_IMAGE_PIXELS} pixels are refused)") from e
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        # PIL's pure-Python parsers raise almost anything on malformed input: OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError, ZeroDivisionError, and TypeError from a
        # TIFF whose strip offset tag holds bytes (scripts/fuzz_images.py found these; the inputs are
        # in tests/faults/test_image_inputs.py). Every one is a bad file, named, never a crash.
        raise ImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input; travels with every checkpoint and exported model."""

    input_size: int  # side of the square model input, in pixels
    resize_size: int  # shorter side is resized to this before the centre crop (>= input_size)
    mean: tuple[float, ...]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, ...]  # per-channel std divided by after the mean
    channels: int = 3  # 1 (grayscale 'L') or 3 ('RGB')
    interpolation: str = "bilinear"  # PIL resampling filter used by the resize
    layout: str = "NCHW"  # layout of the model input

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} < input_size {self.input_size}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def at_size(self, size: int) -> "Preprocess":
        """The same preprocessing for a `size`-px model input, keeping the ratio of resize to crop."""
        ratio = self.resize_size / self.input_size
        return dataclasses.replace(self, input_size=size, resize_size=max(size, round(size * ratio)))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        return cls(**d)


_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_center_crop(img: Image.Image, resize_size: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize the shorter side to `resize_size` (aspect kept), then take the centre crop x crop.

    Sizes and offsets follow torchvision's Resize(int) + CenterCrop on PIL images exactly (long
    side truncated, offsets rounded), so a torchvision eval transform gives the same pixels.
    """
    w, h = img.size
    _check_aspect((w, h), "an image")  # load_image refuses these files before decoding; this guards in-memory images
    if min(w, h) != resize_size:
        if w <= h:
            w, h = resize_size, int(resize_size * h / w)
        else:
            w, h = int(resize_size * w / h), resize_size
        img = img.resize((max(w, crop), max(h, crop)), _FILTERS[interpolation])
        w, h = img.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def preprocess(img: Image.Image, pp: Preprocess) -> np.ndarray:
    """Decoded PIL image -> model input. Returns (C, S, S) float32, normalised."""
    img = resize_center_crop(to_mode(img, pp.channels), pp.resize_size, pp.input_size, pp.interpolation)
    a = np.asarray(img, dtype=np.float32) / 255.0  # (S, S) or (S, S, 3)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, S, S)
    mean = np.asarray(pp.mean, np.float32)[:, None, None]
    std = np.asarray(pp.std, np.float32)[:, None, None]
    return (a - mean) / std


def preprocess_batch(images: Sequence[Image.Image], pp: Preprocess) -> np.ndarray:
    """List of PIL images -> (B, C, S, S) float32."""
    return np.stack([preprocess(im, pp) for im in images]) if len(images) else np.zeros((0, pp.channels, pp.input_size, pp.input_size), np.float32)


# ----------------------------------------------------------------------------------------------
# exported models


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """What an exported model says about itself (ONNX metadata_props / OpenVINO rt_info / metadata.json)."""

    preprocess: Preprocess
    embedding_dim: int
    normalized: bool  # the model L2-normalises its output
    input_name: str = "images"
    output_name: str = "embeddings"
    dynamic_batch: bool = True
    precision: str = "fp32"  # fp32 | int8
    source_stage: str = ""  # train | distill | compress
    checkpoint_sha256: str = ""
    edgeclr_version: str = ""
    model_spec: dict | None = None
    macs: int | None = None  # multiply-accumulates of one image at input_size (Conv2d + Linear)
    params: int | None = None

    def to_props(self) -> dict[str, str]:
        """Flat string map (every value JSON-encoded), the form both file formats store."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preprocess"}
        d.update(self.preprocess.to_dict())
        d["channel_order"] = "L" if self.preprocess.channels == 1 else "RGB"
        return {k: json.dumps(v) for k, v in d.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "the model") -> ModelMeta:
        try:
            pp_keys = [f.name for f in dataclasses.fields(Preprocess)]
            known = set(pp_keys) | {f.name for f in dataclasses.fields(cls)}
            d = {k: json.loads(v) for k, v in props.items() if k in known}  # tools add their own keys (quantisers)
            pp = Preprocess.from_dict({k: d[k] for k in pp_keys if k in d})
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(preprocess=pp, **{k: v for k, v in d.items() if k in names and k != "preprocess"})
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{source} carries no usable edgeclr metadata ({type(e).__name__}: {e}); "
                             "export it with `edgeclr export`, which writes input size, mean, std and layout into the file") from e

    def to_dict(self) -> dict:
        return {k: json.loads(v) for k, v in self.to_props().items()}


class _OnnxBackend:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        inp = self.session.get_inputs()[0]
        self.input_name, self.batch = inp.name, inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.input_shape = [d if isinstance(d, int) else None for d in inp.shape]
        self.output_shape = [d if isinstance(d, int) else None for d in self.session.get_outputs()[0].shape]
        self.precision = "f32"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def median_latency_ms(fn, x: np.ndarray, runs: int, warmup: int = 3) -> float:
    """Median wall time of fn(x) in ms over `runs` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


@functools.lru_cache(maxsize=1)
def openvino_core():
    """One OpenVINO Core per process (OpenVINO's advice: each Core holds its own plugins and threads)."""
    import openvino as ov

    return ov.Core()


class _OpenVinoBackend:
    def __init__(self, path: Path, threads: int, precision: str):
        core = openvino_core()
        model = core.read_model(str(path))
        keys = [f.name for f in dataclasses.fields(ModelMeta)] + [f.name for f in dataclasses.fields(Preprocess)]
        self.props = {k: model.get_rt_info(["model_info", k]).astype(str) for k in keys if model.has_rt_info(["model_info", k])}
        config = {}
        if precision != "default":  # this CPU would otherwise run an "FP32" model in bf16
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        shape = model.inputs[0].get_partial_shape()
        self.batch = shape[0].get_length() if shape[0].is_static else None
        self.input_shape = [d.get_length() if d.is_static else None for d in shape]
        self.output_shape = [d.get_length() if d.is_static else None for d in model.outputs[0].get_partial_shape()]
        # A dynamic-batch model runs each batch size it meets as its own static-shape compilation:
        # OpenVINO's CPU plugin pays shape inference and reallocation on every call of a dynamic
        # model, ~0.4-1.3 ms here (benchmarks/results/bench_vs_benchmark_app-static-shape-fix.md).
        # A model whose image size is dynamic too runs as it is.
        self._model, self._config, self._requests = model, config, {}
        self._reshape = self.batch is None and None not in self.input_shape[1:]
        self._first = self.batch or 1
        self.compiled, self.request = self._request(self._first)
        self._last = self.request
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "f32", "bf16", ...
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    MAX_SHAPES = 4  # static compilations kept for a dynamic-batch model (a run's batch size and its remainder)

    def _request(self, n: int):
        """(compiled model, infer request) for a batch of n images."""
        key = n if self._reshape else self._first
        if key not in self._requests:
            model = self._model
            if self._reshape:
                model = model.clone()
                model.reshape([key] + self.input_shape[1:])
            if len(self._requests) >= self.MAX_SHAPES:  # the oldest one that is not the first
                del self._requests[next(k for k in self._requests if k != self._first)]
            compiled = openvino_core().compile_model(model, "CPU", self._config)
            self._requests[key] = (compiled, compiled.create_infer_request())
        return self._requests[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # the request reads x in place and lends its output buffer (share_*): infer([x]) copied both
        # through Python, ~0.1 ms a call that a 0.4-ms 28-px model paid on top (benchmarks/results/
        # ov_call_overhead.md); the copy below keeps the result past the request's next call
        self._last = self._request(x.shape[0])[1]
        out = self._last.infer(np.ascontiguousarray(x, np.float32), share_inputs=True, share_outputs=True)
        return np.array(out[0], copy=True)

    @property
    def last_latency_ms(self) -> float:
        """OpenVINO's own latency of the last call's inference (what `benchmark_app` reports), without
        the Python around it: the call's wall time minus this is what a Python caller pays on top."""
        return float(self._last.latency)


def _read_sidecar(path: Path) -> dict[str, str]:
    """The model's entry in metadata.json beside it ({file name: metadata}), if any."""
    side = path.with_name("metadata.json")
    if side.is_file():
        try:
            entry = json.loads(side.read_text()).get(path.name) or {}
            return {k: json.dumps(v) for k, v in entry.items()}
        except (ValueError, AttributeError):
            pass
    return {}


def _check_consistent(meta: ModelMeta, in_shape, out_shape, path: Path) -> None:
    """The metadata must describe this graph: (C, S, S) input and D-wide output where static."""
    pp = meta.preprocess
    problems = []
    if in_shape is not None:
        if len(in_shape) != 4:
            problems.append(f"the model takes a {len(in_shape)}-d input, not (N, C, H, W)")
        else:
            for name, want, got in (("channels", pp.channels, in_shape[1]), ("input height", pp.input_size, in_shape[2]),
                                    ("input width", pp.input_size, in_shape[3])):
                if got is not None and got != want:
                    problems.append(f"metadata {name} {want}, model {got}")
    if out_shape is not None and len(out_shape) == 2 and out_shape[1] is not None and out_shape[1] != meta.embedding_dim:
        problems.append(f"metadata embedding_dim {meta.embedding_dim}, model output {out_shape[1]}")
    if meta.embedding_dim < 1 or pp.input_size < 1:
        problems.append("embedding_dim and input_size must be >= 1")
    if problems:
        raise ModelError(f"{path}: its metadata does not match the model ({'; '.join(problems)}): the file was edited, or the "
                         "metadata belongs to another model. Re-export it with `edgeclr export`")


class Embedder:
    """Images -> (N, D) float32 embeddings with an exported edgeclr model; no torch.

    Use `Embedder.load(path)`: the backend comes from the suffix (.onnx: onnxruntime, .xml:
    OpenVINO) and the preprocessing from the file's own metadata.
    """

    def __init__(self, backend, meta: ModelMeta, path: Path):
        self.backend, self.meta, self.path = backend, meta, path

    @classmethod
    def load(cls, path: str | Path, threads: int = 0, precision: str = "f32") -> Embedder:
        """Args: threads: CPU threads (0 = the runtime's default); precision (OpenVINO): f32 | bf16 | f16 | default."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".onnx":
                backend = _OnnxBackend(path, threads)
            elif suffix == ".xml":
                backend = _OpenVinoBackend(path, threads, precision)
            else:
                raise ModelError(f"{path}: unknown model format {suffix!r}; the runtime reads .onnx (onnxruntime) and .xml (OpenVINO)")
        except ImportError as e:
            pkg = "onnxruntime" if suffix == ".onnx" else "openvino"
            raise ModelError(f"{path} needs {pkg}: pip install 'edgeclr[{'runtime' if pkg == 'onnxruntime' else 'openvino'}]'") from e
        except ModelError:
            raise
        except Exception as e:  # the runtimes raise their own types on corrupt files
            raise ModelError(f"cannot load model {path}: {type(e).__name__}: {str(e)[:300]}") from e
        props = backend.props or _read_sidecar(path)
        meta = ModelMeta.from_props(props, str(path))
        _check_consistent(meta, getattr(backend, "input_shape", None), getattr(backend, "output_shape", None), path)
        return cls(backend, meta, path)

    @property
    def dim(self) -> int:
        return self.meta.embedding_dim

    def embed_arrays(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Preprocessed inputs (N, C, S, S) float32 -> (N, D) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.backend.batch or batch_size
        out = [self.backend(x[i:i + step]) for i in range(0, len(x), step)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)

    def embed(self, images: Sequence[str | Path | Image.Image], batch_size: int = 32) -> np.ndarray:
        """Image files or PIL images -> (N, D). An unreadable file raises ImageError (see embed_files)."""
        pp, out = self.meta.preprocess, []
        for i in range(0, len(images), batch_size):
            chunk = [im if isinstance(im, Image.Image) else load_image(im, pp.channels, pp.resize_size) for im in images[i:i + batch_size]]
            out.append(self.embed_arrays(preprocess_batch(chunk, pp), batch_size))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_files(self, paths: Iterable[str | Path], batch_size: int = 32, on_error: str = "skip"):
        """Yield (ids, (n, D) embeddings, errors) per batch of readable files; with on_error="raise"
        the first unreadable file raises ImageError, with "skip" it is reported in `errors`."""
        pp = self.meta.preprocess
        ids, arrays, errors = [], [], []
        for p in paths:
            try:
                arrays.append(preprocess(load_image(p, pp.channels, pp.resize_size), pp))
                ids.append(str(p))
            except ImageError as e:
                if on_error == "raise":
                    raise
                errors.append(str(e))
            if len(arrays) == batch_size:
                yield ids, self.embed_arrays(np.stack(arrays), batch_size), errors
                ids, arrays, errors = [], [], []
        if arrays or errors:
            yield ids, (self.embed_arrays(np.stack(arrays), batch_size) if arrays else np.zeros((0, self.dim), np.float32)), errors


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


INDEX_BACKENDS = ("numpy", "usearch")


class Index:
    """Cosine nearest-neighbour search over a gallery of embeddings, with optional labels for kNN
    classification. Saved as a pickle-free .npz.

    backend "numpy": exact search (the default). "usearch": an approximate HNSW graph
    (`pip install usearch`), built on first search, for galleries too large to scan.
    """

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                 backend: str = "numpy"):
        if backend not in INDEX_BACKENDS:
            raise ValueError(f"unknown index backend {backend!r}; valid: {', '.join(INDEX_BACKENDS)}")
        self.backend, self._ann = backend, None
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError(f"an index needs (N, D) embeddings with N >= 1, got shape {emb.shape}")
        self.emb = l2_normalize(emb)
        self.ids = np.asarray([str(i) for i in ids] if ids is not None else [str(i) for i in range(len(emb))])
        self.labels = None if labels is None else np.asarray([str(v) for v in labels])
        for name, v in (("ids", self.ids), ("labels", self.labels)):
            if v is not None and len(v) != len(emb):
                raise ValueError(f"{len(v)} {name} for {len(emb)} embeddings")

    def __len__(self) -> int:
        return len(self.emb)

    def search(self, queries: np.ndarray, k: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) -> (scores (Q, k) cosine similarities, best first; indices (Q, k) into the gallery)."""
        q = l2_normalize(np.atleast_2d(queries))
        if q.shape[1] != self.emb.shape[1]:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.emb.shape[1]}")
        k = min(k, len(self.emb))
        if self.backend == "usearch":
            return self._search_usearch(q, k)
        scores, idx = [], []
        for i in range(0, len(q), chunk):
            sim = q[i:i + chunk] @ self.emb.T  # (q, N)
            part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(sim, part, 1)
            order = np.argsort(-s, axis=1, kind="stable")
            idx.append(np.take_along_axis(part, order, 1))
            scores.append(np.take_along_axis(s, order, 1))
        return np.concatenate(scores), np.concatenate(idx)

    def _search_usearch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._ann is None:
            try:
                from usearch.index import Index as HNSW
            except ImportError as e:
                raise ModelError("the usearch backend needs usearch: pip install usearch (or use the exact numpy backend)") from e
            self._ann = HNSW(ndim=self.emb.shape[1], metric="cos", dtype="f32")
            self._ann.add(np.arange(len(self.emb)), self.emb)
        m = self._ann.search(q, k)
        keys, dist = np.asarray(m.keys).reshape(len(q), -1), np.asarray(m.distances).reshape(len(q), -1)
        return (1.0 - dist).astype(np.float32), keys.astype(np.int64)

    def classify(self, queries: np.ndarray, k: int = 20, t: float = 0.1) -> np.ndarray:
        """Weighted kNN (votes exp(cos / t)), as `edgeclr eval`. Returns (Q,) labels."""
        if self.labels is None:
            raise ValueError("this index has no labels: build it with labels to classify")
        classes, y = np.unique(self.labels, return_inverse=True)
        scores, idx = self.search(queries, k)
        votes = np.zeros((len(scores), len(classes)))
        np.add.at(votes, (np.arange(len(scores))[:, None], y[idx]), np.exp(scores / t))
        return classes[votes.argmax(1)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        arrays = {"embeddings": self.emb, "ids": self.ids}
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy") -> Index:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(f["embeddings"], f["ids"], f["labels"] if "labels" in f.files else None, backend)
        except (OSError, KeyError, ValueError) as e:
            raise ModelError(f"cannot read index {path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# `edgeclr embed` and `edgeclr search`: file-level work on top of Embedder and Index


def list_images(root: Path) -> list[Path]:
    """Image files under a folder, recursively, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus image files found recursively in named folders (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif p.is_file():
            out.append(p)
        else:
            raise ImageError(f"{p} does not exist: give image files or folders of images")
    if not out:
        raise ImageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return out


def ids_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".ids.txt")


def read_embeddings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(N, D) embeddings and their ids from `edgeclr embed`'s OUT.npy + OUT.ids.txt."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"embeddings file {path} does not exist")
    emb = np.load(path, allow_pickle=False)
    ids = ids_path(path).read_text().splitlines() if ids_path(path).exists() else [str(i) for i in range(len(emb))]
    if len(ids) != len(emb):
        raise ModelError(f"{path} holds {len(emb)} embeddings but {ids_path(path)} {len(ids)} ids")
    return emb, ids


class _Partial:
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
    and new rows are appended, so re-running on a grown folder embeds only the new files.
    """
    out = Path(out)
    if out.suffix != ".npy":
        raise ImageError(f"--out {out}: embeddings are written as .npy")
    emb = Embedder.load(model, threads=threads, precision=precision)
    files = list_inputs(inputs)
    done_emb, done_ids = read_embeddings(out) if out.exists() else (np.zeros((0, emb.dim), np.float32), [])
    if done_emb.shape[1] != emb.dim:
        raise ModelError(f"{out} holds {done_emb.shape[1]}-d embeddings, {model} makes {emb.dim}-d: use another --out")
    part = _Partial(out, emb.dim)
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
    labels = p.read_text().splitlines()
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
