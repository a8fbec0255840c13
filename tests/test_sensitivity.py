import numpy as np
import pytest
import torch
from torch import nn

from robench.errors import UserError
from robench.sensitivity import (
    PAPER_POINTS,
    SWEEPS,
    TRANSFORMS,
    brightness,
    gamma,
    hsv_to_rgb,
    loss_sensitivity,
    rgb_to_hsv,
    sensitivity_curve,
)

skcolor = pytest.importorskip("skimage.color")


def _sk_brightness(x: np.ndarray, alpha: float) -> np.ndarray:
    """The official utils.brightness, applied per image in NHWC."""
    out = []
    for xi in x.transpose(0, 2, 3, 1):
        hsv = skcolor.rgb2hsv(xi)
        hsv[:, :, 2] = np.clip(hsv[:, :, 2] + alpha, 0, 1)
        out.append(np.clip(skcolor.hsv2rgb(hsv), 0, 1))
    return np.stack(out).transpose(0, 3, 1, 2)


def _edge_images() -> np.ndarray:
    """One (1, 3, 4, 4) image of hand-picked pixels: greys, black, white, primaries, ties, wrap."""
    pixels = [
        (0.0, 0.0, 0.0),  # black
        (1.0, 1.0, 1.0),  # white
        (0.5, 0.5, 0.5),  # grey, S = 0
        (0.2, 0.2, 0.2),
        (1.0, 0.0, 0.0),  # primaries
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 1.0, 0.0),  # ties for the max: yellow, cyan, magenta
        (0.0, 1.0, 1.0),
        (1.0, 0.0, 1.0),
        (0.9, 0.1, 0.5),  # red max with B > G: hue wraps below 0
        (1.0, 0.0, 1e-6),  # hue just under 1
        (0.3, 0.3, 0.1),  # tie at a non-saturated max
        (0.01, 0.0, 0.0),  # very dark colour
        (0.95, 0.9, 0.99),
        (0.5, 0.25, 0.5),
    ]
    return np.array(pixels, dtype=np.float64).T.reshape(1, 3, 4, 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hsv_roundtrip_matches_skimage(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random((4, 3, 5, 6)).reshape(-1), _edge_images().reshape(-1)])
    x = x[: (x.size // 3) * 3].reshape(1, 3, 1, -1).astype(dtype)
    ours = rgb_to_hsv(torch.from_numpy(x)).numpy()
    ref = skcolor.rgb2hsv(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    back = hsv_to_rgb(torch.from_numpy(ref.astype(dtype))).numpy()
    ref_back = skcolor.hsv2rgb(ref.astype(dtype).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(back, ref_back, atol=1e-5)
    np.testing.assert_allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("alpha", [-0.5, -0.15, 0.0, 0.15, 0.5, 1.2])
@pytest.mark.parametrize("which", ["random", "edge"])
def test_brightness_matches_skimage(alpha, which):
    if which == "random":
        x = np.random.default_rng(1).random((3, 3, 6, 5))
    else:
        x = _edge_images()
    ours = brightness(torch.from_numpy(x), alpha).numpy()
    np.testing.assert_allclose(ours, _sk_brightness(x, alpha), atol=1e-5)
    ours32 = brightness(torch.from_numpy(x.astype(np.float32)), alpha).numpy()
    np.testing.assert_allclose(ours32, _sk_brightness(x, alpha), atol=1e-5)


def test_brightness_single_channel_is_clipped_shift():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for alpha in (-0.15, 0.15, 0.7):
        torch.testing.assert_close(brightness(x, alpha), (x + alpha).clamp(0, 1), rtol=0, atol=0)
        # Same as the RGB recipe on the grey image replicated to three channels.
        rgb = brightness(x.expand(-1, 3, -1, -1), alpha)
        torch.testing.assert_close(rgb, (x + alpha).clamp(0, 1).expand(-1, 3, -1, -1), atol=1e-6, rtol=0)


def test_brightness_rejects_other_channel_counts():
    with pytest.raises(ValueError):
        brightness(torch.rand(1, 2, 4, 4), 0.1)


def test_gamma_exact():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    for g in (0.8, 1.0, 1.2):
        assert torch.equal(gamma(x, g), x**g)
    with pytest.raises(UserError):
        gamma(x, 0.0)


def test_registry_and_defaults():
    assert set(TRANSFORMS) == {"brightness", "gamma"} == set(PAPER_POINTS) == set(SWEEPS)
    for name, points in PAPER_POINTS.items():
        assert all(p in SWEEPS[name] for p in points)
    assert len(SWEEPS["brightness"]) == len(SWEEPS["gamma"]) == 13


def _linear_model(c: int = 3, hw: int = 4, k: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, k)).double()


def _data(n: int = 10, c: int = 3, hw: int = 4, k: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, c, hw, hw, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("transform,value", [("brightness", 0.15), ("brightness", -0.15), ("gamma", 0.8)])
def test_loss_sensitivity_matches_hand_gradient(transform, value):
    model = _linear_model()
    x, y = _data()
    lin = model[1]
    xt = TRANSFORMS[transform](x, value).flatten(1)
    p = torch.softmax(xt @ lin.weight.T + lin.bias, dim=1)
    grad = (p - nn.functional.one_hot(y, 5).double()) @ lin.weight  # W^T (softmax(z) - onehot(y))
    expected = grad.norm(dim=1)
    got = loss_sensitivity(model, x, y, transform, value, batch_size=4)
    assert got.shape == (10,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_loss_sensitivity_batch_invariant_and_clean():
    model = _linear_model()
    x, y = _data(n=13)
    results = [loss_sensitivity(model, x, y, "brightness", 0.15, batch_size=b) for b in (1, 5, 256)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-10, rtol=0)
    assert all(p.grad is None for p in model.parameters())


def test_loss_sensitivity_restores_modes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Dropout(0.5), nn.Linear(8, 5)).double()
    model.train()
    model[2].eval()  # a mixed state must survive
    x, y = _data()
    a = loss_sensitivity(model, x, y, "gamma", 1.2)
    b = loss_sensitivity(model, x, y, "gamma", 1.2)
    torch.testing.assert_close(a, b)  # eval mode: dropout off, deterministic
    assert model.training and model[1].training and not model[2].training


def test_unknown_transform_and_curve():
    model = _linear_model()
    x, y = _data()
    with pytest.raises(UserError):
        loss_sensitivity(model, x, y, "contrast", 1.0)
    curve = sensitivity_curve(model, x, y, "gamma", values=[0.8, 1.2])
    assert [v for v, _ in curve] == [0.8, 1.2]
    expected = loss_sensitivity(model, x, y, "gamma", 0.8).mean().item()
    assert curve[0][1] == pytest.approx(expected)
