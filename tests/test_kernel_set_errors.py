"""The compiled ops' argument checks (csrc/checks.h, shared by the CPU and CUDA implementations): every bad argument
is refused with a message that names the op and the argument, the same message on CPU and CUDA tensors; CUDA
tensors' devices are checked too; and a build where a CUDA toolkit is present has registered the CUDA kernels.

The Triton ops trust their arguments by design (the public op layer validates them before any kernel set runs)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from kernel_cases import COMPILED_SETS, kernel_set_params, kernels  # noqa: F401 (a fixture)

OPS = ("batch_stats", "bn_act", "bn_act_backward_reduce", "bn_act_backward_elemt")


def _cuda_toolkit_present() -> bool:
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))


@pytest.mark.skipif(not _cuda_toolkit_present(), reason="no CUDA toolkit (no nvcc on PATH, CUDA_HOME unset)")
@pytest.mark.skipif(os.environ.get("FUSED_RESNET_BUILD_CUDA") == "0",
                    reason="FUSED_RESNET_BUILD_CUDA=0 asks for a CPU-only build")
def test_cuda_kernels_built_and_registered():
    """Runs wherever a CUDA toolkit is present, GPU or not, and fails if the build dropped the CUDA kernels."""
    import fused_resnet._C as _C

    assert _C.built_with_cuda, (
        "a CUDA toolkit is present but fused_resnet._C was built without the CUDA kernels "
        "(see the 'fused_resnet setup:' lines of the build log)")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


# (op, its arguments from x: a (2, 16, 4, 4) input, v: 16 ones, r: an option A residual for x, and the start of the
# message). Built on the kernel set's device by _arguments.
ARGUMENT_ERRORS = {
    "input_not_4d": ("bn_act", lambda x, v, r: (x[0], v, v, v, None, None, None, None, True),
                     "fused_resnet::bn_act: expected input to be 4-D"),
    "input_not_floating": ("bn_act", lambda x, v, r: (x.int(), v, v, v, None, None, None, None, True),
                           "fused_resnet::bn_act: expected input to be a floating-point tensor"),
    "input_empty": ("bn_act", lambda x, v, r: (x[:, :0], v[:0], v[:0], v[:0], None, None, None, None, True),
                    "fused_resnet::bn_act: expected a non-empty input"),
    "mean_size": ("bn_act", lambda x, v, r: (x, v[:3], v, v, None, None, None, None, True),
                  "fused_resnet::bn_act: expected mean to be a vector of 16"),
    "scale_size": ("bn_act", lambda x, v, r: (x, v, v[:2], v, None, None, None, None, True),
                   "fused_resnet::bn_act: expected scale to be a vector of 16"),
    "shift_size": ("bn_act", lambda x, v, r: (x, v, v, v[:15], None, None, None, None, True),
                   "fused_resnet::bn_act: expected shift to be a vector of 16"),
    "residual_dtype": ("bn_act", lambda x, v, r: (x, v, v, v, x.half(), None, None, None, True),
                       "fused_resnet::bn_act: expected residual of dtype"),
    "residual_batch": ("bn_act", lambda x, v, r: (x, v, v, v, x[:1], None, None, None, True),
                       "fused_resnet::bn_act: expected residual of shape"),
    "residual_width": ("bn_act", lambda x, v, r: (x, v, v, v, x[..., :3], None, None, None, True),
                       "fused_resnet::bn_act: expected residual of shape"),
    "residual_affine_half": ("bn_act", lambda x, v, r: (x, v, v, v, x, None, v, None, True),
                             "residual_scale and residual_shift must be given together"),
    "residual_affine_alone": ("bn_act", lambda x, v, r: (x, v, v, v, None, None, v, v, True),
                              "residual_scale given without a residual"),
    "residual_mean_alone": ("bn_act", lambda x, v, r: (x, v, v, v, x, v, None, None, True),
                            "residual_mean given without residual_scale and residual_shift"),
    "residual_mean_size": ("bn_act", lambda x, v, r: (x, v, v, v, x, v[:15], v, v, True),
                           "fused_resnet::bn_act: expected residual_mean to be a vector of 16"),
    "padded_residual_channels": ("bn_act", lambda x, v, r: (x, v, v, v, r, None, None, None, True, 2, 10),
                                 "a residual of 8 channels at residual_channel_offset 10 does not fit"),
    "padded_residual_size": ("bn_act",
                             lambda x, v, r: (x, v, v, v, r.new_ones(2, 8, 10, 8), None, None, None, True, 2, 4),
                             "subsampled by 2 does not match the input of shape [2, 16, 4, 4]"),
    "padded_residual_affine": ("bn_act", lambda x, v, r: (x, v, v, v, r, None, v, v, True, 2, 4),
                               "takes no residual_scale"),
    "stats_input_not_4d": ("batch_stats", lambda x, v, r: (x.view(2, 16, 16),),
                           "fused_resnet::batch_stats: expected input to be 4-D"),
    "stats_input_not_floating": ("batch_stats", lambda x, v, r: (x.int(),),
                                 "fused_resnet::batch_stats: expected input to be a floating-point"),
    "stats_input_empty": ("batch_stats", lambda x, v, r: (x[:0],),
                          "fused_resnet::batch_stats: expected a non-empty input"),
    "reduce_second_half": ("bn_act_backward_reduce", lambda x, v, r: (x, None, x, v, x, None),
                           "input2 and mean2 must be given together"),
    "reduce_grad_dtype": ("bn_act_backward_reduce", lambda x, v, r: (x.double(), None, x, v, None, None),
                          "fused_resnet::bn_act_backward_reduce: expected grad_output of dtype"),
    "reduce_mean_shape": ("bn_act_backward_reduce", lambda x, v, r: (x, x, x, v.view(16, 1), None, None),
                          "fused_resnet::bn_act_backward_reduce: expected mean to be a vector of 16"),
    "elemt_second_partial": ("bn_act_backward_elemt", lambda x, v, r: (x, None, x, v, v, v, v, x, v, v, v, None, False),
                             "input2, mean2 and the coef2_* tensors must be given together"),
    "elemt_second_and_residual": ("bn_act_backward_elemt",
                                  lambda x, v, r: (x, None, x, v, v, v, v, x, v, v, v, v, True),
                                  "residual_grad and input2 are exclusive"),
    "elemt_output_shape": ("bn_act_backward_elemt",
                           lambda x, v, r: (x, x[:, :2], x, v, v, v, v, None, None, None, None, None, False),
                           "fused_resnet::bn_act_backward_elemt: expected output of shape"),
    # The mask from the input: mask_scale with mask_shift, per-channel vectors, never with output.
    "reduce_mask_scale_alone": ("bn_act_backward_reduce", lambda x, v, r: (x, None, x, v, None, None, v, None),
                                "fused_resnet::bn_act_backward_reduce: mask_scale and mask_shift must be given "
                                "together"),
    "reduce_mask_and_output": ("bn_act_backward_reduce", lambda x, v, r: (x, x, x, v, None, None, v, v),
                               "fused_resnet::bn_act_backward_reduce: output and mask_scale/mask_shift are exclusive"),
    "reduce_mask_shift_size": ("bn_act_backward_reduce", lambda x, v, r: (x, None, x, v, None, None, v, v[:15]),
                               "fused_resnet::bn_act_backward_reduce: expected mask_shift to be a vector of 16"),
    "elemt_mask_shift_alone": ("bn_act_backward_elemt",
                               lambda x, v, r: (x, None, x, v, v, v, v, None, None, None, None, None, False, None, v),
                               "fused_resnet::bn_act_backward_elemt: mask_scale and mask_shift must be given together"),
    "elemt_mask_and_output": ("bn_act_backward_elemt",
                              lambda x, v, r: (x, x, x, v, v, v, v, None, None, None, None, None, True, v, v),
                              "fused_resnet::bn_act_backward_elemt: output and mask_scale/mask_shift are exclusive"),
    "elemt_mask_scale_not_floating": ("bn_act_backward_elemt",
                                      lambda x, v, r: (x, None, x, v, v, v, v, None, None, None, None, None, False,
                                                       v.int(), v),
                                      "fused_resnet::bn_act_backward_elemt: expected mask_scale to be floating-point"),
}


def _arguments(case: str, device) -> tuple[str, tuple]:
    op, make, _ = ARGUMENT_ERRORS[case]
    x, r = torch.randn(2, 16, 4, 4, device=device), torch.randn(2, 8, 8, 8, device=device)
    return op, make(x, torch.ones(16, device=device), r)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
@pytest.mark.parametrize("kernels", kernel_set_params(COMPILED_SETS), indirect=True)
def test_compiled_ops_reject_bad_arguments_naming_them(kernels, case):
    op, args = _arguments(case, kernels.device)
    with pytest.raises(RuntimeError, match=re.escape(ARGUMENT_ERRORS[case][2])) as info:
        getattr(kernels.ops, op)(*args)
    if kernels.device != "cpu":  # the same message as the CPU op's on the same values
        with pytest.raises(RuntimeError) as on_cpu:
            getattr(kernels.ops, op)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        assert _first_line(info.value) == _first_line(on_cpu.value)


@pytest.mark.parametrize("kernels", kernel_set_params(["cuda"]), indirect=True)
def test_tensors_on_other_devices_are_rejected(kernels):
    ops = kernels.ops
    x = torch.randn(2, 3, 4, 4, device="cuda")
    v = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected scale on cuda:0, got cpu"):
        ops.bn_act(x, v, v.cpu(), v, None, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected residual on cuda:0, got cpu"):
        ops.bn_act(x, v, v, v, x.cpu(), None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected input on a CUDA device, got cpu"):
        ops.bn_act(x.cpu(), v, v, v, None, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_reduce: expected mean on cuda:0, got cpu"):
        ops.bn_act_backward_reduce(x, None, x, v.cpu(), None, None)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_elemt: expected coef2_const on cuda:0"):
        ops.bn_act_backward_elemt(x, None, x, v, v, v, v, x, v, v, v, v.cpu(), False)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_reduce: expected mask_scale on cuda:0"):
        ops.bn_act_backward_reduce(x, None, x, v, None, None, v.cpu(), v)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_elemt: expected mask_shift on cuda:0"):
        ops.bn_act_backward_elemt(x, None, x, v, v, v, v, None, None, None, None, None, False, v, v.cpu())
