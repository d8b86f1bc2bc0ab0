"""Why edgeclr's layout rule (edgeclr.engine.set_layout) trains a model with a 1x1 convolution narrower
than 16 channels in NCHW: a training step under the rule against the same model in channels_last (both
with the oneDNN issue 6035 guard, without which channels_last crashes on AVX-512).

    python benchmarks/layout_rule.py [--steps 30] [--tag T]

Models: the shapes compress leaves and the presets train, on CPU at 2 threads, one fp32 training step
(forward, backward, AdamW) on channels_last augmented-like inputs, the median of --steps after warm-up;
the two layouts are interleaved step by step; inputs arrive channels_last, as edgeclr's views do.
Records: benchmarks/results/layout_rule/<tag or latest>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
from _common import machine, record_path

from edgeclr.engine import rtus_convs, set_layout
from edgeclr.models import ModelSpec, create_model

MODELS = {  # name: (spec, input size, batch)
    "ResNet-10 w8, 16 px (the pruned demo student's narrowest width)": (dict(name="resnet10", in_chans=1, stem_stride=1, width=8), 16, 128),
    "ResNet-18 w8, 16 px (digits)": (dict(name="resnet18", in_chans=1, stem_stride=1, width=8), 16, 128),
    "ResNet-18 w8 stem 2, 28 px (Fashion-MNIST)": (dict(name="resnet18", in_chans=1, stem_stride=2, width=8), 28, 256),
    "ResNet-10 w8 stem 4, 64 px (tiles)": (dict(name="resnet10", in_chans=3, stem_stride=4, width=8), 64, 59),
    "ResNet-18 w16 stem 2, 28 px (Fashion-MNIST student, no guard)": (dict(name="resnet18", in_chans=1, stem_stride=2, width=16), 28, 256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for label, (spec, size, batch) in MODELS.items():
        runs = {}
        for rule in ("old", "new"):  # old: channels_last + guard; new: the rule (set_layout asked for channels_last)
            torch.manual_seed(0)
            m = create_model(ModelSpec(**spec))
            if rule == "old":
                m = set_layout(SimpleNamespace(channels_last=False), m.to(memory_format=torch.channels_last), torch.device("cpu"))
            else:
                m = set_layout(SimpleNamespace(channels_last=True), m, torch.device("cpu"))
            opt = torch.optim.AdamW(m.parameters(), 1e-3)
            runs[rule] = (m, opt)
        x = torch.randn(batch, spec["in_chans"], size, size).contiguous(memory_format=torch.channels_last)
        times = {"old": [], "new": []}
        for i in range(a.steps + 5):
            for rule in ("old", "new"):
                m, opt = runs[rule]
                xin = x
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                m.embed(xin).square().mean().backward()
                opt.step()
                if i >= 5:
                    times[rule].append(time.perf_counter() - t)
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        rows.append({"model": label, "batch": batch, "guarded_convs": len(rtus_convs(runs["new"][0])),
                     "rule_layout": "channels_last" if next(runs["new"][0].parameters()).is_contiguous(
                         memory_format=torch.channels_last) and spec["width"] >= 16 else "NCHW",
                     "channels_last_ms": round(1000 * old, 2), "rule_ms": round(1000 * new, 2), "speed_up": round(old / new, 3)})
        print(rows[-1], flush=True)
    m = machine()
    lines = ["# The layout rule's cost per training step", "",
             f"`python benchmarks/layout_rule.py --steps {a.steps}`, {a.threads} threads, fp32; CPU: {m['cpu']} "
             f"({'AVX-512' if m['avx512'] else 'no AVX-512'}), torch {torch.__version__}.", "",
             "channels_last: the model in channels_last with the oneDNN 6035 convolutions in NCHW; the rule: "
             "edgeclr.engine.set_layout asked for channels_last (NCHW for a model with a 1x1 convolution under 16 channels). "
             "Inputs channels_last. Median step time; speed-up = channels_last / rule.", "",
             "| model | batch | guarded convs | the rule's layout | channels_last ms | rule ms | speed-up |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['guarded_convs']} | {r['rule_layout']} | {r['channels_last_ms']} | {r['rule_ms']} | "
              f"{r['speed_up']}x |" for r in rows]
    record_path("layout_rule", a.tag).write_text("\n".join(lines) + "\n")
    record_path("layout_rule", a.tag, "json").write_text(json.dumps({"machine": m, "steps": a.steps, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
