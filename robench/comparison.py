"""Paired comparison of two models on the same examples: difference, 95% interval, exact McNemar test."""

# Two models evaluated on the same examples give paired outcomes, so their accuracies are
# compared through the 2x2 table of (A correct?, B correct?): ``both``, ``only_a`` (b: A right,
# B wrong), ``only_b`` (c) and ``neither``. The statistics, and why these:
#
# - Difference: acc A − acc B = (b − c) / n. It is exactly 0 when the outcomes are the same.
# - 95% interval: Newcombe's hybrid score ("square-and-add") interval for paired proportions,
#   method 10 of R. G. Newcombe, "Improved confidence intervals for the difference between
#   binomial proportions based on paired data", Statistics in Medicine 17 (1998) 2635-2650: the
#   Wilson intervals of both accuracies combined with the estimated correlation of the pair
#   (Fagerland, Lydersen & Laake, Statistics in Medicine 33 (2014) 2850-2875, recommend it; it
#   stays inside [-1, 1] and keeps its coverage near 0 and 1, where a Wald interval fails).
# - p-value: the exact (conditional) McNemar test, a two-sided binomial test of b successes in
#   b + c trials at probability 1/2; p = 1 without discordant examples.
# - Examples to resolve the difference: the n at which McNemar's test at alpha = 0.05 has 80%
#   power when the discordant rates are those observed, by the formula of R. J. Connor, "Sample
#   size for testing differences in proportions for the paired-sample design", Biometrics 43
#   (1987) 207-211: n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2,
#   psi = (b + c) / n, delta = (b - c) / n. None when the observed difference is 0.

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from robench.errors import UserError
from robench.store import Z95, Row, common_examples, on_examples, wilson

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Paired:
    """The paired 2x2 table of two outcome vectors and what follows from it."""

    both: int  # correct for A and for B
    only_a: int  # b: correct for A only
    only_b: int  # c: correct for B only
    neither: int
    ci: tuple[float, float]  # 95% interval of acc A − acc B (Newcombe, method 10)
    p: float  # exact McNemar, two-sided
    n_resolve: int | None  # examples for 80% power at alpha 0.05 (Connor 1987); None: no difference

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def acc_a(self) -> float:
        return (self.both + self.only_a) / self.n

    @property
    def acc_b(self) -> float:
        return (self.both + self.only_b) / self.n

    @property
    def diff(self) -> float:
        return (self.only_a - self.only_b) / self.n

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p < alpha

    def verdict(self, a: str = "A", b: str = "B", alpha: float = ALPHA) -> str:
        if self.only_a == self.only_b == 0:
            return "same outcomes"
        if not self.significant(alpha):
            return "no significant difference"
        return f"{a if self.diff > 0 else b} better"

    def as_dict(self) -> dict:
        return {"n": self.n, "acc_a": self.acc_a, "acc_b": self.acc_b, "diff": self.diff, "ci95": list(self.ci),
                "both": self.both, "only_a": self.only_a, "only_b": self.only_b, "neither": self.neither,
                "mcnemar_p": self.p, "n_to_resolve": self.n_resolve}


def table(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """(both, only A, only B, neither) correct; outcomes above 0.5 count as correct."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"outcome vectors of different lengths ({a.size} and {b.size}) are not paired")
    return int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())


def newcombe_interval(both: int, only_a: int, only_b: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998) method 10 interval for acc A − acc B on paired data: square-and-add of
    the two Wilson intervals with the correlation estimate phi, shrunk towards 0 by n/2 when
    positive (Newcombe's correction, as in Fagerland et al. 2014)."""
    n = both + only_a + only_b + neither
    if n == 0:
        raise ValueError("no examples")
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson(both + only_a, n, z), wilson(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_a * only_b
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    diff = (only_a - only_b) / n
    lower = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    upper = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return max(-1.0, lower), min(1.0, upper)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(b + c, 1/2) at least as far from its
    centre as the observed b), in exact integer arithmetic; 1 without discordant examples."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** m)


def n_to_resolve(only_a: int, only_b: int, n: int, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Examples for McNemar's test at ``alpha`` to find the observed difference with ``power``,
    at the observed discordant rates (Connor 1987); None when the difference is 0."""
    if n == 0 or only_a == only_b:
        return None
    psi, delta = (only_a + only_b) / n, (only_a - only_b) / n
    normal = NormalDist()
    za, zb = normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)
    return math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - delta * delta))) ** 2 / delta ** 2)


def from_counts(both: int, only_a: int, only_b: int, neither: int) -> Paired:
    n = both + only_a + only_b + neither
    return Paired(both, only_a, only_b, neither, newcombe_interval(both, only_a, only_b, neither),
                  mcnemar_exact(only_a, only_b), n_to_resolve(only_a, only_b, n))


def paired(a: np.ndarray, b: np.ndarray) -> Paired:
    """Compare two per-example outcome vectors of the same examples, in the same order."""
    return from_counts(*table(a, b))


def common_span(row_a: Row, row_b: Row) -> tuple[int, int]:
    """The examples both rows measured ([start, stop) of one split; empty when none)."""
    try:
        return common_examples([row_a, row_b])
    except ValueError:  # another dataset, split or version of the data
        return (0, 0)


def paired_rows(row_a: Row, row_b: Row) -> Paired | None:
    """Two stored results compared on the examples they share; None when they share none."""
    start, stop = common_span(row_a, row_b)
    if stop == start:
        return None
    return paired(on_examples(row_a, start, stop), on_examples(row_b, start, stop))


def p_text(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def diff_text(stats: Paired) -> str:
    """"+4.2 [+1.0, +7.4]": the difference and its interval, in accuracy points."""
    lo, hi = stats.ci
    return f"{100 * stats.diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


# -- which stored rows two defenses compare on (``robench compare``) ------------------------------

@dataclass
class Side:
    name: str
    checkpoint: str  # the identity its results are stored under
    where: str  # the run or zoo entry, in words
    rows: list[Row]


@dataclass
class Comparison:
    a: Side
    b: Side
    dataset: str
    eps: float
    results: dict[str, tuple[Row, Row, Paired]]  # attack -> the two rows and their comparison
    # The version of the test split compared (its digest), and the other versions both defenses
    # have results on (digest -> rows), which this comparison leaves out.
    data: str = ""
    other_data: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"a": self.a.name, "b": self.b.name, "dataset": self.dataset, "eps": self.eps, "data": self.data,
                "other_data": self.other_data,
                "checkpoints": {self.a.name: self.a.checkpoint, self.b.name: self.b.checkpoint},
                "results": [{"attack": name, **stats.as_dict(), "verdict": stats.verdict(self.a.name, self.b.name),
                             "examples": _span(ra, rb),
                             "params": {self.a.name: json.loads(ra.key.params), self.b.name: json.loads(rb.key.params)}}
                            for name, (ra, rb, stats) in self.results.items()]}


def _span(ra: Row, rb: Row) -> str:
    start, stop = common_span(ra, rb)
    return f"{start}:{stop}"


def _side(name: str, source) -> Side:
    from robench import checkpoint
    from robench.targets import model_identity

    if source.entry is None:
        sha = checkpoint.read_meta(source.run_dir)["files"]["weights"]["sha256"]
    else:
        e = source.entry
        sha = model_identity(e.sha256, e.arch, e.mean, e.std)
    return Side(name, sha, source.describe(), [])


def compare_defenses(names: list[str], workdir: Path, dataset: str | None = None,
                     attacks: list[str] | None = None) -> Comparison:
    """Compare two defenses' stored results (the checkpoints ``robench eval`` would use: the
    newest finished run in the workdir, else the zoo's) at the dataset's default eps and attack
    parameters, per attack (clean included), on the examples both measured. Reads only."""
    from robench.config import DATASET_DEFAULTS
    from robench.registry import ATTACKS
    from robench.report.plugins import CLEAN, attack_order
    from robench.report.queries import attack_row
    from robench.store import DB_NAME, Store
    from robench.targets import find_sources

    if len(names) != 2:
        raise UserError(f"--defense names {len(names)} defense(s); compare exactly two, e.g. --defense rlfat-t,trades")
    sources = find_sources(names, workdir, dataset)
    if sources[0].dataset != sources[1].dataset:
        raise UserError(f"{names[0]} is trained on {sources[0].dataset} and {names[1]} on {sources[1].dataset}; "
                        f"pass --dataset to compare on one")
    ds = sources[0].dataset
    if ds not in DATASET_DEFAULTS:
        raise UserError(f"no default attack settings for dataset {ds!r}")
    eps = DATASET_DEFAULTS[ds].eps
    a, b = (_side(n, s) for n, s in zip(names, sources))
    fix = f"robench eval --defense {','.join(names)} --dataset {ds}"
    if not (Path(workdir) / DB_NAME).exists():
        raise UserError(f"no results stored in {workdir}; run `{fix}` first")
    with Store.in_workdir(workdir) as store:
        for side in (a, b):
            side.rows = [r for r in store.rows(checkpoint=side.checkpoint, dataset=ds, kind="attack")
                         if r.key.split == "test"]
    # One version of the test split (its digest): the one most of the two defenses' rows share.
    digests = {r.key.data for r in a.rows} & {r.key.data for r in b.rows}
    if not digests:
        empty = [f"{s.name} ({s.where})" for s in (a, b) if not s.rows]
        why = (f"no results stored for {' and '.join(empty)}" if empty else
               "their results were measured on different versions of the test split")
        raise UserError(f"{names[0]} and {names[1]} have no examples in common on {ds}: {why}; run `{fix}`")
    share = {d: sum(r.key.data == d for r in a.rows + b.rows) for d in sorted(digests)}
    digest = max(share, key=share.get)
    for side in (a, b):
        side.rows = [r for r in side.rows if r.key.data == digest]
    rows_a = {r.key.name: attack_row(a.rows, r.key.name, eps) for r in a.rows}
    rows_b = {r.key.name: attack_row(b.rows, r.key.name, eps) for r in b.rows}
    stored = {k for k, v in rows_a.items() if v} | {k for k, v in rows_b.items() if v}
    known = [CLEAN, *attack_order()]
    wanted = attacks or [*(x for x in known if x in stored), *sorted(stored - set(known))]
    missing = {x: [s.name for s, rows in ((a, rows_a), (b, rows_b)) if rows.get(x) is None] for x in wanted}
    missing = {x: who for x, who in missing.items() if who}
    for x in missing:
        if x != CLEAN and x not in stored:
            ATTACKS.get(x)  # a typo: the usual "unknown attack ...; choose from" line
    if missing:
        parts = [f"{x} for {' and '.join(who)}" for x, who in missing.items()]
        who = [n for n in names if any(n in w for w in missing.values())]
        needs = [x for x in missing if x != CLEAN]  # eval stores clean accuracy with every attack
        run = f"robench eval --defense {','.join(who)} --dataset {ds}"
        run += f" --attacks {','.join(needs)}" if needs else ""
        only = "" if attacks else "; or pass --attacks with those stored for both"
        raise UserError(f"no stored result at the default eps {eps:g} and parameters of {'; '.join(parts)}: "
                        f"run `{run}`{only}")
    results = {}
    for x in wanted:
        stats = paired_rows(rows_a[x], rows_b[x])
        if stats is None:
            raise UserError(f"{x}: the results of {names[0]} (examples {rows_a[x].key.examples}) and {names[1]} "
                            f"(examples {rows_b[x].key.examples}) share no examples")
        results[x] = (rows_a[x], rows_b[x], stats)
    return Comparison(a, b, ds, eps, results, digest, {d: k for d, k in share.items() if d != digest})


def comparison_table(c: Comparison) -> str:
    """``robench compare``'s text output: one line per attack, then what the columns mean."""
    a, b = c.a.name, c.b.name
    head = ["attack", "n", f"{a} %", f"{b} %", "diff [95% CI]", "b/c", "McNemar p", "n to resolve", "verdict"]
    body = [[x, str(s.n), f"{100 * s.acc_a:.1f}", f"{100 * s.acc_b:.1f}", diff_text(s), f"{s.only_a}/{s.only_b}",
             p_text(s.p), "-" if s.n_resolve is None else str(s.n_resolve), s.verdict(a, b)]
            for x, (_, _, s) in c.results.items()]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [f"checkpoint {side.name}: {side.where}" for side in (c.a, c.b)]
    lines += ["", f"{c.dataset}, eps = {c.eps:g}, default attack parameters; accuracy % on the first n test "
                  f"images both were evaluated on" + (f" (test split version {c.data})" if c.data else "")]
    if c.other_data:
        others = ", ".join(f"{d} ({k} rows)" for d, k in c.other_data.items())
        lines += [f"note: both also have results on other versions of the {c.dataset} test split (another image "
                  f"order or folder): {others}; this compares the version with the most rows"]
    lines += [""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
              for r in [head, ["-" * w for w in widths], *body]]
    lines += ["", f"diff: accuracy points, {a} minus {b}, with Newcombe's 95% interval for paired proportions;",
              f"b/c: images only {a} / only {b} gets right; McNemar p: exact, two-sided; n to resolve: images",
              "for 80% power at alpha 0.05 at the observed discordant rates (Connor 1987)."]
    return "\n".join(lines)
