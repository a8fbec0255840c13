"""SmoothGrad salience maps (RLFAT Figure 3) via captum's NoiseTunnel, and the figure grid.

The official code has no SmoothGrad, only a visualiser, ``utils.save_as_gray_image``, which is the
PAIR ``saliency`` library's ``VisualizeImageGrayscale``: sum of |gradient| over channels, then
scale to [0, 1] between the map's minimum and its 99th percentile, clipping above. We follow that
library's SmoothGrad (Smilkov et al., 2017) by default:

- each noisy sample contributes the *signed* gradient of the target-class logit; the average is
  taken first and the absolute value after (``abs_samples=True`` instead averages |gradient|, which
  is captum's ``Saliency`` default);
- noise is N(0, stdev^2) with stdev = 0.15 x (input range); inputs live in [0, 1], so
  ``stdev=0.15`` is in pixel units;
- channels are reduced by the sum of absolute values (``reduce="max"`` takes the max instead), and
  each map is normalised to [0, 1] by its min and ``percentile``-th percentile (100 = plain min-max).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from robench import atomic
from robench.data import load_dataset
from robench.errors import UserError
from robench.runtime import Runtime, model_mode
from robench.targets import find_sources


def _normalise(maps: torch.Tensor, percentile: float) -> torch.Tensor:
    flat = maps.flatten(1)
    lo = flat.amin(dim=1)
    hi = torch.quantile(flat, percentile / 100.0, dim=1) if percentile < 100 else flat.amax(dim=1)
    span = (hi - lo).view(-1, 1, 1)
    out = (maps - lo.view(-1, 1, 1)) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out)).clamp(0.0, 1.0)


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_samples: int = 50,
    stdev: float = 0.15,
    batch_size: int = 50,
    seed: int = 0,
    *,
    abs_samples: bool = False,
    reduce: str = "sum",
    percentile: float = 99.0,
) -> torch.Tensor:
    """SmoothGrad maps of ``x`` (B, C, H, W) in [0, 1] for classes ``y``, as (B, H, W) in [0, 1].

    ``batch_size`` caps the forward batch (images x noise samples). The global RNG is seeded with
    ``seed`` inside ``torch.random.fork_rng``, so the call is reproducible and leaves the caller's
    RNG state untouched; results depend on ``batch_size`` only through the order of noise draws.
    """
    from captum.attr import NoiseTunnel, Saliency

    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    if n_samples < 1 or batch_size < 1:
        raise ValueError("n_samples and batch_size must be >= 1")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x (B, C, H, W) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")

    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    samples_per_pass = min(n_samples, batch_size)
    images_per_pass = max(1, batch_size // samples_per_pass)
    tunnel = NoiseTunnel(Saliency(model))
    cuda = [device.index or 0] if device.type == "cuda" else []
    chunks = []
    with model_mode(model), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in range(0, x.shape[0], images_per_pass):
            xb = x[start : start + images_per_pass].to(device)
            yb = y[start : start + images_per_pass].to(device)
            grads = tunnel.attribute(
                xb,
                nt_type="smoothgrad",
                nt_samples=n_samples,
                nt_samples_batch_size=samples_per_pass,
                stdevs=float(stdev),
                target=yb,
                abs=abs_samples,
            )
            grads = grads.detach().abs()
            chunks.append((grads.sum(dim=1) if reduce == "sum" else grads.amax(dim=1)).cpu())
    return _normalise(torch.cat(chunks).float(), percentile)


def salience_grid(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    path: Path | str,
    titles: Sequence[str] | None = None,
    cell_inches: float = 1.5,
    dpi: int = 100,
) -> Path:
    """Write a PNG like the paper's Figure 3: column 0 the inputs, then one column per defense.

    ``images`` is (N, C, H, W) in [0, 1] (C = 1 shown in grey, C = 3 as RGB); each ``maps`` value
    is (N, H', W') in [0, 1]. ``titles`` label the rows (e.g. class names). The file is written to
    a temporary name in the same directory, then moved into place, so a crash leaves no half PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n = images.shape[0]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    for name, m in maps.items():
        if m.dim() != 3 or m.shape[0] != n:
            raise ValueError(f"map {name!r} must be ({n}, H, W), got {tuple(m.shape)}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")

    cols = 1 + len(maps)
    fig = Figure(figsize=(cols * cell_inches, max(n, 1) * cell_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(n, 1), cols, squeeze=False)
    columns = [("input", None)] + list(maps.items())
    for i in range(n):
        img = images[i].detach().cpu().float().clamp(0, 1)
        for j, (name, m) in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if m is None:
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
                if titles is not None:
                    ax.set_ylabel(str(titles[i]), fontsize=8)
            else:
                ax.imshow(m[i].detach().cpu().float().numpy(), cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


SALIENCE_DIR = "salience"


def run_salience(defenses: list[str], workdir: Path, runtime: Runtime, dataset: str | None = None,
                 data_dir: Path | None = None, n_images: int = 6, n_samples: int = 50, stdev: float = 0.15,
                 seed: int = 0) -> Path:
    """SmoothGrad maps of the same test images for every defense, as the paper's Figure 3."""
    sources = find_sources(defenses, workdir, dataset)
    datasets = sorted({source.dataset for source in sources})
    if len(datasets) != 1:
        raise UserError(f"salience compares defenses on one dataset; these span {', '.join(datasets)}: pass --dataset")
    ds = datasets[0]
    splits = load_dataset(ds, data_dir)
    if not 0 < n_images <= len(splits.x_test):
        raise UserError(f"--n-images must be in 1..{len(splits.x_test)}")
    # One image per class first, so the grid shows variety.
    picks = [int((splits.y_test == c).nonzero()[0]) for c in range(splits.num_classes)
             if (splits.y_test == c).any()][:n_images]
    idx = torch.tensor(picks)
    x, y = splits.x_test[idx], splits.y_test[idx]
    maps = {}
    for source in sources:
        target = source.load(splits)
        model = runtime.prepare(target.model).eval()
        maps[target.label] = smoothgrad(model, runtime.batch(x), y.to(runtime.device), n_samples=n_samples,
                                        stdev=stdev, seed=seed).cpu()
    out_dir = Path(workdir) / SALIENCE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"images": x.contiguous(), "labels": y.contiguous(), **{f"map/{k}": v.contiguous() for k, v in maps.items()}}
    atomic.write_with(out_dir / f"{ds}.safetensors", lambda p: save_file(tensors, str(p)))
    titles = [splits.classes[int(c)] for c in y]
    png = out_dir / f"{ds}.png"
    salience_grid(x, maps, png, titles=titles)
    return png
