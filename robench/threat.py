"""Projected gradient ascent in an L-inf or L2 ball, shared by training and evaluation."""

# Training (the defenses' inner maximisation) and evaluation (the ``pgd`` and ``cw`` attacks) use
# one implementation. L-inf (the paper's threat model): each step takes the sign of the input
# gradient, projects to the eps-ball around x, then clips to [0, 1] (the official code's order).
# L2 (``norm="l2"``): each step moves ``step_size`` along the gradient divided by its per-example
# L2 norm, scales the perturbation back onto the eps-ball if it left it, then clips to [0, 1]
# (``L2Step`` of Madry et al.'s ``robustness`` library). Clipping after the L2 projection never
# leaves the ball: x is in [0, 1], so clipping only shrinks each |x_adv_i - x_i|. Gradients are
# taken with ``torch.autograd.grad`` with respect to the input only, so no parameter gradients
# are computed or accumulated.

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

    @staticmethod
    def draws(shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the U[0, 1) values per example the uniform start needs: one per pixel."""
        return tuple(shape)

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


@dataclass(frozen=True)
class L2Ball:
    """The L2 threat model: per example ||x_adv - x||_2 <= eps, intersected with [0, 1].

    The random start is uniform in the ball: a uniform direction (a normal vector divided by
    its norm) at radius eps * U^(1/d), d the pixels per example; the L2 analogue of Madry et
    al.'s uniform L-inf start, which is uniform in the L-inf ball. In d dimensions that radius
    is within a few 1/d of eps (median eps * 0.5^(1/d): 0.989 eps for 8x8 digits, 0.9998 eps for
    CIFAR-10), so it is close to the ``robustness`` library's start on the sphere of radius eps;
    unlike torchattacks' PGDL2 start (radius eps * U) it does not crowd near x. Then clipped to
    [0, 1] like every iterate.
    """

    eps: float

    @staticmethod
    def draws(shape: tuple[int, ...]) -> tuple[int]:
        """U[0, 1) values per example the start needs: two per pixel (Box-Muller) and the radius."""
        d = 1
        for s in shape:
            d *= s
        return (2 * d + 1,)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scale each example's perturbation onto the ball if it left it, then clip to [0, 1]."""
        delta = x_adv - x
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        return delta.mul_(self.eps / norm.clamp_min(self.eps)).add_(x).clamp_(0, 1)

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, x: torch.Tensor) -> torch.Tensor:
        """One step of ``step_size`` along grad / ||grad||_2 (per example), then ``project``."""
        norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        return self.project(x_adv.add_(grad.div_(norm.add_(1e-10)), alpha=step_size), x)

    def start(self, x: torch.Tensor, kind: str, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The random start. ``noise``: ``draws`` U[0, 1) values per example, drawn per example
        by the caller (evaluation); without it the global RNG draws the start (training)."""
        if kind == "uniform":
            d = x.shape[1:].numel()
            if noise is None:
                z, u = torch.randn_like(x).flatten(1), torch.rand(len(x), 1, device=x.device, dtype=x.dtype)
            else:  # Box-Muller: 1 - u1 is in (0, 1], so the log is finite
                noise = noise.to(device=x.device, dtype=torch.float32).reshape(len(x), 2 * d + 1)
                u1, u2, u = noise[:, :d], noise[:, d:2 * d], noise[:, 2 * d:]
                z = torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * torch.pi * u2)
            radius = self.eps * u.pow(1 / d)
            delta = z * (radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
            return self.project(delta.view_as(x).to(x.dtype).add_(x), x)
        if kind == "normal":  # TRADES (Zhang et al., official code): x + 0.001 N(0, I)
            return self.project(torch.randn_like(x).mul_(0.001).add_(x), x)
        if kind == "none":
            return x.clone()
        raise ValueError(f"unknown PGD start {kind!r}")


NORMS = ("linf", "l2")


def ball(norm: str, eps: float) -> LinfBall | L2Ball:
    """The threat model ``norm`` ("linf" or "l2") of radius ``eps``."""
    if norm == "linf":
        return LinfBall(eps)
    if norm == "l2":
        return L2Ball(eps)
    raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


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
    norm: str = "linf",
) -> torch.Tensor:
    """Maximise ``objective(model(x_adv)).sum()`` over the ``norm`` eps-ball around ``x``.

    ``noise``: the uniform start's U[0, 1) draw, per example, shaped ``(len(x), *ball.draws(x
    .shape[1:]))`` (see ``LinfBall.start`` and ``L2Ball.start``).

    The model's train/eval mode is left as the caller set it: the defenses choose eval mode
    (default) or train mode (the official code's behaviour) for the inner maximisation.
    """
    x = x.detach()
    if norm != "linf":
        return _pgd_ball(model, x, objective, ball(norm, eps), step_size, steps, start, autocast, noise)
    linf = LinfBall(eps)
    lo, hi = linf.bounds(x)
    x_adv = linf.start(x, start, lo, hi, noise)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = objective(model(x_adv)).sum()
        (grad,) = torch.autograd.grad(loss, [x_adv])
        # sign step, then project: one fused add and one clamp to the precomputed box
        x_adv = x_adv.detach().add_(grad.sign_(), alpha=step_size).clamp_(lo, hi)
    return x_adv


def _pgd_ball(model: nn.Module, x: torch.Tensor, objective: Objective, threat: L2Ball, step_size: float,
              steps: int, start: str, autocast: Callable[[], contextlib.AbstractContextManager],
              noise: torch.Tensor | None) -> torch.Tensor:
    """``pgd`` in a ball whose projection is not a box (L2): ``threat.ascend`` steps and projects."""
    x_adv = threat.start(x, start, noise)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast():
            loss = objective(model(x_adv)).sum()
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = threat.ascend(x_adv.detach(), grad, step_size, x)
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
