"""The fused ops (fused_resnet.ops) on every CPU backend against the reference composite: outputs, every gradient,
running statistics and num_batches_tracked; train, eval with gradients, and inference (folded BatchNorm)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS, assert_rel, randomize_batchnorms, to_layout
from fused_resnet import ops, reference, use_backend
from fused_resnet.kernels import kernels_for
from fused_resnet.modules import conv_bn
from fused_resnet.params import BatchNormParams, ZeroPadIdentity

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no fused backend runs on the CPU here")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# gradcheck's finite differences step over a ReLU kink when a pre-activation lies within eps of zero (with the
# default 1e-6 about one draw in ten failed); in float64 a step of 1e-8 still leaves differences exact to ~1e-8.
KINK_SAFE_EPS = 1e-8


# ---------------------------------------------------------------------------------------------------------------
# batch_norm_act


def bn_module(channels, dtype, affine=True, track=True, momentum=0.1):
    bn = nn.BatchNorm2d(channels, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    return randomize_batchnorms(bn)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_act_matches_reference(backend, dtype, training, residual, relu, channels_last, affine):
    shape = (3, 7, 5, 6)
    bn = bn_module(7, dtype, affine=affine)
    bn_ref = copy.deepcopy(bn)
    x = to_layout(torch.randn(shape, dtype=dtype) * 2 + 0.5, channels_last)
    r = to_layout(torch.randn(shape, dtype=dtype), channels_last) if residual else None
    g = torch.randn(shape, dtype=dtype)

    def run(module, fn):
        xi = x.clone().requires_grad_()
        ri = r.clone().requires_grad_() if r is not None else None
        out = fn(xi, module, ri)
        out.backward(g)
        return out, xi.grad, ri.grad if ri is not None else None

    out, gx, gr = run(bn, lambda xi, m, ri: ops.batch_norm_act(
        xi, m.running_mean, m.running_var, m.weight, m.bias, training, 0.1, m.eps, ri, relu, backend=backend))
    ref, rgx, rgr = run(bn_ref, lambda xi, m, ri: reference.batch_norm_act(
        xi, BatchNormParams(m.weight, m.bias, m.running_mean, m.running_var, None, 0.1, m.eps, training), ri, relu))
    tol = TOL[dtype]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_rel(out, ref, tol, "output")
    assert_rel(gx, rgx, tol, "grad input")
    if residual:
        assert_rel(gr, rgr, tol, "grad residual")
    if affine:
        assert_rel(bn.weight.grad, bn_ref.weight.grad, tol, "grad weight")
        assert_rel(bn.bias.grad, bn_ref.bias.grad, tol, "grad bias")
    assert_rel(bn.running_mean, bn_ref.running_mean, tol, "running_mean")
    assert_rel(bn.running_var, bn_ref.running_var, tol, "running_var")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_norm_act_without_running_stats_uses_batch_stats(backend):
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    out = ops.batch_norm_act(x, None, None, training=True, backend=backend)
    ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert_rel(out, ref, 1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_gradcheck(backend, training):
    bn = bn_module(3, torch.float64)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    weight, bias = bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()
    fn = lambda x, w, b, r: ops.batch_norm_act(x, bn.running_mean, bn.running_var, w, b, training, 0.1, 1e-5, r,
                                                backend=backend)
    assert torch.autograd.gradcheck(fn, (x, weight, bias, r), eps=KINK_SAFE_EPS)


# ---------------------------------------------------------------------------------------------------------------
# residual_block and conv_bn_relu

@dataclasses.dataclass
class BlockSpec:
    """A block: per unit (in, out, kernel, stride, padding, dilation, groups, conv bias); and the shortcut."""

    units: list[tuple]
    shortcut: str  # "identity", "projection" or "none"
    in_channels: int
    hw: tuple[int, int]


SPECS = {
    "basic": BlockSpec([(8, 8, 3, 1, 1, 1, 1, False), (8, 8, 3, 1, 1, 1, 1, False)], "identity", 8, (7, 9)),
    "basic-down": BlockSpec([(6, 10, 3, 2, 1, 1, 1, False), (10, 10, 3, 1, 1, 1, 1, False)], "projection", 6, (9, 7)),
    "bottleneck": BlockSpec([(12, 5, 1, 1, 0, 1, 1, False), (5, 5, 3, 1, 1, 1, 1, False), (5, 12, 1, 1, 0, 1, 1, False)],
                            "identity", 12, (6, 5)),
    "bottleneck-down-grouped": BlockSpec(
        [(6, 8, 1, 1, 0, 1, 1, False), (8, 8, 3, 2, 1, 1, 4, False), (8, 16, 1, 1, 0, 1, 1, False)], "projection", 6, (9, 8)),
    "dilated": BlockSpec([(4, 4, 3, 1, 2, 2, 1, False), (4, 4, 3, 1, 2, 2, 1, False)], "identity", 4, (8, 8)),
    "plain-with-bias": BlockSpec([(3, 7, 3, 1, 1, 1, 1, True), (7, 5, 3, 1, 1, 1, 1, True)], "none", 3, (6, 6)),
    "stem-7x7": BlockSpec([(3, 8, 7, 2, 3, 1, 1, False)], "none", 3, (17, 15)),
    "option-A": BlockSpec([(6, 12, 3, 2, 1, 1, 1, False), (12, 12, 3, 1, 1, 1, 1, False)], "A", 6, (9, 8)),
}


def build(spec: BlockSpec, dtype, momentum=0.1, affine=True, track=True):
    pairs = []
    for cin, cout, k, s, p, d, g, bias in spec.units:
        pairs.append((nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).to(dtype),
                      bn_module(cout, dtype, affine=affine, track=track, momentum=momentum)))
    shortcut = None
    if spec.shortcut == "projection":
        stride = spec.units[0][3] * spec.units[1][3] * (spec.units[2][3] if len(spec.units) > 2 else 1)
        shortcut = (nn.Conv2d(spec.in_channels, spec.units[-1][1], 1, stride, bias=False).to(dtype),
                    bn_module(spec.units[-1][1], dtype, affine=affine, track=track, momentum=momentum))
    return pairs, shortcut


def call_block(x, pairs, shortcut, spec, training, backend):
    for conv, bn in pairs + ([shortcut] if shortcut else []):
        bn.train(training)
    units = [conv_bn(c, b, f"unit{i}") for i, (c, b) in enumerate(pairs)]
    sc = conv_bn(*shortcut, "shortcut") if shortcut else {
        "identity": "identity", "A": ZeroPadIdentity.between(spec.in_channels, spec.units[-1][1], spec.units[0][3]),
        "none": None}[spec.shortcut]
    if backend == "reference":
        return reference.residual_block(x, units, sc)
    return ops.residual_block(x, units, sc, backend=backend)


def parameters_of(pairs, shortcut):
    mods = [m for pair in pairs + ([shortcut] if shortcut else []) for m in pair]
    return [p for m in mods for p in m.parameters()], [b for m in mods for b in m.buffers()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["train", "eval-grad", "inference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_block_matches_reference(backend, spec_name, dtype, mode, channels_last):
    spec = SPECS[spec_name]
    pairs, shortcut = build(spec, dtype)
    ref_pairs, ref_shortcut = copy.deepcopy((pairs, shortcut))
    x = to_layout(torch.randn(2, spec.in_channels, *spec.hw, dtype=dtype), channels_last)
    training = mode == "train"

    def run(pairs, shortcut, which):
        xi = x.clone().requires_grad_(mode != "inference")
        with torch.set_grad_enabled(mode != "inference"):
            out = call_block(xi, pairs, shortcut, spec, training, which)
        if mode != "inference":
            out.backward(torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)))
        return out, xi.grad

    out, gx = run(pairs, shortcut, backend)
    ref, rgx = run(ref_pairs, ref_shortcut, "reference")
    tol = TOL[dtype]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_rel(out, ref, tol, "output")
    params, buffers = parameters_of(pairs, shortcut)
    ref_params, ref_buffers = parameters_of(ref_pairs, ref_shortcut)
    if mode != "inference":
        assert_rel(gx, rgx, tol, "grad x")
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            # A conv bias before a training-mode BN has zero gradient in exact arithmetic: judge it absolutely.
            assert_rel(p.grad, rp.grad, tol, f"grad of parameter {i} {tuple(p.shape)}", floor=1.0)
    for i, (b, rb) in enumerate(zip(buffers, ref_buffers)):
        assert_rel(b, rb, tol, f"buffer {i} {tuple(b.shape)}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", ["momentum-none", "no-affine", "no-running-stats"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_block_batchnorm_variants(backend, variant, training):
    kwargs = {"momentum-none": dict(momentum=None), "no-affine": dict(affine=False),
              "no-running-stats": dict(track=False)}[variant]
    spec = SPECS["basic-down"]
    pairs, shortcut = build(spec, torch.float64, **kwargs)
    ref_pairs, ref_shortcut = copy.deepcopy((pairs, shortcut))
    for step in range(3):  # momentum=None averages over num_batches_tracked: several steps tell it apart
        x = torch.randn(3, spec.in_channels, *spec.hw, dtype=torch.float64)
        out = call_block(x.clone().requires_grad_(), pairs, shortcut, spec, training, backend)
        ref = call_block(x.clone().requires_grad_(), ref_pairs, ref_shortcut, spec, training, "reference")
        assert_rel(out, ref, 1e-10, f"output, step {step}")
        out.sum().backward()
        ref.sum().backward()
    params, buffers = parameters_of(pairs, shortcut)
    ref_params, ref_buffers = parameters_of(ref_pairs, ref_shortcut)
    for p, rp in zip(params, ref_params):
        assert_rel(p.grad, rp.grad, 1e-10, "grad")
    for b, rb in zip(buffers, ref_buffers):
        assert torch.allclose(b.double(), rb.double(), rtol=1e-10, atol=1e-12), "buffer"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_parameters_get_no_gradient(backend):
    spec = SPECS["basic-down"]
    pairs, shortcut = build(spec, torch.float64)
    ref_pairs, ref_shortcut = copy.deepcopy((pairs, shortcut))
    for module_pairs in (pairs, ref_pairs):
        module_pairs[0][0].weight.requires_grad_(False)
        module_pairs[1][1].bias.requires_grad_(False)
    x = torch.randn(2, spec.in_channels, *spec.hw, dtype=torch.float64)
    call_block(x, pairs, shortcut, spec, True, backend).sum().backward()
    call_block(x, ref_pairs, ref_shortcut, spec, True, "reference").sum().backward()
    params, _ = parameters_of(pairs, shortcut)
    ref_params, _ = parameters_of(ref_pairs, ref_shortcut)
    for p, rp in zip(params, ref_params):
        assert (p.grad is None) == (rp.grad is None)
        if p.grad is not None:
            assert_rel(p.grad, rp.grad, 1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spec_name", ["basic-down", "bottleneck", "plain-with-bias", "option-A"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_block_gradcheck(backend, spec_name, training):
    spec = SPECS[spec_name]
    pairs, shortcut = build(spec, torch.float64)
    every = pairs + ([shortcut] if shortcut else [])
    tensors = [t.detach().requires_grad_() for conv, bn in every for t in (conv.weight, bn.weight, bn.bias)]
    x = torch.randn(2, spec.in_channels, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *tensors):
        rebuilt = []
        for i, (conv, bn) in enumerate(every):
            unit = conv_bn(conv, bn, f"u{i}")
            rebuilt.append(unit._replace(
                conv=unit.conv._replace(weight=tensors[3 * i]),
                bn=unit.bn._replace(weight=tensors[3 * i + 1], bias=tensors[3 * i + 2], training=training)))
        sc = rebuilt.pop() if shortcut else {
            "identity": "identity", "A": ZeroPadIdentity.between(spec.in_channels, spec.units[-1][1], spec.units[0][3]),
            "none": None}[spec.shortcut]
        return ops.residual_block(x, rebuilt, sc, backend=backend)

    # fast_mode checks the Jacobian along random directions: the full one would take a minute per case here.
    assert torch.autograd.gradcheck(fn, (x, *tensors), eps=KINK_SAFE_EPS, fast_mode=True)


def eval_bottleneck(memory_format=torch.contiguous_format):
    """(conv-BN pairs, their units, an input) of a float32 Bottleneck whose BatchNorms use running statistics."""
    spec = SPECS["bottleneck"]
    pairs, _ = build(spec, torch.float32)
    for _, bn in pairs:
        bn.eval()
    units = [conv_bn(c, b, f"u{i}") for i, (c, b) in enumerate(pairs)]
    return pairs, units, torch.randn(2, spec.in_channels, *spec.hw).contiguous(memory_format=memory_format)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_reuses_folded_weights_until_a_source_changes(backend):
    pairs, units, x = eval_bottleneck()
    cache = ops.FoldedWeights()
    with torch.no_grad():
        first = ops.residual_block(x, units, "identity", folded=cache, backend=backend)
        folded = cache.get(0, units[0])
        assert cache.get(0, units[0])[0] is folded[0], "an unchanged unit must hit the cache"
        pairs[0][1].running_var.mul_(4)  # in place: same tensor, new version
        second = ops.residual_block(x, units, "identity", folded=cache, backend=backend)
    assert cache.get(0, units[0])[0] is not folded[0]
    with torch.no_grad():
        expected = reference.residual_block(x, units, "identity")
    assert_rel(second, expected, 2e-5)
    assert not torch.allclose(first, second)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS or not torch.backends.mkldnn.is_available(),
                    reason="the cpu backend's oneDNN convolutions are not available here")
def test_channels_last_inference_packs_each_folded_weight_once():
    """The cpu backend keeps each folded weight reordered into oneDNN's blocked layout while the weight lives: the
    second call reuses the packed forms, and a refold releases the old ones."""
    pairs, units, x = eval_bottleneck(torch.channels_last)
    cache = ops.FoldedWeights()
    kernels = kernels_for("cpu")
    with torch.no_grad():
        first = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
        packed = [kernels._packed_weights[cache.get(i, u)[0]][1] for i, u in enumerate(units)]
        assert all(p.is_mkldnn for p in packed)
        again = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
        assert all(kernels._packed_weights[cache.get(i, u)[0]][1] is p for i, (u, p) in enumerate(zip(units, packed)))
        old_weight = weakref.ref(cache.get(0, units[0])[0])
        pairs[0][1].running_var.mul_(4)
        changed = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
        gc.collect()
        assert old_weight() is None, "a refold must release the old folded weight and its packed form"
        expected = reference.residual_block(x, units, "identity")
    assert torch.equal(first, again)
    assert_rel(changed, expected, 2e-5)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS or not torch.backends.mkldnn.is_available(),
                    reason="the cpu backend's oneDNN convolutions are not available here")
def test_channels_last_inference_repacks_when_the_thread_count_changes():
    """oneDNN picks a weight's blocked layout for the number of threads; a form packed for another count would be
    reordered again inside every call, so a change of torch.set_num_threads packs anew (and the output holds)."""
    _, units, x = eval_bottleneck(torch.channels_last)
    cache = ops.FoldedWeights()
    kernels = kernels_for("cpu")
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        with torch.no_grad():
            first = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
            packed = [kernels._packed_weights[cache.get(i, u)[0]][1] for i, u in enumerate(units)]
            torch.set_num_threads(other)
            again = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
            repacked = [kernels._packed_weights[cache.get(i, u)[0]][1] for i, u in enumerate(units)]
            still = ops.residual_block(x, units, "identity", folded=cache, backend="cpu")
            kept = [kernels._packed_weights[cache.get(i, u)[0]][1] for i, u in enumerate(units)]
    finally:
        torch.set_num_threads(threads)
    assert all(new is not old for new, old in zip(repacked, packed)), "a new thread count must pack anew"
    assert all(a is b for a, b in zip(kept, repacked)), "an unchanged thread count must reuse the packed form"
    assert_rel(again, first, 1e-5)
    assert torch.equal(again, still)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_context_applies_when_no_argument_is_given(backend):
    spec = SPECS["basic"]
    pairs, _ = build(spec, torch.float64)
    x = torch.randn(2, spec.in_channels, *spec.hw, dtype=torch.float64)
    units = [conv_bn(c, b, f"u{i}") for i, (c, b) in enumerate(pairs)]
    with use_backend(backend):
        out = ops.residual_block(x, units, "identity")
    assert out.grad_fn is not None and "BatchNormActFunction" in type(out.grad_fn).__name__
    with use_backend("torch"):
        out = ops.residual_block(x, units, "identity")
    assert "BatchNormActFunction" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_projection_may_convolve_its_own_input(backend):
    """timm's avg_down: the projection takes `shortcut_input` (here the average-pooled x, pooled by autograd) instead
    of x; outputs, gradients through the pool and running statistics as the reference's. It must be a projection's."""
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    convs = [nn.Conv2d(6, 8, 3, 2, 1, bias=False), nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.Conv2d(6, 8, 1, bias=False)]
    bns = [randomize_batchnorms(nn.BatchNorm2d(8)) for _ in convs]
    ref_modules = copy.deepcopy((convs, bns))
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    outs = []
    for (cs, bs), name in (((convs, bns), backend), (ref_modules, "torch")):
        cs, bs = [c.double() for c in cs], [b.double() for b in bs]
        xi = x.clone().requires_grad_()
        units = [conv_bn(c, b, f"u{i}") for i, (c, b) in enumerate(zip(cs, bs))]
        out = ops.residual_block(xi, units[:2], units[2], shortcut_input=pool(xi), backend=name)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad, [p.grad for c in cs for p in c.parameters()], [b.running_var for b in bs]))
    (out, gx, grads, running), (ref, rgx, rgrads, rrunning) = outs
    assert_rel(out, ref, 1e-12, "output")
    assert_rel(gx, rgx, 1e-12, "grad x")
    for g, rg in zip(grads, rgrads):
        assert_rel(g, rg, 1e-12, "conv grad")
    for r, rr in zip(running, rrunning):
        assert_rel(r, rr, 1e-12, "running_var")
    unit = conv_bn(convs[0], bns[0], "u")
    with pytest.raises(ValueError, match="shortcut_input is the input of a projection shortcut"):
        ops.residual_block(x, [unit], "identity", shortcut_input=x, backend=backend)
