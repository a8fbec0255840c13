"""Architectures. Every entry of ``ARCHS`` is a factory ``(in_channels, num_classes) -> nn.Module``.
Models take images in [0, 1] of shape (B, C, H, W), any H and W (they end in a global average
pool), and return logits; a model that expects normalised inputs is wrapped in
``normalize.Normalized``, so it still takes [0, 1] (``dm-wrn-D-W`` normalises by itself, as
RobustBench's DMWideResNet: ``normalize.normalized`` gives any model one normalisation, once).

- ``madry``: the paper's Madry-style wide ResNet (``wrn-32-10``, ``wrn-40-2``, any ``wrn-D-W``)
  and the small CNNs of the CPU default (``small-cnn``, ``tiny-cnn``).
- ``external``: the architectures of most RobustBench CIFAR entries, which load their checkpoints
  as they are: ``rb-wrn-D-W`` (TRADES), ``dm-wrn-D-W`` (DeepMind), ``preact-resnet-18``,
  ``preact-resnet-18-fast``, ``resnet-18``.

Use :func:`build_model` rather than ``ARCHS`` directly: besides the registered names it builds any
``wrn-D-W``, ``rb-wrn-D-W`` and ``dm-wrn-D-W``, and (``allow_import=True``, for ``eval
--checkpoint`` only) a user's own ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import inspect
import re

from torch import nn

from robench.errors import UserError
from robench.models.external import build_external_wrn, parse_external_wrn
from robench.models.madry import BN_EPS, LEAK, MadryUnit, PadShortcut, SmallCNN, WideResNet
from robench.models.normalize import Normalized
from robench.registry import ARCHS

__all__ = [
    "BN_EPS", "LEAK", "MadryUnit", "Normalized", "PadShortcut", "SmallCNN", "WideResNet", "arch_names",
    "build_model", "count_params", "is_builtin", "is_factory_spec", "parse_wrn",
]

_WRN_RE = re.compile(r"wrn-(\d+)-(\d+)")
_FACTORY_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
PATTERNS = "wrn-D-W (Madry), rb-wrn-D-W (TRADES), dm-wrn-D-W (DeepMind)"


def parse_wrn(arch: str) -> tuple[int, int] | None:
    """``"wrn-D-W"`` -> (D, W); anything else -> None."""
    m = _WRN_RE.fullmatch(arch)
    return (int(m.group(1)), int(m.group(2))) if m else None


def arch_names() -> list[str]:
    """The registered architecture names (any ``wrn-D-W``, ``rb-wrn-D-W``, ``dm-wrn-D-W`` is
    buildable as well)."""
    return ARCHS.names()


def is_factory_spec(arch: str) -> bool:
    return ":" in arch


def is_builtin(arch: str) -> bool:
    """An architecture defined by robench itself (not a plugin's, not a user factory's)."""
    if parse_wrn(arch) or parse_external_wrn(arch):
        return True
    return arch in ARCHS and getattr(ARCHS.get(arch), "__module__", "").startswith("robench.models")


def build_model(arch: str, in_channels: int, num_classes: int, *, allow_import: bool = False) -> nn.Module:
    """Build a registered architecture, any ``wrn-D-W`` / ``rb-wrn-D-W`` / ``dm-wrn-D-W``, or, with
    ``allow_import``, ``package.module:factory``. Unknown names raise ``UserError``."""
    if arch in ARCHS:
        return ARCHS.get(arch)(in_channels, num_classes)
    dw = parse_wrn(arch)
    if dw is not None:
        depth, width = dw
        if (depth - 2) // 6 < 1 or width < 1:
            raise UserError(
                f"architecture {arch!r}: wrn-D-W needs D >= 8 (units per stage = (D-2)//6) "
                "and W >= 1"
            )
        return WideResNet(in_channels, num_classes, depth, width)
    ext = parse_external_wrn(arch)
    if ext is not None:
        family, depth, width = ext
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise UserError(f"architecture {arch!r}: {family}-wrn-D-W needs D = 6n + 4 >= 10 (e.g. 28, 34, 70) "
                            "and W >= 1")
        return build_external_wrn(family, in_channels, num_classes, depth, width)
    if is_factory_spec(arch):
        if not allow_import:
            raise UserError(f"architecture {arch!r}: a package.module:factory is accepted by "
                            "`eval --checkpoint --arch` only")
        return _from_factory(arch, in_channels, num_classes)
    raise UserError(
        f"unknown architecture {arch!r}; choose from: {', '.join(arch_names())}, "
        f"or any {PATTERNS} (widths 16W/32W/64W), or package.module:factory"
    )


def _from_factory(spec: str, in_channels: int, num_classes: int) -> nn.Module:
    """Import ``package.module`` (the user's own code, never anything from a checkpoint) and call
    ``factory(num_classes=..., in_channels=...)`` with the keywords its signature takes."""
    if not _FACTORY_RE.fullmatch(spec):
        raise UserError(f"--arch {spec!r}: expected package.module:factory (e.g. mypkg.nets:wrn)")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error at import time
        raise UserError(f"--arch {spec}: cannot import {module_name} ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--arch {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--arch {spec}: {attr} is not callable")
    wanted = {"num_classes": num_classes, "in_channels": in_channels}
    try:
        params = inspect.signature(obj).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = wanted
        else:
            kwargs = {k: v for k, v in wanted.items() if k in params}
    except (TypeError, ValueError):  # no signature to inspect (a builtin): call it bare
        kwargs = {}
    try:
        model = obj(**kwargs)
    except Exception as e:
        raise UserError(f"--arch {spec}: {attr}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) raised "
                        f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--arch {spec}: {attr} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())
