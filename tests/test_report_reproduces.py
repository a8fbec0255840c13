"""The committed report (reports/report.md, written by `make demo`) holds numbers the committed
code reproduces: re-train the demo's `standard` model and re-evaluate a few of its cells.

The committed numbers come from another machine. Another CPU (AMD or Intel, with or without
AVX-512, or another ATEN_CPU_CAPABILITY) rounds floats differently in the last bits, so the
re-trained model differs from the committed one and borderline images can flip: a re-derived
count is compared with the committed one by Fisher's exact test (two rates, equal under the
claim that the code is unchanged), failing only below FALSE_ALARM (tests/bounds.py). The
committed run's per-image outcomes are not in the report, so the test treats the two runs as
independent samples; they share their images, so their counts differ less than that, and the
stated false-alarm rate is an upper bound.
"""

import re
from pathlib import Path

import pytest

from robench.evaluation import run_eval
from robench.runtime import Runtime
from robench.training import TrainConfig, train

from bounds import FALSE_ALARM, count, two_sample_p

REPORT = Path(__file__).resolve().parents[1] / "reports" / "report.md"
CELL = re.compile(r"([\d.]+) \[([\d.]+)–([\d.]+)\]")


def table1_row(text: str, defense: str) -> list[str]:
    section = text.split("## Accuracy (Table 1 format)")[1].split("\n## ")[0]
    line = next(l for l in section.splitlines() if l.startswith(f"| {defense} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def committed_count(percent: float, n: int) -> int:
    """The count behind a committed percentage with one decimal (unique for n < 1000)."""
    k = round(percent * n / 100)
    assert f"{100 * k / n:.1f}" == f"{percent:.1f}", (percent, n)
    return k


def eps_curve(text: str, defense: str) -> dict[float, tuple[float, int]]:
    line = next(l for l in text.splitlines() if re.match(rf"\| .* \| {defense} \| PGD \|", l))
    return {float(e): (float(a), int(n)) for e, a, n in re.findall(r"([\d.]+): ([\d.]+) \(n=(\d+)\)", line)}


def agrees(ours: int, committed: int, n: int, what: str) -> None:
    p = two_sample_p(ours, n, committed, n)
    assert p >= FALSE_ALARM, (f"{what}: {ours} of {n} right against the committed {committed} "
                              f"(Fisher p = {p:.2g} < {FALSE_ALARM:g})")


@pytest.mark.skipif(not REPORT.exists(), reason="no committed report (run `make demo`)")
def test_committed_report_numbers_are_reproduced(tmp_path, digits):
    text = REPORT.read_text()
    train(TrainConfig("standard", "digits"), tmp_path, splits=digits, progress=False)
    cpu = Runtime.create("cpu")
    report = run_eval(["standard"], ["pgd", "cw"], tmp_path, cpu, progress=False)
    rows = {e.attack: e.row for e in report.entries}
    row = table1_row(text, "standard")
    for cell, name in zip(row[1:4], ("clean", "pgd", "cw")):
        n = len(rows[name].outcomes)  # Table 1 is on the whole test split, as here
        value, lo, hi = map(float, CELL.match(cell).groups())
        assert lo <= value <= hi
        agrees(count(rows[name].outcomes > 0.5), committed_count(value, n), n, name)
    curve = run_eval(["standard"], ["pgd"], tmp_path, cpu, eps_list=[0.1], progress=False)
    at_01 = next(e for e in curve.entries if e.attack == "pgd").row
    committed, n = eps_curve(text, "standard")[0.1]
    assert len(at_01.outcomes) == n
    agrees(count(at_01.outcomes > 0.5), committed_count(committed, n), n, "PGD at eps 0.1")
