"""Signs of gradient masking, checked once per reported run and flagged, never hidden."""

from __future__ import annotations

from robench.report.cells import dataset_label, eps_text, pct, result_label
from robench.report.plugins import CLEAN, attack_order, black_box, label, sweep_attack, white_box
from robench.report.queries import Reported, attack_row, eps_series, table1_rows
from robench.store import Row, common_examples, on_examples

LARGE_EPS = 0.5  # at this radius an L-inf attack should leave almost nothing correct
MASKING_POINTS = 1.0  # accuracy gaps (percentage points) that count as suspicious
LARGE_EPS_MAX_ACC = 0.05
WARNING = "**warning**"

Checks = dict[tuple[str, str], list[str]]  # (dataset, defense) -> its check lines


def run_checks(wd: Reported) -> Checks:
    """Every reported run's check lines (warnings start with "**warning**"), in report order."""
    return {(ds, d): masking_checks(wd, ds, d) for ds in wd.datasets() for d in wd.defenses(ds)}


def warnings_count(checks: Checks) -> int:
    return sum(line.startswith(WARNING) for lines in checks.values() for line in lines)


def masking_checks(wd: Reported, ds: str, defense: str) -> list[str]:
    """Warnings (lines starting "**warning**") and notes on checks that could not run."""
    rows = wd.results(ds, defense)
    t1 = table1_rows(wd, ds, defense)
    return (black_box_check(t1) + eps_monotone_check(rows) + large_eps_check(rows, ds, defense)
            + attack_warnings(rows))


def common_acc(row: Row, span: tuple[int, int]) -> float:
    return float((on_examples(row, *span) > 0.5).mean())


def attack_warnings(rows: list[Row]) -> list[str]:
    """What the attacks themselves flagged (an attack may check for masked gradients itself)."""
    return [f"{WARNING} (d) {label(r.key.name)} ({result_label(r)}, n={r.key.n}) reported: {w}"
            for r in rows if r.key.kind == "attack" for w in r.warnings]


def black_box_check(t1: dict[str, Row]) -> list[str]:
    white = [a for a in white_box() if a in t1]
    black = [a for a in black_box() if a in t1]
    if not white or not black:
        needs = " or ".join(label(a) for a in black_box()) or "a black-box attack"
        return [f"(a) black-box vs white-box not checked: needs {needs} and one of "
                f"{', '.join(label(a) for a in white_box())} at the default ε."]
    out = []
    for b in black:
        span = common_examples([t1[a] for a in [*white, b]])
        m = span[1] - span[0]
        if m == 0:
            out.append(f"(a) black-box vs white-box not checked: {label(b)} and the white-box attacks share no examples.")
            continue
        best_white = min(white, key=lambda a: common_acc(t1[a], span))
        acc_b, acc_w = common_acc(t1[b], span), common_acc(t1[best_white], span)
        if acc_b < acc_w - MASKING_POINTS / 100:
            out.append(f"{WARNING} (a) black-box {label(b)} accuracy {pct(acc_b)}% is below white-box "
                       f"{label(best_white)} {pct(acc_w)}% on the first {m} images: the gradients may "
                       f"be masked, so white-box numbers may overstate robustness.")
        else:
            out.append(f"(a) ok: {label(b)} {pct(acc_b)}% ≥ {label(best_white)} {pct(acc_w)}% − 1 "
                       f"on the first {m} images.")
    return out


def eps_monotone_check(rows: list[Row]) -> list[str]:
    out = []
    checked = False
    clean = attack_row(rows, CLEAN)
    for attack in attack_order():
        series = list(eps_series(rows, attack).items())
        if clean is not None:
            series = [(0.0, clean), *series]
        checked |= len(series) >= 2
        for (e0, r0), (e1, r1) in zip(series, series[1:]):
            if r1.value > r0.value + MASKING_POINTS / 100:
                out.append(f"{WARNING} (b) {label(attack)} accuracy rises from {pct(r0.value)}% at "
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
    for attack in attack_order():
        for eps, row in eps_series(rows, attack).items():
            if eps < LARGE_EPS:
                continue
            found = True
            if row.value > LARGE_EPS_MAX_ACC:
                out.append(f"{WARNING} (c) {label(attack)} at ε = {eps_text(eps)} leaves {pct(row.value)}% "
                           f"correct; at this radius it should be near 0 (gradient masking or a broken attack).")
    if not found:
        return [f"(c) large-ε check not run: `{large_eps_command(ds, defense)}`."]
    return out or [f"(c) ok: accuracy ≤ {pct(LARGE_EPS_MAX_ACC)}% at ε ≥ {LARGE_EPS:g}."]


def large_eps_command(ds: str, defense: str) -> str:
    return f"robench eval --defense {defense} --dataset {ds} --attacks {sweep_attack()} --eps {LARGE_EPS:g}"


def section_masking(wd: Reported, checks: Checks) -> list[str]:
    lines = ["## Gradient-masking checks", "",
             "(a) black-box accuracy more than 1 point below white-box; (b) accuracy rising with ε by "
             f"more than 1 point; (c) more than {pct(LARGE_EPS_MAX_ACC)}% accuracy at ε ≥ {LARGE_EPS:g}; "
             "(d) a warning an attack raised itself (its own masking checks). (a)-(c) use L∞ results at the "
             "default attack parameters only; (d) covers every threat model.", ""]
    return lines + per_run(wd, checks)


def per_run(wd: Reported, checks: Checks) -> list[str]:
    """The findings of a check, listed run by run."""
    if not wd.runs:
        return ["No runs; nothing to check.", ""]
    lines = []
    for (ds, d), found in checks.items():
        lines.append(f"- **{d}** on {dataset_label(ds)}:")
        lines += [f"  - {c}" for c in found]
    return lines + [""]
