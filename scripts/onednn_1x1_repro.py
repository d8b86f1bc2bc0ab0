"""Standalone reproducer of oneDNN issue 6035 in torch (no edgeclr): the weight gradient of a strided
1x1 convolution with fewer input channels than the kernel's channel block (16 on AVX-512), in the
channels_last layout, writes past its workspace.

    python scripts/onednn_1x1_repro.py          # AVX-512 CPU, torch 2.14.1: killed by SIGSEGV or
                                                # "double free or corruption (!prev)" (exit 134 / 139)
    python scripts/onednn_1x1_repro.py nchw     # the same convolution in NCHW: prints ok
    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/onednn_1x1_repro.py   # AVX2's 8-channel block: prints ok

The shape is the one `edgeclr compress` met on 59 stained-tissue tiles: the first pruning step left a
ResNet-10's layer2 downsample with 8 input channels; batch 59, 16x16 maps, 2 threads.
"""

import sys

import torch

torch.set_num_threads(2)
layout = torch.contiguous_format if sys.argv[1:] == ["nchw"] else torch.channels_last
conv = torch.nn.Conv2d(8, 24, kernel_size=1, stride=2, bias=False).to(memory_format=layout)
x = torch.randn(59, 8, 16, 16).contiguous(memory_format=layout)
for _ in range(3):
    conv(x).square().mean().backward()
print("ok", torch.__version__, torch.backends.cpu.get_cpu_capability())
