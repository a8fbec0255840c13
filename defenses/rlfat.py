"""RLFAT (Song et al., ICLR 2020) and its ablations, exactly as the official code computes them.

- RLFAT-P: CE(z(RBS(x')), y) + eta (1/B) sum ||z(RBS(x')) - z(x')||^2, eta = 0.5, x' = PGD on CE.
  No CE term on x' itself and no clean term.
- RLFAT-T: CE(z(x), y) + lambda KL(p(x) || p(RBS(x'))) + eta (1/B) sum ||z(RBS(x')) - z(x')||^2,
  lambda = 6, eta = 1, x' = PGD on TRADES' KL. The clean term uses plain x, not RBS(x).
- RBSAT-P / RBSAT-T ("RLFL only", paper section 4.4): the same without the transfer term.
"""

from dataclasses import dataclass

from torch.nn import functional as F

from robench.defense import RandomBlockShuffle, TradesKL, kl, non_negative, setting, transfer
from robench.registry import DEFENSES


@DEFENSES.register("rbsat-p")
@dataclass
class RBSATP(RandomBlockShuffle):
    inner_loss = "ce"
    summary = "CE(z(RBS(x')), y), x' = PGD on CE (ablation: RLFL only)"
    order = 30
    parent = "pgdat"

    def loss(self, model, x, x_adv, y):
        logits_rbs = model(self.rbs(x_adv))
        return F.cross_entropy(logits_rbs.float(), y), logits_rbs


@DEFENSES.register("rlfat-p")
@dataclass
class RLFATP(RandomBlockShuffle):
    inner_loss = "ce"
    summary = "CE(z(RBS(x')), y) + {eta:g} ||z(RBS(x')) - z(x')||^2, x' = PGD on CE"
    order = 40
    parent = "rbsat-p"

    eta: float = setting(0.5, **non_negative("--eta"))  # transfer weight; paper, App. A

    def loss(self, model, x, x_adv, y):
        logits_rbs, logits_adv = model(self.rbs(x_adv)), model(x_adv)
        loss = F.cross_entropy(logits_rbs.float(), y) + self.eta * transfer(logits_rbs, logits_adv)
        return loss, logits_adv


@DEFENSES.register("rbsat-t")
@dataclass
class RBSATT(TradesKL, RandomBlockShuffle):
    inner_loss = "kl"
    summary = "CE(z(x), y) + {lam:g} KL(p(x) || p(RBS(x'))), x' = PGD on KL (ablation: RLFL only)"
    order = 50
    parent = "trades"

    def loss(self, model, x, x_adv, y):
        logits, logits_rbs = model(x), model(self.rbs(x_adv))
        return F.cross_entropy(logits.float(), y) + self.lam * kl(logits, logits_rbs), logits_rbs


@DEFENSES.register("rlfat-t")
@dataclass
class RLFATT(TradesKL, RandomBlockShuffle):
    inner_loss = "kl"
    summary = "CE(z(x), y) + {lam:g} KL(p(x) || p(RBS(x'))) + {eta:g} ||z(RBS(x')) - z(x')||^2, x' = PGD on KL"
    order = 60
    parent = "rbsat-t"

    eta: float = setting(1.0, **non_negative("--eta"))  # transfer weight; paper, App. A

    def loss(self, model, x, x_adv, y):
        logits, logits_rbs, logits_adv = model(x), model(self.rbs(x_adv)), model(x_adv)
        loss = (F.cross_entropy(logits.float(), y) + self.lam * kl(logits, logits_rbs)
                + self.eta * transfer(logits_rbs, logits_adv))
        return loss, logits_adv
