"""Embed image files with exported edgeclr models through `edgeclr.runtime` only, and record how the
runtime fails on bad inputs; torch-free. `scripts/aarch64_check.py` runs this same script natively
(x86) and under qemu-aarch64 user emulation (an arm64 Debian Python with the aarch64 wheels) and
compares what the two wrote.

    python scripts/aarch64_embed.py --images IMGS --model fp32=fp32.onnx --model int8=int8.onnx \
        --bad-image corrupt/truncated.jpg --bad-model broken/no_metadata.onnx --out OUT

Writes into OUT:
  ids.txt                 the embedded files, one a line (sorted, as `edgeclr embed` lists them)
  NAME.npy                (N, D) float32 per model: Embedder.embed, 1 thread, batches of 8
  NAME.cli.npy            the same files through the `edgeclr embed` command (in this process,
                          the runtime's default threads); NAME.cli.ids.txt
  errors.json             [{case, type, message}] for every bad image / bad model case
  env.json                machine, Python and library versions, torch-free proof, CPU features
                          the (emulated) CPU reports to programs (aarch64: AT_HWCAP/AT_HWCAP2)
No timings: under emulation they mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import struct
import sys
from pathlib import Path

# AT_HWCAP / AT_HWCAP2 bits of arm64 Linux (arch/arm64/include/uapi/asm/hwcap.h): the features that
# decide which kernels onnxruntime (cpuinfo / MLAS) picks
HWCAP = {"fp": 0, "asimd": 1, "aes": 3, "pmull": 4, "sha1": 5, "sha2": 6, "crc32": 7, "atomics": 8, "fphp": 9, "asimdhp": 10,
         "cpuid": 11, "asimdrdm": 12, "lrcpc": 15, "dcpop": 16, "sha3": 17, "sm3": 18, "sm4": 19, "asimddp": 20, "sha512": 21,
         "sve": 22, "asimdfhm": 23, "dit": 24, "uscat": 25, "ilrcpc": 26, "flagm": 27, "ssbs": 28, "sb": 29, "paca": 30, "pacg": 31}
HWCAP2 = {"dcpodp": 0, "sve2": 1, "sveaes": 2, "svepmull": 3, "svebitperm": 4, "svesha3": 5, "svesm4": 6, "flagm2": 7, "frint": 8,
          "svei8mm": 9, "svef32mm": 10, "svef64mm": 11, "svebf16": 12, "i8mm": 13, "bf16": 14, "dgh": 15, "rng": 16, "bti": 17,
          "mte": 18, "ecv": 19, "afp": 20, "rpres": 21, "mte3": 22, "sme": 23, "sme_i16i64": 24, "sme_f64f64": 25,
          "sme_i8i32": 26, "sme_f16f32": 27, "sme_b16f32": 28, "sme_f32f32": 29, "sme_fa64": 30}


def cpu_features() -> list[str] | None:
    """The arm64 feature names in this process's AT_HWCAP/AT_HWCAP2 (None on other machines)."""
    if platform.machine() != "aarch64":
        return None
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    aux = dict(struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]))
    hw, hw2 = aux.get(16, 0), aux.get(26, 0)
    return [n for n, b in HWCAP.items() if hw >> b & 1] + [n for n, b in HWCAP2.items() if hw2 >> b & 1]


def error_of(fn) -> dict:
    """Run fn; {type, message} of what it raised, or {type: None} when it did not raise."""
    try:
        fn()
    except SystemExit as e:  # a click command that stopped with an exit code
        return {"type": "SystemExit", "message": str(e.code)}
    except Exception as e:  # noqa: BLE001 - the point is to record whatever it is
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def run_cli(args: list[str]) -> tuple[int, str]:
    """`edgeclr ARGS` in this process (under qemu-user a child process could not start an arm64
    binary); returns (exit code, what it printed on stderr)."""
    import contextlib
    import io

    from edgeclr.cli import cli

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(args=args, prog_name="edgeclr", standalone_mode=False)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    # log lines carry the time of day: keep what the command itself says
    return code, "\n".join(ln for ln in err.getvalue().splitlines() if not re.match(r"\d\d:\d\d:\d\d ", ln))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of readable images")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="an exported .onnx model (repeat)")
    ap.add_argument("--bad-image", action="append", default=[], help="an unreadable image file (repeat)")
    ap.add_argument("--bad-model", action="append", default=[], help="a model file the runtime must refuse (repeat)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import numpy as np
    import PIL

    from edgeclr import runtime

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = runtime.list_images(Path(a.images))
    (out / "ids.txt").write_text("".join(f"{f}\n" for f in files))
    models = dict(m.split("=", 1) for m in a.model)
    errors = []
    for name, path in models.items():
        emb = runtime.Embedder.load(path, threads=1)
        np.save(out / f"{name}.npy", emb.embed(files, batch_size=8))
        cli_out = out / f"{name}.cli.npy"
        code, err = run_cli(["embed", a.images, "--model", path, "--out", str(cli_out)])
        if code != 0:
            errors.append({"case": f"edgeclr embed with {name}", "type": "exit", "message": f"{code}: {err.strip()[-500:]}"})

    for p in a.bad_image:
        errors.append({"case": f"load_image {Path(p).name}", **error_of(lambda p=p: runtime.load_image(p, 1, 16))})
    if a.bad_image:
        first = runtime.Embedder.load(next(iter(models.values())), threads=1)
        errors.append({"case": "Embedder.embed with a bad image", **error_of(lambda: first.embed([files[0], a.bad_image[0]]))})
        mixed = [files[0], *a.bad_image, files[1]]
        batches = list(first.embed_files(mixed, batch_size=8, on_error="skip"))
        errors.append({"case": "Embedder.embed_files on_error=skip", "type": "skipped",
                       "message": json.dumps({"embedded": [i for ids, _, _ in batches for i in ids],
                                              "errors": [e for _, _, errs in batches for e in errs]})})
        errors.append({"case": "Embedder.embed_files on_error=raise",
                       **error_of(lambda: [None for _ in first.embed_files(mixed, batch_size=8, on_error="raise")])})
        bad_dir = str(Path(a.bad_image[0]).parent)
        code, err = run_cli(["embed", bad_dir, "--model", next(iter(models.values())), "--out", str(out / "bad.cli.npy"),
                             "--on-error", "raise"])
        errors.append({"case": "edgeclr embed --on-error raise on bad images", "type": f"exit {code}", "message": err.strip()})
    for p in a.bad_model:
        errors.append({"case": f"Embedder.load {Path(p).name}", **error_of(lambda p=p: runtime.Embedder.load(p, threads=1))})
    (out / "errors.json").write_text(json.dumps(errors, indent=1))

    import onnxruntime as ort

    env = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__,
           "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
           "libc": "-".join(platform.libc_ver()), "cpu_features": cpu_features(),
           "torch_imported": "torch" in sys.modules, "edgeclr_runtime": runtime.__file__, "images": len(files)}
    (out / "env.json").write_text(json.dumps(env, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
