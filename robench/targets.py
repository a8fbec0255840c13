"""What is evaluated: a model with the identity its results are stored under, loaded from a
trained run in the workdir or from a model file trained elsewhere. Loading never executes code."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robench import checkpoint
from robench.data import Splits
from robench.errors import UserError
from robench.models import build_model
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


def target_from_file(path: Path, arch: str, dataset: str, splits: Splits) -> Target:
    """A model trained elsewhere: a safetensors file, or a state dict loaded with
    ``torch.load(weights_only=True)``. Neither can execute code."""
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    model = build_model(arch, splits.image_shape[0], splits.num_classes)
    if path.suffix == ".safetensors":
        state = checkpoint.load_weights(path)
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # refuse anything that is not plain tensors; never execute it
            raise UserError(f"cannot load {path} safely as weights ({type(e).__name__}); "
                            f"save a state_dict or use safetensors") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state dict")
    checkpoint.load_into(model, state, path, arch)
    meta = {"defense": path.stem, "dataset": dataset, "arch": arch, "source": str(path)}
    return Target(path.stem, model, checkpoint.sha256(path), dataset, meta)


def trained_runs(defenses: list[str], workdir: Path, dataset: str | None = None) -> list[tuple[str, Path]]:
    """(dataset, run dir) of the newest finished run of each defense; UserErrors name the fix."""
    from robench.workdir import find_run

    out = []
    for defense in defenses:
        DEFENSES.get(defense)
        run_dir, meta = find_run(workdir, defense, dataset)
        out.append((meta["dataset"], run_dir))
    return out
