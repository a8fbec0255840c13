"""``evaluate``, ``compare``, ``train`` and ``benchmark``: the engine's functions, from Python."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from robench.api.inputs import CUSTOM, Data, check_model, to_splits, warn_training_mode
from robench.api.models import borrowed, identify
from robench.api.results import Comparison, Results
from robench.errors import UserError

# Attack defaults (step/eps ratio, steps) for images of no known dataset: CIFAR-10's (App. A).
FALLBACK_DEFAULTS = "cifar10"


def evaluate(model: nn.Module, data: Data, attacks: str | Iterable[str] = ("pgd", "cw", "nattack"), *,
             eps: float | None = None, norm: str = "linf", n: int | None = None, seed: int = 0,
             batch_size: int = 256, device: str = "auto", workdir: str | Path | None = None,
             name: str | None = None, dataset: str | None = None, data_dir: str | Path | None = None,
             progress: bool = True, **attack_options: dict[str, Any]) -> Results:
    """Evaluate ``model`` (any ``nn.Module`` mapping images in [0, 1] to logits) on the first
    ``n`` images of ``data`` (default: all; N-attack's default is 1,500), clean and under each
    attack, and return the per-example results.

    ``data``: a dataset name (``"digits"``, ``"cifar10"``, ...; ``data_dir`` says where it lies),
    a ``robench.data.Splits`` (its test split), a pair of tensors ``(x, y)``, or a DataLoader that
    does not shuffle. For tensors and loaders, ``dataset`` names the dataset whose default radius
    and attack settings apply (and which the results are stored under); without it ``eps`` is
    required and the attacks take CIFAR-10's settings at that radius (step eps/4, 10 steps).

    ``eps``: the radius [default: the dataset's]; ``norm``: "linf" or "l2"; ``seed``: every
    attack's seed. ``attack_options``: one dict of parameters per attack, e.g.
    ``pgd={"attack_steps": 20}`` (names with a dot: ``**{"ta.square": {...}}``). ``batch_size``
    changes speed only, never an outcome.

    The model's identity is a digest of its class name, parameters and buffers (a module from
    ``load_model`` with unchanged weights: its checkpoint's), so a changed model never reuses old
    outcomes; ``name`` is the label it is shown under [default: its class name]. With ``workdir``
    every outcome is stored in its results database exactly as ``robench eval`` stores it, and
    reused: a finished result runs nothing, an interrupted one resumes. Without it everything
    runs in memory. A model in training mode is evaluated in eval mode (with a warning) and
    given back in its own mode, on its own device. Bad input raises one ``UserError`` before
    anything runs or is stored.
    """
    from robench.config import DATASET_DEFAULTS
    from robench.evaluation import CLEAN, Entry, evaluate as evaluate_one
    from robench.runtime import Runtime, model_mode
    from robench.store import Store, split_digest
    from robench.targets import Target

    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    for what, value in (("n", n), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"{what} must be a positive integer, got {value!r}")
    built_for = _attacks(names, attack_options, norm)  # name -> overrides, checked
    splits, ds = to_splits(data, dataset, data_dir)
    defaults = ds if ds in DATASET_DEFAULTS else None
    if defaults is None and eps is None:
        raise UserError(f"no default radius for {ds!r} images: pass eps= (or dataset=, the dataset whose "
                        f"defaults apply)")
    runtime = Runtime.create(str(device) if isinstance(device, torch.device) else device)
    built = {a: _make(a, defaults or FALLBACK_DEFAULTS, eps, overrides, runtime, seed)
             for a, overrides in built_for.items()}
    total = len(splits.x_test)
    if n is not None and n > total:
        raise UserError(f"n={n} is larger than the {total} images given")
    label, identity, described = identify(model, name)
    warn_training_mode(model)
    entries: list[Entry] = []
    with model_mode(model, training=False), borrowed(model):
        prepared = runtime.maybe_compile(runtime.prepare(model))
        splits = check_model(prepared, splits, runtime)
        target = Target(label, prepared, identity, ds, {})
        store = Store.in_workdir(_workdir(workdir)) if workdir is not None else Store(Path(":memory:"))
        try:
            common = dict(store=store, runtime=runtime, batch_size=batch_size, progress=progress,
                          data=split_digest(splits.x_test, splits.y_test))
            row = evaluate_one(target, splits, CLEAN, None, n or total, **common)
            entries.append(Entry(label, ds, None, CLEAN, row))
            for a, attack in built.items():
                row = evaluate_one(target, splits, a, attack, n or min(attack.default_n or total, total), **common)
                entries.append(Entry(label, ds, attack.eps, a, row))
        finally:
            store.close()
    return Results(entries, [described])


def _workdir(workdir: str | Path) -> Path:
    from robench.workdir import resolve_workdir

    path = resolve_workdir(Path(workdir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _attacks(names: list[str], options: dict[str, Any], norm: str) -> dict[str, dict[str, Any]]:
    """Each attack's overrides: its ``attack_options`` and the threat model, all checked."""
    from robench.registry import ATTACKS

    if not names:
        raise UserError(f"no attacks given; choose from: {', '.join(ATTACKS.names())}")
    if norm not in ("linf", "l2"):
        raise UserError(f"norm must be 'linf' or 'l2', got {norm!r}")
    out: dict[str, dict[str, Any]] = {}
    for a in [*names, *options]:
        ATTACKS.get(a)  # "unknown attack ...; choose from: ..."
    stray = sorted(set(options) - set(names))
    if stray:
        raise UserError(f"options given for attack(s) not run: {', '.join(stray)}")
    for a in names:
        given = options.get(a, {})
        if not isinstance(given, dict):
            raise UserError(f"{a}= takes a dict of the attack's parameters, e.g. {a}={{'seed': 1}}; got {given!r}")
        out[a] = dict(given)
        cls = ATTACKS.get(a)
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "norm")
        if norm != default or "norm" in given:
            if norm not in cls.norms:
                raise UserError(f"norm {norm}: attack {a} supports {', '.join(cls.norms)} only")
            if out[a].setdefault("norm", norm) != norm:
                raise UserError(f"norm={norm!r} and {a}={{'norm': {given['norm']!r}}} disagree; give one")
    return out


def _make(name: str, dataset: str, eps: float | None, overrides: dict[str, Any], runtime: Any, seed: int):
    from robench.attack import make_attack

    if eps is not None and "eps" in overrides:
        raise UserError(f"eps= and {name}={{'eps': ...}} both set the radius; give one of them")
    return make_attack(name, dataset, eps, overrides, runtime.autocast, seed)


def compare(results_a: Results, results_b: Results, attack: str | Iterable[str] | None = None) -> Comparison:
    """``robench compare`` on two ``Results``: for ``attack`` (default: every one both hold,
    clean included), the accuracy difference A - B on the images both were run on, Newcombe's
    95% interval for paired proportions, the exact McNemar p and the images needed to resolve
    the difference. ``c[attack]`` is one attack's ``robench.comparison.Paired``; ``c.table()`` is
    the command's text. The two must be measured on the same images with the same attack
    settings."""
    from robench.comparison import Side, paired_rows

    for r in (results_a, results_b):
        if not isinstance(r, Results):
            raise UserError(f"compare takes two Results (from robench.evaluation), got {type(r).__name__}")
    wanted = [attack] if isinstance(attack, str) else list(attack) if attack is not None else \
        [a for a in results_a.attacks if a in results_b.rows]
    out = {}
    for a in wanted:
        ra, rb = results_a._row(a), results_b._row(a)
        if ra.key.params != rb.key.params:
            raise UserError(f"{a} was run with other settings on the two models ({ra.key.params} and "
                            f"{rb.key.params}); compare results of one setting")
        stats = paired_rows(ra, rb)
        if stats is None:
            raise UserError(f"{a}: the two results share no images (other data, or other example ranges)")
        out[a] = (ra, rb, stats)
    la, lb = results_a.label, results_b.label
    if la == lb:
        la, lb = f"{la} (A)", f"{lb} (B)"
    sides = [Side(label, r.checkpoint, r._checkpoints[0].partition(": ")[2], list(r.rows.values()))
             for label, r in ((la, results_a), (lb, results_b))]
    eps = results_a.eps if results_a.eps is not None else float("nan")
    return Comparison(sides[0], sides[1], results_a.dataset, eps, out)


def train(defense: str, dataset: str = "digits", *, workdir: str | Path, steps: int | None = None, seed: int = 0,
          name: str | None = None, resume: bool = False, device: str = "auto", data_dir: str | Path | None = None,
          progress: bool = True, **settings: Any) -> Path:
    """What ``robench train DEFENSE`` does: train ``defense`` on ``dataset`` into
    ``workdir/runs/NAME`` (default name DEFENSE-DATASET-sSEED) and return that run's folder.

    ``settings``: the training loop's (``arch``, ``batch_size``, ``lr``, ``flip``, ``n_train``)
    and the defense's own (``eps``, ``lam``, ``eta``, ``rbs_mode``, ...; ``robench list`` shows
    them); a setting the defense does not have is refused. ``resume=True`` continues an
    interrupted run. ``robench.load_model(name, workdir=workdir)`` loads the result.
    """
    from robench.runtime import Runtime
    from robench.training import CONFIG_FIELDS, TrainConfig, train as run_training

    loop = {k: v for k, v in settings.items() if k in CONFIG_FIELDS}
    for k in ("defense", "dataset", "steps", "seed"):
        loop.pop(k, None)
    options = {k: v for k, v in settings.items() if k not in CONFIG_FIELDS}
    cfg = TrainConfig(defense, dataset, steps=steps, seed=seed, options=options, **loop)
    result = run_training(cfg, _workdir(workdir), Runtime.create(device), name=name, resume=resume,
                          data_dir=Path(data_dir) if data_dir is not None else None, progress=progress)
    return result.run_dir


def benchmark(model: nn.Module, dataset: str = "cifar10", *, eps: float = 8 / 255, norm: str = "linf",
              n: int | None = None, seed: int = 0, batch_size: int = 256, device: str = "auto",
              workdir: str | Path | None = None, name: str | None = None, data_dir: str | Path | None = None,
              progress: bool = True, **autoattack: Any) -> dict[str, Any]:
    """RobustBench's question, with robench's store: clean and reference-AutoAttack (standard
    version) accuracy of ``model`` on the first ``n`` test images of ``dataset`` (default: all,
    10,000 on CIFAR-10) at radius ``eps``, returned as the RobustBench model-info fields that
    ``robench zoo export`` writes (accuracies in % as strings) plus ``robench``: the identity,
    the 95% intervals and n. ``autoattack``: AutoAttack's parameters (e.g. ``version="custom",
    attacks=("apgd-ce",)``). Stored, reused and resumable with ``workdir``, as ``evaluate``.
    """
    from robench import __version__
    from robench.zoo import Entry, robustbench_info

    results = evaluate(model, dataset, ["autoattack"], eps=eps, norm=norm, n=n, seed=seed, batch_size=batch_size,
                       device=device, workdir=workdir, name=name, data_dir=data_dir, progress=progress,
                       **({"autoattack": autoattack} if autoattack else {}))
    found = {a: {"accuracy": results.accuracy(a), "ci95": list(results.interval(a)), "n": results.n(a),
                 "params": json.loads(row.key.params)}
             for a, row in results.rows.items()}
    entry = Entry(name=results.label, defense=results.label, dataset=results.dataset, arch=type(model).__name__,
                  in_channels=0, num_classes=0, sha256=results.checkpoint, size=0, file="",
                  robench_version=__version__, results=found)
    info = robustbench_info(entry, eps)
    info["threat_model"] = {"linf": "Linf", "l2": "L2"}[norm]
    info["architecture"] = type(model).__name__
    return info
