"""Datasets: each split is one float32 tensor in [0, 1], shape (N, C, H, W), held in memory.

Every loader registers itself in ``DATASETS`` as ``loader(data_dir, download) -> Splits``.
Per-dataset hyper-parameters live in ``robench.config.DATASET_DEFAULTS``, not here.

- ``digits``: scikit-learn's 8x8 digits, embedded and offline. 1,797 grey images, values 0..16
  divided by 16 (so every pixel is an exact multiple of 1/16). The split is fixed:
  ``train_test_split(test_size=0.2, random_state=0, stratify=y)`` gives 1,437 train / 360 test.
- ``cifar10``, ``cifar100``, ``stl10``: torchvision's loaders (STL-10: the labelled 5,000/8,000
  splits, not the unlabelled one). Offline, a missing file is one ``UserError`` line saying where
  to put it.
- ``folder``: ``DIR/train/<class>/*.{jpg,jpeg,png,bmp}`` and ``DIR/test/<class>/*``, classes sorted
  by name (the layout of the CIFAR-10 JPEG copy). Decoded once, then cached as uint8 in
  ``cache_dir()/folders/<key>.npz``; the key changes when any file is added, removed or touched.

A class-balanced order (loaders keep their own fixed order; this is opt-in):

- ``balanced_order`` / ``balanced_test``: the whole test split in one fixed class-balanced shuffle,
  in which every prefix of ``k * classes`` images holds ``k`` of each class (while every class has
  images left). Evaluating "the first n" of it (``robench.evaluation``) is then a balanced sample
  at every n, and a smaller n is nested in a larger one, so results line up example by example.
  A reordered split has another ``robench.store.split_digest``, so its results never share
  keys with those of the loader's own order.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from robench import atomic
from robench.errors import UserError
from robench.registry import DATASETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FOLDER_ORDER_SEED = 0
_CACHE_FORMAT = "1"  # bump when the cached arrays' layout changes, so old caches are not read


@dataclass
class Splits:
    name: str
    x_train: torch.Tensor  # float32, (N, C, H, W), values in [0, 1]
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))


_DESCRIPTIONS: dict[str, str] = {}


def _dataset(name: str, description: str) -> Callable:
    _DESCRIPTIONS[name] = description
    return DATASETS.register(name)


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = True) -> Splits:
    """Load a registered dataset; unknown names raise ``UserError`` listing the choices."""
    loader = DATASETS.get(name)
    return loader(Path(data_dir).expanduser() if data_dir is not None else None, download)


def describe(name: str) -> str:
    """One line for ``robench list``."""
    DATASETS.get(name)  # UserError for an unknown name
    return f"{name}: {_DESCRIPTIONS[name]}"


def default_data_dir() -> Path:
    env = os.environ.get("ROBENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "robench" / "data"


def cache_dir() -> Path:
    env = os.environ.get("ROBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "robench"


def _to_float(images: np.ndarray, channels_last: bool) -> torch.Tensor:
    """uint8 images -> contiguous float32 (N, C, H, W) in [0, 1], converted once."""
    if channels_last:
        images = images.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def _labels(y: object) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.int64)


# --- digits ----------------------------------------------------------------------------------


def _digits_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 split of the 1,797 digits (1,437 train / 360 test)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=y)
    return np.sort(train), np.sort(test)


@_dataset("digits", "scikit-learn 8x8 digits, 1x8x8, 10 classes, 1437/360, embedded (offline)")
def _load_digits(data_dir: Path | None, download: bool) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are integers 0..16; /16 is exact in float32, so eps can be stated in grey levels.
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = _digits_indices(bunch.target)
    return Splits("digits", x[train], y[train], x[test], y[test], [str(i) for i in range(10)])


# --- torchvision datasets --------------------------------------------------------------------

# Errors that mean "the files are not there or not usable", not a bug: no network (URLError is an
# OSError), torchvision's integrity check (RuntimeError), a truncated or corrupt archive.
_FETCH_ERRORS = (OSError, RuntimeError, tarfile.TarError, EOFError, zlib.error, pickle.UnpicklingError)


def _torchvision(name: str, title: str, cls: type, data_dir: Path | None, download: bool,
                 splits: tuple[dict, dict]) -> Splits:
    from torchvision.datasets.utils import check_integrity

    root = (data_dir or default_data_dir()).expanduser().resolve()
    where = (f"place {cls.filename} (or the extracted {cls.base_folder}/) in {root}, "
             f"or pass --data-dir DIR that holds it")
    # A verified archive needs no network; let torchvision extract it even when download=False.
    archive_ok = check_integrity(str(root / cls.filename), cls.tgz_md5)
    try:
        train = cls(str(root), download=download or archive_ok, **splits[0])
        test = cls(str(root), download=False, **splits[1])
    except _FETCH_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        if download:
            raise UserError(f"could not download {title} (offline? {reason}): {where}") from None
        raise UserError(f"{title} not found in {root} and downloading is off: {where}") from None
    channels_last = train.data.ndim == 4 and train.data.shape[-1] == 3  # CIFAR; STL-10 is NCHW
    y_train = getattr(train, "targets", None)
    y_test = getattr(test, "targets", None)
    return Splits(
        name,
        _to_float(train.data, channels_last),
        _labels(train.labels if y_train is None else y_train),
        _to_float(test.data, channels_last),
        _labels(test.labels if y_test is None else y_test),
        list(train.classes),
    )


@_dataset("cifar10", "CIFAR-10 (torchvision), 3x32x32, 10 classes, 50000/10000, downloads 163 MB")
def _load_cifar10(data_dir: Path | None, download: bool) -> Splits:
    from torchvision.datasets import CIFAR10

    return _torchvision("cifar10", "CIFAR-10", CIFAR10, data_dir, download,
                        ({"train": True}, {"train": False}))


@_dataset("cifar100", "CIFAR-100 (torchvision), 3x32x32, 100 classes, 50000/10000, downloads 161 MB")
def _load_cifar100(data_dir: Path | None, download: bool) -> Splits:
    from torchvision.datasets import CIFAR100

    return _torchvision("cifar100", "CIFAR-100", CIFAR100, data_dir, download,
                        ({"train": True}, {"train": False}))


@_dataset("stl10", "STL-10 labelled (torchvision), 3x96x96, 10 classes, 5000/8000, downloads 2.6 GB")
def _load_stl10(data_dir: Path | None, download: bool) -> Splits:
    from torchvision.datasets import STL10

    return _torchvision("stl10", "STL-10", STL10, data_dir, download,
                        ({"split": "train"}, {"split": "test"}))


# --- image folder ----------------------------------------------------------------------------


def _scan_split(split_dir: Path) -> dict[str, list[os.DirEntry]]:
    if not split_dir.is_dir():
        raise UserError(f"dataset folder has no {split_dir.name}/ directory: expected {split_dir}/<class>/")
    classes: dict[str, list[os.DirEntry]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = sorted((f for f in os.scandir(entry.path)
                        if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)),
                       key=lambda f: f.name)
        if not files:
            raise UserError(f"class folder {entry.path} has no images ({', '.join(IMAGE_SUFFIXES)})")
        classes[entry.name] = files
    if not classes:
        raise UserError(f"no images in {split_dir}: expected {split_dir}/<class>/*.png (or .jpg, .bmp)")
    return classes


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            # convert() copies even when the mode is already RGB; skip that copy.
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _decode_all(paths: list[str]) -> np.ndarray:
    """Decode every image into one (N, H, W, 3) uint8 array; all must share one size."""
    first = _decode(paths[0])
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(chunk: range) -> None:
        for i in chunk:
            img = _decode(paths[i])
            if img.shape != first.shape:
                raise UserError(f"image {paths[i]} is {img.shape[1]}x{img.shape[0]} but {paths[0]} is "
                                f"{first.shape[1]}x{first.shape[0]}; all images must have one size")
            out[i] = img

    # PIL releases the GIL while decoding, so threads overlap; chunks keep per-task overhead low.
    workers = min(8, os.cpu_count() or 1)
    step = max(1, -(-(len(paths) - 1) // (workers * 4)))
    chunks = [range(s, min(s + step, len(paths))) for s in range(1, len(paths), step)]
    pool = ThreadPoolExecutor(workers)
    try:
        for _ in pool.map(work, chunks):  # re-raises the first error in file order
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, don't decode the rest first
    return out


def _cache_key(root: Path, listing: dict[str, dict[str, list[os.DirEntry]]]) -> str:
    h = hashlib.sha1(f"{_CACHE_FORMAT}\0{root}\0".encode())
    for split, classes in listing.items():
        for cls, files in classes.items():
            for f in files:
                st = f.stat()
                h.update(f"{split}/{cls}/{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **arrays)


@_dataset("folder", "images in DIR/train/<class>/ and DIR/test/<class>/ (--data-dir), RGB, "
                    "one fixed size; decoded once, then cached")
def _load_folder(data_dir: Path | None, download: bool) -> Splits:
    if data_dir is None:
        raise UserError("dataset 'folder' needs --data-dir DIR with train/<class>/ and test/<class>/")
    root = data_dir.expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist or is not a directory")
    listing = {split: _scan_split(root / split) for split in ("train", "test")}
    if set(listing["train"]) != set(listing["test"]):
        only_train = sorted(set(listing["train"]) - set(listing["test"]))
        only_test = sorted(set(listing["test"]) - set(listing["train"]))
        raise UserError(f"inconsistent classes in {root}: only in train/: {only_train or 'none'}; "
                        f"only in test/: {only_test or 'none'}")
    classes = sorted(listing["train"])

    cache = cache_dir() / "folders" / f"{_cache_key(root, listing)}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zlib.error, EOFError):
            arrays = None  # a damaged cache is rebuilt, not trusted
    if arrays is None:
        arrays = {"classes": np.array(classes)}
        for split, by_class in listing.items():
            paths = [f.path for cls in classes for f in by_class[cls]]
            arrays[f"x_{split}"] = _decode_all(paths)
            arrays[f"y_{split}"] = np.array(
                [i for i, cls in enumerate(classes) for _ in by_class[cls]], dtype=np.int64)
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            raise UserError(f"train images are {arrays['x_train'].shape[2]}x{arrays['x_train'].shape[1]} "
                            f"but test images are {arrays['x_test'].shape[2]}x{arrays['x_test'].shape[1]} "
                            f"in {root}; all images must have one size")
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(cache, lambda tmp: _savez(tmp, arrays))
    # Files are listed class by class; one fixed shuffle per split makes "the first n images"
    # (--n-train, eval's --n) a fair sample of every class, as in CIFAR's own files.
    order = {split: np.random.default_rng(FOLDER_ORDER_SEED).permutation(len(arrays[f"y_{split}"]))
             for split in ("train", "test")}
    return Splits(
        "folder",
        _to_float(arrays["x_train"][order["train"]], channels_last=True),
        torch.from_numpy(arrays["y_train"][order["train"]]),
        _to_float(arrays["x_test"][order["test"]], channels_last=True),
        torch.from_numpy(arrays["y_test"][order["test"]]),
        [str(c) for c in arrays["classes"]],
    )


# --- orders ----------------------------------------------------------------------------------


def balanced_order(y: np.ndarray | torch.Tensor, seed: int = 0) -> np.ndarray:
    """A fixed shuffle of the indices of labels ``y`` in which every prefix of ``k * classes``
    indices holds ``k`` of each class (while every class has some left): images are dealt round
    by round, one per class per round, in a random order within each class and each round."""
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    rank = np.empty(len(y), dtype=np.int64)  # the round in which each index is dealt
    for c in np.unique(y):
        members = perm[y[perm] == c]
        rank[members] = np.arange(len(members))
    tiebreak = rng.permutation(len(y))  # shuffles the classes within each round
    return np.lexsort((tiebreak, rank))


def balanced_test(splits: Splits, seed: int = 0) -> Splits:
    """``splits`` with its whole test split in ``balanced_order`` (train untouched), so that
    "the first n test images" is class-balanced at every n."""
    idx = torch.from_numpy(balanced_order(splits.y_test, seed))
    return replace(splits, x_test=splits.x_test[idx].contiguous(), y_test=splits.y_test[idx].contiguous())
