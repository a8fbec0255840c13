"""No adversary: cross-entropy on clean inputs. The baseline every defense must beat."""

from dataclasses import dataclass

from torch.nn import functional as F

from robench.defense import Defense
from robench.registry import DEFENSES


@DEFENSES.register("standard")
@dataclass
class Standard(Defense):
    inner_loss = None
    summary = "no adversary: CE(z(x), y) (baseline)"
    order = 0

    def loss(self, model, x, x_adv, y):
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits
