"""The checkpoint zoo: manifests, fetching through a local HTTP server (good, resumed, refused),
verification, publishing a trained run, and the RobustBench export. Nothing leaves 127.0.0.1."""

import errno
import json
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from robench import checkpoint, zoo
from robench.cli import cli
from robench.errors import UserError
from robench.zoo import download as fetch_module
from robench.zoo.manifest import Entry


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")


@pytest.fixture(autouse=True)
def cache(tmp_path, tmp_path_factory, monkeypatch):
    """A private cache, an empty "shipped" manifest (the real one is tested in
    tests/test_zoo_eval.py), and no other manifests but those a test names."""
    from robench.zoo import manifest

    monkeypatch.setenv("ROBENCH_ZOO", str(tmp_path / "zoo"))
    monkeypatch.delenv("ROBENCH_ZOO_MANIFESTS", raising=False)
    shipped = tmp_path_factory.mktemp("shipped") / "manifest.json"
    shipped.write_text('{"format": 1, "entries": []}\n')
    monkeypatch.setattr(manifest, "SHIPPED", shipped)
    return tmp_path / "zoo"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A synthetic safetensors checkpoint (about 200 KB)."""
    good = tmp_path_factory.mktemp("weights") / "good.safetensors"
    save_file({"w": torch.arange(50_000, dtype=torch.float32)}, str(good))
    return good


def make_entry(path: Path, urls=(), name="synthetic", **kw) -> Entry:
    fields = dict(defense="pgdat", dataset="digits", arch="tiny-cnn", in_channels=1, num_classes=10,
                  robench_version="0.1.0", sha256=checkpoint.sha256(path), size=path.stat().st_size)
    return Entry(name=name, file=f"{name}.safetensors", urls=list(urls), **{**fields, **kw})


class Server:
    """A local HTTP server whose routes serve the test's checkpoint in good and bad ways; it
    logs each request's path and Range header."""

    def __init__(self, data: bytes) -> None:
        self.data, self.log = data, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                getattr(server, "route_" + self.path.strip("/").replace("-", "_"))(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def send(h, body: bytes, status=200, ctype="application/octet-stream", length=True, headers=()):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        if length:
            h.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def route_good(self, h):  # honours Range
        rng = h.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            self.send(h, self.data[start:], 206,
                      headers=[("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")])
        else:
            self.send(h, self.data)

    def route_norange(self, h):  # ignores Range: the whole file with 200
        self.send(h, self.data)

    def route_drop(self, h):  # promises the whole file, sends a third, hangs up
        h.send_response(200)
        h.send_header("Content-Length", str(len(self.data)))
        h.end_headers()
        h.wfile.write(self.data[:len(self.data) // 3])
        h.close_connection = True

    def route_html(self, h):
        self.send(h, b"<!DOCTYPE html><html><body>Sign in to continue</body></html>", ctype="text/html")

    def route_html_as_binary(self, h):  # a quota page served as application/octet-stream
        self.send(h, b"\n  <html><head><title>Quota exceeded</title></head></html>")

    def route_short(self, h):  # a truncated upload, served honestly
        self.send(h, self.data[:-1000])

    def route_short_no_length(self, h):  # the same, without Content-Length: ends when the connection closes
        self.send(h, self.data[:-1000], length=False)

    def route_wrong(self, h):  # same size, other bytes
        self.send(h, self.data[:-1] + bytes([self.data[-1] ^ 1]))

    def route_missing(self, h):
        self.send(h, b"not found", 404, ctype="text/plain")


@pytest.fixture
def server(weights):
    s = Server(weights.read_bytes())
    yield s
    s.stop()


def leftovers(cache: Path) -> list[str]:
    """Every file in the cache (installed copies, parts, locks)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


# -- manifests ---------------------------------------------------------------------------------

def test_manifest_round_trip(tmp_path, weights):
    e = make_entry(weights, ["https://example.org/w.safetensors"], config={"steps": 600}, objective={"eps": 0.2},
                   results={"clean": {"accuracy": 0.9, "ci95": [0.85, 0.94], "n": 100, "params": {}}})
    path = tmp_path / "m.json"
    zoo.write_manifest(path, [e])
    assert json.loads(path.read_text())["format"] == 1
    (back,) = zoo.read_manifest(path)
    assert back == e and back.source == path
    assert zoo.get("synthetic", [path]) == e and zoo.find("pgdat", "digits", [path]) == e
    assert zoo.find("pgdat", "cifar10", [path]) is None
    assert zoo.entries() == []  # the shipped manifest is empty, and valid


def test_find_prefers_the_dataset_then_shipped(tmp_path, weights):
    """A bare defense name means the embedded dataset's checkpoint, whatever the manifest's order;
    among a dataset's entries a shipped one comes first."""
    folder = make_entry(weights, name="pgdat-folder", dataset="folder", shipped=True)
    remote = make_entry(weights, ["https://example.org/w.safetensors"], name="pgdat-remote")
    shipped = make_entry(weights, name="pgdat-digits", shipped=True)
    path = tmp_path / "m.json"
    zoo.write_manifest(path, [folder, remote, shipped])
    assert zoo.find("pgdat", None, [path]).name == "pgdat-digits"
    assert zoo.find("pgdat", "digits", [path]).name == "pgdat-digits"
    assert zoo.find("pgdat", "folder", [path]).name == "pgdat-folder"
    zoo.write_manifest(path, [folder, remote])
    assert zoo.find("pgdat", None, [path]).name == "pgdat-remote"
    zoo.write_manifest(path, [folder])
    assert zoo.find("pgdat", None, [path]).name == "pgdat-folder"


@pytest.mark.parametrize("change,expect", [
    (lambda d: "{", "is not valid JSON"),
    (lambda d: {"format": 2, "entries": []}, "has format 2"),
    (lambda d: {"entries": []}, 'must be a JSON object with "format"'),
    (lambda d: d["entries"][0].pop("sha256") and d, "lacks sha256"),
    (lambda d: d["entries"][0].update(shiped=True) or d, "unknown field(s) shiped"),
    (lambda d: d["entries"][0].update(sha256="abc") or d, "64 lowercase hex digits"),
    (lambda d: d["entries"][0].update(size="12") or d, "size must be int"),
    (lambda d: d["entries"][0].update(urls=["ftp://x/y"]) or d, "must start with http://"),
    (lambda d: d["entries"][0].update(file="../x.safetensors") or d, "plain NAME.safetensors"),
    (lambda d: d["entries"][0].update(name="Bad Name") or d, "must be lowercase"),
    (lambda d: d["entries"][0].update(mean=[0.5, 0.5]) or d, "mean must hold 1 numbers"),
    (lambda d: d["entries"][0].update(results={"pgd": {"n": 3}}) or d, "numeric accuracy"),
    (lambda d: {"format": 1, "entries": d["entries"] * 2}, "is defined twice"),
])
def test_broken_manifest_is_one_line(tmp_path, weights, change, expect):
    path = tmp_path / "m.json"
    zoo.write_manifest(path, [make_entry(weights)])
    data = change(json.loads(path.read_text()))
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(UserError) as e:
        zoo.entries([path])
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_names_are_unique_across_manifests(tmp_path, weights, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    zoo.write_manifest(a, [make_entry(weights)])
    zoo.write_manifest(b, [make_entry(weights)])
    monkeypatch.setenv("ROBENCH_ZOO_MANIFESTS", f"{a}{os.pathsep}{a}")  # the same file twice is read once
    assert len(zoo.entries()) == 1
    with pytest.raises(UserError, match=f"defined twice \\(in {a} and {b}\\)"):
        zoo.entries([b])
    with pytest.raises(UserError, match="unknown zoo entry 'nope'; choose from: synthetic"):
        zoo.get("nope")


# -- fetching ----------------------------------------------------------------------------------

def test_fetch_installs_a_verified_file(server, weights, cache):
    e = make_entry(weights, [server.url("good")])
    assert zoo.where(e) == "remote" and zoo.verify(e) == "missing"
    with pytest.raises(UserError, match="not downloaded; fetch it with: robench zoo fetch synthetic"):
        zoo.local_path(e)
    path = zoo.local_path(e, fetch=True, progress=False)
    assert path == cache / e.sha256[:16] / "synthetic.safetensors"
    assert path.read_bytes() == weights.read_bytes() and zoo.verify(e) == "ok" and zoo.where(e) == "cached"
    assert leftovers(cache) == [f"{e.sha256[:16]}/synthetic.safetensors"]
    assert zoo.fetch(e, progress=False) == path and len(server.log) == 1  # cached: no second request


def test_concurrent_fetches_download_once(server, weights, cache):
    """The download lock: a second fetch waits for the first and finds the file installed."""
    e = make_entry(weights, [server.url("good")])
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(zoo.fetch(e, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 3 and len(set(paths)) == 1 and len(server.log) == 1
    assert leftovers(cache) == [f"{e.sha256[:16]}/synthetic.safetensors"]
    with pytest.raises(zoo.FetchError, match="lists no URL"):
        zoo.fetch(make_entry(weights, name="nowhere", sha256="0" * 64), progress=False)


@pytest.mark.parametrize("resume_route", ["good", "norange"])
def test_interrupted_transfer_is_resumed(server, weights, cache, resume_route):
    e = make_entry(weights, [server.url("drop")])
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    assert err.value.kind == "interrupted" and "run the same command again to resume" in str(err.value)
    part = cache / "partial" / f"{e.sha256}.part"
    kept = e.size // 3
    assert leftovers(cache) == [f"partial/{e.sha256}.part"] and part.stat().st_size == kept
    e.urls = [server.url(resume_route)]
    path = zoo.fetch(e, progress=False)
    assert server.log[-1] == (f"/{resume_route}", f"bytes={kept}-")  # asked for the rest
    assert path.read_bytes() == weights.read_bytes()
    assert leftovers(cache) == [f"{e.sha256[:16]}/synthetic.safetensors"]


@pytest.mark.parametrize("route,kind,expect", [
    ("html", "html", "returned an HTML page, not a checkpoint"),
    ("html-as-binary", "html", "returned an HTML page, not a checkpoint"),
    ("short", "truncated", "a truncated file"),
    ("short-no-length", "truncated", "a truncated file"),
    ("wrong", "hash", "served a file with the wrong hash"),
    ("missing", "http", "answered HTTP 404"),
])
def test_bad_download_is_refused_and_leaves_nothing(server, weights, cache, route, kind, expect):
    e = make_entry(weights, [server.url(route)])
    with pytest.raises(zoo.FetchError) as err:
        zoo.fetch(e, progress=False)
    message = str(err.value)
    assert err.value.kind == kind and expect in message and "\n" not in message
    assert server.url(route) in message
    assert leftovers(cache) == [] and zoo.verify(e) == "missing"


def test_a_stale_part_is_discarded_by_a_refusal(server, weights, cache):
    """A part left by a broken-off transfer, then a mirror that serves the wrong file: the part
    goes too, nothing half-written stays."""
    e = make_entry(weights, [server.url("drop")])
    with pytest.raises(zoo.FetchError):
        zoo.fetch(e, progress=False)
    e.urls = [server.url("wrong")]
    with pytest.raises(zoo.FetchError, match="wrong hash"):
        zoo.fetch(e, progress=False)
    assert leftovers(cache) == []


def test_unreachable_host_and_mirrors(server, weights, cache):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/w.safetensors"
    e = make_entry(weights, [dead])
    with pytest.raises(zoo.FetchError, match="offline or unreachable") as err:
        zoo.fetch(e, progress=False)
    assert err.value.kind == "offline" and leftovers(cache) == []
    e.urls = [dead, server.url("html"), server.url("good")]  # mirrors, tried in order
    assert zoo.fetch(e, progress=False).read_bytes() == weights.read_bytes()
    e2 = make_entry(weights, [dead, server.url("missing")], name="other")
    with pytest.raises(zoo.FetchError, match=r"from any of its 2 URLs: cannot reach .*; .*HTTP 404") as err:
        zoo.fetch(e2, progress=False)
    assert "\n" not in str(err.value)


def test_full_disk_leaves_nothing(server, weights, cache, monkeypatch):
    e = make_entry(weights, [server.url("good")])

    def full(out, chunk):
        out.write(chunk[:100])
        raise fetch_module._DiskError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(fetch_module, "_write", full)
        with pytest.raises(zoo.FetchError, match="the disk is full") as err:
            zoo.fetch(e, progress=False)
    assert err.value.kind == "disk" and leftovers(cache) == [] and len(server.log) == 1
    with monkeypatch.context() as m:
        m.setattr(fetch_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
        with pytest.raises(zoo.FetchError, match="not enough disk space") as err:
            zoo.fetch(e, progress=False)
    assert err.value.kind == "disk" and leftovers(cache) == [] and len(server.log) == 1  # refused before asking


def test_file_url_and_its_resume(weights, cache, tmp_path):
    e = make_entry(weights, [weights.as_uri()])
    part = cache / "partial" / f"{e.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(weights.read_bytes()[:5000])
    assert zoo.fetch(e, progress=False).read_bytes() == weights.read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(weights.read_bytes()[:-10])
    e2 = make_entry(weights, [short.as_uri()], name="short")
    with pytest.raises(zoo.FetchError, match="a truncated file"):
        zoo.fetch(e2, progress=False)
    assert leftovers(cache) == [f"{e.sha256[:16]}/synthetic.safetensors"]


def test_verify_finds_a_corrupted_copy_and_fetch_replaces_it(server, weights, cache, tmp_path):
    manifest = tmp_path / "m.json"
    zoo.write_manifest(manifest, [make_entry(weights, [server.url("good")])])
    r = invoke(["zoo", "fetch", "synthetic", "--no-progress", "--manifest", manifest])
    assert r.exit_code == 0 and "fetched and verified" in r.output
    e = zoo.get("synthetic", [manifest])
    path = zoo.cached_path(e)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert zoo.verify(e) == "corrupt"
    with pytest.raises(UserError, match="is corrupted"):
        zoo.local_path(e, fetch=True)
    r = invoke(["zoo", "verify", "--manifest", manifest])
    assert r.exit_code == 1 and "synthetic: corrupt" in r.output
    r = invoke(["zoo", "fetch", "synthetic", "--no-progress", "--manifest", manifest])
    assert r.exit_code == 0 and zoo.verify(e) == "ok"
    r = invoke(["zoo", "verify", "synthetic", "--manifest", manifest])
    assert r.exit_code == 0 and "synthetic: ok" in r.output


def test_cli_list_show_and_a_failed_fetch(server, weights, tmp_path):
    manifest = tmp_path / "m.json"
    results = {"clean": {"accuracy": 0.9, "ci95": [0.85, 0.94], "n": 100, "params": {}},
               "pgd": {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "params": {"eps": 0.2}}}
    zoo.write_manifest(manifest, [make_entry(weights, [server.url("html")], results=results)])
    r = invoke(["zoo", "list", "--manifest", manifest])
    assert r.exit_code == 0
    assert ["synthetic", "pgdat", "digits", "tiny-cnn", "remote", "90.00", "50.00"] == r.output.splitlines()[-1].split()
    r = invoke(["zoo", "show", "synthetic", "--manifest", manifest])
    assert r.exit_code == 0 and "pgd: 50.00% [40.00, 60.00] n=100 (eps=0.2)" in r.output
    r = invoke(["zoo", "show", "synthetic", "--json", "--manifest", manifest])
    assert json.loads(r.output)["sha256"] == checkpoint.sha256(weights)
    r = invoke(["zoo", "fetch", "synthetic", "--no-progress", "--manifest", manifest])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "HTML page" in r.stderr


# -- publishing --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits):
    """A tiny trained run, evaluated clean and under PGD on 20 test images."""
    from robench.evaluation import run_eval
    from robench.runtime import Runtime
    from robench.training import TrainConfig, train

    wd = tmp_path_factory.mktemp("zoo-wd")
    train(TrainConfig("standard", "digits", arch="tiny-cnn", steps=20), wd, splits=digits, progress=False,
          checkpoint_every=20)
    run_eval(["standard"], ["pgd"], wd, Runtime.create("cpu"), n=20, progress=False)
    return wd


def test_add_publishes_a_run_with_its_results(evaluated, server, tmp_path, cache, monkeypatch):
    from robench.store import Store

    manifest = tmp_path / "lab" / "zoo.json"
    r = invoke(["zoo", "add", "standard", "--workdir", evaluated, "--url", server.url("run"),
                "--manifest", manifest])
    assert r.exit_code == 0, r.output
    (e,) = zoo.read_manifest(manifest)
    run_dir = evaluated / "runs" / "standard-digits-s0"
    meta = checkpoint.read_meta(run_dir)
    assert e.name == "standard-digits" and e.sha256 == meta["files"]["weights"]["sha256"]
    assert e.config == meta["config"] and e.objective == meta["objective"] and e.classes == meta["classes"]
    with Store.in_workdir(evaluated) as store:
        stored = {row.key.name: row for row in store.rows(checkpoint=e.sha256)}
    assert set(e.results) == {"clean", "pgd"}
    for name, result in e.results.items():
        assert result["accuracy"] == stored[name].value and result["n"] == 20
        assert result["ci95"] == list(stored[name].ci)
    assert e.results["pgd"]["params"]["eps"] == 0.2

    # The published entry fetches through a server that serves the run's weights.
    server.data = (run_dir / meta["files"]["weights"]["name"]).read_bytes()
    server.route_run = server.route_good
    path = zoo.local_path(e, fetch=True, progress=False)
    assert checkpoint.sha256(path) == e.sha256 and zoo.verify(e) == "ok"

    # Adding it again updates the entry; a name taken in another manifest is refused.
    r = invoke(["zoo", "add", str(run_dir), "--url", server.url("run"), "--notes", "again", "--manifest", manifest])
    assert r.exit_code == 0 and r.output.startswith("updated") and zoo.read_manifest(manifest)[0].notes == "again"
    r = invoke(["zoo", "add", str(run_dir), "--ship", "--manifest", tmp_path / "other.json"])
    assert r.exit_code == 0
    with monkeypatch.context() as m:
        m.setenv("ROBENCH_ZOO_MANIFESTS", str(manifest))
        r = invoke(["zoo", "add", str(run_dir), "--url", server.url("run"), "--manifest", tmp_path / "third.json"])
    assert r.exit_code == 2 and "already exists in" in r.stderr and not (tmp_path / "third.json").exists()
    (shipped,) = zoo.read_manifest(tmp_path / "other.json")
    assert shipped.shipped and zoo.local_path(shipped) == tmp_path / "checkpoints" / "standard-digits.safetensors"
    assert zoo.where(shipped) == "shipped" and zoo.verify(shipped) == "ok"

    r = invoke(["zoo", "add", "standard", "--workdir", evaluated, "--manifest", tmp_path / "x.json"])
    assert r.exit_code == 2 and "give --url URL" in r.stderr


def test_export_robustbench_info(evaluated, tmp_path, weights):
    manifest = tmp_path / "zoo.json"
    assert invoke(["zoo", "add", "standard", "--workdir", evaluated, "--url", "https://example.org/w",
                   "--manifest", manifest]).exit_code == 0
    r = invoke(["zoo", "export", "standard-digits", "--manifest", manifest, "--out", tmp_path / "info.json"])
    assert r.exit_code == 0 and "no AutoAttack result" in r.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    e = zoo.read_manifest(manifest)[0]
    assert info["clean_acc"] == f"{100 * e.results['clean']['accuracy']:.2f}" and info["autoattack_acc"] == ""
    assert info["dataset"] == "digits" and info["threat_model"] == "Linf" and info["n"] == 20
    # The same from the workdir's run, without a manifest.
    r = invoke(["zoo", "export", "standard", "--workdir", evaluated])
    assert r.exit_code == 0 and json.loads(r.stdout)["clean_acc"] == info["clean_acc"]

    aa = {"accuracy": 0.5308, "ci95": [0.52, 0.54], "n": 10000, "params": {"eps": 8 / 255, "version": "standard"}}
    e = make_entry(weights, arch="wrn-34-10", reference={"title": "TRADES", "venue": "ICML 2019"},
                   results={"clean": {"accuracy": 0.8492, "ci95": None, "n": 10000, "params": {}},
                            "autoattack": aa, "autoattack@0.03": {**aa, "accuracy": 0.55, "params": {"eps": 0.03}}})
    info = zoo.robustbench_info(e)
    assert {k: info[k] for k in ("name", "venue", "architecture", "eps", "clean_acc", "autoattack_acc", "n")} == {
        "name": "TRADES", "venue": "ICML 2019", "architecture": "WideResNet-34-10", "eps": "8/255",
        "clean_acc": "84.92", "autoattack_acc": "53.08", "n": 10000}
    other = zoo.robustbench_info(e, eps=0.03)
    assert other["eps"] == "0.03" and other["autoattack_acc"] == "55.00" and "7.65/255" in other["footnote"]


ZOO_PATH_OPTIONS = [(name, p.opts[0]) for name, cmd in sorted(cli.commands["zoo"].commands.items())
                    for p in cmd.params if isinstance(p.type, click.Path)]


@pytest.mark.parametrize("command,option", ZOO_PATH_OPTIONS)
def test_every_zoo_path_option_refuses_an_empty_path(command, option, tmp_path, monkeypatch):
    """(tests/test_cli_errors.py checks the top-level commands' options.)"""
    monkeypatch.chdir(tmp_path)
    args = {"show": ["x"], "fetch": ["x"], "add": ["x", "--url", "https://e.org/x"], "export": ["x"]}
    r = invoke(["zoo", command, *args.get(command, []), option, ""])
    assert r.exit_code == 2 and r.stderr == f"error: {option} is empty\n" and list(tmp_path.iterdir()) == []


def test_add_updates_an_entry_of_the_shipped_manifest(evaluated):
    """Re-publishing into the shipped manifest itself (how robench's own entries are refreshed)
    replaces the entry rather than refusing it as a clash with another manifest."""
    from robench.zoo import manifest

    for verb in ("added", "updated"):
        r = invoke(["zoo", "add", "standard", "--workdir", evaluated, "--ship", "--manifest", manifest.SHIPPED])
        assert r.exit_code == 0 and r.output.startswith(f"{verb} standard-digits"), r.output
    assert [e.name for e in zoo.read_manifest(manifest.SHIPPED)] == ["standard-digits"]
