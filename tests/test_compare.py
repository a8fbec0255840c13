"""Paired comparisons (robench.comparison, `robench compare`, the report's comparison and attack-consistency sections)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from robench import checkpoint
from robench.attack import make_attack
from robench.cli import cli
from robench.comparison import (diff_text, from_counts, mcnemar_exact, n_to_resolve, newcombe_interval, p_text, paired,
                             paired_rows, table)
from robench.report import write_report
from robench.report.comparisons import comparison_pairs
from robench.report.consistency import consistency_checks
from robench.report.queries import load_workdir
from robench.store import Z95, Examples, Key, Row, Store, wilson

from bounds import count, fewest, most


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")


def one_line_error(r, expect):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.output


# -- the statistics against hand computations and published values ------------------------------

def test_small_vectors_by_hand():
    a = np.array([1, 1, 1, 1, 0, 0, 1, 0], np.float32)
    b = np.array([1, 0, 0, 1, 0, 1, 0, 0], np.float32)
    assert table(a, b) == (2, 3, 1, 2)
    s = paired(a, b)
    assert (s.n, s.acc_a, s.acc_b, s.diff) == (8, 5 / 8, 3 / 8, 2 / 8)
    # McNemar: 3 of 4 discordant for A; P(X <= 1) for Binomial(4, 1/2), twice: 2 * 5/16.
    assert s.p == 2 * (1 + 4) / 16
    # Newcombe: ad - bc = 4 - 3 = 1 lies in [0, n/2], so phi = 0: the Wilson half-widths add in squares.
    def wilson_by_hand(k, n):
        p, z = k / n, Z95
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half
    (l1, u1), (l2, u2) = wilson_by_hand(5, 8), wilson_by_hand(3, 8)
    lo, hi = 0.25 - math.hypot(5 / 8 - l1, u2 - 3 / 8), 0.25 + math.hypot(3 / 8 - l2, u1 - 5 / 8)
    assert s.ci == pytest.approx((lo, hi), abs=1e-12)
    # Swapping the models negates everything.
    t = paired(b, a)
    assert (t.diff, t.p) == (-s.diff, s.p) and t.ci == pytest.approx((-hi, -lo), abs=1e-12)


def test_published_paired_example():
    """Cavo et al. (2012), the worked example of Fagerland, Lydersen & Laake (2014/2017):
    Newcombe's interval -0.1186 to -0.0046, exact McNemar P = 0.052479."""
    s = from_counts(59, 6, 16, 80)
    assert round(s.diff, 4) == -0.0621
    assert tuple(round(x, 4) for x in s.ci) == (-0.1186, -0.0046)
    assert round(s.p, 6) == 0.052479
    # Connor (1987): (z_.975 sqrt(psi) + z_.8 sqrt(psi - delta^2))^2 / delta^2, rounded up.
    psi, delta = 22 / 161, -10 / 161
    need = (1.959964 * math.sqrt(psi) + 0.841621 * math.sqrt(psi - delta ** 2)) ** 2 / delta ** 2
    assert s.n_resolve == math.ceil(need) == 276


def test_negative_correlation_and_edges():
    # No concordant pairs: ad - bc < 0, phi negative, a wider interval than with phi = 0.
    lo, hi = newcombe_interval(0, 7, 3, 0)
    (l1, u1), (l2, u2) = wilson(7, 10), wilson(3, 10)
    assert hi - lo > math.hypot(0.7 - l1, u2 - 0.3) + math.hypot(0.3 - l2, u1 - 0.7)
    assert -1 <= lo < 0.4 < hi <= 1
    assert newcombe_interval(10, 0, 0, 0)[0] < 0 < newcombe_interval(10, 0, 0, 0)[1]  # all correct
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert n_to_resolve(4, 4, 100) is None
    same = paired(np.ones(50), np.ones(50))
    assert (same.diff, same.p, same.n_resolve, same.verdict("x", "y")) == (0.0, 1.0, None, "same outcomes")


def test_mcnemar_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 1), (1, 0), (3, 9), (6, 16), (40, 41), (120, 80), (300, 360), (2, 900)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)


# -- `robench compare` on real checkpoints ---------------------------------------------------------

N_EVALUATED = 360


@pytest.fixture(scope="module")
def evaluated(trained_workdir, tmp_path_factory):
    """A private copy of the session's digits runs with clean and PGD stored on the whole test
    split (360 images: enough for the bounds in test_pgdat_beats_standard_under_pgd)."""
    from robench.evaluation import run_eval
    from robench.runtime import Runtime

    wd = tmp_path_factory.mktemp("compare") / "wd"
    shutil.copytree(trained_workdir / "runs", wd / "runs")
    run_eval(["standard", "pgdat"], ["pgd"], wd, Runtime.create("cpu"), n=N_EVALUATED, progress=False)
    return wd


@pytest.fixture
def wd(evaluated, tmp_path):
    shutil.copytree(evaluated, tmp_path / "wd")
    return tmp_path / "wd"


def stored(wd, defense, name):
    with Store.in_workdir(wd) as store:
        return next(r for r in store.rows(defense=defense, kind="attack", name=name))


def test_pgdat_beats_standard_under_pgd(evaluated):
    r = invoke("compare", "--defense", "pgdat,standard", "--workdir", evaluated, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [x["attack"] for x in out["results"]] == ["clean", "pgd"]
    pgd = next(x for x in out["results"] if x["attack"] == "pgd")
    # The numbers are those of the stored per-example outcomes.
    a, b = stored(evaluated, "pgdat", "pgd").outcomes > 0.5, stored(evaluated, "standard", "pgd").outcomes > 0.5
    n = N_EVALUATED
    assert (pgd["n"], pgd["only_a"], pgd["only_b"]) == (n, int((a & ~b).sum()), int((~a & b).sum()))
    assert pgd["diff"] == pytest.approx(a.mean() - b.mean())
    # The counts are machine-bound (the models differ in their last bits from CPU to CPU), so the
    # verdict is checked through two claims, each with a binomial bound at FALSE_ALARM
    # (tests/bounds.py): pgdat keeps at least 30% under PGD (37.5-38.3% here under the three
    # ATEN_CPU_CAPABILITY settings), standard at most 5% (2.2%).
    fewest_a, most_b = fewest(n, 0.3), most(n, 0.05)
    assert count(a) >= fewest_a and count(b) <= most_b, (count(a), count(b))
    # Those bounds decide the verdict: McNemar's p and Newcombe's lower limit are worst with the
    # fewest images right for pgdat and the most for standard (a = fewest_a, b = most_b), over
    # every split of them into concordant and discordant images.
    for both in range(most_b + 1):
        worst = from_counts(both, fewest_a - both, most_b - both, n - fewest_a - most_b + both)
        assert worst.p < 0.05 and worst.ci[0] > 0 and worst.verdict("pgdat", "standard") == "pgdat better"
    assert pgd["mcnemar_p"] < 0.05 and pgd["ci95"][0] > 0 and pgd["verdict"] == "pgdat better"
    text = invoke("compare", "--defense", "pgdat,standard", "--workdir", evaluated).stdout
    assert "McNemar p" in text and "pgdat better" in text and "checkpoint pgdat: run " in text


def test_identical_checkpoints_compare_to_exactly_zero(wd):
    """A run copied under another defense's name has the same weights (sha256), so the same
    stored outcomes: a difference of exactly 0 and p = 1 under every attack."""
    twin = wd / "runs" / "twin"
    shutil.copytree(wd / "runs" / "pgdat-digits-s0", twin)
    meta = json.loads((twin / checkpoint.META).read_text())
    meta["defense"] = "trades"
    (twin / checkpoint.META).write_text(json.dumps(meta))
    r = invoke("compare", "--defense", "pgdat,trades", "--workdir", wd, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(set(out["checkpoints"].values())) == 1
    for x in out["results"]:
        assert (x["diff"], x["mcnemar_p"], x["only_a"], x["only_b"], x["n_to_resolve"]) == (0.0, 1.0, 0, 0, None)
        assert x["verdict"] == "same outcomes"


@pytest.mark.parametrize("args,expect", [
    (["--defense", "pgdat"], "compare exactly two"),
    (["--defense", "pgdat,standard,trades"], "compare exactly two"),
    ([], "pass --defense A,B"),
    (["--defense", "pgdat,standard", "--attacks", "cw"],
     "no stored result at the default eps 0.2 and parameters of cw for pgdat and standard: run "
     "`robench eval --defense pgdat,standard --dataset digits --attacks cw`"),
    # Not trained in the workdir: the zoo's checkpoint, which has no results there.
    (["--defense", "pgdat,standard", "--attacks", "pgd,fgsm"], "unknown attack 'fgsm'"),
    (["--defense", "pgdat,rlfat-p"], "no examples in common on digits: no results stored for rlfat-p (zoo checkpoint"),
])
def test_compare_errors(evaluated, args, expect):
    one_line_error(invoke("compare", *args, "--workdir", evaluated), expect)


def test_an_attack_stored_for_one_defense_only_is_listed(wd):
    from robench.evaluation import run_eval
    from robench.runtime import Runtime

    run_eval(["pgdat"], ["cw"], wd, Runtime.create("cpu"), n=16, progress=False)
    one_line_error(invoke("compare", "--defense", "pgdat,standard", "--workdir", wd),
                   "of cw for standard: run `robench eval --defense standard --dataset digits --attacks cw`; "
                   "or pass --attacks with those stored for both")
    r = invoke("compare", "--defense", "pgdat,standard", "--attacks", "pgd", "--workdir", wd, "--json")
    assert r.exit_code == 0 and [x["attack"] for x in json.loads(r.stdout)["results"]] == ["pgd"]


def test_no_common_examples(wd, tmp_path):
    one_line_error(invoke("compare", "--defense", "pgdat,standard", "--workdir", tmp_path / "nowhere"),
                   "does not exist")
    empty = tmp_path / "empty"
    shutil.copytree(wd / "runs", empty / "runs")
    one_line_error(invoke("compare", "--defense", "pgdat,standard", "--workdir", empty), "no results stored in")
    # The standard model's results measured on another version of the test split.
    with Store.in_workdir(wd) as store:
        for r in store.rows(defense="standard"):
            store.db.execute("UPDATE results SET data='other' WHERE id IN (SELECT id FROM results WHERE "
                             "checkpoint=? AND name=?)", (r.key.checkpoint, r.key.name))
    one_line_error(invoke("compare", "--defense", "pgdat,standard", "--workdir", wd),
                   "have no examples in common on digits: their results were measured on different versions")


def test_a_second_version_of_the_test_split_is_named(wd, digits):
    """Both defenses also evaluated on the test images in another order (as an experiment stores
    them): compare takes the version with the most rows and says so, naming the other."""
    from robench.data import balanced_test
    from robench.evaluation import evaluate
    from robench.runtime import Runtime
    from robench.store import split_digest
    from robench.targets import target_from_run
    from robench.workdir import find_run

    plain = invoke("compare", "--defense", "pgdat,standard", "--workdir", wd)
    assert plain.exit_code == 0 and "note: both also have results" not in plain.stdout
    other = balanced_test(digits)
    with Store.in_workdir(wd) as store:
        for defense in ("standard", "pgdat"):
            target = target_from_run(find_run(wd, defense)[0])
            evaluate(target, other, "pgd", make_attack("pgd", "digits"), 16, store, Runtime.create("cpu"),
                     progress=False)
    r = invoke("compare", "--defense", "pgdat,standard", "--workdir", wd)
    assert r.exit_code == 0, r.stderr
    main, second = split_digest(digits.x_test, digits.y_test), split_digest(other.x_test, other.y_test)
    assert f"(test split version {main})" in r.stdout, r.stdout
    assert f"note: both also have results on other versions of the digits test split" in r.stdout
    assert f"{second} (2 rows)" in r.stdout  # PGD of both defenses


# -- the report's sections -------------------------------------------------------------------------

def make_run(wd, defense, seed):
    torch.manual_seed(seed)
    meta = checkpoint.save(wd / "runs" / f"{defense}-cifar10", nn.Linear(4, 3), None, {
        "defense": defense, "dataset": "cifar10", "arch": "tiny-cnn", "in_channels": 3, "image_size": [32, 32],
        "num_classes": 10, "classes": [str(i) for i in range(10)], "config": {"seed": seed}, "objective": {},
        "runtime": {}, "step": 30, "finished": True, "train_seconds": 1.0})
    return meta["files"]["weights"]["sha256"]


def put(store, sha, defense, name, outcomes):
    outcomes = np.asarray(outcomes, dtype=np.float32)
    params = {} if name == "clean" else make_attack(name, "cifar10").params()
    key = Key.make(sha, "cifar10", Examples("test", 0, len(outcomes), "data"), "attack", name, params)
    row = Row(key, defense, float(outcomes.mean()), wilson(outcomes.sum(), len(outcomes)), outcomes, 1.0, {}, "cpu",
              "2024-01-01T00:00:00")
    store.put(row)
    return row


def down(n, *spans):
    """Ones, with zeros (broken) at the given [start, stop) spans."""
    out = np.ones(n, np.float32)
    for a, b in spans:
        out[a:b] = 0
    return out


def test_comparison_pairs_follow_the_plugins_parents():
    assert comparison_pairs()[:6] == [("rlfat-p", "pgdat"), ("rbsat-p", "pgdat"), ("rlfat-p", "rbsat-p"),
                                      ("rlfat-t", "trades"), ("rbsat-t", "trades"), ("rlfat-t", "rbsat-t")]


@pytest.fixture
def ensemble():
    """A throwaway white-box attack that declares itself an ensemble, registered for one test."""
    import uuid
    from typing import ClassVar

    from robench.attack import Attack
    from robench.registry import ATTACKS

    class Ensemble(Attack):
        label: ClassVar[str] = "Ensemble-Attack"
        order: ClassVar[int] = 45
        ensemble: ClassVar[bool] = True

        def perturb(self, model, x, y, index=None):
            return x

    name = f"zz-ensemble-{uuid.uuid4().hex[:8]}"
    ATTACKS.register(name)(Ensemble)
    try:
        yield name
    finally:
        ATTACKS.unregister(name)


def test_report_compares_pairs_and_flags_inconsistent_attacks(tmp_path, ensemble):
    wd = tmp_path / "wd"
    rng = np.random.default_rng(0)
    shas = {d: make_run(wd, d, i) for i, d in enumerate(("pgdat", "rbsat-p", "rlfat-p"))}
    with Store.in_workdir(wd) as store:
        for d, p in (("rbsat-p", 0.52), ("rlfat-p", 0.9)):
            put(store, shas[d], d, "pgd", (rng.random(200) < p).astype(np.float32))
            put(store, shas[d], d, "clean", np.ones(200))
        put(store, shas["pgdat"], "pgdat", "clean", np.ones(200))
        # pgdat: PGD and CW each break images the other misses (no warning: neither contains the
        # other); the ensemble breaks all PGD breaks, but misses 10 of CW's (5%): a warning.
        put(store, shas["pgdat"], "pgdat", "pgd", down(200, (0, 80)))
        put(store, shas["pgdat"], "pgdat", "cw", down(200, (10, 110)))
        put(store, shas["pgdat"], "pgdat", ensemble, down(200, (0, 80), (90, 130)))
    text = write_report(wd, tmp_path / "out").read_text()
    section = text.split("## Paired comparisons")[1].split("\n## ")[0]
    with Store.in_workdir(wd) as store:
        pgd = {r.defense: r for r in store.rows(name="pgd")}
    big = paired_rows(pgd["rlfat-p"], pgd["pgdat"])
    assert big.p < 0.05
    head = next(line for line in section.splitlines() if line.startswith("| pair |"))
    row = next(line for line in section.splitlines() if line.startswith("| rlfat-p vs pgdat |"))
    cells = dict(zip(head.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["PGD"] == f"**{diff_text(big)}, p = {p_text(big.p)}, n = 200**"
    assert cells["clean"].startswith("+0.0 [") and "p = 1.000" in cells["clean"]  # both 100%: not bold
    for pair in ("rbsat-p vs pgdat", "rlfat-p vs rbsat-p"):
        assert f"| {pair} |" in section
    assert "trades" not in section  # not trained: no row

    checks = consistency_checks(load_workdir(wd))
    lines = checks[("cifar10", "pgdat")]
    warning = next(line for line in lines if line.startswith("**warning** (e)"))
    assert warning.startswith("**warning** (e) the ensemble Ensemble-Attack misses 10 image(s) (5.0%) that CW breaks")
    assert sum(line.startswith("**warning**") for line in lines) == 1
    assert "(e) ok: Ensemble-Attack misses 0 of the images PGD breaks (L∞, ε = 0.03;" in "\n".join(lines)
    assert any(line.startswith("(e) CW and PGD (L∞, ε = 0.03; CW 50.0%, PGD 60.0% on the first 200 images): "
                               "30 broken by CW only, 10 by PGD only; neither contains the other") for line in lines)
    consistency = text.split("## Attack consistency")[1].split("\n## ")[0]
    assert warning in consistency and "**1 attack-consistency warning(s)**" in text
    assert "(e) not checked" in checks[("cifar10", "rlfat-p")][0]
