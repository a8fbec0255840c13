"""AutoAttack (reference code via pyautoattack): stays in the ball, breaks an undefended model,
leaves the caller's model mode, RNG, tracer and terminal alone."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from torch import nn

from robench.attack import BALL_TOL, Attack
from robench.attacks.autoattack import AutoAttack
from robench.config import DATASET_DEFAULTS
from robench.errors import UserError
from robench.registry import ATTACKS

from bounds import FALSE_ALARM, count, fewest, most, paired_p_greater

CHEAP = dict(version="custom", attacks=("apgd-ce",))


@pytest.fixture(scope="module")
def mlp(digits):
    """A small MLP on the digits (1x8x8) and 40 test images it gets right; ~1 s of training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # Plain full-batch gradient descent: torch.optim's first use imports torch._dynamo (seconds).
    for _ in range(150):
        model.zero_grad()
        nn.functional.cross_entropy(model(digits.x_train), digits.y_train).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.eval()
    with torch.no_grad():
        right = model(digits.x_test).argmax(1) == digits.y_test
    # Claim: this MLP gets at least 90% of the 360 test images right (94.7% under every
    # ATEN_CPU_CAPABILITY here); binomial bound at FALSE_ALARM (tests/bounds.py).
    assert count(right) >= fewest(len(right), 0.9), count(right)
    return model, digits.x_test[right][:40], digits.y_test[right][:40]


def _right(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def _assert_in_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max().item() <= eps + BALL_TOL
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1


def test_registered_and_dataset_defaults():
    assert ATTACKS["autoattack"] is AutoAttack
    attack = AutoAttack.for_dataset(DATASET_DEFAULTS["digits"])
    assert attack.eps == DATASET_DEFAULTS["digits"].eps and attack.version == "standard" and attack.norm == "linf"
    assert AutoAttack.__doc__.splitlines()[0].startswith("AutoAttack (Croce & Hein 2020), reference")


def test_params_are_json():
    p = AutoAttack(eps=0.1, version="custom", attacks=("apgd-ce", "apgd-t")).params()
    assert json.loads(json.dumps(p)) == {"eps": 0.1, "seed": 0, "version": "custom", "norm": "linf",
                                         "attacks": ["apgd-ce", "apgd-t"], "group": 256}
    # A comma-separated string (command line) is accepted.
    assert AutoAttack(eps=0.1, version="custom", attacks="apgd-ce, square").attacks == ("apgd-ce", "square")


@pytest.mark.parametrize("kwargs", [
    dict(version="fast"),
    dict(norm="L2"),  # robench's names are "linf" and "l2"; the reference's spelling is mapped, not accepted
    dict(norm="l1"),
    dict(version="custom"),  # no attacks
    dict(version="standard", attacks=("apgd-ce",)),
    dict(version="custom", attacks=("pgd",)),
    dict(eps=0.0),
])
def test_bad_parameters_are_user_errors(kwargs):
    with pytest.raises(UserError):
        AutoAttack(**{"eps": 0.1, **kwargs})


@pytest.mark.parametrize("attacks", [("apgd-ce",), ("apgd-ce", "apgd-t")])
def test_breaks_undefended_model_inside_ball(mlp, attacks):
    model, x, y = mlp
    eps = 0.3
    x_adv = AutoAttack(eps=eps, version="custom", attacks=attacks)(model, x, y)
    _assert_in_ball(x_adv, x, eps)
    # Claim: at eps 0.3 at most 1% of these images survive (none do here); binomial bound.
    assert count(_right(model, x_adv, y)) <= most(len(y), 0.01)


def test_small_eps_stays_inside_ball_and_is_deterministic(mlp):
    model, x, y = mlp
    a = AutoAttack(eps=0.05, **CHEAP)(model, x, y)
    b = AutoAttack(eps=0.05, **CHEAP)(model, x, y)
    _assert_in_ball(a, x, 0.05)
    assert torch.equal(a, b)
    # Examples it does not break come back unchanged (the reference's convention).
    with torch.no_grad():
        kept = model(a).argmax(1) == y
    assert torch.equal(a[kept], x[kept])


def test_mode_rng_tracer_and_terminal_untouched(mlp, capsys, caplog):
    model, x, y = mlp
    seen_modes = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))
    old_trace = sys.gettrace()

    def tracer(frame, event, arg):
        return None

    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sys.settrace(tracer)
    try:
        with caplog.at_level(logging.DEBUG):
            AutoAttack(eps=0.1, **CHEAP)(model, x[:10], y[:10])
        assert sys.gettrace() is tracer  # the reference's check_dynamic calls settrace(None)
    finally:
        sys.settrace(old_trace)
        hook.remove()
        was_training = model.training
        model.eval()
    assert was_training  # mode restored
    assert seen_modes and not any(seen_modes)  # attacked in eval mode
    assert torch.equal(torch.rand(3), expected)  # the reference's manual_seed did not leak
    assert capsys.readouterr().out == ""
    assert not [r for r in caplog.records if r.name == "auto-attack"]


def test_projects_reference_rounding_into_ball(mlp, monkeypatch):
    """A reference x_adv an ulp outside the ball or [0, 1] is projected, not refused."""
    import pyautoattack

    model, x, y = mlp
    eps = 0.1

    def sloppy(self, x_orig, y_orig, *, batch_size=250, state_path=None):
        return (x_orig + eps + 1e-5).clamp(max=1 + 1e-5), y_orig

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", sloppy)
    x_adv = AutoAttack(eps=eps, **CHEAP)(model, x, y)
    _assert_in_ball(x_adv, x, eps)


def test_fewer_than_ten_classes(digits):
    torch.manual_seed(0)
    x, y = digits.x_test[:12], digits.y_test[:12] % 5
    five = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    x_adv = AutoAttack(eps=0.3, version="custom", attacks=("apgd-t",))(five, x, y)
    _assert_in_ball(x_adv, x, 0.3)
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with pytest.raises(UserError, match="at least 4 classes"):
        AutoAttack(eps=0.3)(three, x, y % 3)
    x_adv = AutoAttack(eps=0.3, version="custom", attacks=("apgd-ce",))(three, x, y % 3)
    _assert_in_ball(x_adv, x, 0.3)


def test_empty_batch(mlp):
    model, x, y = mlp
    assert AutoAttack(eps=0.1)(model, x[:0], y[:0]).shape == x[:0].shape


@pytest.mark.slow
def test_standard_version_small(mlp):
    """The full standard suite (APGD-CE, APGD-T, FAB-T, Square) on 10 images: a few seconds."""
    model, x, y = mlp
    x, y = x[:10], y[:10]
    eps = 0.1
    attack = AutoAttack(eps=eps)
    x_adv = attack(model, x, y)
    _assert_in_ball(x_adv, x, eps)
    # At least as strong as its first component alone. Not by construction: the custom APGD-CE
    # runs with the reference's own restarts, the standard suite's with one. Paired one-sided
    # test on the same images: images only APGD-CE breaks may not outnumber those only the suite
    # breaks beyond FALSE_ALARM (tests/bounds.py).
    apgd = AutoAttack(eps=eps, **CHEAP)(model, x, y)
    suite_right, apgd_right = _right(model, x_adv, y), _right(model, apgd, y)
    b, c = count(suite_right & ~apgd_right), count(~suite_right & apgd_right)
    assert paired_p_greater(b, c) >= FALSE_ALARM, (b, c)


class Noisy(nn.Module):
    """A randomised 'defense': fresh noise on the logits at every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out + 0.5 * torch.randn_like(out)


def test_reference_warnings_are_kept_per_run(mlp):
    """The reference's own gradient-masking checks reach ``last_warnings`` (and through the
    evaluator the stored row): a randomised model is flagged, a deterministic one is not."""
    model, x, y = mlp
    clean = AutoAttack(eps=0.1, **CHEAP)
    clean(model, x[:8], y[:8])
    assert clean.last_warnings == []
    noisy = AutoAttack(eps=0.1, **CHEAP)
    noisy(Noisy(model), x[:8], y[:8])
    assert any("randomized defense" in w for w in noisy.last_warnings), noisy.last_warnings
    # Two groups: the warning is reported once, not once per group.
    grouped = AutoAttack(eps=0.1, group=4, **CHEAP)
    grouped(Noisy(model), x[:8], y[:8])
    assert sum("randomized defense" in w for w in grouped.last_warnings) == 1
