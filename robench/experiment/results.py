"""An experiment's stored results, stage by stage: read from the workdirs' stores, never re-run.

A row belongs to the experiment when its key matches exactly what the file asks for: the stage's
weights sha256, the split (test, train or val), the number of examples, and every attack
parameter (``make_attack(...).params()``); a row measured with other settings is never picked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import robench.experiment.layout as layout
from robench.experiment.layout import Chain
from robench.experiment.spec import Experiment
from robench.store import Row, Store, canonical, common_examples, on_examples

Z95 = 1.959963984540054


@dataclass
class Stage:
    step: int
    sha: str
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)  # (split, attack) -> row; ("sens", point)

    def acc(self, split: str, attack: str) -> Row | None:
        return self.rows.get((split, attack))

    def gap(self, attack: str) -> tuple[float, float, float] | None:
        """train − test accuracy under ``attack``, with a 95% interval (independent samples)."""
        tr, te = self.acc("train", attack), self.acc("test", attack)
        if tr is None or te is None:
            return None
        return difference(tr.value, tr.key.n, te.value, te.key.n)


@dataclass
class ChainResults:
    chain: Chain
    stages: dict[int, Stage]  # only stages reached
    best: int | None  # the best stage (``best_stage``) once every stage is evaluated


def difference(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """p1 − p2 of two independent proportions, with a normal (Wald) 95% interval."""
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    d = p1 - p2
    return d, d - Z95 * se, d + Z95 * se


def paired_mean(a: Row, b: Row) -> tuple[float, float, int]:
    """Mean of a − b over the examples both rows share, and the variance of that mean."""
    start, stop = common_examples([a, b])
    d = on_examples(a, start, stop).astype(np.float64) - on_examples(b, start, stop).astype(np.float64)
    m = len(d)
    if m == 0:
        return math.nan, math.nan, 0
    return float(d.mean()), float(d.var(ddof=1) / m) if m > 1 else math.nan, m


def gap_difference(sa: Stage, sb: Stage, attack: str) -> tuple[float, float, float] | None:
    """(gap of a) − (gap of b), where each defense's gap is train − test accuracy: the paired
    train difference minus the paired test difference. The two are on disjoint images, so their
    variances add: a 95% interval of the difference in robust generalization gap."""
    rows = [sa.acc("train", attack), sb.acc("train", attack), sa.acc("test", attack), sb.acc("test", attack)]
    if any(r is None for r in rows):
        return None
    tr, var_tr, _ = paired_mean(rows[0], rows[1])
    te, var_te, _ = paired_mean(rows[2], rows[3])
    d, se = tr - te, math.sqrt(var_tr + var_te)
    return d, d - Z95 * se, d + Z95 * se


def expected_params(exp: Experiment) -> dict[str, str]:
    """attack label -> the canonical parameters its rows must carry."""
    from robench.attack import make_attack
    from robench.evaluation import CLEAN

    def params(a) -> dict:
        return {} if a.name == CLEAN else make_attack(a.name, exp.data.dataset, a.eps, a.options).params()

    return {a.label: canonical(params(a)) for a in exp.attacks}


def best_stage(exp: Experiment, root: Path, chain: Chain) -> int:
    """The stage with the highest accuracy under the selection attack on the held-out images (on
    the test images when the file holds none out); the earliest among equals."""
    from robench.store import Store

    spec = exp.attack(exp.select)
    if spec is None or spec.at != "every":
        return exp.steps
    view, n = ("val", exp.data.n_val) if exp.data.n_val else ("test", spec.n)
    params = expected_params(exp)[spec.label]
    scores = {}
    with Store.in_workdir(layout.workdir(root, chain)) as store:
        for step in exp.stages:
            rows = [r for r in store.rows(checkpoint=layout.stage_sha(root, chain, step), name=spec.name)
                    if r.key.split == view and r.key.n == n and r.key.kind == "attack" and r.key.params == params]
            if rows:
                scores[step] = rows[0].value
    if not scores:
        return exp.steps
    top = max(scores.values())
    return min(s for s, v in scores.items() if v == top)


def collect(exp: Experiment, root: Path) -> list[ChainResults]:
    params = expected_params(exp)
    label_of = {(a.name, params[a.label]): a for a in exp.attacks}
    out = []
    for chain in layout.chains(exp):
        stages: dict[int, Stage] = {}
        wd = layout.workdir(root, chain)
        if not (wd / "results.sqlite").exists():
            out.append(ChainResults(chain, {}, None))
            continue
        with Store.in_workdir(wd) as store:
            for step in exp.stages:
                sha = layout.stage_sha(root, chain, step)
                if sha is None:
                    continue
                stage = stages[step] = Stage(step, sha)
                for row in store.rows(checkpoint=sha):
                    k = row.key
                    if k.kind == "sensitivity" and k.split == "test" and k.n == exp.sensitivity_n:
                        stage.rows[("sens", f"{k.name} {json.loads(k.params)['value']:g}")] = row
                    elif k.kind == "attack" and (k.name, k.params) in label_of:
                        spec = label_of[(k.name, k.params)]
                        n = {"test": spec.n, "train": spec.train_n,
                             "val": exp.data.n_val if spec.label == exp.select else -1}.get(k.split)
                        if k.n == n:
                            stage.rows[(k.split, spec.label)] = row
        complete = len(stages) == len(exp.stages)
        out.append(ChainResults(chain, stages, best_stage(exp, root, chain) if complete else None))
    return out

