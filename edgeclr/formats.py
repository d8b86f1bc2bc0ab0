"""The export-format table: each format's files, options, packages and runtime. Torch-free.

`edgeclr export` writes with the format's writer (export.WRITERS, keyed by the format's name); the size of
an exported model, what `bench` and the runtime accept, which files travel together (an
OpenVINO IR is model.xml + model.bin) and what to install to run a file are read from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # of the main file
    companions: tuple[str, ...]  # other files the format consists of (OpenVINO's .bin)
    options: frozenset[str]  # ExportConfig fields this format honours
    needs: tuple[str, ...]  # Python packages
    runtime: str  # what runs it: the parity check uses the same
    extra: str  # the install extra that runs a file of this format on the device

    @property
    def install(self) -> str:
        """The command that installs what runs this format (no torch for ONNX and OpenVINO files)."""
        return f"pip install 'edgeclr[{self.extra}]'"

    def files(self, path: str | Path) -> list[Path]:
        """Every file of the model whose main file is `path`."""
        path = Path(path)
        return [path] + [path.with_suffix(c) for c in self.companions]

    def size_bytes(self, path: str | Path) -> int:
        return sum(f.stat().st_size for f in self.files(path))


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("onnx", ".onnx", (), frozenset({"opset", "dynamic_batch", "normalize", "input_size"}),
                         ("onnx", "onnxruntime"), "onnxruntime", "runtime"),
    "openvino": ExportFormat("openvino", ".xml", (".bin",), frozenset({"opset", "dynamic_batch", "normalize", "input_size"}),
                             ("onnx", "openvino"), "openvino", "openvino"),
    "torchscript": ExportFormat("torchscript", ".pt", (), frozenset({"normalize", "input_size"}), (), "torch", "train"),
}
# formats the torch-free runtime runs (edgeclr.runtime): what `bench`, `embed` and `eval --compare` pick up
RUNTIME_SUFFIXES: tuple[str, ...] = tuple(f.suffix for f in EXPORT_FORMATS.values() if f.runtime != "torch")


def format_of(path: str | Path) -> ExportFormat:
    """The format of an exported file, by its suffix."""
    suffix = Path(path).suffix
    for f in EXPORT_FORMATS.values():
        if f.suffix == suffix:
            return f
    raise KeyError(f"{path}: {suffix or 'no suffix'} is not an exported model ({', '.join(f.suffix for f in EXPORT_FORMATS.values())})")
