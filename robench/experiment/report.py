"""An experiment's report: stage-by-stage accuracy on training, held-out and test images, the
robust generalization gap (table and figure), best against final stage, the file's pairs as
paired differences, loss sensitivity and the paper's orderings. Built from the stores alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

from robench import atomic
from robench.comparison import diff_text, p_text, paired_rows
from robench.experiment.paper import section as paper_section
from robench.experiment.results import ChainResults, collect, gap_difference
from robench.experiment.spec import Experiment
from robench.report.cells import acc_cell, md_table, sens_cell
from robench.report.figures import LinePanel, lines_figure
from robench.report.plugins import column_labels
from robench.sensitivity import PAPER_POINTS

REPORT = "report.md"


def _when(exp: Experiment, step: int) -> str:
    epoch = exp.epoch_of(step)
    return f"{step}" if epoch is None else f"{epoch:g} ({step})"


def _gap_attack(exp: Experiment) -> str | None:
    """The attack the generalization gap is measured under: the selection attack if it also runs
    on training images, else the first that does."""
    with_train = [a.label for a in exp.attacks if a.train_n]
    return exp.select if exp.select in with_train else (with_train[0] if with_train else None)


def _pct(d: tuple[float, float, float] | None) -> str:
    return "—" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def header(exp: Experiment, root: Path, command: str | None) -> list[str]:
    d = exp.data
    timings = json.loads((root / "timings.json").read_text()) if (root / "timings.json").exists() else {}
    env = json.loads((root / "env.json").read_text()) if (root / "env.json").exists() else {}
    command = command or env.get("command")
    schedule = (f"{exp.epochs} epochs of {d.n_train} images ({exp.steps} steps of batch {exp.batch_size})"
                if exp.epochs else f"{exp.steps} steps of batch {exp.batch_size}")
    stages = ", ".join(_when(exp, s) for s in exp.stages)
    lines = [f"# Experiment: {exp.name}", ""]
    if exp.description:
        lines += [exp.description.strip(), ""]
    lines += [
        f"- File: `{exp.path.name}` (sha256 `{exp.digest[:16]}`)"
        + (f", with {', '.join(f'`--set {s}`' for s in exp.settings)}" if exp.settings else "")
        + (f"; command: `{command}`" if command else ""),
        f"- Ran on: {env.get('device', '?')}; torch {env.get('torch', '?')}; {env.get('cpu', '?')}.",
        f"- Data: {d.dataset}" + (f", archive `{d.archive.name}`" if d.archive else "")
        + (f"; training on a class-balanced subset of {d.n_train} images" if d.n_train else "; every training image")
        + (f"; {d.n_val} held-out training images choose the best stage" if d.n_val else "")
        + f"; test images in the {d.test_order} order (seed {d.order_seed}).",
        f"- Model `{exp.arch}`; {schedule}; Adam lr {exp.lr:g}; flip {exp.flip}; "
        f"{'bf16 autocast + channels_last in training' if exp.train_amp else 'float32 training'}; "
        "evaluation in float32. The same settings for every defense: " + (", ".join(
            f"{k} {v}" for k, v in exp.train_options.items()) or "the dataset's defaults") + ".",
        f"- Seeds: {', '.join(map(str, exp.seeds))}. Evaluated at (epoch (step) or step): {stages}.",
        "- Attacks: " + "; ".join(f"{a.label} on {a.n} test images" + (f" and {a.train_n} training images" if a.train_n
                                                                       else "") + f" at {a.at} stage(s)"
                                  for a in exp.attacks)
        + (f"; loss sensitivity on {exp.sensitivity_n} at {exp.sensitivity_at} stage(s)" if exp.sensitivity_n else "")
        + ".",
        "- Wall time of the work stored so far (summed over invocations, per task kind): "
        + (", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(timings.items())) or "none") + ".",
        "",
    ]
    return lines


def section_final(exp: Experiment, results: list[ChainResults], which: str) -> list[str]:
    labels = {a.label: column_labels().get(a.name, a.name) if a.label == a.name else a.label for a in exp.attacks}
    names = [a.label for a in exp.attacks]
    body = []
    for r in results:
        step = exp.steps if which == "final" else r.best
        stage = r.stages.get(step) if step is not None else None
        if stage is None:
            continue
        cells = [acc_cell(row.value, row.ci) if (row := stage.acc("test", a)) else "—" for a in names]
        body.append([r.chain.label, _when(exp, step), *cells])
    if not body:
        return []
    title = "final stage" if which == "final" else "best stage (chosen on the held-out images)"
    return [f"## Test accuracy at the {title}", "",
            "Accuracy %, 95% Wilson intervals; — : not measured (yet).", "",
            *md_table(["defense", "epoch (step)" if exp.epochs else "step", *(labels.get(a, a) for a in names)], body)]


def section_gap(exp: Experiment, results: list[ChainResults], out: Path) -> list[str]:
    attack = _gap_attack(exp)
    if attack is None:
        return []
    label = column_labels().get(attack, attack)
    body, panels = [], []
    for r in results:
        points: dict[str, list[tuple[float, float]]] = {f"train {label}": [], f"test {label}": [],
                                                       "train clean": [], "test clean": []}
        for step, s in sorted(r.stages.items()):
            x = exp.epoch_of(step) or step
            cells = []
            for split, name in (("train", "clean"), ("train", attack), ("test", "clean"), ("test", attack),
                                ("val", exp.select)):
                row = s.acc(split, name)
                cells.append("—" if row is None else acc_cell(row.value, row.ci))
                if row is not None and split != "val":
                    points[f"{split} {label if name == attack else 'clean'}"].append((x, 100 * row.value))
            mark = " (best)" if step == r.best else ""
            body.append([r.chain.label, _when(exp, step) + mark, *cells, _pct(s.gap(attack))])
        panels.append(LinePanel(r.chain.label, "epoch" if exp.epochs else "step", "accuracy %",
                                {k: v for k, v in points.items() if v}, (0, 100)))
    lines = [f"## Robust generalization gap ({label})", "",
             f"Accuracy % on the training images the model learns from, on test images and ({exp.select}) on "
             f"held-out training images; gap = train − test {label} accuracy in points with a 95% interval "
             "(independent samples).", "",
             *md_table(["defense", "epoch (step)" if exp.epochs else "step", "train clean", f"train {label}",
                        "test clean", f"test {label}", f"held-out {exp.select}", "gap [95%]"], body)]
    if panels:
        lines_figure(panels, out / "gap.png", ncols=3, suptitle=f"train vs test accuracy ({exp.name})")
        lines += ["![train and test accuracy against training](gap.png)", ""]
    return lines


def section_overfitting(exp: Experiment, results: list[ChainResults]) -> list[str]:
    gap = _gap_attack(exp)
    attack = gap or exp.select
    body = []
    for r in results:
        best, final = r.stages.get(r.best), r.stages.get(exp.steps)
        if best is None or final is None:
            continue
        rb, rf = best.acc("test", attack), final.acc("test", attack)
        stats = paired_rows(rf, rb) if rb is not None and rf is not None else None
        body.append([r.chain.label, _when(exp, r.best), "—" if rb is None else f"{100 * rb.value:.1f}",
                     "—" if rf is None else f"{100 * rf.value:.1f}",
                     "—" if stats is None else f"{diff_text(stats)} (p {p_text(stats.p)})",
                     *((_pct(best.gap(attack)), _pct(final.gap(attack))) if gap else ())])
    if not body:
        return []
    label = column_labels().get(attack, attack)
    chosen = (f"chosen by {exp.select} accuracy on {exp.data.n_val} held-out training images, so the test numbers "
              "carry no selection bias" if exp.data.n_val else
              f"chosen by test {exp.select} accuracy itself (the file holds no images out), so its test accuracy is "
              "optimistic")
    return ["## Robust overfitting: best stage against final stage", "",
            f"Test {label} accuracy at the best stage ({chosen}) and at the end; final − best is paired on the same "
            "test images (Newcombe interval, exact McNemar p). A clearly negative value is robust overfitting.", "",
            *md_table(["defense", "best stage", f"test {label} best", f"test {label} final", "final − best [95%]",
                       *(("gap at best", "gap at final") if gap else ())], body)]


def section_pairs(exp: Experiment, results: list[ChainResults]) -> list[str]:
    gap = _gap_attack(exp)
    attack = gap or exp.select
    by = {r.chain.label: r for r in results}
    label = column_labels().get(attack, attack)
    body = []
    for a, b in exp.pairs:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None:
            continue
        for step in exp.stages:
            sa, sb = ra.stages.get(step), rb.stages.get(step)
            if sa is None or sb is None:
                continue
            ta, tb = sa.acc("test", attack), sb.acc("test", attack)
            stats = paired_rows(ta, tb) if ta is not None and tb is not None else None
            marks = [m for m, s in ((f"best {a}", ra.best), (f"best {b}", rb.best)) if s == step]
            marks += ["final"] if step == exp.steps else []
            body.append([f"{a} − {b}", _when(exp, step) + (f" ({', '.join(marks)})" if marks else ""),
                         "—" if stats is None else diff_text(stats), "—" if stats is None else p_text(stats.p),
                         *((_pct(gap_difference(sa, sb, attack)),) if gap else ())])
        best_a, best_b = ra.stages.get(ra.best), rb.stages.get(rb.best)
        if best_a is not None and best_b is not None:
            ta, tb = best_a.acc("test", attack), best_b.acc("test", attack)
            stats = paired_rows(ta, tb) if ta is not None and tb is not None else None
            body.append([f"{a} − {b}", "each at its best stage", "—" if stats is None else diff_text(stats),
                         "—" if stats is None else p_text(stats.p),
                         *((_pct(gap_difference(best_a, best_b, attack)),) if gap else ())])
    if not body:
        return []
    gap_text = (" and in the generalization gap (train − test; paired train difference minus paired test "
                "difference, 95% interval). A negative gap difference means a narrows the gap" if gap else "")
    return ["## The file's pairs", "",
            f"a − b in test {label} accuracy (paired on the same test images: Newcombe interval, exact McNemar "
            f"p){gap_text}.", "",
            *md_table(["pair", "epoch (step)" if exp.epochs else "step", f"Δ test {label} [95%]", "McNemar p",
                       *(("Δ gap [95%]",) if gap else ())], body)]


def section_sensitivity(exp: Experiment, results: list[ChainResults]) -> list[str]:
    points = [f"{t} {v:g}" for t, values in PAPER_POINTS.items() for v in values]
    body = []
    for r in results:
        s = r.stages.get(exp.steps)
        if s is not None and any(s.acc("sens", p) for p in points):
            body.append([r.chain.label, *(sens_cell(s.acc("sens", p)) for p in points)])
    if not body:
        return []
    return ["## Loss sensitivity at the final stage", "",
            f"l = mean ‖∇ₓ CE‖₂ at the shifted test image (paper Table 2), on {exp.sensitivity_n} images; lower is "
            "smoother.", "", *md_table(["defense", *(f"l {p}" for p in points)], body)]


def section_missing(exp: Experiment, results: list[ChainResults]) -> list[str]:
    """What the file asks for and the store does not hold yet (a run stopped early, or running)."""
    from robench.experiment.runner import EVAL, deep_tasks, stage_tasks

    missing: dict[str, list[str]] = {}
    for i, r in enumerate(results):
        planned = [t for step in exp.stages for t in stage_tasks(exp, i, step)]
        planned += deep_tasks(exp, i, r.best) if r.best is not None else []
        for step in exp.stages:
            if step not in r.stages:
                missing.setdefault(f"stage {_when(exp, step)} not trained", []).append(r.chain.label)
        for t in planned:
            stage = r.stages.get(t.step)
            if stage is None:
                continue
            key = ("sens", "brightness -0.15") if t.kind != EVAL else (t.view, t.attack)
            if stage.acc(*key) is None:
                what = f"{t.attack} on {t.view}" if t.kind == EVAL else "sensitivity"
                missing.setdefault(f"{what} at {_when(exp, t.step)}", []).append(r.chain.label)
        if r.best is None and r.stages:
            missing.setdefault("best stage (not every stage evaluated)", []).append(r.chain.label)
    if not missing:
        return []
    body = [[what, ", ".join(labels)] for what, labels in missing.items()]
    return ["## Not measured yet", "",
            "The file asks for these and the store does not hold them; running the same command again "
            "resumes where the run stopped.", "", *md_table(["what", "defenses"], body)]


def section_stages(exp: Experiment, results: list[ChainResults]) -> list[str]:
    body = [[r.chain.label, _when(exp, s.step), f"`{s.sha[:16]}`"] for r in results for s in r.stages.values()]
    return ["## Stage records", "", "Each evaluated stage's weights (sha256), kept in the workdir's `stages/`.", "",
            *md_table(["defense", "epoch (step)" if exp.epochs else "step", "weights sha256"], body)]


def write(exp: Experiment, root: Path, out: Path, command: str | None = None) -> Path:
    """Write ``out/report.md`` (and ``gap.png``) from the experiment's stores."""
    from robench.config import DATASET_DEFAULTS

    out.mkdir(parents=True, exist_ok=True)
    results = collect(exp, root)
    by_label = {r.chain.label: r.stages for r in results}
    paper_key = DATASET_DEFAULTS[exp.data.dataset].paper if exp.paper else None
    lines = [*header(exp, root, command), *section_final(exp, results, "final"),
             *(section_final(exp, results, "best") if exp.data.n_val else []),
             *section_gap(exp, results, out), *section_overfitting(exp, results), *section_pairs(exp, results),
             *section_sensitivity(exp, results), *paper_section(by_label, paper_key, list(exp.stages)),
             *section_missing(exp, results), *section_stages(exp, results)]
    if exp.engine_report and (root / "main" / "results.sqlite").exists():
        lines += ["## The engine's report", "",
                  "The final stage of every plain defense, as `robench report` shows it: [engine/report.md]"
                  "(engine/report.md).", ""]
    lines += [f"_Written {time.strftime('%Y-%m-%d %H:%M')} by `robench experiment`._"]
    path = out / REPORT
    atomic.write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


__all__ = ["write"]
