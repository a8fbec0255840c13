"""What the workdir holds and which stored rows the report shows: the public query API."""

from __future__ import annotations

import csv
import functools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from robench.config import DATASET_DEFAULTS
from robench.errors import UserError
from robench.report.plugins import CLEAN, attack_order, ordered
from robench.store import DB_NAME, Row, Store, canonical, common_examples, on_examples, worst_case
from robench.workdir import list_runs

EPS_TOL = 1e-6


@dataclass
class Run:
    """A reported checkpoint: a run trained in the workdir, or a zoo checkpoint evaluated there
    (``run_dir`` None, ``zoo`` its entry's name)."""

    run_dir: Path | None
    meta: dict
    zoo: str | None = None

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir is not None else f"zoo: {self.zoo}"

    @property
    def defense(self) -> str:
        return self.meta["defense"]

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def sha(self) -> str:
        return self.meta.get("files", {}).get("weights", {}).get("sha256", "")


@dataclass
class Reported:
    """The runs the report covers, their results, and what it leaves out."""

    path: Path
    runs: dict[tuple[str, str], Run]  # (dataset, defense) -> newest finished run, newest first
    others: list[Run]  # older or unfinished runs, not reported
    rows: dict[str, list[Row]]  # checkpoint sha256 -> its rows (reported runs only)
    ignored: list[Row] = field(default_factory=list)
    has_db: bool = False
    digests: dict[str, str] = field(default_factory=dict)  # dataset -> the test split's digest reported

    def datasets(self) -> list[str]:
        return sorted({ds for ds, _ in self.runs})

    def defenses(self, dataset: str) -> list[str]:
        return ordered(d for ds, d in self.runs if ds == dataset)

    def results(self, dataset: str, defense: str) -> list[Row]:
        run = self.runs.get((dataset, defense))
        return [] if run is None else self.rows.get(run.sha, [])


def load_workdir(workdir: Path) -> Reported:
    """Read the workdir's runs and results database; writes nothing there."""
    runs: dict[tuple[str, str], Run] = {}
    others: list[Run] = []
    for run_dir, meta in list_runs(workdir):  # newest first
        run = Run(run_dir, meta)
        key = (run.dataset, run.defense)
        if meta.get("finished") and key not in runs:
            runs[key] = run
        else:
            others.append(run)
    wd = Reported(Path(workdir), runs, others, {})
    # Store() would create an empty database; a report must not write into the workdir.
    if not (Path(workdir) / DB_NAME).exists():
        return wd
    wd.has_db = True
    with Store.in_workdir(workdir) as store:
        rows = store.rows()
    # A zoo checkpoint evaluated here is reported like a run, unless the workdir trained its own.
    for entry in _zoo_entries({row.key.checkpoint for row in rows}):
        if (entry.dataset, entry.defense) not in runs:
            runs[(entry.dataset, entry.defense)] = Run(None, entry.record(), entry.name)
    reported = {run.sha: run for run in runs.values()}
    # One version of each dataset's test split (its digest) per report, the one most results
    # were measured on, so every comparison is on the same examples.
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        counts[(row.key.dataset, row.key.data)] += 1
    digest = {ds: data for (ds, data), _ in sorted(counts.items(), key=lambda kv: kv[1])}
    for row in rows:
        run = reported.get(row.key.checkpoint)
        if run is not None and row.key.dataset == run.dataset and row.key.data == digest[run.dataset]:
            wd.rows.setdefault(run.sha, []).append(row)
        else:
            wd.ignored.append(row)
    wd.digests = digest
    return wd


def _zoo_entries(checkpoints: set[str]) -> list:
    """The zoo entries (robench's own models, no external normalisation) whose checkpoint has
    stored results; a broken extra manifest must not sink the report."""
    from robench import zoo
    from robench.errors import UserError

    try:
        return [e for e in zoo.entries() if e.sha256 in checkpoints and e.mean is None]
    except UserError:
        return []


def params(row: Row) -> dict:
    return json.loads(row.key.params)


def eps_of(row: Row) -> float | None:
    eps = params(row).get("eps")
    return None if eps is None else float(eps)


def same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=EPS_TOL, abs_tol=1e-12)


def pick(rows: Iterable[Row]) -> Row | None:
    """The row with the most examples; the newest among equals."""
    rows = list(rows)
    return max(rows, key=lambda r: (r.key.n, r.created)) if rows else None


def norm_of(row: Row) -> str:
    """The threat model of a stored row: its ``norm`` parameter, "linf" for clean rows and rows
    stored before attacks had one (AutoAttack's former "Linf" included)."""
    return str(params(row).get("norm", "linf")).lower()


def l2_eps(dataset: str) -> float | None:
    """The dataset's default L2 radius (``--norm l2``), None where no paper gives one."""
    defaults = DATASET_DEFAULTS.get(dataset)
    return defaults.l2_eps if defaults is not None else None


def default_eps(run: Run) -> float:
    defaults = DATASET_DEFAULTS.get(run.dataset)
    return defaults.eps if defaults is not None else float(run.meta["objective"].get("eps", "nan"))


@functools.lru_cache(maxsize=None)
def _default_params(name: str, dataset: str, eps: float | None, norm: str = "linf") -> str | None:
    from robench.attack import make_attack

    try:
        return canonical(make_attack(name, dataset, eps, None if norm == "linf" else {"norm": norm}).params())
    except UserError:  # an attack no longer registered, a dataset without defaults, an unknown norm
        return None


def differs(row: Row) -> dict:
    """The parameters in which ``row`` differs from its attack's defaults at its eps and threat
    model ({}: none)."""
    if row.key.kind != "attack" or row.key.name == CLEAN:
        return {}
    norm = norm_of(row)
    ref = _default_params(row.key.name, row.key.dataset, eps_of(row), norm)
    if ref is None:
        return {k: v for k, v in params(row).items() if k != "eps"}
    ref = json.loads(ref)
    mine = {**params(row), **({"norm": norm} if "norm" in params(row) else {})}
    return {k: v for k, v in mine.items() if ref.get(k, object()) != v}


def is_default(row: Row) -> bool:
    """Measured at the dataset's default attack parameters (at the row's eps and threat model)."""
    return not differs(row)


def attack_row(rows: list[Row], name: str, eps: float | None = None, norm: str = "linf") -> Row | None:
    """The chosen row of attack ``name`` (``"clean"``: the clean row, in every threat model) at
    ``eps`` in threat model ``norm``, at the dataset's default parameters; a row with other
    parameters or another threat model is never chosen."""
    matching = [r for r in rows if r.key.kind == "attack" and r.key.name == name and r.key.split == "test"
                and (name == CLEAN or (same(eps_of(r), eps) and norm_of(r) == norm)) and is_default(r)]
    return pick(matching)


def sort_key(row: Row) -> tuple:
    p = params(row)
    return (row.key.kind, row.key.name, float(p.get("eps", p.get("value", -1.0))), row.key.n, row.created)


def other_settings(rows: list[Row], norm: str = "linf") -> list[Row]:
    """Attack rows of threat model ``norm`` at non-default parameters, which Table 1 (or the L2
    table) and the checks leave out."""
    return sorted((r for r in rows if r.key.kind == "attack" and norm_of(r) == norm and not is_default(r)),
                  key=sort_key)


def table1_rows(wd: Reported, dataset: str, defense: str, norm: str = "linf") -> dict[str, Row]:
    """Clean and every attack at the dataset's default eps of threat model ``norm`` (L-inf:
    Table 1), in column order; {} for L2 on a dataset without a default L2 radius."""
    rows = wd.results(dataset, defense)
    eps = default_eps(wd.runs[(dataset, defense)]) if norm == "linf" else l2_eps(dataset)
    if eps is None:
        return {}
    known = attack_order()
    names = [CLEAN, *known, *sorted({r.key.name for r in rows if r.key.kind == "attack"} - {CLEAN, *known})]
    found = {name: attack_row(rows, name, eps, norm) for name in names}
    return {name: row for name, row in found.items() if row is not None}


def eps_series(rows: list[Row], attack: str, norm: str = "linf") -> dict[float, Row]:
    """The chosen row per eps for one attack in threat model ``norm``."""
    by_eps: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        if (r.key.kind == "attack" and r.key.name == attack and r.key.split == "test" and eps_of(r) is not None
                and norm_of(r) == norm and is_default(r)):
            by_eps[round(eps_of(r), 9)].append(r)
    return {eps: pick(group) for eps, group in sorted(by_eps.items())}


def sensitivity_series(rows: list[Row], transform: str) -> dict[float, Row]:
    by_value: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        if r.key.kind == "sensitivity" and r.key.name == transform:
            by_value[round(float(params(r)["value"]), 9)].append(r)
    return {v: pick(group) for v, group in sorted(by_value.items())}


def sensitivity_at(rows: list[Row], transform: str, value: float) -> Row | None:
    series = sensitivity_series(rows, transform)
    return next((r for v, r in series.items() if same(v, value)), None)


def worst(rows: dict[str, Row]) -> tuple[float, int]:
    return worst_case(list(rows.values()))


def mean_robust(rows: dict[str, Row]) -> tuple[float | None, list[str], int]:
    """Mean accuracy over the registered attacks in ``rows``, each on the examples common to all
    of them; returns (mean, attacks averaged, number of common examples)."""
    attacks = [a for a in attack_order() if a in rows]
    if not attacks:
        return None, [], 0
    start, stop = common_examples([rows[a] for a in attacks])
    if stop == start:
        return None, attacks, 0
    return float(np.mean([(on_examples(rows[a], start, stop) > 0.5).mean() for a in attacks])), attacks, stop - start


def read_log(run: Run) -> list[dict[str, float]]:
    if run.run_dir is None:  # a zoo checkpoint: no training log here
        return []
    path = run.run_dir / "train_log.csv"
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                out.append({k: float(row[k]) for k in ("step", "loss", "train_acc")})
            except (KeyError, TypeError, ValueError):
                continue  # a malformed line should not sink the whole report
    return out
