"""The benchmark report: Markdown plus PNG figures, built only from the workdir.

It reads the trained runs (``runs/*/checkpoint.json``, ``train_log.csv``), the results database
and ``salience/<dataset>.png``; it never trains or attacks anything. Only the newest finished run
per (defense, dataset) is reported; results of other checkpoints are listed as ignored in the
provenance section. Everything that is missing is listed with the command that makes it, and
signs of gradient masking are flagged, never hidden.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from robench import atomic, paper
from robench.config import DATASET_DEFAULTS
from robench.errors import UserError
from robench.plots import BarPanel, LinePanel, bars_figure, lines_figure, rbs_figure
from robench.store import DB_NAME, Row, Store, canonical, common_examples, on_examples, wilson, worst_case
from robench.sensitivity import PAPER_POINTS
from robench.workdir import list_runs

REPORT = "report.md"
# The paper's defenses and ablations, in the order of its tables (then any others, sorted).
DEFENSE_ORDER = ("standard", "pgdat", "trades", "rbsat-p", "rlfat-p", "rbsat-t", "rlfat-t")
ATTACK_ORDER = ("pgd", "cw", "nattack", "autoattack")
PAPER_ATTACKS = ("pgd", "cw", "nattack")  # a missing one of these is listed as missing
WHITE_BOX = ("pgd", "cw", "autoattack")
BLACK_BOX = ("nattack",)
LABELS = {"clean": "clean", "pgd": "PGD", "cw": "CW", "nattack": "N-attack", "autoattack": "AutoAttack"}
ABLATION_CHAINS = (("pgdat", "rbsat-p", "rlfat-p"), ("trades", "rbsat-t", "rlfat-t"))
DATASET_LABELS = {
    "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10",
    "digits": "digits (8x8, scikit-learn)", "folder": "folder (e.g. CIFAR-10 JPEG copy)",
}
# Whose paper numbers to print beside ours; the image folder is usually the CIFAR-10 JPEG copy.
PAPER_DATASET = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10", "folder": "cifar10"}
LARGE_EPS = 0.5  # at this radius an L-inf attack should leave almost nothing correct
MASKING_POINTS = 1.0  # accuracy gaps (percentage points) that count as suspicious
LARGE_EPS_MAX_ACC = 0.05
EPS_TOL = 1e-6


# -- what the workdir holds ---------------------------------------------------------------------

@dataclass
class Run:
    run_dir: Path
    meta: dict

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
class Workdir:
    """The runs the report covers, their results, and what it leaves out."""

    path: Path
    runs: dict[tuple[str, str], Run]  # (dataset, defense) -> newest finished run
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


def ordered(defenses: Iterable[str]) -> list[str]:
    names = set(defenses)
    return [d for d in DEFENSE_ORDER if d in names] + sorted(names - set(DEFENSE_ORDER))


def load_workdir(workdir: Path) -> Workdir:
    runs: dict[tuple[str, str], Run] = {}
    others: list[Run] = []
    for run_dir, meta in list_runs(workdir):  # newest first
        run = Run(run_dir, meta)
        key = (run.dataset, run.defense)
        if meta.get("finished") and key not in runs:
            runs[key] = run
        else:
            others.append(run)
    wd = Workdir(Path(workdir), runs, others, {})
    # Store() would create an empty database; a report must not write into the workdir.
    if not (Path(workdir) / DB_NAME).exists():
        return wd
    wd.has_db = True
    reported = {run.sha: run for run in runs.values()}
    with Store.in_workdir(workdir) as store:
        rows = store.rows()
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


# -- picking rows ---------------------------------------------------------------------------------

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


def default_eps(run: Run) -> float:
    defaults = DATASET_DEFAULTS.get(run.dataset)
    return defaults.eps if defaults is not None else float(run.meta["config"]["eps"])


@functools.lru_cache(maxsize=None)
def _default_params(name: str, dataset: str, eps: float | None) -> str | None:
    from robench.evaluate import make_attack

    try:
        return canonical(make_attack(name, dataset, eps).params())
    except UserError:  # an attack no longer registered, or a dataset without defaults
        return None


def differs(row: Row) -> dict:
    """The parameters in which ``row`` differs from its attack's defaults at its eps ({}: none)."""
    if row.key.kind != "attack" or row.key.name == "clean":
        return {}
    ref = _default_params(row.key.name, row.key.dataset, eps_of(row))
    if ref is None:
        return {k: v for k, v in params(row).items() if k != "eps"}
    ref = json.loads(ref)
    return {k: v for k, v in params(row).items() if ref.get(k, object()) != v}


def is_default(row: Row) -> bool:
    """Measured at the dataset's default attack parameters (at the row's eps)."""
    return not differs(row)


def setting_text(row: Row) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(differs(row).items()))


def attack_row(rows: list[Row], name: str, eps: float | None = None) -> Row | None:
    """The chosen row of attack ``name`` (``"clean"``: the clean row) at ``eps``, at the
    dataset's default parameters; a row with other parameters is never chosen."""
    matching = [r for r in rows if r.key.kind == "attack" and r.key.name == name and r.key.split == "test"
                and (name == "clean" or same(eps_of(r), eps)) and is_default(r)]
    return pick(matching)


def other_settings(rows: list[Row]) -> list[Row]:
    """Attack rows at non-default parameters, which Table 1 and the checks leave out."""
    return sorted((r for r in rows if r.key.kind == "attack" and not is_default(r)), key=sort_key)


def table1_rows(wd: Workdir, dataset: str, defense: str) -> dict[str, Row]:
    """Clean and every attack at the dataset's default eps, in column order."""
    rows = wd.results(dataset, defense)
    eps = default_eps(wd.runs[(dataset, defense)])
    names = ["clean", *ATTACK_ORDER, *sorted({r.key.name for r in rows if r.key.kind == "attack"}
                                             - {"clean", *ATTACK_ORDER})]
    found = {name: attack_row(rows, name, eps) for name in names}
    return {name: row for name, row in found.items() if row is not None}


def eps_series(rows: list[Row], attack: str) -> dict[float, Row]:
    """The chosen row per eps for one attack."""
    by_eps: dict[float, list[Row]] = defaultdict(list)
    for r in rows:
        if (r.key.kind == "attack" and r.key.name == attack and r.key.split == "test" and eps_of(r) is not None
                and is_default(r)):
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


# -- formatting -----------------------------------------------------------------------------------

def md_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (pipes in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(head), "|" + "|".join("---" for _ in head) + "|", *(line(r) for r in body), ""]


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def acc_cell(value: float, ci: tuple[float, float] | None) -> str:
    return pct(value) if ci is None else f"{pct(value)} [{pct(ci[0])}–{pct(ci[1])}]"


def num(value: float) -> str:
    """Three significant digits, trailing zeros kept (1.30, 0.432, 12.0)."""
    return f"{value:#.3g}".rstrip(".")


def sens_cell(row: Row | None) -> str:
    if row is None:
        return "—"
    return num(row.value) if row.ci is None else f"{num(row.value)} [{num(row.ci[0])}–{num(row.ci[1])}]"


def dataset_label(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def eps_text(eps: float) -> str:
    return f"{eps:g}"


def worst(rows: dict[str, Row]) -> tuple[float, int]:
    return worst_case(list(rows.values()))


def mean_robust(rows: dict[str, Row]) -> tuple[float | None, list[str], int]:
    """Mean accuracy over the attacks in ``rows``, each on the examples common to all of them;
    returns (mean, attacks averaged, number of common examples)."""
    attacks = [a for a in ATTACK_ORDER if a in rows]
    if not attacks:
        return None, [], 0
    start, stop = common_examples([rows[a] for a in attacks])
    if stop == start:
        return None, attacks, 0
    return float(np.mean([(on_examples(rows[a], start, stop) > 0.5).mean() for a in attacks])), attacks, stop - start


# -- sections -------------------------------------------------------------------------------------

def section_intro(wd: Workdir) -> list[str]:
    lines = ["# robench report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} from `{wd.path}`.", ""]
    if not wd.runs:
        return lines + ["No finished trained runs were found in this workdir, so there is nothing to "
                        "report yet; see **Missing pieces** below for the commands that produce them.", ""]
    ns = sorted({r.key.n for rows in wd.rows.values() for r in rows if r.key.kind == "attack"})
    parts = []
    for ds in wd.datasets():
        parts.append(f"{dataset_label(ds)} ({', '.join(wd.defenses(ds))})")
    attacks = sorted({r.key.name for rows in wd.rows.values() for r in rows if r.key.kind == "attack"} - {"clean"})
    n_text = f"the first n = {', '.join(map(str, ns))} test images" if ns else "no test images yet"
    lines.append(
        f"This report covers {len(wd.runs)} trained run(s), the newest finished run per defense and "
        f"dataset: {'; '.join(parts)}. Models were evaluated on {n_text} (n per result is in the "
        f"provenance section), clean and under {', '.join(LABELS.get(a, a) for a in attacks) or 'no attack'}. "
        f"Accuracy is in %, with 95% Wilson intervals in brackets; the worst case counts an example as "
        f"robust only if it survives clean evaluation and every attack listed for that defense, on the "
        f"first examples common to all of them. It reproduces the setting of RLFAT (Song et al., ICLR 2020).")
    return lines + [""]


def section_table1(wd: Workdir) -> list[str]:
    lines = ["## Accuracy (Table 1 format)", ""]
    if not wd.runs:
        return lines + ["No runs; nothing to show.", ""]
    for ds in wd.datasets():
        lines += table1_for(wd, ds)
    return lines


def table1_for(wd: Workdir, ds: str) -> list[str]:
    defenses = wd.defenses(ds)
    eps = default_eps(wd.runs[(ds, defenses[0])])
    per = {d: table1_rows(wd, ds, d) for d in defenses}
    present = set().union(*per.values())
    columns = ["clean", *PAPER_ATTACKS, *(a for a in ATTACK_ORDER if a not in PAPER_ATTACKS and a in present),
               *sorted(present - {"clean", *ATTACK_ORDER})]
    body = []
    for d in defenses:
        rows = per[d]
        cells = [acc_cell(rows[c].value, rows[c].ci) if c in rows else "—" for c in columns]
        if rows:
            wc, m = worst(rows)
            cells.append(f"{acc_cell(wc, wilson(wc * m, m))} (n={m})")
        else:
            cells.append("—")
        body.append([d, *cells])
    lines = [f"### {dataset_label(ds)}, ε = {eps_text(eps)}", ""]
    lines += md_table(["defense", *(LABELS.get(c, c) for c in columns), "worst case"], body)
    ns = {LABELS.get(c, c): sorted({per[d][c].key.n for d in defenses if c in per[d]}) for c in columns}
    lines += ["Images per column: " + "; ".join(f"{c} n={'/'.join(map(str, n))}" for c, n in ns.items() if n)
              + ". All at the dataset's default attack parameters; the worst case is over the first n "
              "examples common to every column. A dash means not evaluated (see Missing pieces).", ""]
    return lines + paper_table1(ds, per, eps) + other_settings_table(wd, ds)


def other_settings_table(wd: Workdir, ds: str) -> list[str]:
    """Results at non-default attack parameters: their own rows, labelled with what differs."""
    body = [[d, LABELS.get(r.key.name, r.key.name), eps_text(eps_of(r)), setting_text(r), str(r.key.n),
             acc_cell(r.value, r.ci)]
            for d in wd.defenses(ds) for r in other_settings(wd.results(ds, d))]
    if not body:
        return []
    return ["Other attack settings (not in the table above, nor in the worst case, ablation or checks):", "",
            *md_table(["defense", "attack", "ε", "differs from the default in", "n", "accuracy %"], body)]


def paper_table1(ds: str, per: dict[str, dict[str, Row]], eps: float) -> list[str]:
    src = PAPER_DATASET.get(ds)
    if src is None:
        return []
    body = []
    for d, numbers in paper.TABLE1[src].items():
        ours = per.get(d, {})
        body.append([d, *(f"{pct(ours[c].value) if c in ours else '—'} / {numbers[c]:.2f}"
                          for c in ("clean", *PAPER_ATTACKS))])
    note = f"Ours / paper (Table 1, {dataset_label(src)}, ε = {paper.EPS:g}), accuracy %."
    if ds != src:
        note += f" The paper numbers are {dataset_label(src)}'s; they compare only if the folder is that data."
    if not same(eps, paper.EPS):
        note += f" Our ε is {eps_text(eps)}, not the paper's, so the numbers do not compare directly."
    return [note, "", *md_table(["defense", *(LABELS[c] for c in ("clean", *PAPER_ATTACKS))], body)]


def section_table2(wd: Workdir) -> list[str]:
    lines = ["## Loss sensitivity (Table 2 format)", "",
             "l(v) = mean over test images of ||∇ₓ CE||₂ at the shifted image (lower is smoother). "
             "Brightness shifts HSV value by α; gamma raises pixels to γ.", ""]
    points = [(t, v) for t, vs in PAPER_POINTS.items() for v in vs]
    head = ["defense", *(f"{t} l({v:g})" for t, v in points)]
    any_rows = False
    for ds in wd.datasets():
        src = PAPER_DATASET.get(ds)
        body = []
        for d in wd.defenses(ds):
            rows = wd.results(ds, d)
            cells = []
            for t, v in points:
                row = sensitivity_at(rows, t, v)
                any_rows |= row is not None
                cells.append(sens_cell(row) + paper_sens(src, d, t, v))
            body.append([d, *cells])
        lines += [f"### {dataset_label(ds)}", ""] + md_table(head, body)
        if src is not None:
            lines += [f"(paper …) is the paper's Table 2 value for {dataset_label(src)}.", ""]
    if not any_rows:
        lines += ["No loss-sensitivity results stored (see Missing pieces).", ""]
    return lines


def paper_sens(src: str | None, defense: str, transform: str, value: float) -> str:
    numbers = paper.TABLE2.get(src or "", {}).get(defense)
    if numbers is None:
        return ""
    return f" (paper {numbers[transform][PAPER_POINTS[transform].index(value)]:.2f})"


def ablation_data(wd: Workdir, ds: str) -> list[tuple[str, Row | None, float | None, list[str], int]]:
    """(defense, clean row, mean robust accuracy, attacks averaged, n of the examples common to
    them) along both ablation chains."""
    out = []
    for chain in ABLATION_CHAINS:
        for d in chain:
            if (ds, d) in wd.runs:
                rows = table1_rows(wd, ds, d)
                robust, attacks, m = mean_robust(rows)
                out.append((d, rows.get("clean"), robust, attacks, m))
    return out


def section_ablation(wd: Workdir, out: Path) -> list[str]:
    lines = ["## Ablation (paper §4.4, Fig. 2)", "",
             "pgdat → rbsat-p → rlfat-p and trades → rbsat-t → rlfat-t: the RBSAT models keep the RBS "
             "loss without the transfer term. Average robust accuracy is the mean over the attacks "
             "listed at the dataset's default ε and parameters, each on the same examples: the first n "
             "common to all of them.", ""]
    panels = []
    for ds in wd.datasets():
        data = ablation_data(wd, ds)
        if not data:
            continue
        body = [[d, pct(c.value) if c else "—", pct(r) if r is not None else "—",
                 ", ".join(LABELS.get(a, a) for a in a_) or "—", str(m) if a_ else "—"]
                for d, c, r, a_, m in data]
        lines += [f"### {dataset_label(ds)}", ""] + md_table(
            ["defense", "clean", "avg robust", "attacks averaged", "n (common)"], body)
        panels.append(BarPanel(f"Ablation, {dataset_label(ds)}", "accuracy %", [d for d, *_ in data], {
            "clean": [100 * c.value if c else None for _, c, _, _, _ in data],
            "avg robust": [100 * r if r is not None else None for _, _, r, _, _ in data]}))
    if not panels:
        return lines + ["No ablation-chain defense has been trained yet (see Missing pieces).", ""]
    bars_figure(panels, out / "ablation.png")
    return lines + ["![ablation](ablation.png)", ""]


def section_eps(wd: Workdir, out: Path) -> list[str]:
    lines = ["## Robust accuracy vs ε", ""]
    panels, body = [], []
    for ds in wd.datasets():
        for attack in ATTACK_ORDER:
            panel = LinePanel(f"{LABELS[attack]}, {dataset_label(ds)}", "ε (L∞)", "accuracy %", ylim=(0, 100))
            for d in wd.defenses(ds):
                series = eps_series(wd.results(ds, d), attack)
                if len(series) < 2:
                    continue
                clean = attack_row(wd.results(ds, d), "clean")
                points = [(e, 100 * r.value) for e, r in series.items()]
                panel.lines[d] = ([(0.0, 100 * clean.value)] if clean else []) + points
                body.append([dataset_label(ds), d, LABELS[attack],
                             ", ".join(f"{eps_text(e)}: {pct(r.value)} (n={r.key.n})" for e, r in series.items())])
            if panel.lines:
                panels.append(panel)
    if not panels:
        return lines + ["No defense was evaluated at two or more ε for one attack; e.g. "
                        "`robench eval --defense pgdat --attacks pgd --eps 0.01,0.03,0.1,0.5`.", ""]
    lines_figure(panels, out / "eps_curve.png", colors=colors())
    lines += ["Accuracy at ε = 0 is clean accuracy.", ""]
    lines += md_table(["dataset", "defense", "attack", "ε: accuracy %"], body)
    return lines + ["![accuracy vs eps](eps_curve.png)", ""]


def section_sweeps(wd: Workdir, out: Path) -> list[str]:
    lines = ["## Loss sensitivity sweeps", ""]
    axis = {"brightness": "α (brightness shift)", "gamma": "γ"}
    panels = []
    for ds in wd.datasets():
        for t in PAPER_POINTS:
            panel = LinePanel(f"{t}, {dataset_label(ds)}", axis.get(t, t), "l = mean ||∇ₓ CE||₂")
            for d in wd.defenses(ds):
                series = sensitivity_series(wd.results(ds, d), t)
                if len(series) >= 3:
                    panel.lines[d] = [(v, r.value) for v, r in series.items()]
            if panel.lines:
                panels.append(panel)
    if not panels:
        return lines + ["No defense has loss sensitivity at three or more values of a shift "
                        "(`robench sensitivity --sweep`, the default, stores 13 per shift).", ""]
    lines_figure(panels, out / "sensitivity.png", colors=colors())
    return lines + ["![loss sensitivity](sensitivity.png)", ""]


def section_salience(wd: Workdir, out: Path) -> list[str]:
    lines = ["## Salience maps (SmoothGrad, paper Fig. 3)", ""]
    for ds in wd.datasets():
        src = salience_path(wd.path, ds)
        if src.exists():
            name = f"salience-{ds}.png"
            atomic.write_bytes(out / name, src.read_bytes())
            lines += [f"### {dataset_label(ds)}", "", f"![salience {ds}]({name})", ""]
        else:
            lines += [f"{dataset_label(ds)}: no salience figure yet (see Missing pieces).", ""]
    return lines if wd.runs else lines + ["No runs; nothing to show.", ""]


def salience_path(workdir: Path, dataset: str) -> Path:
    return Path(workdir) / "salience" / f"{dataset}.png"


def read_log(run: Run) -> list[dict[str, float]]:
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


def section_training(wd: Workdir, out: Path) -> list[str]:
    lines = ["## Training curves", ""]
    panels = []
    for ds in wd.datasets():
        loss = LinePanel(f"training loss, {dataset_label(ds)}", "step", "loss (per defense objective)")
        acc = LinePanel(f"training accuracy, {dataset_label(ds)}", "step", "accuracy % (on x' or RBS(x'))",
                        ylim=(0, 100))
        for d in wd.defenses(ds):
            log = read_log(wd.runs[(ds, d)])
            if log:
                loss.lines[d] = [(r["step"], r["loss"]) for r in log]
                acc.lines[d] = [(r["step"], 100 * r["train_acc"]) for r in log]
        if loss.lines:
            panels += [loss, acc]
    if not panels:
        return lines + ["No training logs found.", ""]
    lines_figure(panels, out / "training.png", colors=colors())
    return lines + ["Losses differ between defenses by construction; compare the shapes, not the levels.", "",
                    "![training curves](training.png)", ""]


def section_rbs(out: Path, image) -> list[str]:
    lines = ["## Random Block Shuffle (paper Fig. 1)", ""]
    if image is None:
        return lines + ["Not drawn: no example image was given to the report.", ""]
    rbs_figure(image, out / "rbs.png", k=2, seed=0)
    return lines + ["The first test image, its k = 2 RBS blocks (each in its own colour) and the "
                    "shuffled image with the colours following the blocks.", "", "![RBS](rbs.png)", ""]


# -- gradient masking -----------------------------------------------------------------------------

def common_acc(row: Row, span: tuple[int, int]) -> float:
    return float((on_examples(row, *span) > 0.5).mean())


def masking_checks(wd: Workdir, ds: str, defense: str) -> list[str]:
    """Warnings (lines starting "**warning**") and notes on checks that could not run."""
    rows = wd.results(ds, defense)
    t1 = table1_rows(wd, ds, defense)
    return (black_box_check(t1) + eps_monotone_check(rows) + large_eps_check(rows, ds, defense)
            + attack_warnings(rows))


def attack_warnings(rows: list[Row]) -> list[str]:
    """What the attacks themselves flagged (AutoAttack checks for randomised or masked gradients)."""
    return [f"**warning** (d) {LABELS.get(r.key.name, r.key.name)} ({result_label(r)}, n={r.key.n}) reported: {w}"
            for r in rows if r.key.kind == "attack" for w in r.warnings]


def black_box_check(t1: dict[str, Row]) -> list[str]:
    white = [a for a in WHITE_BOX if a in t1]
    black = [a for a in BLACK_BOX if a in t1]
    if not white or not black:
        return [f"(a) black-box vs white-box not checked: needs N-attack and one of "
                f"{', '.join(LABELS[a] for a in WHITE_BOX)} at the default ε."]
    out = []
    for b in black:
        span = common_examples([t1[a] for a in [*white, b]])
        m = span[1] - span[0]
        if m == 0:
            out.append(f"(a) black-box vs white-box not checked: {LABELS[b]} and the white-box attacks share no examples.")
            continue
        best_white = min(white, key=lambda a: common_acc(t1[a], span))
        acc_b, acc_w = common_acc(t1[b], span), common_acc(t1[best_white], span)
        if acc_b < acc_w - MASKING_POINTS / 100:
            out.append(f"**warning** (a) black-box {LABELS[b]} accuracy {pct(acc_b)}% is below white-box "
                       f"{LABELS[best_white]} {pct(acc_w)}% on the first {m} images: the gradients may "
                       f"be masked, so white-box numbers may overstate robustness.")
        else:
            out.append(f"(a) ok: {LABELS[b]} {pct(acc_b)}% ≥ {LABELS[best_white]} {pct(acc_w)}% − 1 "
                       f"on the first {m} images.")
    return out


def eps_monotone_check(rows: list[Row]) -> list[str]:
    out = []
    checked = False
    clean = attack_row(rows, "clean")
    for attack in ATTACK_ORDER:
        series = list(eps_series(rows, attack).items())
        if clean is not None:
            series = [(0.0, clean), *series]
        checked |= len(series) >= 2
        for (e0, r0), (e1, r1) in zip(series, series[1:]):
            if r1.value > r0.value + MASKING_POINTS / 100:
                out.append(f"**warning** (b) {LABELS[attack]} accuracy rises from {pct(r0.value)}% at "
                           f"ε = {eps_text(e0)} to {pct(r1.value)}% at ε = {eps_text(e1)}: a stronger "
                           f"attack should never do worse.")
    if not checked:
        out.append("(b) accuracy vs ε not checked: no attack evaluated with clean accuracy or at two ε.")
    elif not out:
        out.append("(b) ok: accuracy never rises with ε by more than 1 point.")
    return out


def large_eps_check(rows: list[Row], ds: str, defense: str) -> list[str]:
    out = []
    found = False
    for attack in ATTACK_ORDER:
        for eps, row in eps_series(rows, attack).items():
            if eps < LARGE_EPS:
                continue
            found = True
            if row.value > LARGE_EPS_MAX_ACC:
                out.append(f"**warning** (c) {LABELS[attack]} at ε = {eps_text(eps)} leaves {pct(row.value)}% "
                           f"correct; at this radius it should be near 0 (gradient masking or a broken attack).")
    if not found:
        return [f"(c) large-ε check not run: `{large_eps_command(ds, defense)}`."]
    return out or [f"(c) ok: accuracy ≤ {pct(LARGE_EPS_MAX_ACC)}% at ε ≥ {LARGE_EPS:g}."]


def large_eps_command(ds: str, defense: str) -> str:
    return f"robench eval --defense {defense} --dataset {ds} --attacks pgd --eps {LARGE_EPS:g}"


def section_masking(wd: Workdir) -> list[str]:
    lines = ["## Gradient-masking checks", "",
             "(a) black-box accuracy more than 1 point below white-box; (b) accuracy rising with ε by "
             f"more than 1 point; (c) more than {pct(LARGE_EPS_MAX_ACC)}% accuracy at ε ≥ {LARGE_EPS:g}; "
             "(d) a warning an attack raised itself (AutoAttack's checks). (a)-(c) use results at the "
             "default attack parameters only.", ""]
    if not wd.runs:
        return lines + ["No runs; nothing to check.", ""]
    for ds in wd.datasets():
        for d in wd.defenses(ds):
            lines.append(f"- **{d}** on {dataset_label(ds)}:")
            lines += [f"  - {c}" for c in masking_checks(wd, ds, d)]
    return lines + [""]


def warnings_count(wd: Workdir) -> int:
    return sum(c.startswith("**warning**") for ds in wd.datasets() for d in wd.defenses(ds)
               for c in masking_checks(wd, ds, d))


# -- missing pieces -------------------------------------------------------------------------------

def missing_pieces(wd: Workdir) -> list[str]:
    items: list[str] = []
    if not wd.runs:
        items.append("no finished trained runs in the workdir; train the paper's defenses, e.g. "
                     + ", ".join(f"`robench train {d} --dataset digits`" for d in DEFENSE_ORDER))
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


def missing_for_dataset(wd: Workdir, ds: str) -> list[str]:
    items = [f"no trained {d} on {ds}; run `robench train {d} --dataset {ds}`"
             for d in DEFENSE_ORDER if (ds, d) not in wd.runs]
    for d in wd.defenses(ds):
        items += missing_for_run(wd, ds, d)
    if not salience_path(wd.path, ds).exists():
        items.append(f"no salience figure for {ds}; run "
                     f"`robench salience --defense {','.join(wd.defenses(ds))} --dataset {ds}`")
    return items


def missing_for_run(wd: Workdir, ds: str, d: str) -> list[str]:
    items = []
    run = wd.runs[(ds, d)]
    eps = default_eps(run)
    t1 = table1_rows(wd, ds, d)
    if "clean" not in t1:
        items.append(f"no clean accuracy for {d} on {ds}; run `robench eval --defense {d} --dataset {ds} --attacks pgd` "
                     f"(every eval also stores clean accuracy)")
    for a in PAPER_ATTACKS:
        if a not in t1:
            items.append(f"no {LABELS[a]} results for {d} on {ds} at ε = {eps_text(eps)}; run "
                         f"`robench eval --defense {d} --dataset {ds} --attacks {a}`")
    if "autoattack" not in t1:
        items.append(f"(optional) no AutoAttack results for {d} on {ds}; run "
                     f"`robench eval --defense {d} --dataset {ds} --attacks autoattack`")
    rows = wd.results(ds, d)
    if not all(sensitivity_at(rows, t, v) for t, vs in PAPER_POINTS.items() for v in vs):
        items.append(f"no (or incomplete) loss-sensitivity results for {d} on {ds}; run "
                     f"`robench sensitivity --defense {d} --dataset {ds}`")
    if not any(e >= LARGE_EPS for a in ATTACK_ORDER for e in eps_series(rows, a)):
        items.append(f"(sanity check) no attack at ε ≥ {LARGE_EPS:g} for {d} on {ds}; run "
                     f"`{large_eps_command(ds, d)}`")
    if not read_log(run):
        items.append(f"no training log for {d} on {ds} ({run.run_dir / 'train_log.csv'})")
    return items


def section_missing(wd: Workdir) -> list[str]:
    items = missing_pieces(wd)
    lines = ["## Missing pieces", ""]
    return lines + ([f"- {i}" for i in items] if items else ["Nothing is missing."]) + [""]


# -- provenance -----------------------------------------------------------------------------------

CONFIG_KEYS = ("eps", "step_size", "attack_steps", "lam", "eta", "rbs_mode", "attack_mode", "batch_size", "lr", "seed")


def run_row(run: Run) -> list[str]:
    m = run.meta
    cfg = m.get("config", {})
    # The objective record names only what the defense uses (no lam for PGDAT, no eta without RBS).
    used = set(m["objective"]) | {"batch_size", "lr", "seed"} if "objective" in m else set(CONFIG_KEYS)
    hp = ", ".join(f"{k}={cfg[k]}" for k in CONFIG_KEYS if k in used and cfg.get(k) is not None)
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    seconds = m.get("train_seconds")
    return [m["defense"], m["dataset"], m.get("arch", "?"), f"`{run.sha[:16]}`",
            f"{m.get('step')}/{cfg.get('steps')}", hp, versions, m.get("runtime", {}).get("device", "?"),
            "?" if seconds is None else f"{seconds:.0f} s", m.get("saved_at", "?"), run.run_dir.name]


def result_label(row: Row) -> str:
    p = params(row)
    if row.key.kind == "sensitivity":
        return f"{row.key.name} {p.get('value')}"
    label = row.key.name if "eps" not in p else f"{row.key.name} ε={eps_text(float(p['eps']))}"
    other = setting_text(row)
    return f"{label} ({other})" if other else label


def section_provenance(wd: Workdir) -> list[str]:
    lines = ["## Provenance", "", "### Runs reported", ""]
    head = ["defense", "dataset", "arch", "sha256 (16)", "step", "hyper-parameters", "versions", "device",
            "train time", "saved", "run"]
    runs = [wd.runs[(ds, d)] for ds in wd.datasets() for d in wd.defenses(ds)]
    lines += md_table(head, [run_row(r) for r in runs]) if runs else ["None.", ""]
    if wd.others:
        lines += ["### Runs not reported (older, or unfinished)", ""]
        lines += md_table(head, [run_row(r) for r in wd.others])
    lines += ["### Results", ""] + results_table(wd, runs) + sensitivity_summary(wd, runs)
    return lines + ignored_lines(wd)


def sort_key(row: Row) -> tuple:
    p = params(row)
    return (row.key.kind, row.key.name, float(p.get("eps", p.get("value", -1.0))), row.key.n, row.created)


def results_table(wd: Workdir, runs: list[Run]) -> list[str]:
    body = []
    for run in runs:
        for r in sorted(wd.rows.get(run.sha, []), key=sort_key):
            if r.key.kind == "attack":
                body.append([run.defense, run.dataset, result_label(r), str(r.key.n), f"{pct(r.value)}%",
                             f"{r.wall_s:.1f} s", r.device, r.created])
    if not body:
        return ["No accuracy results stored for the reported runs.", ""]
    return md_table(["defense", "dataset", "result", "n", "accuracy", "wall", "device", "created"], body)


def sensitivity_summary(wd: Workdir, runs: list[Run]) -> list[str]:
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


def ignored_lines(wd: Workdir) -> list[str]:
    if not wd.ignored:
        return []
    known = {run.sha: run for run in wd.others}
    groups: dict[tuple, int] = defaultdict(int)
    for r in wd.ignored:
        run = known.get(r.key.checkpoint)
        if r.key.data != wd.digests.get(r.key.dataset, r.key.data):
            why = f"measured on another version of the {r.key.dataset} test split (digest `{r.key.data}`)"
        elif run:
            why = f"older or unfinished run `{run.run_dir.name}`"
        else:
            why = "checkpoint not among this workdir's runs (e.g. `robench eval --checkpoint FILE`)"
        groups[(r.defense, r.key.dataset, r.key.checkpoint[:16], why)] += 1
    body = [[d, ds, f"`{sha}`", str(n), why] for (d, ds, sha, why), n in sorted(groups.items())]
    return ["### Results ignored", "", f"{len(wd.ignored)} stored result(s) belong to checkpoints this report "
            "does not cover:", "", *md_table(["label", "dataset", "sha256 (16)", "results", "why"], body)]


def colors() -> dict[str, str]:
    """One fixed colour per paper defense, so every figure agrees."""
    return {d: f"C{i}" for i, d in enumerate(DEFENSE_ORDER)}


# -- entry point ----------------------------------------------------------------------------------

def write_report(workdir: Path, out: Path, rbs_image=None) -> Path:
    """Write ``out/report.md`` and its PNG figures from ``workdir``; returns the report's path.

    ``rbs_image``: an optional (C, H, W) tensor in [0, 1] (e.g. the first test image) for the RBS
    illustration; the report never loads a dataset itself.
    """
    workdir, out = Path(workdir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wd = load_workdir(workdir)
    n_warn = warnings_count(wd)
    summary = [f"**{n_warn} gradient-masking warning(s)**; see that section.", ""] if n_warn else []
    lines = [*section_intro(wd), *summary, *section_table1(wd), *section_table2(wd), *section_ablation(wd, out),
             *section_eps(wd, out), *section_sweeps(wd, out), *section_salience(wd, out),
             *section_training(wd, out), *section_rbs(out, rbs_image), *section_masking(wd),
             *section_missing(wd), *section_provenance(wd)]
    path = out / REPORT
    atomic.write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
