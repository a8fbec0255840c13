"""The network side of a zoo download: one request and its answer, read piece by piece.

Redirects are followed to http and https URLs only, and a loop ends in one line. A server that
stalls ends in one line too: its headers must arrive within ``HEADER_DEADLINE`` seconds (however
slowly they trickle), each read waits at most ``TIMEOUT`` seconds, and the body must keep
``MIN_RATE`` bytes a second over every ``RATE_WINDOW`` seconds.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import robench
from robench.errors import UserError

TIMEOUT = 60  # seconds a read waits for a byte before the transfer counts as broken off
HEADER_DEADLINE = 120  # seconds from the request to the end of the answer's headers, redirects included
MIN_RATE = 1024  # bytes a second, at the least, ...
RATE_WINDOW = 60  # ... over each window of this many seconds
PIECE = 64 << 10  # the most one read returns: the progress bar moves from the first byte
MAX_REDIRECTS = 8


class FetchError(UserError):
    """A failed fetch. ``kind``: offline, http, html, not-checkpoint, truncated, too-large, hash,
    disk, interrupted, stalled, no-resume or no-url."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Stalled(OSError):
    """The body arrives slower than ``MIN_RATE``."""


@dataclass
class Answer:
    """A response: its body stream, the byte of the file where the body starts, the body's
    length if known, its content type, and whether it ignored a request for the rest (``Range``)."""

    stream: BinaryIO
    start: int
    length: int | None
    ctype: str
    ignored_range: bool = False


def open_url(url: str, offset: int) -> Answer:
    """The answer of ``url`` to a request for its bytes from ``offset`` on."""
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
        return Answer(f, start, size - start, "")
    headers = {"User-Agent": f"robench/{robench.__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = _request(url, urllib.request.Request(url, headers=headers))
    except _Unsatisfiable:  # the part is longer than the file the server has: start over
        return open_url(url, 0)
    if response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if not offset or match is None or int(match.group(1)) != offset:
            response.close()
            if offset:  # not the range asked for: ask for the whole file instead
                return open_url(url, 0)
            raise FetchError(f"{url} answered 206 Partial Content to a request for the whole file (it mishandles "
                             f"ranges, so a download from it could never complete); nothing was installed", "http")
    length = response.headers.get("Content-Length")
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return Answer(response, offset if response.status == 206 else 0, int(length) if length and length.isdigit()
                  else None, ctype, ignored_range=bool(offset) and response.status != 206)


def _request(url: str, request: urllib.request.Request) -> http.client.HTTPResponse:
    host = urllib.parse.urlparse(url).netloc or url
    watch = _Watch()
    opener = urllib.request.build_opener(_Redirects(), _handler(urllib.request.HTTPHandler, watch),
                                         _handler(urllib.request.HTTPSHandler, watch))
    stalled = FetchError(f"{url} sent no complete answer within {HEADER_DEADLINE} s (a stalling server?); "
                         f"nothing was installed", "stalled")
    try:
        response = opener.open(request, timeout=TIMEOUT)
        watch.cancel()
        if watch.fired:  # what came before the deadline cut it off may parse as an answer
            response.close()
            raise stalled
        return response
    except _Refused as e:
        raise FetchError(f"{url} {e}; nothing was installed", "http") from None
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and request.has_header("Range"):
            raise _Unsatisfiable() from None
        reason = " ".join(str(e.reason).split())
        raise FetchError(f"{url} answered HTTP {e.code} {reason}", "http") from None
    except (OSError, http.client.HTTPException) as e:
        if watch.fired:
            raise stalled from None
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        reason = getattr(reason, "strerror", None) or (f"{type(reason).__name__}: {reason}"
                                                       if isinstance(reason, BaseException) else str(reason))
        raise FetchError(f"cannot reach {host} ({' '.join(str(reason).split())}): offline or unreachable? ({url})",
                         "offline") from None
    finally:
        watch.cancel()


def pieces(stream: BinaryIO) -> Iterator[bytes]:
    """The body as it arrives (``PIECE`` bytes at most a read); ``Stalled`` when fewer than
    ``MIN_RATE * RATE_WINDOW`` bytes came in a window of ``RATE_WINDOW`` seconds."""
    since, got = time.monotonic(), 0
    while True:
        piece = stream.read1(PIECE)
        if not piece:
            return
        got += len(piece)
        elapsed = time.monotonic() - since
        if elapsed >= RATE_WINDOW:
            if got < MIN_RATE * elapsed:
                raise Stalled(f"the server sent {got} bytes in {elapsed:.1f} s, below the minimum of "
                              f"{MIN_RATE} bytes/s: a stalling server?")
            since, got = time.monotonic(), 0
        yield piece


class _Unsatisfiable(Exception):
    """HTTP 416 to a request for the rest."""


class _Refused(Exception):
    """A redirect robench does not follow; the message goes after the URL."""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http and https only (the manifest's file: URLs never redirect), no loop, at
    most ``MAX_REDIRECTS``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        seen = getattr(req, "robench_seen", [req.full_url])
        refusal = None
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            refusal = f"redirects to {newurl!r}: robench follows redirects to http and https URLs only"
        elif newurl in seen:
            refusal = f"redirects in a loop (back to {newurl} after {len(seen)} requests)"
        elif len(seen) > MAX_REDIRECTS:
            refusal = f"redirects more than {MAX_REDIRECTS} times"
        if refusal is not None:
            fp.close()
            raise _Refused(" ".join(refusal.split()))
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.robench_seen = [*seen, newurl]
        return new

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target is not None:  # the base class refuses some schemes itself, in a message of its own
            newurl = urllib.parse.urljoin(req.full_url, target)
            if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
                self.redirect_request(req, fp, code, msg, headers, newurl)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _Watch:
    """A deadline for the answer's headers: when it passes, the connections' sockets are shut
    down, so a read blocked on a trickling server returns."""

    def __init__(self) -> None:
        self.fired, self.sockets = False, []
        self.lock = threading.Lock()
        self.timer = threading.Timer(HEADER_DEADLINE, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.append(sock)
            if self.fired:
                self._shut(sock)

    def cancel(self) -> None:
        self.timer.cancel()

    def _fire(self) -> None:
        with self.lock:
            self.fired = True
            for sock in self.sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _handler(base: type, watch: _Watch) -> urllib.request.BaseHandler:
    """An HTTP(S) handler whose connections report their sockets to ``watch``."""

    class Handler(base):
        def do_open(self, http_class, req, **kwargs):
            class Watched(http_class):
                def connect(self):
                    super().connect()
                    watch.add(self.sock)

            return super().do_open(Watched, req, **kwargs)

    return Handler()
