"""Each defense's loss equals its formula in docs/design.md (section 3), computed by hand on a
fixed tiny batch."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from robench.defense import AdversarialDefense, Defense
from robench.registry import DEFENSES

B, D, K = 3, 4, 3


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, 2, 2, generator=g)
    x_adv = (x + 0.1 * torch.rand(B, 1, 2, 2, generator=g) - 0.05).clamp(0, 1)
    y = torch.tensor([0, 2, 1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(K, D, generator=g))
        model[1].bias.copy_(torch.randn(K, generator=g))
    return model, x, x_adv, y


def fixed_rbs(x):  # swap the two rows: a block shuffle with k = 2, split at 1
    return x.flip(2)


# Hand-written references on plain Python lists: softmax, CE, KL and squared distance.
def logits_of(model, x):
    w, b = model[1].weight.tolist(), model[1].bias.tolist()
    flat = x.reshape(len(x), -1).tolist()
    return [[sum(wi * xi for wi, xi in zip(w[k], row)) + b[k] for k in range(K)] for row in flat]


def log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ce(zs, y):
    return sum(-log_softmax(z)[t] for z, t in zip(zs, y.tolist())) / len(zs)


def kl(zp, zq):
    total = 0.0
    for a, b in zip(zp, zq):
        lp, lq = log_softmax(a), log_softmax(b)
        total += sum(math.exp(p) * (p - q) for p, q in zip(lp, lq))
    return total / len(zp)


def sqdist(za, zb):
    return sum(sum((u - v) ** 2 for u, v in zip(a, b)) for a, b in zip(za, zb)) / len(za)


def expected(name, model, x, x_adv, y):
    z, za, zr = logits_of(model, x), logits_of(model, x_adv), logits_of(model, fixed_rbs(x_adv))
    return {
        "standard": ce(z, y),
        "pgdat": ce(za, y),
        "trades": ce(z, y) + 6 * kl(z, za),
        "rbsat-p": ce(zr, y),
        "rlfat-p": ce(zr, y) + 0.5 * sqdist(zr, za),
        "rbsat-t": ce(z, y) + 6 * kl(z, zr),
        "rlfat-t": ce(z, y) + 6 * kl(z, zr) + 1.0 * sqdist(zr, za),
    }[name]


def make(name, *threat):
    """The defense; the threat model (eps, step, steps) only where it has an adversary."""
    cls = DEFENSES[name]
    return cls(*threat) if issubclass(cls, AdversarialDefense) else cls()


@pytest.mark.parametrize("name", DEFENSES.names())
def test_loss_matches_hand_computed(name):
    model, x, x_adv, y = tiny_batch()
    defense = make(name, 0.1, 0.025, 3)
    defense.rbs = fixed_rbs
    loss, _ = defense.loss(model, x, x_adv, y)
    assert loss.item() == pytest.approx(expected(name, model, x, x_adv, y), rel=1e-5, abs=1e-6)


def test_every_registered_defense_is_covered():
    assert set(DEFENSES.names()) == {"standard", "pgdat", "trades", "rbsat-p", "rlfat-p", "rbsat-t", "rlfat-t"}


@pytest.mark.parametrize("name", ["rlfat-p", "rlfat-t"])
def test_transfer_term_has_gradient_through_both_logits(name):
    """No stop-gradient: the transfer term's gradient reaches the weights via z(x') too."""
    model, x, x_adv, y = tiny_batch()
    d = DEFENSES[name](0.1, 0.025, 3)
    d.rbs = fixed_rbs
    d_no = DEFENSES[name](0.1, 0.025, 3, eta=0.0)
    d_no.rbs = fixed_rbs
    g1 = torch.autograd.grad(d.loss(model, x, x_adv, y)[0], model[1].weight)[0]
    g0 = torch.autograd.grad(d_no.loss(model, x, x_adv, y)[0], model[1].weight)[0]
    za, zr = model(x_adv), model(fixed_rbs(x_adv))
    manual = torch.autograd.grad(d.eta * (zr - za).pow(2).sum(1).mean(), model[1].weight)[0]
    torch.testing.assert_close(g1 - g0, manual, rtol=1e-4, atol=1e-6)


def test_defaults_are_the_papers():
    assert DEFENSES["trades"](0.03, 0.0075, 10).lam == 6
    assert DEFENSES["rlfat-p"](0.03, 0.0075, 10).eta == 0.5
    assert DEFENSES["rlfat-t"](0.03, 0.0075, 10).eta == 1.0
    assert DEFENSES["rlfat-t"](0.03, 0.0075, 10).lam == 6


@pytest.mark.parametrize("name", ["pgdat", "trades", "rlfat-p", "rlfat-t"])
def test_adversarial_examples_stay_in_ball(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    x_adv = DEFENSES[name](0.1, 0.03, 5).adversarial(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.05  # it did move


def test_adversarial_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    x_adv = DEFENSES["pgdat"](0.1, 0.025, 10).adversarial(model, x, y)
    ce = nn.functional.cross_entropy
    assert ce(model(x_adv), y) > ce(model(x), y) + 0.1


def test_standard_has_no_adversary():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert make("standard", 0.1, 0.025, 10).adversarial(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1])) is None


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))


@pytest.mark.parametrize("mode,moves", [("eval", False), ("train", True)])
def test_attack_mode_controls_batchnorm_statistics(mode, moves):
    """Eval mode (default) leaves BN statistics alone during the attack; train mode (the official
    code) moves them. Either way the model's own mode is restored."""
    model = bn_model().train()
    before = model[1].running_mean.clone()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    DEFENSES["pgdat"](0.1, 0.025, 3, attack_mode=mode).adversarial(model, x, y)
    assert model.training
    assert (not torch.equal(before, model[1].running_mean)) == moves


def test_params_record_what_matters():
    hp = DEFENSES["rlfat-t"](0.03, 0.0075, 10, rbs_mode="image").params()
    assert hp == {"eps": 0.03, "step_size": 0.0075, "attack_steps": 10, "attack_mode": "eval",
                  "lam": 6.0, "eta": 1.0, "rbs_k": 2, "rbs_mode": "image", "rbs_exclude_identity": False}
    hp = DEFENSES["rlfat-p"](0.03, 0.0075, 10, rbs_exclude_identity=True).params()
    assert hp["rbs_exclude_identity"] is True and hp["rbs_mode"] == "batch"
    assert "eta" not in DEFENSES["pgdat"](0.03, 0.0075, 10).params()
    assert isinstance(DEFENSES["pgdat"](0.03, 0.0075, 10), Defense)


@pytest.mark.parametrize("mode", ["batch", "image"])
def test_rbs_exclude_identity_never_returns_the_batch_unchanged(mode):
    """With the option, no draw leaves an 8x8 input as it was (per batch, and per image in image
    mode); without it, the official code's behaviour, some draws do (about 27% at k=2)."""
    torch.manual_seed(0)
    x = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 1, 8, 8)  # every pixel distinct
    on = DEFENSES["rlfat-p"](0.1, 0.025, 3, rbs_mode=mode, rbs_exclude_identity=True)
    off = DEFENSES["rlfat-p"](0.1, 0.025, 3, rbs_mode=mode)
    for d in (on, off):
        d.rbs_generator = torch.Generator().manual_seed(1)

    def unchanged(d):
        out = d.rbs(x)
        return sum(torch.equal(out[i], x[i]) for i in range(len(x)))

    assert sum(unchanged(on) for _ in range(300)) == 0
    assert sum(unchanged(off) for _ in range(300)) > 100


def test_rbs_draws_from_the_defenses_generator():
    """The same generator state gives the same shuffle; the global RNG plays no part."""
    x = torch.rand(2, 1, 8, 8)
    d = DEFENSES["rlfat-t"](0.1, 0.025, 3)
    d.rbs_generator = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    a = d.rbs(x)
    d.rbs_generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    assert torch.equal(a, d.rbs(x))


def test_settings_name_what_each_objective_uses():
    s = {name: {f.name for f in dataclasses.fields(DEFENSES[name])} for name in DEFENSES.names()}
    rbs = {"rbs_k", "rbs_mode", "rbs_exclude_identity"}
    attack = {"eps", "step_size", "attack_steps", "attack_mode"}
    assert s["standard"] == set()
    assert s["pgdat"] == attack
    assert s["trades"] == attack | {"lam"}
    assert s["rbsat-p"] == attack | rbs
    assert s["rlfat-p"] == attack | rbs | {"eta"}
    assert s["rbsat-t"] == attack | rbs | {"lam"}
    assert s["rlfat-t"] == attack | rbs | {"lam", "eta"}
