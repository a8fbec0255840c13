"""The report's Markdown sections: introduction, the paper's tables, ablation and figures."""

from __future__ import annotations

import time
from pathlib import Path

from robench import atomic, paper
from robench.report.cells import (acc_cell, dataset_label, eps_text, md_table, paper_dataset, pct, sens_cell,
                                  setting_text)
from robench.report.figures import (BarPanel, LinePanel, bars_figure, lines_figure, rbs_figure, salience_image,
                                    salience_png)
from robench.report.plugins import CLEAN, ablation_chains, attack_order, colors, label, ordered, paper_attacks, \
    sweep_attack
from robench.report.queries import (Reported, attack_row, default_eps, eps_of, eps_series, mean_robust,
                                    other_settings, read_log, same, sensitivity_at, sensitivity_series,
                                    table1_rows, worst)
from robench.sensitivity import PAPER_POINTS
from robench.store import Row, wilson


def section_intro(wd: Reported) -> list[str]:
    lines = ["# robench report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} from `{wd.path}`.", ""]
    if not wd.runs:
        return lines + ["No finished trained runs were found in this workdir, so there is nothing to "
                        "report yet; see **Missing pieces** below for the commands that produce them.", ""]
    ns = sorted({r.key.n for rows in wd.rows.values() for r in rows if r.key.kind == "attack"})
    parts = []
    for ds in wd.datasets():
        parts.append(f"{dataset_label(ds)} ({', '.join(wd.defenses(ds))})")
    attacks = sorted({r.key.name for rows in wd.rows.values() for r in rows if r.key.kind == "attack"} - {CLEAN})
    n_text = f"the first n = {', '.join(map(str, ns))} test images" if ns else "no test images yet"
    lines.append(
        f"This report covers {len(wd.runs)} checkpoint(s), per defense and dataset the newest finished "
        f"run trained in this workdir, else a zoo checkpoint evaluated here: {'; '.join(parts)}. Models were evaluated on {n_text} (n per result is in the "
        f"provenance section), clean and under {', '.join(label(a) for a in attacks) or 'no attack'}. "
        f"Accuracy is in %, with 95% Wilson intervals in brackets; the worst case counts an example as "
        f"robust only if it survives clean evaluation and every attack listed for that defense, on the "
        f"first examples common to all of them. It reproduces the setting of RLFAT (Song et al., ICLR 2020).")
    return lines + [""]


# -- Table 1 --------------------------------------------------------------------------------------

def section_table1(wd: Reported) -> list[str]:
    lines = ["## Accuracy (Table 1 format)", ""]
    if not wd.runs:
        return lines + ["No runs; nothing to show.", ""]
    for ds in wd.datasets():
        lines += table1_for(wd, ds)
    return lines


def table1_for(wd: Reported, ds: str) -> list[str]:
    defenses = wd.defenses(ds)
    eps = default_eps(wd.runs[(ds, defenses[0])])
    per = {d: table1_rows(wd, ds, d) for d in defenses}
    lines = [f"### {dataset_label(ds)}, ε = {eps_text(eps)} (L∞)", ""] + accuracy_table(per, paper_attacks())
    return lines + paper_table1(ds, per, eps) + other_settings_table(wd, ds)


def accuracy_table(per: dict[str, dict[str, Row]], asked: list[str]) -> list[str]:
    """Clean, the ``asked`` attacks, then every other one measured, and the worst case: one row
    per defense of ``per`` (defense -> column -> its chosen row)."""
    defenses = list(per)
    present = set().union(*per.values())
    known = attack_order()
    columns = [CLEAN, *asked, *(a for a in known if a not in asked and a in present),
               *sorted(present - {CLEAN, *known})]
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
    lines = md_table(["defense", *(label(c) for c in columns), "worst case"], body)
    ns = {label(c): sorted({per[d][c].key.n for d in defenses if c in per[d]}) for c in columns}
    lines += ["Images per column: " + "; ".join(f"{c} n={'/'.join(map(str, n))}" for c, n in ns.items() if n)
              + ". All at the dataset's default attack parameters; the worst case is over the first n "
              "examples common to every column. A dash means not evaluated (see Missing pieces).", ""]
    return lines


def other_settings_table(wd: Reported, ds: str, norm: str = "linf") -> list[str]:
    """Results at non-default attack parameters: their own rows, labelled with what differs."""
    body = [[d, label(r.key.name), eps_text(eps_of(r)), setting_text(r), str(r.key.n), acc_cell(r.value, r.ci)]
            for d in wd.defenses(ds) for r in other_settings(wd.results(ds, d), norm)]
    if not body:
        return []
    return ["Other attack settings (not in the table above, nor in the worst case, ablation or checks):", "",
            *md_table(["defense", "attack", "ε", "differs from the default in", "n", "accuracy %"], body)]


def paper_table1(ds: str, per: dict[str, dict[str, Row]], eps: float) -> list[str]:
    src = paper_dataset(ds)
    if src is None:
        return []
    table = paper.TABLE1[src]
    columns = list(next(iter(table.values())))  # the paper's own columns: clean, then its attacks
    body = []
    for d, numbers in table.items():
        ours = per.get(d, {})
        body.append([d, *(f"{pct(ours[c].value) if c in ours else '—'} / {numbers[c]:.2f}" for c in columns)])
    note = f"Ours / paper (Table 1, {dataset_label(src)}, ε = {paper.EPS:g}), accuracy %."
    if ds != src:
        note += f" The paper numbers are {dataset_label(src)}'s; they compare only if the folder is that data."
    if not same(eps, paper.EPS):
        note += f" Our ε is {eps_text(eps)}, not the paper's, so the numbers do not compare directly."
    return [note, "", *md_table(["defense", *(label(c) for c in columns)], body)]


# -- Table 2 --------------------------------------------------------------------------------------

def section_table2(wd: Reported) -> list[str]:
    lines = ["## Loss sensitivity (Table 2 format)", "",
             "l(v) = mean over test images of ||∇ₓ CE||₂ at the shifted image (lower is smoother). "
             "Brightness shifts HSV value by α; gamma raises pixels to γ.", ""]
    points = [(t, v) for t, vs in PAPER_POINTS.items() for v in vs]
    head = ["defense", *(f"{t} l({v:g})" for t, v in points)]
    any_rows = False
    for ds in wd.datasets():
        src = paper_dataset(ds)
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


# -- ablation and figures -------------------------------------------------------------------------

def ablation_data(wd: Reported, ds: str) -> list[tuple[str, Row | None, float | None, list[str], int]]:
    """(defense, clean row, mean robust accuracy, attacks averaged, n of the examples common to
    them) along every ablation chain."""
    out = []
    for chain in ablation_chains():
        for d in chain:
            if (ds, d) in wd.runs:
                rows = table1_rows(wd, ds, d)
                robust, attacks, m = mean_robust(rows)
                out.append((d, rows.get(CLEAN), robust, attacks, m))
    return out


def section_ablation(wd: Reported, out: Path) -> list[str]:
    chains = " and ".join(" → ".join(chain) for chain in ablation_chains()) or "no defense declares a parent"
    lines = ["## Ablation (paper §4.4, Fig. 2)", "",
             f"{chains}: each model changes one part of the loss of the one before it (its declared "
             "`parent`). Average robust accuracy is the mean over the attacks listed at the dataset's "
             "default ε and parameters, each on the same examples: the first n common to all of them.", ""]
    panels = []
    for ds in wd.datasets():
        data = ablation_data(wd, ds)
        if not data:
            continue
        body = [[d, pct(c.value) if c else "—", pct(r) if r is not None else "—",
                 ", ".join(label(a) for a in a_) or "—", str(m) if a_ else "—"]
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


def section_eps(wd: Reported, out: Path) -> list[str]:
    lines = ["## Robust accuracy vs ε (L∞)", ""]
    panels, body = [], []
    for ds in wd.datasets():
        for attack in attack_order():
            panel = LinePanel(f"{label(attack)}, {dataset_label(ds)}", "ε (L∞)", "accuracy %", ylim=(0, 100))
            for d in wd.defenses(ds):
                series = eps_series(wd.results(ds, d), attack)
                if len(series) < 2:
                    continue
                clean = attack_row(wd.results(ds, d), CLEAN)
                points = [(e, 100 * r.value) for e, r in series.items()]
                panel.lines[d] = ([(0.0, 100 * clean.value)] if clean else []) + points
                body.append([dataset_label(ds), d, label(attack),
                             ", ".join(f"{eps_text(e)}: {pct(r.value)} (n={r.key.n})" for e, r in series.items())])
            if panel.lines:
                panels.append(panel)
    if not panels:
        example = ordered(d for _, d in wd.runs)[0] if wd.runs else "DEFENSE"
        return lines + ["No defense was evaluated at two or more ε for one attack; e.g. "
                        f"`robench eval --defense {example} --attacks {sweep_attack()} --eps 0.01,0.03,0.1,0.5`.", ""]
    lines_figure(panels, out / "eps_curve.png", colors=colors())
    lines += ["Accuracy at ε = 0 is clean accuracy.", ""]
    lines += md_table(["dataset", "defense", "attack", "ε: accuracy %"], body)
    return lines + ["![accuracy vs eps](eps_curve.png)", ""]


def section_sweeps(wd: Reported, out: Path) -> list[str]:
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


def section_salience(wd: Reported, out: Path) -> list[str]:
    lines = ["## Salience maps (SmoothGrad, paper Fig. 3)", ""]
    for ds in wd.datasets():
        src = salience_png(wd.path, ds)
        if src.exists():
            name = f"salience-{ds}.png"
            atomic.write_bytes(out / name, src.read_bytes())
            lines += [f"### {dataset_label(ds)}", "", f"![salience {ds}]({name})", ""]
        else:
            lines += [f"{dataset_label(ds)}: no salience figure yet (see Missing pieces).", ""]
    return lines if wd.runs else lines + ["No runs; nothing to show.", ""]


def section_training(wd: Reported, out: Path) -> list[str]:
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


def section_rbs(wd: Reported, out: Path) -> list[str]:
    """Figure 1 on the first image ``robench salience`` stored for the newest run's dataset (the
    report reads the workdir, never a dataset)."""
    lines = ["## Random Block Shuffle (paper Fig. 1)", ""]
    datasets = list(dict.fromkeys(ds for ds, _ in wd.runs))  # newest run's dataset first
    found = next(((ds, img) for ds in datasets if (img := salience_image(wd.path, ds)) is not None), None)
    if found is None:
        return lines + ["Not drawn: the workdir holds no salience images yet (`robench salience` stores "
                        "them, and this figure shows the first).", ""]
    what, image = f"The first image of the {dataset_label(found[0])} salience figure", found[1]
    rbs_figure(image, out / "rbs.png", k=2, seed=0)
    return lines + [f"{what}, its k = 2 RBS blocks (each in its own colour) and the shuffled image with "
                    "the colours following the blocks.", "", "![RBS](rbs.png)", ""]
