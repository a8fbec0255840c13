"""Run trained defenses through attacks and store every per-example outcome.

Examples are the first ``n`` test images in the dataset's order, so results of different attacks
on one checkpoint line up example by example, and worst-case accuracy (the share of examples that
survive every attack) is an AND over stored outcomes. Every random draw of an attack belongs to
one example (``robench.attack``), so the batch size, a resume point and the torchrun world size
never change an outcome. Each finished batch is stored at once as an example range; an
interrupted evaluation resumes with the examples no range covers, at any batch size.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm  # a notebook's widget bar, a terminal's text bar

from robench import checkpoint
from robench.attack import Attack, ThreatModelError, make_attack
from robench.config import DATASET_DEFAULTS
from robench.data import Splits
from robench.distributed import Dist
from robench.errors import UserError
from robench.registry import ATTACKS, DATASETS
from robench.runtime import Runtime
from robench.store import Examples, Key, Partial, Row, Store, now, split_digest, wilson, worst_case
from robench.targets import Source, Target, find_sources, target_from_file

CLEAN = "clean"


def todo_ranges(covered: np.ndarray, batch_size: int, unit: int = 1) -> list[tuple[int, int]]:
    """Batches [start, stop) over the examples not yet covered, aligned to groups of ``unit``
    examples (an attack's randomness unit): a batch holds whole groups, at least one."""
    n = len(covered)
    size = max(1, -(-batch_size // unit)) * unit
    out: list[tuple[int, int]] = []
    for s in range(0, n, unit):
        if covered[s:s + unit].all():
            continue
        if out and out[-1][1] == s and out[-1][1] - out[-1][0] < size:
            out[-1] = (out[-1][0], min(n, s + unit))
        else:
            out.append((s, min(n, s + unit)))
    return out


def evaluate(
    target: Target,
    splits: Splits,
    attack_name: str,
    attack: Attack | None,
    n: int,
    store: Store,
    runtime: Runtime,
    batch_size: int = 256,
    progress: bool = True,
    dist: Dist = Dist(),
    data: str | None = None,
    split: str = "test",
) -> Row | None:
    """Evaluate one target under one attack (``None``: clean) on the first ``n`` test images.

    Returns the stored row (cached rows are returned as they are). Under torchrun each rank takes
    every ``world``-th batch and stores it; rank 0 then assembles and stores the row, the other
    ranks return None. ``data``: the test split's digest, if the caller computed it already.
    ``split``: what the key calls the images in ``splits.x_test`` ("test"; an experiment also
    evaluates its training and held-out images this way, as "train" and "val").
    """
    if n > len(splits.x_test):
        raise UserError(f"--n {n} is larger than the {splits.name} test set ({len(splits.x_test)} images)")
    if n <= 0 or batch_size <= 0:
        raise UserError("--n and --batch-size must be positive")
    examples = Examples(split, 0, n, data or split_digest(splits.x_test, splits.y_test))
    key = Key.make(target.sha256, target.dataset, examples, "attack", attack_name,
                   attack.params() if attack is not None else {})
    dist.barrier()  # all ranks see the same stored state before rank 0 may write the row
    cached = store.get(key)
    if cached is not None:
        return cached if dist.main else None
    covered = np.zeros(n, dtype=bool)
    for part in store.partial(key):
        covered[part.start:part.stop] = True
    dist.barrier()  # every rank planned from the same stored ranges before any rank adds one
    model = target.model.eval()
    todo = todo_ranges(covered, batch_size, attack.unit if attack is not None else 1)[dist.rank::dist.world]
    bar = tqdm(todo, desc=f"{target.label}: {attack_name}", unit="batch", leave=False, dynamic_ncols=True,
               disable=not progress or not todo or not dist.main)
    for start, stop in bar:
        t0 = time.perf_counter()
        x, y = runtime.batch(splits.x_test[start:stop]), splits.y_test[start:stop].to(runtime.device)
        seen: list[str] = []
        if attack is None:
            x_adv = x
        else:
            try:  # the call checks the threat model: an invalid example is never counted
                x_adv = attack(model, x, y, torch.arange(start, stop))
            except ThreatModelError as e:
                raise UserError(f"attack {attack_name!r} returned invalid examples, nothing stored: {e}") from None
            seen = list(attack.last_warnings)
        with torch.no_grad(), runtime.autocast():
            correct = (model(x_adv).argmax(1) == y).float().cpu().numpy()
        store.put_partial(key, Partial(start, stop, correct, time.perf_counter() - t0, seen))
    bar.close()
    dist.barrier()  # every rank's ranges are stored
    if not dist.main:
        return None
    finished, parts = store.snapshot(key)
    if finished is not None:  # a concurrent evaluation of the same key finished first
        store.drop_partial(key)  # the ranges this process stored after it did
        return finished
    outcomes = np.full(n, np.nan, dtype=np.float32)
    wall, found = 0.0, []
    for part in parts:
        outcomes[part.start:part.stop] = part.outcomes
        wall += part.wall_s
        found += [w for w in part.warnings if w not in found]
    if np.isnan(outcomes).any():
        raise RuntimeError(f"{attack_name}: examples missing after evaluation (a concurrent writer?)")
    acc = float(outcomes.mean(dtype=np.float64))  # exact k/n, not a float32 rounding of it
    row = Row(key, target.label, acc, wilson(outcomes.sum(dtype=np.float64), n), outcomes, wall,
              checkpoint.versions(), str(runtime.device), now(), found)
    store.put(row)
    return row


@dataclass
class Entry:
    label: str
    dataset: str
    eps: float | None  # None for clean accuracy
    attack: str
    row: Row


def _norm(entry: Entry) -> str:
    return json.loads(entry.row.key.params).get("norm", "linf")


@dataclass
class EvalReport:
    entries: list[Entry]
    checkpoints: list[str] = field(default_factory=list)  # "label: where its weights came from"

    def groups(self) -> dict[tuple[str, str, float], list[Entry]]:
        """Entries per (dataset, threat model, eps), each group holding every label's clean row
        too; L-inf and L2 results never share a table or a worst case."""
        out: dict[tuple[str, str, float], list[Entry]] = {}
        for e in self.entries:
            if e.eps is not None:
                out.setdefault((e.dataset, _norm(e), e.eps), [])
        for (dataset, norm, eps), group in out.items():
            group.extend(e for e in self.entries if e.dataset == dataset
                         and (e.eps is None or (e.eps == eps and _norm(e) == norm)))
        return out

    def table(self) -> str:
        lines = [f"checkpoint {c}" for c in self.checkpoints] + ([""] if self.checkpoints else [])
        for (dataset, norm, eps), group in self.groups().items():
            attacks = list(dict.fromkeys(e.attack for e in group))
            lines.append(f"{dataset}, {norm} eps = {eps:g}: accuracy % (95% Wilson interval), first n test images")
            head = ["defense", *attacks, "worst case"]
            body = []
            for label in dict.fromkeys(e.label for e in group):
                rows = {e.attack: e.row for e in group if e.label == label}
                cells = [label] + [_cell(rows[a]) if a in rows else "-" for a in attacks]
                wc, m = worst_case(list(rows.values()))
                body.append(cells + [f"{100 * wc:.1f} (n={m})"])
            widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
            for r in [head, ["-" * w for w in widths], *body]:
                lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            lines.append("")
        for e in self.entries:  # the attacks' own alarms (e.g. AutoAttack's gradient-masking checks)
            lines += [f"warning from {e.attack} on {e.label}: {w}" for w in e.row.warnings]
        return "\n".join(lines).rstrip()

    def as_dict(self) -> dict:
        out = []
        for (dataset, norm, eps), group in self.groups().items():
            for label in dict.fromkeys(e.label for e in group):
                rows = {e.attack: e.row for e in group if e.label == label}
                wc, m = worst_case(list(rows.values()))
                out.append({
                    "defense": label, "dataset": dataset, "norm": norm, "eps": eps, "checkpoint": next(iter(rows.values())).key.checkpoint,
                    "results": {a: {"accuracy": r.value, "ci95": list(r.ci), "n": r.key.n,
                                    "params": json.loads(r.key.params), "examples": r.key.examples,
                                    "wall_s": r.wall_s, "warnings": r.warnings} for a, r in rows.items()},
                    "worst_case": {"accuracy": wc, "n": m},
                })
        return {"checkpoints": self.checkpoints, "results": out}


def _cell(row: Row) -> str:
    lo, hi = row.ci
    return f"{100 * row.value:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"


def run_eval(
    defenses: list[str],
    attacks: list[str],
    workdir: Path,
    runtime: Runtime,
    checkpoint_path: Path | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    data_dir: Path | None = None,
    n: int | None = None,
    eps_list: list[float | None] = (None,),
    overrides: dict[str, dict] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    dist: Dist = Dist(),
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    zoo_only: bool = False,
    checkpoint_key: str | None = None,
) -> EvalReport:
    """Evaluate each defense (or a model file) under each attack at each eps and store it all.
    A defense's checkpoint is its newest run in the workdir, else the zoo's (``zoo_only``: the
    zoo's in any case; a zoo entry's name picks that entry). ``mean``/``std``: the model file's
    input normalisation, ``checkpoint_key``: its best or last model (``target_from_file``)."""
    from robench.data import load_dataset

    overrides = overrides or {}
    for name in [*attacks, *overrides]:
        ATTACKS.get(name)
    stray = set(overrides) - set(attacks)
    if stray:
        raise UserError(f"options given for attack(s) not run: {', '.join(sorted(stray))}")
    if n is not None and n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if dataset is not None:
        DATASETS.get(dataset)

    # Resolve everything that can fail on user input before any work starts.
    sources: list[tuple[str, Source | None]] = []  # None: the model file
    if checkpoint_path is not None:
        if dataset is None:
            raise UserError("--checkpoint needs --dataset (the data the model was trained on)")
        sources.append((dataset, None))
    sources += [(source.dataset, source) for source in find_sources(defenses, workdir, dataset, zoo_only)]
    built = {(ds, eps, a): make_attack(a, ds, eps, overrides.get(a), runtime.autocast, seed)
             for ds in dict.fromkeys(ds for ds, _ in sources) for eps in eps_list for a in attacks}

    store = Store.in_workdir(workdir)
    splits_cache: dict[str, Splits] = {}
    digests: dict[str, str] = {}
    entries: list[Entry] = []
    used: list[str] = []
    try:
        for ds, source in sources:
            if ds not in splits_cache:
                splits_cache[ds] = load_dataset(ds, data_dir)
                digests[ds] = split_digest(splits_cache[ds].x_test, splits_cache[ds].y_test)
            splits = splits_cache[ds]
            if n is not None and n > len(splits.x_test):
                raise UserError(f"--n {n} is larger than the {ds} test set ({len(splits.x_test)} images)")
            if source is None:
                target = target_from_file(checkpoint_path, arch or DATASET_DEFAULTS[ds].arch, ds, splits, mean, std,
                                          checkpoint_key)
                used.append(f"{target.label}: {target.meta['loaded']}")
            else:
                target = source.load(splits, progress=progress)
                used.append(f"{target.label}: {source.describe()}")
            model = runtime.maybe_compile(runtime.prepare(target.model))
            target = dataclasses.replace(target, model=model)
            n_clean = n or len(splits.x_test)
            common = dict(store=store, runtime=runtime, batch_size=batch_size, progress=progress, dist=dist,
                          data=digests[ds])
            row = evaluate(target, splits, CLEAN, None, n_clean, **common)
            if row is not None:
                entries.append(Entry(target.label, ds, None, CLEAN, row))
            for eps in eps_list:
                for a in attacks:
                    attack = built[(ds, eps, a)]
                    n_a = n or min(attack.default_n or len(splits.x_test), len(splits.x_test))
                    row = evaluate(target, splits, a, attack, n_a, **common)
                    if row is not None:
                        entries.append(Entry(target.label, ds, attack.eps, a, row))
    finally:
        store.close()
    return EvalReport(entries, used)
