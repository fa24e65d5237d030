"""Side-by-side timing helper for the benchmarks: interleaved repeats, median seconds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def time_side_by_side(functions: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Median wall time of each function; runs are interleaved so machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():  # warm-up: imports, allocator, caches
        fn()
    # A collection triggered by one function's garbage would otherwise land in another's timing.
    enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            for name, fn in functions.items():
                gc.collect()
                gc.disable()
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
                gc.enable()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()
    return {name: statistics.median(values) for name, values in samples.items()}
