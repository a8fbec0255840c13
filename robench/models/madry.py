"""The Madry-style wide ResNet of the paper (``wrn-D-W``), and small CNNs for the CPU default.

They apply no input normalisation (the RLFAT code feeds raw [0, 1] pixels; unlike MadryLab's
original, its ``model_bn.py`` has no ``per_image_standardization``).

The wide ResNet follows MadryLab/cifar10_challenge ``model.py`` (commit e3ad969), which the
official RLFAT code copies as ``{cifar_10,cifar_100,stl_10}/model_bn.py`` (JHL-HUST/RLFAT):

* ``init_conv``: 3x3 conv, 16 filters, stride 1, 'SAME' padding, no bias (no conv has a bias).
* 3 stages with strides 1/2/2; ``activate_before_residual = [True, False, False]`` is passed to the
  first unit of each stage only, so only unit_1_0 activates before the shortcut.
* ``_residual``: (BN -> LeakyReLU(0.1)) -> conv3x3(stride) -> BN -> LeakyReLU(0.1) -> conv3x3,
  plus the shortcut; when ``in_filter != out_filter`` the shortcut is
  ``avg_pool(stride, stride, 'VALID')`` then a symmetric zero-pad of (out - in) // 2 channels.
* ``unit_last``: BN -> LeakyReLU(0.1) -> global average pool; ``logit``: fully connected + bias.
* BN is ``tf.contrib.layers.batch_norm(decay=.9)`` with its default epsilon 0.001, i.e. PyTorch
  ``BatchNorm2d(eps=1e-3, momentum=0.1)``.
* Init: conv ``random_normal(stddev=sqrt(2 / (k*k*out)))`` (= kaiming-normal, fan-out);
  fc ``uniform_unit_scaling(factor=1)`` = U(-sqrt(3 / fan_in), +sqrt(3 / fan_in)), bias 0; BN
  gamma 1, beta 0. We use exactly these.
* The model defines an L2 term on its conv and fc weights, but RLFAT trains with plain Adam and
  no weight decay (App. A; docs/design.md, section 5), so robench has none.

Known, deliberate difference: for the stride-2 convs TF 'SAME' pads 0 before / 1 after an even
input, PyTorch ``padding=1`` pads 1 on both sides. Output sizes are identical; the sampling grid is
shifted by one pixel. It only matters when loading TF checkpoints, which we do not do. The
shortcut's average pool uses ``ceil_mode=True``, identical to 'VALID' for even sizes and the only
way odd sizes (where TF's own code would fail) still line up with the strided conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robench.registry import ARCHS

__all__ = ["BN_EPS", "LEAK", "MadryUnit", "PadShortcut", "SmallCNN", "WideResNet"]

BN_EPS = 1e-3  # tf.contrib.layers.batch_norm default epsilon
BN_MOMENTUM = 0.1  # TF decay 0.9
LEAK = 0.1  # Madry's _relu(x, 0.1)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _tf_init(module: nn.Module) -> None:
    """Madry's initialisers (see the module docstring). A model built on the meta device is left
    alone (initialising meta tensors is slow and pointless); call ``model.init_weights()`` after
    ``to_empty``."""
    if any(p.is_meta for p in module.parameters()):
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = math.sqrt(3.0 / m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: average pool (kernel = stride = ``stride``), then zero-pad the
    channels symmetrically from ``in_channels`` to ``out_channels`` (Madry's ``sub_add``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(f"cannot pad {in_channels} channels symmetrically to {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.pad:
            # (W_left, W_right, H_top, H_bottom, C_front, C_back)
            x = F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class MadryUnit(nn.Module):
    """Madry's ``_residual``: pre-activation unit with two 3x3 convs.

    ``activate_before_residual=True``: x = act(bn1(x)); shortcut = x (unit_1_0 only).
    ``activate_before_residual=False``: shortcut = x; x = act(bn1(x)).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, activate_before_residual: bool
    ) -> None:
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = _bn(in_channels)
        self.act1 = nn.LeakyReLU(LEAK)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = _bn(out_channels)
        self.act2 = nn.LeakyReLU(LEAK)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # Madry tests in_filter != out_filter only; in every wrn-D-W a stride change comes with a
        # channel change, so also testing the stride is equivalent and shape-safe.
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate_before_residual:
            x = self.act1(self.bn1(x))
            orig = x
        else:
            orig = x
            x = self.act1(self.bn1(x))
        x = self.conv1(x)
        x = self.conv2(self.act2(self.bn2(x)))
        return x + self.shortcut(orig)

    def extra_repr(self) -> str:
        return f"activate_before_residual={self.activate_before_residual}"


class WideResNet(nn.Module):
    """Madry's wide ResNet ``wrn-D-W``: (D - 2) // 6 units per stage, filters 16W/32W/64W.

    wrn-32-10 is the paper's CIFAR model (5 units, 160/320/640), wrn-40-2 its STL-10 model
    (6 units, 32/64/128; "w40-2" in the official code).
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 32, width: int = 10) -> None:
        super().__init__()
        units = (depth - 2) // 6
        if units < 1 or width < 1:
            raise ValueError(f"wrn-{depth}-{width}: need depth >= 8 and width >= 1")
        self.depth, self.width, self.units = depth, width, units
        filters = [16, 16 * width, 32 * width, 64 * width]
        strides = [1, 2, 2]
        activate_before_residual = [True, False, False]
        self.init_conv = _conv3x3(in_channels, filters[0])
        stages = []
        for s in range(3):
            blocks = [MadryUnit(filters[s], filters[s + 1], strides[s], activate_before_residual[s])]
            blocks += [MadryUnit(filters[s + 1], filters[s + 1], 1, False) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_bn = _bn(filters[3])
        self.final_act = nn.LeakyReLU(LEAK)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters[3], num_classes)
        self.num_features = filters[3]
        _tf_init(self)

    def init_weights(self) -> None:
        _tf_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features (the official code's ``model.feature``), shape (B, 64W)."""
        x = self.stages(self.init_conv(x))
        return torch.flatten(self.pool(self.final_act(self.final_bn(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class SmallCNN(nn.Module):
    """conv3x3+BN+ReLU x3 (strides 1/2/2) -> global average pool -> linear.

    Sized for scikit-learn digits (1x8x8) on CPU; works on any input size.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for w, stride in zip(widths, (1, 2, 2)):
            layers += [
                nn.Conv2d(cin, w, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        _tf_init(self)

    def init_weights(self) -> None:
        _tf_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@ARCHS.register("wrn-32-10")
def wrn_32_10(in_channels: int, num_classes: int) -> nn.Module:
    """The paper's CIFAR-10/100 model (Madry's wide ResNet, 45.9M parameters)."""
    return WideResNet(in_channels, num_classes, 32, 10)


@ARCHS.register("wrn-40-2")
def wrn_40_2(in_channels: int, num_classes: int) -> nn.Module:
    """The paper's STL-10 model ("w40-2" in the official code)."""
    return WideResNet(in_channels, num_classes, 40, 2)


@ARCHS.register("small-cnn")
def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """CPU-sized default for the embedded digits dataset (widths 32/64/128)."""
    return SmallCNN(in_channels, num_classes, (32, 64, 128))


@ARCHS.register("tiny-cnn")
def tiny_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Half of small-cnn (widths 16/32/64), for tests."""
    return SmallCNN(in_channels, num_classes, (16, 32, 64))
