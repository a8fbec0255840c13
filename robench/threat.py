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
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """The random start. ``noise``: a U[0, 1) draw shaped like x for the uniform start, drawn
        per example by the caller (evaluation); without it the global RNG draws it (training,
        which seeds the RNG per step)."""
        if kind == "uniform":  # Madry et al.: U(-eps, eps)
            u = noise.to(x.dtype) if noise is not None else torch.rand_like(x)
            return u.mul_(2 * self.eps).sub_(self.eps).add_(x).clamp_(lo, hi)
        if kind == "normal":  # TRADES (Zhang et al., official code): x + 0.001 N(0, I)
            return torch.randn_like(x).mul_(0.001).add_(x).clamp_(lo, hi)
        if kind == "none":
            return x.clone()
        raise ValueError(f"unknown PGD start {kind!r}")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise ``objective(model(x_adv)).sum()`` over the eps-ball around ``x``.

    ``noise``: the uniform start's U[0, 1) draw, per example (see ``LinfBall.start``).

    The model's train/eval mode is left as the caller set it: the defenses choose eval mode
    (default) or train mode (the official code's behaviour) for the inner maximisation.
    """
    ball = LinfBall(eps)
    x = x.detach()
    lo, hi = ball.bounds(x)
    x_adv = ball.start(x, start, lo, hi, noise)
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
