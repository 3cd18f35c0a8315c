"""The kernel sets under test, the one table of their cases (dtypes and tolerances, shapes, layouts, alignments),
and what every kernel test shares: the `kernels` fixture, fresh data, poisoned outputs, comparison with a bound.

A kernel set is one implementation of the four BatchNorm ops of csrc/ops.cpp (batch_stats, bn_act,
bn_act_backward_reduce, bn_act_backward_elemt), all with the same schemas:
  cpu_default, cpu_avx2  torch.ops.fused_resnet on CPU tensors, with each CPU kernel table the extension builds
  cuda                   torch.ops.fused_resnet on CUDA tensors
  triton                 torch.ops.fused_resnet_triton, on CUDA tensors, or on CPU tensors under Triton's interpreter
A test that takes `kernels` runs once per set and per case of the set-dependent arguments (SET_AXES, see
pytest_generate_tests); a set that cannot run here is one skipped case per test, with the reason
fused_resnet.backend_status() gives. Results are compared with the float64 formulas of tests/primitives.py, within a
bound from the table (assert_close), and Triton's also with the compiled ops on the same device.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import fused_resnet
import fused_resnet.triton
from fused_resnet import _native
from fused_resnet.tensors import memory_format_of
import primitives
from primitives import Exact


class DtypeCase(NamedTuple):
    accumulation: torch.dtype  # what the kernels compute in, and the dtype of statistics and sums
    # A result rounded once to this dtype is within one ulp: `rounding` of its magnitude, and at least `underflow`,
    # the spacing of the subnormals (float16 results below 6e-5 are spaced 6e-8 apart, whatever their size).
    rounding: float
    underflow: float
    # The accumulation dtype's arithmetic error, relative to the summed magnitude of the terms a result adds up
    # (primitives.Exact): a few roundings in an elementwise formula, sums over a channel's N*H*W values in a reduction.
    elementwise: float
    reduction: float


# The dtypes every kernel set runs, Triton's included (float64 too). Rounding and underflow are torch.finfo's eps and
# tiny * eps.
DTYPES = {  # dtype: (accumulation, rounding, underflow, elementwise, reduction)
    torch.float64: DtypeCase(torch.float64, 2.0**-52, 2.0**-1074, 1e-14, 1e-12),
    torch.float32: DtypeCase(torch.float32, 2.0**-23, 2.0**-149, 1e-6, 1e-5),
    torch.bfloat16: DtypeCase(torch.float32, 2.0**-7, 2.0**-133, 1e-6, 1e-5),
    torch.float16: DtypeCase(torch.float32, 2.0**-10, 2.0**-24, 1e-6, 1e-5),
}

# N, C, H, W: C not a multiple of any vector width, H*W not either, single-pixel planes, one image; and two
# channels_last row tiles of the CPU reductions with every channel branch (45 = a block of 32, a vector of 8, 5).
SHAPES = [(2, 3, 5, 7), (3, 13, 7, 9), (1, 67, 6, 6), (4, 64, 1, 1), (2, 33, 17, 1), (4, 45, 12, 10)]
# For the kernel sets on CUDA tensors also: odd channel counts and planes (no 16-byte vectors), vectorizable ones,
# HW = 1, N = 1, and sizes that split each layout's reduction into several chunks: NCHW runs of whole planes
# (16x4x32x32), NCHW segments of one plane (1x2x96x96), many NHWC row tiles (8x67x7x9, 4x64x56x56), several
# 256-channel NHWC slices. Under Triton's interpreter (about a second per call at 4x64x56x56) they would take minutes.
GPU_SHAPES = [(2, 3, 7, 9), (1, 67, 7, 9), (8, 67, 7, 9), (4, 64, 8, 8), (3, 16, 1, 1), (5, 96, 5, 5),
              (16, 4, 32, 32), (1, 2, 96, 96), (2, 512, 14, 14), (4, 64, 56, 56)]

# Option A's residual for bn_act: (input shape, residual's (C, H, W), stride, zero channels before the residual's).
PADDED_RESIDUALS = [
    ((2, 13, 7, 9), (13, 7, 9), 1, 0),  # no padding, no subsampling
    ((2, 32, 8, 8), (16, 16, 16), 2, 8),  # the CIFAR stage changes: half the channels, centred
    ((3, 16, 5, 4), (8, 10, 8), 2, 3),  # odd sizes, off-centre
    ((2, 10, 3, 3), (7, 9, 9), 3, 0),  # stride 3, no channels before
    ((1, 24, 4, 4), (8, 8, 8), 2, 16),  # the residual's channels last
]
# The same with odd residual sizes, which subsampling rounds up: (H_r - 1) // stride + 1 == H.
ODD_PADDED_RESIDUALS = [
    ((2, 32, 8, 8), (16, 15, 16), 2, 8),
    ((2, 32, 8, 8), (16, 16, 15), 2, 8),
    ((3, 16, 5, 4), (8, 9, 8), 2, 3),
    ((2, 10, 3, 3), (7, 8, 9), 3, 0),
    ((1, 24, 4, 4), (8, 7, 8), 2, 16),
]
GPU_PADDED_RESIDUALS = [((2, 64, 32, 32), (32, 64, 64), 2, 16)]  # several blocks per plane (see GPU_SHAPES)

# The large-mean statistics (mean 1e4, spread 1); on CUDA tensors also one per reduction path of the GPU kernels:
# runs of whole planes, segments of one plane, rows (see GPU_SHAPES).
LARGE_MEAN_SHAPES = [(8, 5, 16, 16)]
GPU_LARGE_MEAN_SHAPES = [(8, 16, 32, 32), (2, 67, 7, 9), (1, 3, 96, 96)]

# Which activations of a call are views one element past a 16-byte boundary: none, all, or only the second. The
# CUDA kernels load 16-byte vectors only when every pointer allows, and fall back to single elements otherwise.
# (Fresh tensors, outputs and workspaces, are always aligned; inputs here are views with a storage offset.)
ALIGNMENTS = ["aligned", "misaligned", "one_misaligned"]
# bn_act_backward_reduce's optional inputs: the ReLU mask, from the output ("masked") or from the input's
# normalization ("input_masked": mask_scale, mask_shift), and the second BN (input2, mean2).
REDUCE_INPUTS = ["plain", "masked", "second", "masked_second", "input_masked", "input_masked_second"]


@dataclass(frozen=True)
class KernelSet:
    name: str
    backend: str  # the fused_resnet backend these kernels serve
    device: str  # the device of the tensors they run on
    cpu_table: str | None = None  # the CPU kernel table installed while a test runs

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device == "cpu"

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return SHAPES + (GPU_SHAPES if self.device == "cuda" else [])

    @property
    def padded_residuals(self) -> list[tuple]:
        # Under the interpreter the odd sizes only (exact ones take the same path, plus the stride-1 case): each
        # case is tens of milliseconds there.
        if self.interpreted:
            return PADDED_RESIDUALS[:1] + ODD_PADDED_RESIDUALS
        return PADDED_RESIDUALS + ODD_PADDED_RESIDUALS + (GPU_PADDED_RESIDUALS if self.device == "cuda" else [])

    @property
    def large_mean_shapes(self) -> list[tuple[int, ...]]:
        return LARGE_MEAN_SHAPES + (GPU_LARGE_MEAN_SHAPES if self.device == "cuda" else [])

    @property
    def alignments(self) -> list[str]:
        # Only the CUDA kernels choose a code path by pointer alignment. The CPU kernels always load with unaligned
        # vector loads, the interpreter with NumPy, and compiled Triton specializes each kernel on its arguments'
        # alignment itself (a misaligned view only selects another compiled variant, one more compilation each):
        # for those sets test_ops_read_views_at_a_storage_offset checks that a view's offset is honoured.
        return ALIGNMENTS if self.backend == "cuda" else ALIGNMENTS[:1]

    @property
    def reduce_inputs(self) -> list[str]:
        # The mask and the second BN are independent compile-time branches of the Triton kernels: under the
        # interpreter each mask source is on in one case and the second BN on in one and off in the others (every
        # combination would double the slowest kernel tests here for no new path).
        return ["plain", "masked_second", "input_masked"] if self.interpreted else REDUCE_INPUTS

    @property
    def determinism_shape(self) -> tuple[int, ...] | None:
        """Large enough to split the reductions into many tiles: several per CPU thread, many chunks on a GPU. None
        under the interpreter (over a second per call at such sizes): tests/test_triton_launchers.py shrinks the
        Triton tiles to split small tensors into many instead."""
        return None if self.interpreted else {"cpu": (8, 24, 30, 30), "cuda": (32, 64, 28, 28)}[self.device]

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        """Why the set cannot run here, or None (asked once: nothing changes it during a session)."""
        status = fused_resnet.backend_status()[self.backend]
        if status != "available":
            return status
        if self.cpu_table == "avx2" and _native.cpu_kernel_capability != "avx2":
            return (f"the AVX2 CPU kernels are not used on this machine (ATen's CPU capability is "
                    f"{torch.backends.cpu.get_cpu_capability()}, the CPU lacks AVX2, FMA or F16C, or "
                    f"fused_resnet._C_avx2 is missing)")
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return None

    @property
    def ops(self):
        return torch.ops.fused_resnet_triton if self.backend == "triton" else torch.ops.fused_resnet

    @functools.cached_property
    def compiled(self):
        """The compiled ops on the same device, which Triton's results are also compared with; None for the others
        or where the compiled backend of that device cannot run."""
        if self.backend != "triton" or fused_resnet.backend_status()[self.device] != "available":
            return None
        return torch.ops.fused_resnet

    def run(self, op: str, *args):
        """The set's op on `args`, and the compiled op's result on the same arguments (or None; see `compiled`)."""
        compiled = self.compiled
        return getattr(self.ops, op)(*args), (getattr(compiled, op)(*args) if compiled is not None else None)


def _triton_device() -> str:
    return "cpu" if fused_resnet.triton.interpreted() or not torch.cuda.is_available() else "cuda"


KERNEL_SETS = {s.name: s for s in [
    KernelSet("cpu_default", "cpu", "cpu", cpu_table="default"),
    KernelSet("cpu_avx2", "cpu", "cpu", cpu_table="avx2"),
    KernelSet("cuda", "cuda", "cuda"),
    KernelSet("triton", "triton", _triton_device()),
]}
COMPILED_SETS = [s.name for s in KERNEL_SETS.values() if s.backend != "triton"]
SETS_WITHOUT_ALIGNMENT_CASES = [s.name for s in KERNEL_SETS.values() if s.alignments == ["aligned"]]
GPU_TENSOR_SETS = [s.name for s in KERNEL_SETS.values() if s.device == "cuda"]
DETERMINISM_SETS = [s.name for s in KERNEL_SETS.values() if s.determinism_shape is not None]

# The test arguments whose cases depend on the kernel set, each with the set's cases.
SET_AXES = {
    "shape": lambda s: s.shapes,
    "alignment": lambda s: s.alignments,
    "input_alignment": lambda s: [a for a in s.alignments if a != "one_misaligned"],  # ops of one activation
    "padded_residual": lambda s: s.padded_residuals,
    "stats_shape": lambda s: s.large_mean_shapes,
    "reduce_inputs": lambda s: s.reduce_inputs,
}


def case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, tuple):
        return "-".join(map(case_id, value))
    return str(value)


def _skip_marks(name: str) -> list:
    reason = KERNEL_SETS[name].unavailable_reason
    return [pytest.mark.skip(reason=f"kernel set {name}: {reason}")] if reason is not None else []


def kernel_set_params(names) -> list:
    """Parameters of `kernels` for the sets `names`; one that cannot run here is marked skipped, with the reason."""
    return [pytest.param(name, id=name, marks=_skip_marks(name)) for name in names]


def pytest_generate_tests(metafunc):
    """Parametrizes `kernels` (indirectly, through the fixture) with every kernel set, each with its own cases of the
    set-dependent arguments the test takes. A test that parametrizes `kernels` itself picks its sets.

    A set that cannot run here is one case per test, marked skipped with the reason: skipped before any fixture
    sets up, and not multiplied by its set-dependent cases (the thousands of CUDA cases would cost seconds)."""
    if "kernels" not in metafunc.fixturenames or any(
            "kernels" in (m.args[0] if isinstance(m.args[0], (list, tuple)) else m.args[0].replace(" ", "").split(","))
            for m in metafunc.definition.iter_markers("parametrize")):
        return
    axes = [name for name in SET_AXES if name in metafunc.fixturenames]
    params = []
    for name, s in KERNEL_SETS.items():
        cases = list(itertools.product(*(SET_AXES[a](s) for a in axes)))
        if s.unavailable_reason is not None:
            params.append(pytest.param(name, *cases[0], id=name, marks=_skip_marks(name)))
        else:
            params += [pytest.param(name, *case, id="-".join([name, *map(case_id, case)])) for case in cases]
    metafunc.parametrize(["kernels", *axes], params, indirect=["kernels"])


def _install_cpu_table(table: str | None) -> None:
    from fused_resnet import _C

    if table == "avx2":
        from fused_resnet import _C_avx2

        _C.use_cpu_kernels(_C_avx2.kernels)
    else:
        _C.use_cpu_kernels(None)


@pytest.fixture
def kernels(request):
    """The kernel set named by the parameter; a CPU set runs with its kernel table, the one the loader chose
    restored after."""
    kernel_set = KERNEL_SETS[request.param]
    reason = kernel_set.unavailable_reason
    if reason is not None:
        pytest.skip(f"kernel set {kernel_set.name}: {reason}")
    if kernel_set.cpu_table is None:
        yield kernel_set
        return
    _install_cpu_table(kernel_set.cpu_table)
    try:
        yield kernel_set
    finally:
        _install_cpu_table(_native.cpu_kernel_capability)


@pytest.fixture(scope="module")
def poisoned_outputs():
    """Every output and workspace the kernels allocate starts out NaN (integers at their maximum): deterministic
    mode fills uninitialized memory, in torch.empty and in the extension's at::empty alike, so an element or a
    partial a kernel forgets to write fails the comparison instead of passing on stale zeros."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(2).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# ---------------------------------------------------------------------------------------------------------------
# Data


def accumulation(dtype: torch.dtype) -> torch.dtype:
    return DTYPES[dtype].accumulation


def activation(kernels: KernelSet, shape, dtype, channels_last=False, offset=0, mean=0.0, std=1.0) -> Tensor:
    """Fresh random values of `dtype` on the set's device, dense in NCHW or channels_last, `offset` elements into a
    poisoned buffer (with offset 1, a view one element past a 16-byte boundary)."""
    N, C, H, W = shape
    strides = (H * W * C, 1, W * C, C) if channels_last else (C * H * W, H * W, W, 1)
    buffer = torch.empty(math.prod(shape) + offset, dtype=dtype, device=kernels.device)
    t = buffer.as_strided(shape, strides, storage_offset=offset).normal_(mean, std)
    assert (t.data_ptr() % 16 == 0) == (offset == 0)
    return t


def activations(kernels: KernelSet, count, shape, dtype, channels_last, alignment="aligned", **kwargs) -> list[Tensor]:
    offsets = {"aligned": [0] * count, "misaligned": [1] * count, "one_misaligned": [0, 1] + [0] * (count - 2)}
    return [activation(kernels, shape, dtype, channels_last, offset, **kwargs) for offset in offsets[alignment][:count]]


def channel_vectors(kernels: KernelSet, count, C, dtype) -> list[Tensor]:
    """`count` fresh per-channel vectors in the accumulation dtype of `dtype`, as the ops take them."""
    return [torch.randn(C, dtype=accumulation(dtype), device=kernels.device) for _ in range(count)]


# How close to 0, relative to the magnitude of its terms, a normalized value must be for its ReLU mask to be left
# out of a comparison: far above float32's rounding (1e-7), far below the spread of the data (about 1).
RELU_THRESHOLD_MARGIN = 1e-4


def gradient_clear_of_relu_threshold(grad: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """`grad`, zeroed in place where (x - mean) * scale + shift is within RELU_THRESHOLD_MARGIN of its magnitude of 0
    (or below 1e-6: float16 rounds a positive value under 3e-8 to 0). There the kernels' mask from the input,
    decided in float32, and the float64 formula's may differ, and a 16-bit bn_act output may have rounded a positive
    value to 0; with a zero gradient either decision gives the same results. Fresh data has about one such element
    in 10^4."""
    value = primitives.bn_act(x, mean, scale, shift, relu=False)
    return grad.masked_fill_(value.value.abs() <= RELU_THRESHOLD_MARGIN * value.magnitude + 1e-6, 0)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def assert_dense_like(out: Tensor, like: Tensor, dtype: torch.dtype) -> None:
    """An activation output: `dtype`, like's shape and device, dense in the layout the kernels give like's."""
    assert out.dtype == dtype and out.shape == like.shape and out.device == like.device, out
    assert out.is_contiguous(memory_format=memory_format_of(like)), out.stride()


def assert_channel_vector(t: Tensor, like: Tensor, dtype: torch.dtype) -> None:
    assert t.dtype == dtype and t.shape == (like.shape[1],) and t.device == like.device, t


def assert_within(actual: Tensor, expected: Tensor, bound, what: str) -> None:
    """|actual - expected| <= bound elementwise (bound: a tensor or a number); a NaN in actual fails."""
    actual = actual.detach().double()
    err = (actual - expected).abs()
    bad = ~(err <= bound)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        allowed = bound[index].item() if isinstance(bound, Tensor) else bound
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. at {index}: got "
                    f"{actual[index].item()!r}, expected {expected[index].item()!r} (allowed error {allowed:.3g})")


def assert_close(actual: Tensor, exact: Exact, dtype: torch.dtype, kind: str, what: str,
                 compiled: Tensor | None = None) -> None:
    """`actual`, a result of `dtype`, against the float64 `exact`: within the dtype's rounding of its value plus the
    `kind` ("elementwise" or "reduction") arithmetic error of its terms' magnitude. `compiled`, the compiled op's
    result on the same inputs, is held to twice that bound (each is within the bound of the exact result)."""
    case = DTYPES[dtype]
    bound = case.rounding * exact.value.abs() + case.underflow + getattr(case, kind) * exact.magnitude
    assert_within(actual, exact.value, bound, what)
    if compiled is not None:
        assert_within(actual, compiled.double(), 2 * bound, f"{what} against the compiled op")


def parametrize_dtypes(dtypes=tuple(DTYPES)):
    return pytest.mark.parametrize("dtype", dtypes, ids=case_id)


parametrize_layouts = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
