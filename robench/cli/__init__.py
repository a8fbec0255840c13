"""The ``robench`` command group, its error handling and the entry point; commands in the submodules."""

from __future__ import annotations

import sqlite3
import sys

import click

from robench.cli import analysis, evaluation, experiment, reporting, training, zoo
from robench.cli.options import Command, is_list_option
from robench.errors import UserError

__all__ = ["cli", "main", "is_list_option"]


class Group(click.Group):
    """A user's mistake (``UserError``, a bad option, a workdir or results database that cannot
    be written) is one ``error: ...`` line on stderr and exit code 2, never a traceback.

    Arguments that cannot mean what the user wanted are refused, not guessed at (``options``): a
    list option given twice, a list with an empty or repeated item, an empty or space-padded
    path, a path of the wrong kind, a workdir to read that does not exist, and a training option
    the chosen defense does not have. Commands: ``training`` (train, list), ``evaluation`` (eval,
    sensitivity, salience), ``reporting`` (report, demo)."""

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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robench")
def cli() -> None:
    """Train and benchmark robust image classifiers (RLFAT, ICLR 2020)."""


for _module in (training, evaluation, reporting, zoo, analysis, experiment):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="robench")
