"""The benchmark report (Markdown plus PNG figures), built only from the workdir, and its query API."""

# The report reads the trained runs (``runs/*/checkpoint.json``, ``train_log.csv``), the results
# database and what ``robench salience`` stored; it never trains, attacks or loads a dataset. Only
# the newest finished run per (defense, dataset) is reported; results of other checkpoints are
# listed as ignored in the provenance section. Everything missing is listed with the command that
# makes it, and signs of gradient masking are flagged, never hidden.

from __future__ import annotations

from pathlib import Path

from robench import atomic
from robench.report.cells import md_table
from robench.report.checks import LARGE_EPS, run_checks, section_masking, warnings_count
from robench.report.comparisons import section_comparisons
from robench.report.consistency import consistency_checks, section_consistency
from robench.report.l2 import section_l2
from robench.report.missing import section_missing
from robench.report.plugins import ablation_chains, attack_order, column_labels, defense_order, label
from robench.report.provenance import section_provenance
from robench.report.queries import (Reported, Run, attack_row, eps_series, load_workdir, sensitivity_at,
                                    table1_rows)
from robench.report.sections import (section_ablation, section_eps, section_intro, section_rbs, section_salience,
                                     section_sweeps, section_table1, section_table2, section_training)

REPORT = "report.md"

__all__ = [
    "LARGE_EPS", "REPORT", "Reported", "Run", "ablation_chains", "attack_order", "attack_row", "column_labels",
    "defense_order", "eps_series", "label", "load_workdir", "md_table", "sensitivity_at", "table1_rows",
    "write_report",
]


def write_report(workdir: Path, out: Path) -> Path:
    """Write ``out/report.md`` and its PNG figures from ``workdir``; returns the report's path.
    The RBS figure shows the first image ``robench salience`` stored in the workdir."""
    workdir, out = Path(workdir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wd = load_workdir(workdir)
    checks = run_checks(wd)
    n_warn = warnings_count(checks)
    summary = [f"**{n_warn} gradient-masking warning(s)**; see that section.", ""] if n_warn else []
    consistency = consistency_checks(wd)
    if (n_cons := warnings_count(consistency)):
        summary += [f"**{n_cons} attack-consistency warning(s)**; see that section.", ""]
    lines = [*section_intro(wd), *summary, *section_table1(wd), *section_table2(wd), *section_ablation(wd, out),
             *section_comparisons(wd), *section_eps(wd, out), *section_l2(wd), *section_sweeps(wd, out),
             *section_salience(wd, out), *section_training(wd, out), *section_rbs(wd, out),
             *section_consistency(wd, consistency), *section_masking(wd, checks),
             *section_missing(wd), *section_provenance(wd)]
    path = out / REPORT
    atomic.write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
