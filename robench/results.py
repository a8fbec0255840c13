"""The results database: one SQLite file in the workdir, safe for concurrent writers.

One row per (checkpoint sha256, dataset, split, kind, name, params, n, seed) holds the summary
value (accuracy or mean loss sensitivity), its Wilson 95% interval where it is a proportion, the
wall time, versions and device, and the per-example outcome (float32 bytes: 1/0 for "still
correct", or the per-example value), so worst-case accuracy over any set of attacks can be computed
later without re-running anything. Finished batches of an evaluation in progress live in
``partial`` so an interrupted evaluation resumes from them. WAL mode plus a busy timeout let
several processes write at once; each write is one transaction.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from robench.errors import UserError

DB_NAME = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    defense TEXT NOT NULL,
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    value REAL NOT NULL,
    ci_low REAL,
    ci_high REAL,
    outcomes BLOB NOT NULL,
    wall_s REAL NOT NULL,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (checkpoint, dataset, split, kind, name, params, n, seed)
);
CREATE TABLE IF NOT EXISTS partial (
    key TEXT NOT NULL,
    batch INTEGER NOT NULL,
    outcomes BLOB NOT NULL,
    wall_s REAL NOT NULL,
    PRIMARY KEY (key, batch)
);
"""


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = float(successes) / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Key:
    checkpoint: str
    dataset: str
    split: str
    kind: str  # "attack" or "sensitivity"
    name: str
    params: str  # canonical JSON
    n: int
    seed: int

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


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise UserError(f"{self.path} is not a robench results database (not SQLite); "
                                    f"move it away or pass another --workdir")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout = 60000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot open results database {self.path}: {e}") from None

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
        cur = self.db.execute(
            "SELECT defense, value, ci_low, ci_high, outcomes, wall_s, versions, device, created FROM results "
            "WHERE checkpoint=? AND dataset=? AND split=? AND kind=? AND name=? AND params=? AND n=? AND seed=?",
            (key.checkpoint, key.dataset, key.split, key.kind, key.name, key.params, key.n, key.seed))
        r = cur.fetchone()
        if r is None:
            return None
        ci = None if r[2] is None else (r[2], r[3])
        return Row(key, r[0], r[1], ci, np.frombuffer(r[4], dtype=np.float32), r[5], json.loads(r[6]), r[7], r[8])

    def put(self, row: Row) -> None:
        """Insert a finished result and drop its partial batches, in one transaction."""
        k = row.key
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO results (checkpoint, defense, dataset, split, kind, name, params, n, seed,"
                " value, ci_low, ci_high, outcomes, wall_s, versions, device, created)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (k.checkpoint, row.defense, k.dataset, k.split, k.kind, k.name, k.params, k.n, k.seed,
                 float(row.value), None if row.ci is None else float(row.ci[0]),
                 None if row.ci is None else float(row.ci[1]),
                 row.outcomes.astype(np.float32).tobytes(), row.wall_s, json.dumps(row.versions),
                 row.device, row.created))
            self.db.execute("DELETE FROM partial WHERE key=?", (k.token(),))

    def rows(self, **where: Any) -> list[Row]:
        clause = " AND ".join(f"{c}=?" for c in where) or "1=1"
        cur = self.db.execute(
            "SELECT checkpoint, dataset, split, kind, name, params, n, seed, defense, value, ci_low, ci_high,"
            f" outcomes, wall_s, versions, device, created FROM results WHERE {clause} ORDER BY id",
            tuple(where.values()))
        out = []
        for r in cur.fetchall():
            ci = None if r[10] is None else (r[10], r[11])
            out.append(Row(Key(*r[:8]), r[8], r[9], ci, np.frombuffer(r[12], dtype=np.float32), r[13],
                           json.loads(r[14]), r[15], r[16]))
        return out

    # -- evaluations in progress -----------------------------------------------------------
    def partial(self, key: Key) -> dict[int, tuple[np.ndarray, float]]:
        cur = self.db.execute("SELECT batch, outcomes, wall_s FROM partial WHERE key=?", (key.token(),))
        return {b: (np.frombuffer(o, dtype=np.float32), w) for b, o, w in cur.fetchall()}

    def put_partial(self, key: Key, batch: int, outcomes: np.ndarray, wall_s: float) -> None:
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO partial (key, batch, outcomes, wall_s) VALUES (?,?,?,?)",
                            (key.token(), batch, outcomes.astype(np.float32).tobytes(), wall_s))

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def _transaction(self):
        return _Transaction(self.db)


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


def iter_batches(n: int, batch_size: int) -> Iterator[tuple[int, slice]]:
    for b, start in enumerate(range(0, n, batch_size)):
        yield b, slice(start, min(start + batch_size, n))
