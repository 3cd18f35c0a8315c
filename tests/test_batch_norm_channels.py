"""The cpu kernel set's per-channel BatchNorm arithmetic (csrc/cpu/batch_norm_channels_cpu.cpp: the affine form,
the backward coefficients, the running-statistics update) against the reference, KernelSet's ATen ops, bit for
bit: on random vectors, both accumulation dtypes, channel counts that fill SIMD registers and ones that leave a
tail, with and without weight and bias (and low-precision ones), batch and running statistics, momentum factors
on both sides of ATen's lerp switch at 0.5; the ops' errors; torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch

from fused_resnet import _native
from fused_resnet.kernels import KernelSet, kernels_for

pytestmark = pytest.mark.skipif(not _native.has_extension(), reason=str(_native.load_error))

CHANNELS = [1, 3, 64, 67]
ACC_DTYPES = [torch.float32, torch.float64]


def vectors(generator: torch.Generator, channels: int, dtype: torch.dtype, count: int, positive: bool = False):
    out = [torch.randn(channels, generator=generator, dtype=torch.float64) * 3 for _ in range(count)]
    return [(v.abs() + 1e-3 if positive else v).to(dtype) for v in out]


def optional_param(generator: torch.Generator, kind: str, channels: int, acc: torch.dtype) -> torch.Tensor | None:
    """None, a parameter in the accumulation dtype, or a bfloat16 one (converted inside)."""
    if kind == "none":
        return None
    return vectors(generator, channels, torch.bfloat16 if kind == "bf16" else acc, 1)[0]


def assert_bitwise(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a.double() - b.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("weight_kind,bias_kind", [("acc", "acc"), ("none", "none"), ("bf16", "acc"),
                                                   ("acc", "none")])
def test_affine_is_the_references(acc, channels, weight_kind, bias_kind):
    generator = torch.Generator().manual_seed(channels)
    (var,) = vectors(generator, channels, acc, 1, positive=True)
    var[0] = 0.0  # a constant channel: invstd = 1/sqrt(eps)
    weight = optional_param(generator, weight_kind, channels, acc)
    bias = optional_param(generator, bias_kind, channels, acc)
    cpu = kernels_for("cpu")
    for eps in (1e-5, 1e-3):
        assert_bitwise(cpu.bn_affine(var, weight, bias, eps), KernelSet.bn_affine(cpu, var, weight, bias, eps))


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("weight_kind", ["acc", "none", "bf16"])
@pytest.mark.parametrize("use_batch_stats", [True, False], ids=["batch", "running"])
def test_backward_coefs_are_the_references(acc, channels, weight_kind, use_batch_stats):
    generator = torch.Generator().manual_seed(100 + channels)
    sum_dy, sum_dy_xmu = vectors(generator, channels, acc, 2)
    (invstd,) = vectors(generator, channels, acc, 1, positive=True)
    weight = optional_param(generator, weight_kind, channels, acc)
    cpu = kernels_for("cpu")
    for count in (2, 36, 12544):
        coefs, grad_weight, grad_bias = cpu.bn_backward_coefs(sum_dy, sum_dy_xmu, invstd, weight, use_batch_stats,
                                                              count)
        ref_coefs, *ref_grads = KernelSet.bn_backward_coefs(cpu, sum_dy, sum_dy_xmu, invstd, weight,
                                                            use_batch_stats, count)
        assert_bitwise([*coefs, grad_weight, grad_bias], [*ref_coefs, *ref_grads])
        assert grad_bias.data_ptr() != sum_dy.data_ptr()  # its own tensor, for AccumulateGrad to keep


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("factor", [0.1, 0.5, 0.9, 1 / 3])
def test_running_stats_update_is_the_references(acc, channels, factor):
    generator = torch.Generator().manual_seed(200 + channels)
    mean, running_mean = vectors(generator, channels, acc, 2)
    var, running_var = vectors(generator, channels, acc, 2, positive=True)
    cpu = kernels_for("cpu")
    for count in (2, 36, 12544):
        ours = [running_mean.clone(), running_var.clone()]
        theirs = [running_mean.clone(), running_var.clone()]
        cpu.update_running_stats(*ours, mean, var, factor, count)
        KernelSet.update_running_stats(cpu, *theirs, mean, var, factor, count)
        assert_bitwise(ours, theirs)
        assert not torch.equal(ours[0], running_mean)


def test_strided_vectors_give_the_same_results():
    """Every-other-element views (a user's running statistics or parameters can be views): read through
    .contiguous(), and the running statistics, written in place, updated by the reference."""
    generator = torch.Generator().manual_seed(4)
    a, b, c, d = (v[::2] for v in vectors(generator, 16, torch.float32, 4))
    p, q = (v[::2] for v in vectors(generator, 16, torch.float32, 2, positive=True))
    cpu = kernels_for("cpu")
    assert_bitwise(cpu.bn_affine(p, a, b, 1e-5), KernelSet.bn_affine(cpu, p, a, b, 1e-5))
    ours, *grads = cpu.bn_backward_coefs(a, b, p, c, True, 36)
    theirs, *ref_grads = KernelSet.bn_backward_coefs(cpu, a, b, p, c, True, 36)
    assert_bitwise([*ours, *grads], [*theirs, *ref_grads])
    running = [torch.rand(16)[::2], torch.rand(16)[::2] + 0.5]
    expected = [t.clone() for t in running]
    cpu.update_running_stats(*running, d, q, 0.1, 36)
    KernelSet.update_running_stats(cpu, *expected, d, q, 0.1, 36)
    assert_bitwise(running, expected)


def test_what_the_compiled_ops_do_not_take_runs_the_reference():
    """A synchronized BatchNorm's tensor count, momentum=None's tensor factor and bfloat16 running statistics."""
    generator = torch.Generator().manual_seed(3)
    sum_dy, sum_dy_xmu, mean = vectors(generator, 8, torch.float32, 3)
    invstd, var = vectors(generator, 8, torch.float32, 2, positive=True)
    cpu = kernels_for("cpu")
    count = torch.tensor(36.0, dtype=torch.float64)
    assert_bitwise(cpu.bn_backward_coefs(sum_dy, sum_dy_xmu, invstd, None, True, count)[0],
                   KernelSet.bn_backward_coefs(cpu, sum_dy, sum_dy_xmu, invstd, None, True, 36)[0])
    for factor, running_dtype in ((torch.tensor(0.25), torch.float32), (0.1, torch.bfloat16)):
        ours = [mean.to(running_dtype) * 2, var.to(running_dtype) * 2]
        theirs = [t.clone() for t in ours]
        cpu.update_running_stats(*ours, mean, var, factor, 36)
        KernelSet.update_running_stats(cpu, *theirs, mean, var, factor, 36)
        assert_bitwise(ours, theirs)


def bad_calls():
    ops = torch.ops.fused_resnet
    v = torch.rand(4) + 0.5
    return [
        (lambda: ops.batch_norm_affine(v.half(), None, None, 1e-5), "var in an accumulation dtype"),
        (lambda: ops.batch_norm_affine(v.view(2, 2), None, None, 1e-5), "var to be 1-D"),
        (lambda: ops.batch_norm_affine(v, torch.ones(3), None, 1e-5), "weight of shape (4,)"),
        (lambda: ops.batch_norm_affine(v, None, torch.ones(4, dtype=torch.int32), 1e-5),
         "bias to be a floating-point tensor"),
        (lambda: ops.batch_norm_backward_coefs(v, v.double(), v, None, True, 4.0), "sum_dy_xmu of shape (4,) and "
                                                                                   "dtype Float"),
        (lambda: ops.batch_norm_backward_coefs(v, v, v, None, True, 0.0), "a positive count"),
        (lambda: ops.batch_norm_update_running_stats_(v.clone(), v.clone()[:3], v, v, 0.1, 4.0),
         "running_var of shape (4,)"),
        (lambda: ops.batch_norm_update_running_stats_(v.clone(), v.clone(), v, v, 0.1, 1.0),
         "more than 1 value per channel"),
    ]


@pytest.mark.parametrize("call", range(len(bad_calls())))
def test_errors_name_the_argument(call):
    fn, message = bad_calls()[call]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fn()


def test_a_refused_update_changes_nothing():
    running_mean, running_var = torch.rand(4), torch.rand(4)
    before = running_mean.clone(), running_var.clone()
    with pytest.raises(RuntimeError, match="var of shape"):
        torch.ops.fused_resnet.batch_norm_update_running_stats_(running_mean, running_var, torch.rand(4),
                                                                torch.rand(3), 0.1, 4.0)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(4))
def test_opcheck(acc, case):
    generator = torch.Generator().manual_seed(case)
    a, b, c = vectors(generator, 6, acc, 3)
    p, q = vectors(generator, 6, acc, 2, positive=True)
    ops = torch.ops.fused_resnet
    op, args = [
        (ops.batch_norm_affine.default, (p, a, b, 1e-5)),
        (ops.batch_norm_affine.default, (p, None, None, 1e-3)),
        (ops.batch_norm_backward_coefs.default, (a, b, p, c, True, 24.0)),
        (ops.batch_norm_update_running_stats_.default, (a.clone(), q.clone(), b, p, 0.1, 24.0)),
    ][case]
    torch.library.opcheck(op, args)



def test_the_update_bumps_the_running_statistics_versions_as_an_in_place_aten_op_does():
    """fused_resnet.warmup restores what changed by version; autograd checks saved tensors by it."""
    running_mean, running_var = torch.rand(4), torch.rand(4)
    before = running_mean._version, running_var._version
    kernels_for("cpu").update_running_stats(running_mean, running_var, torch.rand(4), torch.rand(4), 0.1, 4)
    assert running_mean._version > before[0] and running_var._version > before[1]
