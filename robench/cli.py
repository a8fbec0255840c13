"""The ``robench`` command line.

A user's mistake (``UserError``, a bad option, a workdir or results database that cannot be
written) is one ``error: ...`` line on stderr and exit code 2, never a traceback.

Arguments that cannot mean what the user wanted are refused, not guessed at: a list option
given twice, a list with an empty or repeated item, an empty or space-padded path, a path of the wrong
kind (a file for a directory or the reverse, a run's folder for the workdir), a workdir to read
that does not exist, and a training option the chosen defense does not use.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

import click

from robench.errors import UserError


def is_list_option(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and "comma-separated" in (param.help or "").lower()


class Command(click.Command):
    """Refuses a list-valued option given twice (``--defense a --defense b``, ``--eps 0.1 --eps
    0.2``): click would silently keep the last list, where the user meant both. A scalar option
    given twice keeps its last value, the usual override (``$COMMON --steps 10``)."""

    def make_parser(self, ctx: click.Context):
        parser = super().make_parser(ctx)
        parse = parser.parse_args

        def parse_once(args):
            opts, rest, order = parse(args=args)
            lists = [p for p in order if is_list_option(p)]
            for param in lists:
                if lists.count(param) > 1:
                    raise click.UsageError(f"{param.opts[0]} is given more than once; give one comma-separated "
                                           f"list", ctx)
            return opts, rest, order

        parser.parse_args = parse_once
        return parser


class Group(click.Group):
    command_class = Command

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


def check_path(text: str, what: str) -> Path:
    """A path argument as the user meant it: ``~`` expanded; an empty or blank value (an unset
    shell variable, a stray quote) or one with spaces at either end is refused, not read as
    the current directory or a new folder named ' runs'."""
    if not text.strip():
        raise UserError(f"{what} is empty")
    if text != text.strip():
        raise UserError(f"{what} {text!r} starts or ends with a space")
    return Path(text).expanduser()


def _path_callback(ctx, param, value):
    if value is None:
        return None
    return check_path(value, param.opts[0])


def path_option(*decls, **kwargs):
    return click.option(*decls, type=click.Path(), callback=_path_callback, **kwargs)


def workdir_option(f):
    return path_option("--workdir", default=None,
                       help="Runs and results live here [default: $ROBENCH_WORKDIR or ./robench-runs].")(f)


def check_data_dir(data_dir: Path | None, dataset: str | None, defenses: list[str] = (),
                   workdir: Path | None = None) -> None:
    """--data-dir must be a directory, or not exist yet (torchvision downloads into it). For the
    embedded digits it has no effect, so giving it is a mistake (a forgotten --dataset, or a
    defense trained on other data than meant); without --dataset, the dataset is that of each
    defense's run in ``workdir``."""
    if data_dir is None:
        return
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file, not a directory")
    if dataset is None and defenses and workdir is not None:
        from robench.workdir import find_run

        try:
            found = {find_run(workdir, name)[1]["dataset"] for name in defenses}
        except UserError:
            return  # the command itself says what is missing
        if found == {"digits"}:
            raise UserError(f"--data-dir has no effect: {', '.join(defenses)} "
                            f"{'was' if len(defenses) == 1 else 'were'} trained on the embedded digits "
                            f"dataset in {workdir}")
    if dataset == "digits":
        raise UserError(f"--data-dir has no effect on the embedded digits dataset; pass --dataset "
                        f"(folder, cifar10, ...) for the data in {data_dir}")


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; the report is a folder")


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
    from robench.checkpoint import META
    from robench.workdir import default_workdir

    workdir = workdir if workdir is not None else default_workdir()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a directory; pass another --workdir")
    # A run's own folder, or the workdir's runs/ folder, given instead of the workdir itself.
    if (workdir / META).is_file():
        raise UserError(f"workdir {workdir} is a run's folder; pass the workdir that holds it: "
                        f"--workdir {workdir.parent.parent}")
    if workdir.name == "runs" and any(workdir.glob(f"*/{META}")) \
            and not (workdir / "runs").exists():
        raise UserError(f"workdir {workdir} is the runs/ folder of a workdir; pass --workdir {workdir.parent}")
    return workdir


def existing_workdir(workdir: Path | None) -> Path:
    """The workdir of a command that only reads one: it must exist (else it is a typo)."""
    resolved = resolve_workdir(workdir)
    if not resolved.exists():
        raise UserError(f"workdir {resolved} does not exist; pass the --workdir you trained in")
    return resolved


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robench")
def cli() -> None:
    """Train and benchmark robust image classifiers (RLFAT, ICLR 2020)."""


@cli.command()
@click.argument("defense")
@click.option("--dataset", default="digits", show_default=True, help="See `robench list`.")
@path_option("--data-dir", default=None,
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
@click.option("--rbs-exclude-identity", is_flag=True,
              help="RBS never returns its input unchanged [default: off, as the official code, where "
                   "about 27% of shuffles at k=2 change nothing].")
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
          rbs_k, rbs_mode, rbs_exclude_identity, attack_mode, flip, n_train, seed, name, resume,
          checkpoint_every, log_every, progress, workdir, device, amp, compile_):
    """Train DEFENSE (see `robench list`), e.g. `robench train rlfat-t --dataset cifar10`."""
    from robench.runtime import Runtime
    from robench.train import TrainConfig, train as run_training

    refuse_unused_settings(click.get_current_context(), defense)
    check_data_dir(data_dir, dataset)
    cfg = TrainConfig(defense, dataset, arch=arch, steps=steps, batch_size=batch_size, lr=lr, eps=eps,
                      step_size=step_size, attack_steps=attack_steps, lam=lam, eta=eta, rbs_k=rbs_k,
                      rbs_mode=rbs_mode, attack_mode=attack_mode, flip=flip, seed=seed, n_train=n_train,
                      rbs_exclude_identity=rbs_exclude_identity)
    with distributed(device) as (d, device):
        result = run_training(cfg, resolve_workdir(workdir), Runtime.create(device, amp, compile_), name=name,
                              resume=resume, data_dir=data_dir, checkpoint_every=checkpoint_every,
                              log_every=log_every, progress=progress, dist=d)
    if d.main:
        meta = result.meta
        click.echo(f"trained {meta['defense']} on {meta['dataset']} for {meta['step']} steps "
                   f"({meta['train_seconds']:.1f} s): {result.run_dir}")


# Training options that only some defenses use (TrainConfig field -> option).
DEFENSE_SETTINGS = {"eps": "--eps", "step_size": "--step-size", "attack_steps": "--attack-steps",
                    "attack_mode": "--attack-mode", "lam": "--lam", "eta": "--eta", "rbs_k": "--rbs-k",
                    "rbs_mode": "--rbs-mode", "rbs_exclude_identity": "--rbs-exclude-identity"}


def refuse_unused_settings(ctx: click.Context, defense: str) -> None:
    """An option typed for a defense whose objective does not use it (``trades --eta 1``,
    ``pgdat --rbs-mode image``) would change nothing but the record: refuse it."""
    from click.core import ParameterSource

    from robench.registry import DEFENSES

    cls = DEFENSES.get(defense)
    used = cls.settings()
    for field, option in DEFENSE_SETTINGS.items():
        if field not in used and ctx.get_parameter_source(field) not in (None, ParameterSource.DEFAULT):
            takers = [n for n in DEFENSES if field in DEFENSES[n].settings()]
            raise UserError(f"{option} has no effect on {defense}; it applies to: {', '.join(takers)}")


@cli.command(name="list")
@workdir_option
def list_(workdir):
    """List defenses, attacks, datasets, architectures and the trained runs in the workdir."""
    from robench.data import describe
    from robench.models import arch_names
    from robench.registry import ATTACKS, DATASETS, DEFENSES
    from robench.workdir import list_runs

    # A --workdir (or $ROBENCH_WORKDIR) that does not exist is a typo, not "no runs yet".
    explicit = workdir is not None or "ROBENCH_WORKDIR" in os.environ
    workdir = existing_workdir(workdir) if explicit else resolve_workdir(workdir)
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
    when they parse, e.g. numbers, true/false; else kept as strings). The same parameter given
    twice with different values is refused: which one was meant?"""
    import json

    out: dict[str, dict] = {}
    for item in values:
        target, sep, value = item.partition("=")
        attack, dot, param = target.partition(".")
        if not sep or not dot or not attack.strip() or not param.strip():
            raise UserError(f"-o {item!r}: expected ATTACK.PARAM=VALUE, e.g. -o nattack.population=100")
        if attack != attack.strip() or param != param.strip():
            raise UserError(f"-o {item!r}: no spaces around ATTACK.PARAM, e.g. -o nattack.population=100")
        if not value.strip():
            raise UserError(f"-o {item!r}: the value is empty")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        given = out.setdefault(attack, {})
        if param in given and given[param] != parsed:
            raise UserError(f"-o {target} is given twice, with different values ({given[param]!r} and {parsed!r})")
        given[param] = parsed
    return out


def set_option(overrides: dict[str, dict], attack: str, param: str, value: object, flag: str) -> None:
    """A shortcut flag (``--faithful``) for what ``-o`` can also set; refused when they disagree."""
    import json

    given = overrides.setdefault(attack, {})
    if param in given and given[param] != value:
        raise UserError(f"{flag} contradicts -o {attack}.{param}={json.dumps(given[param])}; give one of them")
    given[param] = value


def split_names(value: str, what: str) -> list[str]:
    """A comma-separated list. An empty item (``pgd,,cw``, a trailing comma) or a repeated one
    is refused: it is a typo, and a silently dropped or merged item hides which one."""
    items = [v.strip() for v in value.split(",")]
    if not any(items):
        raise UserError(f"{what} is empty")
    if not all(items):
        raise UserError(f"{what} {value!r} has an empty item (a stray comma?)")
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise UserError(f"{what} {value!r} names {', '.join(repeated)} more than once")
    return items


def split_eps(value: str) -> list[float]:
    import math

    items = split_names(value, "--eps")
    try:
        eps = [float(e) for e in items]
    except ValueError:
        raise UserError(f"--eps {value!r}: expected numbers, e.g. 0.03 or 0.01,0.03") from None
    if not all(math.isfinite(e) for e in eps):
        raise UserError(f"--eps {value!r}: expected finite numbers, e.g. 0.03 or 0.01,0.03")
    if len(set(eps)) < len(eps):
        raise UserError(f"--eps {value!r} gives the same radius more than once")
    return eps


@cli.command(name="eval")
@click.option("--defense", "defenses", default=None,
              help="Trained defense(s) in the workdir, comma-separated, e.g. rlfat-p,trades.")
@path_option("--checkpoint", "checkpoint_path", default=None,
             help="Evaluate a model file trained elsewhere (.safetensors or a weights-only state dict).")
@click.option("--arch", default=None, help="Architecture of --checkpoint [default: the dataset's].")
@click.option("--dataset", default=None,
              help="[default: the dataset the defense's newest checkpoint was trained on]")
@path_option("--data-dir", default=None)
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
    if checkpoint_path is not None and checkpoint_path.is_dir():
        raise UserError(f"--checkpoint {checkpoint_path} is a directory; pass the model file (.safetensors, .pt)")
    if arch is not None and checkpoint_path is None:
        raise UserError("--arch applies to --checkpoint only; a trained run records its own architecture")
    names = split_names(defenses, "--defense") if defenses is not None else []
    attack_names = split_names(attacks, "--attacks")
    workdir = resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    overrides = parse_overrides(options)
    if faithful:
        set_option(overrides, "nattack", "faithful", True, "--faithful")
    if nattack_chunk is not None:
        set_option(overrides, "nattack", "chunk", nattack_chunk, "--nattack-chunk")
    eps_list = split_eps(eps) if eps is not None else [None]
    if eps is not None:
        both = sorted(a for a, params in overrides.items() if "eps" in params)
        if both:
            raise UserError(f"--eps and -o {both[0]}.eps both set the radius; give one of them")
    with distributed(device) as (d, device):
        report = run_eval(
            defenses=names, checkpoint_path=checkpoint_path,
            arch=arch, dataset=dataset, data_dir=data_dir, attacks=attack_names, n=n,
            eps_list=eps_list, overrides=overrides, batch_size=batch_size, seed=seed,
            workdir=workdir, runtime=Runtime.create(device, amp, compile_), progress=progress, dist=d)
    if d.main:
        click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.table())


@cli.command()
@click.option("--defense", "defenses", required=True, help="Trained defense(s), comma-separated.")
@click.option("--dataset", default=None, help="[default: the dataset each defense was trained on]")
@path_option("--data-dir", default=None)
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

    from robench.sensitivity import run_sensitivity
    from robench.runtime import Runtime
    from robench.sensitivity import PAPER_POINTS

    names, workdir = split_names(defenses, "--defense"), resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    rows = run_sensitivity(names, workdir,
                           Runtime.create(device, amp, compile_), dataset, data_dir, n, sweep, batch_size, progress)
    click.echo("loss sensitivity l = mean ||grad_x CE||_2 (paper Table 2 points)")
    for row in rows:
        value = json.loads(row.key.params)["value"]
        if value in PAPER_POINTS[row.key.name]:
            click.echo(f"  {row.defense:10s} {row.key.dataset:8s} {row.key.name:10s} {value:+.2f}  {row.value:.4f}")


@cli.command()
@click.option("--defense", "defenses", required=True, help="Trained defenses, comma-separated.")
@click.option("--dataset", default=None)
@path_option("--data-dir", default=None)
@click.option("--n-images", type=int, default=6, show_default=True)
@click.option("--samples", type=int, default=50, show_default=True, help="SmoothGrad noise samples.")
@click.option("--stdev", type=float, default=0.15, show_default=True, help="SmoothGrad noise (pixel units).")
@click.option("--seed", type=int, default=0, show_default=True)
@workdir_option
@device_options
def salience(defenses, dataset, data_dir, n_images, samples, stdev, seed, workdir, device, amp, compile_):
    """SmoothGrad salience maps of the same images for each defense (paper Figure 3)."""
    from robench.salience import run_salience
    from robench.runtime import Runtime

    if samples <= 0 or stdev < 0:
        raise UserError("--samples must be positive and --stdev non-negative")
    names, workdir = split_names(defenses, "--defense"), resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    png = run_salience(names, workdir,
                       Runtime.create(device, amp, compile_), dataset, data_dir, n_images, samples, stdev, seed)
    click.echo(f"wrote {png}")


@cli.command()
@path_option("--out", default="reports", show_default=True)
@workdir_option
def report(out, workdir):
    """Write report.md and figures from the results database and the workdir (re-runs nothing)."""
    from robench.data import load_dataset
    from robench.report import write_report
    from robench.workdir import list_runs

    workdir = existing_workdir(workdir)
    check_out(out)
    image = None  # the RBS figure shows the first test image of the newest run's dataset
    runs = list_runs(workdir)
    if runs:
        try:
            image = load_dataset(runs[0][1]["dataset"], download=False).x_test[0]
        except UserError:
            pass
    click.echo(f"wrote {write_report(workdir, out, rbs_image=image)}")


@cli.command()
@path_option("--out", default="reports", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@workdir_option
@device_options
def demo(out, progress, workdir, device, amp, compile_):
    """The whole pipeline on the embedded digits dataset: train all defenses, attack them, analyse
    them, write the report. Resumes where it stopped when run again."""
    import torch

    from robench.demo import run_demo
    from robench.runtime import Runtime

    workdir = resolve_workdir(workdir)
    check_out(out)
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: one thread skips OpenMP's per-kernel fork/join, which
        # costs more than it saves here (benchmarks/results/pgd_speed.md, part iv).
        torch.set_num_threads(1)

    path = run_demo(workdir, out, Runtime.create(device, amp, compile_), progress)
    click.echo(f"wrote {path}")
