"""TRADES (Zhang et al., 2019): CE(z(x), y) + lambda KL(p(x) || p(x')), x' = PGD on that KL."""

from dataclasses import dataclass

from torch.nn import functional as F

from robench.defense import TradesKL, kl
from robench.registry import DEFENSES


@DEFENSES.register("trades")
@dataclass
class TRADES(TradesKL):
    inner_loss = "kl"
    summary = "CE(z(x), y) + {lam:g} KL(p(x) || p(x')), x' = PGD on the KL (Zhang et al. 2019)"
    order = 20

    def loss(self, model, x, x_adv, y):
        logits, logits_adv = model(x), model(x_adv)
        return F.cross_entropy(logits.float(), y) + self.lam * kl(logits, logits_adv), logits_adv
