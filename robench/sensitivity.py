"""Loss sensitivity under brightness and gamma shifts (RLFAT §4.3, Table 2).

l(alpha) = mean_i ||grad_x CE(F(T(x_i)), y_i)||_2, the gradient taken at the transformed point T(x_i),
i.e. at the input the model actually sees.

Gradient normalisation: each example's gradient is the gradient of its *own* CE loss. We sum the
per-example losses (``reduction="sum"``) before differentiating, so example i's input gradient is
d CE_i / d x_i, not divided by the batch size; the number therefore does not depend on how the data
is batched. This is what the official code does too: ``run_smooth_test.py`` differentiates
``model.xent``, which is ``tf.reduce_sum`` of the per-example CE, sums the per-example L2 norms and
divides by the number of examples. (A mean loss would shrink every norm by 1/batch = 1/100 there,
far below the paper's CIFAR magnitudes of about 0.5-4.)

Brightness follows the official ``utils.brightness`` (scikit-image): RGB -> HSV, V += alpha, clip V,
HSV -> RGB, clip. The conversions below are a vectorised torch port of scikit-image's
``rgb2hsv``/``hsv2rgb`` (same formulas, same tie-breaking), so no numpy round trip is needed.
Since V = max(R, G, B) and H, S are kept, the shift rescales all three channels by V'/V; a black
pixel (V = 0) becomes the grey (alpha, alpha, alpha) clipped to [0, 1].
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robench import checkpoint
from robench.data import Splits, load_dataset
from robench.errors import UserError
from robench.runtime import Runtime, model_mode
from robench.store import Examples, Key, Row, Store, mean_ci, now, split_digest
from robench.targets import Target, find_sources


def _channels(x: torch.Tensor) -> int:
    if x.dim() < 3 or x.shape[-3] not in (1, 3):
        raise ValueError(f"expected images shaped (..., C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    return x.shape[-3]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> HSV with H, S, V in [0, 1]; matches ``skimage.color.rgb2hsv``."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) RGB images, got {tuple(x.shape)}")
    r, g, b = x.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    # v == 0 implies delta == 0, so the guard below never hides a real division.
    s = torch.where(grey, torch.zeros_like(delta), delta / torch.where(v == 0, torch.ones_like(v), v))
    # scikit-image assigns red, then green, then blue: on ties the later channel wins.
    h = torch.where(
        b == v,
        4.0 + (r - g) / safe_delta,
        torch.where(g == v, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta),
    )
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(grey, torch.zeros_like(h), h)
    return torch.stack((h, s, v), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) HSV -> RGB; matches ``skimage.color.hsv2rgb``."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) HSV images, got {tuple(x.shape)}")
    h, s, v = x.unbind(-3)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.long() % 6
    # The six hue sectors, each an (R, G, B) triple, exactly as scikit-image's np.choose table.
    table = torch.stack(
        [
            torch.stack(c, dim=0)
            for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
        ],
        dim=0,
    )  # (6, 3, ..., H, W)
    index = sector.unsqueeze(0).unsqueeze(0).expand(1, 3, *sector.shape)
    rgb = table.gather(0, index).squeeze(0)  # (3, ..., H, W)
    return rgb.movedim(0, -3)


def brightness(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shift HSV value by ``alpha`` (the official ``utils.brightness``), images in [0, 1].

    RGB (..., 3, H, W): RGB -> HSV, V = clip(V + alpha, 0, 1), HSV -> RGB, clip to [0, 1].
    Greyscale (..., 1, H, W): a grey pixel has S = 0 and V = its value, so the same recipe reduces
    exactly to ``clip(x + alpha, 0, 1)``; that is what we compute, without a fake RGB round trip.
    """
    if _channels(x) == 1:
        return (x + alpha).clamp(0.0, 1.0)
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(-3)
    hsv = torch.stack((h, s, (v + alpha).clamp(0.0, 1.0)), dim=-3)
    return hsv_to_rgb(hsv).clamp(0.0, 1.0)


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    """Gamma shift ``x ** g`` for images in [0, 1] (from the paper; the official code has none)."""
    if not g > 0:
        raise UserError(f"gamma must be > 0, got {g}")
    return x**g


TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "brightness": brightness,
    "gamma": gamma,
}

# The two points of the paper's Table 2: l(-0.15)/l(0.15) and l(0.8)/l(1.2).
PAPER_POINTS: dict[str, tuple[float, float]] = {
    "brightness": (-0.15, 0.15),
    "gamma": (0.8, 1.2),
}

# Default curves (13 evenly spaced points each; both include the paper's points and the identity).
SWEEPS: dict[str, tuple[float, ...]] = {
    "brightness": tuple(round(-0.3 + 0.05 * i, 4) for i in range(13)),
    "gamma": tuple(round(0.4 + 0.1 * i, 4) for i in range(13)),
}


def get_transform(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    if name not in TRANSFORMS:
        raise UserError(f"unknown transform {name!r}; choose from: {', '.join(sorted(TRANSFORMS))}")
    return TRANSFORMS[name]


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def loss_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    transform: str,
    value: float,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-example ||grad_x CE(F(T(x_i)), y_i)||_2 as a 1-D CPU tensor; its mean is l(value).

    The gradient is taken w.r.t. the transformed input T(x_i) and is each example's own CE gradient
    (summed losses, no 1/batch factor), so the result does not depend on ``batch_size``. The model
    runs in eval mode (restored afterwards); no parameter ``.grad`` is touched.
    """
    fn = get_transform(transform)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    device = _device_of(model, x.device)
    norms = []
    with model_mode(model), torch.enable_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            xt = fn(xb, value).detach().requires_grad_(True)
            loss = F.cross_entropy(model(xt), yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xt)
            norms.append(grad.flatten(1).norm(p=2, dim=1).detach().cpu())
    if not norms:
        return torch.zeros(0)
    return torch.cat(norms)


def sensitivity_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    transform: str,
    values: Sequence[float] | None = None,
    batch_size: int = 256,
) -> list[tuple[float, float]]:
    """[(value, l(value)), ...] over ``values`` (default: ``SWEEPS[transform]``)."""
    get_transform(transform)
    points = SWEEPS[transform] if values is None else tuple(values)
    return [
        (float(v), loss_sensitivity(model, x, y, transform, v, batch_size).mean().item())
        for v in points
    ]


def _check_n(n: int | None, total: int, dataset: str) -> int:
    if n is None:
        return total
    if not 0 < n <= total:
        raise UserError(f"--n must be in 1..{total} for the {dataset} test set, got {n}")
    return n


def run_sensitivity(defenses: list[str], workdir: Path, runtime: Runtime, dataset: str | None = None,
                    data_dir: Path | None = None, n: int | None = None, sweep: bool = False,
                    batch_size: int = 256, progress: bool = True, splits: Splits | None = None) -> list[Row]:
    """l(value) = mean_i ||grad_x CE(F; T(x_i), y_i)||_2 at the paper's points (and a sweep),
    on the first ``n`` test images. ``splits``: the data of runs on dataset ``splits.name``, as
    the caller holds it (e.g. ``robench.data.balanced_test``); the key's split digest tells
    such rows apart from those on the loader's own order. Runs on other datasets load theirs."""
    sources = find_sources(defenses, workdir, dataset)
    points = {name: sorted(set(PAPER_POINTS[name]) | (set(SWEEPS[name]) if sweep else set()))
              for name in PAPER_POINTS}
    rows = []
    with Store.in_workdir(workdir) as store:
        for source in sources:
            ds = source.dataset
            data = splits if splits is not None and splits.name == ds else load_dataset(ds, data_dir)
            count = _check_n(n, len(data.x_test), ds)
            rows += measure(source.load(data), data, count, store, runtime, points, batch_size, progress)
    return rows


def measure(target: Target, data: Splits, count: int, store: Store, runtime: Runtime,
            points: dict[str, list[float]] | None = None, batch_size: int = 256, progress: bool = True,
            digest: str | None = None) -> list[Row]:
    """The loss sensitivity of one target at ``points`` (default: the paper's) on the first
    ``count`` images of ``data.x_test``; stored rows are reused. ``digest``: the split's digest,
    if the caller computed it already."""
    points = points or {name: list(values) for name, values in PAPER_POINTS.items()}
    model = runtime.prepare(target.model).eval()
    x, y = runtime.batch(data.x_test[:count]), data.y_test[:count].to(runtime.device)
    examples = Examples("test", 0, count, digest or split_digest(data.x_test, data.y_test))
    todo = [(name, float(v)) for name, values in points.items() for v in values]
    rows = []
    for name, value in tqdm(todo, desc=f"{target.label}: sensitivity", leave=False, disable=not progress):
        key = Key.make(target.sha256, data.name, examples, "sensitivity", name, {"value": value})
        row = store.get(key)
        if row is None:
            t0 = time.perf_counter()
            norms = loss_sensitivity(model, x, y, name, value, batch_size).numpy().astype(np.float32)
            row = Row(key, target.label, float(norms.mean(dtype=np.float64)), mean_ci(norms), norms,
                      time.perf_counter() - t0, checkpoint.versions(), str(runtime.device), now())
            store.put(row)
        rows.append(row)
    return rows
