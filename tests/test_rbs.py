import itertools

import pytest
import torch

from robench.errors import UserError
from robench.rbs import MODES, rbs, rbs_plan

SIZES = [(8, 8), (7, 5), (32, 32), (3, 10)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded(b: int, h: int, w: int) -> torch.Tensor:
    """Channel 0 encodes (image, row, col) uniquely; channel 1 is unrelated noise."""
    code = torch.arange(b * h * w).reshape(b, 1, h, w)
    noise = torch.randint(-1000, 1000, (b, 1, h, w), generator=gen(99))
    return torch.cat([code, noise], dim=1)


def mapping(x: torch.Tensor, out: torch.Tensor, i: int, k: int):
    """The (row, column) source maps of image i, checked to be a k-block shuffle of x[i]."""
    h, w = x.shape[-2:]
    v = out[i, 0] - i * h * w
    rmap, cmap = v // w, v % w
    # The shuffle moves whole rows and whole columns: one source row per output row.
    assert (rmap == rmap[:, :1]).all() and (cmap == cmap[:1, :]).all()
    r, c = rmap[:, 0], cmap[0]
    for m, n in ((r, h), (c, w)):
        assert torch.equal(m.sort().values, torch.arange(n))  # a bijection
        # Each block is copied contiguously and in order, so at most k increasing runs.
        assert int((m[1:] != m[:-1] + 1).sum()) <= k - 1
    assert torch.equal(out[i], x[i][:, r][:, :, c])  # every channel moves the same way
    return r, c


def identity_rate_exact(n: int, k: int) -> float:
    """P(an axis of size n keeps every pixel in place), by enumerating all draws."""
    hits = total = 0
    for inner in itertools.product(range(n), repeat=k - 1):
        b = [0, *sorted(inner), n]
        sizes = [b[j + 1] - b[j] for j in range(k)]
        for order in itertools.permutations(range(k)):
            nonempty = [o for o in order if sizes[o] > 0]
            hits += nonempty == sorted(nonempty)
            total += 1
    return hits / total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("h,w", SIZES)
def test_output_is_block_permutation(mode, k, h, w):
    x = coded(4, h, w)
    for seed in range(3):
        out = rbs(x, k=k, mode=mode, generator=gen(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out.flatten().sort().values, x.flatten().sort().values)
        maps = [mapping(x, out, i, k) for i in range(x.shape[0])]
        if mode == "batch":
            assert all(torch.equal(r, maps[0][0]) and torch.equal(c, maps[0][1]) for r, c in maps)


def test_image_mode_gives_images_different_shuffles():
    x = coded(64, 16, 16)
    out = rbs(x, k=2, mode="image", generator=gen(0))
    maps = {tuple(torch.cat(mapping(x, out, i, 2)).tolist()) for i in range(64)}
    assert len(maps) > 32


def test_plan_is_what_batch_mode_applies():
    x = coded(2, 9, 6)
    plan = rbs_plan(9, 6, k=3, generator=gen(5))
    out = rbs(x, k=3, generator=gen(5))
    for splits, order, got in ((plan.row_splits, plan.row_order, mapping(x, out, 0, 3)[0]),
                               (plan.col_splits, plan.col_order, mapping(x, out, 0, 3)[1])):
        assert splits[0] == 0 and splits[-1] == len(got) and (splits.diff() >= 0).all()
        expect = torch.cat([torch.arange(splits[o], splits[o + 1]) for o in order])
        assert torch.equal(got, expect)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_generator_reproduces(mode):
    x = coded(8, 32, 32)
    a, b = rbs(x, mode=mode, generator=gen(1)), rbs(x, mode=mode, generator=gen(1))
    assert torch.equal(a, b)
    assert any(not torch.equal(a, rbs(x, mode=mode, generator=gen(s))) for s in range(2, 6))
    torch.manual_seed(3)
    c = rbs(x, mode=mode)
    torch.manual_seed(3)
    assert torch.equal(c, rbs(x, mode=mode))


def within(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_batch_mode_identity_rate_is_about_27_percent():
    # An axis of size n stays put if its order is kept, or if its split point is 0.
    p = (0.5 + 0.5 / 32) ** 2
    assert p == pytest.approx(identity_rate_exact(32, 2) ** 2) and 0.26 < p < 0.27
    x, g, n = coded(1, 32, 32), gen(0), 4000
    same = sum(torch.equal(rbs(x, generator=g), x) for _ in range(n))
    assert within(same / n, p, n)


@pytest.mark.parametrize("h,w,k", [(3, 5, 2), (4, 3, 3), (2, 6, 4)])
def test_image_mode_identity_rate_matches_enumeration(h, w, k):
    p, n = identity_rate_exact(h, k) * identity_rate_exact(w, k), 10000
    x = coded(n, h, w)
    out = rbs(x, k=k, mode="image", generator=gen(1))
    assert within((out == x).flatten(1).all(dim=1).float().mean().item(), p, n)


@pytest.mark.parametrize("h,w", [(2, 2), (1, 3), (2, 1), (32, 32), (7, 5)])
@pytest.mark.parametrize("k", [2, 5])
def test_exclude_identity_never_returns_input(h, w, k):
    x = coded(500, h, w)
    out = rbs(x, k=k, mode="image", exclude_identity=True, generator=gen(k))
    assert not (out == x).flatten(1).all(dim=1).any()
    x1, g = coded(1, h, w), gen(7)
    assert not any(torch.equal(rbs(x1, k=k, exclude_identity=True, generator=g), x1) for _ in range(20))


def test_exclude_identity_is_the_conditioned_distribution():
    # 2x2, k=2: each axis stays put with probability 3/4, so given a change the rows moved with
    # probability (1/4) / (1 - 9/16) = 4/7 (forcing a change on rows would give 1 instead).
    x = coded(6000, 2, 2)
    out = rbs(x, k=2, mode="image", exclude_identity=True, generator=gen(0))
    rows_moved = (out[:, 0, :, 0] // 2 != torch.arange(2) + 2 * torch.arange(6000)[:, None]).any(dim=1)
    assert rows_moved.float().mean().item() == pytest.approx(4 / 7, abs=0.03)


def test_identity_when_nothing_can_move():
    x = coded(3, 4, 4)
    for mode in MODES:
        assert torch.equal(rbs(x, k=1, mode=mode, exclude_identity=True), x)
        out = rbs(x, k=1, mode=mode)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        one = coded(3, 1, 1)
        assert torch.equal(rbs(one, k=4, mode=mode, exclude_identity=True), one)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_k_raises(bad):
    with pytest.raises(UserError, match=">= 1"):
        rbs(torch.zeros(1, 1, 4, 4), k=bad)
    with pytest.raises(UserError):
        rbs_plan(4, 4, k=bad)


def test_bad_mode_raises():
    with pytest.raises(UserError, match="batch, image"):
        rbs(torch.zeros(1, 1, 4, 4), mode="pixel")


@pytest.mark.parametrize("mode", MODES)
def test_gradient_flows_back_as_the_inverse_permutation(mode):
    x = torch.randn(4, 3, 7, 5, requires_grad=True)
    out = rbs(x, k=3, mode=mode, generator=gen(2))
    out.sum().backward()
    assert x.grad.sum().item() == x.numel() and torch.equal(x.grad, torch.ones_like(x))
    x.grad = None
    wt = torch.randn_like(x)
    (rbs(x, k=3, mode=mode, generator=gen(2)) * wt).sum().backward()
    # The same draw applied to the gradient puts each weight back where it was used.
    assert torch.equal(rbs(x.grad, k=3, mode=mode, generator=gen(2)), wt)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_any_dtype(dtype, mode):
    x = coded(3, 6, 4)
    out = rbs(x.to(dtype), k=3, mode=mode, generator=gen(1))
    assert out.dtype == dtype
    assert torch.equal(out, rbs(x, k=3, mode=mode, generator=gen(1)).to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu_for_a_seed(mode):
    x = coded(5, 9, 7)
    out = rbs(x.cuda(), k=3, mode=mode, exclude_identity=True, generator=gen(4))
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), rbs(x, k=3, mode=mode, exclude_identity=True, generator=gen(4)))
    g = torch.Generator(device="cuda").manual_seed(0)
    mapping(x, rbs(x.cuda(), k=3, mode=mode, generator=g).cpu(), 0, 3)
