"""Seeds derived from integers, and random draws that belong to one example.

An attack's random draws for example ``i`` depend on ``(seed, i)`` only, so a stored outcome does
not depend on which other examples shared its batch: any ``--batch-size``, any resume point and
any torchrun world size give the same per-example result. Two ways to get them:

- ``generators(seed, index)``: one ``torch.Generator`` per example, for attacks that draw many
  times per example (the N-attack's population noise).
- ``uniform(seed, index, shape, stream)``: a counter-based draw, vectorised over the batch with
  no per-example Python work (PGD's random start, drawn for every batch). Value ``j`` of example
  ``i`` is a 32-bit integer hash of (seed, stream, i, j), computed in numpy's wrapping uint32 arithmetic,
  so the numbers are the same on every device and CPU. The hash is the "lowbias32" mixer (Chris
  Wellons' hash-prospector), applied twice.
"""

from __future__ import annotations

from typing import Sequence

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


def _hash32(x: np.ndarray) -> np.ndarray:
    """lowbias32, in place on uint32 (numpy's uint32 products wrap mod 2**32, as the hash wants)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def uniform(seed: int, index: torch.Tensor, shape: Sequence[int], stream: int = 0,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """U[0, 1) float32 of shape (len(index), *shape); example ``index[b]``'s values depend only
    on (seed, stream, index[b]) and the element's position (24-bit resolution, as torch.rand)."""
    key = mix(seed, stream)
    index = torch.as_tensor(index).reshape(-1).cpu().numpy().astype(np.uint64)
    k1 = _hash32(((index & 0xFFFFFFFF) ^ np.uint64(key & 0xFFFFFFFF)).astype(np.uint32))
    k2 = _hash32(k1 ^ np.uint32(key >> 32 & 0xFFFFFFFF))
    j = np.arange(int(np.prod(shape)), dtype=np.uint32)
    x = _hash32(j[None, :] ^ k1[:, None])
    x ^= k2[:, None]
    u = (_hash32(x) >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    return torch.from_numpy(u.reshape(len(index), *shape)).to(device)


def example_index(index: torch.Tensor | None, n: int) -> torch.Tensor:
    """The examples' indices in their split; ``None`` means 0..n-1 (a caller's first batch)."""
    if index is None:
        return torch.arange(n)
    index = torch.as_tensor(index).reshape(-1).cpu()
    if len(index) != n:
        raise ValueError(f"index has {len(index)} entries for a batch of {n}")
    return index


# Independent random streams of a training run, each mixed with (seed, ...) by ``mix``.
STEP_STREAM, RBS_STREAM, ORDER_STREAM = 0, 1, 2


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The global RNG's seed at training step ``step`` on ``rank`` (flip, PGD start)."""
    return mix(seed, STEP_STREAM, step, rank)


def rbs_seed(seed: int, step: int, rank: int | None = None) -> int:
    """Seed of step ``step``'s RBS generator. Batch mode passes no rank, so every rank draws the
    same shuffle; image mode passes its rank."""
    return mix(seed, RBS_STREAM, step, 0 if rank is None else rank + 1)

