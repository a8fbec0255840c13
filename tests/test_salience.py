import pytest
import torch
from PIL import Image
from torch import nn

from robench.salience import salience_grid, smoothgrad


def _model(c: int = 1, hw: int = 8, k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, 16), nn.Tanh(), nn.Linear(16, k))


def _data(n: int = 3, c: int = 1, hw: int = 8, k: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, c, hw, hw, generator=g), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("c", [1, 3])
def test_shape_range_and_seed(c):
    model = _model(c)
    x, y = _data(c=c)
    a = smoothgrad(model, x, y, n_samples=8, batch_size=16, seed=3)
    assert a.shape == (3, 8, 8)
    assert a.min() >= 0 and a.max() <= 1 and a.max() == 1
    b = smoothgrad(model, x, y, n_samples=8, batch_size=16, seed=3)
    assert torch.equal(a, b)
    c2 = smoothgrad(model, x, y, n_samples=8, batch_size=16, seed=4)
    assert not torch.equal(a, c2)


def test_caller_rng_and_model_state_untouched():
    model = _model()
    model.train()
    x, y = _data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    smoothgrad(model, x, y, n_samples=4, reduce="max", percentile=100)
    assert torch.equal(torch.rand(3), expected)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_salience_concentrates_on_the_only_used_patch():
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        mask = torch.zeros(8, 8)
        mask[:2, :2] = 1
        lin.weight.mul_(mask.flatten())
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = _data(n=4)
    maps = smoothgrad(model, x, y, n_samples=4, batch_size=8)
    inside = maps[:, :2, :2].sum()
    assert inside / maps.sum() > 0.99
    assert (maps[:, :2, :2] > 0).any(dim=(1, 2)).all()


def test_grid_png(tmp_path):
    x, y = _data(n=3, c=3)
    maps = {"PGDAT": torch.rand(3, 8, 8), "RLFAT-T": torch.rand(3, 8, 8)}
    out = salience_grid(x, maps, tmp_path / "fig" / "salience.png", titles=["a", "b", "c"], dpi=50)
    assert out.exists()
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    # 3 columns x 3 rows of 1.5-inch cells at 50 dpi: about 225 x 225 pixels.
    assert 150 <= w <= 300 and 150 <= h <= 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["salience.png"]

    grey, _ = _data(n=2, c=1)
    salience_grid(grey, {"TRADES": torch.rand(2, 8, 8)}, out, dpi=50)  # overwrite in place
    with Image.open(out) as im:
        assert im.size[1] < h
    assert sorted(p.name for p in out.parent.iterdir()) == ["salience.png"]


def test_grid_rejects_mismatched_maps(tmp_path):
    x, _ = _data(n=3)
    with pytest.raises(ValueError):
        salience_grid(x, {"PGDAT": torch.rand(2, 8, 8)}, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []
