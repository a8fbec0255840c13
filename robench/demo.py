"""``robench demo``: the paper's whole pipeline on the embedded digits dataset, sized to run in
under ten minutes on two CPU cores. Every stage skips what the workdir already holds, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from robench.salience import run_salience
from robench.sensitivity import run_sensitivity
from robench.evaluate import run_eval
from robench.report import write_report
from robench.runtime import Runtime
from robench.train import TrainConfig, train
from robench.workdir import runs_dir

DATASET = "digits"
DEFENSES = ["standard", "pgdat", "trades", "rbsat-p", "rlfat-p", "rbsat-t", "rlfat-t"]
WHITE_BOX = ["pgd", "cw"]
# The query-heavy attacks run on the first test images only (the paper: N-attack on 1,500) to fit
# the ten-minute budget; their own parameters are the paper's / the reference's.
COSTLY_N = {"nattack": 20, "autoattack": 40}
# PGD at several radii, for the accuracy-vs-eps curve and the large-eps gradient-masking check.
EPS_CURVE = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]


def run_demo(workdir: Path, out: Path, runtime: Runtime, progress: bool = True) -> Path:
    from robench.data import load_dataset

    splits = load_dataset(DATASET)
    for defense in DEFENSES:
        name = TrainConfig(defense, DATASET).default_name()
        train(TrainConfig(defense, DATASET), workdir, runtime, resume=(runs_dir(workdir) / name).exists(),
              progress=progress, splits=splits)
    common = dict(workdir=workdir, runtime=runtime, progress=progress)
    run_eval(DEFENSES, WHITE_BOX, **common)
    for attack, n in COSTLY_N.items():
        run_eval(DEFENSES, [attack], n=n, **common)
    run_eval(DEFENSES, ["pgd"], eps_list=EPS_CURVE, **common)
    run_sensitivity(DEFENSES, sweep=True, **common)
    run_salience(DEFENSES, workdir, runtime)
    return write_report(workdir, out, rbs_image=splits.x_test[0])


