"""Sweep the convolution shapes compress produces through a training step (forward, backward, weight
gradient checked against an exact reference), each case in a child process so that a native crash is a
recorded result, not a dead sweep.

    python scripts/conv_backward_sweep.py                       # the guarded layout (edgeclr.engine.set_layout)
    python scripts/conv_backward_sweep.py --layout channels_last --quick   # the raw kernel: finds oneDNN #6035
    python scripts/conv_backward_sweep.py --json out.json

A case: Conv2d(cin, cout, k, stride) on (batch, cin, hw, hw) at `threads` threads; layout `guarded` is a
channels_last model and input passed through edgeclr.engine.set_layout (what training does), `channels_last`
and `nchw` the raw layouts. Results: ok | wrong (weight gradient off by more than 1e-3 relative) |
crash (the process died from a signal; confirmed by running the case alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys

WIDTHS = (3, 4, 8, 12, 15, 16, 24, 32, 48, 56, 64)
BATCHES = (1, 2, 7, 32, 59, 64, 127, 256)


def cases(quick: bool = False, layouts=("guarded",), threads=(1, 2)) -> list[dict]:
    """1x1 convolutions (strided and not) over the widths pruning leaves (multiples of 8, and narrower
    ones), batch sizes with odd and prime ones, 1 and 2 threads; 3x3 convolutions at the narrow widths."""
    widths = (4, 8, 15, 16, 24) if quick else WIDTHS
    batches = (7, 59, 64) if quick else BATCHES
    out = []
    for layout, th, b, cin, stride in itertools.product(layouts, threads, batches, widths, (1, 2)):
        for cout, hw in ((max(8, 2 * cin), 16), (cin, 8)):
            out.append(dict(layout=layout, threads=th, batch=b, cin=cin, cout=cout, k=1, stride=stride, hw=hw))
        if cin <= 16:
            out.append(dict(layout=layout, threads=th, batch=b, cin=cin, cout=max(8, 2 * cin), k=3, stride=stride, hw=16))
    return out


def _run_case(c: dict) -> str:
    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c["cin"], c["cout"], c["k"], c["stride"], c["k"] // 2, bias=False)
    x = torch.randn(c["batch"], c["cin"], c["hw"], c["hw"])
    if c["layout"] in ("channels_last", "guarded"):
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if c["layout"] == "guarded":
        from types import SimpleNamespace

        from edgeclr.engine import set_layout

        conv = set_layout(SimpleNamespace(channels_last=True), conv, torch.device("cpu"))
    x.requires_grad_(True)
    for _ in range(3):
        conv.weight.grad = None
        y = conv(x)
        g = torch.randn_like(y)
        y.backward(g)
    # the exact weight gradient, in float64 through unfold (no oneDNN)
    cols = torch.nn.functional.unfold(x.detach().double().contiguous(), c["k"], padding=c["k"] // 2, stride=c["stride"])
    ref = torch.einsum("nol,nkl->ok", g.double().flatten(2), cols).view_as(conv.weight)
    err = float((conv.weight.grad.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return "ok" if err < 1e-3 else f"wrong {err:.3g}"


def child() -> None:
    import torch

    todo = json.load(sys.stdin)
    torch.set_num_threads(todo[0]["threads"])
    for i, c in enumerate(todo):
        print(f"START {i}", flush=True)
        print(f"RESULT {i} {_run_case(c)}", flush=True)


def _spawn(batch: list[dict], timeout: float) -> tuple[dict[int, str], int | None, int]:
    """Run cases in one child; (results by index, index of the case it died in, return code)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(batch[0]["threads"]))
    try:
        p = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(batch), capture_output=True, text=True,
                           timeout=timeout, env=env)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), -int(signal.SIGKILL)
    results, started = {}, None
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if parts[0] == "START":
            started = int(parts[1])
        elif parts[0] == "RESULT":
            results[int(parts[1])] = parts[2]
    died = started if rc != 0 and started is not None and started not in results else None
    return results, died, rc


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"crash {signal.Signals(-rc).name}"
        except ValueError:
            return f"crash signal {-rc}"
    return f"crash exit {rc}"


def sweep(todo: list[dict], timeout: float = 300) -> list[dict]:
    """Every case with its result; a case a child died in is run alone to confirm it."""
    results: list[str | None] = [None] * len(todo)
    by_threads: dict[int, list[int]] = {}
    for i, c in enumerate(todo):
        by_threads.setdefault(c["threads"], []).append(i)
    for idx in by_threads.values():
        pos = 0
        while pos < len(idx):
            part = idx[pos:]
            got, died, rc = _spawn([todo[i] for i in part], timeout)
            for j, r in got.items():
                results[part[j]] = r
            if died is None:
                if rc != 0 and len(got) < len(part):  # died outside a case: record the first unfinished one
                    died = len(got)
                else:
                    break
            alone, _, rc_alone = _spawn([todo[part[died]]], timeout)
            results[part[died]] = alone.get(0) or _describe_rc(rc_alone)
            if results[part[died]].startswith("ok"):  # corrupted earlier, died later: the case itself is fine alone
                results[part[died]] = f"crash in a sequence ({_describe_rc(rc).split(' ', 1)[1]}), ok alone"
            pos += died + 1
    return [dict(c, result=r or "not run") for c, r in zip(todo, results)]


def main() -> int:
    if "--child" in sys.argv:
        child()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="guarded", help="comma list of guarded, channels_last, nchw")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="fewer widths and batch sizes")
    ap.add_argument("--json", help="write every case and its result here")
    a = ap.parse_args()
    todo = cases(a.quick, tuple(a.layout.split(",")), tuple(int(t) for t in a.threads.split(",")))
    res = sweep(todo)
    bad = [r for r in res if r["result"] != "ok"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}: {len(res)} cases, "
          f"{len(res) - len(bad)} ok, {len(bad)} not")
    for r in bad:
        print("  ", {k: v for k, v in r.items()})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
