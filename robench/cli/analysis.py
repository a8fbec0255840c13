"""The ``robench compare`` and ``robench export`` commands: analyses of stored results, re-running nothing."""

from __future__ import annotations

import click

from robench.cli.options import (attacks_option, command, dataset_option, defense_option, json_option, out_option,
                                  split_names, workdir_option)
from robench.errors import UserError


@command()
@defense_option("The two defenses to compare, comma-separated, e.g. rlfat-t,trades (differences are the "
                "first minus the second): the newest run trained in the workdir, else the zoo's checkpoint.")
@dataset_option()
@attacks_option("Comma-separated, clean for clean accuracy [default: every one stored for either defense].")
@json_option("the comparison")
@workdir_option
def compare(defenses, dataset, attacks, as_json, workdir):
    """Paired comparison of two defenses on the same test images, per attack at the default eps:
    difference in accuracy with its 95% interval, exact McNemar p, examples needed to resolve it."""
    import json

    from robench.comparison import compare_defenses, comparison_table
    from robench.workdir import existing_workdir

    attack_names = split_names(attacks, "--attacks") if attacks is not None else None
    if defenses is None:
        raise UserError("pass --defense A,B: the two defenses to compare, e.g. --defense rlfat-t,trades")
    names = split_names(defenses, "--defense")
    if len(names) != 2:
        raise UserError(f"--defense {defenses!r} names {len(names)} defense(s); compare exactly two, "
                        f"e.g. --defense rlfat-t,trades")
    result = compare_defenses(names, existing_workdir(workdir), dataset, attack_names)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else comparison_table(result))


@command()
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True,
              help="CSV, or JSON lines (one object per row).")
@out_option("File to write (atomically) [default: standard output].")
@defense_option("Only these defenses, comma-separated [default: all].")
@attacks_option("Only these attacks or sensitivity shifts, comma-separated (clean: clean accuracy) [default: all].")
@dataset_option("Only this dataset [default: all].")
@workdir_option
def export(fmt, out, defenses, attacks, dataset, workdir):
    """Write every stored per-example outcome, one row per example and result (see
    ``robench.outcomes_frame``), as CSV or JSON lines."""
    from robench.frame import outcomes_frame, write_frame
    from robench.workdir import existing_workdir

    attack_names = split_names(attacks, "--attacks") if attacks is not None else None
    names = split_names(defenses, "--defense") if defenses is not None else None
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; pass a file name, e.g. {out / f'outcomes.{fmt}'}")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
    workdir = existing_workdir(workdir)
    frame = outcomes_frame(workdir, names, attack_names, dataset)
    if frame.empty:
        given = [f"{o} {v}" for o, v in (("--defense", defenses), ("--attacks", attacks), ("--dataset", dataset)) if v]
        raise UserError(f"no stored results in {workdir}{' match ' + ' '.join(given) if given else ''}")
    text = write_frame(frame, fmt, out)
    if text is None:
        click.echo(f"wrote {len(frame)} rows to {out}")
    else:
        click.echo(text, nl=False)


COMMANDS = [compare, export]
