"""What the benchmarks time and measure: inputs in a layout, training and inference steps, the timed calls
(pytest-benchmark) and the activation memory of training, each recorded as a row of the run's report."""

from __future__ import annotations

import ctypes
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.harness import BenchSession, Layout, Provider

# ---------------------------------------------------------------------------------------------------------------
# Inputs and step functions


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timed call measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_benchmark_layout(module: nn.Module, device: torch.device, layout: Layout) -> nn.Module:
    """`module` on the benchmark device, in the layout's dtype, its 4-D weights in the layout's memory format."""
    return module.to(device=device, dtype=layout.dtype, memory_format=layout.memory_format)


def random_activation(shape: tuple[int, ...], device: torch.device, layout: Layout) -> torch.Tensor:
    """A standard-normal 4-D tensor made on the device (the full size's tensors are too big to make on a CPU)."""
    return torch.randn(shape, device=device, dtype=layout.dtype).contiguous(memory_format=layout.memory_format)


def train_step(
    module: nn.Module, x: torch.Tensor, backward: Callable[[torch.Tensor], None], provider: Provider,
    device: torch.device,
) -> Callable[[], None]:
    """One training step: forward, `backward(output)` (which calls .backward()), a plain SGD step."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with provider.context():
            out = module(x)
        backward(out)
        optimizer.step()
        synchronize(device)

    return step


def eval_step(module: nn.Module, x: torch.Tensor, provider: Provider, device: torch.device) -> Callable[[], None]:
    """One inference forward: eval mode (running statistics), no autograd."""
    module.eval()

    def step() -> None:
        with torch.no_grad(), provider.context():
            module(x)
        synchronize(device)

    return step


def mode_step(
    mode: str, module: nn.Module, x: torch.Tensor, backward: Callable[[torch.Tensor], None], provider: Provider,
    device: torch.device,
) -> Callable[[], None]:
    """`train_step` (with `backward`) for mode "train", else `eval_step`."""
    if mode == "train":
        return train_step(module, x, backward, provider, device)
    return eval_step(module, x, provider, device)


def _peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak device memory one call of `fn` allocates beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# Timing


class Measure:
    """Times a step function through pytest-benchmark and records the row of the report."""

    def __init__(self, benchmark, session: BenchSession):
        self.benchmark = benchmark
        self.session = session

    def __call__(
        self,
        fn: Callable[[], None],
        *,
        suite: str,
        case: str,
        mode: str,
        provider: str,
        is_reference: bool,
        images: int,
        layout: Layout,
        bytes_moved: int | None = None,
        rounds: int | None = None,
        details: dict | None = None,
        reference_step: Callable[[], None] | None = None,
    ) -> None:
        """`details`: what identifies the case beyond its label (e.g. model and resolution), kept in the row.
        `reference_step`: the reference provider's step for the same case, run (and timed here) before each call of
        `fn`, warm-up calls included; the row's `paired_ratio` is then the median over the timed calls of the
        reference's time over fn's time in the same round. Separate medians drift with the machine's load between
        the cases (two runs of the same resnet50 eval comparison on the 2-core CPU: torch.compile 1.08x and 1.28x
        torchvision); alternating calls see the same load."""
        size, device = self.session.size, self.session.device
        info = {
            "suite": suite, "case": case, "mode": mode, "provider": provider, "images_per_call": images,
            "dtype": layout.dtype_name, "memory_format": layout.memory_format_name, **(details or {}),
            **self.session.row_info,
        }
        if bytes_moved is not None:
            info["bytes_moved"] = bytes_moved
        self.benchmark.extra_info.update(info)
        # pytest-benchmark's own table then shows the providers of a case next to each other.
        self.benchmark.group = f"{suite}: {case} {mode} {layout.label}"
        reference_seconds: list[float] = []

        def time_reference() -> None:
            start = time.perf_counter()
            reference_step()
            reference_seconds.append(time.perf_counter() - start)

        self.benchmark.pedantic(fn, setup=time_reference if reference_step is not None else None,
                                rounds=rounds or size.rounds, warmup_rounds=size.warmup_rounds)
        if self.benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        stats = self.benchmark.stats.stats
        paired_ratio = None
        if reference_step is not None:
            timed = reference_seconds[-len(stats.data):]  # the warm-up rounds timed the reference first
            paired_ratio = statistics.median(ref / own for ref, own in zip(timed, stats.data))
            self.benchmark.extra_info["paired_ratio"] = paired_ratio
        median = stats.median
        row = {**info, "is_reference": is_reference, "median_s": median, "images_per_s": images / median,
               "gb_per_s": bytes_moved / median / 1e9 if bytes_moved is not None else None,
               "paired_ratio": paired_ratio, "peak_memory_mib": _peak_memory_mib(fn, device)}
        if row["peak_memory_mib"] is not None:
            self.benchmark.extra_info["peak_memory_mib"] = row["peak_memory_mib"]
        self.session.rows.append(row)


# ---------------------------------------------------------------------------------------------------------------
# Activation memory


def saved_for_backward_bytes(module: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs `module` (whose output is dropped
    afterwards): every storage counted once, however many saved tensors view it, and the module's own parameters
    and buffers left out (they are held whether or not anything trains)."""
    held = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # the saved tensors stay alive until the graph goes, so no address is reused meanwhile

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


class MeasureMemory:
    """Measures the activation memory of one training forward (and, on a GPU, the peak of a training step) and
    records the row of the report."""

    def __init__(self, session: BenchSession):
        self.session = session

    def __call__(
        self,
        module: nn.Module,
        x: torch.Tensor,
        backward: Callable[[torch.Tensor], None],
        provider: Provider,
        *,
        case: str,
        layout: Layout,
        details: dict | None = None,
    ) -> None:
        """`module` in training mode on input `x`; `backward(output)` calls .backward(), as in `train_step`."""
        device = self.session.device
        module.train()

        def forward() -> torch.Tensor:
            with provider.context():
                return module(x)

        saved = saved_for_backward_bytes(module, forward)
        # Peak allocated memory of a whole training step on a GPU, taken on the second one: the first also holds
        # cuDNN's algorithm search.
        step = train_step(module, x, backward, provider, device)
        if device.type == "cuda":
            step()
        self.session.memory_rows.append({
            "suite": "memory", "case": case, "mode": "train", "provider": provider.name,
            "memory_policy": (provider.memory or "default") if provider.is_fused else None,
            "is_reference": provider.is_reference, "images_per_call": x.shape[0],
            "dtype": layout.dtype_name, "memory_format": layout.memory_format_name, **(details or {}),
            **self.session.row_info,
            "saved_bytes": saved, "saved_bytes_per_image": saved / x.shape[0],
            "peak_memory_mib": _peak_memory_mib(step, device),
        })


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's largest mmap threshold on 64-bit Linux: larger blocks are always mapped afresh.
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_cpu_memory() -> bool:
    """Makes glibc keep freed blocks up to 32 MiB in the process instead of returning them to the OS.

    Left as it is, glibc unmaps (or trims) a freed activation-sized block, and the next tensor of that size
    page-faults on its first write: a bf16 16x64x56x56 fused op's backward took 3.9 ms instead of 1.7, and the
    unfused sequence suffered alike, whichever happened to allocate at the wrong moment, so one run's ratio swung
    from 0.6x to 2.6x. This applies to every provider of the run alike (CPU libraries recommend jemalloc or
    tcmalloc for the same reason). Returns whether glibc took the settings (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
