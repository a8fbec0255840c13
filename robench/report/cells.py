"""Cell and table formatting: one Markdown table renderer for the whole project."""

from __future__ import annotations

from typing import Sequence

from robench.config import DATASET_DEFAULTS
from robench.report.queries import differs, norm_of, params
from robench.store import Row


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


def paper_dataset(dataset: str) -> str | None:
    """Whose numbers in the paper's tables compare with ``dataset``'s (None: no such numbers)."""
    defaults = DATASET_DEFAULTS.get(dataset)
    return defaults.paper if defaults is not None else None


def dataset_label(dataset: str) -> str:
    defaults = DATASET_DEFAULTS.get(dataset)
    return defaults.label if defaults is not None else dataset


def threat_text(norm: str) -> str:
    """A threat model's name in the report: L∞, L2."""
    return {"linf": "L∞", "l2": "L2"}.get(norm, norm)


def eps_text(eps: float) -> str:
    return f"{eps:g}"


def setting_text(row: Row) -> str:
    """What differs from the attack's defaults, e.g. "attack_steps=1, step_size=0.01"."""
    return ", ".join(f"{k}={v}" for k, v in sorted(differs(row).items()))


def result_label(row: Row) -> str:
    """A stored result in words: "NAME ε=0.03", "NAME ε=0.03 (attack_steps=1)", "NAME L2 ε=0.5",
    "gamma 0.8"."""
    p = params(row)
    if row.key.kind == "sensitivity":
        return f"{row.key.name} {p.get('value')}"
    norm = "" if norm_of(row) == "linf" else f" {threat_text(norm_of(row))}"
    label = row.key.name if "eps" not in p else f"{row.key.name}{norm} ε={eps_text(float(p['eps']))}"
    other = setting_text(row)
    return f"{label} ({other})" if other else label
