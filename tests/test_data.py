"""robench.data: the embedded digits split, the image-folder loader and its cache, offline errors."""

from __future__ import annotations

import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robench.data as data
from robench.data import FOLDER_ORDER_SEED, Splits, cache_dir, default_data_dir, describe, load_dataset
from robench.errors import UserError
from robench.registry import DATASETS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network, even on a machine that has one."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --- digits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits")


def test_digits_shapes_and_values(digits: Splits) -> None:
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.classes == [str(i) for i in range(10)]
    for x in (digits.x_train, digits.x_test):
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
        assert torch.equal(x * 16, (x * 16).round())  # exact multiples of 1/16


def test_digits_split_is_fixed_stratified_and_disjoint(digits: Splits) -> None:
    again = load_dataset("digits")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)

    from sklearn.datasets import load_digits

    y = load_digits().target
    train, test = data._digits_indices(y)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(y)
    counts_train = torch.bincount(digits.y_train, minlength=10)
    counts_test = torch.bincount(digits.y_test, minlength=10)
    # Stratified: each class keeps its share of the whole set in both splits.
    full = np.bincount(y) / len(y)
    assert np.abs(counts_train.numpy() / 1437 - full).max() < 0.002
    assert np.abs(counts_test.numpy() / 360 - full).max() < 0.005


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(UserError, match=r"unknown dataset 'mnist'; choose from: .*cifar10.*digits.*folder"):
        load_dataset("mnist")


def test_describe_every_dataset() -> None:
    assert set(DATASETS.names()) == {"cifar10", "cifar100", "digits", "folder", "stl10"}
    for name in DATASETS.names():
        line = describe(name)
        assert line.startswith(f"{name}: ") and "\n" not in line
    assert "1437/360" in describe("digits")


def test_default_dirs_follow_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROBENCH_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("ROBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "robench"


# --- torchvision datasets offline ------------------------------------------------------------


@pytest.mark.parametrize("name,archive", [("cifar10", "cifar-10-python.tar.gz"),
                                          ("cifar100", "cifar-100-python.tar.gz"),
                                          ("stl10", "stl10_binary.tar.gz")])
def test_torchvision_offline_is_one_line(offline: None, tmp_path: Path, name: str, archive: str) -> None:
    with pytest.raises(UserError) as err:
        load_dataset(name, tmp_path, download=True)
    msg = str(err.value)
    assert "\n" not in msg and "could not download" in msg
    assert archive in msg and str(tmp_path.resolve()) in msg and "--data-dir" in msg


def test_cifar10_missing_without_download(offline: None, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and "downloading is off" in msg and str(tmp_path.resolve()) in msg


def test_cifar10_corrupt_archive_is_one_line(offline: None, tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    for download in (True, False):
        with pytest.raises(UserError) as err:
            load_dataset("cifar10", tmp_path, download=download)
        assert "\n" not in str(err.value)


# --- image folder ----------------------------------------------------------------------------

CLASSES = ["cat", "ant", "bee"]  # deliberately not in sorted order on disk creation


def _pixels(cls: int, i: int, split: str) -> np.ndarray:
    rng = np.random.default_rng([cls, i, split == "test"])
    return rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _make_folder(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                # PNG is lossless, so the loaded pixels must equal what was written.
                Image.fromarray(_pixels(CLASSES.index(cls), i, split)).save(d / f"{i:02d}.png")
    return root


def test_folder_loads_pixels_and_labels(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "ds")
    (root / "train" / "ant" / "notes.txt").write_text("ignored: not an image")
    s = load_dataset("folder", root)
    assert s.classes == ["ant", "bee", "cat"]
    assert s.x_train.shape == (12, 3, 8, 8) and s.x_test.shape == (6, 3, 8, 8)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    # Files are read class by class, then put in one fixed shuffled order per split.
    for split, x, y, n in (("train", s.x_train, s.y_train, 4), ("test", s.x_test, s.y_test, 2)):
        listed = [(label, i) for label in range(len(s.classes)) for i in range(n)]
        order = np.random.default_rng(FOLDER_ORDER_SEED).permutation(len(listed))
        assert y.tolist() == [listed[k][0] for k in order]
        for j, k in enumerate(order):
            label, i = listed[k]
            want = torch.from_numpy(_pixels(CLASSES.index(s.classes[label]), i, split)).permute(2, 0, 1).float() / 255
            assert torch.equal(x[j], want)
    assert s.y_train[:6].unique().numel() > 1  # the first images are not all one class


def test_folder_second_load_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_folder(tmp_path / "ds")
    first = load_dataset("folder", root)
    assert len(list((cache_dir() / "folders").glob("*.npz"))) == 1
    assert not list((cache_dir() / "folders").glob("*.tmp"))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_dataset("folder", str(root))
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    assert second.classes == first.classes

    # A changed file changes the key, so it is decoded again (and here, Image.open refuses).
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "bee" / "09.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("folder", root)


def test_folder_grey_images_become_rgb(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(np.full((5, 7), 51, np.uint8), mode="L").save(root / split / "a" / "x.bmp")
    s = load_dataset("folder", root)
    assert s.image_shape == (3, 5, 7) and torch.allclose(s.x_train, torch.full((1, 3, 5, 7), 0.2))


def test_folder_needs_data_dir() -> None:
    with pytest.raises(UserError, match=r"needs --data-dir DIR with train/<class>/ and test/<class>/"):
        load_dataset("folder")


@pytest.mark.parametrize("breakage,pattern", [
    ("no_dir", "does not exist"),
    ("no_test", "no test/ directory"),
    ("no_classes", "no images in"),
    ("empty_class", "class folder .*bee has no images"),
    ("extra_class", r"inconsistent classes.*only in train/: \['dog'\]"),
    ("unreadable", r"cannot read image .*01\.png"),
    ("other_size", r"image .*03\.png is 9x8 .*one size"),
    ("test_size", "train images are 8x8 but test images are 4x4"),
])
def test_folder_errors_are_user_errors(tmp_path: Path, breakage: str, pattern: str) -> None:
    root = _make_folder(tmp_path / "ds")
    if breakage == "no_dir":
        root = tmp_path / "missing"
    elif breakage == "no_test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in (root / "test").iterdir():
            d.rmdir()
        (root / "test").rmdir()
    elif breakage == "no_classes":
        (root / "test").rename(tmp_path / "gone")
        (root / "test").mkdir()
    elif breakage == "empty_class":
        for f in (root / "test" / "bee").iterdir():
            f.unlink()
    elif breakage == "extra_class":
        (root / "train" / "dog").mkdir()
        Image.fromarray(_pixels(0, 0, "train")).save(root / "train" / "dog" / "a.png")
    elif breakage == "unreadable":
        (root / "train" / "bee" / "01.png").write_bytes(b"\x89PNG truncated")
    elif breakage == "other_size":
        Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(root / "train" / "cat" / "03.png")
    elif breakage == "test_size":
        for f in (root / "test").rglob("*.png"):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(f)
    with pytest.raises(UserError, match=pattern) as err:
        load_dataset("folder", root)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(),
                    reason="../shared/data/cifar10-jpeg.tar.gz is absent (a fresh clone has none)")
def test_folder_reads_real_cifar10_jpegs(tmp_path: Path) -> None:
    # Only a handful of files: the first 5 of the first two class folders in the archive, so the
    # stream stops early instead of reading all 60,000 members.
    wanted: dict[str, list[Path]] = {}
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[2].endswith(".jpg")):
                continue
            files = wanted.setdefault(parts[1], [])
            if len(wanted) > 2 or (len(wanted) == 2 and all(len(v) == 5 for v in wanted.values())):
                break
            if len(files) < 5:
                files.append(Path(parts[1]) / parts[2])
                (tmp_path / "test" / parts[1]).mkdir(parents=True, exist_ok=True)
                (tmp_path / "test" / files[-1]).write_bytes(tar.extractfile(member).read())
    if len(wanted) > 2:
        wanted.popitem()  # a third class only marked where to stop
    # A matching tiny train/ folder: two of the same files per class.
    for cls, files in wanted.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for f in sorted(files)[:2]:
            (tmp_path / "train" / f).write_bytes((tmp_path / "test" / f).read_bytes())
    classes = sorted(wanted)
    s = load_dataset("folder", tmp_path)
    assert s.classes == classes and s.image_shape == (3, 32, 32)
    assert sorted(s.y_test.tolist()) == [0] * 5 + [1] * 5 and sorted(s.y_train.tolist()) == [0, 0, 1, 1]
    assert 0 <= s.x_test.min() and s.x_test.max() <= 1 and s.x_test.std() > 0.05
    with Image.open(tmp_path / "test" / sorted(wanted[classes[0]])[0]) as im:
        first = torch.tensor(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    position = int(np.flatnonzero(np.random.default_rng(FOLDER_ORDER_SEED).permutation(10) == 0)[0])
    assert torch.equal(s.x_test[position], first)
