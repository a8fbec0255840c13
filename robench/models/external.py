"""The architectures most RobustBench CIFAR entries use, in their usual PyTorch form, so that their
checkpoints load with ``strict=True`` (module names and shapes follow RobustBench's
``model_zoo/architectures/``; the code is our own).

* ``rb-wrn-D-W``: the TRADES wide ResNet (``wide_resnet.py``, from yaodongyu/TRADES), ReLU,
  BN-ReLU-conv pre-activation blocks, a 1x1-conv shortcut where the width changes. Keys
  ``conv1``, ``block1.layer.0.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``. Many entries
  were saved with RobustBench's unused ``sub_block1`` (``sub_block1=True``): those keys are
  dropped on loading (``ignored_state_keys``), as its forward never reads them.
* ``dm-wrn-D-W``: DeepMind's wide ResNet (``dm_wide_resnet.py``, Gowal et al. 2020, Rebuffi et al.
  2021), Swish (= SiLU) as every RobustBench entry builds it, TF-style 'SAME' padding (0 before,
  1 after) on the strided convs. Keys ``init_conv``, ``layer.0.block.0.{batchnorm_0,conv_0,
  batchnorm_1,conv_1,shortcut}``, ``batchnorm``, ``logits``. Like RobustBench's, it normalises its
  input itself, with non-persistent buffers (no keys; the files carry nothing to detect): CIFAR-10's
  statistics, CIFAR-100's with 100 classes, as every RobustBench entry builds it; none on inputs
  that are not 3-channel. ``--mean/--std`` replace them (``none`` for no normalisation).
* ``preact-resnet-18``: Rice et al. 2020's PreActResNet-18 (RobustBench ``PreActBlockV2`` with
  ``bn_before_fc=True``: the shortcut sees the activated input, a final BN-ReLU ``bn``).
  ``preact-resnet-18-fast``: Wong et al. 2020's (fast AT; Andriushchenko & Flammarion 2020)
  ``PreActBlock``: the shortcut sees the raw input, no final BN. Keys ``conv1``,
  ``layer1.0.{bn1,conv1,bn2,conv2,shortcut.0}``, [``bn``], ``linear``.
* ``resnet-18``: kuangliu's CIFAR ResNet-18 (``ResNet18``). Keys ``conv1``, ``bn1``,
  ``layer1.0.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``, ``linear``.

One deliberate difference: RobustBench ends each of these in ``avg_pool2d`` with a fixed kernel
(8 or 4: the last feature map of a 32x32 input); ours pool globally, which is the same on 32x32
inputs and also runs on other sizes. BatchNorm uses PyTorch's defaults, as theirs does.

RobustBench's other normalising entries (checked against its ``model_zoo/cifar10.py`` and
``cifar100.py``) wrap a plain architecture in a class with ``mu``/``sigma`` buffers, and the same
architecture also serves unnormalised entries (Andriushchenko2020Understanding is Wong2020Fast's
PreActResNet-18 without one). So these carry no default: a file that stores ``mu``/``sigma`` (or
``normalize.mean``/``std``) is normalised with them, and one that does not (RobustBench loads
these entries' files without them, keeping its class's values) needs ``--mean/--std`` as the
class defines them. CIFAR-10, ``cifar10``:
Wong2020Fast (``preact-resnet-18-fast``), Rice2020Overfitting (Linf ``rb-wrn-34-20``, L2
``preact-resnet-18``), Kireev2021Effectiveness (``preact-resnet-18``), Chen2020Efficient
(``rb-wrn-34-10``). Own digits: Augustin2020Adversarial_34_10 (``rb-wrn-34-10``; 0.49140,
0.48216, 0.44653 / 0.24703, 0.24349, 0.26159), Rony2019Decoupling (``rb-wrn-28-10``; 0.491,
0.482, 0.447 / 0.247, 0.243, 0.262), Hendrycks2019Using (``rb-wrn-28-10``, 2x - 1: 0.5 / 0.5).
CIFAR-100, ``cifar100`` to 4 places: Rice2020Overfitting (``preact-resnet-18``),
Wu2020Adversarial (``rb-wrn-34-10``); own digits: Chen2020Efficient (``rb-wrn-34-10``; 0.5071,
0.4867, 0.4408 / 0.2675, 0.2565, 0.2761), Hendrycks2019Using (0.5 / 0.5). DMPreActResNet (the
R18 entries of Rebuffi2021, Gowal2021, Rade2021) has no robench counterpart.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from robench.models.normalize import NAMED_STATS, OwnNormalization
from robench.registry import ARCHS

__all__ = ["DMWideResNet", "PreActResNet18", "ResNet18", "TradesWideResNet", "parse_external_wrn"]

_WRN_RE = re.compile(r"(rb|dm)-wrn-(\d+)-(\d+)")


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=False)


def _he_init(model: nn.Module) -> None:
    """TRADES' initialisation (conv ~ N(0, 2 / (k*k*out)), BN 1/0, fc bias 0); only matters for
    training from scratch, as loading replaces every weight. Skipped on the meta device."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _blocks_per_stage(depth: int, name: str) -> int:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"{name}: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ..., 70), got {depth}")
    return (depth - 4) // 6


class _Stage(nn.Module):
    """A run of blocks, the first one changing width and stride; ``attr`` names the Sequential
    (``layer`` in TRADES' ``NetworkBlock``, ``block`` in DeepMind's ``_BlockGroup``)."""

    def __init__(self, block: type, n: int, cin: int, cout: int, stride: int, attr: str, **kw) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.Sequential(*(block(cin if i == 0 else cout, cout, stride if i == 0 else 1, **kw)
                                            for i in range(n))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x)


class _TradesBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = _conv(cin, cout, stride=stride)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = _conv(cout, cout)
        # TRADES tests the width only; in a wide ResNet every stride change comes with one.
        self.convShortcut = _conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        if self.convShortcut is not None:
            x = self.convShortcut(out)  # a width change: the shortcut sees the activated input
        return x + self.conv2(self.relu2(self.bn2(self.conv1(out))))


class TradesWideResNet(nn.Module):
    """``rb-wrn-D-W``: RobustBench's ``WideResNet(depth, num_classes, widen_factor)``."""

    ignored_state_keys = ("sub_block1.",)

    def __init__(self, in_channels: int, num_classes: int, depth: int = 28, width: int = 10) -> None:
        super().__init__()
        n = _blocks_per_stage(depth, f"rb-wrn-{depth}-{width}")
        c = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = _conv(in_channels, c[0])
        self.block1 = _Stage(_TradesBlock, n, c[0], c[1], 1, "layer")
        self.block2 = _Stage(_TradesBlock, n, c[1], c[2], 2, "layer")
        self.block3 = _Stage(_TradesBlock, n, c[2], c[3], 2, "layer")
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU()
        self.fc = nn.Linear(c[3], num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1)
        return self.fc(torch.flatten(out, 1))


class _DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: type = nn.SiLU) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.stride = stride
        self.batchnorm_0, self.relu_0 = nn.BatchNorm2d(cin), act()
        self.conv_0 = _conv(cin, cout, stride=stride, padding=0)  # padded by hand, as TF's 'SAME'
        self.batchnorm_1, self.relu_1 = nn.BatchNorm2d(cout), act()
        self.conv_1 = _conv(cout, cout)
        self.shortcut = _conv(cin, cout, 1, stride, padding=0) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_0(self.batchnorm_0(x))
        if self.shortcut is not None:
            x = self.shortcut(out)
        out = self.conv_0(F.pad(out, _same_pad(out.shape[-2:], self.stride)))
        return x + self.conv_1(self.relu_1(self.batchnorm_1(out)))


def _same_pad(size: torch.Size, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding of a 3x3 conv, extra pixel after: (1, 1) at stride 1, (0, 1) at stride 2
    on even sizes (DeepMind's fixed pads), (1, 1) at stride 2 on odd ones (where theirs fail)."""
    pads = []
    for n in (size[1], size[0]):  # F.pad lists the last dimension first
        total = max((-(-n // stride) - 1) * stride + 3 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def dm_default_stats(in_channels: int, num_classes: int) -> tuple | None:
    """The normalisation RobustBench builds its DMWideResNet entries with: CIFAR-10's statistics
    (its default), CIFAR-100's for its CIFAR-100 entries; no standard for other than 3 channels."""
    if in_channels != 3:
        return None
    return NAMED_STATS["cifar100" if num_classes == 100 else "cifar10"]


class DMWideResNet(OwnNormalization):
    """``dm-wrn-D-W``: RobustBench's ``DMWideResNet(num_classes, depth, width, activation_fn=Swish)``,
    normalising its input with ``dm_default_stats`` as RobustBench's entries do (non-persistent
    buffers; ``robench.models.normalize.normalized`` replaces them)."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 70, width: int = 16,
                 act: type = nn.SiLU) -> None:
        super().__init__()
        n = _blocks_per_stage(depth, f"dm-wrn-{depth}-{width}")
        c = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = _conv(in_channels, c[0])
        self.layer = nn.Sequential(*(_Stage(_DMBlock, n, c[i], c[i + 1], 1 if i == 0 else 2, "block", act=act)
                                     for i in range(3)))
        self.batchnorm, self.relu = nn.BatchNorm2d(c[3]), act()
        self.logits = nn.Linear(c[3], num_classes)
        self.set_input_normalization(*(dm_default_stats(in_channels, num_classes) or (None, None)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize_input(x)
        out = F.adaptive_avg_pool2d(self.relu(self.batchnorm(self.layer(self.init_conv(x)))), 1)
        return self.logits(torch.flatten(out, 1))


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut_after_act: bool) -> None:
        super().__init__()
        self.shortcut_after_act = shortcut_after_act
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, cout, stride=stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv(cout, cout)
        self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is not None:
            x = self.shortcut(out if self.shortcut_after_act else x)
        return x + self.conv2(F.relu(self.bn2(self.conv1(out))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, stride=stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def _resnet_layers(block, **kw) -> list[nn.Sequential]:
    """The four stages of a CIFAR ResNet-18: 2 blocks each, widths 64-512, strides 1/2/2/2."""
    widths, layers, cin = (64, 128, 256, 512), [], 64
    for i, w in enumerate(widths):
        layers.append(nn.Sequential(block(cin, w, 1 if i == 0 else 2, **kw), block(w, w, 1, **kw)))
        cin = w
    return layers


class PreActResNet18(nn.Module):
    """``preact-resnet-18`` (``final_bn=True``, Rice et al.) and ``preact-resnet-18-fast`` (Wong et al.)."""

    def __init__(self, in_channels: int, num_classes: int, final_bn: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, 64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet_layers(_PreActBlock, shortcut_after_act=final_bn)
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class ResNet18(nn.Module):
    """``resnet-18``: kuangliu's CIFAR ResNet-18 (3x3 stem, no max-pool)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(in_channels, 64), nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet_layers(_BasicBlock)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def parse_external_wrn(arch: str) -> tuple[str, int, int] | None:
    """``"rb-wrn-D-W"`` / ``"dm-wrn-D-W"`` -> (family, D, W); anything else -> None."""
    m = _WRN_RE.fullmatch(arch)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def build_external_wrn(family: str, in_channels: int, num_classes: int, depth: int, width: int) -> nn.Module:
    cls = TradesWideResNet if family == "rb" else DMWideResNet
    return cls(in_channels, num_classes, depth, width)


def _register_wrn(family: str, depth: int, width: int, doc: str) -> None:
    def factory(in_channels: int, num_classes: int) -> nn.Module:
        return build_external_wrn(family, in_channels, num_classes, depth, width)

    factory.__doc__ = doc
    ARCHS.register(f"{family}-wrn-{depth}-{width}")(factory)


for _d, _w, _doc in ((28, 10, "TRADES WRN-28-10 (Carmon et al. 2019, Sehwag et al. 2020; 36.5M parameters)"),
                     (34, 10, "TRADES WRN-34-10 (Zhang et al. 2019 TRADES, Wu et al. 2020 AWP; 46.2M)"),
                     (34, 20, "TRADES WRN-34-20 (Rice et al. 2020, Gowal et al. 2020's 34-20 is dm-wrn-34-20)"),
                     (70, 16, "TRADES-style WRN-70-16 (ReLU, 1x1-conv shortcuts; 267M)")):
    _register_wrn("rb", _d, _w, _doc)
for _d, _w, _doc in ((28, 10, "DeepMind WRN-28-10, Swish (Gowal et al. 2020, Rebuffi et al. 2021)"),
                     (34, 20, "DeepMind WRN-34-20, Swish (Gowal et al. 2020)"),
                     (70, 16, "DeepMind WRN-70-16, Swish (Gowal et al. 2020, Rebuffi et al. 2021; 267M)")):
    _register_wrn("dm", _d, _w, _doc)


@ARCHS.register("preact-resnet-18")
def preact_resnet_18(in_channels: int, num_classes: int) -> nn.Module:
    """PreActResNet-18 of Rice et al. 2020 (final BN, shortcut on the activated input)."""
    return PreActResNet18(in_channels, num_classes, final_bn=True)


@ARCHS.register("preact-resnet-18-fast")
def preact_resnet_18_fast(in_channels: int, num_classes: int) -> nn.Module:
    """PreActResNet-18 of Wong et al. 2020's fast AT (no final BN, shortcut on the raw input)."""
    return PreActResNet18(in_channels, num_classes, final_bn=False)


@ARCHS.register("resnet-18")
def resnet_18(in_channels: int, num_classes: int) -> nn.Module:
    """kuangliu's CIFAR ResNet-18 (e.g. Sehwag et al. 2021's R18)."""
    return ResNet18(in_channels, num_classes)
