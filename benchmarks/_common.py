"""Shared by the benchmark scripts: what machine a figure was measured on, and where its record goes.

Records: benchmarks/results/<benchmark>/<name>.{md,json}, <benchmark> the script's name. A run without
--tag writes `latest`, a run with --tag T writes `T`; a re-run overwrites its own record (git keeps
the earlier ones). So <benchmark>/latest.md is always the newest run of the script as shipped.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def record_path(benchmark: str, tag: str = "", ext: str = "md", root: Path = RESULTS) -> Path:
    """root/<benchmark>/<tag or "latest">.<ext>, its folder created. Build both suffixes with this (not
    Path.with_suffix: a tag may hold a dot, as in "w16-s0.5")."""
    name = tag or "latest"
    if "/" in name or "\\" in name or name.startswith("."):
        raise SystemExit(f"--tag {tag!r}: a record name, not a path")
    folder = Path(root) / benchmark
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.{ext.lstrip('.')}"


def write_record(benchmark: str, tag: str, rec: dict, md: list[str]) -> None:
    """results/<benchmark>/<tag or latest>.json (rec) and .md (the lines md), and the markdown printed."""
    import json

    record_path(benchmark, tag, "json").write_text(json.dumps(rec, indent=1) + "\n")
    record_path(benchmark, tag, "md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    info = {"cpu": cpu, "cores": os.cpu_count(), "avx512": "avx512f" in flags, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    info["git"] = git_state(Path(__file__).parents[1])
    return info


def git_state(root: Path) -> str:
    """The commit of the checkout at root, "-dirty" when its tracked code differs from it. The
    records under benchmarks/results/ do not count: a run writes them itself (run_all.py's later
    steps read "-dirty" from its earlier steps' tables)."""
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
                                 capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
    return head + "-dirty" if head and changed else head


def run(cmd: list[str]) -> float:
    """Run a command (echoed), fail on error; its wall time in seconds."""
    import shlex
    import time

    print("+", shlex.join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def export_set(model, pp, folder, name: str, calib, runtimes=("onnx", "openvino"), int8: bool = True,
               target: str = "x86", exclude: list[str] | None = None) -> dict:
    """FP32 and INT8 files of one torch encoder, written the way `edgeclr export` and `edgeclr compress`
    write them: {"onnx": path, "openvino": path, "onnx-int8": ..., "openvino-int8": ...} for `runtimes`.
    INT8 keeps compress's float scope unless `exclude` names the nodes to keep float ([] = none)."""
    from pathlib import Path

    import torch

    from edgeclr import compress, export
    from edgeclr.models import EmbeddingModel, count_macs, count_params
    from edgeclr.runtime import ModelMeta

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    em = EmbeddingModel(model, True).eval()
    shape = (pp.channels, pp.input_size, pp.input_size)
    meta = ModelMeta(preprocess=pp, embedding_dim=model.embed_dim, normalized=True, macs=count_macs(model, shape),
                     params=count_params(model))
    x = torch.from_numpy(calib[:1])
    onnx = folder / f"{name}-fp32.onnx"  # written for every runtime: the float scope is read from it
    export.write_onnx(em, x, True, 17, meta, onnx)
    out = {"onnx": onnx} if "onnx" in runtimes else {}
    if "openvino" in runtimes:
        out["openvino"] = onnx.with_suffix(".xml")
        export.write_openvino(em, x, True, 17, meta, out["openvino"])
    if int8:
        if exclude is None:
            exclude = compress.scope_nodes(compress.float_scope(onnx, em))
        i8 = folder / f"{name}-int8.onnx"
        if "onnx" in runtimes:
            out["onnx-int8"] = i8
            compress.write_int8(onnx, i8, calib, target, exclude)
        if "openvino" in runtimes:
            out["openvino-int8"] = i8.with_suffix(".xml")
            compress.write_int8(out["openvino"], out["openvino-int8"], calib, target, exclude)
    return out
