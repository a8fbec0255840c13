"""Figures for the report: line and grouped-bar panels, the paper's Figure 1 (RBS), salience files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from safetensors import SafetensorError, safe_open

from robench import atomic
from robench.rbs import rbs, rbs_plan
from robench.salience import SALIENCE_DIR

# Everything uses matplotlib's object API (``Figure``), never ``pyplot``, so no global state or
# display backend is involved; each PNG is written atomically (temp file, then rename), so a
# crash never leaves half a figure.
DPI = 110


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends in .tmp, so the format must be named explicitly.
    atomic.write_with(path, lambda p: fig.savefig(p, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def _grid(n_panels: int, ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, -(-n_panels // ncols))
    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


@dataclass
class LinePanel:
    """One subplot: a line per label, each a list of (x, y) points."""

    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    ylim: tuple[float, float] | None = None


def lines_figure(panels: Sequence[LinePanel], path: Path | str, colors: Mapping[str, str] | None = None,
                 ncols: int = 2, suptitle: str | None = None) -> Path:
    """Line plots, one panel each, with a legend per panel."""
    fig, axes = _grid(len(panels), ncols)
    for ax, panel in zip(axes, panels):
        for label, points in panel.lines.items():
            xs, ys = zip(*sorted(points)) if points else ((), ())
            ax.plot(xs, ys, marker="o", markersize=3, label=label, color=(colors or {}).get(label))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if panel.lines:
            ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save_figure(fig, path)


@dataclass
class BarPanel:
    """One subplot of grouped bars: ``series[name][i]`` is the bar of ``name`` in group i."""

    title: str
    ylabel: str
    groups: list[str]
    series: dict[str, list[float | None]]  # None: not measured (no bar, labelled "n/a")


def bars_figure(panels: Sequence[BarPanel], path: Path | str, ncols: int = 2) -> Path:
    """Grouped bar charts with the value printed on each bar."""
    fig, axes = _grid(len(panels), ncols, width=5.5)
    for ax, panel in zip(axes, panels):
        x = np.arange(len(panel.groups))
        width = 0.8 / max(len(panel.series), 1)
        for i, (name, values) in enumerate(panel.series.items()):
            heights = [0.0 if v is None else v for v in values]
            bars = ax.bar(x + (i - (len(panel.series) - 1) / 2) * width, heights, width, label=name)
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in values], fontsize=7)
        ax.set_xticks(x, panel.groups, rotation=20)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# -- Figure 1: Random Block Shuffle ------------------------------------------------------------

def _blocks(splits: torch.Tensor) -> list[tuple[int, int]]:
    s = splits.tolist()
    return [(s[i], s[i + 1]) for i in range(len(s) - 1)]


def shuffled_layout(splits: torch.Tensor, order: torch.Tensor) -> list[tuple[int, int]]:
    """Where each source block lands after the shuffle, as (start, end) per source block.

    Output slot j shows source block ``order[j]``; slots are laid out one after another.
    """
    blocks = _blocks(splits)
    out: list[tuple[int, int]] = [(0, 0)] * len(blocks)
    start = 0
    for src in order.tolist():
        size = blocks[src][1] - blocks[src][0]
        out[src] = (start, start + size)
        start += size
    return out


def _show(ax, image: torch.Tensor, title: str) -> None:
    img = image.detach().cpu().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _outline(ax, rows: list[tuple[int, int]], cols: list[tuple[int, int]], colors: list) -> None:
    """Tint and outline block (i, j) in colour i * len(cols) + j; empty blocks are skipped."""
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            if r1 <= r0 or c1 <= c0:
                continue
            color = colors[(i * len(cols) + j) % len(colors)]
            box = dict(xy=(c0 - 0.5, r0 - 0.5), width=c1 - c0, height=r1 - r0)
            ax.add_patch(Rectangle(**box, facecolor=color, alpha=0.35, edgecolor="none"))
            ax.add_patch(Rectangle(**box, fill=False, edgecolor=color, linewidth=2.5))
            # The source block's number, so the eye can follow it to its new place.
            ax.text((c0 + c1 - 1) / 2, (r0 + r1 - 1) / 2, str(i * len(cols) + j + 1), color="white",
                    ha="center", va="center", fontsize=12, fontweight="bold",
                    bbox=dict(boxstyle="round", facecolor=color, alpha=0.8, edgecolor="none"))


def rbs_figure(image: torch.Tensor, path: Path | str, k: int = 2, seed: int = 0) -> Path:
    """The paper's Figure 1 for one (C, H, W) image in [0, 1]: the original, its RBS blocks
    (each source block tinted in its own colour), and the shuffled image with each block's colour
    following it to its new place. Shuffle and plan come from the same seeded generator state,
    so they describe the same draw."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (1|3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[1:]
    plan = rbs_plan(h, w, k, generator=torch.Generator().manual_seed(seed))
    shuffled = rbs(image[None].cpu(), k, mode="batch", generator=torch.Generator().manual_seed(seed))[0]
    colors = [f"C{i}" for i in range(10)]
    fig = Figure(figsize=(9, 3.3))
    axes = fig.subplots(1, 3)
    _show(axes[0], image, "original")
    _show(axes[1], image, f"blocks (k = {k})")
    _outline(axes[1], _blocks(plan.row_splits), _blocks(plan.col_splits), colors)
    _show(axes[2], shuffled, "RBS(x): blocks shuffled")
    _outline(axes[2], shuffled_layout(plan.row_splits, plan.row_order),
             shuffled_layout(plan.col_splits, plan.col_order), colors)
    fig.suptitle(f"Random Block Shuffle (row order {plan.row_order.tolist()}, "
                 f"column order {plan.col_order.tolist()})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# -- what ``robench salience`` stored -------------------------------------------------------------

def salience_png(workdir: Path | str, dataset: str) -> Path:
    return Path(workdir) / SALIENCE_DIR / f"{dataset}.png"


def salience_image(workdir: Path | str, dataset: str) -> torch.Tensor | None:
    """The first image (C, H, W) of ``salience/<dataset>.safetensors``, the tensors ``robench
    salience`` stores beside its figure; None when there is none (or it cannot be read)."""
    path = Path(workdir) / SALIENCE_DIR / f"{dataset}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if "images" not in f.keys():
                return None
            images = f.get_tensor("images")
    except (OSError, SafetensorError):
        return None
    return images[0] if images.dim() == 4 and len(images) else None
