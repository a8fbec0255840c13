"""The zoo's CIFAR-10 (JPEG copy) checkpoints, trained by benchmarks/fidelity_cifar10.py: the five
paper defenses are shipped, verified and carry their results, and re-evaluating them on the
examples their entries record (the class-balanced test order of the JPEG copy) lands inside the
recorded 95% intervals. The re-evaluation needs ../shared/data and is skipped without it."""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path

import pytest
import torch

from bounds import FALSE_ALARM, most, two_sample_p
from robench import zoo
from robench.attack import make_attack
from robench.data import balanced_test, load_dataset
from robench.evaluation import CLEAN, evaluate
from robench.runtime import Runtime
from robench.store import Store, split_digest
from robench.targets import target_from_zoo

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PAPER = ["standard", "pgdat", "trades", "rlfat-p", "rlfat-t"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _entry(defense: str) -> zoo.Entry:
    entry = zoo.find(defense, "folder")
    assert entry is not None and entry.shipped, f"no shipped {defense} checkpoint for the CIFAR-10 JPEG copy"
    return entry


@pytest.mark.parametrize("defense", PAPER)
def test_the_paper_defenses_ship_cifar10_jpeg_checkpoints(defense):
    entry = _entry(defense)
    assert zoo.verify(entry) == "ok"
    assert entry.arch == "wrn-10-1" and entry.classes == CLASSES and entry.image_size == [32, 32]
    assert {"clean", "pgd", "cw", "nattack", "autoattack"} <= set(entry.results)
    assert entry.results["pgd"]["n"] >= 1000 and entry.results["autoattack"]["n"] >= 200
    # identical settings for all: every setting two defenses share has one value, the budget included
    base = _entry("pgdat").config
    assert {"arch", "steps", "batch_size", "lr", "seed", "flip"} <= set(entry.config) and entry.config["steps"] >= 2500
    assert {k: v for k, v in entry.config.items() if k in base and k != "defense"} == \
        {k: v for k, v in base.items() if k in entry.config and k != "defense"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    if not ARCHIVE.is_file():
        pytest.skip(f"no CIFAR-10 JPEG archive at {ARCHIVE}")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBENCH_CACHE", str(root / "cache"))
        return balanced_test(load_dataset("folder", root), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("defense,attack", [(d, CLEAN) for d in PAPER] + [("rlfat-t", "pgd")])
def test_the_recorded_results_reproduce(defense, attack, cifar, tmp_path):
    """Same examples (the recorded split digest), same model, same attack parameters: the count of
    correct images agrees with the recorded one by Fisher's exact test at the suite's false-alarm
    rate (tests/bounds.py; another CPU's rounding may flip a borderline image, never many)."""
    entry = _entry(defense)
    recorded = entry.results[attack]
    digest = split_digest(cifar.x_test, cifar.y_test)
    assert recorded["data"] == digest and recorded["examples"] == f"0:{recorded['n']}"
    runner = None if attack == CLEAN else make_attack(attack, "folder")
    if runner is not None:
        assert runner.params() == recorded["params"]
    with Store(tmp_path / "results.sqlite") as store:
        row = evaluate(target_from_zoo(entry), cifar, attack, runner, recorded["n"], store, Runtime.create("cpu"),
                       progress=False, data=digest)
    n = recorded["n"]
    p = two_sample_p(round(recorded["accuracy"] * n), n, round(row.value * n), n)
    assert p >= FALSE_ALARM, (row.value, recorded["accuracy"], p)


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("autoattack", {"version": "custom", "attacks": ("apgd-ce",), "group": 32}),
    ("ta.fab", {}),
])
def test_third_party_attacks_on_a_trained_channels_last_model(name, overrides, cifar):
    """The channels_last regression (AutoAttack and torchattacks .view the input gradient) on a
    trained RGB model and real test images, where it can fail: the zoo's RLFAT-T on the first 32
    images of the balanced test order. In both layouts the attack breaks some images the model got
    right and leaves others, and the layouts disagree on at most 1% of the outcomes (binomial bound
    at FALSE_ALARM; they round differently, which can move a borderline image)."""
    model = target_from_zoo(_entry("rlfat-t")).model.eval()
    runtime = Runtime.create("cpu")
    x, y = cifar.x_test[:32].contiguous(), cifar.y_test[:32]
    attack = make_attack(name, "folder", 0.03, overrides)
    outcomes, clean = {}, None
    for layout, net, inputs in (("default", model, x),
                                ("channels_last", runtime.prepare(copy.deepcopy(model)), runtime.batch(x))):
        with torch.no_grad():
            clean = net(inputs).argmax(1) == y
        x_adv = attack(net, inputs, y, torch.arange(32))
        with torch.no_grad():
            outcomes[layout] = net(x_adv).argmax(1) == y
        assert 0 < int(outcomes[layout].sum()) < int(clean.sum()), (layout, outcomes[layout], clean)
    assert int((outcomes["default"] != outcomes["channels_last"]).sum()) <= most(32, 0.01)
