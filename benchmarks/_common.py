"""Shared helpers of the benchmark scripts: peer libraries, the reference model, timing, tables."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from advtrain.runtime import tune_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
# Every benchmark runs with glibc's heap keeping freed buffers (advtrain.runtime): otherwise, once activations outgrow
# glibc's dynamic mmap threshold, page faults take a third of an attack's time (DDN-100 on 200 digits: 7.7 s instead
# of 5.0 s), and which of two equivalent loops takes more of them depends on allocation order.
# ADVTRAIN_TUNE_MALLOC=0 measures under the default allocator settings instead.
ALLOCATOR_TUNED = tune_cpu_allocator()


def import_adv_lib():
    """Imports adv-lib's attacks, or returns None when it is not installed.

    adv-lib installs with ``pip install --no-deps adv-lib`` (its visdom dependency does not build here); visdom is
    only used by its optional progress logger, so a stub module stands in for it.
    """
    if "visdom" not in sys.modules:
        stub = types.ModuleType("visdom")
        stub.Visdom = object
        sys.modules["visdom"] = stub
    try:
        import adv_lib.attacks as attacks
    except ImportError:
        return None
    return attacks


def import_torchattacks():
    """Imports torchattacks, or returns None when it is not installed."""
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks


class CountingModel(torch.nn.Module):
    """Wraps a model to count per-sample forward passes and, through a hook on the logits, per-sample backward
    passes: the same counting for every library, so pass counts compare across peers."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        n = x.shape[0]
        self.forwards += n
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.backwards += n

    def reset(self) -> None:
        self.forwards = self.backwards = 0


def correct_digits(model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` embedded MNIST test digits that ``model`` classifies correctly."""
    from advtrain.models.reference import reference_batch

    x, y = reference_batch(min(4 * n, 1000))
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep][:n].contiguous(), y[keep][:n].contiguous()
    if x.shape[0] < n:
        raise RuntimeError(f"only {x.shape[0]} correctly classified test digits, wanted {n}")
    return x, y


def reference_model(activation: str = "relu"):
    """The trained SmallCNN of :func:`advtrain.models.reference.train_reference_model`, cached under results/."""
    from advtrain.models.reference import train_reference_model

    return train_reference_model(activation=activation, cache_dir=CACHE)


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    """Runs ``fn`` ``repeats`` times and returns (last result, median wall time in seconds)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


@dataclass
class Timing:
    """Wall and CPU seconds and minor page faults of repeated runs of one callable, and the output of its first
    timed run."""

    output: Any
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int, *, warmup: bool = True) -> list[Timing]:
    """Runs every callable ``repeats`` times, interleaved round by round, and times each run (wall and CPU), counting
    the minor page faults it takes (the allocator's cost, see ``advtrain/runtime.py``).

    The order is reversed every other round so that no callable always runs first (on a just-freed heap, a warm
    cache, a quiet moment of the shared machine); an untimed warm-up round first pays the one-off costs (lazy
    imports, kernel selection, the heap's growth). Compare two callables with :func:`paired_ratios`, which divides
    the times of the same round: both saw the machine in the same state.
    """
    if warmup:
        for fn in fns:
            fn()
    timings: list[Timing | None] = [None] * len(fns)
    for r in range(repeats):
        for i in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
            torch.manual_seed(0)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = time.perf_counter(), time.process_time()
            out = fns[i]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if timings[i] is None:
                timings[i] = Timing(out)
            timings[i].wall.append(wall)
            timings[i].cpu.append(cpu)
            timings[i].faults.append(faults)
    return timings  # type: ignore[return-value]


def paired_ratios(ours: Timing, peer: Timing) -> dict[str, float]:
    """Round-by-round ratios ours/peer: the median wall ratio with its range, and the median CPU-time ratio."""
    wall = [a / b for a, b in zip(ours.wall, peer.wall, strict=True)]
    cpu = [a / b for a, b in zip(ours.cpu, peer.cpu, strict=True)]
    return {
        "wall_ratio": statistics.median(wall),
        "wall_ratio_min": min(wall),
        "wall_ratio_max": max(wall),
        "cpu_ratio": statistics.median(cpu),
    }


def median_norm_with_failures(norms: torch.Tensor, success: torch.Tensor) -> float:
    """Median over samples with failures counted as +inf (Rony et al. 2019's convention)."""
    values = torch.where(success, norms.float(), torch.full_like(norms.float(), float("inf")))
    return float(values.median())


def write_table(name: str, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    """Prints a markdown table of ``rows`` and writes them as JSON to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2, default=str))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    print(f"\n(written to {path}; glibc malloc {'tuned' if ALLOCATOR_TUNED else 'default'}, see advtrain/runtime.py)")
    return path
