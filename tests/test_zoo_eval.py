"""The zoo in `robench eval`: with an empty workdir a defense's shipped checkpoint is used and
named; a run trained in the workdir takes precedence; `--zoo` or an entry's name chooses the zoo;
the shipped entries' recorded results reproduce."""

import pytest
from click.testing import CliRunner

from bounds import FALSE_ALARM, two_sample_p
from robench import zoo
from robench.cli import cli
from robench.errors import UserError
from robench.evaluation import run_eval
from robench.registry import DEFENSES
from robench.runtime import Runtime
from robench.training import TrainConfig, train

CPU = Runtime.create("cpu")


def test_every_defense_ships_a_verified_digits_checkpoint():
    shipped = {e.defense: e for e in zoo.entries() if e.shipped and e.dataset == "digits"}
    assert set(shipped) == set(DEFENSES.names())
    for entry in shipped.values():
        assert zoo.verify(entry) == "ok"
        assert {"clean", "pgd", "cw", "nattack", "autoattack"} <= set(entry.results)


def test_an_empty_workdir_evaluates_the_zoo_checkpoint_and_says_so(tmp_path):
    r = CliRunner().invoke(cli, ["eval", "--defense", "rlfat-p", "--attacks", "pgd", "--n", "20", "--no-progress",
                                 "--workdir", str(tmp_path / "wd")], prog_name="robench")
    assert r.exit_code == 0, r.output
    entry = zoo.get("rlfat-p-digits")
    assert f"checkpoint rlfat-p: zoo checkpoint rlfat-p-digits (shipped, sha256 {entry.sha256[:12]})" in r.output
    assert "rlfat-p" in r.output.splitlines()[-1]


@pytest.mark.parametrize("defense", ["standard", "pgdat"])
def test_the_recorded_results_reproduce(defense, tmp_path):
    """Re-evaluating a shipped checkpoint gives the count its entry records, up to Fisher's exact
    test at the suite's false-alarm rate (tests/bounds.py): another CPU's rounding can flip a
    borderline example, not many."""
    entry = zoo.find(defense, "digits")
    report = run_eval([defense], ["pgd"], tmp_path, CPU, progress=False)
    for e in report.entries:
        recorded, n = entry.results[e.attack]["accuracy"], entry.results[e.attack]["n"]
        assert e.row.key.n == n
        p = two_sample_p(round(recorded * n), n, round(e.row.value * n), n)
        assert p >= FALSE_ALARM, (e.attack, e.row.value, recorded, p)


def test_a_trained_run_takes_precedence_and_the_zoo_can_be_chosen(tmp_path, digits):
    wd = tmp_path / "wd"
    train(TrainConfig("pgdat", "digits", arch="tiny-cnn", steps=5, options={"attack_steps": 1}), wd, splits=digits,
          progress=False)
    own = run_eval(["pgdat"], ["pgd"], wd, CPU, n=20, progress=False)
    assert own.checkpoints == [f"pgdat: run {wd / 'runs' / 'pgdat-digits-s0'}"]
    entry = zoo.find("pgdat", "digits")
    for chosen in (run_eval(["pgdat"], ["pgd"], wd, CPU, n=20, progress=False, zoo_only=True),
                   run_eval([entry.name], ["pgd"], wd, CPU, n=20, progress=False)):
        assert chosen.checkpoints == [f"pgdat: zoo checkpoint {entry.name} (shipped, sha256 {entry.sha256[:12]})"]
        assert chosen.entries[0].row.key.checkpoint == entry.sha256
    assert own.entries[0].row.key.checkpoint != entry.sha256


def test_no_checkpoint_anywhere_names_both_places(tmp_path):
    with pytest.raises(UserError, match="no trained 'pgdat' checkpoint for cifar10.*the zoo has none either"):
        run_eval(["pgdat"], ["pgd"], tmp_path, CPU, dataset="cifar10", progress=False)
    with pytest.raises(UserError, match="zoo checkpoint pgdat-digits was trained on digits, not cifar10"):
        run_eval(["pgdat-digits"], ["pgd"], tmp_path, CPU, dataset="cifar10", progress=False)


def test_the_report_covers_a_zoo_checkpoint_evaluated_in_the_workdir(tmp_path):
    from robench.report import write_report

    wd = tmp_path / "wd"
    report = run_eval(["rlfat-p"], ["pgd"], wd, CPU, n=40, progress=False)
    text = write_report(wd, tmp_path / "out").read_text()
    table1 = text.split("## Accuracy (Table 1 format)")[1].split("\n## ")[0]
    pgd = next(e.row for e in report.entries if e.attack == "pgd")
    assert f"| rlfat-p | " in table1 and f"{100 * pgd.value:.1f} [" in table1
    assert "zoo: rlfat-p-digits" in text.split("## Provenance")[1]
    assert "Results ignored" not in text
