"""External models: RobustBench-style architectures, the usual checkpoint layouts, input
normalisation and user factories, loaded through ``eval --checkpoint`` from synthetic checkpoints
(random weights, no downloads); every loaded model's logits must equal those of the model built
directly."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import robench.evaluation
from robench import checkpoint
from robench.cli import cli
from robench.data import Splits
from robench.errors import UserError
from robench.models import Normalized, arch_names, build_model, count_params, is_builtin
from robench.targets import model_identity, target_from_file

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def synthetic(c: int = 3, hw: int = 16, classes: int = 10) -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, c, hw, hw, generator=g)
    y = torch.arange(4) % classes
    return Splits("synthetic", x, y, x, y, [str(i) for i in range(classes)])


def random_model(arch: str, c: int = 3, classes: int = 10) -> nn.Module:
    """``arch`` with random weights and BN statistics (so a BN layer loaded wrongly shows)."""
    torch.manual_seed(1)
    model = build_model(arch, c, classes, allow_import=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def save(model: nn.Module, path: Path, layout: str) -> Path:
    """Save ``model``'s weights in one of the layouts found in the wild."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    module = {f"module.{k}": v for k, v in sd.items()}
    if layout == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file(sd, str(path))
        return path
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "best_acc": 0.5},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        "net": {"net": sd, "acc": 55.1, "epoch": 99},
        "module": module,  # DataParallel
        "state_dict+module": {"state_dict": module},  # RobustBench's own files
        "nested": {"model": {"state_dict": module}},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
        "safetensors+module": None,
    }[layout]
    if obj is None:
        path = path.with_suffix(".safetensors")
        save_file(module, str(path))
        return path
    torch.save(obj, path)
    return path


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# Each architecture family at a small size, built by the same code as the registered full sizes.
ARCHS = ["rb-wrn-10-1", "rb-wrn-16-2", "dm-wrn-10-1", "dm-wrn-16-2", "preact-resnet-18", "preact-resnet-18-fast",
         "resnet-18", "wrn-8-1", "tiny-cnn"]
LAYOUTS = ["bare", "safetensors", "state_dict", "model_state_dict", "net", "module", "state_dict+module", "nested",
           "compiled", "safetensors+module"]


@pytest.mark.parametrize("arch,layout", [(a, LAYOUTS[i % len(LAYOUTS)]) for i, a in enumerate(ARCHS)]
                         + [("rb-wrn-10-1", layout) for layout in LAYOUTS[1:]])
def test_each_arch_and_layout_loads_exactly(tmp_path, arch, layout):
    splits = synthetic()
    model = random_model(arch)
    path = save(model, tmp_path / "m.pt", layout)
    target = target_from_file(path, arch, "synthetic", splits)
    assert torch.equal(logits(target.model, splits.x_test), logits(model, splits.x_test))
    # the file alone names a built-in model, with the normalisation dm-wrn applies itself
    own = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)) if arch.startswith("dm-") else (None, None)
    assert target.sha256 == model_identity(checkpoint.sha256(path), arch, *own)


@pytest.mark.parametrize("arch", ["rb-wrn-16-2", "preact-resnet-18-fast"])
def test_normalisation_inside_the_model(tmp_path, arch):
    splits = synthetic()
    model = random_model(arch)
    path = save(model, tmp_path / "m.pt", "state_dict+module")
    target = target_from_file(path, arch, "synthetic", splits, *CIFAR)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR)
    x = splits.x_test
    assert torch.equal(logits(target.model, x), logits(model, (x - mean) / std))
    assert not torch.equal(logits(target.model, x), logits(model, x))
    # the wrapper adds no keys: mean/std are not weights
    assert set(target.model.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    # one value for every channel
    one = target_from_file(path, arch, "synthetic", splits, (0.5,), (0.25,))
    assert torch.equal(logits(one.model, x), logits(model, (x - 0.5) / 0.25))


def test_normalisation_is_part_of_the_identity(tmp_path):
    splits = synthetic()
    path = save(random_model("rb-wrn-10-1"), tmp_path / "m.pt", "bare")
    sha = checkpoint.sha256(path)
    plain = target_from_file(path, "rb-wrn-10-1", "synthetic", splits).sha256
    cifar = target_from_file(path, "rb-wrn-10-1", "synthetic", splits, *CIFAR).sha256
    other = target_from_file(path, "rb-wrn-10-1", "synthetic", splits, (0.5,) * 3, (0.25,) * 3).sha256
    assert plain == sha and len({plain, cifar, other}) == 3
    assert cifar == model_identity(sha, "rb-wrn-10-1", *CIFAR)
    assert cifar.startswith(sha + "+") and "mean=0.4914,0.4822,0.4465" in cifar and "std=0.2471" in cifar
    # the same numbers however they are written
    assert model_identity(sha, "x:y", ("0.50",), ("1",)) == model_identity(sha, "x:y", (0.5,), (1.0,))


def test_builtin_architectures_accept_disjoint_state_dicts():
    """Why the file's sha256 alone identifies a built-in model: no two take the same weights."""
    seen = {}
    for arch in [a for a in arch_names() if is_builtin(a)]:
        with torch.device("meta"):
            model = build_model(arch, 3, 10)
        ignored = tuple(getattr(model, "ignored_state_keys", ()))
        layout = frozenset((k, tuple(v.shape)) for k, v in model.state_dict().items()
                           if not (ignored and k.startswith(ignored)))
        assert layout not in seen, f"{arch} and {seen.get(layout)} take the same state dict"
        seen[layout] = arch


def wrn_1x1_params(in_ch: int, classes: int, depth: int, width: int) -> int:
    """TRADES / DeepMind wide ResNet, counted from the description: (D - 4) / 6 pre-activation
    blocks per stage, 1x1 conv shortcut where the width changes, BN, fc with bias."""
    n, total, prev = (depth - 4) // 6, 9 * in_ch * 16, 16
    for w in (16 * width, 32 * width, 64 * width):
        for b in range(n):
            cin = prev if b == 0 else w
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
        prev = w
    return total + 2 * prev + prev * classes + classes


@pytest.mark.parametrize("arch,expected", [
    ("rb-wrn-28-10", 36_479_194),  # the WRN-28-10 figure the literature quotes (36.5M)
    ("rb-wrn-34-10", 46_160_474),  # TRADES' WRN-34-10 (46.2M)
    ("rb-wrn-34-20", wrn_1x1_params(3, 10, 34, 20)),
    ("rb-wrn-70-16", wrn_1x1_params(3, 10, 70, 16)),
    ("dm-wrn-28-10", 36_479_194),
    ("dm-wrn-70-16", wrn_1x1_params(3, 10, 70, 16)),  # RobustBench's "267M"
    ("resnet-18", 11_173_962),  # kuangliu's CIFAR ResNet-18
    ("preact-resnet-18-fast", 11_171_146),
    ("preact-resnet-18", 11_171_146 + 2 * 512),  # + the final BN
])
def test_full_size_parameter_counts(arch, expected):
    with torch.device("meta"):  # no memory, no init: even WRN-70-16 builds in milliseconds
        assert count_params(build_model(arch, 3, 10)) == expected
    assert round(wrn_1x1_params(3, 10, 70, 16) / 1e6) == 267


def test_full_size_key_layouts():
    """Spot checks of the key names RobustBench's files use (real files load with strict=True)."""
    with torch.device("meta"):
        dm = build_model("dm-wrn-70-16", 3, 10).state_dict()
        rb = build_model("rb-wrn-28-10", 3, 10).state_dict()
        pre = build_model("preact-resnet-18", 3, 10).state_dict()
        res = build_model("resnet-18", 3, 10).state_dict()
    assert tuple(dm["init_conv.weight"].shape) == (16, 3, 3, 3) and "layer.2.block.10.conv_1.weight" in dm
    assert "layer.2.block.11.conv_1.weight" not in dm  # (70 - 4) / 6 = 11 blocks per stage
    assert tuple(dm["layer.1.block.0.shortcut.weight"].shape) == (512, 256, 1, 1)
    assert "layer.0.block.1.shortcut.weight" not in dm and tuple(dm["logits.weight"].shape) == (10, 1024)
    assert {"batchnorm.running_mean", "layer.0.block.0.batchnorm_0.weight"} <= set(dm)
    assert tuple(rb["block1.layer.0.convShortcut.weight"].shape) == (160, 16, 1, 1)
    assert {"conv1.weight", "block3.layer.3.bn2.running_var", "bn1.weight", "fc.bias"} <= set(rb)
    assert "block1.layer.1.convShortcut.weight" not in rb and "block3.layer.4.conv1.weight" not in rb
    assert {"conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "bn.weight", "linear.bias"} <= set(pre)
    assert "layer1.0.shortcut.0.weight" not in pre
    assert {"bn1.weight", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean", "linear.weight"} <= set(res)


def test_robustbench_sub_block1_is_ignored(tmp_path):
    splits = synthetic()
    model = random_model("rb-wrn-10-1")
    sd = model.state_dict()
    extra = {k.replace("block1.", "sub_block1.", 1): torch.randn_like(v, dtype=torch.float32).to(v.dtype)
             for k, v in sd.items() if k.startswith("block1.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in {**sd, **extra}.items()}}, tmp_path / "m.pt")
    target = target_from_file(tmp_path / "m.pt", "rb-wrn-10-1", "synthetic", splits)
    assert torch.equal(logits(target.model, splits.x_test), logits(model, splits.x_test))


def test_stored_normalisation_is_used(tmp_path):
    """RobustBench's wrappers (e.g. Wong2020FastNet) keep mu/sigma buffers in their state dict: the
    file's normalisation is applied, with or without the same --mean/--std, never another one."""
    splits = synthetic()
    model = random_model("preact-resnet-18-fast")
    sd = {**model.state_dict(), "mu": torch.tensor(CIFAR[0]).view(1, 3, 1, 1),
          "sigma": torch.tensor(CIFAR[1]).view(1, 3, 1, 1)}
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(UserError, match=r"differ from the normalisation .* stores \(--mean 0.4914,0.4822,0.4465 "):
        target_from_file(tmp_path / "m.pt", "preact-resnet-18-fast", "synthetic", splits, (0.5,), (0.25,))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR)
    found = target_from_file(tmp_path / "m.pt", "preact-resnet-18-fast", "synthetic", splits)
    given = target_from_file(tmp_path / "m.pt", "preact-resnet-18-fast", "synthetic", splits, *CIFAR)
    for target in (found, given):
        assert torch.equal(logits(target.model, splits.x_test), logits(model, (splits.x_test - mean) / std))
        assert "stored in the file as mu, sigma" in target.meta["loaded"]
    assert found.sha256 == given.sha256 == model_identity(checkpoint.sha256(tmp_path / "m.pt"), "preact-resnet-18-fast",
                                                          *CIFAR)
    gray = {**random_model("preact-resnet-18-fast", c=1).state_dict(), "mu": sd["mu"], "sigma": sd["sigma"]}
    torch.save(gray, tmp_path / "gray.pt")
    with pytest.raises(UserError, match=r"stores an input normalisation \(mu, sigma\) of 3 and 3 values, for images of 1"):
        target_from_file(tmp_path / "gray.pt", "preact-resnet-18-fast", "synthetic", synthetic(c=1))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_mismatch_names_keys_and_the_right_arch(tmp_path):
    splits = synthetic()
    path = save(random_model("resnet-18"), tmp_path / "r.pt", "state_dict+module")
    with pytest.raises(UserError) as e:
        target_from_file(path, "preact-resnet-18", "synthetic", splits)
    msg = one_line(e)
    assert "do not fit architecture 'preact-resnet-18'" in msg and "missing" in msg and "unexpected" in msg
    assert msg.endswith("they look like --arch resnet-18")
    path = save(random_model("rb-wrn-16-2"), tmp_path / "w.pt", "bare")
    with pytest.raises(UserError) as e:
        target_from_file(path, "rb-wrn-28-10", "synthetic", splits)
    assert one_line(e).endswith("--arch rb-wrn-16-2")
    with pytest.raises(UserError) as e:  # another number of classes: the shapes say so
        target_from_file(path, "rb-wrn-16-2", "synthetic", synthetic(classes=7))
    assert "fc.weight (10, 128) vs (7, 128)" in one_line(e) and "look like" not in one_line(e)
    path = save(random_model("tiny-cnn"), tmp_path / "t.pt", "bare")
    with pytest.raises(UserError) as e:  # the same keys, other widths
        target_from_file(path, "small-cnn", "synthetic", splits)
    assert one_line(e).endswith("--arch tiny-cnn")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "x.pt")
    with pytest.raises(UserError) as e:
        target_from_file(tmp_path / "x.pt", "resnet-18", "synthetic", splits)
    assert "does not hold a state dict" in one_line(e) and "epoch" in one_line(e)


def test_bad_normalisation_arguments(tmp_path):
    splits = synthetic(c=1)
    path = save(random_model("tiny-cnn", c=1), tmp_path / "m.pt", "bare")
    with pytest.raises(UserError, match="go together"):
        target_from_file(path, "tiny-cnn", "synthetic", splits, (0.5,), None)
    with pytest.raises(UserError, match="3 values but synthetic images have 1 channel"):
        target_from_file(path, "tiny-cnn", "synthetic", splits, *CIFAR)
    with pytest.raises(UserError, match="positive"):
        target_from_file(path, "tiny-cnn", "synthetic", splits, (0.5,), (0.0,))


FACTORIES = '''
import torch
from torch import nn

def small(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

def bare():
    return small(10, 3)

def kw(**kwargs):
    return small(**kwargs)

class Nets:
    @staticmethod
    def nested(num_classes=10):
        return small(num_classes, 3)

def not_a_model(num_classes):
    return "model"

def broken():
    raise RuntimeError("out of ideas\\nsecond line")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


@pytest.mark.parametrize("factory", ["small", "bare", "kw", "Nets.nested"])
def test_user_factory(tmp_path, user_module, factory):
    splits = synthetic()
    arch = f"{user_module}:{factory}"
    model = random_model(arch)
    path = save(model, tmp_path / "m.pt", "module")
    target = target_from_file(path, arch, "synthetic", splits, *CIFAR)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR)
    assert torch.equal(logits(target.model, splits.x_test), logits(model, (splits.x_test - mean) / std))
    sha = checkpoint.sha256(path)
    assert target.sha256.startswith(f"{sha}+arch={arch}+mean=")  # a user's architecture is named


@pytest.mark.parametrize("spec,expect", [
    ("my_nets:not_a_model", "returned a str, not a torch.nn.Module"),
    ("my_nets:broken", "broken() raised RuntimeError: out of ideas"),
    ("my_nets:nope", "has no attribute 'nope'"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("my_nets:small:x", "expected package.module:factory"),
])
def test_user_factory_errors(user_module, spec, expect):
    with pytest.raises(UserError) as e:
        build_model(spec, 3, 10, allow_import=True)
    assert expect in one_line(e)


def test_factory_only_where_allowed(user_module):
    """A run's recorded arch (or a training --arch) never imports anything."""
    with pytest.raises(UserError, match="eval --checkpoint --arch` only"):
        build_model("my_nets:small", 3, 10)
    assert "my_nets" not in sys.modules


# --- the real CLI path -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3x32x32 image-folder dataset: 10 classes, one train and one test image each."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"c{c}" / "0.png")
    return root


def cli_eval(tmp_path, monkeypatch, folder, path, arch, *extra):
    """``robench eval --checkpoint`` as a user runs it; returns (the model it evaluated, JSON)."""
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    seen = []
    real = robench.evaluation.target_from_file

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(robench.evaluation, "target_from_file", spy)
    args = ["eval", "--checkpoint", path, "--arch", arch, "--dataset", "folder", "--data-dir", folder,
            "--attacks", "pgd", "-o", "pgd.attack_steps=1", "--n", "4", "--batch-size", "4", "--no-progress",
            "--device", "cpu", "--json", "--workdir", tmp_path / "wd", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")
    assert r.exit_code == 0, r.output + r.stderr
    # the runtime runs models channels_last; back in the default layout the weights must give
    # the reference logits exactly
    return seen[0].model.to(memory_format=torch.contiguous_format), json.loads(r.stdout)


def test_cli_eval_checkpoint_with_normalisation(tmp_path, monkeypatch, folder):
    from robench.data import load_dataset

    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    x = load_dataset("folder", folder).x_test
    model = random_model("rb-wrn-10-1")  # dm-wrn normalises by itself: tests/test_external_robustbench.py
    path = save(model, tmp_path / "rb.pt", "state_dict+module")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR)
    loaded, out = cli_eval(tmp_path, monkeypatch, folder, path, "rb-wrn-10-1",
                           "--mean", "0.4914,0.4822,0.4465", "--std", "cifar10")
    assert isinstance(loaded, Normalized)
    assert torch.equal(logits(loaded, x), logits(model, (x - mean) / std))
    plain, out_plain = cli_eval(tmp_path, monkeypatch, folder, path, "rb-wrn-10-1")
    assert torch.equal(logits(plain, x), logits(model, x))
    keys = {out["results"][0]["checkpoint"], out_plain["results"][0]["checkpoint"]}
    assert len(keys) == 2 and checkpoint.sha256(path) in keys  # two models, two result keys


@pytest.mark.parametrize("args,expect", [
    (["--mean", "cifar10"], "--mean and --std go together"),
    (["--mean", "0.5,x", "--std", "1"], "give comma-separated numbers"),
    (["--mean", "0.5", "--std", "0,1"], "must be finite and positive"),
])
def test_cli_normalisation_errors(tmp_path, args, expect):
    torch.save({}, tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "m.pt"), "--dataset", "digits", *args,
                                 "--workdir", str(tmp_path / "wd")], prog_name="robench")
    assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = CliRunner().invoke(cli, ["eval", "--defense", "standard", "--mean", "cifar10", "--std", "cifar10",
                                 "--workdir", str(tmp_path / "wd")], prog_name="robench")
    assert r.exit_code == 2 and "--checkpoint only" in r.stderr
