"""Random Block Shuffle, RBS(x, k): the transform RLFAT trains on.

Each axis is cut at k-1 split points drawn uniformly at random (integers, independently, so
repeats are allowed) in [0, size). With 0 and the size added and everything sorted, that gives k
blocks of random, unequal sizes; a block may be empty. The row blocks are put in a random order,
then the column blocks. Inside a block, rows and columns keep their order.

``"batch"`` is the official code's behaviour: one draw serves the whole batch. With k=2 about 27%
of batches come back unchanged (each axis keeps its order half the time, and an empty block also
leaves it as it was). ``"image"`` gives every image its own draw, so a batch sees many shuffles
per step instead of one; it is vectorised, with no Python loop over images.

``exclude_identity=True`` samples from the same distribution conditioned on the pixel mapping not
being the identity: a draw whose mapping leaves every pixel in place is thrown away and drawn
again (per image in ``"image"`` mode). Split points may still coincide or sit at 0, so blocks may
still be empty; only the unchanged outcome is excluded. When no shuffle can move a pixel (k=1,
or H=W=1) the input comes back unchanged. An image whose pixel values happen to repeat (a flat
image, say) can still look unchanged although its pixels moved.

Randomness is drawn on the generator's device (the CPU for the global RNG), then the indices
move to ``x``'s device, so a seed gives the same shuffle on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from robench.errors import UserError

MODES = ("batch", "image")


class RBSPlan(NamedTuple):
    """One draw of RBS. Split tensors hold the k+1 block boundaries, from 0 to the axis size;
    ``order[j]`` is the source block shown at output slot j."""

    row_splits: torch.Tensor
    row_order: torch.Tensor
    col_splits: torch.Tensor
    col_order: torch.Tensor


def _check(k: int, mode: str = "batch") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"RBS k must be an integer >= 1, got {k!r}")
    if mode not in MODES:
        raise UserError(f"unknown RBS mode {mode!r}; choose one of: {', '.join(MODES)}")


def _draw_axis(n: int, size: int, k: int, generator: torch.Generator | None):
    """n draws for one axis: sorted inner split points (n, k-1), the output slot of each source
    block (n, k), and the gather index (n, size): output position p shows source index[:, p]."""
    device = generator.device if generator is not None else torch.device("cpu")
    inner = torch.randint(0, size, (n, k - 1), generator=generator, device=device).sort(dim=1).values
    slot = torch.rand(n, k, generator=generator, device=device).argsort(dim=1)
    pos = torch.arange(size, device=device)
    # A source position's block is the number of split points at or before it (a comparison:
    # searchsorted stalls on a busy multi-threaded CPU for inputs this small).
    block = (pos[None, :, None] >= inner[:, None, :]).sum(dim=2)
    # Sorting by (output slot, source position) lays the blocks out in their new order while
    # each block stays contiguous and in order; empty blocks simply contribute nothing.
    index = (slot.gather(1, block) * size + pos).argsort(dim=1)
    return inner, slot, index


def _draw(n: int, h: int, w: int, k: int, generator: torch.Generator | None, exclude_identity: bool):
    """n independent draws, stacked: (row inner, row slot, row index, same for columns)."""
    drawn = [*_draw_axis(n, h, k, generator), *_draw_axis(n, w, k, generator)]
    if exclude_identity and k > 1 and max(h, w) > 1:
        rows, cols = torch.arange(h, device=drawn[2].device), torch.arange(w, device=drawn[2].device)
        # On an axis of size >= 2 a split lands inside with probability >= 1/2, and then the
        # order moves a pixel with probability >= 1/2: each round keeps a draw with probability
        # >= 1/4, so a handful of rounds suffice even for large batches.
        while True:
            same = (drawn[2] == rows).all(dim=1) & (drawn[5] == cols).all(dim=1)
            if not bool(same.any()):
                break
            redrawn = _draw(int(same.sum()), h, w, k, generator, False)
            for t, new in zip(drawn, redrawn):
                t[same] = new
    return drawn


def rbs_plan(
    h: int, w: int, k: int = 2, exclude_identity: bool = False, generator: torch.Generator | None = None
) -> RBSPlan:
    """The block structure of one RBS draw for an h x w image (what Figure 1 illustrates).

    With the same generator state it is exactly the plan ``rbs(..., mode="batch")`` applies.
    """
    _check(k)
    ri, rslot, _, ci, cslot, _ = (t[0] for t in _draw(1, h, w, k, generator, exclude_identity))

    def bounds(inner: torch.Tensor, size: int) -> torch.Tensor:
        return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), size)])

    return RBSPlan(bounds(ri, h), rslot.argsort(), bounds(ci, w), cslot.argsort())


def rbs(
    x: torch.Tensor,
    k: int = 2,
    mode: str = "batch",
    exclude_identity: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random Block Shuffle of a batch ``x`` of shape (B, C, H, W); returns a new tensor.

    ``mode="batch"`` is the paper's official behaviour (one random shuffle for the whole batch);
    ``mode="image"`` draws a shuffle per image, a vectorised option for more variety per step.
    See the module docstring for ``exclude_identity``. Differentiable: it is a gather.
    """
    _check(k, mode)
    if x.dim() < (3 if mode == "image" else 2):
        raise ValueError(f"rbs expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if k == 1:
        return x.clone()
    h, w = x.shape[-2:]
    n = x.shape[0] if mode == "image" else 1
    _, _, ri, _, _, ci = _draw(n, h, w, k, generator, exclude_identity)
    # One gather over the flattened H*W plane moves rows and columns in a single copy (faster
    # on CPU than index_select or two passes); batch mode is the n=1 case.
    flat = (ri[:, :, None] * w + ci[:, None, :]).reshape(n, 1, h * w).to(x.device)
    planes = x.reshape(n, -1, h * w)
    return planes.gather(2, flat.expand_as(planes)).reshape(x.shape)
