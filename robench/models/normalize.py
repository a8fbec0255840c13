"""Input normalisation owned by the model: ``Normalized(model, mean, std)`` computes
``model((x - mean) / std)``, so attacks keep working in [0, 1] pixel space (docs/design.md, section 6).

The wrapper's mean and std are non-persistent buffers: a checkpoint is loaded into the inner
model first and the wrapper adds no keys to match. ``NAMED_STATS`` holds the statistics
RobustBench's CIFAR entries use, as its ``dm_wide_resnet.py`` defines them (CIFAR10_MEAN/STD,
CIFAR100_MEAN/STD), and ``none``: mean 0, std 1, no normalisation.

Some architectures normalise inside themselves, as RobustBench's do (``OwnNormalization``: the
DeepMind wide ResNet). ``normalized`` gives a model one given normalisation whatever its kind, by
replacing its own or by wrapping it, so a normalisation is never applied twice;
``input_normalization`` says which one a model applies.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from robench.errors import UserError

__all__ = ["NAMED_STATS", "Normalized", "OwnNormalization", "input_normalization", "is_identity", "normalized",
           "parse_stats"]

Stats = tuple[tuple[float, ...], tuple[float, ...]]

NAMED_STATS: dict[str, Stats] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "none": ((0.0,), (1.0,)),
}


def _checked(mean: Sequence[float], std: Sequence[float]) -> Stats:
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std need one value per channel (or one for all): {mean}, {std}")
    if any(s <= 0 or not math.isfinite(s) for s in std) or not all(map(math.isfinite, mean)):
        raise ValueError(f"std must be positive and finite, mean finite: {mean}, {std}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def is_identity(mean: Sequence[float], std: Sequence[float]) -> bool:
    """Mean 0 and std 1 on every channel: no normalisation at all (``--mean none --std none``)."""
    return all(m == 0 for m in mean) and all(s == 1 for s in std)


class Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.stats = _checked(mean, std)
        self.model = model
        self.register_buffer("mean", torch.tensor(self.stats[0]).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.stats[1]).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class OwnNormalization(nn.Module):
    """A model that normalises its own input, ``(x - mean) / std`` before its first layer, as
    RobustBench's ``DMWideResNet`` does: mean and std are non-persistent buffers (no state-dict
    keys), or None for no normalisation. Subclasses call ``set_input_normalization`` in
    ``__init__`` and ``normalize_input`` first thing in ``forward``."""

    def set_input_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        stats = None if mean is None else _checked(mean, std)
        self._input_stats = stats
        device = next((p.device for p in self.parameters()), None)
        for i, name in enumerate(("mean", "std")):
            buf = None if stats is None else torch.tensor(stats[i], device=device).view(-1, 1, 1)
            self.register_buffer(name, buf, persistent=False)

    def input_normalization(self) -> Stats | None:
        return self._input_stats

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean is None else (x - self.mean) / self.std


def input_normalization(model: nn.Module) -> Stats | None:
    """The (mean, std) ``model`` applies to its [0, 1] input (its own or a ``Normalized`` wrapper's),
    or None."""
    if isinstance(model, Normalized):
        return model.stats
    if isinstance(model, OwnNormalization):
        return model.input_normalization()
    return None


def normalized(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """``model`` normalising its input with exactly (mean, std), or with nothing when ``mean`` is
    None or the identity: a model with its own normalisation has it replaced, any other is
    wrapped in ``Normalized``. Bad values raise ValueError."""
    if mean is not None and is_identity(mean, std):
        mean = std = None
    if isinstance(model, OwnNormalization):
        model.set_input_normalization(mean, std)
        return model
    return model if mean is None else Normalized(model, mean, std)


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
