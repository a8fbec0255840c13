"""The committed report (reports/report.md, written by `make demo`) holds numbers the committed
code reproduces: re-train the demo's `standard` model and re-evaluate a few of its cells.

Another CPU (AMD or Intel, with or without AVX-512) rounds floats differently in the last bits,
which can flip a borderline example, so a re-derived number must lie inside the committed cell's
95% interval rather than equal it digit for digit.
"""

import re
from pathlib import Path

import pytest

from robench.evaluate import run_eval
from robench.store import wilson
from robench.runtime import Runtime
from robench.train import TrainConfig, train

REPORT = Path(__file__).resolve().parents[1] / "reports" / "report.md"
CELL = re.compile(r"([\d.]+) \[([\d.]+)–([\d.]+)\]")


def table1_row(text: str, defense: str) -> list[str]:
    section = text.split("## Accuracy (Table 1 format)")[1].split("\n## ")[0]
    line = next(l for l in section.splitlines() if l.startswith(f"| {defense} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def interval(cell: str) -> tuple[float, float]:
    value, lo, hi = map(float, CELL.match(cell).groups())
    assert lo <= value <= hi
    return lo, hi


def eps_curve(text: str, defense: str) -> dict[float, tuple[float, int]]:
    line = next(l for l in text.splitlines() if re.match(rf"\| .* \| {defense} \| PGD \|", l))
    return {float(e): (float(a), int(n)) for e, a, n in re.findall(r"([\d.]+): ([\d.]+) \(n=(\d+)\)", line)}


@pytest.mark.skipif(not REPORT.exists(), reason="no committed report (run `make demo`)")
def test_committed_report_numbers_are_reproduced(tmp_path, digits):
    text = REPORT.read_text()
    train(TrainConfig("standard", "digits"), tmp_path, splits=digits, progress=False)
    cpu = Runtime.create("cpu")
    report = run_eval(["standard"], ["pgd", "cw"], tmp_path, cpu, progress=False)
    ours = {e.attack: 100 * e.row.value for e in report.entries}
    row = table1_row(text, "standard")
    for cell, name in zip(row[1:4], ("clean", "pgd", "cw")):
        lo, hi = interval(cell)
        assert lo <= ours[name] <= hi, f"{name}: {ours[name]:.1f} is outside the committed {cell}"
    curve = run_eval(["standard"], ["pgd"], tmp_path, cpu, eps_list=[0.1], progress=False)
    at_01 = 100 * next(e for e in curve.entries if e.attack == "pgd").row.value
    committed, n = eps_curve(text, "standard")[0.1]
    lo, hi = (100 * v for v in wilson(committed / 100 * n, n))
    assert lo <= at_01 <= hi, f"PGD at eps 0.1: {at_01:.1f} is outside [{lo:.1f}, {hi:.1f}] around {committed}"
