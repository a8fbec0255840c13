"""Fidelity benchmark: the paper's defenses on real images (the CIFAR-10 JPEG copy), CPU-sized.

Trains ``standard``, ``pgdat``, ``trades``, ``rlfat-p`` and ``rlfat-t`` (``--ablations`` adds
``rbsat-p`` and ``rbsat-t``) with identical budgets through robench's Python API, evaluates them
on one fixed, shuffled test subset (clean, PGD, CW, N-attack, AutoAttack), measures the loss
sensitivity to brightness and gamma shifts, and writes the robench report with a summary of where
our ordering of the defenses agrees with the paper's Tables 1 and 2.

Run from the repository root (about 40 minutes on 2 CPU cores with the defaults, 250 steps). The
committed report, at ten times that budget, evaluated on the way, with its checkpoints published
into robench's zoo (about 100 minutes on 2 cores):

    nohup nice -n 10 .venv/bin/python benchmarks/fidelity_cifar10.py --steps 2500 --eval-steps 250,1000 \
        --n-test 1000 --n-autoattack 200 --n-nattack 50 --publish robench/zoo/manifest.json > fidelity.log 2>&1 &

Re-running resumes: finished training runs and stored results are skipped (robench's train and
evaluate resume). ``--eval-steps 250,1000`` also evaluates every run on its way to ``--steps``:
it is trained to 250 steps, evaluated, resumed to 1000 (training is exactly resumable), evaluated,
and so on; each stage's weights sha256 is kept in ``fidelity_stages.json`` in the workdir (the run's
folder keeps only its newest weights) and the report adds a learning-curve table of the paper's
pairs. ``--publish MANIFEST`` ships the final checkpoints into a zoo manifest with their results.
The data is ``../shared/data/cifar10-jpeg.tar.gz`` next to the repository; when it is absent the
script prints one line and exits 0.

What is scaled down, identically for every defense (``--steps``, ``--arch``): the model (a Madry
WRN with one unit per stage instead of five and widths 16/32/64 instead of 160/320/640) and the
number of optimiser steps. Everything else is the paper's CIFAR-10 setting (App. A): eps 0.03,
step 0.0075, 10 attack steps, Adam 1e-3 constant, batch 32, random horizontal flip, lambda 6,
eta 0.5 (-P) / 1 (-T), RBS k = 2. The whole 50,000-image training set is used (250 steps see a sixth
of an epoch, 2,500 steps 1.6 epochs).

Test examples: the whole 10,000-image test split in one fixed class-balanced shuffle (seed 0,
``robench.data.balanced_test``): every prefix of 10m images holds m of each class, and every
attack runs on a prefix of it, so results line up example by example (worst case) and the
smaller N-attack / AutoAttack sets are nested in the PGD/CW set. Every stored result's key names
its examples (index range and a digest of the reordered split), so these rows can never be taken
for rows on the folder loader's own order (``robench eval``) or on another order. The workdir is
the benchmark's own only so that its report holds just this order's results.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models on shared cores: threads only contend

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from robench import paper
from robench.data import cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
ARCHIVE_SHA256 = "5bc4d888f681f498e093f43ba996369b16bd30a693bc04938d8758882b51077e"
CACHE = cache_dir()  # $ROBENCH_CACHE, else ~/.cache/robench, as robench's own caches
OUT = REPO / "benchmarks" / "results" / "fidelity_cifar10"
MARKER = ".robench-unpacked"
TIMINGS = "fidelity_timings.json"
STAGES = "fidelity_stages.json"  # workdir name -> defense -> step -> weights sha256 (--eval-steps)
# The paper's pairs the learning curve follows (a vs b: a - b).
CURVE_PAIRS = [("rlfat-p", "pgdat"), ("rlfat-t", "trades"), ("trades", "pgdat")]

# The paper's four defenses and Table 1 columns, in its order (robench.paper is plain data).
PAPER4 = list(paper.TABLE1["cifar10"])
PAPER_COLUMNS = tuple(paper.TABLE1["cifar10"][PAPER4[0]])
# RLFAT-T where the paper's prose and the official code differ (robench's defaults first).
VARIANTS = {
    "rbs-image": dict(rbs_mode="image"),  # a fresh RBS draw per image (prose); default: per batch (code)
    "attack-train": dict(attack_mode="train"),  # x' made in train mode (code); default: eval (TRADES)
}


def defenses(ablations: bool) -> list[str]:
    """The defenses trained: robench's table order, the RBS-only ablations only if asked."""
    from robench.report import ablation_chains, defense_order

    skip = set() if ablations else {chain[1] for chain in ablation_chains()}
    return [d for d in defense_order() if d not in skip]


def sens_columns() -> list[str]:
    """The loss-sensitivity columns of the paper's Table 2 ("brightness -0.15", ...)."""
    from robench.sensitivity import PAPER_POINTS

    return [f"{t} {v:g}" for t, values in PAPER_POINTS.items() for v in values]


# -- data -------------------------------------------------------------------------------------------

def unpack(archive: Path, dest: Path, expected_sha: str | None) -> Path:
    """Unpack ``archive`` into ``dest`` once; a marker holding the archive's sha256 says it is done."""
    from robench.checkpoint import sha256

    digest = sha256(archive)
    if expected_sha is not None and digest != expected_sha:
        raise SystemExit(f"error: {archive} has sha256 {digest}, expected {expected_sha} (damaged copy?)")
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(tmp, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(tmp)
    (tmp / MARKER).write_text(digest + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# -- the plan ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    folder: Path
    workdir: Path
    arch: str
    steps: int
    n_test: int  # clean, PGD, CW, loss sensitivity
    n_nattack: int
    n_autoattack: int
    n_large_eps: int
    defenses: list[str]
    variants: list[str]
    overrides: dict[str, dict]  # attack -> parameter overrides (smoke mode only)
    workers: int
    threads: int
    smoke: bool
    seed: int = 0
    eval_steps: list[int] = dataclasses.field(default_factory=list)  # evaluated on the way to `steps`

    def stages(self) -> list[int]:
        """The step counts each run is trained to and evaluated at, in order; the last is ``steps``."""
        return sorted({s for s in self.eval_steps if 0 < s < self.steps} | {self.steps})

    def workdir_of(self, variant: str | None) -> Path:
        return self.workdir / ("main" if variant is None else f"variant-{variant}")

    def train_config(self, defense: str, variant: str | None = None):
        from robench.defense import param_names
        from robench.registry import DEFENSES
        from robench.train import TrainConfig

        # The paper's CIFAR-10 numbers, written out so the record does not depend on defaults;
        # each defense takes the settings it has.
        paper = dict(eps=0.03, step_size=0.0075, attack_steps=10, rbs_k=2, **(VARIANTS[variant] if variant else {}))
        own = set(param_names(DEFENSES[defense]))
        return TrainConfig(defense, "folder", arch=self.arch, steps=self.steps, batch_size=32, lr=1e-3,
                           flip=True, seed=self.seed, options={k: v for k, v in paper.items() if k in own})

    def runs(self) -> list[tuple[str, str | None]]:
        return [(d, None) for d in self.defenses] + [("rlfat-t", v) for v in self.variants]


# -- work done in worker processes -----------------------------------------------------------------

_STATE: dict = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import robench.attacks  # noqa: F401  (registers the attacks)
    import robench.defenses  # noqa: F401


def _data(plan: Plan):
    """The splits, with the whole test split in the fixed class-balanced order, and its digest;
    loaded once per process."""
    if "splits" not in _STATE:
        from robench.data import balanced_test, load_dataset
        from robench.store import split_digest

        splits = balanced_test(load_dataset("folder", plan.folder), plan.seed)
        _STATE["splits"], _STATE["digest"] = splits, split_digest(splits.x_test, splits.y_test)
    return _STATE["splits"], _STATE["digest"]


def _stored(workdir: Path, checkpoint_sha: str, kind: str) -> int:
    """How many results of one checkpoint the workdir holds (to tell new work from stored)."""
    from robench.store import Store

    with Store.in_workdir(workdir) as store:
        return len(store.rows(checkpoint=checkpoint_sha, kind=kind))


def _label(defense: str, variant: str | None) -> str:
    return f"{defense}{' ' + variant if variant else ''}"


def task_train(plan: Plan, defense: str, variant: str | None, target: int | None = None) -> dict:
    """Train (or resume) the run to ``target`` steps (default: ``plan.steps``). A run already past a
    ``target`` short of ``plan.steps`` is left alone (``"past": True``): that stage's weights are gone,
    its results were stored before the run went on (``execute``'s order)."""
    from robench.checkpoint import META, read_meta
    from robench.runtime import Runtime
    from robench.train import train
    from robench.workdir import runs_dir

    t0 = time.perf_counter()
    splits, _ = _data(plan)
    workdir = plan.workdir_of(variant)
    target = plan.steps if target is None else target
    cfg = dataclasses.replace(plan.train_config(defense, variant), steps=target)
    name = cfg.default_name()
    run_dir = runs_dir(workdir) / name
    before = read_meta(run_dir)["step"] if (run_dir / META).exists() else 0
    stage = f" to step {target}" if plan.eval_steps else ""
    if before > target and target < plan.steps:
        return {"task": f"train {_label(defense, variant)}{stage}", "wall_s": time.perf_counter() - t0,
                "new": 0, "past": True, "step": before}
    result = train(cfg, workdir, Runtime.create("cpu"), name=name, resume=run_dir.exists(),
                   splits=splits, progress=False, checkpoint_every=max(1, min(50, plan.steps)),
                   log_every=max(1, min(10, plan.steps)))
    return {"task": f"train {_label(defense, variant)}{stage}", "wall_s": time.perf_counter() - t0,
            "train_seconds": result.meta.get("train_seconds"), "new": result.meta["step"] - before,
            "step": result.meta["step"], "sha256": result.meta["files"]["weights"]["sha256"]}


def task_eval(plan: Plan, defense: str, variant: str | None, attack_name: str, n: int,
              eps: float | None = None) -> dict:
    from robench.attack import make_attack
    from robench.evaluate import CLEAN, evaluate
    from robench.targets import target_from_run
    from robench.store import Store
    from robench.runtime import Runtime
    from robench.workdir import find_run

    t0 = time.perf_counter()
    test, digest = _data(plan)
    workdir = plan.workdir_of(variant)
    run_dir, _ = find_run(workdir, defense, "folder")
    target = target_from_run(run_dir)
    runtime = Runtime.create("cpu")
    # The attack's own seed (its default, as `robench eval`): every draw is per (seed, example).
    attack = None if attack_name == CLEAN else make_attack(attack_name, "folder", eps,
                                                           plan.overrides.get(attack_name))
    # Batch sizes change only the speed, never an outcome: N-attack in batches of 10 (it searches all
    # active images of a batch together); AutoAttack in one batch, since its per-call overhead
    # dominates on a handful of surviving images.
    batch = {"nattack": 10, "autoattack": max(1, n)}.get(attack_name, 256)
    before = _stored(workdir, target.sha256, "attack")
    with Store.in_workdir(workdir) as store:
        row = evaluate(target, test, attack_name, attack, n, store, runtime, batch_size=batch, progress=False,
                       data=digest)
    return {"task": f"{attack_name}{'' if eps is None else f' eps={eps:g}'} n={n} {_label(defense, variant)}",
            "wall_s": time.perf_counter() - t0, "value": row.value,
            "new": _stored(workdir, target.sha256, "attack") - before}


def task_sensitivity(plan: Plan, defense: str, variant: str | None) -> dict:
    """``robench.sensitivity.run_sensitivity`` at the paper's points on the first n_test images of our
    test order."""
    from robench.sensitivity import run_sensitivity
    from robench.runtime import Runtime
    from robench.workdir import find_run

    t0 = time.perf_counter()
    test, _ = _data(plan)
    workdir = plan.workdir_of(variant)
    sha = find_run(workdir, defense, "folder")[1]["files"]["weights"]["sha256"]
    before = _stored(workdir, sha, "sensitivity")
    run_sensitivity([defense], workdir, Runtime.create("cpu"), dataset="folder", n=plan.n_test, progress=False,
                    splits=test)
    return {"task": f"sensitivity n={plan.n_test} {_label(defense, variant)}", "wall_s": time.perf_counter() - t0,
            "new": _stored(workdir, sha, "sensitivity") - before}


def _run(task: tuple) -> dict:
    fn, args = task[0], task[1:]
    return {"train": task_train, "eval": task_eval, "sens": task_sensitivity}[fn](*args)


# -- scheduling -------------------------------------------------------------------------------------

def eval_tasks(plan: Plan, defense: str, variant: str | None) -> list[tuple]:
    """Longest first, so the two workers finish together."""
    from robench.report import LARGE_EPS

    tasks = []
    if variant is None:
        if plan.n_nattack:
            tasks.append(("eval", plan, defense, variant, "nattack", plan.n_nattack))
        if plan.n_autoattack:
            tasks.append(("eval", plan, defense, variant, "autoattack", plan.n_autoattack))
    tasks += [("eval", plan, defense, variant, "pgd", plan.n_test),
              ("eval", plan, defense, variant, "cw", plan.n_test),
              ("eval", plan, defense, variant, "clean", plan.n_test),
              ("sens", plan, defense, variant)]
    if variant is None and plan.n_large_eps:
        tasks.append(("eval", plan, defense, variant, "pgd", plan.n_large_eps, LARGE_EPS))
    return tasks


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_stages(plan: Plan) -> dict:
    """The benchmark's record of each run's evaluated stages: workdir name -> defense -> {step: sha256}.
    The checkpoint folder keeps only a run's newest weights; this says which stored results belong to
    which step (results are keyed by the weights' sha256)."""
    path = plan.workdir / STAGES
    return json.loads(path.read_text()) if path.exists() else {}


def record_stage(plan: Plan, stages: dict, defense: str, variant: str | None, step: int, sha: str) -> None:
    from robench import atomic

    runs = stages.setdefault(plan.workdir_of(variant).name, {}).setdefault(defense, {})
    if runs.get(str(step)) != sha:
        runs[str(step)] = sha
        atomic.write_text(plan.workdir / STAGES, json.dumps(stages, indent=1, sort_keys=True) + "\n")


def execute(plan: Plan) -> None:
    """Train every run, then evaluate it; a finished run's evaluations start while others train.
    With ``--eval-steps`` each run goes stage by stage: train to a stage's step count, evaluate, and
    only once all its evaluations are stored resume the same run to the next stage (so no stage's
    weights are replaced while they are being evaluated). Logs one line per task, then how many of them
    trained or stored anything new."""
    runs = plan.runs()
    # Attack-trained runs first (standard costs ~1/11 of a step), so the tail is short.
    runs.sort(key=lambda r: r[0] == "standard")
    stages = plan.stages()
    record = read_stages(plan)
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        log(f"done {_describe(result)}")

    def trained(task: tuple, result: dict) -> list[tuple]:
        """After a train task: record the stage's weights and return its evaluations (none for a stage
        the run had gone past already)."""
        _, _, defense, variant, target = task
        if result.get("past"):
            if str(target) not in record.get(plan.workdir_of(variant).name, {}).get(defense, {}):
                log(f"warning: {_label(defense, variant)} is at step {result['step']}, past step {target}, "
                    f"which was never recorded; its weights are gone and it is not evaluated")
            return []
        record_stage(plan, record, defense, variant, result["step"], result["sha256"])
        return eval_tasks(plan, defense, variant)

    def next_train(task: tuple) -> tuple | None:
        _, _, defense, variant, target = task
        i = stages.index(target)
        return ("train", plan, defense, variant, stages[i + 1]) if i + 1 < len(stages) else None

    first = [("train", plan, d, v, stages[0]) for d, v in runs]
    if plan.workers <= 1:
        _init_worker(plan.threads)
        for t in first:
            while t is not None:
                result = _run(t)
                done(result)
                for e in trained(t, result):
                    done(_run(e))
                t = next_train(t)
    else:
        ctx = get_context("spawn")  # no fork of a process that may already hold OpenMP threads
        with ProcessPoolExecutor(plan.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(plan.threads,)) as pool:
            pending = {pool.submit(_run, t): t for t in first}
            waiting: dict[tuple, int] = {}  # (defense, variant, stage) -> evaluations still running
            parent: dict = {}  # evaluation future -> the train task of its stage

            def after_stage(task: tuple) -> None:
                nxt = next_train(task)
                if nxt is not None:
                    pending[pool.submit(_run, nxt)] = nxt

            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    task = pending.pop(fut)
                    done(fut.result())  # an error in a worker stops the benchmark; re-run to resume
                    if task[0] == "train":
                        evals = trained(task, fut.result())
                        if not evals:
                            after_stage(task)
                        waiting[task[2:]] = len(evals)
                        for e in evals:
                            f = pool.submit(_run, e)
                            pending[f], parent[f] = e, task
                    else:
                        stage = parent.pop(fut)
                        waiting[stage[2:]] -= 1
                        if not waiting[stage[2:]]:
                            after_stage(stage)
    fresh = sum(r["new"] > 0 for r in results)
    log(f"tasks: {fresh} of {len(results)} trained or stored something new "
        f"({len(results) - fresh} found finished in the workdir)")


def _describe(result: dict) -> str:
    extra = f", value {result['value']:.3f}" if "value" in result else ""
    stored = "" if result["new"] else " (finished already)"
    return f"{result['task']} in {result['wall_s']:.0f} s{extra}{stored}"


# -- the summary ------------------------------------------------------------------------------------


def _rows(workdir: Path) -> tuple[dict, dict]:
    """(defense -> {column: Row}, defense -> meta) for the newest finished run of each defense."""
    from robench.report import load_workdir, table1_rows

    wd = load_workdir(workdir)
    out, metas = {}, {}
    for (ds, defense), run in wd.runs.items():
        out[defense] = {**table1_rows(wd, ds, defense), **_sensitivity_columns(wd.results(ds, defense))}
        metas[defense] = run.meta
    return out, metas


def _sensitivity_columns(rows: list) -> dict:
    """{"brightness 0.3": Row, ...}: the loss-sensitivity rows at the paper's points."""
    from robench.report import sensitivity_at
    from robench.sensitivity import PAPER_POINTS

    found = {f"{t} {v:g}": sensitivity_at(rows, t, v) for t, values in PAPER_POINTS.items() for v in values}
    return {k: row for k, row in found.items() if row is not None}


def _stage_columns(plan: Plan) -> dict[int, dict[str, dict]]:
    """step -> defense -> {column: Row} for every evaluated stage of the main runs: the Table 1
    columns and the sensitivity points, found by the weights' sha256 recorded for that stage."""
    from robench.report import load_workdir
    from robench.report.queries import attack_row, default_eps
    from robench.store import Store

    main_wd = plan.workdir_of(None)
    recorded = read_stages(plan).get(main_wd.name, {})
    wd = load_workdir(main_wd)
    if not wd.has_db:
        return {}
    digest = wd.digests.get("folder")
    with Store.in_workdir(main_wd) as store:
        by_sha: dict[str, list] = {}
        for row in store.rows():
            if row.key.dataset == "folder" and row.key.data == digest:
                by_sha.setdefault(row.key.checkpoint, []).append(row)
    run = next((r for (ds, _), r in wd.runs.items() if ds == "folder"), None)
    eps = default_eps(run) if run is not None else None
    out: dict[int, dict[str, dict]] = {}
    for defense, steps in recorded.items():
        for step, sha in steps.items():
            if int(step) not in plan.stages():
                continue
            rows = by_sha.get(sha, [])
            cols = {c: attack_row(rows, c, eps) for c in (*PAPER_COLUMNS, "autoattack")}
            out.setdefault(int(step), {})[defense] = {**{c: r for c, r in cols.items() if r is not None},
                                                      **_sensitivity_columns(rows)}
    return dict(sorted(out.items()))


def paired_diff(a, b) -> tuple[float, float, float, int]:
    """Mean of a - b over the examples both rows share, with a normal 95% interval (paired)."""
    from robench.store import common_examples, mean_ci, on_examples

    start, stop = common_examples([a, b])
    d = on_examples(a, start, stop).astype(np.float64) - on_examples(b, start, stop).astype(np.float64)
    m = stop - start
    mean = float(d.mean()) if m else float("nan")
    lo, hi = mean_ci(d) if m > 1 else (float("nan"), float("nan"))
    return mean, lo, hi, m


def agreement(ours: dict) -> tuple[list[str], dict]:
    """For each pair of the paper's four defenses and each column, does our ordering match the paper's?"""
    from robench.report import column_labels, md_table
    from robench.sensitivity import PAPER_POINTS

    labels = column_labels()
    columns = [c for c in PAPER_COLUMNS if all(c in ours.get(d, {}) for d in PAPER4)]
    sens = [(t, v) for t, vs in PAPER_POINTS.items() for v in vs
            if all(f"{t} {v:g}" in ours.get(d, {}) for d in PAPER4)]
    head = ["pair (a vs b)", *(labels[c] for c in columns), *(f"{t} {v:g}" for t, v in sens)]
    body, tally = [], {"agree": 0, "agree_sig": 0, "disagree": 0, "disagree_sig": 0, "tie": 0,
                       "ours_tie": 0, "t1": [0, 0, 0], "t2": [0, 0, 0]}  # per table: agree, sig. agree, scored
    for i, a in enumerate(PAPER4):
        for b in PAPER4[i + 1:]:
            cells = []
            for c in columns:
                gap = paper.TABLE1["cifar10"][a][c] - paper.TABLE1["cifar10"][b][c]
                cells.append(_cell(paired_diff(ours[a][c], ours[b][c]), gap, 100, "pp", tally, "t1"))
            for t, v in sens:
                gap = (paper.TABLE2["cifar10"][a][t][PAPER_POINTS[t].index(v)]
                       - paper.TABLE2["cifar10"][b][t][PAPER_POINTS[t].index(v)])
                key = f"{t} {v:g}"
                cells.append(_cell(paired_diff(ours[a][key], ours[b][key]), gap, 1, "", tally, "t2"))
            body.append([f"{a} vs {b}", *cells])
    return md_table(head, body), tally


def _cell(diff: tuple, paper_gap: float, scale: float, unit: str, tally: dict, table: str) -> str:
    mean, lo, hi, _ = diff
    ours = f"{scale * mean:+.{1 if scale == 100 else 3}f} [{scale * lo:+.{1 if scale == 100 else 3}f}, " \
           f"{scale * hi:+.{1 if scale == 100 else 3}f}]"
    if paper_gap == 0:
        tally["tie"] += 1
        return f"paper tie; ours {ours}"
    if mean == 0:
        tally["ours_tie"] += 1
        return f"= {ours} (paper {paper_gap:+.2f})"
    agree = (mean > 0) == (paper_gap > 0)
    significant = lo > 0 or hi < 0
    tally[("agree" if agree else "disagree") + ("_sig" if significant else "")] += 1
    tally[table][0] += agree
    tally[table][1] += agree and significant
    tally[table][2] += 1
    mark = ("✓" if agree else "✗") + ("" if significant else "?")
    return f"{mark} {ours} (paper {paper_gap:+.2f})"


def ranking(ours: dict, column: str, lower_is_better: bool = False) -> str:
    vals = {d: ours[d][column].value for d in PAPER4 if column in ours.get(d, {})}
    order = sorted(vals, key=lambda d: vals[d], reverse=not lower_is_better)
    return " > ".join(order) if not lower_is_better else " < ".join(order)


def paper_ranking(column: str) -> str:
    from robench.sensitivity import PAPER_POINTS

    if column in PAPER_COLUMNS:
        vals = {d: paper.TABLE1["cifar10"][d][column] for d in PAPER4}
        return " > ".join(sorted(vals, key=lambda d: -vals[d]))
    t, v = column.split()
    vals = {d: paper.TABLE2["cifar10"][d][t][PAPER_POINTS[t].index(float(v))] for d in PAPER4}
    return " < ".join(sorted(vals, key=lambda d: vals[d]))


def variant_table(plan: Plan, main_rows: dict, main_metas: dict) -> list[str]:
    if not plan.variants:
        return ["RLFAT-T variants were not run (`--no-variants`).", ""]
    from robench.report import column_labels, md_table

    labels = column_labels()
    cols = ["clean", "pgd", "cw", *sens_columns()]
    head = ["RLFAT-T run", "rbs_mode", "attack_mode", *(labels.get(c, c) for c in cols),
            "Δ PGD vs default (paired)", "train time"]
    body = []
    base = main_rows.get("rlfat-t", {})
    entries = [("default (robench)", base, main_metas.get("rlfat-t"))]
    for v in plan.variants:
        rows, metas = _rows(plan.workdir_of(v))
        entries.append((v, rows.get("rlfat-t", {}), metas.get("rlfat-t")))
    for label, rows, meta in entries:
        cfg = (meta or {}).get("config", {})
        cells = []
        for c in cols:
            r = rows.get(c)
            if r is None:
                cells.append("—")
            elif c in labels:
                cells.append(f"{100 * r.value:.1f} [{100 * r.ci[0]:.1f}–{100 * r.ci[1]:.1f}]")
            else:
                cells.append(f"{r.value:.3f} [{r.ci[0]:.3f}–{r.ci[1]:.3f}]")
        if label.startswith("default") or "pgd" not in rows or "pgd" not in base:
            delta = "—"
        else:
            m, lo, hi, _ = paired_diff(rows["pgd"], base["pgd"])
            delta = f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        secs = (meta or {}).get("train_seconds")
        body.append([label, str(cfg.get("rbs_mode", "?")), str(cfg.get("attack_mode", "?")), *cells, delta,
                     "—" if secs is None else f"{secs:.0f} s"])
    return md_table(head, body)


def learning_curve(stages: dict[int, dict[str, dict]]) -> list[str]:
    """The paper's pairs at every evaluated step (``--eval-steps``): a - b under PGD (paired, McNemar)
    and in loss sensitivity (mean of the per-image differences, paired 95% interval). Each step's rows
    are found by the weights' sha256 the benchmark recorded for it (``STAGES``)."""
    from robench.compare import p_text, paired_rows
    from robench.report import md_table
    from robench.sensitivity import PAPER_POINTS

    points = [f"{t} {v:g}" for t, values in PAPER_POINTS.items() for v in values]
    head = ["pair (a vs b)", "step", "PGD a", "PGD b", "Δ PGD a − b [95%]", "McNemar p",
            *(f"Δ l {p} [95%]" for p in points)]
    body = []
    for a, b in CURVE_PAIRS:
        for step, cols in stages.items():
            if a not in cols or b not in cols:
                continue
            ca, cb = cols[a], cols[b]
            stats = paired_rows(ca["pgd"], cb["pgd"]) if "pgd" in ca and "pgd" in cb else None
            if stats is None:
                cells = ["—"] * 4
            else:
                cells = [f"{100 * stats.acc_a:.1f}", f"{100 * stats.acc_b:.1f}",
                         f"{100 * stats.diff:+.1f} [{100 * stats.ci[0]:+.1f}, {100 * stats.ci[1]:+.1f}] "
                         f"(n={stats.n})", p_text(stats.p)]
            for p in points:
                if p not in ca or p not in cb:
                    cells.append("—")
                    continue
                m, lo, hi, n = paired_diff(ca[p], cb[p])
                cells.append("—" if not n else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            body.append([f"{a} vs {b}", step, *cells])
    if not body:
        return ["No evaluated steps recorded yet.", ""]
    return md_table(head, body)


def orderings_by_step(stages: dict[int, dict[str, dict]]) -> list[str]:
    """At each evaluated step: how many of the paper's pairwise orderings (its four defenses) agree
    in sign, per table, and each defense's clean and PGD accuracy, so one sees whether the ordering
    moves toward the paper's as training proceeds."""
    from robench.report import md_table

    stages = {step: cols for step, cols in stages.items() if all(d in cols for d in PAPER4)}
    shown = [d for d in ["standard", *PAPER4] if all(d in cols for cols in stages.values())]
    body = []
    for step, cols in stages.items():
        _, tally = agreement(cols)
        t1, t2 = tally["t1"], tally["t2"]
        acc = [f"{100 * cols[d]['clean'].value:.1f} / {100 * cols[d]['pgd'].value:.1f}"
               if "clean" in cols[d] and "pgd" in cols[d] else "—" for d in shown]
        body.append([step, f"{t1[0]} of {t1[2]} ({t1[1]} sig.)", f"{t2[0]} of {t2[2]} ({t2[1]} sig.)", *acc])
    if not body:
        return ["No evaluated steps recorded yet.", ""]
    return md_table(["step", "Table 1 orderings agree", "Table 2 orderings agree",
                     *(f"{d} clean / PGD %" for d in shown)], body)


def header(plan: Plan, timings: dict, command: str) -> list[str]:
    from robench.models import build_model, count_params
    from robench.report import column_labels, md_table

    labels = column_labels()
    ours, metas = _rows(plan.workdir_of(None))
    table_lines, tally = agreement(ours)
    n_params = count_params(build_model(plan.arch, 3, 10))
    total = sum(timings.get("phases", {}).values())
    lines = ["# Fidelity benchmark: RLFAT's defenses on the CIFAR-10 JPEG copy, CPU scale", ""]
    if plan.smoke:
        lines += ["**SMOKE RUN** (a few steps on tiny synthetic data): the numbers below mean nothing.", ""]
    lines += [
        f"Command: `python benchmarks/fidelity_cifar10.py {command}` (resumable: a second run of it trains and "
        "measures nothing, and an interrupted one continues where it stopped).", "",
        "Data: **CIFAR-10 (JPEG copy)** (`cifar10-jpeg.tar.gz`, JPEG quality ~75). Accuracies on it are "
        "not CIFAR-10 numbers, and at this scale they are far below the paper's: the paper columns are "
        "there for the *ordering* of defenses, not the levels.", "",
        "## Summary", "",
    ]
    lines += summary_text(ours, tally)
    lines += ["### Pairwise orderings against the paper", "",
              "Each cell: ours = a − b (accuracy in percentage points; loss sensitivity in its own units, "
              "lower is better), mean over the same test images with a paired 95% interval; then the "
              "paper's a − b (Table 1 / Table 2, CIFAR-10). ✓ the sign agrees with the paper, ✗ it does "
              "not; `?` our interval contains 0, i.e. the order is not resolved at this n; `=` ours is an "
              "exact tie (the same outcome on every image).", "",
              *table_lines]
    ranks = []
    for c in [*PAPER_COLUMNS, "autoattack"]:
        if all(c in ours.get(d, {}) for d in PAPER4):
            n = ours[PAPER4[0]][c].key.n
            ranks.append([labels[c], f"{ranking(ours, c)} (n={n})",
                          paper_ranking(c) if c in PAPER_COLUMNS else "not in the paper"])
    for c in sens_columns():
        if all(c in ours.get(d, {}) for d in PAPER4):
            ranks.append([f"loss sensitivity {c} (lower first)", ranking(ours, c, True), paper_ranking(c)])
    lines += ["### Rankings", "", *md_table(["column", "ours (n)", "paper CIFAR-10"], ranks)]
    if plan.eval_steps:
        stages = _stage_columns(plan)
        lines += ["### Learning curve", "",
                  f"Each run was trained in stages (steps {', '.join(map(str, plan.stages()))}; robench's "
                  "resume, so a run evaluated on the way equals one trained straight through) and evaluated "
                  "at each stage on the same test images. PGD: accuracy of a and b (%), their paired difference "
                  "a − b in percentage points with a 95% Newcombe interval, and the exact McNemar p. Loss "
                  "sensitivity (lower is smoother): mean over images of a − b with a paired normal 95% "
                  "interval; the paper has RLFAT below its baseline.", "", *learning_curve(stages),
                  "How the orderings of the paper's four defenses move: at each step, how many pairwise "
                  "orderings agree in sign with the paper's Table 1 (accuracy) and Table 2 (loss sensitivity), "
                  "how many of those our paired 95% interval resolves, and each model's clean / PGD accuracy.",
                  "", *orderings_by_step(stages)]
    lines += ["## Where the paper's prose and the official code differ (RLFAT-T, same budget)", "",
              "robench's defaults: `rbs_mode=\"batch\"` (one RBS draw per batch, as the official code; the "
              "prose reads as per image) and `attack_mode=\"eval\"` (x' made with BatchNorm in eval mode, as "
              "the TRADES code; the official RLFAT code attacks in train mode, which moves BN statistics "
              "during the attack). Each variant below changes one of the two, same seed, steps and data. "
              f"Evaluated on the same first n = {plan.n_test} images (N-attack and AutoAttack not run on the "
              "variants).", "", *variant_table(plan, ours, metas)]
    lines += scale_section(plan, n_params, metas, timings, total)
    return lines


def summary_text(ours: dict, tally: dict) -> list[str]:
    from robench.report import column_labels

    labels = column_labels()
    judged = tally["agree"] + tally["agree_sig"] + tally["disagree"] + tally["disagree_sig"]
    if not judged:
        return ["Not enough results yet to compare orderings.", ""]
    clean = [ours[d]["clean"].value for d in PAPER4 if "clean" in ours.get(d, {})]
    out = []
    if clean:
        out += [f"Every model here is early in training (clean accuracy "
                f"{100 * min(clean):.0f}–{100 * max(clean):.0f}% "
                "for the four defenses, against 80–85% in the paper), so the comparison says how fast each "
                "objective starts to learn under an identical small budget, not where it converges. Loss "
                "sensitivities are far below the paper's for the adversarially trained models (their predictions "
                "are still low-confidence, so input gradients are small); compare orderings, not levels.", ""]
    out += [f"Of {judged} pairwise orderings of the paper's four defenses (6 pairs × each metric with results), "
           f"**{tally['agree'] + tally['agree_sig']} agree in sign with the paper** "
           f"({tally['agree_sig']} of them with our paired 95% interval excluding 0) and "
           f"**{tally['disagree'] + tally['disagree_sig']} disagree** ({tally['disagree_sig']} significantly). "
           f"{tally['agree'] + tally['disagree']} of the {judged} are not resolved at our n (interval contains 0)."
           + (f" {tally['ours_tie']} exact ties of ours and" if tally["ours_tie"] else "")
           + (f" {tally['tie']} paper tie(s) were not scored." if tally["tie"] else
              (" were not scored." if tally["ours_tie"] else "")),
           "", f"By table: Table 1 (accuracy) {tally['t1'][0]} of {tally['t1'][2]} orderings agree "
           f"({tally['t1'][1]} significantly); Table 2 (loss sensitivity) {tally['t2'][0]} of {tally['t2'][2]} "
           f"agree ({tally['t2'][1]} significantly).", ""]
    claims = [
        ("RLFAT-P vs PGDAT (Table 1: RLFAT-P more robust; AutoAttack is not in the paper)", "rlfat-p", "pgdat",
         ["pgd", "cw", "nattack", "autoattack"], 1),
        ("RLFAT-T vs TRADES (Table 1: RLFAT-T more robust; AutoAttack is not in the paper)", "rlfat-t", "trades",
         ["pgd", "cw", "nattack", "autoattack"], 1),
        ("RLFAT-P vs PGDAT (Table 2: RLFAT-P smoother, lower l)", "rlfat-p", "pgdat",
         sens_columns(), -1),
        ("RLFAT-T vs TRADES (Table 2: RLFAT-T smoother, lower l)", "rlfat-t", "trades",
         sens_columns(), -1),
        ("TRADES vs PGDAT (Table 1: TRADES more robust)", "trades", "pgdat", ["pgd", "cw", "nattack"], 1),
    ]
    for title, a, b, cols, sign in claims:
        parts = []
        for c in cols:
            if c in ours.get(a, {}) and c in ours.get(b, {}):
                m, lo, hi, n = paired_diff(ours[a][c], ours[b][c])
                s = 100 if c in labels else 1
                fmt = ".1f" if s == 100 else ".3f"
                verdict = ("tie" if m == 0 else "as the paper" if m * sign > 0 else "against the paper") + \
                          ("" if lo > 0 or hi < 0 or m == 0 else ", within noise")
                parts.append(f"{labels.get(c, c)} {s * m:+{fmt}} [{s * lo:+{fmt}}, {s * hi:+{fmt}}] "
                             f"(n={n}, {verdict})")
        if parts:
            out.append(f"- **{title}**: " + "; ".join(parts) + ".")
    return out + [""]


def scale_section(plan: Plan, n_params: int, metas: dict, timings: dict, total: float) -> list[str]:
    from robench.report import LARGE_EPS

    per_step = {d: m.get("train_seconds", 0) / max(1, m["config"]["steps"]) for d, m in metas.items()}
    phases = timings.get("phases", {})
    if plan.arch == "wrn-10-1":
        model = (f"- Model: `{plan.arch}` ({n_params:,} parameters), the paper's Madry wide ResNet (pre-activation "
                 "units, LeakyReLU 0.1, BN ε 1e-3, avg-pool + zero-pad shortcuts) with 1 unit per stage and widths "
                 "16/32/64 instead of 5 units and 160/320/640 (`wrn-32-10`, 45.9M). It keeps the architecture "
                 "family (BatchNorm in every unit matters for the train- vs eval-mode attack question, and the "
                 "receptive field spans the image, which RBS's k = 2 blocks are meant to break), at a cost that "
                 "fits 2 shared CPU cores. Probe before the run (batch 32, 32x32, one thread, CPU seconds per "
                 "PGD-10 training step): tiny-cnn 0.28, small-cnn 0.47-0.58, wrn-10-1 0.66-0.71, wrn-16-1 "
                 "1.1-1.6; the CNNs are not the paper's architecture and barely cheaper than wrn-10-1.")
    else:
        model = f"- Model: `{plan.arch}` ({n_params:,} parameters)."
    lines = ["## Scale, and why", "", model,
             f"- Steps: **{plan.steps}** optimiser steps of batch 32 for every defense ({plan.steps * 32:,} images, "
             f"{plan.steps * 32 / 50000:.2f} epochs of the 50,000 training images; the paper: 79,800 steps, ~51 "
             f"epochs), so that the whole benchmark fits a few hours of a 2-core machine; this one took "
             f"{total / 60:.0f} minutes of wall time ({plan.workers} worker process(es) of {plan.threads} "
             "thread(s), under `nice -n 10`). Same seed (0) for every defense: the same initial weights and the "
             "same batches.",
             "- Unchanged from the paper (App. A): ε 0.03, step 0.0075, 10 attack steps in training and in PGD/CW "
             "evaluation, Adam 1e-3 constant, batch 32, random horizontal flip, λ 6, η 0.5 (-P) / 1 (-T), RBS k 2; "
             "N-attack population 300, σ 0.1, lr 0.008, 200 iterations; CW κ 50; AutoAttack `standard`. "
             "Nothing was tuned per defense.",
             f"- Test images: the 10,000 in one fixed class-balanced shuffle (seed 0, "
             f"`robench.data.balanced_test`: every prefix of 10m images holds m of each class). Clean, PGD, CW and loss "
             f"sensitivity on its first **{plan.n_test}**; AutoAttack on the first **{plan.n_autoattack}**; "
             f"N-attack on the first **{plan.n_nattack}** (each surviving image costs 60,000 queries, ~100 s of "
             f"CPU here; the paper uses 1,500); PGD at ε = {LARGE_EPS:g} (masking check) on the first "
             f"{plan.n_large_eps}. The sets are nested, so worst-case accuracy is per example.",
             "- Intervals: accuracy cells carry 95% Wilson intervals; loss sensitivities a normal 95% interval of "
             "the mean over images; differences between defenses a paired normal 95% interval over the shared "
             "images.",
             "",
             "Timings (wall, this run; training per run, with its seconds per step):", ""]
    for d, m in metas.items():
        lines.append(f"- train {d}: {m.get('train_seconds', 0):.0f} s ({per_step[d]:.2f} s/step)")
    for k, v in phases.items():
        lines.append(f"- phase {k}: {v:.0f} s")
    lines += [f"- **total: {total:.0f} s ({total / 60:.1f} min)**, summed over all invocations of the script "
              "(a resumed run adds up).", "",
              f"Caveats: far too few steps for the paper's accuracies (the paper's models see "
              f"~{79800 / plan.steps:.0f}x more images, with a model ~{45.9e6 / n_params:.0f}x larger); at this "
              "scale robust and clean accuracy are both low, and the gaps between defenses are a few points, of "
              f"the order of the intervals (some are resolved at n = {plan.n_test}, see the summary). The N-attack "
              "and AutoAttack columns rest on very few images. One seed per defense: seed-to-seed variation of "
              "the training is not in the intervals (they cover only the test-sample noise).", "",
              "Below: the robench report of this workdir (`robench.report.write_report`), unchanged.", "", "---", ""]
    return lines


def measure(plan: Plan, full) -> None:
    """Time a few real training steps of each run and the evaluation's unit costs (``--measure``)."""
    import tempfile

    import torch

    from robench.attack import make_attack
    from robench.models import build_model
    from robench.runtime import Runtime
    from robench.train import train

    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        for defense, variant in plan.runs():
            cfg = dataclasses.replace(plan.train_config(defense, variant), steps=4)
            t = train(cfg, Path(tmp) / (variant or "main"), Runtime.create("cpu"), splits=full, progress=False,
                      log_every=1, checkpoint_every=4)
            log_rows = (t.run_dir / "train_log.csv").read_text().splitlines()[1:]
            elapsed = [float(r.split(",")[-1]) for r in log_rows]
            per_step[(defense, variant)] = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
            log(f"measure: {defense} {variant or ''}: {per_step[(defense, variant)]:.2f} s/step (wall)")
    model = build_model(plan.arch, 3, 10).eval()
    x, y = full.x_test[:100], full.y_test[:100]
    t0 = time.perf_counter()
    make_attack("pgd", "folder")(model, x, y)
    pgd = (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(5):
            model(full.x_test[:300])
    query = (time.perf_counter() - t0) / 1500
    train_s = sum(per_step.values()) * plan.steps
    log(f"measure: PGD-10 {pgd * 1000:.0f} ms/image; one query {query * 1000:.2f} ms "
        f"(an N-attack image that survives 200 x 300 queries: {60000 * query:.0f} s)")
    log(f"measure: training {train_s:.0f} s of wall in one process at {plan.steps} steps; "
        f"PGD+CW on {plan.n_test} images x {len(plan.runs())} runs: {2 * pgd * plan.n_test * len(plan.runs()):.0f} s")


# -- main -------------------------------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 JPEG archive (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=CACHE / "cifar10-jpeg", help="where to unpack it (default: %(default)s)")
    # v3: results keyed by their examples (robench's results schema 2); a v2 workdir's database is refused.
    p.add_argument("--workdir", type=Path, default=CACHE / "fidelity_cifar10-v3", help="robench workdirs, resumable (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="report folder")
    p.add_argument("--arch", default="wrn-10-1")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 250; 2 with --smoke)")
    p.add_argument("--eval-steps", default="",
                   help="comma-separated step counts below --steps at which each run is also evaluated "
                        "(e.g. 250,1000): it is trained to each in turn and resumed; the report adds a "
                        "learning-curve table (default: only at --steps)")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-nattack", type=int, default=10)
    p.add_argument("--n-autoattack", type=int, default=20)
    p.add_argument("--n-large-eps", type=int, default=100)
    p.add_argument("--ablations", action="store_true", help="also train rbsat-p and rbsat-t")
    p.add_argument("--no-variants", action="store_true", help="skip the RLFAT-T rbs_mode/attack_mode variants")
    p.add_argument("--workers", type=int, default=2, help="worker processes (each runs one task)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run on tiny data (tests): tiny-cnn, 2 steps, weak attacks")
    p.add_argument("--measure", action="store_true", help="time a few steps of each run and the attacks; exit")
    p.add_argument("--no-sha-check", action="store_true", help="accept an archive with another sha256")
    p.add_argument("--publish", type=Path, default=None, metavar="MANIFEST",
                   help="after the report, ship the final checkpoints of the main runs into this zoo manifest as "
                        "DEFENSE-cifar10-jpeg (DEFENSE-smoke with --smoke) with their results; robench's own: "
                        "robench/zoo/manifest.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.publish is not None and (args.publish.is_dir() or any(p.exists() and not p.is_dir()
                                                                  for p in args.publish.parents)):
        raise SystemExit(f"error: --publish {args.publish} must be a manifest file's path, not a folder or a "
                         "path through a file")
    if not args.archive.is_file():
        print(f"fidelity_cifar10: skipped: no CIFAR-10 JPEG archive at {args.archive} "
              f"(it lives in ../shared/data next to the repository)")
        return 0
    t_start = time.perf_counter()
    folder = unpack(args.archive, args.cache, None if (args.no_sha_check or args.smoke) else ARCHIVE_SHA256)
    overrides: dict[str, dict] = {}
    if args.smoke:
        args.arch, args.workers = "tiny-cnn", 1
        args.steps = 2 if args.steps is None else args.steps
        overrides = {"nattack": {"population": 20, "iterations": 10},
                     "autoattack": {"version": "custom", "attacks": ("apgd-ce",)}}
    args.steps = 250 if args.steps is None else args.steps
    try:
        eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"error: --eval-steps {args.eval_steps!r} is not a comma-separated list of step counts")
    if args.steps <= 0 or any(s <= 0 or s > args.steps for s in eval_steps):
        raise SystemExit(f"error: --steps must be positive and every --eval-steps in 1..{args.steps}")
    import torch

    torch.set_num_threads(args.threads)
    from robench.data import load_dataset

    full = load_dataset("folder", folder)  # decodes once and caches, before the workers start
    n_total = len(full.y_test)
    clip = lambda n: min(n, n_total)  # noqa: E731
    plan = Plan(folder=folder, workdir=args.workdir, arch=args.arch, steps=args.steps, n_test=clip(args.n_test),
                n_nattack=clip(args.n_nattack), n_autoattack=clip(args.n_autoattack),
                n_large_eps=clip(args.n_large_eps), defenses=defenses(args.ablations),
                variants=[] if args.no_variants else list(VARIANTS), overrides=overrides,
                workers=args.workers, threads=args.threads, smoke=args.smoke,
                eval_steps=[s for s in eval_steps if s < args.steps])
    for k in ("n_test", "n_nattack", "n_autoattack", "n_large_eps"):
        if getattr(plan, k) < 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be >= 0")
    if args.measure:
        measure(plan, full)
        return 0
    plan.workdir.mkdir(parents=True, exist_ok=True)
    timing_path = plan.workdir / TIMINGS
    timings = json.loads(timing_path.read_text()) if timing_path.exists() else {"phases": {}}

    def phase(name: str, t0: float) -> None:
        timings["phases"][name] = timings["phases"].get(name, 0.0) + time.perf_counter() - t0
        timing_path.write_text(json.dumps(timings, indent=1))

    staged = f" (evaluated at {plan.stages()})" if plan.eval_steps else ""
    log(f"plan: {plan.arch}, {plan.steps} steps{staged}, runs {plan.runs()}, n_test {plan.n_test}, "
        f"nattack {plan.n_nattack}, autoattack {plan.n_autoattack}; workdir {plan.workdir}")
    phase("unpack + load data", t_start)
    t0 = time.perf_counter()
    execute(plan)
    phase("train + evaluate + sensitivity", t0)

    t0 = time.perf_counter()
    from robench.salience import run_salience
    from robench.report import write_report
    from robench.runtime import Runtime

    import robench.attacks  # noqa: F401
    import robench.defenses  # noqa: F401

    main_wd = plan.workdir_of(None)
    run_salience(plan.defenses, main_wd, Runtime.create("cpu"), dataset="folder", data_dir=folder,
                 n_samples=10 if plan.smoke else 50)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.png"):
        old.unlink()
    path = write_report(main_wd, args.out)  # its RBS figure: the salience figure's first image
    phase("salience + report", t0)
    body = path.read_text()
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    path.write_text("\n".join(header(plan, timings, command)) + "\n" + body)
    total = sum(timings["phases"].values())
    log(f"wrote {path} (total {total:.0f} s over all invocations)")
    if args.publish is not None:
        publish(plan, args.publish, command)
    return 0


def publish(plan: Plan, manifest: Path, command: str) -> None:
    """``robench zoo add RUN --ship`` for each main run's final checkpoint: the entry carries its
    settings, its sha256 and the results stored for it (on the class-balanced test order)."""
    from robench.cli import cli

    tag = "smoke" if plan.smoke else "cifar10-jpeg"
    notes = (f"Trained and evaluated by benchmarks/fidelity_cifar10.py {command} on the CIFAR-10 JPEG copy "
             f"(cifar10-jpeg.tar.gz, sha256 {ARCHIVE_SHA256[:12]}...; accuracies on it are not CIFAR-10 numbers). "
             f"Results are on its test split in the class-balanced order of robench.data.balanced_test (seed "
             f"{plan.seed}), so `robench eval --dataset folder`, which keeps the loader's order, measures other "
             "images.")
    for defense in plan.defenses:
        try:  # the CLI's own command, with its one-line errors; it ends with sys.exit
            cli.main(["zoo", "add", defense, "--dataset", "folder", "--workdir", str(plan.workdir_of(None)),
                      "--ship", "--manifest", str(manifest.resolve()), "--name", f"{defense}-{tag}", "--notes", notes],
                     prog_name="robench")
        except SystemExit as e:
            if e.code:
                raise


if __name__ == "__main__":
    sys.exit(main())
