"""Does our ordering of the paper's four defenses agree with its Tables 1 and 2?

For each pair of the four defenses and each column, the sign of our paired difference (same test
images) is compared with the sign of the paper's difference: ✓ agrees, ✗ disagrees, and ``?``
when our 95% interval includes 0. Accuracy columns use the paired difference of per-example
outcomes, loss-sensitivity columns the paired difference of per-example gradient norms.
"""

from __future__ import annotations

from robench import paper
from robench.experiment.results import Stage, Z95, paired_mean
from robench.report.cells import md_table
from robench.report.plugins import column_labels
from robench.sensitivity import PAPER_POINTS

PAPER4 = ("pgdat", "trades", "rlfat-p", "rlfat-t")


def _sens_points() -> list[tuple[str, float]]:
    return [(t, v) for t, values in PAPER_POINTS.items() for v in values]


def agreement(stages: dict[str, Stage], paper_key: str) -> tuple[list[str], dict]:
    """The pairwise table at one stage (label -> Stage of the paper's four defenses) and a tally
    per table: [agree, agree significantly, scored]."""
    labels = column_labels()
    table1 = paper.TABLE1[paper_key]
    columns = [c for c in table1[PAPER4[0]] if all(stages[d].acc("test", c) for d in PAPER4)]
    sens = [(t, v) for t, v in _sens_points() if all(stages[d].acc("sens", f"{t} {v:g}") for d in PAPER4)]
    head = ["pair (a vs b)", *(labels.get(c, c) for c in columns), *(f"l {t} {v:g}" for t, v in sens)]
    tally = {"t1": [0, 0, 0], "t2": [0, 0, 0]}
    body = []
    for i, a in enumerate(PAPER4):
        for b in PAPER4[i + 1:]:
            cells = []
            for c in columns:
                gap = table1[a][c] - table1[b][c]
                cells.append(_cell(stages[a].acc("test", c), stages[b].acc("test", c), gap, 100, tally["t1"]))
            for t, v in sens:
                k = PAPER_POINTS[t].index(v)
                gap = paper.TABLE2[paper_key][a][t][k] - paper.TABLE2[paper_key][b][t][k]
                key = f"{t} {v:g}"
                cells.append(_cell(stages[a].acc("sens", key), stages[b].acc("sens", key), gap, 1, tally["t2"]))
            body.append([f"{a} vs {b}", *cells])
    return md_table(head, body), tally


def _cell(ra, rb, paper_gap: float, scale: float, tally: list[int]) -> str:
    mean, var, _ = paired_mean(ra, rb)
    half = Z95 * var ** 0.5 if var == var else float("nan")
    digits = 1 if scale == 100 else 3
    ours = f"{scale * mean:+.{digits}f} [{scale * (mean - half):+.{digits}f}, {scale * (mean + half):+.{digits}f}]"
    if paper_gap == 0 or mean == 0:
        return f"tie; ours {ours} (paper {paper_gap:+.2f})"
    agree = (mean > 0) == (paper_gap > 0)
    significant = abs(mean) > half
    tally[0] += agree
    tally[1] += agree and significant
    tally[2] += 1
    return f"{'✓' if agree else '✗'}{'' if significant else '?'} {ours} (paper {paper_gap:+.2f})"


def section(by_label: dict[str, dict[int, Stage]], paper_key: str | None, steps: list[int]) -> list[str]:
    """Orderings at every stage (counts) and the full pairwise table at the last stage."""
    if paper_key is None or not all(d in by_label for d in PAPER4):
        return []
    lines = ["## Against the paper's orderings", "",
             f"The paper's four defenses, pair by pair, against its Tables 1 and 2 ({paper_key} numbers): ✓ our "
             "paired difference has the paper's sign, ✗ the opposite sign; `?` marks a 95% interval that includes 0. "
             "Accuracy in points, loss sensitivity in its own units.", ""]
    body = []
    last = None
    for step in steps:
        at = {d: by_label[d].get(step) for d in PAPER4}
        if any(s is None for s in at.values()):
            continue
        table, tally = agreement(at, paper_key)
        t1, t2 = tally["t1"], tally["t2"]
        body.append([step, f"{t1[0]} of {t1[2]} ({t1[1]} sig.)", f"{t2[0]} of {t2[2]} ({t2[1]} sig.)"])
        last = (step, table)
    if last is None:
        return []
    lines += md_table(["step", "Table 1 orderings agreeing", "Table 2 orderings agreeing"], body)
    lines += [f"At step {last[0]}:", "", *last[1]]
    return lines
