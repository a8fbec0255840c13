"""The ``robench`` command line.

A user's mistake (``UserError``, a bad option, a workdir or results database that cannot be
written) is one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from pathlib import Path

import click

from robench.errors import UserError


class Group(click.Group):
    def main(self, *args, **kwargs):  # type: ignore[override]
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("error: interrupted; finished work is stored, run the same command again to resume", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except sqlite3.DatabaseError as e:  # a read-only, locked or damaged results database
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise  # a bug, not the user's file
            click.echo(f"error: results database: {e}; check that the workdir and its results.sqlite are "
                       f"writable and intact", err=True)
            sys.exit(2)
        except OSError as e:  # an unwritable workdir, a full disk, a path through a regular file
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot use{where}: {e.strerror or e}; check the path and its permissions", err=True)
            sys.exit(2)
        sys.exit(0)


def workdir_option(f):
    return click.option("--workdir", type=click.Path(path_type=Path), default=None,
                        help="Runs and results live here [default: $ROBENCH_WORKDIR or ./robench-runs].")(f)


def device_options(f):
    f = click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU).")(f)
    f = click.option("--amp/--no-amp", default=True, show_default=True,
                     help="bf16 autocast on CUDA (ignored on CPU).")(f)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)


@contextlib.contextmanager
def distributed(device: str):
    """Join torchrun's process group when launched by it; yields (Dist, this rank's device)."""
    from robench.distributed import device_for, from_env, shutdown

    d = from_env()
    try:
        yield d, device_for(device, d)
    finally:
        shutdown()


def resolve_workdir(workdir: Path | None) -> Path:
    from robench.workdir import default_workdir

    workdir = workdir if workdir is not None else default_workdir()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a directory; pass another --workdir")
    return workdir


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robench")
def cli() -> None:
    """Train and benchmark robust image classifiers (RLFAT, ICLR 2020)."""


@cli.command()
@click.argument("defense")
@click.option("--dataset", default="digits", show_default=True, help="See `robench list`.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the dataset lives or downloads to [default: $ROBENCH_DATA or ~/.cache/robench/data].")
@click.option("--arch", default=None, help="Model architecture [default: the dataset's].")
@click.option("--steps", type=int, default=None, help="Optimiser steps [default: the dataset's, App. A].")
@click.option("--batch-size", type=int, default=None, help="[default: 32, App. A]")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 1e-3, App. A].")
@click.option("--eps", type=float, default=None, help="L-inf radius of the training attack [default: the dataset's].")
@click.option("--step-size", type=float, default=None, help="PGD step [default: the dataset's].")
@click.option("--attack-steps", type=int, default=None, help="PGD steps [default: the dataset's].")
@click.option("--lam", type=float, default=None, help="TRADES/RLFAT-T KL weight [default: 6].")
@click.option("--eta", type=float, default=None, help="RLFAT transfer weight [default: 0.5 for -p, 1 for -t].")
@click.option("--rbs-k", type=int, default=2, show_default=True, help="RBS blocks per axis.")
@click.option("--rbs-mode", default="batch", show_default=True,
              help="batch: one shuffle per batch (official code); image: one per image.")
@click.option("--attack-mode", default="eval", show_default=True,
              help="Model mode while making x' in training: eval (ours) or train (official code).")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flip [default: the dataset's].")
@click.option("--n-train", type=int, default=None, help="Train on the first N training examples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Run name [default: DEFENSE-DATASET-sSEED].")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@workdir_option
@device_options
def train(defense, dataset, data_dir, arch, steps, batch_size, lr, eps, step_size, attack_steps, lam, eta,
          rbs_k, rbs_mode, attack_mode, flip, n_train, seed, name, resume, checkpoint_every, log_every,
          progress, workdir, device, amp, compile_):
    """Train DEFENSE (see `robench list`), e.g. `robench train rlfat-t --dataset cifar10`."""
    from robench.runtime import Runtime
    from robench.train import TrainConfig, train as run_training

    cfg = TrainConfig(defense, dataset, arch, steps, batch_size, lr, eps, step_size, attack_steps, lam, eta,
                      rbs_k, rbs_mode, attack_mode, flip, seed, n_train)
    with distributed(device) as (d, device):
        result = run_training(cfg, resolve_workdir(workdir), Runtime.create(device, amp, compile_), name=name,
                              resume=resume, data_dir=data_dir, checkpoint_every=checkpoint_every,
                              log_every=log_every, progress=progress, dist=d)
    if d.main:
        meta = result.meta
        click.echo(f"trained {meta['defense']} on {meta['dataset']} for {meta['step']} steps "
                   f"({meta['train_seconds']:.1f} s): {result.run_dir}")


@cli.command(name="list")
@workdir_option
def list_(workdir):
    """List defenses, attacks, datasets, architectures and the trained runs in the workdir."""
    from robench.data import describe
    from robench.models import arch_names
    from robench.registry import ATTACKS, DATASETS, DEFENSES
    from robench.workdir import list_runs

    click.echo("defenses:")
    for name in DEFENSES:
        click.echo(f"  {name:10s} {DEFENSES[name].summary}")
    click.echo("attacks:")
    for name in ATTACKS:
        click.echo(f"  {name:10s} {(ATTACKS[name].__doc__ or '').strip().splitlines()[0]}")
    click.echo("datasets:")
    for name in DATASETS:
        click.echo(f"  {describe(name)}")
    click.echo(f"architectures: {', '.join(arch_names())} (any wrn-DEPTH-WIDTH)")
    workdir = resolve_workdir(workdir)
    runs = list_runs(workdir)
    click.echo(f"trained runs in {workdir}: {len(runs) or 'none'}")
    for run_dir, meta in runs:
        state = "finished" if meta.get("finished") else "partial"
        click.echo(f"  {run_dir.name:28s} {meta['defense']:9s} {meta['dataset']:8s} {meta['arch']:10s} "
                   f"step {meta['step']}/{meta['config']['steps']} {state} "
                   f"sha256 {meta['files']['weights']['sha256'][:12]}")


def main() -> None:
    cli(prog_name="robench")


def parse_overrides(values: tuple[str, ...]) -> dict[str, dict]:
    """``-o nattack.population=100`` -> {"nattack": {"population": 100}} (values parsed as JSON
    when they parse, e.g. numbers, true/false; else kept as strings)."""
    import json

    out: dict[str, dict] = {}
    for item in values:
        target, sep, value = item.partition("=")
        attack, dot, param = target.partition(".")
        if not sep or not dot or not attack or not param:
            raise UserError(f"-o {item!r}: expected ATTACK.PARAM=VALUE, e.g. -o nattack.population=100")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(attack, {})[param] = parsed
    return out


def split_names(value: str, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UserError(f"{what} is empty")
    return names


@cli.command(name="eval")
@click.option("--defense", "defenses", default=None,
              help="Trained defense(s) in the workdir, comma-separated, e.g. rlfat-p,trades.")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path), default=None,
              help="Evaluate a model file trained elsewhere (.safetensors or a weights-only state dict).")
@click.option("--arch", default=None, help="Architecture of --checkpoint [default: the dataset's].")
@click.option("--dataset", default=None,
              help="[default: the dataset the defense's newest checkpoint was trained on]")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--attacks", default="pgd,cw,nattack", show_default=True,
              help="Comma-separated; see `robench list`.")
@click.option("--n", "--n-examples", "n", type=int, default=None,
              help="First N test images (--n-examples under torchrun, whose parser claims --n) [default: the whole test set; 1500 for nattack, as in the paper].")
@click.option("--eps", default=None,
              help="L-inf radius, or several comma-separated for an accuracy-vs-eps curve "
                   "[default: the dataset's]; the step size keeps the dataset's step/eps ratio.")
@click.option("-o", "--attack-option", "options", multiple=True,
              help="Attack parameter, ATTACK.PARAM=VALUE, repeatable (e.g. -o nattack.iterations=100).")
@click.option("--faithful", is_flag=True, help="N-attack: the official code's margin quirk.")
@click.option("--nattack-chunk", type=int, default=None, help="N-attack: images per forward chunk.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@workdir_option
@device_options
def eval_(defenses, checkpoint_path, arch, dataset, data_dir, attacks, n, eps, options, faithful, nattack_chunk,
          batch_size, seed, as_json, progress, workdir, device, amp, compile_):
    """Evaluate defenses under attacks, e.g. `robench eval --defense rlfat-p --attacks pgd,cw,nattack`."""
    import json

    from robench.evaluate import run_eval
    from robench.runtime import Runtime

    if (defenses is None) == (checkpoint_path is None):
        raise UserError("pass --defense NAME[,NAME...] (trained in the workdir) or --checkpoint FILE")
    overrides = parse_overrides(options)
    if faithful:
        overrides.setdefault("nattack", {})["faithful"] = True
    if nattack_chunk is not None:
        overrides.setdefault("nattack", {})["chunk"] = nattack_chunk
    try:
        eps_list = [float(e) for e in split_names(eps, "--eps")] if eps else [None]
    except ValueError:
        raise UserError(f"--eps {eps!r}: expected numbers, e.g. 0.03 or 0.01,0.03") from None
    with distributed(device) as (d, device):
        report = run_eval(
            defenses=split_names(defenses, "--defense") if defenses else [], checkpoint_path=checkpoint_path,
            arch=arch, dataset=dataset, data_dir=data_dir, attacks=split_names(attacks, "--attacks"), n=n,
            eps_list=eps_list, overrides=overrides, batch_size=batch_size, seed=seed,
            workdir=resolve_workdir(workdir), runtime=Runtime.create(device, amp, compile_), progress=progress,
            dist=d)
    if d.main:
        click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.table())


@cli.command()
@click.option("--defense", "defenses", required=True, help="Trained defense(s), comma-separated.")
@click.option("--dataset", default=None, help="[default: the dataset each defense was trained on]")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--n", "--n-examples", "n", type=int, default=None, help="First N test images [default: all].")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Also sweep brightness and gamma over a range, for the report's curves.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@workdir_option
@device_options
def sensitivity(defenses, dataset, data_dir, n, sweep, batch_size, progress, workdir, device, amp, compile_):
    """Loss sensitivity under brightness and gamma shifts (paper section 4.3, Table 2)."""
    import json

    from robench.analyze import run_sensitivity
    from robench.runtime import Runtime
    from robench.sensitivity import PAPER_POINTS

    rows = run_sensitivity(split_names(defenses, "--defense"), resolve_workdir(workdir),
                           Runtime.create(device, amp, compile_), dataset, data_dir, n, sweep, batch_size, progress)
    click.echo("loss sensitivity l = mean ||grad_x CE||_2 (paper Table 2 points)")
    for row in rows:
        value = json.loads(row.key.params)["value"]
        if value in PAPER_POINTS[row.key.name]:
            click.echo(f"  {row.defense:10s} {row.key.dataset:8s} {row.key.name:10s} {value:+.2f}  {row.value:.4f}")


@cli.command()
@click.option("--defense", "defenses", required=True, help="Trained defenses, comma-separated.")
@click.option("--dataset", default=None)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--n-images", type=int, default=6, show_default=True)
@click.option("--samples", type=int, default=50, show_default=True, help="SmoothGrad noise samples.")
@click.option("--stdev", type=float, default=0.15, show_default=True, help="SmoothGrad noise (pixel units).")
@click.option("--seed", type=int, default=0, show_default=True)
@workdir_option
@device_options
def salience(defenses, dataset, data_dir, n_images, samples, stdev, seed, workdir, device, amp, compile_):
    """SmoothGrad salience maps of the same images for each defense (paper Figure 3)."""
    from robench.analyze import run_salience
    from robench.runtime import Runtime

    if samples <= 0 or stdev < 0:
        raise UserError("--samples must be positive and --stdev non-negative")
    png = run_salience(split_names(defenses, "--defense"), resolve_workdir(workdir),
                       Runtime.create(device, amp, compile_), dataset, data_dir, n_images, samples, stdev, seed)
    click.echo(f"wrote {png}")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@workdir_option
def report(out, workdir):
    """Write report.md and figures from the results database and the workdir (re-runs nothing)."""
    from robench.data import load_dataset
    from robench.report import write_report
    from robench.workdir import list_runs

    workdir = resolve_workdir(workdir)
    image = None  # the RBS figure shows the first test image of the newest run's dataset
    runs = list_runs(workdir)
    if runs:
        try:
            image = load_dataset(runs[0][1]["dataset"], download=False).x_test[0]
        except UserError:
            pass
    click.echo(f"wrote {write_report(workdir, out, rbs_image=image)}")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@workdir_option
@device_options
def demo(out, progress, workdir, device, amp, compile_):
    """The whole pipeline on the embedded digits dataset: train all defenses, attack them, analyse
    them, write the report. Resumes where it stopped when run again."""
    import os

    import torch

    from robench.demo import run_demo
    from robench.runtime import Runtime

    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: one thread skips OpenMP's per-kernel fork/join, which
        # costs more than it saves here (benchmarks/results/pgd_speed.md, part iv).
        torch.set_num_threads(1)

    path = run_demo(resolve_workdir(workdir), out, Runtime.create(device, amp, compile_), progress)
    click.echo(f"wrote {path}")
