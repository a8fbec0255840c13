"""What every defense is: how it builds the adversarial batch, and its loss on that batch.

Defenses live one per module under ``defenses/`` and register themselves in ``DEFENSES``.
The training loop is shared (``robench.train``); a defense only says
- ``adversary``: which loss PGD maximises in training ("ce", "kl" for TRADES-style, or None);
- ``loss(model, x, x_adv, y)``: its training objective (DESIGN.md section 2, exact forms).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from robench.threat import cross_entropy_objective, kl_objective, pgd
from robench.rbs import rbs

AUTOCAST_OFF: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

ATTACK_MODES = ("eval", "train")


class Defense:
    adversary: ClassVar[str | None] = "ce"
    uses_rbs: ClassVar[bool] = False
    # Loss weights, the paper's values: TRADES' lambda and RLFAT's eta (0.5 for -P, 1 for -T).
    default_lam: ClassVar[float] = 0.0
    default_eta: ClassVar[float] = 0.0
    summary: ClassVar[str] = ""
    # What the report and the demo need to know, declared here and nowhere else.
    order: ClassVar[int] = 100  # row order in tables (the paper's order first)
    parent: ClassVar[str | None] = None  # the defense this one ablates (paper section 4.4 chains)

    def __init__(
        self,
        eps: float,
        step_size: float,
        attack_steps: int,
        lam: float | None = None,
        eta: float | None = None,
        rbs_k: int = 2,
        rbs_mode: str = "batch",
        attack_mode: str = "eval",
        rbs_exclude_identity: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager] = AUTOCAST_OFF,
    ) -> None:
        self.eps, self.step_size, self.attack_steps = eps, step_size, attack_steps
        self.lam = self.default_lam if lam is None else lam
        self.eta = self.default_eta if eta is None else eta
        self.rbs_k, self.rbs_mode, self.attack_mode = rbs_k, rbs_mode, attack_mode
        self.rbs_exclude_identity = rbs_exclude_identity
        self.autocast = autocast
        # Where RBS draws from: None is torch's global RNG. The training loop gives it a generator
        # seeded from (seed, step) alone in batch mode, so every torchrun rank applies the same
        # shuffle to its shard: one draw per global batch, as the official code makes.
        self.rbs_generator: torch.Generator | None = None
        # Tests replace this with a fixed permutation to check losses by hand.
        self.rbs: Callable[[torch.Tensor], torch.Tensor] = self._rbs

    def _rbs(self, x: torch.Tensor) -> torch.Tensor:
        return rbs(x, self.rbs_k, self.rbs_mode, exclude_identity=self.rbs_exclude_identity,
                   generator=self.rbs_generator)

    @classmethod
    def settings(cls) -> frozenset[str]:
        """The training settings (``TrainConfig`` fields) that this defense's objective uses; the
        others have no effect on it, so ``robench train`` refuses them when typed."""
        used = set()
        if cls.adversary is not None:
            used |= {"eps", "step_size", "attack_steps", "attack_mode"}
        if cls.adversary == "kl" or cls.default_lam:
            used.add("lam")
        if cls.default_eta:  # only the RLFAT losses have a transfer term
            used.add("eta")
        if cls.uses_rbs:
            used |= {"rbs_k", "rbs_mode", "rbs_exclude_identity"}
        return frozenset(used)

    def hyperparameters(self) -> dict:
        """What the checkpoint records about this defense's objective."""
        hp = {"eps": self.eps, "step_size": self.step_size, "attack_steps": self.attack_steps,
              "attack_mode": self.attack_mode}
        if self.adversary == "kl" or self.default_lam:
            hp["lam"] = self.lam
        if self.uses_rbs:
            hp.update(eta=self.eta, rbs_k=self.rbs_k, rbs_mode=self.rbs_mode,
                      rbs_exclude_identity=self.rbs_exclude_identity)
        return hp

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """PGD on the defense's inner loss, with the model in eval mode (default) or, as in the
        official code, in train mode so that BatchNorm uses and updates batch statistics."""
        if self.adversary is None:
            return None
        was_training = model.training
        model.train(self.attack_mode == "train")
        try:
            if self.adversary == "ce":
                objective, start = cross_entropy_objective(y), "uniform"
            else:
                with torch.no_grad(), self.autocast():
                    objective, start = kl_objective(F.log_softmax(model(x).float(), 1)), "normal"
            return pgd(model, x, objective, self.eps, self.step_size, self.attack_steps, start, self.autocast)
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor | None, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, logits whose accuracy the training log reports)."""
        raise NotImplementedError


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p || q), the TRADES regulariser (sum over classes, mean over the batch)."""
    log_p, log_q = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def transfer(logits_rbs: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """RLFAT's robust-local-feature transfer: (1/B) sum_i ||z(RBS(x'_i)) - z(x'_i)||^2.
    Gradients flow through both sets of logits, as in the official code."""
    return (logits_rbs.float() - logits_adv.float()).pow(2).sum(1).mean()
