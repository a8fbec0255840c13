"""What is evaluated: a model with the identity its results are stored under, loaded from a
trained run in the workdir, a zoo checkpoint, or a model file trained elsewhere (``target_from_file``: the
usual external layouts, read by ``robench.model_file``, and an input normalisation). Loading never
executes code from a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from robench import checkpoint
from robench.data import Splits
from robench.errors import UserError
from robench.model_file import check_norm, match_keys, read_state
from robench.models import build_model, is_builtin
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
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     pick: str | None = None) -> Target:
    """A model trained elsewhere: a safetensors file, or a state dict loaded with
    ``torch.load(weights_only=True)``; neither can execute code. The state dict may be bare or
    under ``state_dict`` / ``model_state_dict`` / ``net`` / ``model`` (nested too), its keys may
    carry ``module.`` (DataParallel), ``model.`` or ``_orig_mod.`` (torch.compile) prefixes, also
    beside a stored normalisation (RobustBench's ``normalize_model``: ``normalize.mean``,
    ``normalize.std`` and ``model.*``). A file of two models, ``{'best': ..., 'last': ...}`` (some
    RobustBench entries), gives ``best``, or ``pick``. ``arch``: any name ``build_model`` knows,
    or ``package.module:factory`` (the user's code).
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
    state, picked, loaded = read_state(path, pick)
    state, stored = match_keys(state, model, path, arch)
    checkpoint.load_into(model, state, path, arch)
    origin = f"{arch}'s own, as RobustBench's" if input_normalization(model) else ""
    if stored is not None:
        check_norm(stored, path, mean, std, channels)
        mean, std = stored[2], stored[3]
    if mean is not None:
        try:
            model = normalized(model, mean, std)
        except ValueError as e:
            raise UserError(f"{f'the normalisation {path} stores' if stored else '--mean/--std'}: {e}") from None
        origin = f"stored in the file as {stored[0]}, {stored[1]}" if stored else "--mean/--std"
    norm = input_normalization(model)
    file_sha = checkpoint.sha256(path)
    meta = {"defense": path.stem, "dataset": dataset, "arch": arch, "source": str(path), "weights_sha256": file_sha}
    if norm is not None:
        meta.update(mean=list(norm[0]), std=list(norm[1]))
        loaded += f", inputs normalised with mean {_csv(norm[0])} std {_csv(norm[1])} ({origin})"
    elif mean is not None:
        loaded += ", no input normalisation (--mean/--std none)"
    meta["loaded"] = loaded
    if picked is not None:
        meta["picked"] = picked
    identity = model_identity(file_sha, arch, *(norm or (None, None)), picked)
    return Target(path.stem, model, identity, dataset, meta)


def _csv(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def model_identity(file_sha: str, arch: str, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, picked: str | None = None) -> str:
    """The ``checkpoint`` field of a file's result keys: its sha256, followed by what else
    makes the evaluated model, so two different models never share results. Robench's own
    architectures accept disjoint state dicts (tests/test_external.py), so the file alone names
    the model; a plugin's or a user factory's architecture is spelled out, and so is a
    normalisation, and which model of a best/last file:
    ``<sha256>+model=last+arch=pkg.mod:fn+mean=0.4914,0.4822,0.4465+std=0.2471,0.2435,0.2616``."""
    parts = [file_sha] + ([f"model={picked}"] if picked is not None else [])
    if not is_builtin(arch):
        parts.append(f"arch={arch}")
    if mean is not None:
        parts += [f"mean={','.join(repr(float(m)) for m in mean)}", f"std={','.join(repr(float(s)) for s in std)}"]
    return "+".join(parts)


@dataclass(frozen=True)
class Source:
    """Where a defense's checkpoint comes from: a finished run in the workdir, or a zoo entry."""

    dataset: str
    run_dir: Path | None = None
    entry: Any = None  # robench.zoo.Entry

    def load(self, splits: Splits, progress: bool = True) -> Target:
        """The checkpoint, once it is known to fit ``splits``: a model trained on one folder of
        images is refused on a folder with other classes or another image size. ``progress``:
        a zoo file's download bar."""
        target = target_from_run(self.run_dir) if self.entry is None else target_from_zoo(self.entry, progress)
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


def target_from_zoo(entry: Any, progress: bool = True) -> Target:
    """A zoo entry's checkpoint: the shipped file, or the cached one (downloaded and verified
    first when missing). The sha256 is checked before the weights are used."""
    from robench import zoo

    path = zoo.local_path(entry, fetch=True, progress=progress)
    model = build_model(entry.arch, entry.in_channels, entry.num_classes)
    checkpoint.load_into(model, checkpoint.load_weights(path), path, entry.arch)
    if entry.mean is not None:
        model = normalized(model, entry.mean, entry.std)  # replaces an architecture's own (dm-wrn)
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
