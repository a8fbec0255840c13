"""What ``robench.evaluation`` accepts, checked before anything runs: the data and the model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from robench.data import Splits
from robench.errors import UserError

CUSTOM = "custom"  # the dataset name results on the user's own tensors are stored under

Data = Union[str, Splits, "tuple[torch.Tensor, torch.Tensor]", torch.utils.data.DataLoader]


def to_splits(data: Any, dataset: str | None, data_dir: str | Path | None) -> tuple[Splits, str]:
    """(the images as a Splits whose test split is evaluated, the dataset name of the result
    keys). A dataset name loads it; a Splits is used as it is; ``(x, y)`` and a DataLoader become
    a test split named ``dataset`` (default "custom")."""
    from robench.data import load_dataset
    from robench.registry import DATASETS

    if isinstance(data, str):
        DATASETS.get(data)
        if dataset is not None and dataset != data:
            raise UserError(f"data {data!r} and dataset={dataset!r} disagree; give one")
        return load_dataset(data, data_dir), data
    if data_dir is not None:
        raise UserError("data_dir= applies only when data is a dataset name")
    if isinstance(data, Splits):
        check_images(data.x_test, data.y_test)
        return data, dataset or data.name
    if isinstance(data, torch.utils.data.DataLoader):
        x, y = _from_loader(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise UserError(f"data must be a dataset name, a robench.data.Splits, a pair (x, y) of tensors or a "
                        f"DataLoader; got {type(data).__name__}")
    x, y = check_images(x, y)
    name = dataset or CUSTOM
    return Splits(name, x[:0], y[:0], x, y, []), name


def _from_loader(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise UserError("the DataLoader shuffles (shuffle=True): results are stored per example index, so the "
                        "images must come in the same order every time; pass shuffle=False")
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise UserError(f"the DataLoader must yield (images, labels) batches, got {type(batch).__name__}")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise UserError("the DataLoader yields no batches")
    return torch.cat(xs), torch.cat(ys)


def check_images(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float (N, C, H, W) in [0, 1]; y: N integer labels."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4:
        raise UserError(f"images must be a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UserError(f"images must be floats in [0, 1], got {x.dtype} (divide 8-bit images by 255)")
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise UserError(f"x holds {len(x)} images but y {len(y)} labels")
    if len(x) == 0:
        raise UserError("no images to evaluate")
    if not torch.isfinite(x).all():
        raise UserError("images hold NaN or infinite pixels")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise UserError(f"images must be in [0, 1] (the model normalises inside), got values in [{lo:.4g}, {hi:.4g}]")
    if int(y.min()) < 0:
        raise UserError(f"labels must be class indices 0..K-1, got {int(y.min())}")
    return x.detach().float().cpu().contiguous(), y.detach().long().cpu()


def check_model(model: nn.Module, splits: Splits, runtime: Any) -> Splits:
    """One forward pass on the first images: the model must give one logit per class. Returns
    ``splits`` with its classes filled in for tensors (as many as the model has logits)."""
    x = runtime.batch(splits.x_test[:2])
    try:
        with torch.no_grad(), runtime.autocast():
            out = model(x)
    except Exception as e:  # the user's module failed on the images: say so in one line
        raise UserError(f"the model fails on images of shape {tuple(x.shape[1:])}: {type(e).__name__}: {e}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model must return logits of shape (batch, classes); for {len(x)} images it "
                        f"returned {shape}")
    k = int(out.shape[1])
    top = int(splits.y_test.max())
    if splits.classes and k != len(splits.classes):
        raise UserError(f"the model returns {k} logits per image, but {splits.name} has {len(splits.classes)} classes")
    if top >= k:
        raise UserError(f"label {top} is out of range for a model with {k} logits (labels must be 0..{k - 1})")
    if not splits.classes:
        splits.classes = [str(i) for i in range(k)]
    return splits


def warn_training_mode(model: nn.Module) -> None:
    """A module in training mode whose output depends on it (BatchNorm, dropout) is evaluated in
    eval mode, with a warning; its mode is restored afterwards."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    moving = sorted({type(m).__name__ for m in model.modules() if m.training and isinstance(m, kinds)})
    if moving:
        warnings.warn(f"the model is in training mode and has {', '.join(moving)}: it is evaluated in eval "
                      f"mode (call model.eval() to silence this); its mode is restored afterwards", stacklevel=3)
