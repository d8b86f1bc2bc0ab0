"""Exported models: `ModelMeta` (what a file says about itself), the onnxruntime and OpenVINO
backends, and the task front ends: `Embedder` (images -> embeddings), `Classifier` (class
probabilities), `Segmenter` (a class per pixel of images of any size). onnxruntime / openvino are imported inside the
functions that need them."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from edgeclr.errors import ImageError, ModelError
from edgeclr.formats import EXPORT_FORMATS
from edgeclr.runtime.images import load_image, to_mode
from edgeclr.runtime.preprocessing import Preprocess, normalize, preprocess, preprocess_batch


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
    task: str = "embed"  # embed: (N, D) embeddings | classify: (N, K) softmax probabilities over `classes`
    classes: list | None = None  # classify / segment: the class names, in output order
    palette: list | None = None  # segment: an RGB colour per class

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
    def __init__(self, path: Path, threads: int, precision: str = "f32"):  # precision: OpenVINO's hint, not onnxruntime's
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
        # model, ~0.4-1.3 ms here (benchmarks/results/bench_vs_benchmark_app/static-shape-fix.md).
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
        # ov_call_overhead/latest.md); the copy below keeps the result past the request's next call
        self._last = self._request(x.shape[0])[1]
        out = self._last.infer(np.ascontiguousarray(x, np.float32), share_inputs=True, share_outputs=True)
        return np.array(out[0], copy=True)

    @property
    def last_latency_ms(self) -> float:
        """OpenVINO's own latency of the last call's inference (what `benchmark_app` reports), without
        the Python around it: the call's wall time minus this is what a Python caller pays on top."""
        return float(self._last.latency)


# an export format's runtime (edgeclr.formats) -> the backend that runs its files
BACKENDS = {"onnxruntime": _OnnxBackend, "openvino": _OpenVinoBackend}


def read_sidecar(path: Path) -> dict[str, str]:
    """The model's entry in metadata.json beside it ({file name: metadata}), if any."""
    side = path.with_name("metadata.json")
    if side.is_file():
        try:
            entry = json.loads(side.read_text()).get(path.name) or {}
            return {k: json.dumps(v) for k, v in entry.items()}
        except (ValueError, AttributeError):
            pass
    return {}


# task name -> its runtime front end (Embedder, Classifier, ...): every front-end class registers
# itself by defining TASK; edgeclr.tasks pairs each with its torch side (export module, parity, scorer)
FRONT_ENDS: dict[str, type] = {}


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
    front = FRONT_ENDS.get(meta.task)
    if front is None:
        problems.append(f"unknown task {meta.task!r} (this edgeclr reads {', '.join(FRONT_ENDS)})")
    else:
        problems += front.meta_problems(meta, out_shape)
    if meta.embedding_dim < 1 or pp.input_size < 1:
        problems.append("embedding_dim and input_size must be >= 1")
    if problems:
        raise ModelError(f"{path}: its metadata does not match the model ({'; '.join(problems)}): the file was edited, or the "
                         "metadata belongs to another model. Re-export it with `edgeclr export`")


def load_model_file(path: str | Path, threads: int = 0, precision: str = "f32") -> tuple[object, ModelMeta, Path]:
    """(backend, metadata, path) of an exported edgeclr file: the backend from the export-format
    table (edgeclr.formats: .onnx onnxruntime, .xml OpenVINO), the metadata from the file (or
    metadata.json beside it), checked against the graph."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    fmt = next((f for f in EXPORT_FORMATS.values() if f.suffix == path.suffix.lower() and f.runtime in BACKENDS), None)
    if fmt is None:
        raise ModelError(f"{path}: unknown model format {path.suffix!r}; the runtime reads "
                         + ", ".join(f"{f.suffix} ({f.runtime})" for f in EXPORT_FORMATS.values() if f.runtime in BACKENDS))
    try:
        backend = BACKENDS[fmt.runtime](path, threads, precision)
    except ImportError as e:
        raise ModelError(f"{path} needs {fmt.runtime}: {fmt.install}") from e
    except ModelError:
        raise
    except Exception as e:  # the runtimes raise their own types on corrupt files
        raise ModelError(f"cannot load model {path}: {type(e).__name__}: {str(e)[:300]}") from e
    props = backend.props or read_sidecar(path)
    meta = ModelMeta.from_props(props, str(path))
    _check_consistent(meta, getattr(backend, "input_shape", None), getattr(backend, "output_shape", None), path)
    return backend, meta, path


def open_model(path: str | Path, threads: int = 0, precision: str = "f32"):
    """Any exported edgeclr file, opened by the front end of its task (Embedder, Classifier, ...)."""
    backend, meta, path = load_model_file(path, threads, precision)
    return FRONT_ENDS[meta.task](backend, meta, path)


class Embedder:
    """Images -> (N, D) float32 embeddings with an exported edgeclr model; no torch.

    Use `Embedder.load(path)`: the backend comes from the suffix (.onnx: onnxruntime, .xml:
    OpenVINO) and the preprocessing from the file's own metadata.

    The base of every task's front end: a subclass sets TASK (its name in the task table),
    OUTPUT (the exported graph's output name), USE (what a file of the task is and which command
    runs it) and, where its output is not (N, embedding_dim), meta_problems; it registers itself.
    """

    TASK = "embed"
    OUTPUT = "embeddings"
    USE = "an embedding model: use `edgeclr embed` / `edgeclr search` (runtime.Embedder)"

    def __init__(self, backend, meta: ModelMeta, path: Path):
        self.backend, self.meta, self.path = backend, meta, path

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "TASK" in cls.__dict__:
            FRONT_ENDS[cls.TASK] = cls

    @classmethod
    def meta_problems(cls, meta: ModelMeta, out_shape) -> list[str]:
        """What in a file's metadata contradicts this task or the graph's output shape (static dims)."""
        return _width_problem("embedding_dim", meta.embedding_dim, out_shape)

    @classmethod
    def load(cls, path: str | Path, threads: int = 0, precision: str = "f32"):
        """Args: threads: CPU threads (0 = the runtime's default); precision (OpenVINO): f32 | bf16 | f16 | default."""
        backend, meta, path = load_model_file(path, threads, precision)
        if meta.task != cls.TASK:
            raise ModelError(f"{path} is {FRONT_ENDS[meta.task].USE}, not {cls.USE.split(':')[0]}")
        return cls(backend, meta, path)

    def run_arrays(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Preprocessed inputs (N, C, S, S) -> the model's output, whatever the task."""
        return self.embed_arrays(x, batch_size)

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


FRONT_ENDS[Embedder.TASK] = Embedder


def _width_problem(what: str, width: int, out_shape, ndim: int = 2) -> list[str]:
    """The output's axis 1 (static) against the metadata's width, for an output of `ndim` dimensions."""
    if out_shape is not None and len(out_shape) == ndim and out_shape[1] is not None and out_shape[1] != width:
        return [f"metadata {what} {width}, model output {out_shape[1]}"]
    return []


class _ClassOutputs:
    """What a front end whose outputs are over the file's named classes adds (Classifier, Segmenter)."""

    meta: ModelMeta

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.meta.classes]

    @property
    def dim(self) -> int:
        return len(self.meta.classes)


class Classifier(_ClassOutputs, Embedder):
    """Images -> (N, K) softmax probabilities with an exported edgeclr classifier (`edgeclr finetune`); no torch.

    `Classifier.load(path)` reads the class names and the preprocessing from the file:

        clf = Classifier.load("classifier.onnx")
        clf.predict(["a.png", "b.png"])          # ["sandal", "bag"]
        clf.top_k(["a.png"], k=3)                # [[("sandal", 0.91), ("sneaker", 0.06), ("bag", 0.01)]]
    """

    TASK = "classify"
    OUTPUT = "probabilities"
    USE = "a classifier: use `edgeclr predict` (runtime.Classifier)"

    @classmethod
    def meta_problems(cls, meta: ModelMeta, out_shape) -> list[str]:
        if len(meta.classes or []) < 2:
            return ["a classifier needs the names of >= 2 classes"]
        return _width_problem("classes", len(meta.classes), out_shape)

    def predict_proba(self, images: Sequence[str | Path | Image.Image], batch_size: int = 32) -> np.ndarray:
        """(N, K) probabilities; an unreadable file raises ImageError (predict_files skips them)."""
        return self.embed(images, batch_size)

    def predict(self, images: Sequence[str | Path | Image.Image], batch_size: int = 32) -> list[str]:
        """The most probable class name of each image."""
        return [self.classes[i] for i in self.predict_proba(images, batch_size).argmax(1)]

    def top_k(self, images: Sequence[str | Path | Image.Image], k: int = 1, batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs of each image, most probable first."""
        return self.rank(self.predict_proba(images, batch_size), k)

    def rank(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        k = min(k, self.dim)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order)]


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Start offsets of size-px tiles covering n pixels with at least `overlap` px shared by
    neighbours; the last tile ends at n (n >= size)."""
    if n <= size:
        return [0]
    step = max(1, size - overlap)
    starts = list(range(0, n - size, step))
    return starts + [n - size]


class Segmenter(_ClassOutputs, Embedder):
    """Images of any size -> (H, W) class-id maps with an exported edgeclr segmenter (`edgeclr
    finetune --task segment`); no torch. The model runs on tiles of its input size at the image's
    own resolution; tiles overlap by a quarter and their probabilities are averaged (stitching).

        seg = Segmenter.load("segmenter.onnx")
        labels = seg.segment(["field.png"])[0]     # (H, W) uint8 class ids
        seg.classes, seg.palette                   # names and an RGB colour per class
    """

    TASK = "segment"
    OUTPUT = "probabilities"
    USE = "a segmenter: use `edgeclr segment` (runtime.Segmenter)"

    @classmethod
    def meta_problems(cls, meta: ModelMeta, out_shape) -> list[str]:
        k = len(meta.classes or [])
        if k < 2:
            return ["a segmenter needs the names of >= 2 classes (background included)"]
        if meta.palette is not None and len(meta.palette) != k:
            return [f"a palette of {len(meta.palette)} colours for {k} classes"]
        if out_shape is not None and len(out_shape) != 4:
            return [f"a segmenter's output is (N, K, H, W), this model's has {len(out_shape)} dimensions"]
        return _width_problem("classes", k, out_shape, ndim=4)

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 RGB colour per class (the file's, or a fixed default one)."""
        if self.meta.palette:
            return np.asarray(self.meta.palette, np.uint8)
        return default_palette(self.dim)

    def probabilities(self, img: Image.Image | np.ndarray, overlap: int | None = None, batch_size: int = 16) -> np.ndarray:
        """(K, H, W) float32 class probabilities of one whole image (PIL or (H, W[, C]) uint8)."""
        pp = self.meta.preprocess
        a = np.asarray(to_mode(img, pp.channels) if isinstance(img, Image.Image) else img)
        if a.ndim == 2:
            a = a[:, :, None]
        h, w = a.shape[:2]
        s = pp.input_size
        if h < s or w < s:  # pad small images up to one tile (reflected edges), crop the result back
            a = np.pad(a, ((0, max(0, s - h)), (0, max(0, s - w)), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        overlap = s // 4 if overlap is None else overlap
        boxes = [(y, x) for y in tile_starts(a.shape[0], s, overlap) for x in tile_starts(a.shape[1], s, overlap)]
        acc = np.zeros((self.dim, a.shape[0], a.shape[1]), np.float32)
        hits = np.zeros(a.shape[:2], np.float32)
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i:i + batch_size]
            x = np.stack([normalize(a[y:y + s, x_:x_ + s], pp) for y, x_ in chunk])
            for (y, x_), p in zip(chunk, self.embed_arrays(x, batch_size)):
                acc[:, y:y + s, x_:x_ + s] += p
                hits[y:y + s, x_:x_ + s] += 1
        return (acc / hits)[:, :h, :w]

    def segment_image(self, img: Image.Image | np.ndarray, overlap: int | None = None, batch_size: int = 16) -> np.ndarray:
        """(H, W) uint8 class ids of one whole image."""
        return self.probabilities(img, overlap, batch_size).argmax(0).astype(np.uint8)

    def segment(self, images: Sequence[str | Path | Image.Image], overlap: int | None = None) -> list[np.ndarray]:
        """Image files or PIL images -> one (H, W) uint8 class-id map each. An unreadable file raises ImageError."""
        pp = self.meta.preprocess
        return [self.segment_image(im if isinstance(im, Image.Image) else load_image(im, pp.channels, None), overlap)
                for im in images]

    def overlay(self, img: Image.Image | np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> Image.Image:
        """The image with each pixel's class colour blended in (background, class 0, left as it is)."""
        return overlay(img, labels, self.palette, alpha)


def overlay(img: Image.Image | np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with each pixel's class colour (palette[id]) blended in; background (0) and
    unlabelled pixels (ids past the palette, e.g. 255) are left as they are."""
    rgb = np.asarray(to_mode(img, 3) if isinstance(img, Image.Image) else img, np.float32)
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = rgb[:, :, 0]
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, 2)
    painted = (labels > 0) & (labels < len(palette))
    col = np.asarray(palette, np.float32)[np.where(painted, labels, 0)]
    mix = np.where(painted[:, :, None], (1 - alpha) * rgb + alpha * col, rgb)
    return Image.fromarray(mix.round().clip(0, 255).astype(np.uint8), "RGB")


def default_palette(k: int) -> np.ndarray:
    """(k, 3) uint8: black for class 0 (background), then well-separated colours."""
    base = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
    rng = np.random.default_rng(0)
    extra = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(max(0, k - len(base)))]
    return np.asarray((base + extra)[:k], np.uint8)
