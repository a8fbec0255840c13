"""The results database: one SQLite file in the workdir, safe for concurrent writers.

A result's key says exactly what was measured: the checkpoint (sha256), the dataset, the split,
the examples (an index range of the split, and a digest of the split's pixels and labels), the kind
("attack" or "sensitivity"), the name, and every parameter that changes an outcome (canonical
JSON, the attack's seed included). The batch size, the number of processes and any resume point
are not in the key because they cannot change an outcome (``robench.attack``).

A row holds the summary value (accuracy or mean loss sensitivity), its 95% interval, the wall
time, versions, device, the attack's own warnings, and the per-example outcome (float32 bytes:
1/0 for "still correct", or the per-example value), so worst-case accuracy over any set of
attacks can be computed later without re-running anything. Finished example ranges of an
evaluation in progress live in ``partial``, keyed by [start, stop), so a resume with another
batch size continues exactly where the last one stopped. WAL mode plus a busy timeout let several
processes write at once; each write is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robench.errors import UserError

if TYPE_CHECKING:
    import torch

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 2  # 1: robench 0.1, keyed by n only, outcomes drawn per batch

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    defense TEXT NOT NULL,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    examples TEXT NOT NULL,
    data TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    n INTEGER NOT NULL,
    value REAL NOT NULL,
    ci_low REAL,
    ci_high REAL,
    outcomes BLOB NOT NULL,
    wall_s REAL NOT NULL,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    created TEXT NOT NULL,
    warnings TEXT NOT NULL,
    UNIQUE (checkpoint, dataset, split, examples, data, kind, name, params)
);
CREATE TABLE IF NOT EXISTS partial (
    key TEXT NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    outcomes BLOB NOT NULL,
    wall_s REAL NOT NULL,
    warnings TEXT NOT NULL,
    PRIMARY KEY (key, start, stop)
);
"""

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: every 95% interval uses it


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = float(successes) / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean."""
    mean = float(np.mean(values, dtype=np.float64))
    half = z * float(np.std(values, ddof=1, dtype=np.float64)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return (mean - half, mean + half)


def canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def split_digest(x: "torch.Tensor", y: "torch.Tensor") -> str:
    """A digest of a whole split's pixels and labels, in order: a changed image folder, another
    dataset order or other preprocessing gives other keys."""
    h = hashlib.sha256()
    h.update(f"{tuple(x.shape)}\0{x.dtype}\0".encode())
    h.update(np.ascontiguousarray(x.cpu().numpy()).tobytes())
    h.update(np.ascontiguousarray(y.cpu().numpy().astype(np.int64)).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Examples:
    """Which examples a result was measured on: indices [start, stop) of a split whose content
    has digest ``data``."""

    split: str
    start: int
    stop: int
    data: str

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def spec(self) -> str:
        return f"{self.start}:{self.stop}"


@dataclass(frozen=True)
class Key:
    checkpoint: str
    dataset: str
    split: str
    examples: str  # "start:stop", indices of the split
    data: str  # digest of the split's pixels and labels (``split_digest``)
    kind: str  # "attack" or "sensitivity"
    name: str
    params: str  # canonical JSON of every outcome-changing parameter
    n: int

    @classmethod
    def make(cls, checkpoint: str, dataset: str, examples: Examples, kind: str, name: str,
             params: dict[str, Any]) -> "Key":
        return cls(checkpoint, dataset, examples.split, examples.spec, examples.data, kind, name,
                   canonical(params), examples.n)

    @property
    def range(self) -> tuple[int, int]:
        start, stop = self.examples.split(":")
        return int(start), int(stop)

    def token(self) -> str:
        return canonical(self.__dict__)


@dataclass
class Row:
    key: Key
    defense: str
    value: float
    ci: tuple[float, float] | None
    outcomes: np.ndarray
    wall_s: float
    versions: dict[str, str]
    device: str
    created: str
    warnings: list[str] = field(default_factory=list)


_KEY_COLUMNS = ("checkpoint", "dataset", "split", "examples", "data", "kind", "name", "params", "n")
_ROW_COLUMNS = ("defense", "value", "ci_low", "ci_high", "outcomes", "wall_s", "versions", "device", "created",
                "warnings")


def _row(r: tuple) -> Row:
    key = Key(*r[:len(_KEY_COLUMNS)])
    defense, value, lo, hi, outcomes, wall_s, versions, device, created, warnings = r[len(_KEY_COLUMNS):]
    return Row(key, defense, value, None if lo is None else (lo, hi), np.frombuffer(outcomes, dtype=np.float32),
               wall_s, json.loads(versions), device, created, json.loads(warnings))


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise UserError(f"{self.path} is not a robench results database (not SQLite); "
                                    f"move it away or pass another --workdir")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = None
        deadline = time.monotonic() + 60
        while self.db is None:
            try:
                self.db = self._open()
            except sqlite3.OperationalError as e:
                # Switching a new file to WAL needs an exclusive lock, and SQLite reports a busy
                # peer at once (no busy handler) when two processes open it at the same moment.
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise UserError(f"cannot open results database {self.path}: {e}") from None
                time.sleep(0.05)
            except sqlite3.DatabaseError as e:
                raise UserError(f"cannot open results database {self.path}: {e}") from None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 60000")
            db.execute("PRAGMA journal_mode = WAL")
            with _Transaction(db):
                self._check_version(db)
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    def _check_version(self, db: sqlite3.Connection) -> None:
        """Refuse a database of another schema (e.g. robench 0.1's, whose attack outcomes
        depended on the batch size and whose keys did not name the examples)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{self.path} holds results of schema {version or 1} (this robench writes {SCHEMA_VERSION}); "
                f"schema-1 results were keyed without their examples and their attack outcomes depended on "
                f"--batch-size, so they cannot be carried over: move the file away (e.g. to "
                f"{self.path.with_suffix('.v1.sqlite').name}) and re-run the evaluations")

    @classmethod
    def in_workdir(cls, workdir: Path) -> "Store":
        return cls(Path(workdir) / DB_NAME)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- finished results ------------------------------------------------------------------
    def get(self, key: Key) -> Row | None:
        where = " AND ".join(f"{c}=?" for c in _KEY_COLUMNS)
        cur = self.db.execute(f"SELECT {', '.join(_KEY_COLUMNS + _ROW_COLUMNS)} FROM results WHERE {where}",
                              tuple(getattr(key, c) for c in _KEY_COLUMNS))
        r = cur.fetchone()
        return None if r is None else _row(r)

    def put(self, row: Row) -> None:
        """Insert a finished result and drop its partial ranges, in one transaction."""
        k = row.key
        values = (*(getattr(k, c) for c in _KEY_COLUMNS), row.defense, float(row.value),
                  None if row.ci is None else float(row.ci[0]), None if row.ci is None else float(row.ci[1]),
                  row.outcomes.astype(np.float32).tobytes(), row.wall_s, json.dumps(row.versions), row.device,
                  row.created, json.dumps(row.warnings))
        columns = _KEY_COLUMNS + _ROW_COLUMNS
        with self._transaction():
            self.db.execute(f"INSERT OR REPLACE INTO results ({', '.join(columns)}) "
                            f"VALUES ({', '.join('?' * len(columns))})", values)
            self.db.execute("DELETE FROM partial WHERE key=?", (k.token(),))

    def rows(self, **where: Any) -> list[Row]:
        clause = " AND ".join(f"{c}=?" for c in where) or "1=1"
        cur = self.db.execute(f"SELECT {', '.join(_KEY_COLUMNS + _ROW_COLUMNS)} FROM results WHERE {clause} "
                              f"ORDER BY id", tuple(where.values()))
        return [_row(r) for r in cur.fetchall()]

    # -- evaluations in progress -----------------------------------------------------------
    def partial(self, key: Key) -> list[Partial]:
        """Finished example ranges of ``key``'s evaluation, sorted by start."""
        cur = self.db.execute("SELECT start, stop, outcomes, wall_s, warnings FROM partial WHERE key=? "
                              "ORDER BY start", (key.token(),))
        return [Partial(a, b, np.frombuffer(o, dtype=np.float32), w, json.loads(ws)) for a, b, o, w, ws in cur]

    def snapshot(self, key: Key) -> tuple[Row | None, list[Partial]]:
        """The finished row (if another process stored it) and the stored ranges, read in one
        transaction: a concurrent writer that finishes the row and drops the ranges is seen
        either before or after, never half-way."""
        self.db.execute("BEGIN")
        try:
            return self.get(key), self.partial(key)
        finally:
            self.db.execute("COMMIT")

    def drop_partial(self, key: Key) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM partial WHERE key=?", (key.token(),))

    def put_partial(self, key: Key, part: "Partial") -> None:
        if len(part.outcomes) != part.stop - part.start:
            raise ValueError(f"{len(part.outcomes)} outcomes for examples {part.start}:{part.stop}")
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO partial (key, start, stop, outcomes, wall_s, warnings) "
                            "VALUES (?,?,?,?,?,?)", (key.token(), part.start, part.stop,
                                                     part.outcomes.astype(np.float32).tobytes(), part.wall_s,
                                                     json.dumps(part.warnings)))

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def _transaction(self):
        return _Transaction(self.db)


@dataclass
class Partial:
    """The outcomes of examples [start, stop) of an evaluation in progress."""

    start: int
    stop: int
    outcomes: np.ndarray
    wall_s: float
    warnings: list[str] = field(default_factory=list)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, so concurrent writers queue on the lock instead of failing."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def common_examples(rows: list[Row]) -> tuple[int, int]:
    """The index range [start, stop) that every row measured (rows of one split and data)."""
    if len({(r.key.dataset, r.key.split, r.key.data) for r in rows}) > 1:
        raise ValueError("rows measured on different example sets have no examples in common")
    start = max(r.key.range[0] for r in rows)
    stop = min(r.key.range[1] for r in rows)
    return start, max(start, stop)


def on_examples(row: Row, start: int, stop: int) -> np.ndarray:
    """``row``'s per-example outcomes for examples [start, stop) of its split."""
    first = row.key.range[0]
    return row.outcomes[start - first:stop - first]


def worst_case(rows: list[Row]) -> tuple[float, int]:
    """Share of the examples common to all rows that every row keeps correct, and how many."""
    start, stop = common_examples(rows)
    if stop == start:
        return 0.0, 0
    alive = np.logical_and.reduce([on_examples(r, start, stop) > 0.5 for r in rows])
    return float(alive.mean()), stop - start
