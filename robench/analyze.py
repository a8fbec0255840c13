"""The paper's analyses of trained defenses: loss sensitivity (section 4.3) and SmoothGrad
salience maps (section 4.5). Sensitivities are stored in the results database like attack
results; salience grids are written to ``workdir/salience/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from robench import atomic, checkpoint
from robench.data import Splits, load_dataset
from robench.errors import UserError
from robench.evaluate import target_from_run, trained_runs
from robench.results import Examples, Key, Row, Store, mean_ci, now, split_digest
from robench.runtime import Runtime
from robench.salience import salience_grid, smoothgrad
from robench.sensitivity import PAPER_POINTS, SWEEPS, loss_sensitivity

SALIENCE_DIR = "salience"


def _check_n(n: int | None, total: int, dataset: str) -> int:
    if n is None:
        return total
    if not 0 < n <= total:
        raise UserError(f"--n must be in 1..{total} for the {dataset} test set, got {n}")
    return n


def run_sensitivity(defenses: list[str], workdir: Path, runtime: Runtime, dataset: str | None = None,
                    data_dir: Path | None = None, n: int | None = None, sweep: bool = False,
                    batch_size: int = 256, progress: bool = True, splits: Splits | None = None) -> list[Row]:
    """l(value) = mean_i ||grad_x CE(F; T(x_i), y_i)||_2 at the paper's points (and a sweep),
    on the first ``n`` test images. ``splits``: the data of runs on dataset ``splits.name``, as
    the caller holds it (e.g. ``robench.data.balanced_test``); the key's split digest tells
    such rows apart from those on the loader's own order. Runs on other datasets load theirs."""
    sources = trained_runs(defenses, workdir, dataset)
    points = {name: sorted(set(PAPER_POINTS[name]) | (set(SWEEPS[name]) if sweep else set()))
              for name in PAPER_POINTS}
    rows = []
    with Store.in_workdir(workdir) as store:
        for ds, run_dir in sources:
            data = splits if splits is not None and splits.name == ds else load_dataset(ds, data_dir)
            count = _check_n(n, len(data.x_test), ds)
            target = target_from_run(run_dir)
            model = runtime.prepare(target.model).eval()
            x, y = runtime.batch(data.x_test[:count]), data.y_test[:count].to(runtime.device)
            examples = Examples("test", 0, count, split_digest(data.x_test, data.y_test))
            todo = [(name, float(v)) for name, values in points.items() for v in values]
            for name, value in tqdm(todo, desc=f"{target.label}: sensitivity", leave=False,
                                    disable=not progress):
                key = Key.make(target.sha256, ds, examples, "sensitivity", name, {"value": value})
                row = store.get(key)
                if row is None:
                    t0 = time.perf_counter()
                    norms = loss_sensitivity(model, x, y, name, value, batch_size).numpy().astype(np.float32)
                    row = Row(key, target.label, float(norms.mean(dtype=np.float64)), mean_ci(norms), norms,
                              time.perf_counter() - t0, checkpoint.versions(), str(runtime.device), now())
                    store.put(row)
                rows.append(row)
    return rows


def run_salience(defenses: list[str], workdir: Path, runtime: Runtime, dataset: str | None = None,
                 data_dir: Path | None = None, n_images: int = 6, n_samples: int = 50, stdev: float = 0.15,
                 seed: int = 0) -> Path:
    """SmoothGrad maps of the same test images for every defense, as the paper's Figure 3."""
    sources = trained_runs(defenses, workdir, dataset)
    datasets = sorted({ds for ds, _ in sources})
    if len(datasets) != 1:
        raise UserError(f"salience compares defenses on one dataset; these span {', '.join(datasets)}: pass --dataset")
    ds = datasets[0]
    splits = load_dataset(ds, data_dir)
    if not 0 < n_images <= len(splits.x_test):
        raise UserError(f"--n-images must be in 1..{len(splits.x_test)}")
    # One image per class first, so the grid shows variety.
    picks = [int((splits.y_test == c).nonzero()[0]) for c in range(splits.num_classes)
             if (splits.y_test == c).any()][:n_images]
    idx = torch.tensor(picks)
    x, y = splits.x_test[idx], splits.y_test[idx]
    maps = {}
    for _, run_dir in sources:
        target = target_from_run(run_dir)
        model = runtime.prepare(target.model).eval()
        maps[target.label] = smoothgrad(model, runtime.batch(x), y.to(runtime.device), n_samples=n_samples,
                                        stdev=stdev, seed=seed).cpu()
    out_dir = Path(workdir) / SALIENCE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"images": x.contiguous(), "labels": y.contiguous(), **{f"map/{k}": v.contiguous() for k, v in maps.items()}}
    atomic.write_with(out_dir / f"{ds}.safetensors", lambda p: save_file(tensors, str(p)))
    titles = [splits.classes[int(c)] for c in y]
    png = out_dir / f"{ds}.png"
    salience_grid(x, maps, png, titles=titles)
    return png
