"""The zoo in a shared cache and against a hostile server (issue 18, items 1, 2, 4-8): links in
the cache, folders of another user, stalling servers, redirects, parts that can never complete,
content checks on resumed downloads, and the smaller defects. Nothing leaves 127.0.0.1, and
every wait is bounded (the deadlines are monkeypatched small)."""

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from robench import zoo
from robench.errors import UserError
from robench.zoo import cache as cache_module
from robench.zoo import download as fetch_module
from robench.zoo import transfer
from test_zoo import Server, cache, invoke, leftovers, make_entry, weights  # noqa: F401 (fixtures)


class Hostile(Server):
    """The test server, with routes that stall, redirect and mishandle ranges."""

    def _trickle(self, h, count, delay=0.02):
        h.send_response(200)
        h.send_header("Content-Length", str(len(self.data)))
        h.end_headers()
        try:
            for i in range(count):
                h.wfile.write(self.data[i:i + 1])
                h.wfile.flush()
                time.sleep(delay)
        except OSError:  # the client gave up
            pass
        h.close_connection = True

    def route_trickle(self, h):  # one byte every 20 ms (50 bytes/s) for up to 3 s
        self._trickle(h, 150)

    def route_trickle_short(self, h):  # 40 bytes, one at a time, then hangs up
        self._trickle(h, 40)

    def route_slow_headers(self, h):  # a status line, then one header byte every 20 ms for up to 3 s
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(150):
                h.wfile.write(b"a")
                h.wfile.flush()
                time.sleep(0.02)
        except OSError:
            pass
        h.close_connection = True

    def redirect(self, h, location):
        self.send(h, b"", 302, headers=[("Location", location)])

    def route_to_ftp(self, h):
        self.redirect(h, "ftp://127.0.0.1/w.safetensors")

    def route_to_file(self, h):
        self.redirect(h, "file:///etc/passwd")

    def route_to_good(self, h):
        self.redirect(h, "/good")

    def route_loop_a(self, h):
        self.redirect(h, "/loop-b")

    def route_loop_b(self, h):
        self.redirect(h, "/loop-a")

    def route_always_206(self, h):  # 206 for bytes 0-, whatever was asked; a third of it, then hangs up
        h.send_response(206)
        h.send_header("Content-Range", f"bytes 0-{len(self.data) - 1}/{len(self.data)}")
        h.send_header("Content-Length", str(len(self.data)))
        h.end_headers()
        h.wfile.write(self.data[:len(self.data) // 3])
        h.close_connection = True

    def __getattr__(self, name):  # route_hop_N: a redirect to hop N+1, without end
        if name.startswith("route_hop_"):
            n = int(name.removeprefix("route_hop_"))
            return lambda h: self.redirect(h, f"/hop-{n + 1}")
        raise AttributeError(name)


@pytest.fixture
def server(weights):
    s = Hostile(weights.read_bytes())
    yield s
    s.stop()


def part_of(e) -> Path:
    return zoo.cache_dir() / "partial" / f"{e.sha256}.part"


def seed_part(server, weights, e) -> int:
    """A part kept from an interrupted download of the right file: its first third."""
    urls, e.urls = e.urls, [server.url("drop")]
    with pytest.raises(zoo.FetchError, match="run the same command again to resume"):
        zoo.fetch(e, progress=False)
    e.urls = urls
    return part_of(e).stat().st_size


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- 1. links and owners in the cache -----------------------------------------------------------

@pytest.mark.parametrize("dangling", [False, True])
def test_a_part_that_is_a_link_is_refused_and_its_target_untouched(server, weights, cache, tmp_path, dangling):
    e = make_entry(weights, [server.url("good")])
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_bytes(b"precious")
    part_of(e).parent.mkdir(parents=True)
    part_of(e).symlink_to(victim)
    with pytest.raises(zoo.CacheError) as err:
        zoo.fetch(e, progress=False)
    assert "is a symbolic link" in one_line(err) and str(part_of(e)) in str(err.value)
    assert (victim.read_bytes() == b"precious") if not dangling else not victim.exists()
    assert zoo.verify(e) == "missing" and len(server.log) == 0


def test_a_lock_that_is_a_link_creates_nothing(server, weights, cache, tmp_path):
    e = make_entry(weights, [server.url("good")])
    target = tmp_path / "created-through-the-link"
    lock = part_of(e).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.symlink_to(target)
    with pytest.raises(zoo.CacheError, match="download lock .* is a symbolic link") as err:
        zoo.fetch(e, progress=False)
    one_line(err)
    assert not target.exists() and len(server.log) == 0


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_an_installed_copy_behind_a_link_is_never_called_ok(server, weights, cache, tmp_path, linked):
    """A link to a perfect copy still is not the cache's file: verify says link, loading and
    fetching refuse it in one line, and zoo verify exits 1."""
    e = make_entry(weights, [server.url("good")])
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [e])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / e.file).write_bytes(weights.read_bytes())
    path = zoo.cached_path(e)
    if linked == "file":
        path.parent.mkdir(parents=True)
        path.symlink_to(outside / e.file)
    else:
        path.parent.parent.mkdir(parents=True)
        path.parent.symlink_to(outside)
    assert zoo.verify(e) == "link" and zoo.where(e) == "remote"
    with pytest.raises(zoo.CacheError, match="is a symbolic link") as err:
        zoo.local_path(e, fetch=True, progress=False)
    one_line(err)
    with pytest.raises(zoo.CacheError, match="is a symbolic link"):
        zoo.fetch(e, progress=False)
    r = invoke(["zoo", "verify", "--manifest", manifest])
    assert r.exit_code == 1 and "synthetic: link" in r.output and "ok" not in r.output
    assert len(server.log) == 0


def test_a_partial_folder_that_is_a_link_is_refused(server, weights, cache, tmp_path):
    e = make_entry(weights, [server.url("good")])
    outside = tmp_path / "outside"
    outside.mkdir()
    cache.mkdir()
    (cache / "partial").symlink_to(outside)
    with pytest.raises(zoo.CacheError, match="partial is a symbolic link") as err:
        zoo.fetch(e, progress=False)
    one_line(err)
    assert list(outside.iterdir()) == [] and len(server.log) == 0


def test_a_folder_of_another_user_is_refused(server, weights, cache, monkeypatch):
    e = make_entry(weights, [server.url("good")])
    (cache / "partial").mkdir(parents=True)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(cache).st_uid + 1)  # the cache is now someone else's
    with pytest.raises(zoo.CacheError, match="belongs to another user") as err:
        zoo.fetch(e, progress=False)
    one_line(err)
    assert leftovers(cache) == [] and len(server.log) == 0


def test_the_cache_is_created_private_to_its_owner(server, weights, cache):
    e = make_entry(weights, [server.url("good")])
    path = zoo.fetch(e, progress=False)
    for folder in (cache, cache / "partial", path.parent):
        assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0, folder
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


# -- 2. a server that stalls ----------------------------------------------------------------------

def test_a_trickling_body_ends_in_one_line(server, weights, cache, monkeypatch):
    monkeypatch.setattr(transfer, "RATE_WINDOW", 0.3)
    monkeypatch.setattr(transfer, "MIN_RATE", 1000)
    e = make_entry(weights, [server.url("trickle")])
    began = time.monotonic()
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    assert time.monotonic() - began < 2.5
    assert err.value.kind == "stalled" and "below the minimum of 1000 bytes/s" in one_line(err)


def test_trickling_headers_end_in_one_line(server, weights, cache, monkeypatch):
    monkeypatch.setattr(transfer, "HEADER_DEADLINE", 0.4)
    e = make_entry(weights, [server.url("slow-headers")])
    began = time.monotonic()
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    assert time.monotonic() - began < 2.5
    assert err.value.kind == "stalled" and "sent no complete answer within 0.4 s" in one_line(err)
    assert leftovers(cache) == []


def test_the_bar_moves_from_the_first_byte(server, weights, cache, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.updates, self.kw = [], kw
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(fetch_module, "tqdm", Bar)
    e = make_entry(weights, [server.url("trickle-short")])
    with pytest.raises(zoo.FetchError, match="broke off after 40 bytes"):
        zoo.fetch(e, progress=True)
    (bar,) = bars
    assert sum(bar.updates) == 40 and len(bar.updates) >= 5  # byte by byte, not at the end


# -- 4. a refused mirror and a good part ----------------------------------------------------------

@pytest.mark.parametrize("refusing", ["html", "html-as-binary", "short", "missing"])
def test_a_refused_mirror_keeps_a_good_part_for_the_next(server, weights, cache, refusing):
    e = make_entry(weights, [server.url(refusing), server.url("good")])
    kept = seed_part(server, weights, e)
    assert zoo.fetch(e, progress=False).read_bytes() == weights.read_bytes()
    assert server.log[-1] == ("/good", f"bytes={kept}-")  # resumed, not restarted
    assert leftovers(cache) == [f"{e.sha256[:16]}/synthetic.safetensors"]


# -- 5. redirects -------------------------------------------------------------------------------

@pytest.mark.parametrize("route,expect", [
    ("to-ftp", "redirects to 'ftp://127.0.0.1/w.safetensors': robench follows redirects to http and https URLs only"),
    ("to-file", "redirects to 'file:///etc/passwd': robench follows redirects to http and https URLs only"),
    ("loop-a", "redirects in a loop"),
    ("hop-0", f"redirects more than {transfer.MAX_REDIRECTS} times"),
])
def test_a_redirect_robench_does_not_follow_is_one_line(server, weights, cache, route, expect):
    e = make_entry(weights, [server.url(route)])
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    assert expect in one_line(err) and server.url(route) in str(err.value)
    assert leftovers(cache) == []


def test_a_redirect_to_http_is_followed(server, weights, cache):
    e = make_entry(weights, [server.url("to-good")])
    assert zoo.fetch(e, progress=False).read_bytes() == weights.read_bytes()
    assert [p for p, _ in server.log] == ["/to-good", "/good"]


# -- 6. parts that can never complete -------------------------------------------------------------

def test_a_range_answered_by_a_short_whole_file_discards_the_part(server, weights, cache):
    """The "drop" route ignores Range: it answers 200 with the full length and sends a third."""
    e = make_entry(weights, [server.url("drop")])
    seed_part(server, weights, e)
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    message = one_line(err)
    assert err.value.kind == "no-resume" and "could never be resumed" in message and "resume\"" not in message
    assert "run the same command again" not in message and leftovers(cache) == []


def test_a_206_answer_to_a_whole_file_request_keeps_nothing(server, weights, cache):
    e = make_entry(weights, [server.url("always-206")])
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    assert "206 Partial Content to a request for the whole file" in one_line(err)
    assert "run the same command again" not in str(err.value) and leftovers(cache) == []


def test_a_part_that_is_a_folder_is_refused_in_one_line(server, weights, cache):
    e = make_entry(weights, [server.url("good")])
    (part_of(e) / "inside").mkdir(parents=True)
    with pytest.raises(zoo.CacheError) as err:
        zoo.fetch(e, progress=False)
    message = one_line(err)
    assert "is a folder" in message and "can never complete; remove it" in message and "resume" not in message
    assert (part_of(e) / "inside").is_dir() and len(server.log) == 0


# -- 7. content checks on what a resumed download installs ----------------------------------------

@pytest.mark.parametrize("content,kind", [(b"just some text, not a checkpoint\n" * 300, "not-checkpoint"),
                                          (b"<!DOCTYPE html><html>" + b"<p>sign in</p>" * 600, "html")])
def test_a_resumed_download_is_checked_as_a_whole(content, kind, cache, tmp_path):
    """The part holds the file's first bytes, so the fresh-first-chunk checks never saw them; the
    manifest's hash is the text's own. Nothing is installed."""
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(content)
    s = Hostile(content)
    try:
        e = make_entry(fake, [s.url("good")])
        part_of(e).parent.mkdir(parents=True)
        part_of(e).write_bytes(content[:1000])
        with pytest.raises(zoo.FetchError) as err:
            zoo.fetch(e, progress=False)
        assert s.log == [("/good", "bytes=1000-")]
    finally:
        s.stop()
    assert err.value.kind == kind and "matches the manifest but that is" in one_line(err)
    assert leftovers(cache) == [] and zoo.verify(e) == "missing"


# -- 8. smaller defects -------------------------------------------------------------------------

def test_the_arch_is_checked_before_the_download(server, weights, cache):
    e = make_entry(weights, [server.url("good")], arch="no-such-arch")
    with pytest.raises(UserError, match="zoo entry synthetic: unknown architecture 'no-such-arch'") as err:
        zoo.fetch(e, progress=False)
    one_line(err)
    assert server.log == [] and leftovers(cache) == []


def test_a_read_only_cache_with_the_file_fetches(server, weights, cache, tmp_path, monkeypatch):
    e = make_entry(weights, [server.url("good")])
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [e])
    path = zoo.fetch(e, progress=False)
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(path):
        if str(path).startswith(str(cache)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def open_(path, flags, *args, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            read_only(path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **kw: read_only(p) or real_mkdir(p, *a, **kw))
    r = invoke(["zoo", "fetch", "synthetic", "--no-progress", "--manifest", manifest])
    assert r.exit_code == 0 and r.output == f"synthetic: already there: {path}\n"
    assert zoo.fetch(e, progress=False) == path and len(server.log) == 1


def test_a_failed_fetch_of_several_names_the_entry(server, weights, cache, tmp_path):
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [make_entry(weights, [server.url("html")], name="bad"),
                                  make_entry(weights, [server.url("good")], name="fine")])
    r = invoke(["zoo", "fetch", "bad", "fine", "--no-progress", "--manifest", manifest])
    assert r.exit_code == 2 and r.stderr.startswith("error: bad: ") and r.stderr.count("\n") == 1
    assert "HTML page" in r.stderr and "fine: fetched and verified" in r.stdout


def test_a_process_that_only_waited_says_so(server, weights, cache, tmp_path):
    """While another holds the download lock and installs the file, fetch waits, then reports
    the file as already in the cache, not as fetched by itself."""
    e = make_entry(weights, [server.url("good")])
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [e])
    results = []
    with cache_module.locked(e):
        waiter = threading.Thread(target=lambda: results.append(
            invoke(["zoo", "fetch", "synthetic", "--no-progress", "--manifest", manifest])))
        waiter.start()
        time.sleep(0.3)  # the waiter is blocked on the lock
        path = zoo.cached_path(e)
        cache_module.private_dir(path.parent)
        path.write_bytes(weights.read_bytes())
    waiter.join(10)
    (r,) = results
    assert r.exit_code == 0 and "already in the cache" in r.output and "fetched and verified" not in r.output
    assert server.log == []


def test_eval_no_progress_draws_no_download_bar(server, cache, tmp_path, monkeypatch):
    """A remote zoo entry evaluated with --no-progress downloads without a bar."""
    from robench.zoo.manifest import read_manifest

    shipped = Path(zoo.__file__).with_name("manifest.json")
    entry = next(e for e in read_manifest(shipped) if e.name == "pgdat-digits")
    server.data = (shipped.parent / "checkpoints" / entry.file).read_bytes()
    entry.name, entry.shipped, entry.urls = "pgdat-remote", False, [server.url("good")]
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [entry])
    monkeypatch.setenv("ROBENCH_ZOO_MANIFESTS", str(manifest))
    shown = []
    real = fetch_module.tqdm
    monkeypatch.setattr(fetch_module, "tqdm", lambda **kw: shown.append(kw["disable"]) or real(**kw))
    r = invoke(["eval", "--defense", "pgdat-remote", "--attacks", "pgd", "--n", "10", "--no-progress",
                "--workdir", tmp_path / "wd"])
    assert r.exit_code == 0, r.output
    assert shown == [True] and zoo.verify(entry) == "ok"


def test_an_unreadable_cache_folder_is_one_line(server, weights, cache, monkeypatch):
    """Another user's private cache (mode 0o700) cannot even be looked into: one line, no traceback."""
    e = make_entry(weights, [server.url("good")])
    real = os.lstat

    def lstat(path, *a, **kw):
        if str(path).startswith(str(cache)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "lstat", lstat)
    with pytest.raises(zoo.CacheError, match="cannot read the zoo cache at .*Permission denied") as err:
        zoo.verify(e)
    one_line(err)
