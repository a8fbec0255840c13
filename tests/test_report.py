"""The report: built from a synthetic workdir (fake runs + rows put straight into the store)."""

import json
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from robench import checkpoint, paper
from robench.attack import Attack
from robench.config import DATASET_DEFAULTS
from robench.defense import Defense
from robench.attack import make_attack
from robench.rbs import rbs, rbs_plan
from robench.registry import ATTACKS, DEFENSES
from robench.report import md_table, write_report
from robench.report.figures import salience_image, shuffled_layout
from robench.store import Examples, Key, Row, Store, wilson, worst_case
from robench.sensitivity import SWEEPS

N = 200


def make_run(workdir, defense, dataset, name=None, finished=True, seed=0, saved_at=None):
    """A checkpoint shaped like the training loop's (robench/training.py base_meta + save)."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    run_dir = workdir / "runs" / (name or f"{defense}-{dataset}-s{seed}")
    config = dict(defense=defense, dataset=dataset, arch="tiny-cnn", steps=30, batch_size=32, lr=1e-3,
                  eps=0.03, step_size=0.0075, attack_steps=10, lam=6.0, eta=0.5, rbs_k=2, rbs_mode="batch",
                  attack_mode="eval", flip=True, seed=seed, n_train=None)
    meta = checkpoint.save(run_dir, model, None, {
        "defense": defense, "dataset": dataset, "arch": "tiny-cnn", "in_channels": 3, "image_size": [32, 32],
        "num_classes": 10, "classes": [str(i) for i in range(10)], "config": config, "objective": {},
        "runtime": {"device": "cpu", "amp": False, "compile": False},
        "step": 30 if finished else 10, "finished": finished, "train_seconds": 12.5})
    if saved_at is not None:  # make an "older" run (saved_at has one-second resolution)
        meta["saved_at"] = saved_at
        (run_dir / checkpoint.META).write_text(json.dumps(meta))
    log = "step,loss,train_acc,elapsed_s\n" + "".join(f"{s},{2.3 - s / 20:.4f},{s / 40:.4f},{s:.2f}\n"
                                                      for s in (10, 20, 30))
    (run_dir / "train_log.csv").write_text(log)
    return meta["files"]["weights"]["sha256"]


def put(store, sha, defense, dataset, name, outcomes, eps=0.03, warnings=(), **extra):
    """A stored row as the evaluator writes it: the attack's full parameters at ``eps`` (the
    dataset's defaults unless ``extra`` changes some)."""
    outcomes = np.asarray(outcomes, dtype=np.float32)
    params = {} if name == "clean" else {**make_attack(name, dataset, eps).params(), **extra}
    key = Key.make(sha, dataset, Examples("test", 0, len(outcomes), "data"), "attack", name, params)
    row = Row(key, defense, float(outcomes.mean()), wilson(outcomes.sum(), len(outcomes)), outcomes, 1.5,
              {"robench": "0.1.0"}, "cpu", "2024-01-01T00:00:00", list(warnings))
    store.put(row)
    return row


def put_sens(store, sha, defense, dataset, transform, value, level):
    norms = np.full(50, level, dtype=np.float32)
    key = Key.make(sha, dataset, Examples("test", 0, 50, "data"), "sensitivity", transform, {"value": value})
    store.put(Row(key, defense, float(level), None, norms, 0.5, {}, "cpu", "2024-01-01T00:00:00"))


def cell(row):
    return f"{100 * row.value:.1f} [{100 * row.ci[0]:.1f}–{100 * row.ci[1]:.1f}]"


def bits(rng, p, n=N):
    return (rng.random(n) < p).astype(np.float32)


@pytest.fixture
def workdir(tmp_path):
    wd = tmp_path / "wd"
    rng = np.random.default_rng(0)
    old = make_run(wd, "pgdat", "cifar10", name="pgdat-old", saved_at="2000-01-01T00:00:00+0000")
    pgdat = make_run(wd, "pgdat", "cifar10", seed=1)
    rlfat = make_run(wd, "rlfat-p", "cifar10", seed=2)
    rows = {}
    with Store.in_workdir(wd) as store:
        put(store, old, "pgdat", "cifar10", "clean", bits(rng, 0.1))  # must be ignored
        rows["clean"] = put(store, pgdat, "pgdat", "cifar10", "clean", bits(rng, 0.9))
        rows["pgd"] = put(store, pgdat, "pgdat", "cifar10", "pgd", bits(rng, 0.6))
        put(store, pgdat, "pgdat", "cifar10", "pgd", bits(rng, 0.1, n=20))  # smaller n: not chosen
        rows["cw"] = put(store, pgdat, "pgdat", "cifar10", "cw", bits(rng, 0.55))
        # Black-box far below white-box on the common examples: a masking warning.
        rows["nattack"] = put(store, pgdat, "pgdat", "cifar10", "nattack", np.zeros(100))
        put(store, pgdat, "pgdat", "cifar10", "pgd", bits(rng, 0.3), eps=0.1)
        put(store, pgdat, "pgdat", "cifar10", "pgd", bits(rng, 0.4), eps=0.5)  # should be ~0: warning
        rows["rlfat-clean"] = put(store, rlfat, "rlfat-p", "cifar10", "clean", bits(rng, 0.8))
        rows["rlfat-pgd"] = put(store, rlfat, "rlfat-p", "cifar10", "pgd", bits(rng, 0.5))
        for i, v in enumerate(SWEEPS["brightness"]):
            put_sens(store, pgdat, "pgdat", "cifar10", "brightness", v, 1.0 + 0.1 * i)
        for v, level in ((0.8, 0.4321), (1.2, 0.6543)):
            put_sens(store, pgdat, "pgdat", "cifar10", "gamma", v, level)
    (wd / "salience").mkdir()
    Image.new("RGB", (8, 8)).save(wd / "salience" / "cifar10.png")
    # What `robench salience` stores beside its figure; the RBS figure draws its first image.
    save_file({"images": torch.rand(2, 3, 16, 16), "labels": torch.tensor([0, 1])},
              str(wd / "salience" / "cifar10.safetensors"))
    return wd, rows


def test_report_tables_paper_worst_case_missing_and_warnings(workdir, tmp_path):
    wd, rows = workdir
    out = tmp_path / "out"
    path = write_report(wd, out)
    text = path.read_text()
    assert path == out / "report.md"

    # Table 1: our numbers with Wilson intervals; the larger-n PGD row is the one shown.
    for name in ("clean", "pgd", "cw", "nattack", "rlfat-clean", "rlfat-pgd"):
        assert cell(rows[name]) in text, name
    # Worst case = AND of clean, PGD, CW, N-attack on the common first 100 examples.
    m = 100
    alive = np.logical_and.reduce([rows[a].outcomes[:m] > 0.5 for a in ("clean", "pgd", "cw", "nattack")])
    wc, n = worst_case([rows[a] for a in ("clean", "pgd", "cw", "nattack")])
    assert (wc, n) == (alive.mean(), m)
    lo, hi = wilson(alive.sum(), m)
    assert f"{100 * wc:.1f} [{100 * lo:.1f}–{100 * hi:.1f}] (n={m})" in text
    # The paper's CIFAR-10 numbers sit beside ours.
    assert f"/ {paper.TABLE1['cifar10']['pgdat']['pgd']:.2f}" in text
    assert f"/ {paper.TABLE1['cifar10']['rlfat-t']['nattack']:.2f}" in text

    # Table 2: our sensitivity values and the paper's.
    assert "0.432 (paper 1.27)" in text and "0.654 (paper 1.20)" in text

    # Missing pieces, each with its command.
    assert "no N-attack results for rlfat-p on cifar10" in text
    assert "`robench eval --defense rlfat-p --dataset cifar10 --attacks nattack`" in text
    assert "`robench eval --defense rlfat-p --dataset cifar10 --attacks cw`" in text
    assert "`robench train trades --dataset cifar10`" in text
    assert "`robench sensitivity --defense rlfat-p --dataset cifar10`" in text
    assert "`robench eval --defense rlfat-p --dataset cifar10 --attacks pgd --eps 0.5`" in text

    # Gradient-masking flags for pgdat: black box below white box, and accuracy at eps 0.5.
    masking = text.split("## Gradient-masking checks")[1].split("## Missing pieces")[0]
    pgdat_part = masking.split("**rlfat-p**")[0]
    assert "**warning** (a)" in pgdat_part and "**warning** (c)" in pgdat_part
    assert "**warning**" not in masking.split("**rlfat-p**")[1]

    # Provenance: the older pgdat run's result is listed as ignored, not reported.
    assert "Results ignored" in text and "pgdat-old" in text

    # Figures: valid PNGs, referenced from the report.
    for name in ("ablation.png", "eps_curve.png", "sensitivity.png", "training.png", "rbs.png",
                 "salience-cifar10.png"):
        assert f"]({name})" in text, name
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"
    assert not list(out.glob(".*.tmp"))


def test_report_of_empty_workdir_lists_what_is_missing(tmp_path):
    path = write_report(tmp_path / "nothing", tmp_path / "out")
    text = path.read_text()
    assert "No finished trained runs" in text
    assert "`robench train rlfat-t --dataset digits`" in text
    assert not (tmp_path / "nothing" / "results.sqlite").exists()  # the report writes nothing there
    assert not list((tmp_path / "out").glob("*.png"))


def test_report_with_runs_but_no_results(tmp_path):
    wd = tmp_path / "wd"
    make_run(wd, "standard", "digits")
    make_run(wd, "rlfat-t", "digits", name="partial", finished=False)
    text = write_report(wd, tmp_path / "out").read_text()
    assert "no clean accuracy for standard on digits" in text
    assert "`robench train rlfat-t --dataset digits --name partial --resume`" in text
    assert "`robench salience --defense standard --dataset digits`" in text
    assert "no results database" in text


def apply_plan(image, plan):
    """Place every source block of a (C, H, W) image where the figure's layout says it lands."""
    def blocks(splits):
        s = splits.tolist()
        return list(zip(s, s[1:]))

    out = torch.empty_like(image)
    rows = zip(blocks(plan.row_splits), shuffled_layout(plan.row_splits, plan.row_order))
    for (r0, r1), (s0, s1) in rows:
        cols = zip(blocks(plan.col_splits), shuffled_layout(plan.col_splits, plan.col_order))
        for (c0, c1), (t0, t1) in cols:
            out[:, s0:s1, t0:t1] = image[:, r0:r1, c0:c1]
    return out


@pytest.mark.parametrize("shape,k,seed", [((3, 16, 12), 2, 0), ((1, 8, 8), 3, 5), ((3, 9, 7), 2, 11)])
def test_rbs_plan_describes_the_shuffle_the_figure_shows(shape, k, seed):
    image = torch.rand(*shape)
    plan = rbs_plan(shape[1], shape[2], k, generator=torch.Generator().manual_seed(seed))
    shuffled = rbs(image[None], k, generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(apply_plan(image, plan), shuffled)


def section(text, title):
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_a_non_default_attack_run_never_replaces_the_default_one(workdir, tmp_path):
    """A later run with other attack parameters (more examples, newer) leaves Table 1, the
    worst case, the ablation and the checks as they were, and shows up in its own labelled row."""
    wd, rows = workdir
    before = write_report(wd, tmp_path / "before").read_text()
    with Store.in_workdir(wd) as store:
        sha = rows["pgd"].key.checkpoint
        weak = put(store, sha, "pgdat", "cifar10", "pgd", np.ones(2 * N), attack_steps=1, step_size=0.01)
    after = write_report(wd, tmp_path / "after").read_text()
    for title in ("Accuracy (Table 1 format)", "Ablation", "Gradient-masking checks"):
        table_before = section(before, title).split("Other attack settings")[0].strip()
        table_after = section(after, title).split("Other attack settings")[0].strip()
        assert table_before == table_after, title
    other = section(after, "Accuracy (Table 1 format)").split("Other attack settings")[1]
    assert "| pgdat | PGD | 0.03 | attack_steps=1, step_size=0.01 | 400 | " + cell(weak) in other
    assert "Other attack settings" not in before
    assert "pgd ε=0.03 (attack_steps=1, step_size=0.01)" in section(after, "Provenance")


def test_attack_warnings_and_common_examples(workdir, tmp_path):
    wd, rows = workdir
    with Store.in_workdir(wd) as store:
        sha = rows["pgd"].key.checkpoint
        aa = put(store, sha, "pgdat", "cifar10", "autoattack", np.ones(50), warnings=["Square beat APGD: masking?"])
    text = write_report(wd, tmp_path / "out").read_text()
    masking = section(text, "Gradient-masking checks")
    assert "**warning** (d) AutoAttack (autoattack ε=0.03, n=50) reported: Square beat APGD: masking?" in masking
    # The ablation averages PGD, CW, N-attack and AutoAttack on the 50 examples they share.
    attacks = ("pgd", "cw", "nattack")
    mean = np.mean([(rows[a].outcomes[:50] > 0.5).mean() for a in attacks] + [1.0])
    ablation = section(text, "Ablation")
    assert f"| pgdat | {100 * rows['clean'].value:.1f} | {100 * mean:.1f} | PGD, CW, N-attack, AutoAttack | 50 |" in ablation
    assert aa.key.n == 50


def test_md_table_escapes_pipes():
    lines = md_table(["a", "b"], [["x|y", "1"]])
    assert lines[:3] == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_report_of_a_real_trained_and_evaluated_workdir(trained_workdir, tmp_path):
    """The real training loop's checkpoint records and the evaluator's rows go through."""
    from robench.evaluation import run_eval
    from robench.runtime import Runtime

    import shutil

    # A private copy of the runs: other tests add rows with other n to the shared workdir, and the
    # report shows the largest n per result.
    workdir = tmp_path / "workdir"
    shutil.copytree(trained_workdir / "runs", workdir / "runs")
    report = run_eval(["standard", "pgdat"], ["pgd", "cw"], workdir, Runtime.create("cpu"), n=64,
                      progress=False)
    text = write_report(workdir, tmp_path / "out").read_text()
    for entry in report.entries:
        assert cell(entry.row) in text
    assert f"### digits (8x8, scikit-learn), ε = {DATASET_DEFAULTS['digits'].eps:g}" in text
    assert "`robench eval --defense pgdat --dataset digits --attacks nattack`" in text
    with Image.open(tmp_path / "out" / "training.png") as im:
        im.verify()


@pytest.fixture
def plugins():
    """A throwaway attack and defense, registered under unique names for one test only. Their
    names sort against their declared order, so the report must follow the order."""
    import uuid

    class Probe(Attack):
        label: ClassVar[str] = "Probe-Attack"
        order: ClassVar[int] = 35  # after N-attack (30), before AutoAttack (40)

        def perturb(self, model, x, y, index=None):
            return x

    class Shield(Defense):
        order = 15  # after pgdat (10), before rlfat-p (40)

        def loss(self, model, x, x_adv, y):
            raise NotImplementedError

    tag = uuid.uuid4().hex[:8]
    attack, defense = f"zz-probe-{tag}", f"aa-shield-{tag}"
    ATTACKS.register(attack)(Probe)
    DEFENSES.register(defense)(Shield)
    try:
        yield attack, defense
    finally:
        ATTACKS.unregister(attack)
        DEFENSES.unregister(defense)


def test_a_new_attack_and_defense_show_up_by_their_own_metadata(workdir, plugins, tmp_path):
    """Adding a plugin is one file: the report reads its label and order from the class."""
    wd, rows = workdir
    attack, defense = plugins
    rng = np.random.default_rng(1)
    shield = make_run(wd, defense, "cifar10", seed=3)
    with Store.in_workdir(wd) as store:
        sha = rows["pgd"].key.checkpoint
        probe = put(store, sha, "pgdat", "cifar10", attack, bits(rng, 0.7))
        put(store, sha, "pgdat", "cifar10", "autoattack", bits(rng, 0.5))
        shield_clean = put(store, shield, defense, "cifar10", "clean", bits(rng, 0.95))
        put(store, shield, defense, "cifar10", attack, bits(rng, 0.2))
    text = write_report(wd, tmp_path / "out").read_text()
    assert attack not in section(text, "Accuracy (Table 1 format)")  # its label, not its name
    table1 = section(text, "Accuracy (Table 1 format)").split("\n\n")[2]
    head = table1.splitlines()[0]
    assert head == "| defense | clean | PGD | CW | N-attack | Probe-Attack | AutoAttack | worst case |"
    defenses = [line.split(" | ")[0].lstrip("| ") for line in table1.splitlines()[2:]]
    assert defenses == ["pgdat", defense, "rlfat-p"]
    assert cell(probe) in table1 and cell(shield_clean) in table1
    ablation = section(text, "Ablation")
    assert "| PGD, CW, N-attack, Probe-Attack, AutoAttack |" in ablation
    masking = section(text, "Gradient-masking checks")
    assert masking.index("**pgdat**") < masking.index(f"**{defense}**") < masking.index("**rlfat-p**")
    # Not a paper attack: asked for as optional only, before AutoAttack as declared.
    missing = section(text, "Missing pieces")
    line = f"(optional) no Probe-Attack results for rlfat-p on cifar10; run `robench eval --defense rlfat-p --dataset cifar10 --attacks {attack}`"
    assert line in missing
    assert missing.index(line) < missing.index("(optional) no AutoAttack results for rlfat-p")


def test_masking_checks_run_once_per_run(workdir, tmp_path, monkeypatch):
    from robench.report import checks

    wd, _ = workdir
    calls = []
    real = checks.masking_checks
    monkeypatch.setattr(checks, "masking_checks", lambda *a: calls.append(a[1:]) or real(*a))
    text = write_report(wd, tmp_path / "out").read_text()
    assert sorted(calls) == [("cifar10", "pgdat"), ("cifar10", "rlfat-p")]
    n = section(text, "Gradient-masking checks").count("**warning**")
    assert n and f"**{n} gradient-masking warning(s)**" in text


def test_rbs_figure_comes_from_the_workdir_not_a_dataset(workdir, tmp_path, monkeypatch):
    """The RBS figure draws the first image `robench salience` stored; without one it says so."""
    import robench.data

    wd, _ = workdir
    monkeypatch.setattr(robench.data, "load_dataset", lambda *a, **k: pytest.fail("the report loaded a dataset"))
    first = salience_image(wd, "cifar10")
    assert first.shape == (3, 16, 16)
    text = write_report(wd, tmp_path / "with").read_text()
    assert "The first image of the CIFAR-10 salience figure" in section(text, "Random Block Shuffle")
    assert (tmp_path / "with" / "rbs.png").exists()

    (wd / "salience" / "cifar10.safetensors").write_bytes(b"not safetensors")
    assert salience_image(wd, "cifar10") is None
    (wd / "salience" / "cifar10.safetensors").unlink()
    assert salience_image(wd, "cifar10") is None
    text = write_report(wd, tmp_path / "without").read_text()
    assert "Not drawn" in section(text, "Random Block Shuffle")
    assert not (tmp_path / "without" / "rbs.png").exists()
