"""Experiments as data: a TOML file declares the data, model, defenses, stages, attacks and
report; ``robench experiment FILE`` runs it (resumable, a no-op when finished) and writes its
report. See ``docs/experiments.md`` for the format and ``experiments/`` for examples."""

from __future__ import annotations

from pathlib import Path

from robench.experiment.spec import Experiment, load_experiment

__all__ = ["Experiment", "load_experiment", "run_experiment", "write_outputs"]


def run_experiment(exp: Experiment, root: Path, out: Path | None = None, workers: int | None = None,
                   progress: bool = True, command: str | None = None) -> Path:
    """Run (or resume) every task of ``exp`` in workdir ``root``, then write its report."""
    from robench.experiment.runner import execute

    execute(exp, root, workers, progress, command)
    return write_outputs(exp, root, out, progress, command)


def write_outputs(exp: Experiment, root: Path, out: Path | None = None, progress: bool = True,
                  command: str | None = None) -> Path:
    """The experiment's report; the engine's report of its main workdir (with SmoothGrad maps if the
    file asks for them); the final checkpoints published into a zoo manifest if it names one."""
    from robench.experiment import report

    out = out or exp.out
    main = root / "main"
    if exp.engine_report and (main / "results.sqlite").exists():
        from robench.report import write_report

        if exp.salience:
            from robench.experiment.data import data_dir
            from robench.runtime import Runtime
            from robench.salience import run_salience

            plain = [d.defense for d in exp.defenses if not d.variant]
            run_salience(plain, main, Runtime.create(exp.device, amp=False), dataset=exp.data.dataset,
                         data_dir=data_dir(exp), n_samples=exp.salience)
        write_report(main, out / "engine")
    path = report.write(exp, root, out, command)
    if exp.publish is not None:
        publish(exp, root, command)
    return path


def publish(exp: Experiment, root: Path, command: str | None) -> None:
    """Ship each plain defense's final checkpoint into ``[report] publish``, named
    DEFENSE-<publish_tag> (``robench zoo add --ship``); the entry's notes name the experiment file."""
    from robench.experiment.layout import chains, run_dir
    from robench.zoo.publish import add_run

    notes = (f"Trained and evaluated by robench experiment {exp.path.name} (sha256 {exp.digest[:12]}...)"
             + (f": {command}" if command else "") + f". Test results are on the {exp.data.test_order} order of the "
             f"{exp.data.dataset} test split (seed {exp.data.order_seed}).")
    for chain in chains(exp):
        if chain.workdir_name == "main":
            entry, _ = add_run(run_dir(root, exp, chain), root / "main", exp.publish, ship=True,
                               name=f"{chain.run.defense}-{exp.publish_tag}", notes=notes)
            print(f"published {entry.name} into {exp.publish}")
