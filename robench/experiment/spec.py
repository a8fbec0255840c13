"""An experiment file (TOML), read into frozen dataclasses and checked once.

Every mistake is one ``UserError`` line naming the file and the field. Paths in the file are
relative to the file's own folder, so an experiment under ``experiments/`` names the shared data
as ``../../shared/data/...`` wherever it is run from. The format is documented in
``docs/experiments.md``; ``experiments/digits-quick.toml`` is the smallest complete example.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from robench.errors import UserError

AT = ("every", "final", "final+best")  # the stages an attack or the sensitivity runs at
TEST_ORDERS = ("balanced", "loader")


@dataclass(frozen=True)
class Data:
    dataset: str
    data_dir: Path | None = None
    archive: Path | None = None  # a .tar.gz unpacked once into robench's cache
    archive_sha256: str | None = None
    n_train: int | None = None  # class-balanced training subset (None: every training image)
    n_val: int = 0  # held-out training images, never trained on: they choose the best stage
    test_order: str = "balanced"
    order_seed: int = 0


@dataclass(frozen=True)
class DefenseRun:
    label: str  # the name in the report: a registered defense, or a variant of one
    defense: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> bool:
        return self.label != self.defense


@dataclass(frozen=True)
class AttackRun:
    label: str  # the table's key: the attack's name, or another label with ``attack = NAME``
    name: str  # the registered attack (or "clean")
    n: int
    at: str = "every"
    train_n: int = 0  # also on this many training images, at the same stages
    eps: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    description: str
    settings: tuple[str, ...]  # --set overrides of the file's values
    digest: str  # sha256 of the file's bytes (and of any --set), recorded with the report
    data: Data
    arch: str
    defenses: tuple[DefenseRun, ...]
    seeds: tuple[int, ...]
    steps: int
    stages: tuple[int, ...]  # step counts evaluated, ascending, the last == steps
    epochs: int | None  # when the file counts in epochs
    batch_size: int
    lr: float
    flip: bool
    train_amp: bool
    train_options: dict[str, Any]
    attacks: tuple[AttackRun, ...]
    sensitivity_n: int
    sensitivity_at: str
    select: str  # the attack whose accuracy on the held-out images picks the best stage
    workers: int
    threads: int
    device: str
    compile: bool
    out: Path
    pairs: tuple[tuple[str, str], ...]
    paper: bool
    engine_report: bool
    salience: int  # SmoothGrad samples for the engine report's maps (0: none)
    publish: Path | None
    publish_tag: str

    @property
    def steps_per_epoch(self) -> int:
        return self.data.n_train // self.batch_size if self.epochs is not None else 0

    def epoch_of(self, step: int) -> float | None:
        return step / self.steps_per_epoch if self.epochs is not None else None

    def attack(self, label: str) -> AttackRun | None:
        return next((a for a in self.attacks if a.label == label), None)


class _Table:
    """A TOML table being read: typed getters whose errors name the file and the field, and a
    check that nothing unknown is left (a typo must not be silently ignored)."""

    def __init__(self, path: Path, where: str, table: Any) -> None:
        self.path, self.where = path, where
        if not isinstance(table, dict):
            self.fail(where, "must be a table")
        self.table, self.used = table, set()

    def fail(self, key: str, what: str):
        raise UserError(f"{self.path}: [{self.where}] {key} {what}" if key != self.where
                        else f"{self.path}: [{self.where}] {what}")

    def get(self, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                self.fail(key, "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(key, f"must be {names}, got {value!r}")
        return value

    def positive(self, key: str, default: int | None = None, required: bool = False, zero: bool = False) -> int | None:
        value = self.get(key, int, default, required)
        if value is not None and (value < 0 or (value == 0 and not zero)):
            self.fail(key, f"must be {'non-negative' if zero else 'positive'}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def sub(self, key: str) -> "_Table":
        return _Table(self.path, f"{self.where}.{key}" if self.where != "top" else key, self.get(key, dict, {}))

    def path_of(self, key: str) -> Path | None:
        text = self.get(key, str)
        if text is None:
            return None
        if not text.strip() or "\0" in text:
            self.fail(key, "is empty or holds a NUL")
        p = Path(text).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(unknown[0], f"is not a known field here (known: {', '.join(sorted(self.used))})")


def parse_setting(text: str) -> tuple[list[str], Any]:
    """``train.steps=10`` -> (["train", "steps"], 10). The key is a TOML key, so a part may be
    quoted (``attacks."pgd-eps0.5".n=4``); the value is a TOML value (numbers, booleans, quoted
    strings, arrays, inline tables), and a bare word is kept as a string."""
    key, sep, value = text.partition("=")
    usage = f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. --set train.steps=100"
    if not sep or not key.strip() or not value.strip():
        raise UserError(usage)
    try:
        node: Any = tomllib.loads(f"{key.strip()} = 0")
    except tomllib.TOMLDecodeError:
        raise UserError(usage) from None
    parts = []
    while isinstance(node, dict):
        parts.append(next(iter(node)))
        node = node[parts[-1]]
    for candidate in (value.strip(), '"' + value.strip().replace('"', '\\"') + '"'):
        try:
            return parts, tomllib.loads(f"v = {candidate}")["v"]
        except tomllib.TOMLDecodeError:
            continue
    raise UserError(usage)


def load_experiment(path: Path | str, settings: tuple[str, ...] = ()) -> Experiment:
    """Read and check an experiment file; ``settings`` (``SECTION.KEY=VALUE``) replace the file's
    values first, and are part of the experiment's digest."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist")
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid TOML file ({str(e).splitlines()[0]})") from None
    for text in settings:
        keys, value = parse_setting(text)
        table = doc
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {text!r}: {k} is not a table in {path}")
        table[keys[-1]] = value
        raw += b"\0--set " + text.encode()
    top = _Table(path, "top", doc)
    name = top.get("name", str, path.stem)
    description = top.get("description", str, "")
    data = _data(top.sub("data"))
    arch = top.sub("model")
    arch_name = arch.get("arch", str, required=True)
    arch.done()
    train = top.sub("train")
    seeds = tuple(_int_list(train, "seeds", [0]))
    batch = train.positive("batch_size", 32)
    epochs = train.positive("epochs")
    steps = train.positive("steps")
    if (epochs is None) == (steps is None):
        train.fail("steps", "or epochs: give exactly one")
    stages = _int_list(train, "eval_at", [])
    if epochs is not None:
        if data.n_train is None:
            train.fail("epochs", "needs [data] n_train (an epoch is n_train // batch_size steps)")
        per_epoch = data.n_train // batch
        if per_epoch == 0:
            train.fail("batch_size", f"{batch} is larger than [data] n_train {data.n_train}")
        steps, stages = epochs * per_epoch, [e * per_epoch for e in stages]
        bound = epochs
    else:
        bound = steps
    if any(s <= 0 for s in stages) or any(s > steps for s in stages):
        train.fail("eval_at", f"values must lie in 1..{bound}")
    lr = train.get("lr", float, 1e-3)
    if not (math.isfinite(lr) and lr > 0):
        train.fail("lr", f"must be positive, got {lr}")
    flip = train.get("flip", bool, True)
    amp = train.get("amp", bool, False)
    options = train.get("options", dict, {})
    train.done()
    defenses = _defenses(top.sub("defenses"))
    attacks = _attacks(top.sub("attacks"), data)
    sens = top.sub("sensitivity")
    sens_n = sens.positive("n", 0, zero=True)
    sens_at = sens.choice("at", AT, "every")
    sens.done()
    select = top.sub("select")
    select_attack = select.get("attack", str, "pgd")
    select.done()
    if data.n_val and not any(a.label == select_attack and a.at == "every" for a in attacks):
        top.fail("select", f"attack {select_attack!r} must be an attack run at every stage ([attacks.{select_attack}] "
                           "at = \"every\") to choose the best stage")
    run = top.sub("run")
    workers, threads = run.positive("workers", 1), run.positive("threads", 1)
    device, compile_ = run.get("device", str, "cpu"), run.get("compile", bool, False)
    run.done()
    report = top.sub("report")
    out = report.path_of("out") or path.parent / "results" / name
    pairs = report.get("pairs", list, [])
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs):
        report.fail("pairs", "must be a list of [a, b] pairs of defense labels")
    labels = {d.label for d in defenses}
    for a, b in pairs:
        if a not in labels or b not in labels:
            report.fail("pairs", f"names {a if a not in labels else b!r}, which [defenses] does not list")
    paper = report.get("paper", bool, False)
    engine = report.get("engine_report", bool, True)
    salience = report.positive("salience_samples", 0, zero=True)
    publish = report.path_of("publish")
    tag = report.get("publish_tag", str, name)
    report.done()
    top.done()
    return Experiment(path.resolve(), name, description, tuple(settings), hashlib.sha256(raw).hexdigest(), data,
                      arch_name, defenses, seeds, steps, tuple(sorted(set(stages) | {steps})), epochs, batch, lr,
                      flip, amp, dict(options), attacks, sens_n, sens_at, select_attack, workers, threads, device,
                      compile_, out, tuple((a, b) for a, b in pairs), paper, engine, salience, publish, tag)


def _int_list(table: _Table, key: str, default: list[int]) -> list[int]:
    values = table.get(key, list, default)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        table.fail(key, f"must be a list of integers, got {values!r}")
    if len(set(values)) != len(values):
        table.fail(key, "repeats a value")
    return values


def _data(t: _Table) -> Data:
    data = Data(
        dataset=t.get("dataset", str, required=True),
        data_dir=t.path_of("data_dir"),
        archive=t.path_of("archive"),
        archive_sha256=t.get("archive_sha256", str),
        n_train=t.positive("n_train"),
        n_val=t.positive("n_val", 0, zero=True),
        test_order=t.choice("test_order", TEST_ORDERS, "balanced"),
        order_seed=t.get("order_seed", int, 0),
    )
    if data.data_dir is not None and data.archive is not None:
        t.fail("archive", "and data_dir exclude each other")
    if data.n_val and data.n_train is None:
        t.fail("n_val", "needs n_train: the held-out images are the training images after the subset")
    t.done()
    return data


def _defenses(t: _Table) -> tuple[DefenseRun, ...]:
    from robench.registry import DEFENSES

    out = []
    for label in list(t.table):
        spec = t.get(label, dict)
        defense = spec.get("defense", label)
        if not isinstance(defense, str) or defense not in DEFENSES.names():
            t.fail(label, f"names no registered defense ({defense!r}); known: {', '.join(DEFENSES.names())}")
        if label != label.strip() or not label or "/" in label or label.startswith("."):
            t.fail(label, "must be a plain name (no '/', no leading '.' or spaces)")
        out.append(DefenseRun(label, defense, {k: v for k, v in spec.items() if k != "defense"}))
    if not out:
        t.fail(t.where, "lists no defense")
    t.done()
    return tuple(out)


def _attacks(t: _Table, data: Data) -> tuple[AttackRun, ...]:
    from robench.evaluation import CLEAN
    from robench.registry import ATTACKS

    out = []
    for label in list(t.table):
        a = t.sub(label)
        name = a.get("attack", str, label)
        if name != CLEAN and name not in ATTACKS.names():
            t.fail(label, f"is no registered attack ({name!r}); known: {CLEAN}, {', '.join(ATTACKS.names())}")
        run = AttackRun(label, name, a.positive("n", required=True), a.choice("at", AT, "every"),
                        a.positive("train_n", 0, zero=True), a.get("eps", float), a.get("options", dict, {}),
                        a.positive("batch_size", 256))
        if run.train_n and run.at != "every":
            a.fail("train_n", "needs at = \"every\" (the generalization gap is measured at every stage)")
        if data.n_train is not None and run.train_n > data.n_train:
            a.fail("train_n", f"{run.train_n} exceeds [data] n_train {data.n_train}")
        a.done()
        out.append(run)
    t.done()
    return tuple(out)
