"""Untrusted files: a checkpoint crafted to run code when unpickled is refused without running it,
wherever it is planted; weights are safetensors, every ``torch.load`` is ``weights_only=True``, and
a checkpoint's sha256 is checked against its record before anything reads it."""

import ast
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robench
import robench.attacks
import robench.defenses
from robench import checkpoint
from robench.cli import cli

TRAIN = ["train", "pgdat", "--arch", "tiny-cnn", "--steps", "10", "--attack-steps", "2", "--checkpoint-every", "10",
         "--no-progress"]
EVAL = ["--attacks", "pgd", "--n", "8", "--no-progress"]


class Evil:
    """Unpickling this object calls ``os.mkdir(marker)``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def invoke(args):
    with warnings.catch_warnings(record=True) as caught:  # a real run prints these to stderr
        warnings.simplefilter("always")
        r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")
    r.warnings = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    return r


def refused(r, expect):
    assert r.warnings == [], r.warnings
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.stderr, r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.output + r.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("trained")
    r = invoke([*TRAIN, "--workdir", wd])
    assert r.exit_code == 0, r.output + r.stderr
    return wd


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained workdir; returns its run directory."""
    shutil.copytree(trained, tmp_path / "wd")
    return tmp_path / "wd" / "runs" / "pgdat-digits-s0"


def evil_files(tmp_path, marker):
    """The payload as torch.save writes it (zip) and as a bare pickle, under several names."""
    torch.save(Evil(marker), tmp_path / "evil.pt")
    raw = pickle.dumps(Evil(marker))
    (tmp_path / "evil.pkl").write_bytes(raw)
    (tmp_path / "evil.safetensors").write_bytes(raw)
    shutil.copy(tmp_path / "evil.pt", tmp_path / "evil.pth")
    shutil.copy(tmp_path / "evil.pt", tmp_path / "evil-zip.safetensors")
    return ["evil.pt", "evil.pkl", "evil.safetensors", "evil.pth", "evil-zip.safetensors"]


def test_the_payload_is_live(tmp_path):
    """Loaded unsafely, the payload does run: the tests below would notice if robench did that."""
    marker = tmp_path / "pwned"
    evil_files(tmp_path, marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 (the point of the test)
    assert marker.is_dir()


def test_evil_model_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for name in evil_files(tmp_path, marker):
        r = invoke(["eval", "--checkpoint", tmp_path / name, "--arch", "tiny-cnn", "--dataset", "digits", *EVAL,
                    "--workdir", tmp_path / "wd"])
        refused(r, name)
        assert not marker.exists(), f"{name} ran code"


def _plant(run_dir, key, source: Path, update_sha=True):
    meta = json.loads((run_dir / checkpoint.META).read_text())
    target = run_dir / meta["files"][key]["name"]
    shutil.copy(source, target)
    if update_sha:
        meta["files"][key]["sha256"] = checkpoint.sha256(target)
        (run_dir / checkpoint.META).write_text(json.dumps(meta))
    return target


def test_evil_optimiser_state_in_a_run_is_refused_on_resume(run, tmp_path):
    marker = tmp_path / "pwned"
    evil_files(tmp_path, marker)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _plant(run, "optim", tmp_path / "evil.pt")
    before[checkpoint.read_meta(run)["files"]["optim"]["name"]] = (tmp_path / "evil.pt").read_bytes()
    before[checkpoint.META] = (run / checkpoint.META).read_bytes()
    r = invoke([*TRAIN, "--steps", "20", "--resume", "--workdir", run.parent.parent])
    refused(r, "cannot load optimiser state")
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written over the run


def test_evil_weights_in_a_run_are_refused(run, tmp_path):
    marker = tmp_path / "pwned"
    evil_files(tmp_path, marker)
    for name in ("evil.pt", "evil.pkl"):
        _plant(run, "weights", tmp_path / name)
        r = invoke(["eval", "--defense", "pgdat", *EVAL, "--workdir", run.parent.parent])
        refused(r, "not a valid safetensors file")
        assert not marker.exists()


@pytest.mark.parametrize("key", ["weights", "optim"])
def test_sha256_is_checked_before_anything_reads_the_file(key, run, tmp_path, monkeypatch):
    """A file that does not match its record is refused before it is parsed at all."""
    marker = tmp_path / "pwned"
    evil_files(tmp_path, marker)
    _plant(run, key, tmp_path / "evil.pt", update_sha=False)

    def must_not_run(*a, **k):
        raise AssertionError("a file was parsed before its sha256 was checked")

    if key == "weights":  # (the weights are read, after their check, before the optimiser state)
        monkeypatch.setattr(checkpoint, "load_file", must_not_run)
    monkeypatch.setattr(torch, "load", must_not_run)
    args = [*TRAIN, "--steps", "20", "--resume"] if key == "optim" else ["eval", "--defense", "pgdat", *EVAL]
    r = invoke([*args, "--workdir", run.parent.parent])
    refused(r, "corrupted: sha256")
    assert not marker.exists()


def test_a_record_cannot_point_outside_its_run(run, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    meta = json.loads((run / checkpoint.META).read_text())
    shutil.copy(run / meta["files"]["weights"]["name"], outside)
    meta["files"]["weights"]["name"] = "../../../elsewhere.safetensors"
    (run / checkpoint.META).write_text(json.dumps(meta))
    r = invoke(["eval", "--defense", "pgdat", *EVAL, "--workdir", run.parent.parent])
    refused(r, "outside its run directory")


def test_runs_are_saved_as_safetensors(run):
    from safetensors import safe_open

    meta = checkpoint.read_meta(run)
    weights = run / meta["files"]["weights"]["name"]
    assert weights.suffix == ".safetensors"
    with safe_open(str(weights), "pt") as f:
        assert len(list(f.keys())) > 0
    for entry in meta["files"].values():
        assert checkpoint.sha256(run / entry["name"]) == entry["sha256"]


def package_sources():
    roots = {Path(m.__file__).parent for m in (robench, robench.attacks, robench.defenses)}
    files = sorted(p for root in roots for p in root.rglob("*.py"))
    assert len(files) > 20
    return files


def test_source_never_unpickles_unsafely():
    """Every torch.load passes weights_only=True; nothing calls pickle/dill/joblib loaders or lets
    numpy unpickle."""
    bad = []
    for path in package_sources():
        text = path.read_text()
        tree = ast.parse(text)
        calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                name = f"{node.value.id}.{node.attr}"
                if name == "torch.load" and id(node) not in calls:
                    bad.append(f"{where}: torch.load used other than as a call")
                if node.value.id in ("pickle", "_pickle", "cPickle", "dill", "joblib", "marshal", "shelve") \
                        and node.attr in ("load", "loads", "Unpickler", "open"):
                    bad.append(f"{where}: {name}")
                if name == "torch.jit" or name == "jit.load":
                    bad.append(f"{where}: {name}")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill", "joblib") \
                    and any(a.name in ("load", "loads", "Unpickler") for a in node.names):
                bad.append(f"{where}: from {node.module} import ...")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                fn = ast.unparse(node.func)
                kw = {k.arg: k.value for k in node.keywords}
                if fn == "torch.load":
                    v = kw.get("weights_only")
                    if not (isinstance(v, ast.Constant) and v.value is True):
                        bad.append(f"{where}: torch.load without weights_only=True")
                if fn in ("np.load", "numpy.load") and "allow_pickle" in kw:
                    v = kw["allow_pickle"]
                    if not (isinstance(v, ast.Constant) and v.value is False):
                        bad.append(f"{where}: np.load with allow_pickle")
        # The plain-text check the AST one backs up: every "torch.load(" names weights_only=True.
        for i, chunk in enumerate(text.split("torch.load(")[1:]):
            call = chunk[:chunk.find(")\n") if ")\n" in chunk else None]
            if "weights_only=True" not in call:
                bad.append(f"{path.name}: torch.load( #{i + 1} without weights_only=True")
    assert bad == []
