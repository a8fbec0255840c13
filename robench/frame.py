"""Stored per-example outcomes as a pandas DataFrame, for one's own analysis (``robench export``)."""

# One row per (result, example): every stored result of the workdir's results database, attack
# and sensitivity alike, each example of its index range on its own row. pandas, numpy and the
# store are imported inside the functions, so ``import robench`` stays light.

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pandas

    from robench.store import Row

COLUMNS = ("checkpoint", "defense", "dataset", "split", "example", "data", "kind", "attack", "eps", "norm",
           "params", "setting", "outcome", "created")


def setting(row: "Row") -> str:
    """A short label of a result's setting: "eps=0.2", "eps=0.2, attack_steps=1" (what differs
    from the attack's defaults), "value=0.8" (a sensitivity shift), "" for clean accuracy."""
    from robench.report.queries import differs

    p = json.loads(row.key.params)
    if row.key.kind != "attack":
        return ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
    parts = [] if p.get("eps") is None else [f"eps={float(p['eps']):g}"]
    return ", ".join(parts + [f"{k}={v}" for k, v in sorted(differs(row).items()) if k != "eps"])


def _wanted(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    return {value} if isinstance(value, str) else set(value)


def outcomes_frame(workdir: Path | str, defenses: str | Iterable[str] | None = None,
                   attacks: str | Iterable[str] | None = None, dataset: str | None = None) -> "pandas.DataFrame":
    """Every stored per-example outcome in ``workdir``'s results database, one row per example
    and result, optionally only of some defenses, attacks (or sensitivity shifts, by name) and
    one dataset. Columns: checkpoint (the sha256 results are keyed by), defense, dataset, split,
    example (its index in the split), data (the split's digest), kind ("attack" or
    "sensitivity"), attack (the attack's or shift's name; "clean" for clean accuracy), eps and
    norm (None where the result has none), params (every parameter, canonical JSON), setting (a
    short label, ``setting``), outcome (1.0 correct / 0.0 wrong for attacks; the per-example
    value for sensitivity) and created (when the result was stored, ISO 8601). Reads only: a
    workdir without a results database gives an empty frame."""
    import numpy as np
    import pandas as pd

    from robench.errors import UserError
    from robench.store import DB_NAME, Store

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist or is not a directory")
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    rows = []
    if (workdir / DB_NAME).exists():
        with Store.in_workdir(workdir) as store:
            rows = store.rows(**({} if dataset is None else {"dataset": dataset}))
    keep_d, keep_a = _wanted(defenses), _wanted(attacks)
    rows = [r for r in rows if (keep_d is None or r.defense in keep_d) and (keep_a is None or r.key.name in keep_a)]
    for r in rows:
        k, p = r.key, json.loads(r.key.params)
        n = len(r.outcomes)
        start = k.range[0]
        eps = p.get("eps") if k.kind == "attack" else None
        norm = p.get("norm", "linf") if eps is not None else None
        for name, value in (("checkpoint", k.checkpoint), ("defense", r.defense), ("dataset", k.dataset),
                            ("split", k.split), ("data", k.data), ("kind", k.kind), ("attack", k.name),
                            ("eps", None if eps is None else float(eps)), ("norm", norm), ("params", k.params),
                            ("setting", setting(r)), ("created", r.created)):
            columns[name].append(np.full(n, value, dtype=object))
        columns["example"].append(np.arange(start, start + n, dtype=np.int64))
        columns["outcome"].append(r.outcomes.astype(np.float64))
    frame = pd.DataFrame({c: (np.concatenate(v) if v else np.array([], dtype=object)) for c, v in columns.items()})
    frame["example"] = frame["example"].astype("int64")
    frame["outcome"] = frame["outcome"].astype("float64")
    frame["eps"] = pd.to_numeric(frame["eps"], errors="coerce").astype("float64")
    return frame


def write_frame(frame: "pandas.DataFrame", fmt: str, out: Path | None = None) -> str | None:
    """``frame`` as CSV or JSON lines: written atomically to ``out``, or returned as text."""
    from robench import atomic

    def write(target) -> str | None:
        if fmt == "csv":
            return frame.to_csv(target, index=False)
        if fmt == "jsonl":
            # 15 significant digits, pandas' most: more than a float32 outcome holds.
            return frame.to_json(target, orient="records", lines=True, force_ascii=False, double_precision=15)
        raise ValueError(f"unknown format {fmt!r}")

    if out is None:
        return write(None)
    atomic.write_with(out, write)
    return None
