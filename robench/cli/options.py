"""Options and argument checks shared by the commands (lists, paths, -o NAME.PARAM=VALUE)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import click

from robench.errors import UserError


class ListOption(click.Option):
    """A comma-separated list (``--attacks pgd,cw``): given twice it is refused (``Command``), and
    its items are checked by ``split_names``."""


def is_list_option(param: click.Parameter) -> bool:
    return isinstance(param, ListOption)


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


def command(name: str | None = None):
    """A robench command (``Command``: list options given twice are refused)."""
    return click.command(name=name, cls=Command)


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


# -- options several commands share: each defined here once ------------------------------------------

def list_option(*decls, **kwargs):
    return click.option(*decls, cls=ListOption, **kwargs)


def defense_option(help: str, required: bool = False):
    """--defense A,B: defense names (a run in the workdir, else the zoo's checkpoint, or zoo entries)."""
    return list_option("--defense", "defenses", default=None, required=required, help=help)


def attacks_option(help: str, default: str | None = None):
    return list_option("--attacks", default=default, show_default=default is not None, help=help)


def dataset_option(help: str = "See `robench list` [default: the dataset the defense was trained on].",
                   default: str | None = None):
    return click.option("--dataset", default=default, show_default=default is not None, help=help)


def data_dir_option(help: str = "Where the dataset's files are (an image folder's train/ and test/), or where "
                                "torchvision downloads them [default: robench's cache]."):
    return path_option("--data-dir", default=None, help=help)


def out_option(help: str, default: str | None = None):
    return path_option("--out", default=default, show_default=default is not None, help=help)


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def batch_size_option(default: int | None = 256,
                      help: str = "Images per batch; a speed setting that never changes an outcome."):
    return click.option("--batch-size", type=int, default=default, show_default=default is not None, help=help)


def seed_option(help: str):
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def progress_option(f):
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")(f)


def device_options(f):
    f = click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU).")(f)
    f = click.option("--amp/--no-amp", default=None,
                     help="bf16 autocast [default: on with CUDA, off on CPU, where it is faster on some "
                          "CPUs and slower on others: benchmarks/results/cpu_runtime.md].")(f)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)


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


@contextlib.contextmanager
def distributed(device: str):
    """Join torchrun's process group when launched by it; yields (Dist, this rank's device)."""
    from robench.distributed import device_for, from_env, shutdown

    d = from_env()
    try:
        yield d, device_for(device, d)
    except BaseException:
        shutdown(together=False)
        raise
    shutdown()


def parse_overrides(values: tuple[str, ...], kind: str = "ATTACK",
                    example: str = "nattack.population=100") -> dict[str, dict]:
    """``-o nattack.population=100`` -> {"nattack": {"population": 100}} (values parsed as JSON
    when they parse, e.g. numbers, true/false; else kept as strings). ``kind`` names what comes
    before the dot (ATTACK, DEFENSE). The same parameter given twice with different values is
    refused: which one was meant?"""
    out: dict[str, dict] = {}
    for item in values:
        target, sep, value = item.partition("=")
        name, dot, param = target.rpartition(".")  # attack names may hold dots: ta.square.n_queries
        if not sep or not dot or not name.strip() or not param.strip():
            raise UserError(f"-o {item!r}: expected {kind}.PARAM=VALUE, e.g. -o {example}")
        if name != name.strip() or param != param.strip():
            raise UserError(f"-o {item!r}: no spaces around {kind}.PARAM, e.g. -o {example}")
        if not value.strip():
            raise UserError(f"-o {item!r}: the value is empty")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        given = out.setdefault(name, {})
        if param in given and given[param] != parsed:
            raise UserError(f"-o {target} is given twice, with different values ({given[param]!r} and {parsed!r})")
        given[param] = parsed
    return out


def set_option(overrides: dict[str, dict], name: str, param: str, value: object, flag: str) -> None:
    """A shortcut flag (``--faithful``, ``--lam``) for what ``-o`` can also set; refused when
    they disagree."""
    given = overrides.setdefault(name, {})
    if param in given and given[param] != value:
        raise UserError(f"{flag} contradicts -o {name}.{param}={json.dumps(given[param])}; give one of them")
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
