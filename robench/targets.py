"""What is evaluated: a model with the identity its results are stored under, loaded from a
trained run in the workdir, a zoo checkpoint, or a model file trained elsewhere (``target_from_file``: the
usual external layouts, an optional input normalisation). Loading never executes code from a
file."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from robench import checkpoint
from robench.data import Splits
from robench.errors import UserError
from robench.models import Normalized, arch_names, build_model, is_builtin
from robench.models.normalize import input_normalization, normalized
from robench.registry import DEFENSES


@dataclass
class Target:
    """A model to evaluate, with the identity its results are stored under."""

    label: str  # defense name, or the file name for a plain model file
    model: nn.Module
    sha256: str
    dataset: str
    meta: dict[str, Any]


def target_from_run(run_dir: Path) -> Target:
    meta = checkpoint.read_meta(run_dir)
    model = build_model(meta["arch"], meta["in_channels"], meta["num_classes"])
    checkpoint.load(run_dir, model)
    return Target(meta["defense"], model, meta["files"]["weights"]["sha256"], meta["dataset"], meta)


def target_from_file(path: Path, arch: str, dataset: str, splits: Splits,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Target:
    """A model trained elsewhere: a safetensors file, or a state dict loaded with
    ``torch.load(weights_only=True)``; neither can execute code. The state dict may be bare or
    under ``state_dict`` / ``model_state_dict`` / ``net`` / ``model`` (nested too), its keys may
    carry ``module.`` (DataParallel), ``model.`` or ``_orig_mod.`` (torch.compile) prefixes, also
    beside a stored normalisation (RobustBench's ``normalize_model``: ``normalize.mean``,
    ``normalize.std`` and ``model.*``). ``arch``: any name ``build_model`` knows, or ``package.module:factory`` (the user's code).
    ``mean``/``std``: an input normalisation applied inside the model, after loading, instead of
    the architecture's own (``dm-wrn``'s, as RobustBench's); mean 0 and std 1: none at all. A
    normalisation the file stores is applied (once) without them, and refused if they differ.
    The normalisation the model applies is part of its identity and of ``meta["loaded"]``."""
    if (mean is None) != (std is None):
        raise UserError("--mean and --std go together: give both (or neither)")
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    channels = splits.image_shape[0]
    for option, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise UserError(f"{option} has {len(values)} values but {dataset} images have {channels} channel(s)")
    model = build_model(arch, channels, splits.num_classes, allow_import=True)
    state = _read_state(path)
    state, stored = _match_keys(state, model, path, arch)
    checkpoint.load_into(model, state, path, arch)
    origin = f"{arch}'s own, as RobustBench's" if input_normalization(model) else ""
    if stored is not None:
        _check_norm(stored, path, mean, std, channels)
        mean, std = stored[2], stored[3]
    if mean is not None:
        try:
            model = normalized(model, mean, std)
        except ValueError as e:
            raise UserError(f"{f'the normalisation {path} stores' if stored else '--mean/--std'}: {e}") from None
        origin = f"stored in the file as {stored[0]}, {stored[1]}" if stored else "--mean/--std"
    norm = input_normalization(model)
    file_sha = checkpoint.sha256(path)
    loaded = f"file {path}"
    meta = {"defense": path.stem, "dataset": dataset, "arch": arch, "source": str(path), "weights_sha256": file_sha}
    if norm is not None:
        meta.update(mean=list(norm[0]), std=list(norm[1]))
        loaded += f", inputs normalised with mean {_csv(norm[0])} std {_csv(norm[1])} ({origin})"
    elif mean is not None:
        loaded += ", no input normalisation (--mean/--std none)"
    meta["loaded"] = loaded
    return Target(path.stem, model, model_identity(file_sha, arch, *(norm or (None, None))), dataset, meta)


def _csv(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def model_identity(file_sha: str, arch: str, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> str:
    """The ``checkpoint`` field of a file's result keys: its sha256, followed by what else
    makes the evaluated model, so two different models never share results. Robench's own
    architectures accept disjoint state dicts (tests/test_external.py), so the file alone names
    the model; a plugin's or a user factory's architecture is spelled out, and so is a
    normalisation: ``<sha256>+arch=pkg.mod:fn+mean=0.4914,0.4822,0.4465+std=0.2471,0.2435,0.2616``."""
    parts = [file_sha]
    if not is_builtin(arch):
        parts.append(f"arch={arch}")
    if mean is not None:
        parts += [f"mean={','.join(repr(float(m)) for m in mean)}", f"std={','.join(repr(float(s)) for s in std)}"]
    return "+".join(parts)


WRAPPERS = ("state_dict", "model_state_dict", "net", "model")
PREFIXES = ("module.", "model.", "_orig_mod.")
STORED_NORMS = (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std"))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return checkpoint.load_weights(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refuse anything that is not plain tensors; never execute it
        raise UserError(f"cannot load {path} safely as weights ({type(e).__name__}); "
                        f"save a state_dict or use safetensors") from None
    for _ in range(4):  # a wrapper, possibly inside another one
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in obj.items()):
            return dict(obj)
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


def _match_keys(state: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str) -> tuple[dict, tuple | None]:
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


def _check_norm(stored: tuple, path: Path, mean, std, channels: int) -> None:
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


@dataclass(frozen=True)
class Source:
    """Where a defense's checkpoint comes from: a finished run in the workdir, or a zoo entry."""

    dataset: str
    run_dir: Path | None = None
    entry: Any = None  # robench.zoo.Entry

    def load(self, splits: Splits) -> Target:
        """The checkpoint, once it is known to fit ``splits``: a model trained on one folder of
        images is refused on a folder with other classes or another image size."""
        target = target_from_run(self.run_dir) if self.entry is None else target_from_zoo(self.entry)
        check_fits(target.meta, splits, self.describe())
        return target

    def describe(self) -> str:
        if self.entry is None:
            return f"run {self.run_dir}"
        e = self.entry
        return f"zoo checkpoint {e.name} ({'shipped' if e.shipped else 'cached'}, sha256 {e.sha256[:12]})"


def check_fits(meta: dict[str, Any], splits: Splits, what: str) -> None:
    """A UserError unless the data has the classes, channels and image size ``meta`` was trained on."""
    classes = list(meta.get("classes") or [])
    if classes and classes != list(splits.classes):
        shown = lambda c: ", ".join(c[:5]) + (", ..." if len(c) > 5 else "")  # noqa: E731
        raise UserError(f"{what} was trained on {len(classes)} classes ({shown(classes)}), but the {splits.name} "
                        f"data has {len(splits.classes)} ({shown(list(splits.classes))})")
    shape = (meta.get("in_channels"), *(meta.get("image_size") or (None, None)))
    if any(want is not None and int(want) != got for want, got in zip(shape, splits.image_shape)):
        found = "x".join(str(v) for v in splits.image_shape)
        raise UserError(f"{what} was trained on {'x'.join(str(v) for v in shape)} images, but the "
                        f"{splits.name} data has {found}")


def target_from_zoo(entry: Any) -> Target:
    """A zoo entry's checkpoint: the shipped file, or the cached one (downloaded and verified
    first when missing). The sha256 is checked before the weights are used."""
    from robench import zoo

    path = zoo.local_path(entry, fetch=True)
    model = build_model(entry.arch, entry.in_channels, entry.num_classes)
    checkpoint.load_into(model, checkpoint.load_weights(path), path, entry.arch)
    if entry.mean is not None:
        model = Normalized(model, entry.mean, entry.std)
    identity = model_identity(entry.sha256, entry.arch, entry.mean, entry.std)
    return Target(entry.defense, model, identity, entry.dataset, entry.record())


def find_sources(names: list[str], workdir: Path, dataset: str | None = None, zoo_only: bool = False) -> list[Source]:
    """Each name's checkpoint: a defense's newest finished run in the workdir, else (or with
    ``zoo_only``) the zoo's checkpoint of that defense; a zoo entry's name picks that entry.
    UserErrors name the fix."""
    from robench import zoo
    from robench.workdir import find_run, unreadable_runs

    out = []
    for name in names:
        if name not in DEFENSES:
            entries = {e.name: e for e in zoo.entries()}
            if name not in entries:
                DEFENSES.get(name)  # the usual "unknown defense ...; choose from" line
            entry = entries[name]
            if dataset is not None and entry.dataset != dataset:
                raise UserError(f"zoo checkpoint {name} was trained on {entry.dataset}, not {dataset}")
            out.append(Source(entry.dataset, entry=entry))
            continue
        if not zoo_only:
            try:
                run_dir, meta = find_run(workdir, name, dataset)
                out.append(Source(meta["dataset"], run_dir))
                continue
            except UserError as e:
                if unreadable_runs(workdir):  # a damaged run is reported, never silently replaced
                    raise
                missing = e
        entry = zoo.find(name, dataset)
        if entry is None:
            if zoo_only:
                raise UserError(f"the zoo has no {name!r} checkpoint{' for ' + dataset if dataset else ''}; "
                                f"see `robench zoo list`")
            raise UserError(f"{missing}; the zoo has none either (`robench zoo list`)")
        out.append(Source(entry.dataset, entry=entry))
    return out
