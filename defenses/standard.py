"""No adversary: cross-entropy on clean inputs. The baseline every defense must beat."""

from torch.nn import functional as F

from robench.defense import Defense
from robench.registry import DEFENSES


@DEFENSES.register("standard")
class Standard(Defense):
    adversary = None
    summary = "no adversary: CE(z(x), y) (baseline)"
    order = 0

    def loss(self, model, x, x_adv, y):
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits
