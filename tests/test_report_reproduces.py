"""The committed report (reports/report.md, written by `make demo`) holds the numbers the
committed code produces: re-train the demo's `standard` model and re-evaluate a few of its cells."""

import re
from pathlib import Path

import pytest

from robench.evaluate import run_eval
from robench.runtime import Runtime
from robench.train import TrainConfig, train

REPORT = Path(__file__).resolve().parents[1] / "reports" / "report.md"


def table1_row(text: str, defense: str) -> list[str]:
    section = text.split("## Accuracy (Table 1 format)")[1].split("\n## ")[0]
    line = next(l for l in section.splitlines() if l.startswith(f"| {defense} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def eps_curve(text: str, defense: str) -> dict[float, str]:
    line = next(l for l in text.splitlines() if re.match(rf"\| .* \| {defense} \| PGD \|", l))
    return {float(e): a for e, a in re.findall(r"([\d.]+): ([\d.]+) \(n=", line)}


@pytest.mark.skipif(not REPORT.exists(), reason="no committed report (run `make demo`)")
def test_committed_report_numbers_are_reproduced(tmp_path, digits):
    text = REPORT.read_text()
    train(TrainConfig("standard", "digits"), tmp_path, splits=digits, progress=False)
    cpu = Runtime.create("cpu")
    report = run_eval(["standard"], ["pgd", "cw"], tmp_path, cpu, progress=False)
    ours = {e.attack: f"{100 * e.row.value:.1f}" for e in report.entries}
    row = table1_row(text, "standard")
    assert [row[1].split()[0], row[2].split()[0], row[3].split()[0]] == [ours["clean"], ours["pgd"], ours["cw"]]
    curve = run_eval(["standard"], ["pgd"], tmp_path, cpu, eps_list=[0.1], progress=False)
    at_01 = next(e for e in curve.entries if e.attack == "pgd")
    assert eps_curve(text, "standard")[0.1] == f"{100 * at_01.row.value:.1f}"
