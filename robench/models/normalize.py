"""Input normalisation owned by the model: ``Normalized(model, mean, std)`` computes
``model((x - mean) / std)``, so attacks keep working in [0, 1] pixel space (DESIGN.md section 3).

The wrapper's mean and std are non-persistent buffers: a checkpoint is loaded into the inner
model first and the wrapper adds no keys to match. ``NAMED_STATS`` holds the statistics
RobustBench's CIFAR entries use, as its ``dm_wide_resnet.py`` defines them (CIFAR10_MEAN/STD,
CIFAR100_MEAN/STD).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from robench.errors import UserError

__all__ = ["NAMED_STATS", "Normalized", "parse_stats"]

NAMED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel (or one for all): {mean}, {std}")
        if any(s <= 0 or not math.isfinite(s) for s in std) or not all(map(math.isfinite, mean)):
            raise ValueError(f"std must be positive and finite, mean finite: {mean}, {std}")
        self.model = model
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def parse_stats(text: str, option: str, which: int) -> tuple[float, ...]:
    """``"0.4914,0.4822,0.4465"``, one number for every channel, or a name in ``NAMED_STATS``
    (``which``: 0 for the mean, 1 for the std). A bad value is a one-line ``UserError``."""
    name = text.strip().lower().replace("-", "")
    if name in NAMED_STATS:
        return NAMED_STATS[name][which]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: give comma-separated numbers (e.g. 0.4914,0.4822,0.4465) "
                        f"or one of {', '.join(NAMED_STATS)}") from None
    if not all(map(math.isfinite, values)) or (which == 1 and min(values) <= 0):
        raise UserError(f"{option} {text!r}: values must be finite{' and positive' if which else ''}")
    return values
