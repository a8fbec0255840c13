"""PGD adversarial training (Madry et al., 2018): CE on PGD examples found by maximising CE."""

from dataclasses import dataclass

from torch.nn import functional as F

from robench.defense import AdversarialDefense
from robench.registry import DEFENSES


@DEFENSES.register("pgdat")
@dataclass
class PGDAT(AdversarialDefense):
    inner_loss = "ce"
    summary = "CE(z(x'), y), x' = PGD on CE (Madry et al. 2018)"
    order = 10

    def loss(self, model, x, x_adv, y):
        logits_adv = model(x_adv)
        return F.cross_entropy(logits_adv.float(), y), logits_adv
