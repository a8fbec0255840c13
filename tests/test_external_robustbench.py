"""RobustBench checkpoints checked against RobustBench's own model code (issue 18, items 10-12).

The classes below are small copies, written for these tests, of the layouts, key names and
forward passes of RobustBench's ``model_zoo/architectures/dm_wide_resnet.py`` (``DMWideResNet``:
normalisation in non-persistent buffers), ``wide_resnet.py`` (TRADES ``WideResNet``) and
``utils_architectures.py`` (``normalize_model``: ``normalize.mean``/``normalize.std`` plus
``model.*``). The robustbench package is not used. Each test saves a randomly initialised copy
as RobustBench's files are laid out, loads it with robench and compares logits on [0, 1] images
of 32x32 (RobustBench pools with a fixed 8x8 kernel).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robench import checkpoint
from robench.data import Splits
from robench.errors import UserError
from robench.models.normalize import Normalized, input_normalization
from robench.targets import model_identity, target_from_file
from test_external import cli_eval, folder  # noqa: F401  (folder: the fixture)

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


# --- small copies of RobustBench's classes -------------------------------------------------------


class RBSwish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class RBDMBlock(nn.Module):
    """dm_wide_resnet._Block: BN-act first; 'SAME' padding by hand on conv_0."""

    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), act()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), act()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
            v = x
        else:
            v = out = self.relu_0(self.batchnorm_0(x))
        v = F.pad(v, (1, 1, 1, 1) if self._stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class RBBlockGroup(nn.Module):
    def __init__(self, n, cin, cout, stride, act, block):
        super().__init__()
        self.block = nn.Sequential(*(block(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                                     for i in range(n)))

    def forward(self, x):
        return self.block(x)


class RBDMWideResNet(nn.Module):
    """dm_wide_resnet.DMWideResNet(num_classes, depth, width, activation_fn, mean, std)."""

    def __init__(self, num_classes=10, depth=10, width=1, act=RBSwish, mean=CIFAR10[0], std=CIFAR10[1]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        c, n = [16, 16 * width, 32 * width, 64 * width], (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*(RBBlockGroup(n, c[i], c[i + 1], 1 if i == 0 else 2, act, RBDMBlock)
                                     for i in range(3)))
        self.batchnorm, self.relu = nn.BatchNorm2d(c[3]), act()
        self.logits = nn.Linear(c[3], num_classes)
        self.num_channels = c[3]

    def forward(self, x):
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = F.avg_pool2d(self.relu(self.batchnorm(out)), 8)
        return self.logits(out.view(-1, self.num_channels))


class RBBasicBlock(nn.Module):
    """wide_resnet.BasicBlock (TRADES)."""

    def __init__(self, cin, cout, stride, act=None):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out if self.equalInOut else x))))
        return (x if self.equalInOut else self.convShortcut(x)) + out


class RBNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*(RBBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)))

    def forward(self, x):
        return self.layer(x)


class RBWideResNet(nn.Module):
    """wide_resnet.WideResNet(depth, num_classes, widen_factor, sub_block1)."""

    def __init__(self, depth=10, num_classes=10, widen_factor=2, sub_block1=False):
        super().__init__()
        c, n = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor], (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = RBNetworkBlock(n, c[0], c[1], 1)
        if sub_block1:
            self.sub_block1 = RBNetworkBlock(n, c[0], c[1], 1)
        self.block2 = RBNetworkBlock(n, c[1], c[2], 2)
        self.block3 = RBNetworkBlock(n, c[2], c[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU()
        self.fc = nn.Linear(c[3], num_classes)
        self.nChannels = c[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


class RBImageNormalizer(nn.Module):
    """utils_architectures.ImageNormalizer: persistent (1, 3, 1, 1) buffers."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def rb_normalize_model(model, mean, std):
    return nn.Sequential(OrderedDict([("normalize", RBImageNormalizer(mean, std)), ("model", model)]))


# --- helpers -------------------------------------------------------------------------------------


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so that a wrongly loaded BN or a missed normalisation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and not name.endswith(("normalize.mean", "normalize.std")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def splits32(classes: int = 10) -> Splits:
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % classes
    return Splits("synthetic", x, y, x, y, [str(i) for i in range(classes)])


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=2e-5, rtol=1e-5)


def save_rb(model: nn.Module, path, wrap=lambda sd: {"state_dict": sd}, prefix: str = "module."):
    """As RobustBench's files are: the state dict under ``state_dict`` with DataParallel's prefix."""
    torch.save(wrap({f"{prefix}{k}": v for k, v in model.state_dict().items()}), path)
    return path


# --- item 10: DeepMind models carry RobustBench's normalisation ----------------------------------


@pytest.mark.parametrize("classes,stats", [(10, CIFAR10), (100, CIFAR100)])
def test_dm_wrn_normalises_as_robustbench_without_flags(tmp_path, classes, stats):
    rb = randomised(RBDMWideResNet(classes, 10, 2, mean=stats[0], std=stats[1]))
    path = save_rb(rb, tmp_path / "dm.pt")
    splits = splits32(classes)
    target = target_from_file(path, "dm-wrn-10-2", "synthetic", splits)
    assert close(logits(target.model, splits.x_test), logits(rb, splits.x_test))
    assert input_normalization(target.model) == stats and not isinstance(target.model, Normalized)
    assert target.meta["mean"] == list(stats[0]) and "dm-wrn-10-2's own" in target.meta["loaded"]
    # the same model as with the statistics given explicitly: the same result key
    given = target_from_file(path, "dm-wrn-10-2", "synthetic", splits, *stats)
    assert given.sha256 == target.sha256 == model_identity(checkpoint.sha256(path), "dm-wrn-10-2", *stats)
    assert close(logits(given.model, splits.x_test), logits(rb, splits.x_test))


def test_dm_wrn_explicit_normalisation_replaces_its_own(tmp_path):
    """--mean/--std replace the built-in statistics (never applied on top of them); ``none``
    (mean 0, std 1) evaluates without any, under the file's plain sha256."""
    rb = randomised(RBDMWideResNet(10, 10, 1))
    path = save_rb(rb, tmp_path / "dm.pt")
    splits, x = splits32(), splits32().x_test
    other = target_from_file(path, "dm-wrn-10-1", "synthetic", splits, (0.5,), (0.25,))
    rb.mean.fill_(0.5), rb.std.fill_(0.25)
    assert close(logits(other.model, x), logits(rb, x)) and not isinstance(other.model, Normalized)
    none = target_from_file(path, "dm-wrn-10-1", "synthetic", splits, (0.0,), (1.0,))
    rb.mean.fill_(0.0), rb.std.fill_(1.0)
    assert close(logits(none.model, x), logits(rb, x)) and input_normalization(none.model) is None
    assert none.sha256 == checkpoint.sha256(path) and "no input normalisation" in none.meta["loaded"]
    assert len({other.sha256, none.sha256, target_from_file(path, "dm-wrn-10-1", "synthetic", splits).sha256}) == 3


def test_cli_dm_wrn_without_flags_matches_robustbench(tmp_path, monkeypatch, folder):  # noqa: F811
    from robench.data import load_dataset

    x = load_dataset("folder", folder).x_test
    rb = randomised(RBDMWideResNet(10, 10, 1))
    loaded, out = cli_eval(tmp_path, monkeypatch, folder, save_rb(rb, tmp_path / "dm.pt"), "dm-wrn-10-1")
    assert close(logits(loaded, x), logits(rb, x))
    assert "mean 0.4914,0.4822,0.4465 std 0.2471,0.2435,0.2616" in out["checkpoints"][0]
    none, _ = cli_eval(tmp_path, monkeypatch, folder, tmp_path / "dm.pt", "dm-wrn-10-1", "--mean", "none",
                       "--std", "none")
    rb.mean.fill_(0.0), rb.std.fill_(1.0)
    assert close(logits(none, x), logits(rb, x))


# --- item 11: RobustBench's normalize_model layout -----------------------------------------------


@pytest.mark.parametrize("prefix,wrap", [("", lambda sd: sd), ("module.", lambda sd: {"state_dict": sd})])
def test_normalize_model_layout_loads_with_its_normalisation(tmp_path, prefix, wrap):
    """``normalize.mean``/``normalize.std`` plus ``model.*`` (a prefix the normalisation keys do
    not share): loaded without flags, normalised once with the file's statistics."""
    rb = randomised(rb_normalize_model(RBWideResNet(10, 10, 2, sub_block1=True), *CIFAR10))
    path = save_rb(rb, tmp_path / "n.pt", wrap, prefix)
    splits = splits32()
    x = splits.x_test
    found = target_from_file(path, "rb-wrn-10-2", "synthetic", splits)
    given = target_from_file(path, "rb-wrn-10-2", "synthetic", splits, *CIFAR10)
    for target in (found, given):
        assert close(logits(target.model, x), logits(rb, x))
        assert input_normalization(target.model) == CIFAR10
        assert "stored in the file as normalize.mean, normalize.std" in target.meta["loaded"]
    assert found.sha256 == given.sha256 == model_identity(checkpoint.sha256(path), "rb-wrn-10-2", *CIFAR10)
    with pytest.raises(UserError, match="differ from the normalisation"):
        target_from_file(path, "rb-wrn-10-2", "synthetic", splits, *CIFAR100)


def test_normalize_model_around_a_dm_wrn_is_normalised_once(tmp_path):
    """A stored normalisation replaces dm-wrn's own: the file's model normalises once (here a
    DMWideResNet with mean 0 and std 1 inside ``normalize_model``), and so does robench's."""
    inner = RBDMWideResNet(10, 10, 1, mean=(0.0,) * 3, std=(1.0,) * 3)
    rb = randomised(rb_normalize_model(inner, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    path = save_rb(rb, tmp_path / "n.pt", lambda sd: sd, "")
    splits = splits32()
    target = target_from_file(path, "dm-wrn-10-1", "synthetic", splits)
    assert close(logits(target.model, splits.x_test), logits(rb, splits.x_test))
    assert input_normalization(target.model) == ((0.5,) * 3, (0.25,) * 3) and not isinstance(target.model, Normalized)


# --- item 12: RobustBench's {'last': ..., 'best': ...} files ------------------------------------


def save_pair(tmp_path, inner: str = "state_dict"):
    """Kireev2021Effectiveness' and Andriushchenko2020Understanding's layout: two models in one
    file, each a state dict (``inner`` "") or under ``state_dict``, with DataParallel's prefix."""
    best, last = (randomised(RBWideResNet(10, 10, 2), seed) for seed in (3, 4))
    sds = {name: {f"module.{k}": v for k, v in m.state_dict().items()} for name, m in (("best", best), ("last", last))}
    torch.save({name: {inner: sd} if inner else sd for name, sd in sds.items()}, tmp_path / "pair.pt")
    return best, last, tmp_path / "pair.pt"


@pytest.mark.parametrize("inner", ["state_dict", ""])
def test_best_last_pair_loads_best_by_default(tmp_path, inner):
    best, last, path = save_pair(tmp_path, inner)
    splits = splits32()
    x = splits.x_test
    found = target_from_file(path, "rb-wrn-10-2", "synthetic", splits)
    assert close(logits(found.model, x), logits(best, x)) and not close(logits(found.model, x), logits(last, x))
    assert "its 'best' model (--checkpoint-key last: the other)" in found.meta["loaded"]
    other = target_from_file(path, "rb-wrn-10-2", "synthetic", splits, pick="last")
    assert close(logits(other.model, x), logits(last, x))
    assert "its 'last' model (--checkpoint-key best: the other)" in other.meta["loaded"]
    # one file, two models: two result keys
    sha = checkpoint.sha256(path)
    assert (found.sha256, other.sha256) == (f"{sha}+model=best", f"{sha}+model=last")
    explicit = target_from_file(path, "rb-wrn-10-2", "synthetic", splits, pick="best")
    assert explicit.sha256 == found.sha256


def test_checkpoint_key_errors(tmp_path):
    splits = splits32()
    _, _, pair = save_pair(tmp_path)
    torch.save({"best": {"state_dict": torch.load(pair)["best"]["state_dict"]}}, tmp_path / "best_only.pt")
    torch.save(randomised(RBWideResNet(10, 10, 2)).state_dict(), tmp_path / "one.pt")
    for path, pick, expect in [(tmp_path / "one.pt", "last", "holds one model, not {'best'"),
                               (tmp_path / "best_only.pt", "last", "holds no 'last' model, only 'best'"),
                               (pair, "first", "choose best or last")]:
        with pytest.raises(UserError) as e:
            target_from_file(path, "rb-wrn-10-2", "synthetic", splits, pick=pick)
        assert expect in str(e.value) and "\n" not in str(e.value)
    only = target_from_file(tmp_path / "best_only.pt", "rb-wrn-10-2", "synthetic", splits)
    assert "its 'best' model" in only.meta["loaded"] and "the other" not in only.meta["loaded"]


def test_cli_checkpoint_key(tmp_path, monkeypatch, folder):  # noqa: F811
    from click.testing import CliRunner

    from robench.cli import cli
    from robench.data import load_dataset

    x = load_dataset("folder", folder).x_test
    best, last, path = save_pair(tmp_path)
    loaded, out = cli_eval(tmp_path, monkeypatch, folder, path, "rb-wrn-10-2")
    assert close(logits(loaded, x), logits(best, x)) and "its 'best' model" in out["checkpoints"][0]
    loaded, out = cli_eval(tmp_path, monkeypatch, folder, path, "rb-wrn-10-2", "--checkpoint-key", "last")
    assert close(logits(loaded, x), logits(last, x)) and "its 'last' model" in out["checkpoints"][0]
    r = CliRunner().invoke(cli, ["eval", "--defense", "standard", "--checkpoint-key", "last",
                                 "--workdir", str(tmp_path / "wd")], prog_name="robench")
    assert r.exit_code == 2 and "--checkpoint-key applies to --checkpoint only" in r.stderr
