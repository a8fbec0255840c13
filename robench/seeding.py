"""Seeds derived from integers, and random draws that belong to one example.

An attack's random draws for example ``i`` come from a generator seeded by ``mix(seed, i)``, so a
stored outcome does not depend on which other examples shared its batch: any ``--batch-size``,
any resume point and any torchrun world size give the same per-example result.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def mix(*values: int) -> int:
    """A 63-bit seed from any tuple of non-negative integers (numpy's SeedSequence hashing)."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in values]
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def generators(seed: int, index: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
               ) -> list[torch.Generator]:
    """One generator per example, seeded by ``mix(seed, example index)``."""
    out = []
    for i in torch.as_tensor(index).tolist():
        g = torch.Generator(device=device)
        g.manual_seed(mix(seed, i))
        out.append(g)
    return out


def per_example(draw: Callable[..., torch.Tensor], shape: Sequence[int], gens: list[torch.Generator],
                like: torch.Tensor) -> torch.Tensor:
    """Stack ``draw(shape, generator=g)`` for each generator: one example's draw each, on
    ``like``'s device and dtype (float32 draws, then cast, so the numbers do not depend on it)."""
    out = torch.empty((len(gens), *shape), device=like.device, dtype=torch.float32)
    for j, g in enumerate(gens):
        draw(tuple(shape), generator=g, device=like.device, out=out[j])
    return out.to(like.dtype)


def example_index(index: torch.Tensor | None, n: int) -> torch.Tensor:
    """The examples' indices in their split; ``None`` means 0..n-1 (a caller's first batch)."""
    if index is None:
        return torch.arange(n)
    index = torch.as_tensor(index).reshape(-1).cpu()
    if len(index) != n:
        raise ValueError(f"index has {len(index)} entries for a batch of {n}")
    return index
