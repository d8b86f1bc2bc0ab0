"""Coverage-guided fuzzing (atheris, libFuzzer) of the runtime's image input: the bytes of an
uploaded or camera file -> edgeclr.runtime.load_image -> preprocess, as `edgeclr embed` does.

    pip install -e ".[fuzz]"
    python scripts/fuzz_images.py --seconds 300            # writes benchmarks/results/fuzz_images/latest.{json,md}

The property: for any bytes, load_image returns an 8-bit image or raises ImageError naming the
file, preprocess returns a finite (C, S, S) float32 array, and the process never crashes (a
crash or an uncaught exception stops libFuzzer and is recorded with its input). Peak memory is
recorded too (PIL's decompression-bomb limit, enforced as an error, bounds it). The corpus starts
from small valid images of every format.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from PIL import Image  # noqa: F401  (PIL's Python-level parsers get coverage feedback)

    from edgeclr.runtime import ImageError, Preprocess, load_image, preprocess

ROOT = Path(__file__).resolve().parent.parent
PP = {1: Preprocess(16, 16, (0.5,), (0.25,), 1), 3: Preprocess(16, 16, (0.5,) * 3, (0.25,) * 3, 3)}
STATS = {"executions": 0, "image_errors": 0, "decoded": 0}


def one_input(data: bytes) -> None:
    STATS["executions"] += 1
    channels = 1 + 2 * (len(data) % 2)
    path = WORK / "input.bin"
    path.write_bytes(data)
    try:
        img = load_image(path, channels)
    except ImageError as e:
        if str(path) not in str(e):
            raise AssertionError(f"ImageError does not name the file: {e}") from None
        STATS["image_errors"] += 1
        return
    x = preprocess(img, PP[channels])
    if x.shape != (channels, 16, 16) or not (x == x).all():
        raise AssertionError(f"bad model input {x.shape}")
    STATS["decoded"] += 1


def seeds(folder: Path) -> None:
    import numpy as np

    rgb = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        (folder / f"seed.{fmt.lower()}").write_bytes(buf.getvalue())


def main():
    global WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--no-record", action="store_true")
    a, rest = ap.parse_known_args()
    WORK = Path(tempfile.mkdtemp(prefix="edgeclr-fuzz-"))
    corpus = WORK / "corpus"
    corpus.mkdir()
    seeds(corpus)
    t0 = time.time()
    crashed = None

    def report(status: str) -> None:
        if a.no_record:
            return
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r = {"status": status, "seconds": round(time.time() - t0, 1), **STATS, "peak_rss_mb": round(peak_mb, 1),
             "atheris": getattr(atheris, "__version__", "?"), "command": "python scripts/fuzz_images.py " + " ".join(sys.argv[1:])}
        out = ROOT / "benchmarks" / "results" / "fuzz_images"  # the record's folder (benchmarks/README.md)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(r, indent=2) + "\n")
        (out / "latest.md").write_text(
            "# Fuzzing the runtime's image input (atheris)\n\n```\n" + r["command"] + "\n```\n\n"
            f"{r['executions']} inputs (recorded every 500) in {r['seconds']} s: {r['decoded']} decoded to a finite model input, "
            f"{r['image_errors']} refused with an ImageError naming the file, crashes or other exceptions: "
            f"{'none' if status == 'clean' else status}. Peak resident memory {r['peak_rss_mb']} MB.\n\n"
            "What earlier runs found, now fixed, and kept as regression inputs in `tests/faults/test_image_inputs.py`:\n\n"
            "- a TIFF whose strip offsets tag holds bytes: PIL raised TypeError, which escaped `load_image` (every decoder "
            "exception is now an ImageError naming the file);\n"
            "- a 465-byte TIFF declaring 9 x 9,633,804 pixels (under PIL's bomb limit): 1.3 GB to preprocess at 16 px, past "
            "the 2 GB limit of the fuzzer's process (aspect ratios beyond 64:1 are now refused from the header).\n")

    def guarded(data: bytes) -> None:
        nonlocal crashed
        try:
            one_input(data)
        except BaseException as e:
            crashed = f"{type(e).__name__}: {str(e)[:200]} (input saved as {WORK / 'crash.bin'})"
            (WORK / "crash.bin").write_bytes(data)
            report(crashed)
            raise
        if STATS["executions"] % 500 == 0:  # libFuzzer leaves without Python's atexit: record as it goes
            report("clean")

    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={a.seconds}", "-rss_limit_mb=2048", *rest], guarded)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
