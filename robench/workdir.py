"""The working directory: trained runs under ``runs/<name>/`` and the results database.

Default ``./robench-runs``, overridden by ``--workdir`` or ``ROBENCH_WORKDIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

from robench import checkpoint
from robench.errors import UserError


def default_workdir() -> Path:
    """``$ROBENCH_WORKDIR`` (``~`` expanded) or ``./robench-runs``. A set but blank variable is
    refused rather than read as the current directory."""
    value = os.environ.get("ROBENCH_WORKDIR")
    if value is None:
        return Path("robench-runs")
    if not value.strip():
        raise UserError("$ROBENCH_WORKDIR is empty; unset it or set it to a directory")
    if value != value.strip():
        raise UserError(f"$ROBENCH_WORKDIR {value!r} starts or ends with a space")
    return Path(value).expanduser()


def resolve_workdir(workdir: Path | None) -> Path:
    """``--workdir`` as given, else the default; a file, a run's own folder or a workdir's runs/
    folder given instead of the workdir is refused."""
    workdir = workdir if workdir is not None else default_workdir()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a directory; pass another --workdir")
    if (workdir / checkpoint.META).is_file():
        raise UserError(f"workdir {workdir} is a run's folder; pass the workdir that holds it: "
                        f"--workdir {workdir.parent.parent}")
    if workdir.name == "runs" and any(workdir.glob(f"*/{checkpoint.META}")) \
            and not (workdir / "runs").exists():
        raise UserError(f"workdir {workdir} is the runs/ folder of a workdir; pass --workdir {workdir.parent}")
    return workdir


def existing_workdir(workdir: Path | None) -> Path:
    """The workdir of a command that only reads one: it must exist (else it is a typo)."""
    resolved = resolve_workdir(workdir)
    if not resolved.exists():
        raise UserError(f"workdir {resolved} does not exist; pass the --workdir you trained in")
    return resolved


def runs_dir(workdir: Path) -> Path:
    return Path(workdir) / "runs"


def list_runs(workdir: Path) -> list[tuple[Path, dict]]:
    """Every run with a readable checkpoint record, newest first."""
    found = []
    for meta_path in sorted(runs_dir(workdir).glob(f"*/{checkpoint.META}")):
        try:
            found.append((meta_path.parent, checkpoint.read_meta(meta_path)))
        except UserError:
            continue
    return sorted(found, key=lambda r: r[1].get("saved_at", ""), reverse=True)


def unreadable_runs(workdir: Path) -> list[str]:
    """The error of every run directory whose checkpoint record cannot be read."""
    broken = []
    for meta_path in sorted(runs_dir(workdir).glob(f"*/{checkpoint.META}")):
        try:
            checkpoint.read_meta(meta_path)
        except UserError as e:
            broken.append(str(e))
    return broken


def find_run(workdir: Path, defense: str, dataset: str | None = None) -> tuple[Path, dict]:
    """The newest finished run of ``defense`` (on ``dataset`` if given) in the workdir."""
    runs = [(d, m) for d, m in list_runs(workdir) if m["defense"] == defense and m.get("finished")]
    if dataset is not None:
        runs = [(d, m) for d, m in runs if m["dataset"] == dataset]
    if not runs:
        broken = unreadable_runs(workdir)
        if broken:  # say why a run that is there was not used, rather than "train one"
            raise UserError(f"no readable trained {defense!r} checkpoint in {workdir}; {len(broken)} run(s) "
                            f"there cannot be read: {broken[0]}")
        on = f" --dataset {dataset}" if dataset else " --dataset DATASET"
        raise UserError(f"no trained {defense!r} checkpoint{' for ' + dataset if dataset else ''} in "
                        f"{workdir}; make one with: robench train {defense}{on} --workdir {workdir}")
    datasets = sorted({m["dataset"] for _, m in runs})
    if len(datasets) > 1:
        raise UserError(f"{defense!r} was trained on several datasets in {workdir} ({', '.join(datasets)}); "
                        f"pass --dataset")
    return runs[0]
