"""What the workdir lacks for a full report, each with the command that makes it."""

from __future__ import annotations

from robench.report.cells import eps_text
from robench.report.checks import LARGE_EPS, large_eps_command
from robench.report.figures import salience_png
from robench.registry import ATTACKS
from robench.report.plugins import CLEAN, attack_order, defense_order, label, paper_attacks, sweep_attack
from robench.report.queries import Reported, default_eps, eps_series, read_log, sensitivity_at, table1_rows
from robench.sensitivity import PAPER_POINTS
from robench.store import DB_NAME


def missing_pieces(wd: Reported) -> list[str]:
    items: list[str] = []
    if not wd.runs:
        items.append("no finished trained runs in the workdir; train the paper's defenses, e.g. "
                     + ", ".join(f"`robench train {d} --dataset digits`" for d in defense_order()))
    for run in wd.others:
        if not run.meta.get("finished"):
            items.append(f"run `{run.run_dir.name}` ({run.defense} on {run.dataset}) stopped at step "
                         f"{run.meta.get('step')}/{run.meta.get('config', {}).get('steps')}; continue it with "
                         f"`robench train {run.defense} --dataset {run.dataset} --name {run.run_dir.name} --resume`")
    for ds in wd.datasets():
        items += missing_for_dataset(wd, ds)
    if wd.runs and not wd.has_db:
        items.append(f"no results database ({DB_NAME}) in the workdir; nothing has been evaluated yet")
    return items


def missing_for_dataset(wd: Reported, ds: str) -> list[str]:
    items = [f"no trained {d} on {ds}; run `robench train {d} --dataset {ds}`"
             for d in defense_order() if (ds, d) not in wd.runs]
    for d in wd.defenses(ds):
        items += missing_for_run(wd, ds, d)
    if not salience_png(wd.path, ds).exists():
        items.append(f"no salience figure for {ds}; run "
                     f"`robench salience --defense {','.join(wd.defenses(ds))} --dataset {ds}`")
    return items


def missing_for_run(wd: Reported, ds: str, d: str) -> list[str]:
    items = []
    run = wd.runs[(ds, d)]
    eps = default_eps(run)
    t1 = table1_rows(wd, ds, d)
    if CLEAN not in t1:
        items.append(f"no clean accuracy for {d} on {ds}; run `robench eval --defense {d} --dataset {ds} "
                     f"--attacks {sweep_attack()}` (every eval also stores clean accuracy)")
    asked = paper_attacks()
    for a in asked:
        if a not in t1:
            items.append(f"no {label(a)} results for {d} on {ds} at ε = {eps_text(eps)}; run "
                         f"`robench eval --defense {d} --dataset {ds} --attacks {a}`")
    for a in attack_order():
        if a not in asked and a not in t1 and ATTACKS.get(a).core:
            items.append(f"(optional) no {label(a)} results for {d} on {ds}; run "
                         f"`robench eval --defense {d} --dataset {ds} --attacks {a}`")
    rows = wd.results(ds, d)
    if not all(sensitivity_at(rows, t, v) for t, vs in PAPER_POINTS.items() for v in vs):
        items.append(f"no (or incomplete) loss-sensitivity results for {d} on {ds}; run "
                     f"`robench sensitivity --defense {d} --dataset {ds}`")
    if not any(e >= LARGE_EPS for a in attack_order() for e in eps_series(rows, a)):
        items.append(f"(sanity check) no attack at ε ≥ {LARGE_EPS:g} for {d} on {ds}; run "
                     f"`{large_eps_command(ds, d)}`")
    if run.run_dir is not None and not read_log(run):
        items.append(f"no training log for {d} on {ds} ({run.run_dir / 'train_log.csv'})")
    return items


def section_missing(wd: Reported) -> list[str]:
    items = missing_pieces(wd)
    lines = ["## Missing pieces", ""]
    return lines + ([f"- {i}" for i in items] if items else ["Nothing is missing."]) + [""]
