"""Run every benchmark in this folder, one after another (``make bench``).

Each writes its own results file under ``benchmarks/results/``; ``RESULTS.md`` summarises them.
Run on a quiet machine: the ratios are measured within one run, but a busy machine adds noise.

``--quick`` runs every script in its quick mode instead (tiny sizes, seconds each), writing into
``--out-dir`` (default: a new temporary directory), never into ``benchmarks/results/``: it checks
that they all run, and its numbers mean nothing. ``tests/test_benchmarks.py`` runs each quick
mode, and checks that ``BENCHMARKS`` lists every script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["train_step.py", "pgd_speed.py", "nattack_batching.py", "autoattack_crosscheck.py", "ddp_cpu.py",
              "cpu_runtime.py"]
# fidelity_cifar10.py takes about 100 minutes and needs ../shared/data: run it on its own (it wraps
# experiments/fidelity-cifar10.toml; tests/test_experiment.py runs it at smoke scale).


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every script's quick mode (seconds each)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the results files go (default: benchmarks/results/; with --quick, "
                   "a new temporary directory)")
    args = p.parse_args(argv)
    out_dir = args.out_dir
    if args.quick and out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="robench-bench-"))
    failed = []
    for name in BENCHMARKS:
        cmd = [sys.executable, str(HERE / name), *(["--quick"] if args.quick else [])]
        if out_dir is not None:
            cmd += ["--out", str(out_dir / f"{Path(name).stem}.md")]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=HERE.parent).returncode
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'}, {time.perf_counter() - t0:.0f} s",
              flush=True)
        if rc != 0:
            failed.append(name)
    if out_dir is not None:
        print(f"results in {out_dir}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
