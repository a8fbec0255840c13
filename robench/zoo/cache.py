"""Where zoo checkpoints lie on this machine, and whether each local copy is the published file.

The cache may be shared (a lab's ``$ROBENCH_ZOO``), so robench never reads or writes through a
symbolic link inside it, creates its folders private to their owner (mode 0o700), writes only
into folders of its own user, and opens every file it writes with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterator

from robench.errors import UserError
from robench.zoo.manifest import Entry

ENV = "ROBENCH_ZOO"
PARTIAL = "partial"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows, which has no symlinks a user can plant freely
_LINK = "robench never reads or writes through a link in its zoo cache"


class CacheError(UserError):
    """The cache cannot be used safely: a link, a folder of another user, a file that is not one."""


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
    return "cached" if _kind(cached_path(entry)) == "file" else "remote"


def _kind(path: Path) -> str:
    """``missing``, ``link`` (the path or its folder inside the cache is a symbolic link), ``file``
    (a regular file) or ``other``."""
    try:
        if stat.S_ISLNK(os.lstat(path.parent).st_mode):
            return "link"
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:  # a cache folder of another user's, private to them
        raise CacheError(f"cannot read the zoo cache at {path}: {e.strerror}; set ${ENV} to a folder of "
                         f"yours") from None
    return "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"


def verify(entry: Entry) -> str:
    """Re-hash the local copy: ``ok``, ``missing`` (not fetched, or a shipped file absent from
    this install), ``corrupt`` (its size or sha256 differs from the manifest's, or it is not a
    regular file) or ``link`` (the cached copy or its folder is a symbolic link: never read)."""
    if entry.shipped:
        path = shipped_path(entry)
        if not path.is_file():
            return "missing"
        with open(path, "rb") as f:
            return "ok" if file_digest(f.fileno()) == (entry.size, entry.sha256) else "corrupt"
    path = cached_path(entry)
    kind = _kind(path)
    if kind != "file":
        return {"missing": "missing", "link": "link"}.get(kind, "corrupt")
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link since
            return "link"
        raise CacheError(f"cannot read {path}: {e.strerror}") from None
    try:
        return "ok" if file_digest(fd) == (entry.size, entry.sha256) else "corrupt"
    finally:
        os.close(fd)


def file_digest(fd: int) -> tuple[int, str]:
    """(size, sha256) of an open file, read from its start."""
    h, size = hashlib.sha256(), 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return size, h.hexdigest()
        h.update(chunk)
        size += len(chunk)


def link_refusal(entry: Entry) -> CacheError:
    path = cached_path(entry)
    return CacheError(f"zoo entry {entry.name}: the cached copy {path} (or its folder) is a symbolic link; {_LINK}: "
                      f"remove it, then fetch it again with: robench zoo fetch {entry.name}")


def local_path(entry: Entry, fetch: bool = False, progress: bool = True) -> Path:
    """The verified local file of ``entry``: the shipped file, or the cached copy (downloaded
    first when ``fetch`` and missing). A copy whose hash differs is refused, never loaded."""
    path = shipped_path(entry) if entry.shipped else cached_path(entry)
    state = verify(entry)
    if state == "ok":
        return path
    if entry.shipped:
        raise UserError(f"zoo entry {entry.name}: the shipped file {path} is {state}; reinstall robench")
    if state == "link":
        raise link_refusal(entry)
    if state == "corrupt":
        raise UserError(f"zoo entry {entry.name}: the cached copy {path} is corrupted (its sha256 is not "
                        f"{entry.sha256[:12]}...); fetch it again with: robench zoo fetch {entry.name}")
    if not fetch:
        raise UserError(f"zoo entry {entry.name} is not downloaded; fetch it with: robench zoo fetch {entry.name}")
    from robench.zoo.download import fetch as download

    return download(entry, progress=progress)


def private_dir(path: Path) -> Path:
    """``path``, the cache or a folder in it, as a folder of this user's: created (mode 0o700)
    when missing. A folder in the cache that is a link, anything not a folder, or a folder
    owned by another user is refused. (The cache itself may be a link to a folder of one's own.)"""
    root = cache_dir()
    if path != root:
        private_dir(root)
    else:
        _mkdir(root.parent, parents=True)
    _mkdir(path)
    try:
        st = os.stat(path) if path == root else os.lstat(path)
    except OSError as e:
        raise CacheError(f"cannot use the zoo cache folder {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"the zoo cache folder {path} is a symbolic link; {_LINK}: remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"the zoo cache folder {path} is not a folder; remove it or set ${ENV} elsewhere")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheError(f"the zoo cache folder {path} belongs to another user (uid {st.st_uid}); robench writes only "
                         f"into folders of its own user: set ${ENV} to a folder of yours")
    return path


def _mkdir(path: Path, parents: bool = False) -> None:
    try:
        if parents:
            path.mkdir(parents=True, exist_ok=True)
        else:
            os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheError(f"cannot create the zoo cache folder {path}: {e.strerror}; set ${ENV} to a folder "
                         f"you can write") from None


def open_private(path: Path, flags: int, what: str) -> int:
    """``os.open`` of a file in a checked cache folder, never through a link; a file that is not a
    regular file (a folder, a FIFO) is refused."""
    try:
        fd = os.open(path, flags | NOFOLLOW, 0o600)
    except OSError as e:
        if os.path.islink(path):
            raise CacheError(f"the {what} {path} is a symbolic link; {_LINK}: remove it") from None
        if os.path.isdir(path):
            raise CacheError(f"the {what} {path} is a folder, not a file: it can never complete; remove it") from None
        raise CacheError(f"cannot open the {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise CacheError(f"the {what} {path} is a folder, not a file: it can never complete; remove it")
        raise CacheError(f"the {what} {path} is not a regular file; remove it")
    return fd


@contextlib.contextmanager
def locked(entry: Entry) -> Iterator[None]:
    """Hold the entry's download lock: one process at a time writes its partial file. The lock
    file goes when released; a waiter that locked a file since removed locks afresh."""
    path = partial_path(entry).with_suffix(".lock")
    private_dir(path.parent)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one fetch at a time is the user's care
        yield
        return
    while True:
        fd = open_private(path, os.O_RDWR | os.O_CREAT, "download lock")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
