"""The ``robench eval``, ``robench sensitivity`` and ``robench salience`` commands."""

from __future__ import annotations

import click

from robench.cli.options import (attacks_option, batch_size_option, check_data_dir, command, data_dir_option,
                                 dataset_option, defense_option, device_options, distributed, json_option, list_option,
                                 parse_overrides, path_option, progress_option, seed_option, set_option, split_eps,
                                 split_names, workdir_option)
from robench.errors import UserError


@command(name="eval")
@defense_option("Defense(s), comma-separated, e.g. rlfat-p,trades: the newest run trained in the workdir, "
                "else the zoo's checkpoint; or zoo entries by name (`robench zoo list`).")
@click.option("--zoo", "zoo_only", is_flag=True,
              help="Use the zoo's checkpoints even where the workdir has a trained run.")
@path_option("--checkpoint", "checkpoint_path", default=None,
             help="Evaluate a model file trained elsewhere (.safetensors or a weights-only state dict).")
@click.option("--arch", default=None,
              help="Architecture of --checkpoint [default: the dataset's]: a name from `robench list` (e.g. "
                   "rb-wrn-28-10, dm-wrn-70-16, preact-resnet-18, resnet-18), or package.module:factory.")
@click.option("--checkpoint-key", type=click.Choice(["best", "last"]), default=None,
              help="Which model of a --checkpoint file holding {'best': ..., 'last': ...} (some RobustBench "
                   "entries; its own loader takes 'last') [default: best].")
@click.option("--mean", default=None,
              help="--checkpoint's input normalisation (x - mean) / std, applied inside the model: one mean "
                   "per channel (e.g. 0.4914,0.4822,0.4465) or one for all, or cifar10 / cifar100 / none; needs "
                   "--std. Replaces dm-wrn's own (RobustBench's CIFAR statistics).")
@click.option("--std", default=None,
              help="The std of that normalisation, per channel (e.g. 0.2471,0.2435,0.2616) or one for all, "
                   "or cifar10 / cifar100 / none; needs --mean.")
@dataset_option()
@data_dir_option()
@attacks_option("Comma-separated; see `robench list`.", default="pgd,cw,nattack")
@click.option("--n", "--n-examples", "n", type=int, default=None,
              help="First N test images (--n-examples under torchrun, whose parser claims --n) [default: the whole test set; 1500 for nattack, as in the paper].")
@click.option("--norm", type=click.Choice(["linf", "l2"], case_sensitive=False), default=None,
              help="Threat model of every attack in --attacks [default: linf, the paper's]; l2: --eps "
                   "values are L2 radii [default: the dataset's, e.g. 0.5 on CIFAR-10]. -o ATTACK.norm=l2 "
                   "sets one attack's.")
@list_option("--eps", default=None,
             help="Radius (L-inf, or L2 with --norm l2), or several comma-separated for an accuracy-vs-eps "
             "curve [default: the dataset's]; the step size keeps the dataset's step/eps ratio.")
@click.option("-o", "--attack-option", "options", multiple=True,
              help="Attack parameter, ATTACK.PARAM=VALUE, repeatable (e.g. -o nattack.iterations=100).")
# The N-attack's own settings are -o options; these two spellings stay for one release (hidden).
@click.option("--faithful", is_flag=True, hidden=True, help="Deprecated: -o nattack.faithful=true.")
@click.option("--nattack-chunk", type=int, default=None, hidden=True, help="Deprecated: -o nattack.chunk=N.")
@batch_size_option()
@seed_option("Every attack's seed (each random draw depends on it and the example's index).")
@json_option("the results")
@progress_option
@workdir_option
@device_options
def eval_(defenses, zoo_only, checkpoint_path, checkpoint_key, arch, mean, std, dataset, data_dir, attacks, n, norm,
          eps, options, faithful, nattack_chunk, batch_size, seed, as_json, progress, workdir, device, amp, compile_):
    """Evaluate defenses under attacks, e.g. `robench eval --defense rlfat-p --attacks pgd,cw,nattack`."""
    import json

    from robench.evaluation import run_eval
    from robench.runtime import Runtime
    from robench.workdir import resolve_workdir

    if (defenses is None) == (checkpoint_path is None):
        raise UserError("pass --defense NAME[,NAME...] (trained in the workdir, or from the zoo) or --checkpoint FILE")
    if zoo_only and defenses is None:
        raise UserError("--zoo picks the zoo's checkpoints of --defense; it does not apply to --checkpoint")
    if checkpoint_path is not None and checkpoint_path.is_dir():
        raise UserError(f"--checkpoint {checkpoint_path} is a directory; pass the model file (.safetensors, .pt)")
    if checkpoint_key is not None and checkpoint_path is None:
        raise UserError("--checkpoint-key applies to --checkpoint only")
    if arch is not None and checkpoint_path is None:
        raise UserError("--arch applies to --checkpoint only; a trained run records its own architecture")
    if (mean is not None or std is not None) and checkpoint_path is None:
        raise UserError("--mean/--std apply to --checkpoint only; a trained run's model owns its normalisation")
    if (mean is None) != (std is None):
        raise UserError("--mean and --std go together: give both")
    if mean is not None:
        from robench.models.normalize import parse_stats

        mean, std = parse_stats(mean, "--mean", 0), parse_stats(std, "--std", 1)
    names = split_names(defenses, "--defense") if defenses is not None else []
    attack_names = split_names(attacks, "--attacks")
    workdir = resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    overrides = parse_overrides(options)
    if faithful:
        set_option(overrides, "nattack", "faithful", True, "--faithful")
        click.echo("note: --faithful is deprecated; use -o nattack.faithful=true", err=True)
    if nattack_chunk is not None:
        set_option(overrides, "nattack", "chunk", nattack_chunk, "--nattack-chunk")
        click.echo(f"note: --nattack-chunk is deprecated; use -o nattack.chunk={nattack_chunk}", err=True)
    if norm is not None:
        set_norm(overrides, attack_names, norm)
    eps_list = split_eps(eps) if eps is not None else [None]
    if eps is not None:
        both = sorted(a for a, params in overrides.items() if "eps" in params)
        if both:
            raise UserError(f"--eps and -o {both[0]}.eps both set the radius; give one of them")
    with distributed(device) as (d, device):
        report = run_eval(
            defenses=names, checkpoint_path=checkpoint_path, checkpoint_key=checkpoint_key,
            arch=arch, mean=mean, std=std, dataset=dataset, data_dir=data_dir, attacks=attack_names, n=n,
            eps_list=eps_list, overrides=overrides, batch_size=batch_size, seed=seed,
            workdir=workdir, runtime=Runtime.create(device, amp, compile_), progress=progress, dist=d,
            zoo_only=zoo_only)
    if d.main:
        click.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.table())


def set_norm(overrides: dict[str, dict], attack_names: list[str], norm: str) -> None:
    """``--norm``: every attack's threat model, refused for an attack that does not implement it."""
    from robench.registry import ATTACKS

    for name in attack_names:
        supported = ATTACKS.get(name).norms
        if norm not in supported:
            raise UserError(f"--norm {norm}: attack {name} supports {', '.join(supported)} only; "
                            f"drop it from --attacks or use --norm {supported[0]}")
        set_option(overrides, name, "norm", norm, f"--norm {norm}")


@command()
@defense_option("Trained defense(s), comma-separated.", required=True)
@dataset_option()
@data_dir_option()
@click.option("--n", "--n-examples", "n", type=int, default=None, help="First N test images [default: all].")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Also sweep brightness and gamma over a range, for the report's curves.")
@batch_size_option()
@progress_option
@workdir_option
@device_options
def sensitivity(defenses, dataset, data_dir, n, sweep, batch_size, progress, workdir, device, amp, compile_):
    """Loss sensitivity under brightness and gamma shifts (paper section 4.3, Table 2)."""
    import json

    from robench.runtime import Runtime
    from robench.sensitivity import PAPER_POINTS, run_sensitivity
    from robench.workdir import resolve_workdir

    names, workdir = split_names(defenses, "--defense"), resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    rows = run_sensitivity(names, workdir,
                           Runtime.create(device, amp, compile_), dataset, data_dir, n, sweep, batch_size, progress)
    click.echo("loss sensitivity l = mean ||grad_x CE||_2 (paper Table 2 points)")
    for row in rows:
        value = json.loads(row.key.params)["value"]
        if value in PAPER_POINTS[row.key.name]:
            click.echo(f"  {row.defense:10s} {row.key.dataset:8s} {row.key.name:10s} {value:+.2f}  {row.value:.4f}")


@command()
@defense_option("Trained defenses, comma-separated.", required=True)
@dataset_option()
@data_dir_option()
@click.option("--n-images", type=int, default=6, show_default=True)
@click.option("--samples", type=int, default=50, show_default=True, help="SmoothGrad noise samples.")
@click.option("--stdev", type=float, default=0.15, show_default=True, help="SmoothGrad noise (pixel units).")
@seed_option("SmoothGrad's noise seed.")
@workdir_option
@device_options
def salience(defenses, dataset, data_dir, n_images, samples, stdev, seed, workdir, device, amp, compile_):
    """SmoothGrad salience maps of the same images for each defense (paper Figure 3)."""
    from robench.runtime import Runtime
    from robench.salience import run_salience
    from robench.workdir import resolve_workdir

    if samples <= 0 or stdev < 0:
        raise UserError("--samples must be positive and --stdev non-negative")
    names, workdir = split_names(defenses, "--defense"), resolve_workdir(workdir)
    check_data_dir(data_dir, dataset, names, workdir)
    png = run_salience(names, workdir,
                       Runtime.create(device, amp, compile_), dataset, data_dir, n_images, samples, stdev, seed)
    click.echo(f"wrote {png}")


COMMANDS = [eval_, sensitivity, salience]
