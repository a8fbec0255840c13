"""The data an experiment trains and evaluates on, derived from its file alone.

- Training images: the class-balanced subset ``balanced_order(y_train, order_seed)[:n_train]``
  (every image when ``n_train`` is not set).
- Held-out images (``n_val``): the next ``n_val`` of the same order. They are never trained on, so
  choosing the best stage on them leaves the test numbers free of selection bias.
- Test images: the whole test split in the class-balanced order (every prefix of 10m images holds
  m of each class), or the loader's own order.

Each view is a ``Splits`` whose *test* part holds the images evaluated, so the engine's evaluator
and sensitivity code run on it unchanged; the stored key names the split (``test``, ``train``,
``val``) and the digest of exactly these images in this order.
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from robench.data import Splits, balanced_order, cache_dir, load_dataset
from robench.errors import UserError
from robench.experiment.spec import Experiment
from robench.store import split_digest

MARKER = ".robench-unpacked"


@dataclass(frozen=True)
class View:
    """Images evaluated as one split: ``splits.x_test`` / ``y_test`` hold them."""

    split: str  # "test", "train" or "val"
    splits: Splits
    digest: str


@dataclass(frozen=True)
class Prepared:
    train: Splits  # x_train holds exactly the images trained on
    views: dict[str, View]
    train_digest: str


def unpack(archive: Path, dest: Path, expected_sha: str | None) -> Path:
    """Unpack ``archive`` into ``dest`` once; a marker holding the archive's sha256 says it is
    done. A wrong sha256 (a damaged or other copy) is refused before anything is written."""
    from robench.checkpoint import sha256

    if not archive.is_file():
        raise UserError(f"data archive {archive} does not exist")
    digest = sha256(archive)
    if expected_sha is not None and digest != expected_sha:
        raise UserError(f"{archive} has sha256 {digest}, expected {expected_sha} (a damaged or other copy?)")
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")  # no links out of the folder, no absolute paths
    (tmp / MARKER).write_text(digest + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def data_dir(exp: Experiment) -> Path | None:
    d = exp.data
    if d.archive is not None:
        stem = d.archive.name.split(".")[0]
        return unpack(d.archive, cache_dir() / stem, d.archive_sha256)
    return d.data_dir


def prepare(exp: Experiment) -> Prepared:
    d = exp.data
    full = load_dataset(d.dataset, data_dir(exp))
    n_all = len(full.y_train)
    wanted = (d.n_train or n_all) + d.n_val
    if wanted > n_all:
        raise UserError(f"{exp.path}: [data] n_train + n_val = {wanted} exceeds the {n_all} training images of "
                        f"{d.dataset}")
    order = torch.from_numpy(balanced_order(full.y_train, d.order_seed))
    if d.n_train is None:
        train_idx, val_idx = torch.arange(n_all), order[:0]
    else:
        train_idx, val_idx = order[:d.n_train], order[d.n_train:d.n_train + d.n_val]
    x_train, y_train = full.x_train[train_idx].contiguous(), full.y_train[train_idx].contiguous()
    if d.test_order == "balanced":
        t = torch.from_numpy(balanced_order(full.y_test, d.order_seed))
        x_test, y_test = full.x_test[t].contiguous(), full.y_test[t].contiguous()
    else:
        x_test, y_test = full.x_test, full.y_test
    train = replace(full, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    views = {"test": View("test", train, split_digest(x_test, y_test)),
             "train": View("train", replace(train, x_test=x_train, y_test=y_train), split_digest(x_train, y_train))}
    if d.n_val:
        xv, yv = full.x_train[val_idx].contiguous(), full.y_train[val_idx].contiguous()
        views["val"] = View("val", replace(train, x_test=xv, y_test=yv), split_digest(xv, yv))
    for a in exp.attacks:
        if a.n > len(y_test):
            raise UserError(f"{exp.path}: [attacks.{a.label}] n {a.n} exceeds the {len(y_test)} test images")
    if exp.sensitivity_n > len(y_test):
        raise UserError(f"{exp.path}: [sensitivity] n {exp.sensitivity_n} exceeds the {len(y_test)} test images")
    return Prepared(train, views, views["train"].digest)
