"""Run every benchmark in this folder, one after another (``make bench``).

Each writes its own results file under ``benchmarks/results/``; ``RESULTS.md`` summarises them.
Run on a quiet machine: the ratios are measured within one run, but a busy machine adds noise.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["train_step.py", "pgd_speed.py", "nattack_batching.py", "autoattack_crosscheck.py", "ddp_cpu.py"]
# fidelity_cifar10.py takes about an hour and needs ../shared/data: run it on its own.

if __name__ == "__main__":
    failed = [name for name in BENCHMARKS
              if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
