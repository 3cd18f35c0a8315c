"""fused_resnet.warmup: it leaves the model exactly as it was (parameters, buffers, .grad, every submodule's mode,
the folded-weight caches' correctness, torch's RNG state), the next steps give bitwise what they would have without
it, and on the triton backend the real train step, eval step and last partial batch launch no kernel specialization
that warmup did not launch already (so none compiles in the middle of training). Also: its argument errors, the
README's warm-up snippet, Triton's on-disk cache keys, and the benchmarks' warm-up rounds.

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py), so the triton cases use a tiny
network (a stem and a strided Bottleneck with a projection, at 6x6 pixels).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from conftest import randomize_batchnorms, to_layout
from fused_resnet.kernels import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `benchmarks`

from benchmarks import harness  # noqa: E402

TRITON_DEVICE = "cpu" if REGISTRY["triton"].interpreted or not torch.cuda.is_available() else "cuda"
BATCH, PARTIAL_BATCH = 4, 3
CLASSES = 5


def backend_device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def skip_unless_runs(backend: str) -> None:
    reason = REGISTRY[backend].why_not(backend_device(backend))
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")


def tiny_net(device: str, channels_last: bool) -> nn.Module:
    """A stem and a strided Bottleneck with a projection shortcut (every fused op kind: conv with statistics, the
    BN-ReLU prologue, BN + affine residual + ReLU, BN + ReLU alone, inference convolutions with and without a
    residual), then a dropout classifier head, whose mask draws from the RNG."""
    net = nn.Sequential(
        fused_resnet.ConvBNReLU(3, 8, kernel_size=3),
        fused_resnet.Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
            nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, CLASSES),
    )
    randomize_batchnorms(net)
    return net.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def images(batch: int, device: str, channels_last: bool) -> torch.Tensor:
    """Input images of 6x6: the stem's rows (batch*36) are a multiple of 16 at batch 4 and not at 3."""
    return to_layout(torch.randn(batch, 3, 6, 6, device=device), channels_last)


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """What a training loop runs before its optimizer step: (output, .grad by name, buffers by name)."""
    model.train()
    out = model(x)
    F.cross_entropy(out.float(), labels).backward()
    return (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def eval_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict:
    """Everything warmup must leave as it was, by value and by object."""
    return {
        "tensors": {n: (t, t.detach().clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, (tensor, value) in before["tensors"].items():
        assert after[name] is tensor, f"{name}: replaced by another tensor"
        assert torch.equal(tensor, value), f"{name}: values changed"
    for name, p in model.named_parameters():
        grad, value = before["grads"][name]
        assert p.grad is grad, f"{name}.grad: not the same object (or None) as before"
        assert grad is None or torch.equal(grad, value), f"{name}.grad: values changed"
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]
    assert torch.equal(torch.get_rng_state(), before["rng"]), "torch's CPU RNG state moved"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_warmup_leaves_the_model_as_it_was_and_the_next_steps_bitwise_unchanged(backend):
    """A model in training mode with a frozen (eval-mode) BatchNorm, some .grad set and some None, and folded-weight
    caches filled by an eval call: after warmup (train and eval steps, two batch sizes) every parameter, buffer,
    .grad, mode and the RNG state are bitwise and object-for-object what they were, and the next train step
    (dropout included) and eval step give bitwise what a copy that never saw warmup gives."""
    skip_unless_runs(backend)
    device = backend_device(backend)
    model = tiny_net(device, channels_last=False)
    x, labels = images(BATCH, device, False), torch.randint(CLASSES, (BATCH,), device=device)
    with fused_resnet.use_backend(backend):
        eval_step(model, x)  # fills the folded-weight caches, which warmup's train steps make stale
        model.train()
        model[1].bn2.eval()
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn_like(p) if i % 2 else None
        twin = copy.deepcopy(model)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        seed = int(torch.randint(2**31, ()))
        torch.manual_seed(seed)
        before = snapshot(model)

        report = fused_resnet.warmup(model, x, batch_sizes=(BATCH, PARTIAL_BATCH))

        assert report.steps_run == 4 and report.seconds > 0
        assert_unchanged(model, before)
        warmed = train_step(model, x, labels), eval_step(model, x)
        torch.manual_seed(seed)
        fresh = train_step(twin, x, labels), eval_step(twin, x)
    (out, grads, buffers), inference = warmed
    (out_fresh, grads_fresh, buffers_fresh), inference_fresh = fresh
    assert torch.equal(out, out_fresh), "the train step's output (its dropout mask: the RNG) differs"
    for name in grads:
        assert torch.equal(grads[name], grads_fresh[name]), f"{name}.grad differs"
    for name in buffers:
        assert torch.equal(buffers[name], buffers_fresh[name]), f"buffer {name} differs"
    assert torch.equal(inference, inference_fresh), "the eval step differs (a stale folded weight?)"


def test_warmup_under_no_grad_and_of_an_input_that_requires_grad():
    """A caller under torch.no_grad still gets a train step with autograd (the backward's kernels) and an eval step
    without; an example input that requires grad gets no .grad from warmup's backward (which reaches none of the
    caller's tensors), and the parameters' .grad stay None."""
    model = tiny_net("cpu", channels_last=True)
    x = images(BATCH, "cpu", True).requires_grad_()
    seen = []
    model[-1].register_forward_hook(lambda module, args, out: seen.append((module.training, out.requires_grad)))
    with torch.no_grad():
        report = fused_resnet.warmup(model, x)
    assert report.steps_run == 2 and seen == [(True, True), (False, False)]
    assert x.grad is None and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Triton: which kernel specializations a step launches


class LaunchRecorder:
    """Records a key for every launch of fused_resnet's Triton kernels, approximating the key of Triton's
    compile cache (triton.runtime.jit.JITFunction.run, Triton 3.x): the kernel; each constexpr argument's value;
    for every other argument Triton's own specialization of it, computed by the same function and with the CUDA
    backend's rules as a compiled launch (triton._C.libtriton.native_specialize_impl): its type (a pointer's
    element dtype, i32 or i64 for an integer) and its attribute (a pointer 16-byte aligned, an integer divisible
    by 16, an integer 1, which becomes a constant); and the launch options (num_warps, num_stages). Left out: the
    target and the environment's debug knobs, which are the same for every launch of a test. It wraps each
    kernel's `run`, which both a compiled kernel (JITFunction) and an interpreted one (Triton's interpreter on CPU
    tensors) go through, so the same keys come out of both: on CPU tensors they are what the same launch would
    compile on a GPU."""

    def __init__(self, monkeypatch):
        pytest.importorskip("triton")
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        from fused_resnet.triton import bn, conv, stats

        self.keys: set = set()

        def specialize(kernel):
            params = kernel.params if isinstance(kernel, JITFunction) else JITFunction(kernel.fn).params
            signature = inspect.signature(kernel.fn)

            def key(args, kwargs):
                bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
                bound.apply_defaults()
                parts = []
                for param, value in zip(params, bound.arguments.values()):
                    if param.is_constexpr:
                        parts.append((param.name, "constexpr", str(value)))
                    else:
                        parts.append((param.name, param.annotation_type, *native_specialize_impl(
                            CUDABackend, value, param.is_const, not param.do_not_specialize,
                            not param.do_not_specialize_on_alignment)))
                options = sorted((k, v) for k, v in kwargs.items() if k not in signature.parameters)
                return kernel.fn.__name__, tuple(parts), tuple(options)

            return key

        def recording(kernel):
            run, key = kernel.run, specialize(kernel)

            def run_and_record(*args, grid, warmup, **kwargs):
                self.keys.add(key(args, kwargs))
                return run(*args, grid=grid, warmup=warmup, **kwargs)

            return run_and_record

        kernels = [k for module in (bn, conv, stats) for k in vars(module).values()
                   if isinstance(k, (JITFunction, InterpretedFunction)) and k.fn.__name__.endswith("_kernel")]
        assert len(kernels) >= 10, "the launch recorder found too few of fused_resnet's Triton kernels"
        for kernel in kernels:
            monkeypatch.setattr(kernel, "run", recording(kernel))

    def take(self) -> set:
        """The keys recorded since the last take()."""
        keys, self.keys = self.keys, set()
        return keys


# The two layouts run different statistics and BatchNorm kernels. The channels_last case runs under bf16 autocast,
# as the GPU benchmarks' main configuration does: warmup runs under the caller's autocast.
LAYOUTS = {"nchw-fp32": (False, None), "channels_last-bf16-autocast": (True, torch.bfloat16)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_after_warmup_train_eval_and_partial_batch_launch_no_new_specialization(monkeypatch, layout):
    """warmup(batch_sizes=(4, 3)), then what training and evaluation run: a train step (cross-entropy backward)
    and an eval step at batch 4 and at the last partial batch of 3. Every specialization they launch, warmup
    launched; and the partial batch and the eval step each launch some that the full-batch train step does not
    (so a warmup without them would leave compiles in the epoch). Under autocast the convolutions launched are
    bf16 ones (their input pointers are *bf16)."""
    skip_unless_runs("triton")
    channels_last, autocast_dtype = LAYOUTS[layout]
    recorder = LaunchRecorder(monkeypatch)
    model = tiny_net(TRITON_DEVICE, channels_last)
    x = images(BATCH, TRITON_DEVICE, channels_last)
    partial = images(PARTIAL_BATCH, TRITON_DEVICE, channels_last)
    autocast = torch.autocast(TRITON_DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with fused_resnet.use_backend("triton"), autocast:
        fused_resnet.warmup(model, x, batch_sizes=(BATCH, PARTIAL_BATCH))
        warmed = recorder.take()
        train_step(model, x, torch.randint(CLASSES, (BATCH,), device=TRITON_DEVICE))
        train = recorder.take()
        eval_step(model, x)
        evaluation = recorder.take()
        train_step(model, partial, torch.randint(CLASSES, (PARTIAL_BATCH,), device=TRITON_DEVICE))
        eval_step(model, partial)
        partial_batch = recorder.take()
    assert train and evaluation and partial_batch
    for name, launched in [("train step", train), ("eval step", evaluation), ("partial batch", partial_batch)]:
        missed = launched - warmed
        assert not missed, f"the {name} launched {len(missed)} specializations warmup did not, of " \
                           f"{sorted({kernel for kernel, _, _ in missed})}"
    assert evaluation - train, "the eval step should need kernels of its own"
    assert partial_batch - train - evaluation, "the partial batch should need specializations of its own"
    conv_inputs = {parts[0][2] for name, parts, _ in warmed if name == "_conv_kernel"}
    assert conv_inputs == {"*bf16" if autocast_dtype else "*fp32"}, conv_inputs


@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="needs compiled Triton kernels (a GPU)")
def test_warmup_counts_the_kernels_it_compiled():
    """On a GPU: the first warmup of a shape compiles kernels and says how many; a second compiles none."""
    model = tiny_net("cuda", channels_last=True)
    x = images(BATCH, "cuda", True)
    with fused_resnet.use_backend("triton"):
        first = fused_resnet.warmup(model, x, batch_sizes=(BATCH, PARTIAL_BATCH))
        second = fused_resnet.warmup(model, x, batch_sizes=(BATCH, PARTIAL_BATCH))
    assert first.kernels_compiled > 0 and second.kernels_compiled == 0, (first, second)


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x: fused_resnet.warmup("resnet50", x), TypeError,
     "warmup: expected model to be a torch.nn.Module, got str"),
    (lambda m, x: fused_resnet.warmup(m, [x]), TypeError,
     r"warmup: expected example_input to be a torch.Tensor \(a batch like those the model will see\), got list"),
    (lambda m, x: fused_resnet.warmup(m, x.to("meta")), ValueError,
     r"warmup: expected example_input on cpu, where model's parameters are, got a torch.float32 tensor of shape "
     r"\[4, 3, 6, 6\] on meta"),
    (lambda m, x: fused_resnet.warmup(m, x[:0]), ValueError,
     r"warmup: expected example_input to have a batch dimension of at least one sample, got a torch.float32 tensor of "
     r"shape \[0, 3, 6, 6\] on cpu"),
    (lambda m, x: fused_resnet.warmup(m, x, batch_sizes=4), TypeError,
     "warmup: expected batch_sizes to be an iterable of positive ints, got int"),
    (lambda m, x: fused_resnet.warmup(m, x, batch_sizes=(4, 0)), ValueError,
     r"warmup: expected batch_sizes to be one or more positive ints, got \[4, 0\]"),
    (lambda m, x: fused_resnet.warmup(m, x, batch_sizes=(2.5, True)), ValueError,
     r"warmup: expected batch_sizes to be one or more positive ints, got \[2.5, True\]"),
    (lambda m, x: fused_resnet.warmup(m, x, batch_sizes=[]), ValueError,
     r"warmup: expected batch_sizes to be one or more positive ints, got \[\]"),
    (lambda m, x: fused_resnet.warmup(m, x, steps="train"), TypeError,
     r"warmup: expected steps to be a sequence of step names from \('train', 'eval'\), got str"),
    (lambda m, x: fused_resnet.warmup(m, x, steps=("train", "test")), ValueError,
     r"warmup: expected steps to be one or more of \('train', 'eval'\), got \['train', 'test'\]"),
    (lambda m, x: fused_resnet.warmup(m, x, steps=()), ValueError,
     r"warmup: expected steps to be one or more of \('train', 'eval'\), got \[\]"),
], ids=["model", "input-type", "input-device", "empty-batch", "sizes-type", "size-zero", "size-types",
        "no-sizes", "steps-type", "unknown-step", "no-steps"])
def test_bad_arguments_are_refused_and_change_nothing(call, error, message):
    model = tiny_net("cpu", channels_last=False)
    model.eval()
    x = images(BATCH, "cpu", False)
    before = snapshot(model)
    with pytest.raises(error, match=f"^{message}$"):
        call(model, x)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------------------
# README, Triton's on-disk cache, the benchmarks


README_SECTION = "## The first step: compiling, and warmup()"


def test_readme_warmup_snippet_runs(tmp_path):
    """The python snippet of README's warm-up section runs as it is, in a fresh process (tests/test_readme.py runs
    another section's)."""
    section = (ROOT / "README.md").read_text().split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WarmupReport(" in result.stdout, result.stdout


KERNEL_CACHE_KEYS = """
import triton
from fused_resnet.triton import bn, conv, stats
for module in (bn, conv, stats):
    for name, kernel in sorted(vars(module).items()):
        if isinstance(kernel, triton.runtime.JITFunction):
            print(module.__name__, name, kernel.cache_key)
"""


def test_triton_cache_keys_are_the_same_in_every_process():
    """Triton's on-disk cache (~/.triton/cache, TRITON_CACHE_DIR) finds a compiled kernel by a hash of its source,
    the functions it calls and the globals it reads (JITFunction.cache_key), with the launch's signature, constexprs
    and options: a key that changed from one process to the next (a global made from an address, a set's order
    under hash randomization) would compile every kernel again in every process. Two fresh processes with different
    hash seeds compute the same key for every kernel (no GPU needed: the keys come from the source)."""
    pytest.importorskip("triton")
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, "-c", KERNEL_CACHE_KEYS], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) >= 10, outputs[0]


def test_every_benchmark_size_warms_up_before_it_times():
    """pytest-benchmark's warm-up rounds call the very step function that is then timed (benchmarks/measure.py's
    Measure), train or eval, at the same batch: at least one of them is what keeps Triton's compiles (and cuDNN's
    algorithm search) out of the timed rounds, at every size and whatever --rounds says; a size without any is
    refused."""
    for name in harness.SIZES:
        for rounds in (None, 1, 3):
            assert harness.size_config(name, rounds=rounds).warmup_rounds >= 1, (name, rounds)
    with pytest.raises(ValueError, match="warmup_rounds"):
        dataclasses.replace(harness.SIZES["smoke"], warmup_rounds=0)
