"""The backends made for the GPU, `triton` and `cuda`, end to end: whole blocks (train: output, every gradient,
running statistics; eval; inference) against torchvision in float64, option A, ConvBNReLU, a CIFAR net, low
precision, and the proof that with `triton` a block's forward runs no ATen convolution or batch_norm (its
convolutions are Triton's, with the BatchNorms fused around them).

With a GPU both run on CUDA tensors (`cuda` with cuDNN's fused convolution-bias-ReLU in inference). Without one,
`triton` runs in Triton's CPU interpreter (tests/conftest.py turns it on), on small shapes: a block's train step
takes seconds there; `cuda` has no CPU mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv_resnet

import fused_resnet
import fused_resnet.modules
from conftest import TRITON_ON_CPU, assert_rel, randomize_batchnorms, rel_err, to_layout
from fused_resnet import use_backend
from test_compile import op_samples, small_network
from test_modules import BLOCKS, step, torchvision_block

STATUS = fused_resnet.backend_status()
BACKENDS = [b for b in ("triton", "cuda") if STATUS[b] == "available"]
pytestmark = pytest.mark.skipif(not BACKENDS, reason=f"triton: {STATUS['triton']}; cuda: {STATUS['cuda']}")
DEVICE = "cpu" if TRITON_ON_CPU else "cuda"
# fp32 against float64: the interpreter computes fp32 exactly as numpy does; on a GPU convolutions use TF32, as
# PyTorch's do by default (torch.backends.cudnn.allow_tf32), which moves results by ~1e-3 relative.
TOL = 1e-4 if TRITON_ON_CPU else 5e-3


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def fused_fp32(tv: torch.nn.Module) -> torch.nn.Module:
    return fused_resnet.convert(copy.deepcopy(tv)).float().to(DEVICE)


def compare(backend, fused, tv, x64, mode, channels_last, tol=TOL):
    """Two steps of `fused` (float32, on `backend`) and `tv` (float64) in `mode` on the same data; compares the output,
    the input gradient, every parameter gradient and every buffer."""
    x = to_layout(x64, channels_last)
    for seed in range(2):  # twice: running statistics and num_batches_tracked evolve
        with use_backend(backend):
            out, gx = step(fused, x.float().to(DEVICE), mode, seed)
        ref, rgx = step(tv, x, mode, seed)
    assert out.dtype == torch.float32 and not out.isnan().any()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_rel(out.cpu(), ref, tol, "output")
    if mode != "inference":
        assert_rel(gx.cpu(), rgx, tol, "grad x")
        for (name, p), rp in zip(fused.named_parameters(), tv.parameters()):
            assert_rel(p.grad.cpu(), rp.grad, tol, f"grad {name}", floor=1e-3 * rp.grad.norm().item() + 1e-12)
    for (name, b), rb in zip(fused.named_buffers(), tv.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b.cpu(), rb), name
        else:
            assert_rel(b.cpu(), rb, tol, name)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("name", ["basic", "basic-down", "bottleneck-down", "resnext-like", "dilated"])
def test_block_matches_torchvision(backend, name, mode, channels_last):
    tv = torchvision_block(name)
    _, _, _, cin, h, w = BLOCKS[name]
    compare(backend, fused_fp32(tv), tv, torch.randn(2, cin, h, w, dtype=torch.float64), mode, channels_last)


@pytest.mark.parametrize("name", ["basic-down", "bottleneck"])
def test_eval_mode_with_gradients_matches_torchvision(backend, name):
    """Running statistics, but gradients wanted (fine-tuning with frozen BN): the training chain, not the folded
    inference path."""
    tv = torchvision_block(name)
    _, _, _, cin, h, w = BLOCKS[name]
    compare(backend, fused_fp32(tv), tv, torch.randn(2, cin, h, w, dtype=torch.float64), "eval-grad", True)


@pytest.mark.parametrize("mode", ["train", "inference"])
def test_option_a_block_matches_the_reference(backend, mode):
    """Option A's zero-padded identity: subsampled and padded inside the last kernel (train) or the conv's
    epilogue (inference), checked against the reference composite in float64."""
    block = randomize_batchnorms(fused_resnet.BasicBlock(6, 10, stride=2, shortcut="A")).double()
    fused = copy.deepcopy(block).float().to(DEVICE)
    x64 = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    for seed in range(2):
        with use_backend(backend):
            out, gx = step(fused, x64.float().to(DEVICE), mode, seed)
        with use_backend("torch"):
            ref, rgx = step(block, x64, mode, seed)
    assert_rel(out.cpu(), ref, TOL, "output")
    if mode == "train":
        assert_rel(gx.cpu(), rgx, TOL, "grad x")
        for (name, p), rp in zip(fused.named_parameters(), block.parameters()):
            assert_rel(p.grad.cpu(), rp.grad, TOL, f"grad {name}")
        for (name, b), rb in zip(fused.named_buffers(), block.buffers()):
            assert_rel(b.cpu().double(), rb.double(), TOL, name)


def test_conv_bn_relu_and_a_cifar_net_train_like_the_reference(backend):
    net = randomize_batchnorms(fused_resnet.cifar_resnet(8, shortcut="A", num_classes=5)).double()
    fused = copy.deepcopy(net).float().to(DEVICE)
    x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with use_backend(backend):
        out, gx = step(fused, x64.float().to(DEVICE), "train")
    with use_backend("torch"):
        ref, rgx = step(net, x64, "train")
    assert_rel(out.cpu(), ref, TOL, "logits")
    assert_rel(gx.cpu(), rgx, TOL, "grad x")
    for (name, p), rp in zip(fused.named_parameters(), net.parameters()):
        assert_rel(p.grad.cpu(), rp.grad, TOL, f"grad {name}")
    for (name, b), rb in zip(fused.named_buffers(), net.buffers()):
        assert_rel(b.cpu().double(), rb.double(), TOL, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_block_is_as_accurate_as_torchvision_in_it(backend, dtype):
    """docs/design.md §6: within 2x of PyTorch's own error in that dtype against the float64 reference."""
    tv = torchvision_block("bottleneck-down")
    x64 = to_layout(torch.randn(2, 8, 9, 9, dtype=torch.float64), True)
    ref, _ = step(tv, x64, "train")
    low_tv = copy.deepcopy(tv).to(dtype)
    low_out, _ = step(low_tv, x64.to(dtype), "train")
    fused = fused_resnet.convert(copy.deepcopy(tv)).to(dtype).to(DEVICE)
    with use_backend(backend):
        out, _ = step(fused, x64.to(dtype).to(DEVICE), "train")
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref) <= 2 * rel_err(low_out, ref) + 1e-3


class _RecordAtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("name", ["basic-down", "bottleneck"])
@pytest.mark.skipif("triton" not in BACKENDS, reason=f"triton: {STATUS['triton']}")
def test_a_block_forward_runs_no_aten_convolution_or_batch_norm(name, mode):
    tv = torchvision_block(name)
    fused = fused_fp32(tv).train(mode == "train")
    _, _, _, cin, h, w = BLOCKS[name]
    x = torch.randn(2, cin, h, w, device=DEVICE)
    recorder = _RecordAtenOps()
    with use_backend("triton"), torch.set_grad_enabled(mode == "train"), recorder:
        fused(x.requires_grad_(mode == "train"))
    banned = {op for op in recorder.names
              if not op.startswith("fused_resnet") and ("conv" in op or "batch_norm" in op)}
    assert not banned, f"the triton backend's forward called {sorted(banned)}"
    # The recorder sees the ops it must: the Triton convolution (an opaque custom op), besides the per-channel
    # BatchNorm arithmetic.
    assert "fused_resnet_triton::conv2d" in recorder.names, sorted(recorder.names)
    # The same recorder on the cpu backend sees the convolutions it must not see on triton's.
    if "cpu" in fused_resnet.available_backends():
        control = _RecordAtenOps()
        with use_backend("cpu"), torch.set_grad_enabled(mode == "train"), control:
            fused.cpu()(x.detach().cpu().requires_grad_(mode == "train"))
        assert any("convolution" in op for op in control.names), sorted(control.names)


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: a training step reads nothing back from the device (tests/test_host_sync.py), so it can be captured


def _sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor):
    """Forward, backward and an SGD step (the gradients must be None or zero before); the output and the loss."""
    out = model(x)
    loss = F.cross_entropy(out.float(), target)
    loss.backward()
    optimizer.step()
    return out, loss


@pytest.fixture
def one_rank_nccl_group(monkeypatch):
    """A NCCL process group of this one GPU, which SyncBatchNorm modules are told to synchronize over (they skip a
    group of one rank otherwise): the synchronized path, its all_gather included, then runs in the graph."""
    if not (dist.is_available() and dist.is_nccl_available()):
        pytest.skip("torch.distributed without NCCL")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    monkeypatch.setattr(fused_resnet.modules, "sync_process_group",
                        lambda bn: dist.group.WORLD if bn.training else None)
    yield
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype, sync_bn", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["float32", "bfloat16", "float32-sync_bn"])
def test_a_resnet50_train_step_captured_in_a_cuda_graph_matches_eager(backend, dtype, sync_bn, request):
    """A fused ResNet-50's training step (batch 8 of 64x64, channels_last: forward, backward, SGD step) captured in
    one CUDA graph and replayed on two new batches gives the output, the loss, every parameter gradient, the
    parameters and every buffer (running statistics, num_batches_tracked) of the same steps run eagerly on an
    identical copy. Capture fails on a host read: synchronized BatchNorm read its group's count back with .item()
    before issue 14, item 10 (the sync_bn case, over a NCCL group of this one GPU)."""
    if sync_bn:
        request.getfixturevalue("one_rank_nccl_group")
    tol = 1e-3 if dtype == torch.float32 else 3e-2  # eager and replay differ only in the order of atomic sums
    tv = randomize_batchnorms(tv_resnet.resnet50(num_classes=10))
    model = fused_resnet.convert(tv, sync_bn=sync_bn).to(device="cuda", dtype=dtype, memory_format=torch.channels_last)
    assert fused_resnet.unfused_modules(model) == {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    static_x = torch.randn(8, 3, 64, 64, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    static_target = torch.randint(0, 10, (8,), device="cuda")
    with use_backend(backend):
        # Warm-up on a side stream, as capture wants: Triton compiles its kernels, cuDNN and cuBLAS set up, NCCL
        # makes its communicator.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                _sgd_step(model, optimizer, static_x, static_target)
        torch.cuda.current_stream().wait_stream(side)
        eager = copy.deepcopy(model)  # the state the graph starts from (deepcopy leaves the gradients behind)
        eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.01)
        # Gradients None: the backward in the capture allocates them in the graph's pool, and each replay writes
        # them afresh instead of accumulating.
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_loss = _sgd_step(model, optimizer, static_x, static_target)
        for step_ in range(2):
            x = torch.randn_like(static_x)
            target = torch.randint(0, 10, (8,), device="cuda")
            static_x.copy_(x)
            static_target.copy_(target)
            graph.replay()
            eager_optimizer.zero_grad(set_to_none=True)
            out, loss = _sgd_step(eager, eager_optimizer, x, target)
            torch.cuda.synchronize()
            assert_rel(static_out, out, tol, f"step {step_}: output")
            assert_rel(static_loss, loss, tol, f"step {step_}: loss")
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                assert_rel(p.grad, q.grad, tol, f"step {step_}: grad {name}")
                assert_rel(p, q, tol, f"step {step_}: {name}")
            for (name, b), c in zip(model.named_buffers(), eager.buffers()):
                if name.endswith("num_batches_tracked"):
                    # 3 warm-up steps (the capture itself runs nothing), then one per replay
                    assert torch.equal(b, c) and b.item() == 4 + step_, f"step {step_}: {name} {b.item()}"
                else:
                    assert_rel(b, c, tol, f"step {step_}: {name}")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: the Triton launches are opaque custom ops (fused_resnet/triton/library.py)


@pytest.mark.parametrize("train", [True, False])
def test_a_fused_network_compiles_without_graph_breaks_and_matches_eager(backend, train):
    torch._dynamo.reset()
    eager = randomize_batchnorms(small_network()).float().to(DEVICE).train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with use_backend(backend):
        for step_ in range(2):
            xe, xc = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
            with torch.set_grad_enabled(train):
                out_e, out_c = eager(xe), compiled(xc)
            assert_rel(out_c, out_e, 1e-5, f"output, step {step_}")
            if train:
                out_e.sum().backward()
                out_c.sum().backward()
                assert_rel(xc.grad, xe.grad, 1e-5, "grad x")
    if train:
        for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
            assert_rel(p.grad, q.grad, 1e-5, f"grad {name}", floor=1e-3)
    for (name, b), r in zip(compiled_model.named_buffers(), eager.buffers()):
        assert_rel(b.float(), r.float(), 1e-5, name)


def triton_op_samples():
    """(op, args) of every torch.ops.fused_resnet_triton op: the BatchNorm ones as the compiled ops' samples, and the
    convolution with each fusion."""
    ops = torch.ops.fused_resnet_triton
    samples = op_samples(ops, DEVICE)
    x = torch.randn(2, 4, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    vectors = [torch.randn(n, device=DEVICE) for n in (4, 4, 6)]
    geometry = ([2, 2], [1, 1], [1, 1], 1)
    residual = torch.randn(2, 3, 6, 5, device=DEVICE)
    samples += [
        (ops.conv2d.default, (x, w, None, *geometry, None, None, None, 1, 0, False, True)),
        (ops.conv2d.default, (x, w, None, *geometry, vectors[0], vectors[1], None, 1, 0, False, False)),
        (ops.conv2d.default, (x, w, vectors[2], *geometry, None, None, residual, 2, 1, True, False)),
    ]
    return samples


@pytest.mark.skipif("triton" not in BACKENDS, reason=f"triton: {STATUS['triton']}")
@pytest.mark.parametrize("sample", range(19))
def test_triton_opcheck(sample):
    op, args = triton_op_samples()[sample]
    torch.library.opcheck(op, args)
