"""Provenance: which runs and results the report covers, and which stored ones it ignores."""

from __future__ import annotations

from collections import defaultdict

from robench.report.cells import md_table, pct, result_label
from robench.report.queries import Reported, Run, params, sort_key
from robench.store import Row

TRAINING_KEYS = ("batch_size", "lr", "seed")  # beside the defense's own settings (its "objective")
RUN_HEAD = ["defense", "dataset", "arch", "sha256 (16)", "step", "hyper-parameters", "versions", "device",
            "train time", "saved", "run"]


def run_row(run: Run) -> list[str]:
    m = run.meta
    cfg = m.get("config", {})
    # The objective record holds exactly the defense's settings, a plugin's own ones included.
    settings = {**m.get("objective", {}), **{k: cfg[k] for k in TRAINING_KEYS if cfg.get(k) is not None}}
    hp = ", ".join(f"{k}={v}" for k, v in settings.items())
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    seconds = m.get("train_seconds")
    return [m["defense"], m["dataset"], m.get("arch", "?"), f"`{run.sha[:16]}`",
            f"{m.get('step')}/{cfg.get('steps')}", hp, versions, m.get("runtime", {}).get("device", "?"),
            "?" if seconds is None else f"{seconds:.0f} s", m.get("saved_at", "?"), run.name]


def section_provenance(wd: Reported) -> list[str]:
    lines = ["## Provenance", "", "### Runs reported", ""]
    runs = [wd.runs[(ds, d)] for ds in wd.datasets() for d in wd.defenses(ds)]
    lines += md_table(RUN_HEAD, [run_row(r) for r in runs]) if runs else ["None.", ""]
    if wd.others:
        lines += ["### Runs not reported (older, or unfinished)", ""]
        lines += md_table(RUN_HEAD, [run_row(r) for r in wd.others])
    lines += ["### Results", ""] + results_table(wd, runs) + sensitivity_summary(wd, runs)
    return lines + ignored_lines(wd)


def results_table(wd: Reported, runs: list[Run]) -> list[str]:
    body = []
    for run in runs:
        for r in sorted(wd.rows.get(run.sha, []), key=sort_key):
            if r.key.kind == "attack":
                body.append([run.defense, run.dataset, result_label(r), str(r.key.n), f"{pct(r.value)}%",
                             f"{r.wall_s:.1f} s", r.device, r.created])
    if not body:
        return ["No accuracy results stored for the reported runs.", ""]
    return md_table(["defense", "dataset", "result", "n", "accuracy", "wall", "device", "created"], body)


def sensitivity_summary(wd: Reported, runs: list[Run]) -> list[str]:
    """One line per (run, shift): a sweep is 13 rows, too many to list one by one."""
    body = []
    for run in runs:
        by_name: dict[str, list[Row]] = defaultdict(list)
        for r in wd.rows.get(run.sha, []):
            if r.key.kind == "sensitivity":
                by_name[r.key.name].append(r)
        for name, rows in sorted(by_name.items()):
            values = sorted(float(params(r)["value"]) for r in rows)
            body.append([run.defense, run.dataset, name, f"{len(rows)} ({values[0]:g} … {values[-1]:g})",
                         "/".join(map(str, sorted({r.key.n for r in rows}))), f"{sum(r.wall_s for r in rows):.1f} s",
                         ", ".join(sorted({r.device for r in rows}))])
    if not body:
        return []
    return ["Loss sensitivity:", "", *md_table(["defense", "dataset", "shift", "values", "n", "wall (total)",
                                               "device"], body)]


def ignored_lines(wd: Reported) -> list[str]:
    if not wd.ignored:
        return []
    known = {run.sha: run for run in wd.others}
    groups: dict[tuple, int] = defaultdict(int)
    for r in wd.ignored:
        run = known.get(r.key.checkpoint)
        if r.key.data != wd.digests.get(r.key.dataset, r.key.data):
            why = f"measured on another version of the {r.key.dataset} test split (digest `{r.key.data}`)"
        elif run:
            why = f"older or unfinished run `{run.name}`"
        else:
            why = "checkpoint not among this workdir's runs (e.g. `robench eval --checkpoint FILE`)"
        groups[(r.defense, r.key.dataset, r.key.checkpoint[:16], why)] += 1
    body = [[d, ds, f"`{sha}`", str(n), why] for (d, ds, sha, why), n in sorted(groups.items())]
    return ["### Results ignored", "", f"{len(wd.ignored)} stored result(s) belong to checkpoints this report "
            "does not cover:", "", *md_table(["label", "dataset", "sha256 (16)", "results", "why"], body)]
