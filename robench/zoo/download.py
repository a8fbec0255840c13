"""Download a zoo checkpoint: stream, resume, check, and only then install.

The file streams into ``partial/<sha256>.part`` in the cache. A broken-off transfer keeps it and
the next fetch asks for the rest (an HTTP Range request; a server that answers with the whole file
is read from the start). Every other failure deletes it. Only a file of the published size and
sha256 is renamed into place, so the cache never holds a half-written or unverified checkpoint.
"""

from __future__ import annotations

import errno
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

import robench
from robench.checkpoint import sha256
from robench.errors import UserError
from robench.zoo.cache import ENV, cached_path, local_path, locked, partial_path, verify
from robench.zoo.manifest import Entry

CHUNK = 1 << 20
TIMEOUT = 60  # seconds without a byte before a transfer counts as broken off
_HTML = (b"<!doctype", b"<html", b"<head", b"<body", b"<!--")
HTML_TYPES = ("text/html", "application/xhtml+xml")


class FetchError(UserError):
    """A failed fetch. ``kind``: offline, http, html, not-checkpoint, truncated, too-large, hash,
    disk, interrupted or no-url."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def fetch(entry: Entry, progress: bool = True) -> Path:
    """The verified local file of ``entry``, downloaded from its URLs (in order) if it is not
    cached. A corrupted cached copy is replaced."""
    if entry.shipped:
        return local_path(entry)
    target = cached_path(entry)
    with locked(entry):
        state = verify(entry)
        if state == "ok":
            return target
        if state == "corrupt":
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
            return _install(entry)
    if len(errors) == 1:
        raise errors[0]
    raise FetchError(f"cannot fetch {entry.name} from any of its {len(errors)} URLs: "
                     + "; ".join(str(e) for e in errors), errors[-1].kind)


def _install(entry: Entry) -> Path:
    """Move the verified part into place: a rename within the cache, so atomic."""
    part, target = partial_path(entry), cached_path(entry)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    return target


def _download(entry: Entry, url: str, progress: bool) -> None:
    """Complete and check the part file from ``url``; a FetchError otherwise."""
    part = partial_path(entry)
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if offset == entry.size and _hash_ok(entry, part):
        return  # finished by an earlier fetch that stopped before installing
    if offset >= entry.size:
        part.unlink()
        offset = 0
    free = shutil.disk_usage(part.parent).free
    if free < entry.size - offset:
        raise FetchError(f"not enough disk space for {entry.name} in {part.parent}: it needs "
                         f"{_mb(entry.size - offset)}, {_mb(free)} are free; free some or set ${ENV} to another disk",
                         "disk")
    stream, start, length, ctype = _open(url, offset)
    try:
        _receive(entry, url, stream, start, length, ctype, progress)
    finally:
        stream.close()
    if not _hash_ok(entry, part):
        got = sha256(part)
        part.unlink()
        raise FetchError(f"{url} served a file with the wrong hash: sha256 {got[:12]}..., expected "
                         f"{entry.sha256[:12]}... (the file changed, or the manifest is wrong); nothing was "
                         f"installed", "hash")


def _hash_ok(entry: Entry, part: Path) -> bool:
    return part.stat().st_size == entry.size and sha256(part) == entry.sha256


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{int(n)} bytes"


def _open(url: str, offset: int) -> tuple[BinaryIO, int, int | None, str]:
    """(body stream, the byte where the body starts, its length if known, its content type)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        try:
            f = open(path, "rb")
        except OSError as e:
            raise FetchError(f"cannot read {url}: {e.strerror}", "http") from None
        size = os.fstat(f.fileno()).st_size
        start = offset if offset <= size else 0
        f.seek(start)
        return f, start, size - start, ""
    headers = {"User-Agent": f"robench/{robench.__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    host = parsed.netloc or url
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # the part is longer than what the server has: start over
            return _open(url, 0)
        raise FetchError(f"{url} answered HTTP {e.code} {e.reason}", "http") from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise FetchError(f"cannot reach {host} ({reason}): offline or unreachable? ({url})", "offline") from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"cannot reach {host} ({type(e).__name__}: {e}): offline or unreachable? ({url})",
                         "offline") from None
    start = 0
    if response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset:
            response.close()
            if offset:  # not the range we asked for: read the whole file instead
                return _open(url, 0)
            raise FetchError(f"{url} answered 206 Partial Content to a request for the whole file", "http")
        start = offset
    length = response.headers.get("Content-Length")
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return response, start, int(length) if length and length.isdigit() else None, ctype


def _receive(entry: Entry, url: str, stream: BinaryIO, start: int, length: int | None, ctype: str,
             progress: bool) -> None:
    """Append the body to the part file (or write it afresh when the body starts at 0)."""
    part = partial_path(entry)
    received = start
    try:
        first = b"" if ctype in HTML_TYPES else stream.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, a broken TLS stream
        raise _broken(entry, url, part, received, e) from None
    if ctype in HTML_TYPES or (start == 0 and _is_html(first)):
        _drop(part)
        raise FetchError(f"{url} returned an HTML page, not a checkpoint (a login, quota or virus-scan "
                         f"page?); nothing was installed", "html")
    if start == 0 and not _is_safetensors(first, entry.size):
        _drop(part)
        raise FetchError(f"{url} returned data that is not a safetensors checkpoint (it starts with "
                         f"{first[:16]!r}); nothing was installed", "not-checkpoint")
    total = start + length if length is not None else None
    if total is not None and total != entry.size:
        _drop(part)
        raise FetchError(f"{url} serves {total} bytes where the manifest says {entry.size}: "
                         f"{'a truncated' if total < entry.size else 'a different'} file; nothing was installed",
                         "truncated" if total < entry.size else "too-large")
    bar = tqdm(total=entry.size, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        # Unbuffered, so a full disk fails the write that hits it, not a later flush.
        with open(part, "ab" if start else "wb", buffering=0) as out:
            chunk = first
            while chunk:
                received += len(chunk)
                if received > entry.size:
                    raise FetchError(f"{url} sent more than the {entry.size} bytes the manifest says: a different "
                                     f"file; nothing was installed", "too-large")
                _write(out, chunk)
                bar.update(len(chunk))
                chunk = stream.read(CHUNK)
    except _DiskError as e:
        _drop(part)
        full = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise FetchError(f"cannot write {part}: {full}; free some space or set ${ENV} to another disk; "
                         f"nothing was installed", "disk") from None
    except FetchError:
        _drop(part)
        raise
    except (OSError, http.client.HTTPException) as e:
        raise _broken(entry, url, part, received, e) from None
    finally:
        bar.close()
    if received < entry.size:
        if total is not None:  # the server promised more than it sent before closing
            raise _broken(entry, url, part, received, "the connection closed early")
        _drop(part)
        raise FetchError(f"{url} sent {received} of {entry.size} bytes and ended: a truncated file; nothing was "
                         f"installed", "truncated")


class _DiskError(OSError):
    pass


def _write(out: BinaryIO, chunk: bytes) -> None:
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view):]
    except OSError as e:
        raise _DiskError(e.errno, e.strerror) from None


def _drop(part: Path) -> None:
    part.unlink(missing_ok=True)


def _broken(entry: Entry, url: str, part: Path, received: int, reason: object) -> FetchError:
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return FetchError(f"the download of {entry.name} from {url} broke off after {_mb(received)} of "
                      f"{_mb(entry.size)} ({reason}); the part is kept in {part}: run the same command again to "
                      f"resume", "interrupted")


def _is_html(head: bytes) -> bool:
    return head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML)


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
