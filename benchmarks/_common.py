"""Shared by the benchmark scripts: what machine a figure was measured on."""

from __future__ import annotations

import os
import platform
import subprocess


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
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def run(cmd: list[str]) -> float:
    """Run a command (echoed), fail on error; its wall time in seconds."""
    import shlex
    import time

    print("+", shlex.join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def interleaved_ms(fns: dict, x, rounds: int, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median ms of each fn(x), timed in turns (A B C A B C ...) so machine noise hits all alike:
    the median over rounds of each round's median of `runs` calls."""
    import time

    import numpy as np

    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    med: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
            med[k].append(1000 * float(np.median(ts)))
    return {k: float(np.median(v)) for k, v in med.items()}
