"""Bad input gets a clear error naming the argument, what was expected and what came, and changes nothing:
no running statistic, num_batches_tracked or parameter moves when a call fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import ALL_BACKENDS, randomize_batchnorms
from fused_resnet import ZeroPadIdentity, ops, use_backend
from fused_resnet.modules import conv_bn


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a failed call"


def downsample(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


CASES = [
    # (description, block factory, input factory, exception type, message pattern)
    ("rank", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(4, 5, 5),
     ValueError, r"residual_block: expected x to be 4-D \(N, C, H, W\), got a torch.float32 tensor of shape \[4, 5, 5\]"),
    ("channels", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 3, 5, 5),
     ValueError, r"conv1/bn1.weight of shape \[4, 4, 3, 3\] with groups=1 expects an input with 4 channels, got one of shape \[2, 3, 5, 5\]"),
    ("dtype", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64),
     TypeError, r"expected conv1/bn1.weight of dtype torch.float64 like the input, got a torch.float32 tensor"),
    ("device", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 4, 5, 5, device="meta"),
     RuntimeError, r"expected conv1/bn1.weight on meta like the input, got a torch.float32 tensor of shape \[4, 4, 3, 3\] on cpu"),
    ("integer input", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.ones(2, 4, 5, 5, dtype=torch.int64),
     TypeError, r"expected x to be floating-point, got a torch.int64 tensor"),
    ("empty batch", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(0, 4, 5, 5),
     ValueError, r"expected a non-empty x, got a torch.float32 tensor of shape \[0, 4, 5, 5\]"),
    ("one value per channel", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(1, 4, 1, 1),
     ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 4, 1, 1\]\)"),
    ("one value per channel in the downsample", lambda: fused_resnet.BasicBlock(4, 8, 2, downsample(4, 8)),
     lambda: torch.randn(1, 4, 2, 1), ValueError, r"Expected more than 1 value per channel when training"),
    ("empty conv output", lambda: fused_resnet.ConvBNReLU(4, 4, kernel_size=5, padding=0),
     lambda: torch.randn(2, 4, 3, 3), ValueError, r"conv_bn_relu: 0/1 \(kernel \[5, 5\], stride \[1, 1\], padding \[0, 0\], dilation \[1, 1\]\) on an input of shape \[2, 4, 3, 3\] gives an empty output \(-1x-1\)"),
    ("identity shortcut shape", lambda: fused_resnet.BasicBlock(4, 8), lambda: torch.randn(2, 4, 5, 5),
     ValueError, r"an identity shortcut needs the block's output shape \[2, 8, 5, 5\] to equal its input's \[2, 4, 5, 5\]"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(backend, case):
    _, make_block, make_input, error, pattern = case
    block = make_block().train()
    before = snapshot(block)
    with use_backend(backend), pytest.raises(error, match=pattern):
        block(make_input())
    assert_unchanged(block, before)


def test_one_value_per_channel_message_is_pytorchs():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError) as theirs:
        bn(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError) as ours:
        ops.batch_norm_act(torch.randn(1, 4, 1, 1), None, None, training=True)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_norm_act_rejects_mismatched_arguments(backend):
    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"batch_norm_act: expected weight to hold 4 per-channel values, got a torch.float32 tensor of shape \[5\]"):
            ops.batch_norm_act(x, rm, rv, torch.ones(5), torch.zeros(4))
        with pytest.raises(ValueError, match=r"expected residual of shape \[2, 4, 3, 3\] like input, got \[2, 4, 3, 2\]"):
            ops.batch_norm_act(x, rm, rv, residual=torch.randn(2, 4, 3, 2))
        with pytest.raises(TypeError, match="expected residual of dtype torch.float32 like input"):
            ops.batch_norm_act(x, rm, rv, residual=x.double())
        with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
            ops.batch_norm_act(x, None, None, training=False)
        with pytest.raises(ValueError, match="expected eps > 0, got 0"):
            ops.batch_norm_act(x, rm, rv, eps=0.0)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_unavailable_backend_changes_nothing():
    if fused_resnet.backend_status()["triton"] == "available":
        pytest.skip("triton is available here")
    block = fused_resnet.Bottleneck(16, 4, 2, downsample(16, 16)).train()
    before = snapshot(block)
    with use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        block(torch.randn(2, 16, 6, 6))
    assert_unchanged(block, before)


def test_convert_and_unfused_modules_reject_non_modules():
    with pytest.raises(TypeError, match="convert: expected a torch.nn.Module, got str"):
        fused_resnet.convert("resnet50")
    with pytest.raises(TypeError, match="unfused_modules: expected a torch.nn.Module, got int"):
        fused_resnet.unfused_modules(3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_any_strided_input_is_read_correctly(backend):
    """A non-contiguous view (a slice, a permutation that is neither NCHW nor channels_last) gives the same result
    as its contiguous copy."""
    block = fused_resnet.BasicBlock(6, 6).double()
    reference = copy.deepcopy(block)
    base = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    views = [base[:, 1:7], base.permute(0, 1, 3, 2)[:, :6], base[:, :6, ::2, :]]
    for view in views:
        with use_backend(backend):
            out = block(view)
        with use_backend("torch"):
            expected = reference(view.contiguous())
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The ops, argument by argument. Each case builds fresh tensors, names the ones a failed call must leave as they
# were, and makes the call.


def bn_buffers(channels=4, dtype=torch.float32):
    return torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.5


def bn_act_case(**overrides):
    """A batch_norm_act call on (2, 4, 3, 3) with random BN tensors, `overrides` replacing arguments."""

    def make():
        running_mean, running_var = bn_buffers()
        args = dict(input=torch.randn(2, 4, 3, 3), running_mean=running_mean, running_var=running_var,
                    weight=torch.rand(4) + 0.5, bias=torch.randn(4), training=True, momentum=0.1, eps=1e-5)
        args.update({k: v() if callable(v) else v for k, v in overrides.items()})
        watched = [t for t in args.values() if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        return (lambda backend: ops.batch_norm_act(**args, backend=backend)), watched

    return make


def unit(name, cin, cout, dtype=torch.float32, **conv_options):
    conv = nn.Conv2d(cin, cout, conv_options.pop("kernel_size", 3), padding=conv_options.pop("padding", 1), bias=False,
                     **conv_options).to(dtype)
    bn = nn.BatchNorm2d(cout).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(cout))
        bn.running_var.copy_(torch.rand(cout) + 0.5)
    return conv, bn, name


def block_case(edit=None, x=lambda: torch.randn(2, 4, 5, 5), shortcut="identity", op="residual_block"):
    """A two-unit residual_block (or a one-unit conv_bn_relu) on fresh modules; `edit` turns the list of ConvBN
    units (and modules) into the bad arguments."""

    def make():
        modules = [unit("conv1/bn1", 4, 4), unit("conv2/bn2", 4, 4)]
        units = [conv_bn(conv, bn, name) for conv, bn, name in modules]
        if edit is not None:
            units = edit(units, modules)
        watched = [t for conv, bn, _ in modules for m in (conv, bn) for t in (*m.parameters(), *m.buffers())]
        if op == "conv_bn_relu":
            return (lambda backend: ops.conv_bn_relu(x(), units, backend=backend)), watched
        return (lambda backend: ops.residual_block(x(), units, shortcut, backend=backend)), watched

    return make


def replace_conv(i, **fields):
    return lambda units, _: [u._replace(conv=u.conv._replace(**fields)) if j == i else u for j, u in enumerate(units)]


def replace_bn(i, **fields):
    return lambda units, _: [u._replace(bn=u.bn._replace(**fields)) if j == i else u for j, u in enumerate(units)]


def second_running_var_requires_grad(units, modules):
    return [units[0], units[1]._replace(bn=units[1].bn._replace(running_var=units[1].bn.running_var.clone()
                                                                    .requires_grad_()))]


def fp64_batch_norm(units, modules):
    bn = nn.BatchNorm2d(4).double()
    return [units[0]._replace(bn=units[0].bn._replace(weight=bn.weight, bias=bn.bias)), units[1]]


OP_CASES = [
    # (description, case factory, exception type, message pattern)
    ("running stats in another dtype", bn_act_case(running_mean=lambda: torch.zeros(4, dtype=torch.float64)),
     TypeError, r"batch_norm_act: expected running_mean of dtype torch.float32 like the input \(or torch.float32 for "
                r"a float16 or bfloat16 input\), got a torch.float64 tensor of shape \[4\] on cpu"),
    ("bf16 weight for an fp32 input", bn_act_case(weight=lambda: torch.ones(4, dtype=torch.bfloat16)),
     TypeError, r"expected weight of dtype torch.float32 like the input .*got a torch.bfloat16 tensor of shape \[4\]"),
    ("integer running_mean", bn_act_case(running_mean=lambda: torch.zeros(4, dtype=torch.int64)),
     TypeError, r"expected running_mean to be floating-point, got a torch.int64 tensor of shape \[4\] on cpu"),
    ("running_var on another device", bn_act_case(running_var=lambda: torch.ones(4, device="meta")),
     RuntimeError, r"expected running_var on cpu like the input, got a torch.float32 tensor of shape \[4\] on meta"),
    ("bias of the wrong length", bn_act_case(bias=lambda: torch.zeros(3)),
     ValueError, r"expected bias to hold 4 per-channel values, got a torch.float32 tensor of shape \[3\]"),
    ("residual on another device", bn_act_case(residual=lambda: torch.randn(2, 4, 3, 3, device="meta")),
     RuntimeError, r"expected residual on cpu like input, got a torch.float32 tensor of shape \[2, 4, 3, 3\] on meta"),
    ("residual that is not a tensor", bn_act_case(residual=[1.0]),
     TypeError, r"batch_norm_act: expected residual to be a Tensor, got list"),
    ("input that is not a tensor", bn_act_case(input=[[1.0]]), TypeError, r"expected input to be a Tensor, got list"),
    ("5-D input", bn_act_case(input=lambda: torch.randn(1, 2, 4, 3, 3)),
     ValueError, r"expected input to be 4-D \(N, C, H, W\), got a torch.float32 tensor of shape \[1, 2, 4, 3, 3\]"),
    ("NaN eps", bn_act_case(eps=float("nan")), ValueError, r"expected eps > 0, got nan"),
    ("eps None", bn_act_case(eps=None), ValueError, r"expected eps > 0, got None"),
    ("momentum a string", bn_act_case(momentum="0.1"),
     TypeError, r"expected momentum to be a number or None, got str"),
    ("momentum None without num_batches_tracked", bn_act_case(momentum=None),
     ValueError, r"expected a number for momentum: momentum=None \(a cumulative average\) needs num_batches_tracked"),
    ("training not a bool", bn_act_case(training="yes"), TypeError, r"expected training to be a bool, got str"),
    ("running_mean requiring grad", bn_act_case(running_mean=lambda: torch.zeros(4, requires_grad=True)),
     ValueError, r"expected running_mean not to require grad"),
    ("units a single ConvBN", block_case(lambda units, _: units[0]),
     TypeError, r"residual_block: expected units to be a sequence of ConvBN, got a ConvBN"),
    ("a unit that is a plain tuple", block_case(lambda units, _: [tuple(units[0])]),
     TypeError, r"expected units\[0\] to be a ConvBN\(conv, bn, name\), got tuple"),
    ("stride 0", block_case(replace_conv(0, stride=(0, 1))),
     ValueError, r"expected conv1/bn1.stride to be a pair of integers >= 1, got \(0, 1\)"),
    ("negative padding", block_case(replace_conv(1, padding=(-1, 1))),
     ValueError, r"expected conv2/bn2.padding to be a pair of integers >= 0, got \(-1, 1\)"),
    ("dilation 0", block_case(replace_conv(0, dilation=(1, 0))),
     ValueError, r"expected conv1/bn1.dilation to be a pair of integers >= 1, got \(1, 0\)"),
    ("stride an int", block_case(replace_conv(0, stride=1)),
     ValueError, r"expected conv1/bn1.stride to be a pair of integers >= 1, got 1"),
    ("groups not dividing the channels", block_case(replace_conv(0, groups=3)),
     ValueError, r"conv1/bn1 has groups=3, which must divide its input channels \(4\) and output channels \(4\)"),
    ("3-D conv weight", block_case(replace_conv(1, weight=torch.randn(4, 4, 3))),
     ValueError, r"expected conv2/bn2.weight to be 4-D \(out, in/groups, kh, kw\), got a torch.float32 tensor"),
    ("conv bias in another dtype", block_case(replace_conv(0, bias=torch.zeros(4, dtype=torch.float64))),
     TypeError, r"expected conv1/bn1.bias of dtype torch.float32 like the input, got a torch.float64 tensor"),
    ("BatchNorm in float64 after an fp32 conv", block_case(fp64_batch_norm),
     TypeError, r"expected conv1/bn1.weight of dtype torch.float32 like the input .*got a torch.float64 tensor of "
                r"shape \[4\]"),
    # The second unit's problems must be found before the first unit's running statistics move.
    ("second unit: momentum None without num_batches_tracked",
     block_case(replace_bn(1, momentum=None, num_batches_tracked=None)),
     ValueError, r"expected a number for conv2/bn2.momentum: momentum=None \(a cumulative average\) needs "
                 r"conv2/bn2.num_batches_tracked"),
    ("second unit: running_var requiring grad", block_case(second_running_var_requires_grad),
     ValueError, r"expected conv2/bn2.running_var not to require grad"),
    ("second unit: eps 0", block_case(replace_bn(1, eps=0.0)), ValueError, r"expected conv2/bn2.eps > 0, got 0.0"),
    ("integer x", block_case(x=lambda: torch.ones(2, 4, 5, 5, dtype=torch.int32)),
     TypeError, r"expected x to be floating-point, got a torch.int32 tensor of shape \[2, 4, 5, 5\] on cpu"),
    ("x with zero channels", block_case(x=lambda: torch.randn(2, 0, 5, 5)),
     ValueError, r"expected a non-empty x, got a torch.float32 tensor of shape \[2, 0, 5, 5\]"),
    ("x with no pixels", block_case(x=lambda: torch.randn(2, 4, 0, 5)),
     ValueError, r"expected a non-empty x, got a torch.float32 tensor of shape \[2, 4, 0, 5\]"),
    ("shortcut of an unknown kind", block_case(shortcut="projection"),
     ValueError, r"expected shortcut to be 'identity', a ConvBN projection, a ZeroPadIdentity or None, got 'projection'"),
    ("projection of the wrong shape",
     block_case(shortcut=conv_bn(*unit("downsample.0/downsample.1", 4, 4, kernel_size=1, padding=0, stride=2))),
     ValueError, r"the projection shortcut's output shape \[2, 4, 3, 3\] differs from the block's \[2, 4, 5, 5\]"),
    ("zero-padded identity that does not fit", block_case(shortcut=ZeroPadIdentity(1, 2)),
     ValueError, r"a zero-padded identity shortcut \(stride 1, 2 zero channels before\) cannot take the input of "
                 r"shape \[2, 4, 5, 5\] to the block's output shape \[2, 4, 5, 5\]"),
    ("conv_bn_relu given a list", block_case(lambda units, _: units, op="conv_bn_relu"),
     TypeError, r"conv_bn_relu: expected units\[0\]|conv_bn_relu: expected units to be"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_ops_reject_bad_arguments_and_change_nothing(backend, case):
    _, make, error, pattern = case
    call, watched = make()
    before = [t.detach().clone() for t in watched]
    with pytest.raises(error, match=pattern):
        call(backend)
    for i, (t, old) in enumerate(zip(watched, before)):
        assert torch.equal(t.detach(), old), f"tensor {i} of shape {tuple(t.shape)} changed by a failed call"


@pytest.mark.parametrize("name, error, pattern", [
    ("gpu", ValueError, r"backend argument: unknown backend 'gpu'; expected one of auto, torch, cpu, cuda, triton"),
    ("cuda", RuntimeError, r"fused_resnet backend 'cuda' (is not available|runs on cuda tensors, but the input is on cpu)"),
])
def test_a_backend_that_cannot_run_is_named_and_changes_nothing(name, error, pattern):
    call, watched = bn_act_case()()
    before = [t.clone() for t in watched]
    with pytest.raises(error, match=pattern):
        call(name)
    assert all(torch.equal(t, old) for t, old in zip(watched, before))


def partially_converted_basic_block():
    block = fused_resnet.BasicBlock(4, 4)
    block.bn1.double()
    return block


MODULE_CASES = [
    ("Bottleneck: input channels", lambda: fused_resnet.Bottleneck(16, 4), lambda: torch.randn(2, 8, 5, 5),
     ValueError, r"conv1/bn1.weight of shape \[4, 16, 1, 1\] with groups=1 expects an input with 16 channels, "
                 r"got one of shape \[2, 8, 5, 5\]"),
    ("Bottleneck: bf16 channels_last input, fp32 module", lambda: fused_resnet.Bottleneck(16, 4),
     lambda: torch.randn(2, 16, 5, 5).to(torch.bfloat16, memory_format=torch.channels_last),
     TypeError, r"expected conv1/bn1.weight of dtype torch.bfloat16 like the input, got a torch.float32 tensor"),
    ("Bottleneck: empty batch", lambda: fused_resnet.Bottleneck(16, 4), lambda: torch.randn(0, 16, 5, 5),
     ValueError, r"expected a non-empty x, got a torch.float32 tensor of shape \[0, 16, 5, 5\]"),
    ("BasicBlock: BatchNorm alone converted to float64", partially_converted_basic_block,
     lambda: torch.randn(2, 4, 5, 5),
     TypeError, r"expected conv1/bn1.weight of dtype torch.float32 like the input .*got a torch.float64 tensor of "
                r"shape \[4\]"),
    ("ConvBNReLU: float64 input", lambda: fused_resnet.ConvBNReLU(3, 8), lambda: torch.randn(2, 3, 5, 5).double(),
     TypeError, r"conv_bn_relu: expected 0/1.weight of dtype torch.float64 like the input, got a torch.float32"),
    ("ConvBNReLU: one value per channel", lambda: fused_resnet.ConvBNReLU(3, 8, kernel_size=1),
     lambda: torch.randn(1, 3, 1, 1),
     ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 8, 1, 1\]\)"),
    ("ConvBNReLU: 3-D input", lambda: fused_resnet.ConvBNReLU(3, 8), lambda: torch.randn(3, 5, 5),
     ValueError, r"conv_bn_relu: expected x to be 4-D \(N, C, H, W\), got a torch.float32 tensor of shape \[3, 5, 5\]"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_modules_reject_bad_inputs_and_change_nothing(backend, case):
    _, make_module, make_input, error, pattern = case
    module = make_module().train()
    before = snapshot(module)
    with use_backend(backend), pytest.raises(error, match=pattern):
        module(make_input())
    assert_unchanged(module, before)


def test_convert_names_what_it_got():
    with pytest.raises(TypeError, match="convert: expected a torch.nn.Module, got NoneType"):
        fused_resnet.convert(None)
    with pytest.raises(TypeError, match="convert: expected a torch.nn.Module instance, got the class Linear: "
                                        "instantiate it first"):
        fused_resnet.convert(nn.Linear)
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.raises(TypeError, match="convert: expected an eager torch.nn.Module, got a TorchScript"):
        fused_resnet.convert(scripted)


# ---------------------------------------------------------------------------------------------------------------
# Strided inputs: read correctly (outputs, every gradient, running statistics) whatever their strides.

STRIDED_VIEWS = {
    "channel slice": (lambda base: base[:, 1:5], (2, 6, 5, 7)),
    "every other column": (lambda base: base[..., ::2], (2, 4, 5, 14)),
    "transposed H/W": (lambda base: base.transpose(2, 3), (2, 4, 7, 5)),
    "channels_last transposed": (lambda base: base.permute(0, 3, 1, 2), (2, 5, 7, 4)),
    "broadcast batch": (lambda base: base.expand(3, -1, -1, -1), (1, 4, 5, 7)),
    "broadcast pixels": (lambda base: base.expand(-1, -1, 5, 7), (2, 4, 1, 1)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("view", list(STRIDED_VIEWS))
@pytest.mark.parametrize("training", [True, False])
def test_strided_inputs_match_the_reference_with_gradients(backend, view, training):
    take, base_shape = STRIDED_VIEWS[view]
    block = randomize_batchnorms(fused_resnet.BasicBlock(4, 8, shortcut="A")).double().train(training)
    reference_block = copy.deepcopy(block)
    base = torch.randn(base_shape, dtype=torch.float64)
    residual_base = torch.randn(base_shape, dtype=torch.float64)
    rm, rv = bn_buffers(dtype=torch.float64)

    def step(block, which):
        leaves = [base.clone().requires_grad_(), residual_base.clone().requires_grad_()]
        running = [rm.clone(), rv.clone()]
        with use_backend(which):
            out = block(take(leaves[0]))
            bn_out = ops.batch_norm_act(take(leaves[0]), *running, training=training, residual=take(leaves[1]))
        (out.square().sum() + (bn_out * torch.arange(bn_out.numel()).view(bn_out.shape)).sum()).backward()
        return [out, bn_out, *(t.grad for t in leaves), *running,
                *(p.grad for p in block.parameters()), *block.buffers()]

    ours, expected = step(block, backend), step(reference_block, "torch")
    for i, (a, e) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"tensor {i}: {m}")
