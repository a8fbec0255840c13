"""The ``robench report`` and ``robench demo`` commands."""

from __future__ import annotations

import os

import click

from robench.cli.options import check_out, command, device_options, out_option, progress_option, workdir_option


@command()
@out_option("The report's folder.", default="reports")
@workdir_option
def report(out, workdir):
    """Write report.md and figures from the results database and the workdir (re-runs nothing)."""
    from robench.report import write_report
    from robench.workdir import existing_workdir

    workdir = existing_workdir(workdir)
    check_out(out)
    click.echo(f"wrote {write_report(workdir, out)}")


@command()
@out_option("The report's folder.", default="reports")
@progress_option
@workdir_option
@device_options
def demo(out, progress, workdir, device, amp, compile_):
    """The whole pipeline on the embedded digits dataset: train all defenses, attack them, analyse
    them, write the report. Resumes where it stopped when run again."""
    import torch

    from robench.demo import run_demo
    from robench.runtime import Runtime
    from robench.workdir import resolve_workdir

    workdir = resolve_workdir(workdir)
    check_out(out)
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: one thread skips OpenMP's per-kernel fork/join, which
        # costs more than it saves here (benchmarks/results/pgd_speed.md, part iv).
        torch.set_num_threads(1)

    path = run_demo(workdir, out, Runtime.create(device, amp, compile_), progress)
    click.echo(f"wrote {path}")


COMMANDS = [report, demo]
