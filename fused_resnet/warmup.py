"""Paying the first step's compile time up front: :func:`warmup` runs a model's train and eval steps once, for the
batch sizes it will see, and leaves the model as it was.

Why: the `triton` backend compiles each specialization of its kernels on first launch. A ResNet-50 bf16 train step
compiles 32 Triton kernels in channels_last (about 39 s on a 2-core host, compiled for sm_90 without a GPU) and 51
in NCHW (about 83 s); an eval step compiles its own (the inference convolution with its epilogue). Triton also
specializes every integer argument on divisibility by 16 and on == 1, and the launchers pick block sizes from the
shape, so a last partial batch whose row count (N*H*W of a conv output) is no longer a multiple of 16 compiles again,
in the middle of an epoch. Compiled kernels land in Triton's on-disk cache (~/.triton/cache, or TRITON_CACHE_DIR), so
a later process with the same kernels, Triton, GPU and environment loads them instead of compiling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .ops.folding import clear_folded_weights
from .tensors import describe, memory_format_of

STEPS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    """What :func:`warmup` did. `kernels_compiled`: the specializations of fused_resnet's Triton kernels this
    process had not launched before (compiled now, or loaded from Triton's on-disk cache); 0 when no Triton kernel
    ran compiled, None when they run in Triton's interpreter (no compilation) or this Triton keeps its cache
    elsewhere."""

    seconds: float
    steps_run: int  # train and eval steps, over every batch size
    kernels_compiled: int | None


def warmup(
    model: nn.Module,
    example_input: Tensor,
    *,
    batch_sizes: Iterable[int] | None = None,
    steps: Sequence[str] = STEPS,
) -> WarmupReport:
    """Runs every kernel that a train step (forward and backward) and an eval step (a forward under no_grad) of
    `model` need for inputs like `example_input`, so that their JIT compilation (the triton backend's kernels,
    torch.compile's graphs, cuDNN's algorithm search under cudnn.benchmark) happens now rather than inside the first
    timed or trained step, and leaves `model` as it was.

    - `batch_sizes`: the batch sizes to warm up (default: example_input's alone). Add the size of the last partial
      batch, ``len(dataset) % batch_size``, and the eval loader's: Triton compiles again for a batch whose row
      counts lose their divisibility by 16, and the launchers choose block sizes from the shape, so only the exact
      size is sure to be covered. A size above example_input's repeats its images.
    - `steps`: "train", "eval" or both (the default). The train step runs the model in training mode as it is (each
      submodule's own mode kept, e.g. frozen BatchNorms) when it is training, else after ``model.train()``; the eval
      step likewise in eval mode. Forwards run under the caller's autocast and backend (``use_backend``) contexts;
      the backward, of a gradient of ones for every floating-point output, outside autocast, as a training loop
      calls it. No optimizer step runs.

    Afterwards every parameter and buffer (running statistics, num_batches_tracked) holds its values and is the
    same object, every ``.grad`` is the same object (or None) with its values, every submodule's training flag is
    restored, the fused modules' folded-weight caches are emptied (they refold on their next eval call, as after
    ``fused_resnet.clear_folded_weights``), and torch's random number generators (CPU, and the CUDA devices the
    model and input are on) are back in their state. It works on `model` itself, with a snapshot of its
    parameters, buffers and existing gradients (ResNet-50: 100 MB in float32, small next to the gigabytes of a
    batch-256 step's activations), rather than on a deep copy, which would cost as much memory and cannot copy
    everything a model may hold (SyncBatchNorm's process groups, DistributedDataParallel, hooks that reach the
    original). Not restored: Python attributes a forward changes, and side effects of hooks. Under torch.distributed
    every rank must call it (the train step's collectives run). Returns a :class:`WarmupReport`.
    """
    sizes, step_names = _check_arguments(model, example_input, batch_sizes, steps)
    devices = {t.device for t in _tensors_of(model)} | {example_input.device}
    compiled_before = _triton_specializations()
    start = time.perf_counter()
    with _model_restored(model) as modes, _rng_restored(devices):
        for size in sizes:
            batch = _batch_of(example_input, size)
            for step in step_names:
                _run_step(model, modes, batch, step)
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    compiled_after = _triton_specializations()
    compiled = None if compiled_before is None or compiled_after is None else compiled_after - compiled_before
    return WarmupReport(seconds, len(sizes) * len(step_names), compiled)


def _check_arguments(model: object, example_input: object, batch_sizes: object, steps: object
                     ) -> tuple[list[int], list[str]]:
    """(batch sizes, step names) after checking every argument; raises naming the one that is wrong."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"warmup: expected model to be a torch.nn.Module, got {describe(model)}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"warmup: expected example_input to be a torch.Tensor (a batch like those the model will "
                        f"see), got {describe(example_input)}")
    if example_input.dim() == 0 or example_input.shape[0] == 0:
        raise ValueError(f"warmup: expected example_input to have a batch dimension of at least one sample, got a "
                         f"{describe(example_input)}")
    first = next(_tensors_of(model), None)
    if first is not None and first.device != example_input.device:
        raise ValueError(f"warmup: expected example_input on {first.device}, where model's parameters are, got a "
                         f"{describe(example_input)}")
    if batch_sizes is None:
        sizes = [example_input.shape[0]]
    else:
        if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
            raise TypeError(f"warmup: expected batch_sizes to be an iterable of positive ints, got "
                            f"{describe(batch_sizes)}")
        sizes = list(batch_sizes)
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad or not sizes:
            raise ValueError(f"warmup: expected batch_sizes to be one or more positive ints, got {sizes!r}")
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise TypeError(f"warmup: expected steps to be a sequence of step names from {STEPS}, got {describe(steps)}")
    step_names = list(steps)
    if not step_names or any(step not in STEPS for step in step_names):
        raise ValueError(f"warmup: expected steps to be one or more of {STEPS}, got {step_names!r}")
    return list(dict.fromkeys(sizes)), list(dict.fromkeys(step_names))


def _tensors_of(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _batch_of(example_input: Tensor, size: int) -> Tensor:
    """A batch of `size` samples in example_input's layout (its first ones, or its samples repeated), detached
    from the caller's graph: the backward must not reach the caller's tensors or leave a gradient on them."""
    if size == example_input.shape[0]:
        batch = example_input
    else:
        if size < example_input.shape[0]:
            batch = example_input[:size]
        else:
            repeats = -(-size // example_input.shape[0])
            batch = example_input.repeat(repeats, *[1] * (example_input.dim() - 1))[:size]
        if example_input.dim() == 4:
            batch = batch.contiguous(memory_format=memory_format_of(example_input))
    return batch.detach().requires_grad_(example_input.requires_grad)


def _run_step(model: nn.Module, modes: list[tuple[nn.Module, bool]], batch: Tensor, step: str) -> None:
    """One train or eval step; `modes`: every submodule's training flag as the caller left it."""
    training = step == "train"
    if modes[0][1] == training:  # the caller's own mode, each submodule's flag as the caller set it
        for module, flag in modes:
            module.training = flag
    else:
        model.train(training)
    if not training:
        with torch.no_grad():
            model(batch)
        return
    with torch.enable_grad():
        out = model(batch)
    outputs = [t for t in _flatten(out) if t.is_floating_point() and t.requires_grad]
    if not outputs:
        return
    device_type = batch.device.type
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _flatten(out: object) -> Iterator[Tensor]:
    """The tensors of a model's output: a tensor, or tuples, lists and dicts of them (detection backbones)."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _flatten(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _flatten(item)


@contextlib.contextmanager
def _model_restored(model: nn.Module) -> Iterator[list[tuple[nn.Module, bool]]]:
    """Yields every submodule's training flag (model's first) and restores on exit: those flags, the parameters
    and buffers (objects, and the values of those modified in place) and the parameters' .grad (objects and
    values). The .grad are taken off during the run, so that the backward makes new ones instead of accumulating
    into the caller's; their values are kept too, as DistributedDataParallel with gradient_as_bucket_view writes
    into its buckets, which the caller's .grad may view."""
    modes = [(m, m.training) for m in model.modules()]
    slots = [(table, name, t, t._version, t.detach().clone()) for m, _ in modes
             for table in (m._parameters, m._buffers) for name, t in table.items() if t is not None]
    grads = [(p, p.grad, None if p.grad is None else (p.grad._version, p.grad.detach().clone()))
             for p in model.parameters()]
    for p, _, _ in grads:
        p.grad = None
    try:
        yield modes
    finally:
        with torch.no_grad():
            for table, name, tensor, version, saved in slots:
                table[name] = tensor
                # Untouched tensors keep their version counters: a graph the caller still holds stays valid.
                if tensor._version != version:
                    tensor.copy_(saved)
            for p, grad, saved in grads:
                p.grad = grad
                if grad is not None and grad._version != saved[0]:
                    grad.copy_(saved[1])
        for module, flag in modes:
            module.training = flag
        # The eval steps folded the BatchNorms with the train steps' running statistics: stale entries (the
        # restoring copies moved the version counters) that would hold memory until the next eval call.
        clear_folded_weights(model)


@contextlib.contextmanager
def _rng_restored(devices: set[torch.device]) -> Iterator[None]:
    """torch's CPU generator and the generators of the CUDA `devices`, back in their state on exit (dropout and
    stochastic depth draw from them in training)."""
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in devices
                   if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def _triton_specializations() -> int | None:
    """How many specializations of fused_resnet's Triton kernels this process has compiled or loaded: the entries
    of their in-memory caches. None when they run in Triton's interpreter, or this Triton keeps no such cache."""
    from .kernels import REGISTRY

    backend = REGISTRY["triton"]
    if backend.kernels is None or backend.interpreted:
        return None
    import triton

    from .triton import bn, conv, stats

    total = 0
    for module in (bn, conv, stats):
        for kernel in vars(module).values():
            if isinstance(kernel, triton.runtime.JITFunction):
                # Triton 3.x: device -> (kernel cache, ...). Another layout: unknown, not guessed.
                for cache in getattr(kernel, "device_caches", {None: None}).values():
                    if not (isinstance(cache, tuple) and isinstance(cache[0], dict)):
                        return None
                    total += len(cache[0])
    return total
