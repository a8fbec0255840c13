"""Architectures: shapes, Madry-faithful structure, parameter counts, autograd, channels_last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robench.errors import UserError
from robench.models import (
    MadryUnit,
    PadShortcut,
    WideResNet,
    arch_names,
    build_model,
    count_params,
)
from robench.registry import ARCHS

from bounds import count, fewest

SMALL = ["small-cnn", "tiny-cnn", "wrn-8-1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test box has 2 shared cores: one intra-op thread avoids spin-wait contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_wrn_params(in_ch: int, classes: int, depth: int, width: int) -> int:
    """Count from the architecture description, independently of the implementation."""
    units = (depth - 2) // 6
    total = 9 * in_ch * 16  # init_conv, no bias
    prev = 16
    for w in (16 * width, 32 * width, 64 * width):
        for u in range(units):
            cin = prev if u == 0 else w
            total += 2 * cin + 9 * cin * w  # bn1 (gamma, beta) + conv1
            total += 2 * w + 9 * w * w  # bn2 + conv2
        prev = w
    return total + 2 * prev + prev * classes + classes  # final_bn + fc (with bias)


def test_registry_names():
    assert {"wrn-32-10", "wrn-40-2", "small-cnn", "tiny-cnn"} <= set(arch_names())
    assert arch_names() == ARCHS.names()


@pytest.mark.parametrize("arch", SMALL)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 96, 96), (3, 7, 9)])
def test_output_shape(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, shape[0], 7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_wrn_40_2_forward_tiny_input():
    torch.manual_seed(0)
    model = build_model("wrn-40-2", 3, 10).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 12, 12))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "arch,in_ch,classes,depth,width,units,widths",
    [
        ("wrn-32-10", 3, 10, 32, 10, 5, (160, 320, 640)),
        ("wrn-32-10", 3, 100, 32, 10, 5, (160, 320, 640)),
        ("wrn-40-2", 3, 10, 40, 2, 6, (32, 64, 128)),
        ("wrn-14-2", 1, 10, 14, 2, 2, (32, 64, 128)),
    ],
)
def test_wrn_structure_and_param_count(arch, in_ch, classes, depth, width, units, widths):
    with torch.device("meta"):
        model = build_model(arch, in_ch, classes)
    assert isinstance(model, WideResNet)
    assert count_params(model) == expected_wrn_params(in_ch, classes, depth, width)
    assert [len(s) for s in model.stages] == [units] * 3
    assert [s[0].conv1.out_channels for s in model.stages] == list(widths)
    assert [s[0].conv1.stride for s in model.stages] == [(1, 1), (2, 2), (2, 2)]
    assert model.init_conv.out_channels == 16 and model.init_conv.stride == (1, 1)
    assert model.fc.bias is not None and model.fc.in_features == widths[-1]
    # Madry: activate_before_residual only for unit_1_0
    flags = [u.activate_before_residual for s in model.stages for u in s]
    assert flags == [True] + [False] * (3 * units - 1)
    # no 1x1 convs, no conv biases, no extra parameters in shortcuts
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.kernel_size == (3, 3) and m.bias is None
        if isinstance(m, MadryUnit):
            assert count_params(m.shortcut) == 0


def test_wrn_32_10_size_matches_madry():
    # Madry's model without 1x1 shortcut convs: 45.9M (the 46.2M often quoted is TRADES' WRN-34-10)
    with torch.device("meta"):
        n = count_params(build_model("wrn-32-10", 3, 10))
    assert n == 45_901_914


def test_pad_shortcut_is_avgpool_plus_zero_pad():
    torch.manual_seed(0)
    sc = PadShortcut(16, 32, 2)
    assert count_params(sc) == 0
    x = torch.randn(2, 16, 8, 6)
    expected = torch.zeros(2, 32, 4, 3)
    expected[:, 8:24] = x.reshape(2, 16, 4, 2, 3, 2).mean(dim=(3, 5))
    assert torch.allclose(sc(x), expected, atol=1e-6)
    # stride 1, channel change only (unit_1_0): pure zero-padding
    sc1 = PadShortcut(16, 160, 1)
    y = sc1(x)
    assert y.shape == (2, 160, 8, 6)
    assert torch.equal(y[:, 72:88], x) and not y[:, :72].any() and not y[:, 88:].any()


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@torch.no_grad()
def test_unit_forward_matches_madry_residual():
    torch.manual_seed(0)
    model = build_model("wrn-8-2", 3, 10).eval()
    _randomise_bn(model)
    act = lambda t: torch.where(t < 0, 0.1 * t, t)  # Madry's _relu(x, 0.1)

    def madry_residual(u, x, in_f, out_f, stride, activate_before_residual):
        if activate_before_residual:
            x = act(u.bn1(x))
            orig = x
        else:
            orig = x
            x = act(u.bn1(x))
        x = F.conv2d(x, u.conv1.weight, stride=stride, padding=1)
        x = F.conv2d(act(u.bn2(x)), u.conv2.weight, padding=1)
        if in_f != out_f:
            orig = F.avg_pool2d(orig, stride, stride)
            p = (out_f - in_f) // 2
            orig = F.pad(orig, (0, 0, 0, 0, p, p))
        return x + orig

    x = torch.randn(2, 16, 8, 8)
    u0 = model.stages[0][0]  # 16 -> 32, stride 1, activate_before_residual=True
    assert torch.allclose(u0(x), madry_residual(u0, x, 16, 32, 1, True), atol=1e-5)
    # and the activated input really is what the shortcut sees (differs from the raw-input form)
    assert not torch.allclose(u0(x), madry_residual(u0, x, 16, 32, 1, False), atol=1e-3)
    h = torch.randn(2, 32, 8, 8)
    u1 = model.stages[1][0]  # 32 -> 64, stride 2, activate_before_residual=False
    assert torch.allclose(u1(h), madry_residual(u1, h, 32, 64, 2, False), atol=1e-5)


def test_leaky_relu_and_bn_eps():
    model = build_model("wrn-8-1", 3, 10)
    leaky = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(leaky) == 2 * 3 + 1 and all(m.negative_slope == 0.1 for m in leaky)
    assert len(bns) == 2 * 3 + 1 and all(m.eps == 1e-3 and m.momentum == 0.1 for m in bns)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_tf_init():
    torch.manual_seed(0)
    model = build_model("wrn-8-4", 3, 10)
    w = model.stages[2][0].conv2.weight  # 256 -> 256: std sqrt(2 / (9 * 256))
    assert abs(w.std().item() / (2 / (9 * 256)) ** 0.5 - 1) < 0.02
    bound = (3 / model.fc.in_features) ** 0.5
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.abs().max() > 0.9 * bound
    assert not model.fc.bias.any()


@pytest.mark.parametrize("arch", ["nope", "wrn-32", "wrn-2-10", "resnet18"])
def test_unknown_arch_user_error(arch):
    with pytest.raises(UserError) as e:
        build_model(arch, 3, 10)
    msg = str(e.value)
    assert "\n" not in msg and "wrn-D-W" in msg
    if arch != "wrn-2-10":
        assert all(name in msg for name in arch_names())


@pytest.mark.parametrize("arch", SMALL)
def test_input_gradient_flows(arch):
    torch.manual_seed(0)
    model = build_model(arch, 1, 10).eval()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", SMALL)
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 10).eval()
    _randomise_bn(model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["tiny-cnn", "wrn-8-1"])
def test_autocast(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 10)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), torch.arange(4)).backward()
    assert torch.isfinite(x.grad).all()


def test_small_cnn_learns_digits():
    """Three epochs of plain SGD on digits give at least 95% held-out accuracy (98% here under
    every ATEN_CPU_CAPABILITY): binomial bound on the 397 images at FALSE_ALARM (tests/bounds.py)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    Y = torch.tensor(d.target)
    perm = torch.randperm(len(X))
    tr, te = perm[:1400], perm[1400:]
    model = build_model("small-cnn", 1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        model.train()
        order = tr[torch.randperm(len(tr))]
        for i in range(0, len(order), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[b]), Y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        right = model(X[te]).argmax(1) == Y[te]
    assert count(right) >= fewest(len(te), 0.95), count(right)


# The RobustBench architectures (robench.models.external), at small sizes where they have one;
# tests/test_external.py loads their checkpoints.
EXTERNAL = ["rb-wrn-10-1", "dm-wrn-10-2", "preact-resnet-18", "preact-resnet-18-fast", "resnet-18"]


@pytest.mark.parametrize("arch", EXTERNAL)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 7, 9)])
def test_external_output_shape(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, shape[0], 7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", EXTERNAL)
def test_external_gradient_and_channels_last(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 10).eval()
    _randomise_bn(model)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = model(x)
    F.cross_entropy(out, torch.arange(2)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        cl = model.to(memory_format=torch.channels_last)(x.detach().to(memory_format=torch.channels_last))
    assert torch.allclose(cl, out.detach(), atol=1e-4, rtol=1e-4)


def test_dm_same_padding():
    """DeepMind pads its strided convs as TF's 'SAME': 0 before, 1 after, on even sizes."""
    from robench.models.external import _same_pad

    assert _same_pad(torch.Size([32, 32]), 2) == (0, 1, 0, 1)
    assert _same_pad(torch.Size([32, 16]), 1) == (1, 1, 1, 1)
    assert _same_pad(torch.Size([7, 8]), 2) == (0, 1, 1, 1)


@pytest.mark.parametrize("arch", ["dm-wrn-30-10", "rb-wrn-4-10", "dm-wrn-28-0"])
def test_external_wrn_bad_depth(arch):
    with pytest.raises(UserError, match=r"D = 6n \+ 4 >= 10"):
        build_model(arch, 3, 10)
