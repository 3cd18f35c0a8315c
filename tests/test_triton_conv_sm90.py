"""The Triton convolution compiled for an H100 (sm_90) at ResNet-50's real launches: no register spills, and shared
memory that fits the card.

A kernel that spills keeps part of its working set in local memory (L1/L2) inside its main loop, and one that asks
for more shared memory than a block may have fails at launch; the interpreter these tests otherwise run under sees
neither. So the configurations `choose_config` picks are compiled by Triton's ptxas (no GPU needed), with the
arguments a launch passes for each convolution of torchvision's ResNet-50 (batch 256 at 224x224, and ImageNet's last
training batch of 143), in float32 (TF32), bfloat16 and float16, NCHW and channels_last (input and weight), in the
two heaviest fused variants: training (BN-ReLU prologue + statistics epilogue) and inference (bias + residual +
ReLU epilogue). Configurations that no ResNet-50 convolution picks (the narrow tiles of grouped convolutions) are
compiled at ResNeXt-50 32x4d's grouped convolutions, which pick them, or, if none does, forced onto ResNet-50's.

Triton specializes a kernel on which integer arguments equal 1 or are divisible by 16 (and on its pointers'
alignment): those launches make 288 distinct kernels, about 15 minutes of compiling here. The test compiles one per
configuration, layout, fused variant and element size (48, about a minute): the least aligned launch, whose
addressing is the most general and costs the most registers (in the full sweep, the only spills of a 64x64x16 NCHW
tile were at 14x14 with a batch of 143, the least aligned launches). FUSED_RESNET_SM90_EVERY_LAUNCH=1 compiles all
288.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

import sm90  # noqa: E402
from fused_resnet.triton.conv import SEARCHED  # noqa: E402 (under the interpreter: only its configurations are read)

# ImageNet-1k has 1,281,167 training images: batches of 256 leave a last one of 143.
BATCHES = (256, 143)
IMAGE_SIZE = 224
DTYPES = ("float32", "bfloat16", "float16")
MODES = ("training", "inference")


def resnet_convs(width_per_group: int = 64, groups: int = 1) -> list[tuple[int, int, int, int, int, int, int]]:
    """(in channels, out channels, kernel, stride, padding, input size, groups) of every convolution of a
    torchvision Bottleneck ResNet-50 at 224x224 (ResNeXt-50 32x4d: width_per_group=4, groups=32), once each."""
    convs = {(3, 64, 7, 2, 3, IMAGE_SIZE, 1)}
    in_channels, size = 64, IMAGE_SIZE // 4
    for planes, blocks, first_stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        width = planes * width_per_group // 64 * groups
        for block in range(blocks):
            stride = first_stride if block == 0 else 1
            convs.add((in_channels, width, 1, 1, 0, size, 1))
            convs.add((width, width, 3, stride, 1, size, groups))
            if block == 0 and (stride != 1 or in_channels != planes * 4):
                convs.add((in_channels, planes * 4, 1, stride, 0, size, 1))
            size //= stride
            convs.add((width, planes * 4, 1, 1, 0, size, 1))
            in_channels = planes * 4
    return sorted(convs)


# Runs in a process with the Triton compiler on (sm90.run_compiler_script): enumerates the launches, compiles the
# kernels (each once) and prints one JSON line per kernel.
COMPILE_LAUNCHES = """
import itertools, json, sys, time
import torch
import sm90
from test_triton_conv_sm90 import BATCHES, DTYPES, MODES, resnet_convs
from fused_resnet.tensors import conv_output_size
from fused_resnet.triton import conv

every_launch = sys.argv[1] == "every"

def meta(shape, dtype, channels_last):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t

def launches():
    \"\"\"(what, kernel arguments, configuration) of every launch; of ResNeXt only the grouped convolutions.\"\"\"
    for network, convs in (("resnet50", resnet_convs()), ("resnext50_32x4d", resnet_convs(4, 32))):
        for (cin, cout, k, stride, pad, size, groups), batch, dtype_name, channels_last, mode in itertools.product(
                convs, BATCHES, DTYPES, (False, True), MODES):
            if network != "resnet50" and groups == 1:
                continue
            dtype = getattr(torch, dtype_name)
            x = meta((batch, cin, size, size), dtype, channels_last)
            weight = meta((cout, cin // groups, k, k), dtype, channels_last)
            out_size = conv_output_size((size, size), (k, k), (stride,) * 2, (pad,) * 2, (1, 1))
            channels = torch.empty(cin, device="meta")
            training = mode == "training"
            args = conv.kernel_arguments(
                x, weight, None if training else torch.empty(cout, device="meta"), out_size, (stride,) * 2,
                (pad,) * 2, (1, 1), *(channels if training else None,) * 3,
                None if training else meta((batch, cout, *out_size), dtype, channels_last), 1, 0, not training,
                training, 1)
            config = conv.choose_config(cout // groups, cin // groups, conv.is_channels_last(x))
            layout = "channels_last" if channels_last else "NCHW"
            yield (f"{network} {cin}->{cout} {k}x{k}/{stride} g{groups} at {size}, batch {batch}, {dtype_name} "
                   f"{layout} {mode}", args, config)

def forced(config):
    \"\"\"The launches of `config` forced onto ResNet-50's first 3x3 convolution (64 -> 64 at 56), for a configuration
    that no convolution picks.\"\"\"
    for what, args, _ in launches():
        if what.startswith("resnet50 64->64 3x3/1") and (config in conv.CONFIGS.values()) == ("channels_last" in what):
            yield what + " (forced)", args, config

kernels = {}
def add(what, args, config):
    kwargs = {**args.flags, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
              "num_warps": config.num_warps, "num_stages": config.num_stages}
    options, signature, constexprs, attrs = sm90.specialization(conv._conv_kernel, args.args, kwargs)
    if every_launch:
        key = repr((signature, constexprs, attrs, options))
        generality = 0
    else:
        # One kernel per configuration, layout, fused variant and element size: the launch with the fewest
        # arguments known divisible by 16, then the fewest equal to 1. Its addressing is the least aligned and the
        # most general, which costs the most registers (64x64x16 NCHW tiles spilled at 14x14 and batch 143 only).
        element = "4" if args.args[0].dtype == torch.float32 else "2"
        key = repr((config, element, args.flags, conv.is_channels_last(args.args[0])))
        generality = (sum(bool(attr) for attr in attrs.values()),
                      sum(v == 1 for v in constexprs.values() if not isinstance(v, bool)))
    if key not in kernels or generality < kernels[key][0]:
        kernels[key] = (generality, what, args, kwargs, config)

for launch in launches():
    add(*launch)
for config in conv.SEARCHED:
    if all(picked != config for *_, picked in kernels.values()):
        for launch in forced(config):
            add(*launch)
print(json.dumps(dict(kernels=len(kernels))), flush=True)
for _, what, args, kwargs, config in kernels.values():
    start = time.perf_counter()
    report = sm90.compile_for_sm90(conv._conv_kernel, args.args, kwargs)
    print(json.dumps(dict(what=what, config=list(config), seconds=round(time.perf_counter() - start, 1),
                          **report._asdict())), flush=True)
"""


def compile_launches(tmp_path, every_launch: bool) -> list[dict]:
    """ptxas' report (and what was compiled) for each kernel COMPILE_LAUNCHES compiles, in a compiler process."""
    if sm90.ptxas_path() is None:
        pytest.skip("Triton's CUDA backend has no ptxas here: the kernels cannot be compiled for a GPU")
    result = sm90.run_compiler_script(COMPILE_LAUNCHES, tmp_path, timeout=3600 if every_launch else 600,
                                      argv=("every" if every_launch else "representative",))
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and lines[0]["kernels"] == len(lines) - 1, result.stdout[-2000:]
    return lines[1:]


def check_reports(reports: list[dict]) -> None:
    assert {tuple(r["config"]) for r in reports} == {tuple(c) for c in SEARCHED}, "a shipped config was not compiled"
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"] or r["stack_frame"]]
    too_large = [r for r in reports if r["shared_memory"] > min(sm90.SHARED_MEMORY_LIMIT.values())]
    assert not spilling and not too_large, "\n".join(
        f"{r['config']} for {r['what']}: {sm90.PtxasReport(*(r[f] for f in sm90.PtxasReport._fields))}"
        for r in spilling + too_large)


def test_every_shipped_config_compiles_for_an_h100_without_spills(tmp_path):
    """Each configuration, layout, fused variant and element size (fp32; bf16 standing in for fp16, which differs
    only in its conversions) compiled once, at its least aligned ResNet-50 (or ResNeXt) launch: no spill, no stack
    frame, and shared memory within an A100's block limit (the configurations ship for both Ampere and Hopper; the
    H100's 227 KB is the looser). FUSED_RESNET_SM90_EVERY_LAUNCH=1 compiles every distinct kernel instead."""
    start = time.perf_counter()
    reports = compile_launches(tmp_path, os.environ.get("FUSED_RESNET_SM90_EVERY_LAUNCH", "0") not in ("", "0"))
    print(f"{len(reports)} kernels compiled in {time.perf_counter() - start:.0f} s")
    for r in reports:
        print(f"{r['config']} {r['what']}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
              f"{r['shared_memory']} B shared memory [{r['seconds']} s]")
    check_reports(reports)
