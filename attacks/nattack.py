"""N-attack (Li et al., ICML 2019): the NES black-box attack, as the RLFAT paper evaluates it.

It only queries output probabilities, never gradients. Per image it keeps a Gaussian search
distribution over a tanh-space offset mu, and each iteration it:

1. draws eps_j ~ N(0, I), j = 1..b, and forms the candidates
   x_j = x + clip(0.5 tanh(w0 + mu + sigma eps_j) + 0.5 - x, -eps, +eps),  w0 = artanh(2x - 1);
2. queries the model for p = softmax(logits) on every candidate;
3. rewards each one with R_j = -clip(log p_y - log max_{c != y} p_c, 0, 1000);
4. standardises A = (R - mean R) / (std R + 1e-7) and steps mu += lr / (b sigma) * sum_j A_j eps_j.

Every ``check_every`` iterations (iteration 0 included) the current mean point
x_mu = x + clip(0.5 tanh(w0 + mu) + 0.5 - x, -eps, eps) is classified; if the model is wrong the
image has been broken and leaves the search.

What the official code does (JHL-HUST/RLFAT, ``cifar_10/nattack.py``; ``cifar_100/`` and
``stl_10/`` carry the same loop), and how this module follows it:

- mu starts at ``np.random.randn(1, 3, 32, 32) * 0.001``, not at zero. Same here.
- w0 = ``torch_arctanh((x - 0.5) / 0.5)`` where ``torch_arctanh`` (``helpers.py``) first
  multiplies by ``1 - 1e-6`` so that pixels at 0 or 1 stay finite. Same here.
- The success check runs at ``runstep % 10 == 0`` for runstep in 0..199, *before* that step's
  update, so the mu left by the last ten updates is never looked at. With ``faithful=True`` we do
  exactly that; by default we also check once after the last iteration (the budget is spent, so
  its result should count).
- The runner-up quirk (docs/design.md, section 7): ``other = np.log(((1. - target_onehot) * outputs
  - target_onehot * 10000.).max(1)[0] + 1e-30)``. ``.max(1)`` is numpy's max over classes, one
  value per sample, and ``[0]`` then keeps the value of sample 0 only; that scalar is broadcast
  against every sample's ``real``. So every candidate is scored against the runner-up
  probability *value* of the first candidate. ``faithful=True`` reproduces it; the default takes
  the max per sample.
- Logs are ``np.log(p + 1e-30)`` on the softmax. ``faithful=True`` does the same; the default
  takes the margin on the logits (log-sum-exp cancels), which agrees wherever p is above ~1e-30
  and does not saturate beyond.
- ``Reward = -0.5 * loss1``: the halving only matters through the 1e-7 in the standardisation
  (``np.std``, population std). We keep it, so the normalisation is the official one.
- A pixel at exactly 0 or 1 sits at w0 = +-7.25, where tanh is flat: sigma = 0.1 noise moves it
  by ~1e-6, so in practice the search leaves such pixels alone (official behaviour, kept). On
  data with many saturated pixels (the 8x8 digits) this makes the attack markedly weaker.
- Images the clean model already gets wrong are skipped by the official script (``continue``).
  robench counts them as broken instead (success with x_adv = x), using no queries.

Batching: all still-active images are searched together, their b candidates each going through
the model in one forward pass (split into chunks of at most ``chunk`` images); broken images
leave the active set, so later forwards shrink. Every image draws its noise from its own
generator, seeded from (seed, index of the image), so an image's result does not depend on which
other images share its batch, nor on the chunk size (up to float rounding in the forward).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from robench.attack import Attack
from robench.errors import UserError
from robench.registry import ATTACKS
from robench.seeding import example_index, generators

# Automatic chunking: at most this many candidate samples, and this many input floats, per
# forward pass (32k samples of 8x8 digits; ~10k samples of 32x32x3 CIFAR, 128 MB of input).
_AUTO_SAMPLES = 32_768
_AUTO_FLOATS = 1 << 25


def nes_reward(log_probs: torch.Tensor, y: torch.Tensor, faithful: bool = False) -> torch.Tensor:
    """The N-attack reward -clip(log p_y - log max_{c != y} p_c, 0, 1000) of every sample.

    ``log_probs`` is (..., b, K): b population samples of one image per leading index (logits
    give the same rewards: log-sum-exp cancels in the margin); ``y`` is (...) with the true labels. Returns (..., b). With ``faithful`` the runner-up log probability
    is the one of sample 0, used for all b samples (the official code's ``.max(1)[0]``).
    """
    y = torch.as_tensor(y, device=log_probs.device)
    idx = y.long()[..., None, None].expand(*log_probs.shape[:-1], 1)
    real = log_probs.gather(-1, idx).squeeze(-1)
    other = log_probs.scatter(-1, idx, float("-inf")).amax(-1)
    if faithful:
        other = other[..., :1].expand_as(other)
    return (other - real).clamp_(-1000.0, 0.0)


def _standardise(reward: torch.Tensor) -> torch.Tensor:
    """The official A = (R/2 - mean R/2) / (std R/2 + 1e-7) over the population (last dim).

    The official code halves the reward (``Reward = 0.5 * loss1``) and uses ``np.std``
    (population std); (R - mean R) / (std R + 2e-7) is the same number without the halving.
    """
    std, mean = torch.std_mean(reward, -1, correction=0, keepdim=True)
    return (reward - mean).div_(std.add_(2e-7))


@dataclasses.dataclass
class NAttackResult:
    """One run: adversarial images and, per image, success, queries and the iteration it fell."""

    x_adv: torch.Tensor
    success: torch.Tensor  # bool (n,): misclassified at x_adv (clean mistakes included)
    queries: torch.Tensor  # int64 (n,): model evaluations used beyond the clean prediction
    steps: torch.Tensor  # int64 (n,): iteration of the successful check; -1 if clean-wrong or failed
    clean_correct: torch.Tensor  # bool (n,)

    @property
    def success_rate(self) -> float:
        return self.success.float().mean().item() if self.success.numel() else 0.0


@ATTACKS.register("nattack")
@dataclasses.dataclass
class NAttack(Attack):
    """NES black-box N-attack; defaults are the RLFAT paper's (b = 300, sigma 0.1, lr 0.008, T 200)."""

    population: int = 300
    sigma: float = 0.1
    lr: float = 0.008
    iterations: int = 200
    check_every: int = 10
    faithful: bool = False  # official code's runner-up-of-sample-0 reward and check schedule
    chunk: int = 0  # max images per forward pass; 0 = automatic

    label: ClassVar[str] = "N-attack"
    order: ClassVar[int] = 30
    paper: ClassVar[bool] = True
    black_box: ClassVar[bool] = True
    default_n: ClassVar[int | None] = 1500  # the paper's N-attack set
    demo_n: ClassVar[int | None] = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.population < 2:
            raise UserError(f"population must be at least 2, got {self.population}")
        if not self.sigma > 0:
            raise UserError(f"sigma must be positive, got {self.sigma}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.iterations < 0:
            raise UserError(f"iterations must be >= 0, got {self.iterations}")
        if self.check_every < 1:
            raise UserError(f"check_every must be >= 1, got {self.check_every}")
        if self.chunk < 0:
            raise UserError(f"chunk must be >= 0 (0 = automatic), got {self.chunk}")

    # ------------------------------------------------------------------ public API

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for (x, y); per-image stats land in ``last_result``."""
        return self.run(model, x, y, index).x_adv

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            index: torch.Tensor | None = None) -> NAttackResult:
        """The attack with its per-image statistics, on the model in the mode it is in (calling
        the attack puts it in eval mode).

        Image i draws its noise from a generator seeded by (seed, index[i]), its index in the
        data set, so its result does not depend on batching (``None``: 0..len(x)-1).
        """
        result = self._run(model, x, y, example_index(index, len(x)))
        self.last_result = result
        return result

    # ------------------------------------------------------------------ internals

    def _images_per_chunk(self, numel: int) -> int:
        if self.chunk:
            return self.chunk
        samples = min(_AUTO_SAMPLES, max(1, _AUTO_FLOATS // max(1, numel)))
        return max(1, samples // self.population)

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``nes_reward`` is given: log(softmax + 1e-30) when faithful, else the logits.

        The reward only looks at log p_y - log p_c, in which log-sum-exp cancels: the logits give
        it exactly (and one op cheaper) where ``log_softmax`` would.
        """
        logits = logits.float()
        if self.faithful:
            return torch.log(torch.softmax(logits, -1) + 1e-30)
        return logits

    def _project(self, w2: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """x + clip(0.5 tanh(w) + 0.5 - x, +-eps), given w2 = 2w; w2 is overwritten.

        0.5 tanh(w) + 0.5 = sigmoid(2w), and x + clip(z - x, +-eps) = clip(z, x - eps, x + eps);
        lo = max(x - eps, 0) and hi = min(x + eps, 1) also keep it in [0, 1] under rounding.
        """
        return w2.sigmoid_().clamp_(lo, hi)

    @torch.no_grad()
    def _predict(self, model: nn.Module, x: torch.Tensor, per: int) -> torch.Tensor:
        return torch.cat([model(x[i : i + per]).argmax(-1) for i in range(0, len(x), per)])

    @torch.no_grad()
    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> NAttackResult:
        device = x.device
        x = x.detach().float()
        y = y.detach().to(device).long()
        n, shape = x.shape[0], tuple(x.shape[1:])
        d = int(np.prod(shape)) if shape else 1
        b = self.population
        per = self._images_per_chunk(d)
        big = max(1, per * b)  # images per forward when there is no population

        x_flat = x.reshape(n, d)
        x_adv = x_flat.clone()
        success = torch.zeros(n, dtype=torch.bool, device=device)
        queries = torch.zeros(n, dtype=torch.long, device=device)
        steps = torch.full((n,), -1, dtype=torch.long, device=device)

        clean_correct = self._predict(model, x, big) == y
        success |= ~clean_correct

        # The state of the active (not yet broken) images only, compacted as images fall.
        act = torch.nonzero(clean_correct).flatten()
        gens = generators(self.seed, index[act.cpu()], device)
        m = len(gens)
        # Official: modify = np.random.randn(1, C, H, W) * 0.001, drawn before anything else.
        mu = torch.empty(m, d, device=device)
        for j, g in enumerate(gens):
            torch.randn(d, generator=g, device=device, out=mu[j])
        mu.mul_(0.001)
        xa = x_flat[act]
        w0 = torch.atanh((xa * 2 - 1) * (1 - 1e-6))  # helpers.torch_arctanh
        lo = (xa - self.eps).clamp_(min=0.0)
        hi = (xa + self.eps).clamp_(max=1.0)
        ya = y[act]
        step_scale = self.lr / (b * self.sigma)

        def check(t: int) -> None:
            nonlocal act, gens, mu, w0, lo, hi, ya
            if act.numel() == 0:
                return
            x_mu = self._project(torch.add(w0, mu).mul_(2.0), lo, hi)
            pred = self._predict(model, x_mu.view(-1, *shape), big)
            queries[act] += 1
            # Failed images keep the last checked mean point, which the model still gets right.
            x_adv[act] = x_mu
            keep = pred == ya
            if not bool(keep.all()):
                done = act[~keep]
                success[done] = True
                steps[done] = t
                gens = [g for g, k in zip(gens, keep.tolist()) if k]
                act, mu, w0, lo, hi, ya = (v[keep] for v in (act, mu, w0, lo, hi, ya))

        bar = tqdm(range(self.iterations), desc="nattack", leave=False, disable=None)
        for t in bar:
            if t % self.check_every == 0:
                check(t)
            m = act.numel()
            if m == 0:
                break
            bar.set_postfix(active=m, refresh=False)
            base2 = torch.add(w0, mu).mul_(2.0).unsqueeze(1)  # 2 (w0 + mu), (m, 1, d)
            for s0 in range(0, m, per):
                s1 = min(m, s0 + per)
                k = s1 - s0
                noise = torch.empty(k, b, d, device=device)
                for j in range(k):
                    torch.randn(b, d, generator=gens[s0 + j], device=device, out=noise[j])
                w2 = torch.add(base2[s0:s1], noise, alpha=2.0 * self.sigma)
                cand = self._project(w2, lo[s0:s1].unsqueeze(1), hi[s0:s1].unsqueeze(1))
                logits = model(cand.view(k * b, *shape)).view(k, b, -1)
                reward = nes_reward(self._log_probs(logits), ya[s0:s1], self.faithful)
                adv = _standardise(reward)
                mu[s0:s1].add_(torch.bmm(adv.unsqueeze(1), noise).squeeze(1), alpha=step_scale)
            queries[act] += b
        bar.close()
        if not self.faithful:
            check(self.iterations)

        return NAttackResult(x_adv.view(n, *shape), success, queries, steps, clean_correct)
