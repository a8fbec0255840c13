"""TRADES (Zhang et al., 2019): CE(z(x), y) + lambda KL(p(x) || p(x')), x' = PGD on that KL."""

from torch.nn import functional as F

from robench.defense import Defense, kl
from robench.registry import DEFENSES


@DEFENSES.register("trades")
class TRADES(Defense):
    adversary = "kl"
    default_lam = 6.0  # RLFAT paper, App. A
    summary = "CE(z(x), y) + 6 KL(p(x) || p(x')), x' = PGD on the KL (Zhang et al. 2019)"
    order = 20

    def loss(self, model, x, x_adv, y):
        logits, logits_adv = model(x), model(x_adv)
        return F.cross_entropy(logits.float(), y) + self.lam * kl(logits, logits_adv), logits_adv
