"""``robench demo``: the paper's whole pipeline on the embedded digits dataset, sized to run in
under ten minutes on two CPU cores. Every stage skips what the workdir already holds, so an
interrupted demo resumes where it stopped.

Which defenses and attacks run, and on how many images, is what the plugins declare (their
``order``, ``demo_n`` and ``eps_curve``), so a new plugin joins the demo without an edit here.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from robench.config import DEFAULT_DATASET
from robench.evaluation import run_eval
from robench.registry import ATTACKS, DEFENSES
from robench.report import write_report
from robench.runtime import Runtime
from robench.salience import run_salience
from robench.sensitivity import run_sensitivity
from robench.training import TrainConfig, train
from robench.workdir import runs_dir

DATASET = DEFAULT_DATASET
# The radii of the accuracy-vs-eps curve and the large-eps gradient-masking check.
EPS_CURVE = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]


def attack_batches() -> list[tuple[int | None, list[str]]]:
    """The registered attacks grouped by ``demo_n`` (None, every test image, first), in their
    order: the query-heavy ones run on the first images only, to fit the ten-minute budget."""
    core = [a for a in ATTACKS.ordered() if ATTACKS.get(a).core]
    attacks = sorted(core, key=lambda a: ATTACKS.get(a).demo_n is not None)
    return [(n, list(group)) for n, group in groupby(attacks, key=lambda a: ATTACKS.get(a).demo_n)]


def run_demo(workdir: Path, out: Path, runtime: Runtime, progress: bool = True) -> Path:
    from robench.data import load_dataset

    defenses = DEFENSES.ordered()
    splits = load_dataset(DATASET)
    for defense in defenses:
        name = TrainConfig(defense, DATASET).default_name()
        train(TrainConfig(defense, DATASET), workdir, runtime, resume=(runs_dir(workdir) / name).exists(),
              progress=progress, splits=splits)
    common = dict(workdir=workdir, runtime=runtime, progress=progress)
    for n, attacks in attack_batches():
        run_eval(defenses, attacks, n=n, **common)
    sweep = [a for a in ATTACKS.ordered() if ATTACKS.get(a).eps_curve and ATTACKS.get(a).core]
    run_eval(defenses, sweep, eps_list=EPS_CURVE, **common)
    run_sensitivity(defenses, sweep=True, **common)
    run_salience(defenses, workdir, runtime)
    return write_report(workdir, out)
