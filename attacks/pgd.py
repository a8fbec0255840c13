"""White-box PGD on cross-entropy (``pgd``) and on the CW margin loss (``cw``), L-inf or L2.

The paper's evaluation (App. A) uses the training attack's parameters: eps 0.03, step 0.0075,
10 steps on CIFAR-10 (7 on CIFAR-100 / STL-10), random start U(-eps, eps). "CW" is PGD on
-relu(z_y - max_{j != y} z_j + kappa) with kappa = 50. With ``restarts > 1`` an example counts as
broken if any restart breaks it (the returned x_adv is the first restart that does).
With ``norm="l2"`` both run in the L2 ball instead (``robench.threat.L2Ball``: normalised-gradient
steps, uniform start in the ball), the loss unchanged; the radius defaults to the dataset's
``l2_eps`` and the step to eps / 4 as for L-inf (``robench.attack.make_attack``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from robench.attack import Attack
from robench.errors import UserError
from robench.threat import Objective, ball, cross_entropy_objective, cw_objective, pgd
from robench.registry import ATTACKS
from robench.seeding import uniform


@dataclass
class _PGDBase(Attack):
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    step_size: float = 0.0075
    attack_steps: int = 10
    restarts: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.step_size > 0 or self.attack_steps < 1 or self.restarts < 1:
            raise UserError(f"PGD needs step_size > 0, attack_steps >= 1 and restarts >= 1; got "
                            f"{self.step_size}, {self.attack_steps}, {self.restarts}")

    def objective(self, y: torch.Tensor) -> Objective:
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if k != "autocast"}

    def start_noise(self, x: torch.Tensor, index: torch.Tensor, restart: int) -> torch.Tensor:
        """Restart ``restart``'s U[0, 1) start draw: example i's depends on (seed, i) only."""
        shape = ball(self.norm, self.eps).draws(tuple(x.shape[1:]))
        return uniform(self.seed, index, shape, stream=restart, device=x.device)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.restarts == 1:
            return pgd(model, x, self.objective(y), self.eps, self.step_size, self.attack_steps,
                       "uniform", self.autocast, self.start_noise(x, index, 0), self.norm)
        best = x.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            x_adv = pgd(model, x, self.objective(y), self.eps, self.step_size, self.attack_steps,
                        "uniform", self.autocast, self.start_noise(x, index, restart), self.norm)
            with torch.no_grad(), self.autocast():
                fooled = model(x_adv).argmax(1) != y
            best[todo] = x_adv[todo]
            todo &= ~fooled
            if not todo.any():
                break
        return best


@ATTACKS.register("pgd")
@dataclass
class PGD(_PGDBase):
    """PGD on cross-entropy, random start (Madry et al.; paper App. A); L-inf or L2."""

    label = "PGD"
    order = 10
    paper = True
    eps_curve = True

    def objective(self, y: torch.Tensor) -> Objective:
        return cross_entropy_objective(y)


@ATTACKS.register("cw")
@dataclass
class CW(_PGDBase):
    """PGD on the CW margin loss, kappa = 50 (the paper's "CW"); L-inf or L2."""

    label = "CW"
    order = 20
    paper = True

    kappa: float = 50.0

    def objective(self, y: torch.Tensor) -> Objective:
        return cw_objective(y, self.kappa)
