"""Running an experiment: every run trained stage by stage, each stage evaluated, then the final
(and best) stages attacked in depth, by a pool of worker processes.

Order of work for one run (a ``Chain``): train to the first stage, copy the stage's weights, then
train on to the next stage while that stage's evaluations run in other workers. When every stage
is evaluated, the best stage (highest accuracy under ``[select] attack`` on the held-out images)
is known, and the attacks marked ``final`` / ``final+best`` run on those stages.

Nothing here decides an outcome: training resumes exactly from its checkpoints, every stored
result resumes by example ranges, and each task first looks for what is already stored. So a run
killed at any point (SIGKILL included) and started again ends with the same stored results as one
never interrupted, and a finished experiment run again does no work.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from robench import atomic
import robench.experiment.layout as layout
from robench.experiment.layout import Chain
from robench.experiment.results import best_stage
from robench.experiment.spec import Experiment

TRAIN, EVAL, SENS = "train", "eval", "sens"


@dataclass(frozen=True)
class Task:
    kind: str
    chain: int  # index into layout.chains(exp)
    step: int
    view: str = "test"  # eval: test, train or val
    attack: str = ""  # the attack's label in the file
    n: int = 0

    def describe(self, chains: list[Chain]) -> str:
        label = chains[self.chain].label
        if self.kind == TRAIN:
            return f"train {label} to step {self.step}"
        if self.kind == SENS:
            return f"sensitivity {label} step {self.step}"
        return f"{self.attack} n={self.n} on {self.view} {label} step {self.step}"


# -- in a worker -------------------------------------------------------------------------------------

_STATE: dict = {}


def _init(exp: Experiment, root: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import robench.attacks  # noqa: F401  (registers the attacks)
    import robench.defenses  # noqa: F401  (registers the defenses)

    _STATE.clear()
    _STATE.update(exp=exp, root=root, chains=layout.chains(exp))


def _prepared():
    if "data" not in _STATE:
        from robench.experiment.data import prepare

        _STATE["data"] = prepare(_STATE["exp"])
    return _STATE["data"]


def _runtime(train: bool):
    from robench.runtime import Runtime

    exp = _STATE["exp"]
    # Evaluation always in float32; training under bf16 autocast only when the file says so.
    return Runtime.create(exp.device, amp=exp.train_amp if train else False, compile=exp.compile and train)


def run_task(task: Task) -> dict:
    t0 = time.perf_counter()
    exp, root, chain = _STATE["exp"], _STATE["root"], _STATE["chains"][task.chain]
    new = {TRAIN: _train, EVAL: _eval, SENS: _sens}[task.kind](exp, root, chain, task)
    return {"wall_s": time.perf_counter() - t0, "new": new, "kind": task.kind}


def _train(exp: Experiment, root: Path, chain: Chain, task: Task) -> bool:
    from robench import checkpoint
    from robench.training import train

    if layout.stage_sha(root, chain, task.step) is not None:
        return False
    run = layout.run_dir(root, exp, chain)
    at = int(checkpoint.read_meta(run)["step"]) if (run / checkpoint.META).exists() else 0
    if at > task.step:
        raise RuntimeError(f"{run} is at step {at}, past stage {task.step}, whose copy is missing; delete the run "
                           "to train it again")
    cfg = layout.train_config(exp, chain, task.step)
    if at < task.step:
        train(cfg, layout.workdir(root, chain), _runtime(train=True), name=run.name, resume=run.exists(),
              splits=_prepared().train, progress=False, checkpoint_every=max(1, min(100, task.step)),
              log_every=max(1, min(exp.steps_per_epoch or 50, task.step)))
    layout.snapshot(root, run, chain, task.step)
    return True


def _target(root: Path, chain: Chain, step: int):
    from robench.targets import target_from_run

    return target_from_run(layout.stage_dir(root, chain, step))


def _eval(exp: Experiment, root: Path, chain: Chain, task: Task) -> bool:
    from robench.attack import make_attack
    from robench.evaluation import CLEAN, evaluate
    from robench.store import Store

    view = _prepared().views[task.view]
    spec = exp.attack(task.attack)
    attack = None if spec.name == CLEAN else make_attack(spec.name, exp.data.dataset, spec.eps, spec.options)
    target = _target(root, chain, task.step)
    runtime = _runtime(train=False)
    target.model = runtime.prepare(target.model)
    with Store.in_workdir(layout.workdir(root, chain)) as store:
        key_rows = len(store.rows(checkpoint=target.sha256))
        evaluate(target, view.splits, spec.name, attack, task.n, store, runtime,
                 batch_size=spec.batch_size, progress=False, data=view.digest, split=view.split)
        return len(store.rows(checkpoint=target.sha256)) > key_rows


def _sens(exp: Experiment, root: Path, chain: Chain, task: Task) -> bool:
    from robench.sensitivity import measure
    from robench.store import Store

    view = _prepared().views["test"]
    target = _target(root, chain, task.step)
    with Store.in_workdir(layout.workdir(root, chain)) as store:
        before = len(store.rows(checkpoint=target.sha256))
        measure(target, view.splits, exp.sensitivity_n, store, _runtime(train=False), progress=False,
                digest=view.digest)
        return len(store.rows(checkpoint=target.sha256)) > before


# -- planning ----------------------------------------------------------------------------------------

def stage_tasks(exp: Experiment, chain: int, step: int) -> list[Task]:
    """What every stage gets: the ``every`` attacks on test (and training) images, the selection
    attack on the held-out images, and the sensitivity."""
    out = []
    for a in exp.attacks:
        if a.at == "every":
            out.append(Task(EVAL, chain, step, "test", a.label, a.n))
            if a.train_n:
                out.append(Task(EVAL, chain, step, "train", a.label, a.train_n))
    if exp.data.n_val:
        out.append(Task(EVAL, chain, step, "val", exp.select, exp.data.n_val))
    if exp.sensitivity_n and exp.sensitivity_at == "every":
        out.append(Task(SENS, chain, step))
    # Longest first, so that workers finish together.
    return sorted(out, key=lambda t: (t.kind != EVAL, t.attack == "clean", -t.n))


def deep_tasks(exp: Experiment, chain: int, best: int) -> list[Task]:
    """The attacks marked ``final`` / ``final+best``, and a sensitivity at the final stage."""
    out = []
    for a in exp.attacks:
        steps = {"every": [], "final": [exp.steps], "final+best": sorted({exp.steps, best})}[a.at]
        out += [Task(EVAL, chain, s, "test", a.label, a.n) for s in steps]
    if exp.sensitivity_n and exp.sensitivity_at != "every":
        steps = [exp.steps] if exp.sensitivity_at == "final" else sorted({exp.steps, best})
        out += [Task(SENS, chain, s) for s in steps]
    return out


# -- the loop ----------------------------------------------------------------------------------------

@dataclass
class _Progress:
    root: Path
    bar: tqdm
    timings: dict = field(default_factory=dict)
    fresh: int = 0
    done: int = 0

    def finished(self, task: Task, result: dict, chains: list[Chain]) -> None:
        self.done += 1
        self.fresh += bool(result["new"])
        line = (f"[{time.strftime('%H:%M:%S')}] {task.describe(chains)}: {result['wall_s']:.0f} s"
                f"{'' if result['new'] else ' (stored already)'}")
        with open(self.root / "progress.log", "a") as f:
            f.write(line + "\n")
        if result["new"]:
            self.timings[task.kind] = self.timings.get(task.kind, 0.0) + result["wall_s"]
            atomic.write_text(self.root / "timings.json", json.dumps(self.timings, indent=1, sort_keys=True) + "\n")
        self.bar.update(1)
        self.bar.set_postfix_str(task.describe(chains)[:60])


def execute(exp: Experiment, root: Path, workers: int | None = None, progress: bool = True,
            command: str | None = None) -> tuple[int, int]:
    """Run everything the experiment file asks for; returns (tasks that did new work, tasks).
    ``command``: how it was invoked, for the report."""
    from robench.experiment.data import prepare

    # Bad data settings are refused before any work; a folder is decoded once into its cache here,
    # and a single worker (this process) keeps what was loaded.
    prepared = prepare(exp)
    root.mkdir(parents=True, exist_ok=True)
    _record_env(exp, root, command)
    workers = workers or exp.workers
    chains = layout.chains(exp)
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    per_stage = len(stage_tasks(exp, 0, exp.steps))
    total = len(chains) * len(exp.stages) * (1 + per_stage)
    bar = tqdm(total=total, desc=f"experiment {exp.name}", unit="task", disable=not progress, dynamic_ncols=True)
    prog = _Progress(root, bar, timings)
    ready: list[Task] = [Task(TRAIN, i, exp.stages[0]) for i in range(len(chains))]
    open_evals = {i: 0 for i in range(len(chains))}  # stage evaluations not finished
    trained_to = {i: 0 for i in range(len(chains))}

    def after(task: Task, result: dict) -> None:
        prog.finished(task, result, chains)
        c = task.chain
        if task.kind == TRAIN:
            trained_to[c] = task.step
            i = exp.stages.index(task.step)
            if i + 1 < len(exp.stages):
                ready.insert(0, Task(TRAIN, c, exp.stages[i + 1]))  # the critical path first
            evals = stage_tasks(exp, c, task.step)
            open_evals[c] += len(evals)
            ready.extend(evals)
        elif task.step in exp.stages and task in stage_tasks(exp, c, task.step):
            open_evals[c] -= 1
        else:
            return
        if trained_to[c] == exp.steps and open_evals[c] == 0:
            open_evals[c] = -1  # the deep attacks are planned once
            deep = deep_tasks(exp, c, best_stage(exp, root, chains[c]))
            bar.total += len(deep)
            ready.extend(deep)

    if workers <= 1:
        _init(exp, root, exp.threads)
        _STATE["data"] = prepared
        while ready:
            task = ready.pop(0)
            after(task, run_task(task))
    else:
        ctx = get_context("spawn")  # no fork of a process that may hold OpenMP threads
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                 initargs=(exp, root, exp.threads)) as pool:
            running: dict = {}
            while ready or running:
                while ready and len(running) < workers:
                    task = ready.pop(0)
                    running[pool.submit(run_task, task)] = task
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    after(running.pop(fut), fut.result())  # a worker's error stops the run; rerun resumes
    bar.close()
    return prog.fresh, prog.done


def _record_env(exp: Experiment, root: Path, command: str | None) -> None:
    """Where the experiment ran (the last invocation), for the report's header."""
    import platform

    import torch

    from robench.runtime import resolve_device

    device = resolve_device(exp.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"device": name, "torch": torch.__version__, "cpu": f"{cpu}, {os.cpu_count()} cores", "command": command}
    atomic.write_text(root / "env.json", json.dumps(env, indent=1, sort_keys=True) + "\n")
