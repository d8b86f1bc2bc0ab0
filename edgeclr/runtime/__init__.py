"""The device side of edgeclr, torch-free: numpy and PIL at import, onnxruntime / openvino only
inside the functions that need them.

    images         image files -> decoded PIL images (load_image, list_inputs)
    preprocessing  the one preprocessing path (Preprocess, preprocess), shared with evaluation
    embedder       exported models: ModelMeta, the onnxruntime / OpenVINO backends, open_model and the
                   task front ends (Embedder, Classifier, Segmenter; FRONT_ENDS)
    index          Index: cosine nearest-neighbour search and kNN classification
    commands       `edgeclr embed`, `search`, `predict` and `segment` (embed_files_to, search_main, predict_files_to,
                   segment_files_to)

    emb = Embedder.load("model.onnx")             # or model.xml; preprocessing read from the file
    vectors = emb.embed(["a.jpg", "b.png"])        # (N, D) float32
    index = Index(vectors, ids=["a", "b"])
    scores, idx = index.search(emb.embed(["query.jpg"]), k=5)
"""

from edgeclr.errors import ImageError, ModelError
from edgeclr.runtime.commands import (
    PartialEmbeddings,
    embed_files_to,
    ids_path,
    labels_for,
    predict_files_to,
    read_embeddings,
    search_main,
    segment_files_to,
)
from edgeclr.runtime.embedder import (
    FRONT_ENDS,
    Classifier,
    Embedder,
    ModelMeta,
    Segmenter,
    default_palette,
    load_model_file,
    median_latency_ms,
    open_model,
    openvino_core,
    read_sidecar,
)
from edgeclr.runtime.images import (
    GRAY_MODES,
    IMAGE_SUFFIXES,
    MAX_ASPECT,
    check_aspect,
    list_images,
    list_inputs,
    load_image,
    to_mode,
)
from edgeclr.runtime.index import INDEX_BACKENDS, Index, l2_normalize
from edgeclr.runtime.preprocessing import Preprocess, normalize, preprocess, preprocess_batch, resize_center_crop

__all__ = [
    "FRONT_ENDS", "GRAY_MODES", "IMAGE_SUFFIXES", "INDEX_BACKENDS", "MAX_ASPECT", "Classifier", "Embedder",
    "Segmenter", "ImageError", "Index", "ModelError", "ModelMeta", "PartialEmbeddings", "Preprocess", "check_aspect",
    "default_palette", "embed_files_to", "ids_path", "l2_normalize", "labels_for", "list_images", "list_inputs",
    "load_image", "load_model_file", "median_latency_ms", "normalize", "open_model", "openvino_core",
    "predict_files_to", "preprocess", "preprocess_batch", "read_embeddings", "read_sidecar", "resize_center_crop",
    "search_main", "segment_files_to", "to_mode",
]
