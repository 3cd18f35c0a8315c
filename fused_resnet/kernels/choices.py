"""Algorithm choices made by measurement on the machine at hand, once per configuration, as
torch.backends.cudnn.benchmark makes cuDNN's: which of several equivalent ways to compute a call is the fastest here.

A rule tuned on one CPU does not carry to another: Winograd's 3x3 convolution ran 1.2-2.5x as fast as oneDNN's direct
one on ResNet layers on a 2-core AVX2 EPYC; on a 2-core AVX-512 Xeon 1.4-2.2x on most of them but 0.42x at 64
channels and 56x56 pixels, batch 16 (ResNet-50's first stage at 224x224)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

# Rounds per candidate after one warm-up call each, interleaved: on a 2-core machine whose speed drifts with other
# load, alternating the candidates keeps a drift from favouring one; the median of 3 discards one disturbed call.
ROUNDS = 3


class Choice(NamedTuple):
    algorithm: str
    seconds: dict[str, float]  # each candidate's median seconds per call when the choice was made


def measure_seconds(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each candidate's median seconds per call: one warm-up call each, then ROUNDS rounds of one call each, in
    turn."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


class MeasuredChoices:
    """{configuration: Choice}, each made by `measure` (measure_seconds; tests put a function of their own here)
    the first time the configuration is asked for, and fixed from then on: the same configuration always runs the
    same algorithm, so results are deterministic once it is made."""

    def __init__(self) -> None:
        self.measure: Callable[[dict[str, Callable[[], object]]], dict[str, float]] = measure_seconds
        self._made: dict[Hashable, Choice] = {}

    def choose(self, configuration: Hashable, candidates: dict[str, Callable[[], object]]) -> str:
        """The fastest candidate's name for `configuration`: measured now if it has not been, else the one chosen
        then. Ties go to the first candidate."""
        choice = self._made.get(configuration)
        if choice is None:
            seconds = self.measure(candidates)
            choice = Choice(min(candidates, key=lambda name: seconds[name]), seconds)
            self._made[configuration] = choice
        return choice.algorithm

    def made(self, configuration: Hashable) -> Choice | None:
        return self._made.get(configuration)

    def items(self) -> list[tuple[Hashable, Choice]]:
        return list(self._made.items())

    def clear(self) -> None:
        """Forget every choice (the next call of each configuration measures again)."""
        self._made.clear()
