"""A model file trained elsewhere: read without executing anything, unwrapped (the usual
wrappers and prefixes, RobustBench's ``{'best': ..., 'last': ...}`` pairs), matched to an
architecture key by key, with the input normalisation it stores. ``robench.targets.target_from_file``
builds the model from it; every failure is a one-line ``UserError``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robench import checkpoint
from robench.errors import UserError
from robench.models import arch_names, build_model, is_builtin

WRAPPERS = ("state_dict", "model_state_dict", "net", "model")
PICKS = ("best", "last")  # RobustBench's files of two models (its own loader takes 'last')
PREFIXES = ("module.", "model.", "_orig_mod.")
STORED_NORMS = (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std"))


def read_state(path: Path, pick: str | None = None) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """The state dict in ``path``; which model of a ``{'best': ..., 'last': ...}`` file it is
    (``pick``, else ``best``; None for a file of one model); and a description of it."""
    if pick is not None and pick not in PICKS:
        raise UserError(f"--checkpoint-key {pick!r}: choose {' or '.join(PICKS)}")
    if path.suffix == ".safetensors":
        if pick is not None:
            raise UserError(f"--checkpoint-key {pick}: {path} holds one model, not {{'best': ..., 'last': ...}}")
        return checkpoint.load_weights(path), None, f"file {path}"
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refuse anything that is not plain tensors; never execute it
        raise UserError(f"cannot load {path} safely as weights ({type(e).__name__}); "
                        f"save a state_dict or use safetensors") from None
    loaded = f"file {path}"
    pair = [k for k in PICKS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
    chosen = None
    if pair:
        chosen = pick or pair[0]
        if chosen not in pair:
            raise UserError(f"--checkpoint-key {pick}: {path} holds no {pick!r} model, only {pair[0]!r}")
        others = [k for k in pair if k != chosen]
        obj = obj[chosen]
        loaded += f", its {chosen!r} model" + (f" (--checkpoint-key {others[0]}: the other)" if others else "")
    elif pick is not None:
        raise UserError(f"--checkpoint-key {pick}: {path} holds one model, not {{'best': ..., 'last': ...}}")
    for _ in range(4):  # a wrapper, possibly inside another one
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in obj.items()):
            return dict(obj), chosen, loaded
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj, Mapping) and isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    found = f"; it holds keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, Mapping) and obj else ""
    raise UserError(f"{path} does not hold a state dict (tensors by name, bare or under "
                    f"{' / '.join(WRAPPERS)}){found}")


def _variants(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state``, then with each prefix every key shares stripped in turn ("module.model.x"); the
    keys of a stored normalisation need not share it (``normalize.mean`` beside ``model.x``)."""
    out = [state]
    while True:
        norm = {k for pair in STORED_NORMS if all(p in out[-1] for p in pair) for k in pair}
        rest = [k for k in out[-1] if k not in norm]
        prefix = next((p for p in PREFIXES if rest and all(k.startswith(p) for k in rest)), None)
        if prefix is None or len(out) > 4:
            return out
        out.append({k if k in norm else k[len(prefix):]: v for k, v in out[-1].items()})


def _mismatch(state: dict, expected: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    return missing, unexpected, shape


def match_keys(state: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str) -> tuple[dict, tuple | None]:
    """The variant of ``state`` whose keys and shapes are exactly the model's, with the input
    normalisation the file stores beside them (``_stored_norm``), or a one-line ``UserError``
    that names the differences and, where it can tell, the right ``--arch``."""
    expected = model.state_dict()
    ignored = tuple(getattr(model, "ignored_state_keys", ()))
    best = None
    for variant in _variants(state):
        variant = {k: v for k, v in variant.items() if not (ignored and k.startswith(ignored))}
        variant, stored = _stored_norm(variant, expected)
        diff = _mismatch(variant, expected)
        if not any(diff):
            for k in expected:  # files from before PyTorch 0.4.1 lack BN's step counter; it is unused
                variant.setdefault(k, expected[k])
            return variant, stored
        if best is None or sum(map(len, diff)) < sum(map(len, best[1])):
            best = (variant, diff)
    variant, (missing, unexpected, shape) = best
    shapes = [f"{k} {tuple(variant[k].shape)} vs {tuple(expected[k].shape)}" for k in shape]
    parts = [f"missing {len(missing)} keys: {_some(missing)}" if missing else "",
             f"unexpected {len(unexpected)}: {_some(unexpected)}" if unexpected else "",
             f"{len(shape)} of another shape (file vs model): {_some(shapes)}" if shape else ""]
    guess = guess_arch(variant)
    hint = ("" if guess == arch else f"; they look like --arch {guess}" if guess else
            "; see `robench list` for architectures, or give --arch package.module:factory")
    raise UserError(f"weights in {path} do not fit architecture {arch!r} ({'; '.join(p for p in parts if p)}){hint}")


def _some(keys, n: int = 2) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _stored_norm(state: dict, expected: dict) -> tuple[dict, tuple | None]:
    """``state`` less an input normalisation the file stores but the model does not expect (the
    ``mu``/``sigma`` buffers of RobustBench's normalising wrappers, ``normalize.mean``/``std`` of its
    ``normalize_model``), and that normalisation: (mean key, std key, mean, std)."""
    for m_key, s_key in STORED_NORMS:
        if m_key in state and s_key in state and m_key not in expected and s_key not in expected:
            stored = (m_key, s_key, _floats(state[m_key]), _floats(state[s_key]))
            return {k: v for k, v in state.items() if k not in (m_key, s_key)}, stored
    return state, None


def _floats(t: torch.Tensor) -> tuple[float, ...]:
    """A tensor's values as the shortest decimals that give them back (float32's 0.4914 as 0.4914,
    not 0.49140000343: the same model as ``--mean 0.4914`` has the same result key)."""
    if t.dtype == torch.float64:
        return tuple(t.flatten().tolist())
    return tuple(float(str(np.float32(v))) for v in t.float().flatten().tolist())


def check_norm(stored: tuple, path: Path, mean, std, channels: int) -> None:
    """The stored normalisation fits the images, and is the one given as --mean/--std if any:
    robench never drops one silently, nor applies another."""
    m_key, s_key, *values = stored
    if len(values[0]) != len(values[1]) or len(values[0]) not in (1, channels):
        raise UserError(f"{path} stores an input normalisation ({m_key}, {s_key}) of {len(values[0])} and "
                        f"{len(values[1])} values, for images of {channels} channel(s)")
    text = f"--mean {','.join(f'{v:g}' for v in values[0])} --std {','.join(f'{v:g}' for v in values[1])}"
    if mean is None:
        return
    for given, want in zip((list(mean), list(std)), values):
        given = given * len(want) if len(given) == 1 else given
        if len(given) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(given, want)):
            raise UserError(f"--mean/--std differ from the normalisation {path} stores ({text})")


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """A robench architecture that takes ``state`` up to its input channels and classes, if any.
    Candidates are the registered names and the wide ResNet its keys describe; each is built on
    the meta device (no memory, no initialisation)."""
    candidates = [a for a in arch_names() if is_builtin(a)]
    for family, stage, first, base in (("rb-wrn", "block1.layer.", "block1.layer.0.conv1.weight", 4),
                                       ("dm-wrn", "layer.0.block.", "layer.0.block.0.conv_0.weight", 4),
                                       ("wrn", "stages.0.", "stages.0.0.conv1.weight", 2)):
        if first in state:
            n = len({k[len(stage):].split(".")[0] for k in state if k.startswith(stage)})
            candidates.insert(0, f"{family}-{6 * n + base}-{state[first].shape[0] // 16}")
    for arch in dict.fromkeys(candidates):
        try:
            with torch.device("meta"):
                other = build_model(arch, 3, 10)
        except (UserError, ValueError):
            continue
        if _layout(other.state_dict(), other) == _layout(state, other):
            return arch
    return None


def _layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, tuple | None]:
    """Key -> shape, less BN step counters and ``model``'s ignored keys; the shapes of its stem
    (first conv) and head (last linear layer) do not count, as they depend on the data."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    free = {f"{n}.{p}" for n in names[:1] + names[-1:] for p in ("weight", "bias")}
    ignored = tuple(getattr(model, "ignored_state_keys", ()))
    return {k: None if k in free else tuple(v.shape) for k, v in state.items()
            if not k.endswith("num_batches_tracked") and not (ignored and k.startswith(ignored))}
