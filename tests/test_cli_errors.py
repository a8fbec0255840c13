"""Bad input: every mistake is one ``error: ...`` line on stderr, a non-zero exit, no traceback,
and no partial files (no new run, no ``*.tmp`` file, no new result row)."""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from robench import checkpoint
from robench.cli import cli, is_list_option
from robench.models import build_model

TINY = ["--arch", "tiny-cnn", "--steps", "20", "--attack-steps", "2", "--no-progress"]
EVAL = ["--attacks", "pgd", "--n", "32", "--no-progress"]


def invoke(args, env=None):
    """Run the CLI in-process through the same ``Group.main`` as the real entry point. Warnings
    that Python would print to stderr by default are kept in ``result.warnings``: a real run
    would show them as extra lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench", env=env)
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    result.warnings = [str(w.message) for w in caught if not issubclass(w.category, hidden)]
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workdir with a tiny trained pgdat run and a few stored results, plus model files."""
    root = tmp_path_factory.mktemp("base")
    wd = root / "wd"
    for args in (["train", "pgdat", *TINY, "--workdir", wd],
                 ["eval", "--defense", "pgdat", *EVAL, "--workdir", wd]):
        r = invoke(args)
        assert r.exit_code == 0, r.output + r.stderr
    run_dir = wd / "runs" / "pgdat-digits-s0"
    meta = checkpoint.read_meta(run_dir)
    shutil.copy(run_dir / meta["files"]["weights"]["name"], root / "tiny.safetensors")
    state = checkpoint.load_weights(root / "tiny.safetensors")
    torch.save(state, root / "tiny.pt")
    rgb = build_model("tiny-cnn", 3, 10).state_dict()
    save_file({k: v.contiguous() for k, v in rgb.items()}, str(root / "rgb10.safetensors"))
    # A tiny RGB image folder with 2 classes.
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / "rgb" / split / c).mkdir(parents=True)
            for i in range(3):
                px = np.full((8, 8, 3), 40 * i + (100 if c == "dog" else 0), np.uint8)
                Image.fromarray(px).save(root / "rgb" / split / c / f"{i}.png")
    return root


class Ctx:
    def __init__(self, base, tmp):
        self.base, self.tmp = base, tmp
        self.wd = tmp / "wd"
        shutil.copytree(base / "wd", self.wd)
        self.run = self.wd / "runs" / "pgdat-digits-s0"
        self.cleanups = []

    def file(self, name, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def meta(self):
        return checkpoint.read_meta(self.run)

    def folder(self, layout: dict[str, list[str]]) -> Path:
        """An image folder: {"train/a": ["0.png"], ...}; an empty list makes an empty directory."""
        root = self.tmp / "imgs"
        for sub, files in layout.items():
            (root / sub).mkdir(parents=True, exist_ok=True)
            for f in files:
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / sub / f)
        return root


def _flip_weights(c):
    w = c.run / c.meta()["files"]["weights"]["name"]
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    return ["eval", "--defense", "pgdat", *EVAL, "--seed", "1", "--workdir", c.wd]


def _garbage_meta(c, text="{not json", cmd=("eval", "--defense", "pgdat", *EVAL, "--seed", "1")):
    (c.run / checkpoint.META).write_text(text)
    return [*cmd, "--workdir", c.wd]


def _meta_says(c, **fields):
    """The run's record claims other training data (as a run on another image folder would)."""
    meta = c.meta()
    meta.update(fields)
    (c.run / checkpoint.META).write_text(json.dumps(meta))
    return ["eval", "--defense", "pgdat", *EVAL, "--seed", "1", "--workdir", c.wd]


def _db(c, data: bytes):
    (c.wd / "results.sqlite").write_bytes(data)
    for side in ("-wal", "-shm"):
        (c.wd / f"results.sqlite{side}").unlink(missing_ok=True)
    return ["eval", "--defense", "pgdat", *EVAL, "--seed", "1", "--workdir", c.wd]


def _file_parent(c):
    blocker = c.file("blocker", b"a regular file")
    return ["train", "pgdat", *TINY, "--workdir", blocker / "wd"]


def _immutable(c, path: Path) -> bool:
    """Make ``path`` unwritable even for root (``chattr +i``); False where that is not possible."""
    if os.geteuid() != 0:
        path.chmod(0o500 if path.is_dir() else 0o400)
        c.cleanups.append(lambda: path.chmod(0o700 if path.is_dir() else 0o600))
        return True
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        return False
    c.cleanups.append(lambda: subprocess.run(["chattr", "-i", path], capture_output=True))
    return True


def _read_only(c):
    """A workdir that cannot be written: chmod 0o500 (or, as root, ``chattr +i``, since root
    writes through permissions); failing both, a workdir whose runs/ is a regular file, so
    creating the run directory fails the same way."""
    fresh = c.tmp / "ro"
    fresh.mkdir()
    if not _immutable(c, fresh):
        (fresh / "runs").write_bytes(b"not a directory")
    return ["train", "pgdat", *TINY, "--workdir", fresh]


def _read_only_runs(c):
    if not _immutable(c, c.wd / "runs"):
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    return ["train", "pgdat", *TINY, "--name", "new", "--workdir", c.wd]


def _read_only_db(c):
    if not _immutable(c, c.wd / "results.sqlite"):
        pytest.skip("cannot make a file read-only here (root without chattr)")
    return ["eval", "--defense", "pgdat", *EVAL, "--seed", "1", "--workdir", c.wd]


def _offline_cifar(c, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    empty = c.tmp / "empty-data"
    empty.mkdir()
    return ["train", "pgdat", "--dataset", "cifar10", "--data-dir", empty, *TINY, "--workdir", c.wd]


def _cuda(c, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return ["eval", "--defense", "pgdat", *EVAL, "--device", "cuda", "--workdir", c.wd]


# (id, setup(ctx) -> argv, what the one error line must contain). A setup taking two arguments
# also gets pytest's monkeypatch.
CASES = [
    # unknown names
    ("unknown-defense", lambda c: ["train", "rlfat", *TINY, "--workdir", c.wd], "unknown defense 'rlfat'"),
    ("unknown-attack", lambda c: ["eval", "--defense", "pgdat", "--attacks", "pgd,fgsm", "--workdir", c.wd],
     "unknown attack 'fgsm'"),
    ("unknown-dataset-train", lambda c: ["train", "pgdat", "--dataset", "mnist", *TINY, "--workdir", c.wd],
     "unknown dataset 'mnist'"),
    ("unknown-dataset-eval", lambda c: ["eval", "--defense", "pgdat", "--dataset", "mnist", *EVAL,
                                        "--workdir", c.wd], "unknown dataset 'mnist'"),
    ("unknown-arch", lambda c: ["train", "pgdat", *TINY, "--arch", "resnet-999", "--name", "x", "--workdir", c.wd],
     "unknown architecture 'resnet-999'"),
    ("unknown-command", lambda c: ["frobnicate"], "No such command"),
    ("unknown-option", lambda c: ["train", "pgdat", "--bogus", "--workdir", c.wd], "No such option"),
    ("missing-argument", lambda c: ["train", "--workdir", c.wd], "Missing argument"),
    # numbers out of range
    ("train-eps-0", lambda c: ["train", "pgdat", *TINY, "--eps", "0", "--name", "x", "--workdir", c.wd],
     r"--eps must be in \(0, 1\]"),
    ("train-eps-big", lambda c: ["train", "pgdat", *TINY, "--eps", "1.5", "--name", "x", "--workdir", c.wd],
     r"--eps must be in \(0, 1\]"),
    ("eval-eps-0", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0", "--workdir", c.wd],
     r"eps must be in \(0, 1\]"),
    ("eval-eps-big", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0.03,2", "--workdir", c.wd],
     r"eps must be in \(0, 1\]"),
    ("eval-eps-abc", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "abc", "--workdir", c.wd],
     "--eps 'abc'"),
    ("train-eps-abc", lambda c: ["train", "pgdat", *TINY, "--eps", "abc", "--workdir", c.wd], "not a valid float"),
    ("train-steps-0", lambda c: ["train", "pgdat", *TINY, "--steps", "0", "--name", "x", "--workdir", c.wd],
     "--steps must be positive"),
    ("train-steps-neg", lambda c: ["train", "pgdat", *TINY, "--steps", "-5", "--name", "x", "--workdir", c.wd],
     "--steps must be positive"),
    ("train-attack-steps-0", lambda c: ["train", "pgdat", *TINY, "--attack-steps", "0", "--name", "x",
                                        "--workdir", c.wd], "--attack-steps must be positive"),
    ("train-batch-0", lambda c: ["train", "pgdat", *TINY, "--batch-size", "0", "--name", "x", "--workdir", c.wd],
     "--batch-size must be positive"),
    ("eval-batch-0", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--batch-size", "0", "--workdir", c.wd],
     "--batch-size must be positive"),
    ("eval-n-too-big", lambda c: ["eval", "--defense", "pgdat", "--attacks", "pgd", "--n", "100000",
                                  "--workdir", c.wd], "larger than the digits test set"),
    ("eval-n-0", lambda c: ["eval", "--defense", "pgdat", "--attacks", "pgd", "--n", "0", "--workdir", c.wd],
     "--n must be positive"),
    ("eval-n-neg", lambda c: ["eval", "--defense", "pgdat", "--attacks", "pgd", "--n", "-3", "--workdir", c.wd],
     "--n must be positive"),
    # model files given with --checkpoint
    ("ckpt-missing", lambda c: ["eval", "--checkpoint", c.tmp / "nope.safetensors", "--arch", "tiny-cnn",
                                "--dataset", "digits", *EVAL, "--workdir", c.wd], "does not exist"),
    ("ckpt-empty", lambda c: ["eval", "--checkpoint", c.file("e.safetensors", b""), "--arch", "tiny-cnn",
                              "--dataset", "digits", *EVAL, "--workdir", c.wd], "not a valid safetensors"),
    ("ckpt-truncated", lambda c: ["eval", "--checkpoint",
                                  c.file("t.safetensors", (c.base / "tiny.safetensors").read_bytes()[:3000]),
                                  "--arch", "tiny-cnn", "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "not a valid safetensors"),
    ("ckpt-garbage", lambda c: ["eval", "--checkpoint", c.file("g.safetensors", os.urandom(4096)),
                                "--arch", "tiny-cnn", "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "not a valid safetensors"),
    ("ckpt-garbage-pt", lambda c: ["eval", "--checkpoint", c.file("g.pt", os.urandom(4096)), "--arch", "tiny-cnn",
                                   "--dataset", "digits", *EVAL, "--workdir", c.wd], "cannot load .* safely"),
    ("ckpt-truncated-pt", lambda c: ["eval", "--checkpoint", c.file("t.pt", (c.base / "tiny.pt").read_bytes()[:5000]),
                                     "--arch", "tiny-cnn", "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "cannot load .* safely"),
    ("ckpt-wrong-arch", lambda c: ["eval", "--checkpoint", c.base / "tiny.safetensors", "--arch", "small-cnn",
                                   "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "do not fit architecture 'small-cnn'"),
    ("ckpt-wrong-arch-pt", lambda c: ["eval", "--checkpoint", c.base / "tiny.pt", "--arch", "wrn-10-1",
                                      "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "do not fit architecture 'wrn-10-1'"),
    ("ckpt-other-dataset", lambda c: ["eval", "--checkpoint", c.base / "tiny.safetensors", "--arch", "tiny-cnn",
                                      "--dataset", "folder", "--data-dir", c.base / "rgb", *EVAL, "--n", "4",
                                      "--workdir", c.wd], "do not fit architecture 'tiny-cnn'"),
    ("ckpt-other-classes", lambda c: ["eval", "--checkpoint", c.base / "rgb10.safetensors", "--arch", "tiny-cnn",
                                      "--dataset", "folder", "--data-dir", c.base / "rgb", *EVAL, "--n", "4",
                                      "--workdir", c.wd], "do not fit architecture 'tiny-cnn'"),
    ("ckpt-no-dataset", lambda c: ["eval", "--checkpoint", c.base / "tiny.safetensors", *EVAL, "--workdir", c.wd],
     "--checkpoint needs --dataset"),
    # broken files inside the workdir
    ("run-weights-flipped", _flip_weights, "corrupted: sha256"),
    ("run-meta-garbage-eval", _garbage_meta, "invalid JSON"),
    ("run-meta-garbage-resume", lambda c: _garbage_meta(c, cmd=("train", "pgdat", *TINY, "--resume")),
     "invalid JSON"),
    ("run-meta-missing-fields", lambda c: _garbage_meta(c, '{"format": "robench-checkpoint/1"}'),
     "incomplete robench checkpoint record"),
    ("run-other-classes", lambda c: _meta_says(c, classes=list("abcdefghij")),
     r"pgdat-digits-s0 was trained on 10 classes \(a, b, c, d, e, \.\.\.\), but the digits data has 10 \(0, 1, 2"),
    ("run-other-size", lambda c: _meta_says(c, image_size=[32, 32]),
     "was trained on 1x32x32 images, but the digits data has 1x8x8"),
    ("run-weights-missing", lambda c: (c.run / c.meta()["files"]["weights"]["name"]).unlink()
     or ["eval", "--defense", "pgdat", *EVAL, "--seed", "1", "--workdir", c.wd], "is missing"),
    ("db-not-sqlite", lambda c: _db(c, b"these are not the results you are looking for\n" * 50), "not SQLite"),
    ("db-corrupt-sqlite", lambda c: _db(c, b"SQLite format 3\x00" + os.urandom(8192)), "results database"),
    # workdirs that cannot be written
    ("workdir-parent-is-file", _file_parent, "blocker"),
    ("workdir-read-only", _read_only, "ro"),
    ("runs-read-only", _read_only_runs, "runs/new"),
    ("db-read-only", _read_only_db, "results database.*readonly"),
    ("report-workdir-is-file", lambda c: ["report", "--workdir", c.file("wdfile", b"x"), "--out", c.tmp / "rep"],
     "wdfile is a file"),
    # image folders
    ("folder-no-data-dir", lambda c: ["train", "pgdat", "--dataset", "folder", *TINY, "--workdir", c.wd],
     "needs --data-dir"),
    ("folder-missing", lambda c: ["train", "pgdat", "--dataset", "folder", "--data-dir", c.tmp / "nowhere", *TINY,
                                  "--workdir", c.wd], "does not exist"),
    ("folder-empty", lambda c: ["train", "pgdat", "--dataset", "folder", "--data-dir",
                                c.folder({"train": [], "test": []}), *TINY, "--workdir", c.wd], "no images"),
    ("folder-class-empty", lambda c: ["train", "pgdat", "--dataset", "folder", "--data-dir",
                                      c.folder({"train/a": ["0.png"], "train/b": [], "test/a": ["0.png"]}),
                                      *TINY, "--workdir", c.wd], "has no images"),
    ("folder-inconsistent", lambda c: ["train", "pgdat", "--dataset", "folder", "--data-dir",
                                       c.folder({"train/a": ["0.png"], "train/b": ["0.png"], "test/a": ["0.png"],
                                                 "test/c": ["0.png"]}), *TINY, "--workdir", c.wd],
     "inconsistent classes"),
    ("folder-bad-image", lambda c: [(c.folder({"train/a": ["0.png"], "test/a": ["0.png"]}) / "train/a/1.png")
                                    .write_bytes(b"not a png"), "train", "pgdat", "--dataset", "folder",
                                    "--data-dir", c.tmp / "imgs", *TINY, "--workdir", c.wd][1:],
     "cannot read image"),
    ("cifar10-offline", _offline_cifar, "could not download CIFAR-10"),
    # devices
    ("device-cuda-absent", _cuda, "no CUDA GPU"),
    ("device-tpu", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--device", "tpu", "--workdir", c.wd], "tpu"),
    # attack options
    ("option-syntax", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd", "--workdir", c.wd],
     "ATTACK.PARAM=VALUE"),
    ("option-not-run", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "cw.kappa=10", "--workdir", c.wd],
     "attack.*not run: cw"),
    ("option-unknown-param", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd.foo=1", "--workdir", c.wd],
     "no parameter.*foo"),
    ("option-unknown-attack", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "zap.foo=1", "--workdir", c.wd],
     "unknown attack 'zap'"),
    ("option-wrong-type", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd.attack_steps=abc",
                                      "--workdir", c.wd], "pgd.attack_steps='abc': expected int"),
    ("option-wrong-type-float", lambda c: ["eval", "--defense", "pgdat", "--attacks", "cw", "--n", "8",
                                           "-o", "cw.kappa=abc", "--workdir", c.wd], "expected float"),
    ("attacks-empty", lambda c: ["eval", "--defense", "pgdat", "--attacks", ",", "--workdir", c.wd],
     "--attacks is empty"),
    # runs
    ("resume-changed", lambda c: ["train", "pgdat", *TINY, "--eps", "0.37", "--resume", "--workdir", c.wd],
     "differ.*eps"),
    ("run-name-escapes", lambda c: ["train", "pgdat", *TINY, "--name", "../../escape", "--workdir", c.wd],
     "plain directory name"),
    ("train-lam-negative", lambda c: ["train", "trades", *TINY, "--lam", "-1", "--workdir", c.wd],
     "--lam must be non-negative"),
    ("existing-run", lambda c: ["train", "pgdat", *TINY, "--workdir", c.wd], "already exists"),
    ("eval-neither", lambda c: ["eval", *EVAL, "--workdir", c.wd], "pass --defense"),
    ("eval-both", lambda c: ["eval", "--defense", "pgdat", "--checkpoint", c.base / "tiny.safetensors",
                             "--dataset", "digits", *EVAL, "--workdir", c.wd], "pass --defense"),
    ("eval-untrained", lambda c: ["eval", "--defense", "trades", "--dataset", "cifar10", *EVAL, "--workdir", c.wd],
     "no trained 'trades' checkpoint for cifar10 in .*; the zoo has none either"),
    # lists with a typo: a repeated, empty or blank item is refused, never dropped or merged
    ("attacks-repeated", lambda c: ["eval", "--defense", "pgdat", "--n", "32", "--attacks", "pgd,pgd", "--workdir", c.wd],
     "--attacks 'pgd,pgd' names pgd more than once"),
    ("attacks-empty-item", lambda c: ["eval", "--defense", "pgdat", "--n", "32", "--attacks", "pgd,,cw",
                                      "--workdir", c.wd], "--attacks 'pgd,,cw' has an empty item"),
    ("attacks-trailing-comma", lambda c: ["eval", "--defense", "pgdat", "--n", "32", "--attacks", "pgd,",
                                          "--workdir", c.wd], "has an empty item"),
    ("attacks-blank-item", lambda c: ["eval", "--defense", "pgdat", "--n", "32", "--attacks", "pgd, ,cw",
                                      "--workdir", c.wd], "has an empty item"),
    ("defense-repeated-eval", lambda c: ["eval", "--defense", "pgdat,pgdat", *EVAL, "--workdir", c.wd],
     "--defense 'pgdat,pgdat' names pgdat more than once"),
    ("defense-empty-eval", lambda c: ["eval", "--defense", "", *EVAL, "--workdir", c.wd], "--defense is empty"),
    ("defense-leading-comma", lambda c: ["eval", "--defense", ",pgdat", *EVAL, "--workdir", c.wd],
     "has an empty item"),
    ("defense-repeated-sensitivity", lambda c: ["sensitivity", "--defense", "pgdat, pgdat", "--n", "8",
                                                "--no-progress", "--workdir", c.wd], "names pgdat more than once"),
    ("defense-empty-item-salience", lambda c: ["salience", "--defense", "pgdat,", "--n-images", "1",
                                               "--workdir", c.wd], "has an empty item"),
    ("eps-repeated", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0.1,0.10", "--workdir", c.wd],
     "same radius more than once"),
    ("eps-empty-item", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0.1,", "--workdir", c.wd],
     "has an empty item"),
    ("eps-empty", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "", "--workdir", c.wd], "--eps is empty"),
    ("eps-nan", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "nan", "--workdir", c.wd],
     "expected finite numbers"),
    ("defense-given-twice", lambda c: ["eval", "--defense", "pgdat", "--defense", "trades", *EVAL,
                                       "--workdir", c.wd], "--defense is given more than once; give one comma"),
    ("eps-given-twice", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0.1", "--eps", "0.2",
                                   "--workdir", c.wd], "--eps is given more than once"),
    ("attacks-given-twice", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--attacks", "cw", "--workdir", c.wd],
     "--attacks is given more than once"),
    # attack options that contradict each other
    ("option-twice", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd.attack_steps=3",
                                "-o", "pgd.attack_steps=4", "--workdir", c.wd],
     "pgd.attack_steps is given twice, with different values"),
    ("option-empty-value", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd.attack_steps=",
                                      "--workdir", c.wd], "the value is empty"),
    ("option-spaces", lambda c: ["eval", "--defense", "pgdat", *EVAL, "-o", "pgd. attack_steps=3",
                                 "--workdir", c.wd], "no spaces around ATTACK.PARAM"),
    ("option-faithful-contradicted", lambda c: ["eval", "--defense", "pgdat", "--attacks", "nattack", "--n", "4",
                                                "--faithful", "-o", "nattack.faithful=false", "--workdir", c.wd],
     "--faithful contradicts -o nattack.faithful=false"),
    ("option-chunk-contradicted", lambda c: ["eval", "--defense", "pgdat", "--attacks", "nattack", "--n", "4",
                                             "--nattack-chunk", "2", "-o", "nattack.chunk=4", "--workdir", c.wd],
     "--nattack-chunk contradicts -o nattack.chunk=4"),
    ("option-eps-and-eps", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--eps", "0.1", "-o", "pgd.eps=0.2",
                                      "--workdir", c.wd], "--eps and -o pgd.eps both set the radius"),
    ("eval-arch-without-checkpoint", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--arch", "small-cnn",
                                                "--workdir", c.wd], "--arch applies to --checkpoint only"),
    # paths that cannot mean what the user wanted
    ("ckpt-is-directory", lambda c: ["eval", "--checkpoint", c.run, "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "--checkpoint .* is a directory"),
    ("ckpt-empty-path", lambda c: ["eval", "--checkpoint", "", "--dataset", "digits", *EVAL, "--workdir", c.wd],
     "--checkpoint is empty"),
    ("workdir-empty", lambda c: ["train", "pgdat", *TINY, "--workdir", ""], "--workdir is empty"),
    ("workdir-blank", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--workdir", "  "], "--workdir is empty"),
    ("workdir-trailing-space", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--workdir", f"{c.wd} "],
     "starts or ends with a space"),
    ("workdir-env-empty", lambda c, mp: mp.setenv("ROBENCH_WORKDIR", "") or ["train", "pgdat", *TINY],
     r"\$ROBENCH_WORKDIR is empty"),
    ("workdir-is-a-run", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--workdir", c.run], "is a run's folder"),
    ("workdir-is-runs", lambda c: ["train", "pgdat", *TINY, "--name", "y", "--workdir", c.wd / "runs"],
     "is the runs/ folder of a workdir"),
    ("list-workdir-missing", lambda c: ["list", "--workdir", c.tmp / "nowhere"], "nowhere does not exist"),
    ("report-workdir-missing", lambda c: ["report", "--workdir", c.tmp / "nowhere", "--out", c.tmp / "rep"],
     "nowhere does not exist"),
    ("report-out-is-file", lambda c: ["report", "--workdir", c.wd, "--out", c.file("rep.md", b"x")],
     "--out .*rep.md is a file"),
    ("report-out-empty", lambda c: ["report", "--workdir", c.wd, "--out", ""], "--out is empty"),
    ("demo-out-is-file", lambda c: ["demo", "--workdir", c.tmp / "demo-wd", "--out", c.file("demo.md", b"x"),
                                    "--no-progress"], "--out .*demo.md is a file"),
    ("data-dir-is-file-folder", lambda c: ["train", "pgdat", "--dataset", "folder", "--data-dir", c.file("d", b"x"),
                                           *TINY, "--workdir", c.wd], "--data-dir .* is a file"),
    ("data-dir-is-file-cifar", lambda c: ["train", "pgdat", "--dataset", "cifar10", "--data-dir",
                                          c.file("d", b"x"), *TINY, "--workdir", c.wd], "--data-dir .* is a file"),
    ("data-dir-is-file-eval", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--data-dir", c.file("d", b"x"),
                                         "--workdir", c.wd], "--data-dir .* is a file"),
    ("data-dir-empty", lambda c: ["train", "pgdat", "--dataset", "cifar10", "--data-dir", "", *TINY,
                                  "--workdir", c.wd], "--data-dir is empty"),
    ("data-dir-without-dataset", lambda c: ["train", "pgdat", "--data-dir", c.base / "rgb", *TINY, "--name", "z",
                                            "--workdir", c.wd], "--data-dir has no effect on the embedded digits"),
    ("data-dir-digits-run-eval", lambda c: ["eval", "--defense", "pgdat", *EVAL, "--data-dir", c.base / "rgb",
                                            "--workdir", c.wd], "--data-dir has no effect: pgdat was trained on"),
    ("data-dir-digits-run-sensitivity", lambda c: ["sensitivity", "--defense", "pgdat", "--n", "8", "--data-dir",
                                                   c.base / "rgb", "--workdir", c.wd], "--data-dir has no effect"),
    ("name-hidden", lambda c: ["train", "pgdat", *TINY, "--name", ".x", "--workdir", c.wd], "starts with '.'"),
    ("name-space", lambda c: ["train", "pgdat", *TINY, "--name", "x ", "--workdir", c.wd],
     "starts or ends with a space"),
    ("name-empty", lambda c: ["train", "pgdat", *TINY, "--name", "", "--workdir", c.wd], "plain directory name"),
    ("name-separator", lambda c: ["train", "pgdat", *TINY, "--name", "a/b", "--workdir", c.wd],
     "plain directory name"),
    # training options the defense does not use: they would change only the record
    ("train-lam-unused", lambda c: ["train", "rlfat-p", *TINY, "--lam", "3", "--workdir", c.wd],
     "--lam has no effect on rlfat-p"),
    ("train-eta-unused", lambda c: ["train", "trades", *TINY, "--eta", "1", "--workdir", c.wd],
     "--eta has no effect on trades"),
    ("train-rbs-unused", lambda c: ["train", "pgdat", *TINY, "--rbs-mode", "image", "--name", "z",
                                    "--workdir", c.wd], "--rbs-mode has no effect on pgdat"),
    ("train-exclude-identity-unused", lambda c: ["train", "trades", *TINY, "--rbs-exclude-identity",
                                                 "--workdir", c.wd], "--rbs-exclude-identity has no effect"),
    ("train-attack-unused", lambda c: ["train", "standard", "--arch", "tiny-cnn", "--steps", "5", "--eps", "0.1",
                                       "--workdir", c.wd], "--eps has no effect on standard"),
    # defense settings given with -o DEFENSE.PARAM=VALUE, checked as eval's attack options
    ("train-option-syntax", lambda c: ["train", "pgdat", *TINY, "-o", "pgdat", "--workdir", c.wd],
     "DEFENSE.PARAM=VALUE"),
    ("train-option-unknown-param", lambda c: ["train", "pgdat", *TINY, "-o", "pgdat.eta=1", "--name", "z",
                                              "--workdir", c.wd], "defense pgdat has no parameter.*eta"),
    ("train-option-other-defense", lambda c: ["train", "pgdat", *TINY, "-o", "trades.lam=3", "--workdir", c.wd],
     "not trained: trades"),
    ("train-option-unknown-defense", lambda c: ["train", "pgdat", *TINY, "-o", "zap.lam=3", "--workdir", c.wd],
     "unknown defense 'zap'"),
    ("train-option-wrong-type", lambda c: ["train", "pgdat", *TINY, "-o", "pgdat.eps=abc", "--name", "z",
                                           "--workdir", c.wd], "pgdat.eps='abc': expected float"),
    ("train-option-bad-value", lambda c: ["train", "rlfat-p", *TINY, "-o", "rlfat-p.rbs_mode=pixel",
                                          "--workdir", c.wd], "--rbs-mode must be one of batch, image"),
    ("train-option-contradicts-flag", lambda c: ["train", "trades", *TINY, "--lam", "3", "-o", "trades.lam=4",
                                                 "--workdir", c.wd], "--lam contradicts -o trades.lam=4"),
    ("train-option-twice", lambda c: ["train", "trades", *TINY, "-o", "trades.lam=3", "-o", "trades.lam=4",
                                      "--workdir", c.wd], "trades.lam is given twice"),
    ("train-n-train-too-big", lambda c: ["train", "pgdat", *TINY, "--n-train", "5000", "--name", "z",
                                         "--workdir", c.wd], "--n-train 5000 is larger than the digits"),
]


def snapshot(wd: Path) -> dict:
    """What a failed command must not change: the run directories and their records, the result
    and partial rows."""
    runs = sorted(p.name for p in (wd / "runs").iterdir()) if (wd / "runs").is_dir() else []
    runs += sorted(p.parent.name + "/" + p.name for p in (wd / "runs").glob(f"*/{checkpoint.META}"))
    rows = {}
    db = wd / "results.sqlite"
    if db.is_file():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("results", "partial")}
            finally:
                con.close()
        except sqlite3.DatabaseError:
            rows = {"unreadable": db.read_bytes()}
    return {"runs": runs, "rows": rows}


def tmp_files(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


def assert_one_line_error(code, stdout, stderr, expect):
    assert code != 0, f"exit code 0\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), stderr
    assert re.search(expect, lines[0]), f"{expect!r} not in {lines[0]!r}"


@pytest.mark.parametrize("setup,expect", [pytest.param(s, e, id=i) for i, s, e in CASES])
def test_bad_invocation_is_one_line(setup, expect, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBENCH_WORKDIR", str(tmp_path / "default-wd"))
    c = Ctx(base, tmp_path)
    try:
        args = setup(c, monkeypatch) if setup.__code__.co_argcount == 2 else setup(c)
        before = snapshot(c.wd)
        r = invoke(args)
        assert isinstance(r.exception, SystemExit), repr(r.exception)  # never an uncaught exception
        assert_one_line_error(r.exit_code, r.stdout, r.stderr, expect)
        assert r.exit_code == 2
        assert r.warnings == []
        assert snapshot(c.wd) == before
        assert tmp_files(tmp_path) == []
        assert not (tmp_path / "default-wd").exists()
    finally:
        for undo in c.cleanups:
            undo()


def test_case_ids_are_unique():
    """pytest would quietly rename a repeated id, and one case could hide another."""
    ids = [i for i, _, _ in CASES]
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == []


def _prefix(command: str) -> list[str]:
    """The least a command needs before its options (its required argument or option)."""
    return {"train": ["train", "pgdat"], "eval": ["eval", "--defense", "pgdat"],
            "sensitivity": ["sensitivity", "--defense", "pgdat"],
            "salience": ["salience", "--defense", "pgdat"], "zoo show": ["zoo", "show", "x"],
            "zoo fetch": ["zoo", "fetch", "x"], "zoo add": ["zoo", "add", "x"],
            "zoo export": ["zoo", "export", "x"],
            "experiment": ["experiment", "x.toml"]}.get(command, command.split())


def _commands(group: click.Group = cli, prefix: str = ""):
    """Every command, subcommands of groups (``zoo add``) included."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


COMMANDS = dict(_commands())
PATH_OPTIONS = [(name, p.opts[0]) for name, cmd in COMMANDS.items() for p in cmd.params
                if isinstance(p.type, click.Path)]
LIST_OPTIONS = [(name, p.opts[0]) for name, cmd in COMMANDS.items() for p in cmd.params
                if is_list_option(p) or p.name == "defenses"]


def test_every_list_and_path_option_is_checked():
    """The introspection below finds the options the issue names (and any added later)."""
    assert {("eval", "--attacks"), ("eval", "--eps"), ("eval", "--defense"), ("sensitivity", "--defense"),
            ("salience", "--defense")} <= set(LIST_OPTIONS)
    top = [c for c in COMMANDS if " " not in c]  # every top-level command has a workdir
    assert {(c, "--workdir") for c in top} | {("train", "--data-dir"), ("eval", "--checkpoint"),
                                              ("report", "--out"), ("demo", "--out"), ("zoo add", "--workdir"),
                                              ("zoo add", "--manifest")} <= set(PATH_OPTIONS)


@pytest.mark.parametrize("command,option", PATH_OPTIONS)
def test_every_path_option_refuses_an_empty_path(command, option, tmp_path, monkeypatch):
    """An empty path (an unset shell variable) would mean the current directory: refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_WORKDIR", str(tmp_path / "default-wd"))
    r = invoke([*_prefix(command), option, ""])
    assert_one_line_error(r.exit_code, r.stdout, r.stderr, f"{option} is empty")
    assert r.exit_code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,option", LIST_OPTIONS)
@pytest.mark.parametrize("value,expect", [("pgd,,cw", "has an empty item"), ("a,", "has an empty item"),
                                          ("0.1,0.1", "more than once"), (" , ", "is empty")])
def test_every_list_option_refuses_a_typo(command, option, value, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_WORKDIR", str(tmp_path / "default-wd"))
    base = _prefix(command)
    args = [*base[:1], *base[3:], option, value] if option == "--defense" else [*base, option, value]
    r = invoke(args)
    assert_one_line_error(r.exit_code, r.stdout, r.stderr, expect)
    assert r.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_real_entry_point_prints_one_line(base, tmp_path):
    """Through ``python -m robench``: a click usage error, a UserError and an OSError."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    cases = [
        (["train", "pgdat", "--bogus"], "No such option"),
        (["eval", "--defense", "pgdat", "--attacks", "fgsm", "--workdir", base / "wd"], "unknown attack 'fgsm'"),
        (["eval", "--checkpoint", base / "tiny.safetensors", "--arch", "tiny-cnn", "--dataset", "digits",
          *EVAL, "--workdir", blocker / "wd"], "blocker/wd"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBENCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "robench", *map(str, args)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for p, (_, expect) in zip(procs, cases):
        out, err = p.communicate(timeout=120)
        assert_one_line_error(p.returncode, out, err, expect)
    assert tmp_files(tmp_path) == [] and tmp_files(base) == []


@pytest.mark.parametrize("command,option", LIST_OPTIONS)
def test_every_list_option_given_twice_is_refused(command, option, tmp_path, monkeypatch):
    """``--defense a --defense b`` means both to the user; click would keep only b."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_WORKDIR", str(tmp_path / "default-wd"))
    r = invoke([command, option, "a", option, "b", *(["--defense", "pgdat"] if option != "--defense" else [])])
    assert_one_line_error(r.exit_code, r.stdout, r.stderr, f"{option} is given more than once")
    assert r.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_attack_specific_flags_are_hidden_aliases_of_o_options():
    """--faithful and --nattack-chunk belong to one attack: they are -o options now, the old
    spellings kept (hidden from --help) for one release."""
    help_text = invoke(["eval", "--help"]).stdout
    assert "--faithful" not in help_text and "--nattack-chunk" not in help_text and "-o, --attack-option" in help_text
