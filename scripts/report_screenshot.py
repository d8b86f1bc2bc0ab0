"""Render a run's report.html in headless Chromium and save a screenshot; check every image.

    python scripts/report_screenshot.py runs/demo/report.html [--out shot.png] [--width 1200 --height 4000]

Checks, before rendering: every <img> is an inline PNG (no file or network reference) that
decodes. After: the screenshot exists and is not blank. Exit code 1 names what failed.
Needs a Chromium binary (`apt-get install chromium`; or set CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_images(html: str) -> int:
    """Number of images; raises ValueError if one is not an inline, decodable PNG."""
    tags = re.findall(r"<img\b[^>]*>", html)
    for i, tag in enumerate(tags):
        m = re.search(r"src=['\"]data:image/png;base64,([^'\"]+)['\"]", tag)
        if not m:
            raise ValueError(f"image {i + 1} is not an inline PNG: {tag[:120]}")
        im = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
        im.verify()
    return len(tags)


def screenshot(html_path: Path, out: Path, width: int = 1200, height: int = 4000) -> Path:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium, or set CHROMIUM")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing cached, no network needed
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--screenshot={out.resolve()}", html_path.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    im = Image.open(out).convert("L")
    lo, hi = im.getextrema()
    if hi - lo < 50:
        raise ValueError(f"{out} is blank (pixel range {lo}-{hi})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: beside the report, report.png)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=4000)
    a = ap.parse_args()
    try:
        n = check_images(a.report.read_text())
        out = screenshot(a.report, a.out or a.report.with_suffix(".png"), a.width, a.height)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {n} inline images, all decodable; screenshot {Image.open(out).size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
