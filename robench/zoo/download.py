"""Download a zoo checkpoint: stream, resume, check, and only then install.

The file streams into ``partial/<sha256>.part`` in the cache. A broken-off transfer keeps it and
the next fetch asks for the rest (an HTTP Range request; a server that answers with the whole file
is read from the start). A mirror refused before its first byte is written leaves the part as it
was, for the next mirror; every other failure deletes it, as does a break-off that no request
could resume. Only a file of the published size and sha256 whose content is a safetensors
checkpoint is renamed into place, so the cache never holds a half-written or unverified one.
Nothing is written through a symbolic link (``robench.zoo.cache``).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from robench.errors import UserError
import robench.zoo.transfer as transfer
from robench.zoo.cache import (ENV, CacheError, cached_path, file_digest, link_refusal, local_path, locked,
                               open_private, partial_path, private_dir, verify)
from robench.zoo.manifest import Entry
from robench.zoo.transfer import Answer, FetchError, Stalled

HEAD = 512  # the bytes a fresh download's content is judged on before any is written
_HTML = (b"<!doctype", b"<html", b"<head", b"<body", b"<!--")
HTML_TYPES = ("text/html", "application/xhtml+xml")
HOW = {"there": "already there", "fetched": "fetched and verified",
       "waited": "already in the cache (another process fetched it meanwhile)"}

__all__ = ["FetchError", "HOW", "fetch", "obtain"]


def fetch(entry: Entry, progress: bool = True) -> Path:
    """The verified local file of ``entry``, downloaded from its URLs (in order) if it is not
    cached. A corrupted cached copy is replaced."""
    return obtain(entry, progress)[0]


def obtain(entry: Entry, progress: bool = True) -> tuple[Path, str]:
    """(the verified local file of ``entry``, how it came: a ``HOW`` key). A cache that already
    holds the verified file is only read, so it may be read-only. The entry's architecture is
    checked before anything is downloaded."""
    if entry.shipped:
        return local_path(entry), "there"
    check_arch(entry)
    target = cached_path(entry)
    state = verify(entry)
    if state == "ok":
        return target, "there"
    if state == "link":
        raise link_refusal(entry)
    with locked(entry):
        state = verify(entry)
        if state == "ok":
            return target, "waited"
        if state == "link":
            raise link_refusal(entry)
        if state == "corrupt":
            if not target.is_file():
                raise CacheError(f"zoo entry {entry.name}: {target} is not a regular file; remove it")
            target.unlink()
        if not entry.urls:
            raise FetchError(f"zoo entry {entry.name} lists no URL to fetch it from", "no-url")
        errors: list[FetchError] = []
        for url in entry.urls:
            try:
                _download(entry, url, progress)
            except FetchError as e:
                if e.kind == "disk":
                    raise
                errors.append(e)
                continue
            return _install(entry), "fetched"
    if len(errors) == 1:
        raise errors[0]
    raise FetchError(f"cannot fetch {entry.name} from any of its {len(errors)} URLs: "
                     + "; ".join(str(e) for e in errors), errors[-1].kind)


def check_arch(entry: Entry) -> None:
    """Build the entry's model without memory (torch's meta device): an unknown architecture,
    or one that cannot take its channels and classes, is refused before any download."""
    import torch

    from robench.models import build_model

    try:
        with torch.device("meta"):
            build_model(entry.arch, entry.in_channels, entry.num_classes)
    except UserError as e:
        raise UserError(f"zoo entry {entry.name}: {e}") from None
    except Exception:  # a plugin's model that cannot be built on the meta device is checked when loaded
        pass


def _install(entry: Entry) -> Path:
    """Move the checked part into place: a rename within the cache, so atomic."""
    part, target = partial_path(entry), cached_path(entry)
    private_dir(target.parent)
    if os.path.islink(target):
        raise link_refusal(entry)
    os.replace(part, target)
    return target


def _download(entry: Entry, url: str, progress: bool) -> None:
    """Complete and check the part file from ``url``; a FetchError otherwise."""
    part = partial_path(entry)
    offset = _part_size(part)
    if offset == entry.size:  # finished by an earlier fetch that stopped before installing?
        problem = _judge(entry)
        if problem is None:
            return
        if problem[0] == "content":
            raise _refusal(entry, "the partial download " + str(part), problem)
    if offset >= entry.size:
        _drop(part)
        offset = 0
    free = shutil.disk_usage(part.parent).free
    if free < entry.size - offset:
        raise FetchError(f"not enough disk space for {entry.name} in {part.parent}: it needs "
                         f"{_mb(entry.size - offset)}, {_mb(free)} are free; free some or set ${ENV} to another disk",
                         "disk")
    answer = transfer.open_url(url, offset)
    try:
        _receive(entry, url, answer, progress)
    finally:
        answer.stream.close()
    problem = _judge(entry)
    if problem is not None:
        raise _refusal(entry, url, problem)


def _part_size(part: Path) -> int:
    """The bytes a part file holds (0: none); a link or a folder in its place is refused."""
    if not os.path.lexists(part):
        return 0
    fd = open_private(part, os.O_RDONLY, "partial download")
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _judge(entry: Entry) -> tuple[str, ...] | None:
    """Whether the part is the published file: None (then it is synced to disk), else
    ("size",), ("hash", its sha256) or ("content", what it is, FetchError kind): its size and
    hash match, but its content, which a resumed download never showed at its first byte, is
    no checkpoint."""
    fd = open_private(partial_path(entry), os.O_RDONLY, "partial download")
    try:
        size, got = file_digest(fd)
        if size != entry.size:
            return ("size",)
        if got != entry.sha256:
            return ("hash", got)
        problem = _content_problem(_read_at(fd, HEAD, 0), fd, entry.size)
        if problem is not None:
            return ("content", *problem)
        os.fsync(fd)
        return None
    finally:
        os.close(fd)


def _refusal(entry: Entry, source: str, problem: tuple[str, ...]) -> FetchError:
    """The FetchError of a part ``_judge`` refused, which is deleted."""
    _drop(partial_path(entry))
    if problem[0] == "size":
        return FetchError(f"{source} served a file of another size than the manifest's {entry.size} bytes; nothing "
                          f"was installed", "truncated")
    if problem[0] == "hash":
        return FetchError(f"{source} served a file with the wrong hash: sha256 {problem[1][:12]}..., expected "
                          f"{entry.sha256[:12]}... (the file changed, or the manifest is wrong); nothing was "
                          f"installed", "hash")
    return FetchError(f"{source} holds a file whose sha256 matches the manifest but that is {problem[1]}, not a "
                      f"checkpoint (the manifest is wrong?); nothing was installed", problem[2])


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{int(n)} bytes"


def _receive(entry: Entry, url: str, answer: Answer, progress: bool) -> None:
    """Append the body to the part file (or write it afresh when the body starts at 0). A
    refusal before the first write leaves the part as it was."""
    part, start = partial_path(entry), answer.start
    if answer.ctype in HTML_TYPES:
        raise _html(url)
    total = start + answer.length if answer.length is not None else None
    bar = tqdm(total=entry.size, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
               disable=not progress, leave=False, dynamic_ncols=True)
    received, out, head = start, None, b""
    try:
        try:
            for piece in transfer.pieces(answer.stream):
                bar.update(len(piece))
                if out is None:
                    head += piece
                    if start == 0 and len(head) < HEAD:
                        continue  # judge a fresh download on its first bytes before writing any
                    out, piece, head = _begin(entry, url, answer, head), head, b""
                received = _written(entry, url, out, piece, received)
            if out is None and (head or start == 0):
                out = _begin(entry, url, answer, head)
                received = _written(entry, url, out, head, received)
        finally:
            if out is not None:
                out.close()
    except _DiskError as e:
        _drop(part)
        full = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise FetchError(f"cannot write {part}: {full}; free some space or set ${ENV} to another disk; "
                         f"nothing was installed", "disk") from None
    except FetchError:
        if out is not None:  # written to: what it holds is refused
            _drop(part)
        raise
    except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, a stall, a broken TLS stream
        raise _broken(entry, url, answer, received + len(head), e) from None
    finally:
        bar.close()
    if received < entry.size:
        if total is not None:  # the server promised more than it sent before closing
            raise _broken(entry, url, answer, received, "the connection closed early")
        _drop(part)
        raise FetchError(f"{url} sent {received} of {entry.size} bytes and ended: a truncated file; nothing was "
                         f"installed", "truncated")


def _begin(entry: Entry, url: str, answer: Answer, head: bytes) -> BinaryIO:
    """The part file opened for the body, once a fresh body's first bytes pass the content checks
    and the answer's length is the file's."""
    if answer.start == 0:
        problem = _content_problem(head, None, entry.size)
        if problem is not None and problem[1] == "html":
            raise _html(url)
        if problem is not None:
            raise FetchError(f"{url} returned data that is not a safetensors checkpoint (it starts with "
                             f"{head[:16]!r}); nothing was installed", "not-checkpoint")
    total = answer.start + answer.length if answer.length is not None else None
    if total is not None and total != entry.size:
        raise FetchError(f"{url} serves {total} bytes where the manifest says {entry.size}: "
                         f"{'a truncated' if total < entry.size else 'a different'} file; nothing was installed",
                         "truncated" if total < entry.size else "too-large")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if answer.start else os.O_TRUNC)
    # Unbuffered, so a full disk fails the write that hits it, not a later flush.
    return os.fdopen(open_private(partial_path(entry), flags, "partial download"), "ab" if answer.start else "wb",
                     buffering=0)


def _html(url: str) -> FetchError:
    return FetchError(f"{url} returned an HTML page, not a checkpoint (a login, quota or virus-scan page?); "
                      f"nothing was installed", "html")


class _DiskError(OSError):
    pass


def _written(entry: Entry, url: str, out: BinaryIO, chunk: bytes, received: int) -> int:
    """The bytes received once ``chunk`` is written; more than the file's size is refused."""
    received += len(chunk)
    if received > entry.size:
        raise FetchError(f"{url} sent more than the {entry.size} bytes the manifest says: a different file; "
                         f"nothing was installed", "too-large")
    _write(out, chunk)
    return received


def _write(out: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view):]
    except OSError as e:
        raise _DiskError(e.errno, e.strerror) from None


def _drop(part: Path) -> None:
    part.unlink(missing_ok=True)


def _broken(entry: Entry, url: str, answer: Answer, received: int, reason: object) -> FetchError:
    part = partial_path(entry)
    kind = "stalled" if isinstance(reason, Stalled) else "interrupted"
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}" if str(reason) and not isinstance(reason, Stalled) \
            else str(reason) or type(reason).__name__
    what = f"the download of {entry.name} from {url} broke off after {_mb(received)} of {_mb(entry.size)} ({reason})"
    if answer.ignored_range:  # it answered a request for the rest with the whole file: never resumable
        _drop(part)
        return FetchError(f"{what}; {url} ignores requests for the rest of a file, so this download could never "
                          f"be resumed from it: the partial file was discarded; nothing was installed", "no-resume")
    if not part.is_file() or part.stat().st_size == 0:
        _drop(part)
        return FetchError(f"{what}; nothing was kept: run the same command again to retry", kind)
    return FetchError(f"{what}; the part is kept in {part}: run the same command again to resume", kind)


def _content_problem(head: bytes, fd: int | None, size: int) -> tuple[str, str] | None:
    """Why a file starting with ``head`` (of ``size`` bytes; open as ``fd`` to read its header
    whole) is not a safetensors checkpoint: (what it is, FetchError kind), or None."""
    if head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML):
        return "an HTML page", "html"
    # A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'.
    n = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or 8 + n > size:
        return "not a safetensors file", "not-checkpoint"
    if fd is not None and n <= 100 << 20:
        try:
            if not isinstance(json.loads(_read_at(fd, n, 8)), dict):
                raise ValueError
        except ValueError:
            return "not a safetensors file (its header is not a JSON object)", "not-checkpoint"
    return None


def _read_at(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from ``offset`` (``os.pread`` is not on every platform)."""
    os.lseek(fd, offset, os.SEEK_SET)
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out
