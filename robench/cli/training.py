"""The ``robench train`` and ``robench list`` commands."""

from __future__ import annotations

import os

import click

from robench.cli.options import (batch_size_option, check_data_dir, command, data_dir_option, dataset_option,
                                 device_options, distributed, parse_overrides, progress_option, seed_option,
                                 set_option, workdir_option)
from robench.config import DEFAULT_DATASET
from robench.errors import UserError

# Flags for defense settings, as the README documents them: each sets what
# ``-o DEFENSE.PARAM=VALUE`` sets (the parameter is the flag's name with '_' for '-'). A new
# setting needs no flag: -o reaches every field of the defense's dataclass.
SHORTCUTS = [
    click.option("--eps", type=float, default=None, help="L-inf radius of the training attack [default: the dataset's]."),
    click.option("--step-size", type=float, default=None, help="PGD step [default: the dataset's]."),
    click.option("--attack-steps", type=int, default=None, help="PGD steps [default: the dataset's]."),
    click.option("--lam", type=float, default=None, help="TRADES/RLFAT-T KL weight [default: the defense's]."),
    click.option("--eta", type=float, default=None, help="RLFAT transfer weight [default: the defense's]."),
    click.option("--rbs-k", type=int, default=None, help="RBS blocks per axis [default: the defense's]."),
    click.option("--rbs-mode", default=None,
                 help="batch: one shuffle per batch (official code); image: one per image [default: the defense's]."),
    click.option("--rbs-exclude-identity", is_flag=True, default=None,
                 help="RBS never returns its input unchanged (the official code does not exclude it: about "
                      "27% of shuffles at k=2 change nothing) [default: the defense's]."),
    click.option("--attack-mode", default=None,
                 help="Model mode while making x' in training: eval (ours) or train (official code) "
                      "[default: the defense's]."),
]


def shortcut_options(f):
    for option in reversed(SHORTCUTS):
        f = option(f)
    return f


def defense_options(defense: str, options: tuple[str, ...], shortcuts: dict[str, object]) -> dict[str, object]:
    """The defense settings the user gave, by ``-o`` and by shortcut flag. An option for another
    defense, or a flag for a setting this defense does not have (``trades --eta 1``, ``pgdat
    --rbs-mode image``), would change nothing but the record: refused."""
    from robench.defense import param_names
    from robench.registry import DEFENSES

    cls = DEFENSES.get(defense)
    overrides = parse_overrides(options, "DEFENSE", "trades.lam=3")
    for name in overrides:
        DEFENSES.get(name)
    stray = sorted(set(overrides) - {defense})
    if stray:
        raise UserError(f"options given for defense(s) not trained: {', '.join(stray)}; this run trains {defense}")
    for param, value in shortcuts.items():
        if value is None or value is False:  # not typed (a flag can only switch a setting on)
            continue
        flag = "--" + param.replace("_", "-")
        if param not in param_names(cls):
            takers = [n for n in DEFENSES if param in param_names(DEFENSES[n])]
            raise UserError(f"{flag} has no effect on {defense}; it applies to: {', '.join(takers)}")
        set_option(overrides, defense, param, value, flag)
    return overrides.get(defense, {})


@command()
@click.argument("defense")
@dataset_option("See `robench list`.", default=DEFAULT_DATASET)
@data_dir_option("Where the dataset lives or downloads to [default: $ROBENCH_DATA or ~/.cache/robench/data].")
@click.option("--arch", default=None, help="Model architecture [default: the dataset's].")
@click.option("--steps", type=int, default=None, help="Optimiser steps [default: the dataset's, App. A].")
@batch_size_option(None, "Batch size [default: the dataset's: 32 as App. A on CIFAR/STL-10, 64 on digits].")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 1e-3, App. A].")
@click.option("-o", "--defense-option", "options", multiple=True,
              help="Defense setting, DEFENSE.PARAM=VALUE, repeatable (e.g. -o trades.lam=3); "
                   "`robench list` shows each defense's settings.")
@shortcut_options
@click.option("--flip/--no-flip", default=None, help="Random horizontal flip [default: the dataset's].")
@click.option("--n-train", type=int, default=None, help="Train on the first N training examples.")
@seed_option("The run's seed: initial weights, batch order and every random draw of training.")
@click.option("--name", default=None, help="Run name [default: DEFENSE-DATASET-sSEED].")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True)
@progress_option
@workdir_option
@device_options
def train(defense, dataset, data_dir, arch, steps, batch_size, lr, options, flip, n_train, seed, name, resume,
          checkpoint_every, log_every, progress, workdir, device, amp, compile_, **shortcuts):
    """Train DEFENSE (see `robench list`), e.g. `robench train rlfat-t --dataset cifar10`."""
    from robench.runtime import Runtime
    from robench.training import TrainConfig, train as run_training
    from robench.workdir import resolve_workdir

    settings = defense_options(defense, options, shortcuts)
    check_data_dir(data_dir, dataset)
    cfg = TrainConfig(defense, dataset, arch=arch, steps=steps, batch_size=batch_size, lr=lr, flip=flip,
                      seed=seed, n_train=n_train, options=settings)
    with distributed(device) as (d, device):
        result = run_training(cfg, resolve_workdir(workdir), Runtime.create(device, amp, compile_), name=name,
                              resume=resume, data_dir=data_dir, checkpoint_every=checkpoint_every,
                              log_every=log_every, progress=progress, dist=d)
    if d.main:
        meta = result.meta
        click.echo(f"trained {meta['defense']} on {meta['dataset']} for {meta['step']} steps "
                   f"({meta['train_seconds']:.1f} s): {result.run_dir}")


def describe_params(cls) -> str:
    """A defense's settings with their defaults, as ``-o`` takes them."""
    import dataclasses
    import json

    parts = []
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            parts.append(f"{f.name}=<dataset's>")
        else:
            parts.append(f"{f.name}={f.default if isinstance(f.default, str) else json.dumps(f.default)}")
    return ", ".join(parts) or "none"


@command(name="list")
@workdir_option
def list_(workdir):
    """List defenses (with their settings), attacks, datasets, architectures and the trained runs."""
    from robench.data import describe
    from robench.models import PATTERNS, arch_names
    from robench.registry import ATTACKS, DATASETS, DEFENSES
    from robench.workdir import existing_workdir, list_runs, resolve_workdir

    # A --workdir (or $ROBENCH_WORKDIR) that does not exist is a typo, not "no runs yet".
    explicit = workdir is not None or "ROBENCH_WORKDIR" in os.environ
    workdir = existing_workdir(workdir) if explicit else resolve_workdir(workdir)
    click.echo("defenses (settings: -o DEFENSE.PARAM=VALUE, defaults shown):")
    for name in DEFENSES:
        click.echo(f"  {name:10s} {DEFENSES[name].describe()}")
        click.echo(f"  {'':10s} {describe_params(DEFENSES[name])}")
    click.echo("attacks:")
    for name in ATTACKS:
        click.echo(f"  {name:10s} {(ATTACKS[name].__doc__ or '').strip().splitlines()[0]}")
    click.echo("datasets:")
    for name in DATASETS:
        click.echo(f"  {describe(name)}")
    click.echo(f"architectures: {', '.join(arch_names())} (and any {PATTERNS})")
    runs = list_runs(workdir)
    click.echo(f"trained runs in {workdir}: {len(runs) or 'none'}")
    for run_dir, meta in runs:
        state = "finished" if meta.get("finished") else "partial"
        click.echo(f"  {run_dir.name:28s} {meta['defense']:9s} {meta['dataset']:8s} {meta['arch']:10s} "
                   f"step {meta['step']}/{meta['config']['steps']} {state} "
                   f"sha256 {meta['files']['weights']['sha256'][:12]}")


COMMANDS = [train, list_]
