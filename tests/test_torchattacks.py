"""The torchattacks catalogue (``ta.*``): every adapted attack stays in its ball and [0, 1] and
never helps the model; outcomes do not depend on the batch size; the CLI stores and prints them
next to robench's own attacks; minimum-norm attacks count an over-budget example as not broken;
a real escape is still refused by the evaluator."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from robench.attack import BALL_TOL, ThreatModelError, make_attack
from robench.attacks.torchattacks import CATALOGUE, PREFIX
from robench.cli import cli
from robench.errors import UserError
from robench.evaluation import run_eval
from robench.registry import ATTACKS
from robench.runtime import Runtime
from robench.store import Store
from robench.targets import target_from_run
from robench.workdir import find_run

from bounds import FALSE_ALARM, count, fewest, paired_p_greater

torchattacks = pytest.importorskip("torchattacks")

CPU = Runtime.create("cpu")
NAMES = [PREFIX + name for name in CATALOGUE]
# Tiny budgets, set through the same parameters as -o; each applies where the attack has it.
SMALL = {"attack_steps": 3, "steps": 3, "n_queries": 30, "nb_sample": 8, "max_batch_size": 8, "N": 2, "m": 2,
         "noise_batch_size": 2, "len_kernel": 3, "group": 16}


def cheap(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(ATTACKS[name])}
    out = {k: v for k, v in SMALL.items() if k in fields}
    if name == "ta.autoattack":
        out["version"] = "rand"  # APGD-CE and APGD-DLR only (standard runs 5,000 Square queries)
    return out


@pytest.fixture(scope="module")
def model(trained_workdir):
    run_dir, _ = find_run(trained_workdir, "standard", "digits")
    return target_from_run(run_dir).model.eval()


def distance(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max().item()


def test_the_whole_catalogue_is_registered_without_importing_torchattacks():
    assert {n for n in ATTACKS.names() if n.startswith(PREFIX)} == set(NAMES)
    # torchattacks is imported when an attack runs, and its absence is one clear line
    code = ("import sys; sys.modules['torchattacks'] = None\n"
            "import torch, robench.attacks\n"
            "from robench.attack import make_attack\n"
            "from robench.errors import UserError\n"
            "assert 'torchattacks' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n"
            "    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)\n"
            "    make_attack('ta.square', 'digits')(torch.nn.Flatten(), x, y)\n"
            "except UserError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ta.square needs torchattacks: pip install --no-deps torchattacks==3.5.1", out.stderr


@pytest.mark.parametrize("name", NAMES)
def test_every_adapted_attack_stays_in_its_ball_and_never_helps(name, model, digits):
    attack = make_attack(name, "digits", overrides=cheap(name))
    assert attack.norm in attack.norms and attack.unit == 16
    x, y = digits.x_test[:32], digits.y_test[:32]
    rng = torch.get_rng_state()
    x_adv = attack(model, x, y, torch.arange(32))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert distance(x_adv, x, attack.norm) <= attack.eps * (1 + 1e-5) + BALL_TOL
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    # Never helps: not by construction (an adapted attack may return a moved image it did not
    # break, and noise can fix a wrong one), so in distribution: images the attack fixes may not
    # outnumber those it breaks beyond FALSE_ALARM (paired one-sided McNemar, tests/bounds.py).
    # Here under every ATEN_CPU_CAPABILITY no attack fixed any.
    with torch.no_grad():
        clean, adv = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
    fixed, broken = count(adv & ~clean), count(clean & ~adv)
    assert paired_p_greater(fixed, broken) >= FALSE_ALARM, f"{name}: fixed {fixed} images, broke {broken}"
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_l2_attacks_default_to_the_datasets_l2_radius():
    assert make_attack("ta.pgdl2", "digits").eps == 1.0  # digits' L2 radius, not its L-inf 0.2
    assert make_attack("ta.pgdl2", "digits", eps=0.5).eps == 0.5
    assert make_attack("ta.square", "digits", overrides={"norm": "l2"}).eps == 1.0
    assert make_attack("ta.square", "digits").eps == 0.2
    assert make_attack("ta.pgd", "digits").step_size == 0.05  # the dataset's step, eps / 4
    with pytest.raises(UserError, match="supports norm l2, not 'linf'"):
        make_attack("ta.cw", "digits", overrides={"norm": "linf"})


@pytest.mark.parametrize("option, message", [
    ({"loss": "hinge"}, "loss must be one of margin, ce"),
    ({"n_queries": 0}, "n_queries must be at least 1"),
    ({"group": 0}, "group must be at least 1"),
    ({"n_queries": "many"}, "expected int"),
    ({"queries": 5}, "no parameter"),
])
def test_bad_options_are_user_errors(option, message):
    with pytest.raises(UserError, match=message):
        make_attack("ta.square", "digits", overrides=option)


def test_minimum_norm_attack_counts_an_over_budget_example_as_not_broken(model, digits):
    x, y = digits.x_test[:24], digits.y_test[:24]
    free = make_attack("ta.deepfool", "digits", eps=1e6, overrides={"steps": 10})(model, x, y)
    length = (free - x).flatten(1).norm(dim=1)
    with torch.no_grad():
        fooled = model(free).argmax(1) != y
    # a radius half-way between two perturbation lengths, so no example sits on the boundary
    # (where float32 and float64 norms could disagree)
    lengths = length[fooled].sort().values
    k = len(lengths) // 2
    eps = (lengths[k - 1].item() + lengths[k].item()) / 2
    within = length <= eps
    at_eps = make_attack("ta.deepfool", "digits", eps=eps, overrides={"steps": 10})(model, x, y)
    assert torch.equal(at_eps[~within], x[~within])  # longer than eps: x itself, not broken
    assert torch.equal(at_eps[within], free[within])  # the rest exactly as the attack found them
    assert fooled[within].any() and fooled[~within].any()


def test_rounding_is_projected_but_a_real_escape_is_refused(model, digits, monkeypatch):
    x, y = digits.x_test[:8], digits.y_test[:8]
    attack = make_attack("ta.fgsm", "digits")
    # float rounding beyond the ball and the box (above the check's tolerance): projected
    monkeypatch.setattr(torchattacks.FGSM, "forward",
                        lambda self, images, labels: (images + attack.eps + 5e-6).clamp(max=1 + 5e-6))
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max().item() <= attack.eps + 1e-7 and x_adv.max().item() <= 1
    # a real escape: left for the threat-model check to refuse
    monkeypatch.setattr(torchattacks.FGSM, "forward",
                        lambda self, images, labels: (images + 2 * attack.eps).clamp(0, 1))
    with pytest.raises(ThreatModelError, match="left the eps-ball"):
        attack(model, x, y)


@pytest.mark.slow
def test_outcomes_do_not_depend_on_the_batch_size(trained_workdir, tmp_path):
    import shutil

    attacks = ["ta.square", "ta.apgd"]
    overrides = {a: cheap(a) for a in attacks}
    overrides["ta.square"]["n_queries"] = 100  # enough to break a good share (below)
    stored = {}
    for bs in (7, 64):
        wd = tmp_path / f"bs{bs}"
        shutil.copytree(trained_workdir / "runs", wd / "runs")
        run_eval(["pgdat"], attacks, wd, CPU, n=40, overrides=overrides, batch_size=bs, progress=False)
        with Store.in_workdir(wd) as store:
            stored[bs] = {r.key.name: r for r in store.rows()}
    for name in attacks:
        a, b = stored[7][name], stored[64][name]
        assert a.key == b.key
        np.testing.assert_array_equal(a.outcomes, b.outcomes, err_msg=name)
        # The attack does something here, so the equality is not that of untouched images. Claim:
        # it breaks (right clean, wrong under attack) at least 30% of the 40 images (17-19 for
        # Square, 22-23 for APGD here under every ATEN_CPU_CAPABILITY); binomial bound at
        # FALSE_ALARM (tests/bounds.py), which is at least one image.
        broken = count((stored[7]["clean"].outcomes > 0.5) & (a.outcomes < 0.5))
        assert broken >= fewest(40, 0.3) >= 1, (name, broken)


@pytest.mark.slow
def test_cli_stores_and_prints_robench_and_torchattacks_attacks(runs_copy):
    args = ["eval", "--defense", "pgdat", "--attacks", "pgd,ta.square,ta.fab", "--dataset", "digits", "--n", "20",
            "-o", "ta.square.n_queries=50", "-o", "ta.fab.steps=3", "--workdir", runs_copy, "--no-progress"]
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("defense"))
    assert head.split()[:5] == ["defense", "clean", "pgd", "ta.square", "ta.fab"]
    with Store.in_workdir(runs_copy) as store:
        rows = {r.key.name: r for r in store.rows()}
    assert {"pgd", "ta.square", "ta.fab"} <= set(rows)
    assert rows["ta.square"].key.n == 20 and json.loads(rows["ta.square"].key.params)["n_queries"] == 50
