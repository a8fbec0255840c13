"""The ``robench experiment`` command: run an experiment file."""

from __future__ import annotations

import os
import shlex
import sys

import click

from robench.cli.options import check_out, command, out_option, progress_option, workdir_option


@command()
@click.argument("file")
@workdir_option
@out_option("The report's folder [default: the file's [report] out].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes [default: the file's [run] workers].")
@click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Replace a value of the file, repeatable (e.g. --set train.steps=100); recorded in the report.")
@click.option("--report-only", is_flag=True, help="Write the report from what is stored; run nothing.")
@progress_option
def experiment(file, workdir, out, workers, settings, report_only, progress):
    """Run an experiment file (TOML): train every defense stage by stage, evaluate each stage, write
    the report. Resumes where it stopped; a finished experiment does nothing. The workdir defaults
    to experiments/NAME inside robench's workdir."""
    from robench.cli.options import check_path
    from robench.errors import UserError
    from robench.experiment import load_experiment, run_experiment, write_outputs
    from robench.workdir import resolve_workdir

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers on shared cores: threads only contend
    exp = load_experiment(check_path(file, "FILE"), settings)
    root = workdir if workdir is not None else resolve_workdir(None) / "experiments" / exp.name
    if root.exists() and not root.is_dir():
        raise UserError(f"--workdir {root} is a file, not a directory")
    out = out or exp.out
    check_out(out)
    cmd = shlex.join(["robench", *sys.argv[1:]]) if sys.argv and sys.argv[1:2] == ["experiment"] else None
    if report_only:
        if not root.is_dir():
            raise UserError(f"nothing stored for experiment {exp.name} in {root}; run it first")
        path = write_outputs(exp, root, out, progress)  # the report names the command that ran
    else:
        path = run_experiment(exp, root, out, workers, progress, cmd)
    click.echo(f"wrote {path}")


COMMANDS = [experiment]
