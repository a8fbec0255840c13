"""Where zoo checkpoints lie on this machine, and whether each local copy is the published file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from robench.checkpoint import sha256
from robench.errors import UserError
from robench.zoo.manifest import Entry

ENV = "ROBENCH_ZOO"
PARTIAL = "partial"


def cache_dir() -> Path:
    """``$ROBENCH_ZOO``, else ``zoo/`` in robench's cache (``$ROBENCH_CACHE``, ``$XDG_CACHE_HOME/robench``
    or ``~/.cache/robench``). A set but blank variable is refused, not read as the current directory."""
    value = os.environ.get(ENV)
    if value is None:
        from robench.data import cache_dir as robench_cache

        return robench_cache() / "zoo"
    if not value.strip() or value != value.strip():
        raise UserError(f"${ENV} {value!r} is blank or padded with spaces; unset it or set it to a directory")
    return Path(value).expanduser()


def shipped_path(entry: Entry) -> Path:
    """A shipped entry's file: in ``checkpoints/`` beside its manifest."""
    from robench.zoo.manifest import SHIPPED

    return (entry.source or SHIPPED).parent / "checkpoints" / entry.file


def cached_path(entry: Entry) -> Path:
    """Where a fetched entry is installed: one folder per content hash, so two entries (or two
    manifests) that name files alike never collide."""
    return cache_dir() / entry.sha256[:16] / entry.file


def partial_path(entry: Entry) -> Path:
    return cache_dir() / PARTIAL / f"{entry.sha256}.part"


def where(entry: Entry) -> str:
    """``shipped``, ``cached`` or ``remote`` (existence only; ``verify`` checks the hash)."""
    if entry.shipped:
        return "shipped"
    return "cached" if cached_path(entry).is_file() else "remote"


def verify(entry: Entry) -> str:
    """Re-hash the local copy: ``ok``, ``missing`` (not fetched, or a shipped file absent from
    this install) or ``corrupt`` (its size or sha256 differs from the manifest's)."""
    path = shipped_path(entry) if entry.shipped else cached_path(entry)
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry.size or sha256(path) != entry.sha256:
        return "corrupt"
    return "ok"


def local_path(entry: Entry, fetch: bool = False, progress: bool = True) -> Path:
    """The verified local file of ``entry``: the shipped file, or the cached copy (downloaded
    first when ``fetch`` and missing). A copy whose hash differs is refused, never loaded."""
    path = shipped_path(entry) if entry.shipped else cached_path(entry)
    state = verify(entry)
    if state == "ok":
        return path
    if entry.shipped:
        raise UserError(f"zoo entry {entry.name}: the shipped file {path} is {state}; reinstall robench")
    if state == "corrupt":
        raise UserError(f"zoo entry {entry.name}: the cached copy {path} is corrupted (its sha256 is not "
                        f"{entry.sha256[:12]}...); fetch it again with: robench zoo fetch {entry.name}")
    if not fetch:
        raise UserError(f"zoo entry {entry.name} is not downloaded; fetch it with: robench zoo fetch {entry.name}")
    from robench.zoo.download import fetch as download

    return download(entry, progress=progress)


@contextlib.contextmanager
def locked(entry: Entry) -> Iterator[None]:
    """Hold the entry's download lock: one process at a time writes its partial file. The lock
    file goes when released; a waiter that locked a file since removed locks afresh."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one fetch at a time is the user's care
        yield
        return
    path = partial_path(entry).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
