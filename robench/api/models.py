"""Models from Python: ``load_model`` and the identity a module's results are stored under."""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from robench.errors import UserError


@dataclass(frozen=True)
class Origin:
    """Where a module ``load_model`` returned came from: while its weights are unchanged it is
    stored under that checkpoint's identity, exactly as ``robench eval`` stores it."""

    digest: str  # model_digest at load time
    label: str
    identity: str
    dataset: str
    described: str  # "LABEL: zoo checkpoint ..." as robench eval prints it


_ORIGINS: "weakref.WeakKeyDictionary[nn.Module, Origin]" = weakref.WeakKeyDictionary()


def model_digest(model: nn.Module) -> str:
    """sha256 of a module's class name and every parameter and buffer (name, dtype, shape and
    bytes, in registration order). A changed weight, buffer or class gives another digest; the
    device and memory layout do not count."""
    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\0".encode())
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            t = t.detach().cpu().contiguous()
            h.update(f"{kind}\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identify(model: nn.Module, name: str | None) -> tuple[str, str, str]:
    """(label, identity, described) of ``model``: a module from ``load_model`` whose weights are
    unchanged keeps its checkpoint's identity; any other module is its ``model_digest``."""
    digest = model_digest(model)
    origin = _ORIGINS.get(model)
    if origin is not None and origin.digest == digest:
        label = name or origin.label
        return label, origin.identity, origin.described if label == origin.label else \
            f"{label}: {origin.described.partition(': ')[2]}"
    label = name or type(model).__name__
    return label, digest, f"{label}: torch module {type(model).__qualname__}, parameters and buffers sha256 {digest[:12]}"


def load_model(name: str, *, workdir: str | Path | None = None, dataset: str | None = None,
               device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """A trained model as a ``torch.nn.Module`` that maps images in [0, 1] to logits.

    ``name`` is a zoo entry (``"pgdat-digits"``, see ``robench zoo list``), a defense
    (``"rlfat-t"``: its newest finished run in ``workdir``, else the zoo's checkpoint; ``dataset``
    picks among several), or the name of a run in ``workdir/runs/``. The weights' sha256 is
    verified before they are used (a zoo file missing from the cache is downloaded first); any
    input normalisation is inside the model. The module is in eval mode, on the CPU unless
    ``device`` is given. ``robench.evaluation`` stores its results under the checkpoint's identity,
    the same rows as ``robench eval --defense NAME``, as long as its weights are unchanged.
    """
    from robench import checkpoint, zoo
    from robench.registry import DEFENSES
    from robench.targets import Source, find_sources, target_from_run, target_from_zoo
    from robench.workdir import resolve_workdir, runs_dir

    if not isinstance(name, str) or not name:
        raise UserError(f"load_model takes a name (a zoo entry, a defense or a run), got {name!r}")
    wd = None if workdir is None else resolve_workdir(Path(workdir))
    source = None
    if wd is not None and (runs_dir(wd) / name / checkpoint.META).is_file():
        meta = checkpoint.read_meta(runs_dir(wd) / name)
        if dataset is not None and meta["dataset"] != dataset:
            raise UserError(f"run {name} in {wd} was trained on {meta['dataset']}, not {dataset}")
        source = Source(meta["dataset"], runs_dir(wd) / name)
    elif name in DEFENSES or name in {e.name for e in zoo.entries()}:
        source = find_sources([name], wd if wd is not None else Path("."), dataset, zoo_only=wd is None)[0]
    else:
        runs = f", nor a run in {runs_dir(wd)}" if wd is not None else " (pass workdir= for a trained run)"
        raise UserError(f"unknown model {name!r}: not a zoo entry ({', '.join(e.name for e in zoo.entries())}), "
                        f"nor a defense ({', '.join(DEFENSES.names())}){runs}")
    target = target_from_run(source.run_dir) if source.entry is None else target_from_zoo(source.entry, progress)
    model = target.model.eval().to(torch.device(device) if device is not None else "cpu")
    _ORIGINS[model] = Origin(model_digest(model), target.label, target.sha256, target.dataset,
                             f"{target.label}: {source.describe()}")
    return model


@contextlib.contextmanager
def borrowed(model: nn.Module) -> Iterator[None]:
    """Give the model back as it came: its device and each tensor's contiguous layout (the
    runtime moves it and makes it channels_last); the train/eval flags are ``model_mode``'s."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else None
    layout = [(t, t.is_contiguous()) for t in tensors]
    try:
        yield
    finally:
        if device is not None:
            model.to(device)
        for t, was in layout:
            if was and not t.is_contiguous():
                t.data = t.data.contiguous()
