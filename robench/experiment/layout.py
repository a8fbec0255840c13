"""Where an experiment keeps its runs, stages and results inside its workdir.

    W/main/                 robench workdir: the first seed of every plain defense (runs/, results)
    W/<label>-s<seed>/      robench workdir of a variant or of another seed
    W/stages/<wd>/<label>/<step>/  each evaluated stage's weights and record (checkpoint.json, its sha256)
    W/progress.log          one line per finished task
    W/timings.json          wall seconds per task kind, summed over invocations

The run folder keeps only a run's newest weights; the stage copies keep every evaluated stage, so
training goes on while a stage is evaluated, and a best stage can be attacked after the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from robench import atomic, checkpoint
from robench.experiment.spec import DefenseRun, Experiment
from robench.training import TrainConfig


@dataclass(frozen=True)
class Chain:
    """One training run of the experiment: a defense entry and a seed, trained stage by stage."""

    run: DefenseRun
    seed: int
    workdir_name: str
    label: str  # the entry's label, with the seed where the experiment has several


def chains(exp: Experiment) -> list[Chain]:
    out = []
    for seed in exp.seeds:
        for run in exp.defenses:
            main = not run.variant and seed == exp.seeds[0]
            label = run.label if len(exp.seeds) == 1 else f"{run.label}-s{seed}"
            out.append(Chain(run, seed, "main" if main else f"{run.label}-s{seed}", label))
    return out


def train_config(exp: Experiment, chain: Chain, steps: int) -> TrainConfig:
    """The run's settings: the experiment's shared ``[train] options`` that the defense has, then
    its own entry's options."""
    from robench.defense import param_names
    from robench.registry import DEFENSES

    own = set(param_names(DEFENSES.get(chain.run.defense)))
    options = {k: v for k, v in exp.train_options.items() if k in own} | dict(chain.run.options)
    return TrainConfig(chain.run.defense, exp.data.dataset, arch=exp.arch, steps=steps, batch_size=exp.batch_size,
                       lr=exp.lr, flip=exp.flip, seed=chain.seed, options=options)


def workdir(root: Path, chain: Chain) -> Path:
    return root / chain.workdir_name


def run_dir(root: Path, exp: Experiment, chain: Chain) -> Path:
    from robench.workdir import runs_dir

    return runs_dir(workdir(root, chain)) / train_config(exp, chain, exp.steps).default_name()


def stage_dir(root: Path, chain: Chain, step: int) -> Path:
    return root / "stages" / chain.workdir_name / chain.run.label / f"{step:08d}"


def stage_sha(root: Path, chain: Chain, step: int) -> str | None:
    """The weights sha256 recorded for a stage, None if the stage was not reached yet."""
    path = stage_dir(root, chain, step) / checkpoint.META
    if not path.exists():
        return None
    return json.loads(path.read_text())["files"]["weights"]["sha256"]


def snapshot(root: Path, run: Path, chain: Chain, step: int) -> str:
    """Copy the run's checkpoint at ``step`` into its stage folder (weights and record, no
    optimiser state), atomically: a stage folder exists only complete."""
    meta = checkpoint.read_meta(run)
    if int(meta["step"]) != step:
        raise RuntimeError(f"{run} is at step {meta['step']}, expected {step}")
    dest = stage_dir(root, chain, step)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = meta["files"]["weights"]
    shutil.copyfile(run / weights["name"], tmp / weights["name"])
    if checkpoint.sha256(tmp / weights["name"]) != weights["sha256"]:
        raise RuntimeError(f"{run}: weights changed while being copied")
    atomic.write_text(tmp / checkpoint.META, json.dumps({**meta, "files": {"weights": weights}}, indent=2,
                                                        sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return weights["sha256"]
