"""Helpers shared by the benchmark scripts: machine description, interleaved timing, and the
``--quick`` / ``--out`` options every script has."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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


# --------------------------------------------------------------------------- quick mode

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
QUICK_NOTE = ("**QUICK RUN** (`--quick`): tiny sizes, only to check that the script runs end to "
              "end; none of the numbers below means anything.")


def add_out_args(parser: argparse.ArgumentParser, default: Path) -> None:
    """``--quick`` and ``--out``, the same in every benchmark."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (seconds): checks that the script runs, its numbers mean "
                        "nothing; writes to --out or a new temporary directory, never to "
                        "benchmarks/results/")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default: benchmarks/results/{default.name}; with "
                        "--quick, a file in a new temporary directory)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               quick: dict[str, Any]) -> argparse.Namespace:
    """Parse; with ``--quick``, ``quick`` replaces the defaults (options given still win)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def out_path(args: argparse.Namespace, default: Path) -> Path:
    """Where the results go. A quick run never writes under benchmarks/results/: its numbers
    would replace the committed measurements."""
    if not args.quick:
        return args.out or default
    if args.out is None:
        return Path(tempfile.mkdtemp(prefix="robench-bench-")) / default.name
    out = args.out.resolve()
    if out == RESULTS_DIR or RESULTS_DIR in out.parents:
        sys.exit(f"--quick does not write under {RESULTS_DIR} (the committed results); "
                 "give another --out or none")
    return args.out
