"""Checkpoints: safetensors weights plus a JSON record of everything needed to trust them.

A run directory holds
- ``weights-<step>.safetensors``: the model's tensors (no code; safe to load from anywhere);
- ``optim-<step>.pt``: optimiser state, loaded with ``torch.load(weights_only=True)``;
- ``checkpoint.json``: defense, dataset, arch, every hyper-parameter, step, seed, versions, and
  the sha256 of both files. It is written last and atomically, so it always names a complete
  pair; older pairs are deleted only after it is replaced.
Loading verifies the sha256 before touching the tensors, and every failure is a one-line
``UserError`` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import robench
from robench import atomic
from robench.errors import UserError

FORMAT = "robench-checkpoint/1"
META = "checkpoint.json"
REQUIRED = ("defense", "dataset", "arch", "in_channels", "num_classes", "step", "config", "files")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    return {"robench": robench.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]) -> dict:
    """Write a checkpoint of ``model`` (and ``optimizer``) at ``meta['step']`` atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    meta = {"format": FORMAT, **meta, "versions": versions(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    weights = run_dir / f"weights-{step:08d}.safetensors"
    header = {"robench": json.dumps({k: v for k, v in meta.items() if k != "files"}, sort_keys=True)}
    atomic.write_with(weights, lambda p: save_file(_state_dict(model), str(p), metadata=header))
    files = {"weights": {"name": weights.name, "sha256": sha256(weights)}}
    if optimizer is not None:
        optim = run_dir / f"optim-{step:08d}.pt"
        atomic.write_with(optim, lambda p: torch.save(optimizer.state_dict(), p))
        files["optim"] = {"name": optim.name, "sha256": sha256(optim)}
    meta["files"] = files
    atomic.write_text(run_dir / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    keep = {f["name"] for f in files.values()}
    for old in [*run_dir.glob("weights-*.safetensors"), *run_dir.glob("optim-*.pt")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return meta


def remove_stale_tmp(run_dir: Path) -> None:
    """Delete the temporary files a writer killed mid-write left in ``run_dir`` (atomic writes name
    them ``.<target>.<random>.tmp``). Call it only while no other process writes this run."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META if run_dir.is_dir() else run_dir
    if not path.exists():
        raise UserError(f"no checkpoint at {run_dir} ({META} missing)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a robench checkpoint record (invalid JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a robench checkpoint record (format is not {FORMAT})")
    missing = [k for k in REQUIRED if k not in meta]
    weights = meta.get("files", {}).get("weights") if isinstance(meta.get("files"), dict) else None
    if not isinstance(weights, dict) or not {"name", "sha256"} <= set(weights):
        missing.append("files.weights")
    if missing:
        raise UserError(f"{path} is an incomplete robench checkpoint record (missing {', '.join(missing)}); "
                        f"delete the run or train it again")
    return meta


def _verified(run_dir: Path, meta: dict, key: str) -> Path:
    entry = meta.get("files", {}).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "sha256" not in entry:
        raise UserError(f"checkpoint in {run_dir} records no {key} file")
    if Path(entry["name"]).name != entry["name"] or entry["name"] in ("", ".", ".."):
        raise UserError(f"checkpoint in {run_dir} names {key} file {entry['name']!r} outside its run directory")
    path = run_dir / entry["name"]
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing")
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise UserError(f"checkpoint file {path} is corrupted: sha256 {digest[:12]}... does not match "
                        f"the recorded {entry['sha256'][:12]}...")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (never executes code); a broken file is a UserError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, arch: str) -> None:
    """``state`` into ``model`` (strict), once its tensors are known to be numbers (``check_numbers``)."""
    check_numbers(state, model.state_dict(), source, arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"weights in {source} do not fit architecture {arch!r} ({first})") from None


def check_numbers(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path, arch: str) -> None:
    """A one-line UserError when a tensor is not a real number where the model holds floating-point
    ones: NaN or Inf anywhere (weights or BN statistics), or an integer, boolean or complex tensor
    (``load_state_dict`` would cast it without a word: an int8 file's values mean nothing without
    its scales). Integer tensors that are integer in the model too (``num_batches_tracked``) and
    half-precision floats are numbers, and load as they are."""
    def dtype(v: torch.Tensor) -> str:
        return str(v.dtype).removeprefix("torch.")

    kinds = [f"{k} ({dtype(v)})" for k, v in state.items() if k in expected and expected[k].is_floating_point()
             and not v.is_floating_point()]
    if kinds:
        raise UserError(f"weights in {source}: {len(kinds)} tensor{'s are' if len(kinds) > 1 else ' is'} not "
                        f"floating-point where {arch!r} has floating-point weights ({_some(kinds)}); robench "
                        f"does not convert them: save the model's floating-point state dict")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"weights in {source} are not all numbers: {len(bad)} tensor{'s' if len(bad) > 1 else ''} "
                        f"hold NaN or Inf ({_some(bad)}); the file is damaged or was saved after training diverged")


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load the checkpoint in ``run_dir`` into ``model`` (and ``optimizer``) after checking hashes."""
    meta = read_meta(run_dir)
    weights = _verified(run_dir, meta, "weights")
    load_into(model, load_weights(weights), weights, meta.get("arch", "?"))
    if optimizer is not None:
        optim = _verified(run_dir, meta, "optim")
        try:
            with warnings.catch_warnings():  # a refused file's warnings would add lines to the error
                warnings.simplefilter("ignore")
                state = torch.load(optim, weights_only=True, map_location="cpu")
            optimizer.load_state_dict(state)
        except Exception as e:  # any unpickling failure: refuse, never execute
            raise UserError(f"cannot load optimiser state {optim}: {type(e).__name__}") from None
    return meta
