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
    """The threat model: an L-inf ball of radius eps intersected with the image box [0, 1]."""

    eps: float

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(0, 1)

    def uniform_start(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x)

    def normal_start(self, x: torch.Tensor, std: float = 0.001) -> torch.Tensor:
        # TRADES starts at x + 0.001 N(0, I) (Zhang et al., official code).
        return self.project(x + std * torch.randn_like(x), x)


STARTS = {"uniform": LinfBall.uniform_start, "normal": LinfBall.normal_start, "none": lambda ball, x: x.clone()}


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Maximise ``objective(model(x_adv)).sum()`` over the eps-ball around ``x``.

    The model's train/eval mode is left as the caller set it: the defenses choose eval mode
    (default) or train mode (the official code's behaviour) for the inner maximisation.
    """
    ball = LinfBall(eps)
    x = x.detach()
    x_adv = STARTS[start](ball, x)
    # The ball and the box intersect in per-pixel bounds; computing them once makes each step
    # one fused add plus one clamp (identical to project(step(...)), fewer kernels).
    lo, hi = (x - eps).clamp_(0, 1), (x + eps).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = objective(model(x_adv)).sum()
        (grad,) = torch.autograd.grad(loss, [x_adv])
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
