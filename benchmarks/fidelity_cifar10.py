"""Fidelity benchmark: the paper's comparison on real images (the CIFAR-10 JPEG copy), CPU-sized.

It is an experiment file now, ``experiments/fidelity-cifar10.toml``, run by ``robench experiment``
(training in stages, evaluation, the report; resumable, a no-op when finished). This wrapper runs
that file and passes its arguments on, for example ``--workdir W`` or ``--set train.steps=250``:

    nohup nice -n 10 .venv/bin/python benchmarks/fidelity_cifar10.py > fidelity.log 2>&1 &

Without the archive (``../shared/data`` beside the repository) it prints one line and exits 0.
The committed ``benchmarks/results/fidelity_cifar10/report.md`` was written by this benchmark's
former script, with the same runs, stages and result keys as the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "experiments" / "fidelity-cifar10.toml"
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not ARCHIVE.is_file() and not any(a.startswith("data.archive") for a in argv):
        print(f"fidelity_cifar10: skipped: no CIFAR-10 JPEG archive at {ARCHIVE} (it lives in ../shared/data "
              "next to the repository)")
        return 0
    from robench.cli import cli

    cli.main(["experiment", str(FILE), *argv], prog_name="robench")  # exits with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
