"""Where and how the arithmetic runs: device, bf16 autocast, channels_last, torch.compile, and
the model's train/eval mode.

On CPU everything is plain float32. On CUDA the defaults use the GPU well: bf16 autocast,
channels_last memory format and cuDNN autotuning; ``--no-amp`` turns autocast off and
``--compile`` wraps the model with ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from robench.errors import UserError


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put every submodule in train or eval mode, then restore each one's own flag (a model whose
    submodules were in mixed modes gets them back exactly)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Runtime:
    """How models run. Defaults, measured (``benchmarks/results/cpu_runtime.md``): channels_last
    everywhere (on CPU 1.11-1.26x for tiny-cnn, wrn-10-1 and wrn-16-2 on AMD EPYC; 1.1-1.34x on
    an Intel Xeon); bf16 autocast on CUDA, and on CPU only when asked (``--amp``): it is 1.6-2.2x
    faster for the WRNs on an AMD EPYC with bf16 instructions but 0.75x on wider models on an
    Intel Xeon, so no single CPU default is right, and it changes the numbers."""

    device: torch.device
    amp: bool = True  # bf16 autocast
    channels_last: bool = True
    compile: bool = False

    @classmethod
    def create(cls, device: str = "auto", amp: bool | None = None, compile: bool = False,
               channels_last: bool | None = None) -> "Runtime":
        """``amp``/``channels_last`` None: the measured default for the device (see the class)."""
        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(dev, amp=cuda if amp is None else amp, channels_last=True if channels_last is None else channels_last,
                   compile=compile)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def maybe_compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.compile else model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
