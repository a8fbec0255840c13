"""Zoo manifests: the ``Entry`` of each published checkpoint, read and written as versioned JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from robench import atomic
from robench.errors import UserError

FORMAT = 1
SHIPPED = Path(__file__).with_name("manifest.json")
ENV = "ROBENCH_ZOO_MANIFESTS"
SCHEMES = ("http://", "https://", "file:")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_SHA = re.compile(r"[0-9a-f]{64}\Z")


@dataclass
class Entry:
    """One published checkpoint: what it is, how it was trained, where it lies, what it scored.

    ``results`` maps a result name (the attack, or ``ATTACK@EPS`` at a radius other than the
    dataset's default) to {accuracy, ci95: [lo, hi], n, params, ...} as stored when the entry
    was added. ``shipped``: the file lies in ``checkpoints/`` beside the manifest (package data
    for the manifest inside robench). ``mean``/``std``: the input normalisation the weights
    expect, for external models; robench's own models take [0, 1] inputs and need none."""

    name: str
    defense: str
    dataset: str
    arch: str
    in_channels: int
    num_classes: int
    sha256: str
    size: int
    file: str
    robench_version: str
    classes: list[str] = field(default_factory=list)
    image_size: list[int] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    shipped: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    reference: dict[str, str] = field(default_factory=dict)  # link, title, authors, venue
    notes: str = ""
    source: Path | None = field(default=None, compare=False, repr=False)  # the manifest it came from

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}

    def record(self) -> dict[str, Any]:
        """The entry as a checkpoint record (``robench.checkpoint``) holds it, for code that
        takes a run's record."""
        return {"defense": self.defense, "dataset": self.dataset, "arch": self.arch,
                "in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "classes": self.classes, "config": self.config, "objective": self.objective, "finished": True,
                "versions": {"robench": self.robench_version},
                "files": {"weights": {"name": self.file, "sha256": self.sha256}}}


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "defense": (str,), "dataset": (str,), "arch": (str,), "in_channels": (int,),
    "num_classes": (int,), "sha256": (str,), "size": (int,), "file": (str,), "robench_version": (str,),
    "classes": (list,), "image_size": (list, type(None)), "config": (dict,), "objective": (dict,),
    "urls": (list,), "shipped": (bool,), "results": (dict,), "mean": (list, type(None)),
    "std": (list, type(None)), "reference": (dict,), "notes": (str,),
}
_REQUIRED = [f.name for f in dataclasses.fields(Entry)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


MAX_CHANNELS = 1024
MAX_CLASSES = 100_000
MAX_SIDE = 16_384  # pixels along one side of an image
MAX_SIZE = 1 << 40  # bytes of a checkpoint file
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: str, where: str = "zoo entry name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{where} {name!r} must be lowercase letters, digits, '.', '_' or '-' "
                        f"(e.g. rlfat-p-cifar10)")
    return name


def check_url(url: str, where: str) -> str:
    """``url`` if it is an http(s) URL with a host, or a file: URL, that ``urllib.parse`` reads."""
    if not isinstance(url, str) or not url.startswith(SCHEMES) or url != url.strip():
        raise UserError(f"{where}: URL {url!r} must start with http://, https:// or file:")
    try:
        if _CONTROL.search(url) or " " in url:
            raise ValueError("a space or a control character")
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port out of range or not a number raises ValueError)
        if parts.scheme != "file" and not parts.hostname:
            raise ValueError("no host")
        if parts.scheme == "file" and not parts.path:
            raise ValueError("no path")
    except ValueError as e:
        raise UserError(f"{where}: URL {url!r} is not a valid URL ({e})") from None
    return url


def _number(value: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """A finite JSON number (not a boolean) in [lo, hi]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and lo <= value <= hi


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _line(value: Any) -> bool:
    """A non-empty string of one line without control characters."""
    return isinstance(value, str) and bool(value.strip()) and not _CONTROL.search(value)


def _check_fields(data: dict[str, Any], label: str) -> None:
    """Each field's range and content (their JSON types are checked already)."""
    def fail(message: str) -> None:
        raise UserError(f"{label}: {message}")

    check_name(data["name"], f"{label}: name")
    if not _SHA.match(data["sha256"]):
        fail("sha256 must be 64 lowercase hex digits")
    for key in ("defense", "dataset", "arch", "robench_version"):
        if not _line(data[key]):
            fail(f"{key} must be a line of text without control characters, got {json.dumps(data[key])[:40]}")
    for key, hi in (("size", MAX_SIZE), ("in_channels", MAX_CHANNELS), ("num_classes", MAX_CLASSES)):
        if not _whole(data[key], 1, hi):
            fail(f"{key} must be positive and at most {hi}, got {data[key]}")
    file = data["file"]
    if _CONTROL.search(file) or "\\" in file or Path(file).name != file or not file.endswith(".safetensors"):
        fail(f"file {file!r} must be a plain NAME.safetensors (no folder, no control characters)")
    classes = data.get("classes", [])
    if not all(_line(c) for c in classes):
        fail("classes must be lines of text without control characters")
    if classes and len(classes) != data["num_classes"]:
        fail(f"classes names {len(classes)} classes, but num_classes is {data['num_classes']}")
    size = data.get("image_size")
    if size is not None and (len(size) != 2 or not all(_whole(v, 1, MAX_SIDE) for v in size)):
        fail(f"image_size must be [height, width], two whole numbers from 1 to {MAX_SIDE}, got {json.dumps(size)[:40]}")
    for i, url in enumerate(data.get("urls", [])):
        check_url(url, f"{label}: urls[{i}]")
    mean, std = data.get("mean"), data.get("std")
    for norm, values in (("mean", mean), ("std", std)):
        if values is not None and (len(values) != data["in_channels"] or not all(_number(v) for v in values)):
            fail(f"{norm} must hold {data['in_channels']} numbers, one per channel")
    if (mean is None) != (std is None):
        fail("mean and std go together: give both or neither")
    if std is not None and not all(v > 0 for v in std):
        fail(f"std must be positive in every channel, got {json.dumps(std)[:40]}")
    for key in ("config", "objective"):
        if data.get(key, {}).get("eps") is not None and not _number(data[key]["eps"], 0):
            fail(f"{key}.eps must be a number >= 0, got {json.dumps(data[key]['eps'])[:40]}")
    reference = data.get("reference", {})
    if not all(isinstance(v, str) for v in reference.values()):
        fail("reference values (link, title, authors, venue) must be strings")
    for key, result in data.get("results", {}).items():
        _check_result(key, result, fail)


def _check_result(key: str, result: Any, fail) -> None:
    if not _line(key):
        fail(f"result name {key!r} must be a line of text without control characters")
    if not isinstance(result, dict) or not isinstance(result.get("accuracy"), (int, float)) \
            or not _whole(result.get("n"), 0, 1 << 62):
        fail(f"result {key!r} must hold a numeric accuracy and an integer n")
    if not _number(result["accuracy"], 0, 1) or result["n"] < 1:
        fail(f"result {key!r}: accuracy must be a number from 0 to 1 and n positive")
    ci = result.get("ci95")
    if ci is not None and (not isinstance(ci, list) or len(ci) != 2 or not all(_number(v, -1e-9, 1 + 1e-9) for v in ci)
                           or ci[0] > ci[1]):
        fail(f"result {key!r}: ci95 must be null or [low, high], numbers from 0 to 1, got {json.dumps(ci)[:40]}")
    params = result.get("params", {})
    if not isinstance(params, dict):
        fail(f"result {key!r}: params must be an object")
    if params.get("eps") is not None and not _number(params["eps"], 0):
        fail(f"result {key!r}: params.eps must be a number >= 0, got {json.dumps(params['eps'])[:40]}")
    for field_ in ("split", "examples", "data", "measured"):
        if field_ in result and not isinstance(result[field_], str):
            fail(f"result {key!r}: {field_} must be a string")


def entry_from_json(data: Any, where: str, source: Path | None = None) -> Entry:
    """An ``Entry`` from its JSON object; any wrong field is a one-line UserError naming the
    manifest, the entry and the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: an entry must be a JSON object")
    label = f"{where} entry {data.get('name')!r}" if isinstance(data.get("name"), str) else f"{where} entry"
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{label} lacks {', '.join(missing)}")
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise UserError(f"{label} has unknown field(s) {', '.join(unknown)} (a typo, or a newer robench's manifest?)")
    for key, value in data.items():
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in _TYPES[key])
            raise UserError(f"{label}: {key} must be {names}, got {json.dumps(value)[:40]}")
    _check_fields(data, label)
    return Entry(**data, source=source)


def read_manifest(path: Path) -> list[Entry]:
    """The entries of one manifest file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"zoo manifest {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"zoo manifest {path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"zoo manifest {path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "format" not in data or not isinstance(data.get("entries"), list):
        raise UserError(f"zoo manifest {path} must be a JSON object with \"format\" and an \"entries\" list")
    if data["format"] != FORMAT:
        raise UserError(f"zoo manifest {path} has format {data['format']!r}; this robench reads format {FORMAT} "
                        f"(upgrade robench?)")
    found = [entry_from_json(e, f"zoo manifest {path}", path) for e in data["entries"]]
    _unique(found)
    return found


def write_manifest(path: Path, found: Iterable[Entry]) -> None:
    """Write ``found`` to ``path`` atomically, sorted by name."""
    data = {"format": FORMAT, "entries": [e.to_json() for e in sorted(found, key=lambda e: e.name)]}
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def manifest_paths(manifests: Sequence[Path] = ()) -> list[Path]:
    """The shipped manifest, then those named in ``$ROBENCH_ZOO_MANIFESTS``, then ``manifests``."""
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    paths = [SHIPPED, *(Path(p).expanduser() for p in env), *map(Path, manifests)]
    out: list[Path] = []
    for p in paths:  # the same file named twice is read once
        if not any(_same_file(p, q) for q in out):
            out.append(p)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _unique(found: list[Entry]) -> None:
    seen: dict[str, Entry] = {}
    for e in found:
        if e.name in seen:
            a, b = seen[e.name].source, e.source
            where = f"in {a}" if a == b else f"in {a} and {b}"
            raise UserError(f"zoo entry {e.name!r} is defined twice ({where}); names must be unique")
        seen[e.name] = e


def entries(manifests: Sequence[Path] = ()) -> list[Entry]:
    """Every entry of every manifest (``manifest_paths``); a name defined twice is refused."""
    found = [e for p in manifest_paths(manifests) for e in read_manifest(p)]
    _unique(found)
    return found


def get(name: str, manifests: Sequence[Path] = ()) -> Entry:
    found = entries(manifests)
    for e in found:
        if e.name == name:
            return e
    names = ", ".join(e.name for e in found) or "none; add one with robench zoo add"
    raise UserError(f"unknown zoo entry {name!r}; choose from: {names}")


def find(defense: str, dataset: str | None = None, manifests: Sequence[Path] = ()) -> Entry | None:
    """The entry of ``defense`` on ``dataset`` (none given: preferably on the embedded default
    dataset): a shipped one first, else the first listed."""
    from robench.config import DEFAULT_DATASET

    matches = [e for e in entries(manifests) if e.defense == defense and dataset in (None, e.dataset)]
    matches.sort(key=lambda e: (e.dataset != (dataset or DEFAULT_DATASET), not e.shipped))  # stable
    return matches[0] if matches else None
