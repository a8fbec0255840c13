"""The training loop shared by every defense (paper App. A: Adam, constant lr, batch 32, random
horizontal flip, a fixed number of steps).

Resuming is exact: the batch order and every random draw of step ``s`` (flip, PGD start, RBS)
come from a seed derived from (seed, step), so a run resumed from a checkpoint at step ``s``
draws exactly what an uninterrupted run would; weights, BatchNorm statistics and Adam's
moments come from the checkpoint.

Under torchrun the flip and the PGD start are drawn per rank (each rank holds different images),
but batch-mode RBS has a generator of its own, seeded from (seed, step) alone: every rank applies
the same shuffle to its shard, so a global batch gets one RBS draw, as in the official code.
Per-image RBS (``--rbs-mode image``) draws per rank.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from robench import atomic, checkpoint
from robench.config import DATASET_DEFAULTS, DEFAULT_DATASET
from robench.data import Splits, load_dataset
from robench.defense import Defense, make_defense, param_names
from robench.distributed import Dist
from robench.errors import UserError
from robench.models import build_model
from robench.registry import DEFENSES
from robench.runtime import Runtime
from robench.seeding import ORDER_STREAM, mix, rbs_seed, step_seed  # noqa: F401 (rbs_seed: tests)
from robench.workdir import runs_dir

LOG = "train_log.csv"
LOG_FIELDS = ("step", "loss", "train_acc", "elapsed_s")


@dataclass
class TrainConfig:
    """Everything that determines the trained weights. ``None`` means the dataset's default;
    ``options`` are the defense's settings (its dataclass fields, ``robench.defense``), each
    unset one at the defense's default or, for the threat model, the dataset's."""

    defense: str
    dataset: str = DEFAULT_DATASET
    arch: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    flip: bool | None = None
    seed: int = 0
    n_train: int | None = None  # train on the first n examples (CPU-scale runs)
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """Every default filled in: the dataset's numbers, and the defense's full settings."""
        defaults = DATASET_DEFAULTS.get(self.dataset)
        if defaults is None:
            raise UserError(f"unknown dataset {self.dataset!r}; choose from: {', '.join(sorted(DATASET_DEFAULTS))}")
        defense = DEFENSES.get(self.defense)
        filled = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)
                  if hasattr(self, f.name) and getattr(self, f.name) is None}
        filled["steps"] = self.steps if self.steps is not None else defaults.train_steps
        cfg = dataclasses.replace(self, **filled)
        cfg.validate()
        clash = sorted(set(param_names(defense)) & set(CONFIG_FIELDS))
        if clash:
            raise UserError(f"defense {self.defense}'s parameter(s) {', '.join(clash)} clash with the training "
                            f"settings of the same name; rename them")
        return dataclasses.replace(cfg, options=cfg.make_defense().params())

    def validate(self) -> None:
        checks = [
            (self.steps > 0, f"--steps must be positive, got {self.steps}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.n_train is None or self.n_train > 0, f"--n-train must be positive, got {self.n_train}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def make_defense(self) -> Defense:
        return make_defense(self.defense, self.dataset, self.options)

    def record(self) -> dict[str, Any]:
        """What the checkpoint's ``config`` holds: every setting, flat (the defense's beside the
        loop's), as records made before defense settings were ``options`` hold them."""
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}
        return {**flat, **self.options}

    def default_name(self) -> str:
        return f"{self.defense}-{self.dataset}-s{self.seed}"


# The training loop's own settings; a defense's settings must not reuse these names.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "options")


def changed_settings(cfg: TrainConfig, saved: dict[str, Any]) -> list[str]:
    """The settings of resolved ``cfg`` that differ from a checkpoint's ``config`` record (the
    step count may grow). A setting added after the run was made is compared with its default;
    a recorded one the defense no longer has (``lam`` of PGDAT, in old records) changed nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults.update((f.name, f.default) for f in dataclasses.fields(DEFENSES.get(cfg.defense)))
    return [k for k, v in cfg.record().items()
            if k != "steps" and saved.get(k, defaults.get(k)) != v]


def check_run_name(name: str | None) -> None:
    """A run name is one plain folder under runs/: no path separator, not '.' or '..', and not
    hidden (a leading '.': ``robench list`` and ``eval`` would never see the run) nor padded
    with spaces."""
    if name is None:
        return
    if Path(name).name != name or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise UserError(f"--name {name!r} must be a plain directory name (no '/', not '..')")
    if name != name.strip():
        raise UserError(f"--name {name!r} starts or ends with a space")
    if name.startswith("."):
        raise UserError(f"--name {name!r} starts with '.': a hidden run is never listed or evaluated")


def seed_step(cfg: TrainConfig, step: int, rank: int, defense: Defense) -> None:
    """Seed every random draw of training step ``step`` on ``rank``: the global RNG (flip, PGD
    start) per (seed, step, rank), then whatever the defense draws itself (``Defense.seed_step``:
    RBS per (seed, step) in batch mode, per rank in image mode)."""
    torch.manual_seed(step_seed(cfg.seed, step, rank))
    defense.seed_step(cfg.seed, step, rank)


class BatchOrder:
    """Epoch-wise random permutations of the training set, reproducible from (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if batch_size > n:
            raise UserError(f"--batch-size {batch_size} is larger than the training set ({n} examples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size  # drop the last partial batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix(self.seed, ORDER_STREAM, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def random_flip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


@dataclass
class TrainResult:
    run_dir: Path
    meta: dict[str, Any]


def train(
    cfg: TrainConfig,
    workdir: Path,
    runtime: Runtime | None = None,
    name: str | None = None,
    resume: bool = False,
    data_dir: Path | None = None,
    checkpoint_every: int = 500,
    log_every: int = 50,
    progress: bool = True,
    splits: Splits | None = None,
    dist: Dist = Dist(),
) -> TrainResult:
    """Train ``cfg.defense`` and save checkpoints into ``workdir/runs/<name>``.

    Under torchrun (``dist.world > 1``) every rank takes its share of each global batch and DDP
    averages the gradients; only rank 0 writes.
    """
    runtime = runtime or Runtime.create("cpu")
    cfg = cfg.resolved()
    if checkpoint_every <= 0 or log_every <= 0:
        raise UserError("--checkpoint-every and --log-every must be positive")
    if cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world} processes")
    check_run_name(name)
    run_dir = runs_dir(workdir) / (name or cfg.default_name())
    start = 0
    existing = (run_dir / checkpoint.META).exists()
    if existing and not resume:
        meta = checkpoint.read_meta(run_dir)
        raise UserError(f"run {run_dir} already exists (step {meta['step']}/{meta['config']['steps']}); "
                        f"pass --resume to continue it or --name to start another")
    if resume and existing:
        differ = changed_settings(cfg, checkpoint.read_meta(run_dir)["config"])
        if differ:
            raise UserError(f"--resume with settings that differ from the run in {run_dir}: {', '.join(differ)}")

    splits = splits or load_dataset(cfg.dataset, data_dir)
    x_train, y_train = splits.x_train, splits.y_train
    if cfg.n_train is not None and cfg.n_train > len(x_train):
        raise UserError(f"--n-train {cfg.n_train} is larger than the {cfg.dataset} training set "
                        f"({len(x_train)} examples)")
    if cfg.n_train is not None:
        x_train, y_train = x_train[:cfg.n_train], y_train[:cfg.n_train]
    c, h, w = x_train.shape[1:]
    x_train, y_train = runtime.batch(x_train), y_train.to(runtime.device)

    torch.manual_seed(cfg.seed)  # initial weights
    model = runtime.prepare(build_model(cfg.arch, c, splits.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if resume and existing:
        start = int(checkpoint.load(run_dir, model, optimizer)["step"])
    dist.barrier()  # every rank has read the run's state before rank 0 writes to it
    # The attack runs on the bare module (input gradients only); the loss goes through DDP, which
    # averages parameter gradients across ranks.
    attack_forward = runtime.maybe_compile(model)
    forward = DistributedDataParallel(model) if dist.active else model
    forward = runtime.maybe_compile(forward) if dist.active else attack_forward
    defense = cfg.make_defense()
    defense.autocast = runtime.autocast
    order = BatchOrder(len(x_train), cfg.batch_size, cfg.seed)
    base_meta = {
        "defense": cfg.defense, "dataset": cfg.dataset, "arch": cfg.arch, "in_channels": c,
        "image_size": [h, w], "num_classes": splits.num_classes, "classes": splits.classes,
        "config": cfg.record(), "objective": defense.params(),
        "runtime": {"device": str(runtime.device), "amp": runtime.amp, "compile": runtime.compile},
    }
    log_path = run_dir / LOG
    rows = _read_log(log_path, start)
    elapsed0 = float(rows[-1]["elapsed_s"]) if rows else 0.0
    t0 = time.perf_counter()

    def save(step: int) -> dict | None:
        if not dist.main:
            return None
        _write_log(log_path, rows)
        return checkpoint.save(run_dir, model, optimizer, {
            **base_meta, "step": step, "finished": step >= cfg.steps,
            "train_seconds": elapsed0 + time.perf_counter() - t0})

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_tmp(run_dir)  # left by a writer that was killed (kill -9, power loss)
    if not existing:
        save(0)
    # On a GPU, checking the loss every step would synchronise; check at log points instead.
    check_every = 1 if runtime.device.type == "cpu" else log_every
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device)
    seen = 0
    finite = torch.ones((), dtype=torch.bool, device=runtime.device)
    last_good = start
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.defense}", unit="step",
               disable=not progress or not dist.main, dynamic_ncols=True)
    model.train()
    step = start
    try:
        for step in range(start, cfg.steps):
            seed_step(cfg, step, dist.rank, defense)
            idx = order.indices(step)[dist.rank::dist.world].to(runtime.device)
            x, y = x_train[idx], y_train[idx]
            if cfg.flip:
                x = random_flip(x)
            x_adv = defense.adversarial(attack_forward, x, y)
            with runtime.autocast():
                loss, logits = defense.loss(forward, x, x_adv, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_d = loss.detach()
            finite &= torch.isfinite(loss_d)
            loss_sum += loss_d
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            done = step + 1
            if done % check_every == 0 and not _all(finite, dist):
                raise UserError(f"loss became NaN/inf by step {done}; stopped. The last good checkpoint "
                                f"(step {last_good}) is kept in {run_dir}; lower --lr or check the data")
            if done % log_every == 0 or done == cfg.steps:
                dist.all_reduce_mean(loss_sum), dist.all_reduce_mean(correct)
                n_steps = done - (int(rows[-1]["step"]) if rows else start)
                row = {"step": done, "loss": f"{loss_sum.item() / max(n_steps, 1):.6f}",
                       "train_acc": f"{correct.item() / max(seen, 1):.4f}",
                       "elapsed_s": f"{elapsed0 + time.perf_counter() - t0:.2f}"}
                rows.append(row)
                bar.set_postfix(loss=row["loss"], acc=row["train_acc"])
                loss_sum.zero_(), correct.zero_()
                seen = 0
            if done % checkpoint_every == 0 or done == cfg.steps:
                if not _all(finite, dist):
                    raise UserError(f"loss became NaN/inf by step {done}; stopped. The last good "
                                    f"checkpoint (step {last_good}) is kept in {run_dir}")
                save(done)
                last_good = done
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        raise UserError(f"interrupted; the last checkpoint (step {last_good}) is in {run_dir}; "
                        f"continue with --resume") from None
    bar.close()
    dist.barrier()
    meta = checkpoint.read_meta(run_dir)
    return TrainResult(run_dir, meta)


def _all(flag: torch.Tensor, dist: Dist) -> bool:
    """True when the flag holds on every rank, so all ranks stop together."""
    if dist.active:
        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)
