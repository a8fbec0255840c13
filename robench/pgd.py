"""L-inf projected gradient ascent, shared by training (the defenses' inner maximisation) and
evaluation (the ``pgd`` and ``cw`` attacks), so both use one implementation.

Each step takes the sign of the input gradient, projects to the eps-ball around x, then clips to
[0, 1] (the official code's order). Gradients are taken with ``torch.autograd.grad`` with
respect to the input only, so no parameter gradients are computed or accumulated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from robench.seeding import per_example

# loss(logits, x_adv) -> per-example losses to maximise, shape (B,)
Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LinfBall:
    """The threat model: an L-inf ball of radius eps intersected with the image box [0, 1].

    Their intersection is a per-pixel box [lo, hi], computed once per attack, so that projecting
    is a single clamp.
    """

    eps: float

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.eps).clamp_(0, 1), (x + self.eps).clamp_(0, 1)

    def start(self, x: torch.Tensor, kind: str, lo: torch.Tensor, hi: torch.Tensor,
              gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """The random start; with ``gens`` (one generator per example) each example's draw is
        its own, independent of the batch it sits in; else the global RNG draws for the batch."""
        if kind == "none":
            return x.clone()
        if kind not in ("uniform", "normal"):
            raise ValueError(f"unknown PGD start {kind!r}")
        draw = torch.rand if kind == "uniform" else torch.randn
        noise = per_example(draw, x.shape[1:], gens, x) if gens is not None else draw(
            x.shape, device=x.device, dtype=x.dtype)
        if kind == "uniform":  # Madry et al.: U(-eps, eps)
            return noise.mul_(2 * self.eps).sub_(self.eps).add_(x).clamp_(lo, hi)
        # TRADES (Zhang et al., official code): x + 0.001 N(0, I)
        return noise.mul_(0.001).add_(x).clamp_(lo, hi)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    gens: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Maximise ``objective(model(x_adv)).sum()`` over the eps-ball around ``x``.

    ``gens``: one generator per example for the random start (evaluation); without them the
    global RNG draws it (training, which seeds it per step).

    The model's train/eval mode is left as the caller set it: the defenses choose eval mode
    (default) or train mode (the official code's behaviour) for the inner maximisation.
    """
    ball = LinfBall(eps)
    x = x.detach()
    lo, hi = ball.bounds(x)
    x_adv = ball.start(x, start, lo, hi, gens)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = objective(model(x_adv)).sum()
        (grad,) = torch.autograd.grad(loss, [x_adv])
        # sign step, then project: one fused add and one clamp to the precomputed box
        x_adv = x_adv.detach().add_(grad.sign_(), alpha=step_size).clamp_(lo, hi)
    return x_adv


def cross_entropy_objective(y: torch.Tensor) -> Objective:
    return lambda logits: nn.functional.cross_entropy(logits.float(), y, reduction="none")


def cw_objective(y: torch.Tensor, kappa: float = 50.0) -> Objective:
    """The paper's "CW" attack loss: -relu(z_y - max_{j != y} z_j + kappa), maximised."""

    def objective(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        correct = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return -torch.relu(correct - other.amax(1) + kappa)

    return objective


def kl_objective(p_clean_log: torch.Tensor) -> Objective:
    """TRADES' inner loss: KL(p(x) || p(x_adv)) per example, with p(x) fixed."""
    p_clean_log = p_clean_log.detach().float()

    def objective(logits: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(logits.float(), dim=1)
        return (p_clean_log.exp() * (p_clean_log - log_q)).sum(1)

    return objective
