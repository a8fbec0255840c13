"""``Results``: what ``robench.evaluation`` returns, a view of the stored rows of one model."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from robench.comparison import Comparison as _Comparison, Paired, comparison_table
from robench.errors import UserError
from robench.evaluation import CLEAN, Entry, EvalReport
from robench.store import Row, wilson, worst_case

if TYPE_CHECKING:
    import pandas


class Results:
    """One model's results on one set of images: clean accuracy and one row per attack, each with
    its per-example outcomes (1 correct, 0 wrong), exactly as the results store holds them."""

    def __init__(self, entries: list[Entry], checkpoints: list[str]) -> None:
        self._entries = entries
        self._checkpoints = checkpoints
        self.rows: dict[str, Row] = {e.attack: e.row for e in entries}
        first = entries[0]
        self.label: str = first.label
        self.dataset: str = first.dataset
        self.checkpoint: str = first.row.key.checkpoint
        self.eps: float | None = next((e.eps for e in entries if e.eps is not None), None)

    @property
    def attacks(self) -> list[str]:
        """The results held: "clean" first, then each attack's name."""
        return list(self.rows)

    def _row(self, attack: str) -> Row:
        if attack not in self.rows:
            raise UserError(f"no result for {attack!r}; these results hold: {', '.join(self.rows)}")
        return self.rows[attack]

    def accuracy(self, attack: str = CLEAN) -> float:
        """Share of the images still classified correctly under ``attack`` ("clean": none)."""
        return float(self._row(attack).value)

    def interval(self, attack: str = CLEAN) -> tuple[float, float]:
        """The accuracy's 95% Wilson interval."""
        row = self._row(attack)
        return tuple(row.ci) if row.ci is not None else wilson(row.outcomes.sum(dtype=np.float64), row.key.n)

    def outcomes(self, attack: str = CLEAN) -> np.ndarray:
        """Per-example outcomes under ``attack``, in the images' order: 1.0 correct, 0.0 wrong."""
        return self._row(attack).outcomes.copy()

    def n(self, attack: str = CLEAN) -> int:
        """How many images ``attack`` was run on."""
        return int(self._row(attack).key.n)

    def worst_case(self) -> float:
        """Share of the images every attack (and the clean pass) leaves correct, on the images
        all of them were run on (``to_dict()["results"][0]["worst_case"]`` says how many)."""
        return worst_case(list(self.rows.values()))[0]

    def worst_case_interval(self) -> tuple[float, float]:
        """The worst case's 95% Wilson interval."""
        wc, m = worst_case(list(self.rows.values()))
        return wilson(round(wc * m), m)

    def frame(self) -> "pandas.DataFrame":
        """Per-example outcomes as a DataFrame with ``robench export``'s columns (one row per
        result and example)."""
        import tempfile
        from pathlib import Path

        from robench.frame import outcomes_frame
        from robench.store import Store

        with tempfile.TemporaryDirectory(prefix="robench-frame-") as tmp:  # outcomes_frame reads a store
            with Store.in_workdir(Path(tmp)) as store:
                for row in self.rows.values():
                    store.put(row)
            return outcomes_frame(tmp)

    def table(self) -> str:
        """The text table ``robench eval`` prints."""
        return EvalReport(self._entries, self._checkpoints).table()

    def to_dict(self) -> dict[str, Any]:
        """What ``robench eval --json`` prints."""
        return EvalReport(self._entries, self._checkpoints).as_dict()

    def __repr__(self) -> str:
        parts = [f"{a} {100 * self.accuracy(a):.1f}%" for a in self.rows]
        wc, m = worst_case(list(self.rows.values()))
        eps = "" if self.eps is None else f", eps {self.eps:g}"
        return (f"<Results {self.label} on {self.dataset}{eps}, n={self.n()}: {', '.join(parts)}, "
                f"worst case {100 * wc:.1f}% (n={m})>")

    def _cells(self) -> tuple[list[str], list[str]]:
        head = ["model", *self.rows, "worst case"]
        cells = [self.label] + [f"{100 * self.accuracy(a):.1f} [{100 * self.interval(a)[0]:.1f}–"
                                f"{100 * self.interval(a)[1]:.1f}] (n={self.n(a)})" for a in self.rows]
        wc, m = worst_case(list(self.rows.values()))
        return head, cells + [f"{100 * wc:.1f} (n={m})"]

    def _caption(self) -> str:
        eps = "" if self.eps is None else f", ε = {self.eps:g}"
        return f"{self.dataset}{eps}: accuracy % [95% Wilson interval]"

    def _repr_markdown_(self) -> str:
        from robench.report.cells import md_table

        head, cells = self._cells()
        return "\n".join([f"**{self._caption()}**", "", *md_table(head, [cells])])

    def _repr_html_(self) -> str:
        head, cells = self._cells()
        row = lambda tag, items: "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in items) + "</tr>"  # noqa: E731
        return (f"<table><caption>{html.escape(self._caption())}</caption>{row('th', head)}{row('td', cells)}"
                f"</table>")


class Comparison(_Comparison):
    """``robench compare``'s result for two ``Results``: per attack, the two rows and their
    paired statistics (``Paired``: difference, Newcombe interval, exact McNemar p, images needed)."""

    def __getitem__(self, attack: str) -> Paired:
        if attack not in self.results:
            raise UserError(f"no comparison for {attack!r}; compared: {', '.join(self.results)}")
        return self.results[attack][2]

    def table(self) -> str:
        """The text ``robench compare`` prints."""
        return comparison_table(self)

    def __repr__(self) -> str:
        return "\n".join(f"<Comparison {self.a.name} - {self.b.name}, {attack}: diff {100 * s.diff:+.1f} "
                         f"[{100 * s.ci[0]:+.1f}, {100 * s.ci[1]:+.1f}], McNemar p {s.p:.3g}, n={s.n}>"
                         for attack, (_, _, s) in self.results.items())

    def _repr_markdown_(self) -> str:
        return "```\n" + self.table() + "\n```"


def params_of(row: Row) -> dict[str, Any]:
    return json.loads(row.key.params)
