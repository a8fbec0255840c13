"""Helpers shared by the benchmark scripts: machine description and interleaved timing."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

Times = dict[str, list[float]]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def interleaved(fns: dict[str, Callable[[], object]], reps: int, inner: int = 1,
                setup: dict[str, Callable[[], None]] | None = None) -> tuple[Times, Times]:
    """Per repetition, seconds per call of each fn as (process CPU time, wall time); calls
    alternate fn by fn. ``setup[name]`` runs (untimed) before each of that fn's calls, e.g. to
    switch the thread count."""
    out: Times = {n: [] for n in fns}
    out_cpu: Times = {n: [] for n in fns}
    names = list(fns)
    for rep in range(reps):
        acc, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        # Rotate the order every repetition: each variant takes each position equally often and
        # never runs twice in a row (a reversed ABC|CBA order would repeat the end ones, and a
        # repeated call runs warmer, which biased the ratios by a few percent).
        shift = rep % len(names) if len(names) > 2 else 0
        order = names[shift:] + names[:shift]
        for _ in range(inner):
            for n in order:
                if setup:
                    setup[n]()
                c0, t0 = time.process_time(), time.perf_counter()
                fns[n]()
                cpu[n] += time.process_time() - c0
                acc[n] += time.perf_counter() - t0
        for n in names:
            out[n].append(acc[n] / inner)
            out_cpu[n].append(cpu[n] / inner)
    return out_cpu, out
