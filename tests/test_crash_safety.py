"""Crash safety: ``kill -9`` at random points of a ``python -m robench`` training or evaluation
process, then resume: the result equals an uninterrupted run's, bit for bit, and nothing a
killed writer leaves behind (a stale ``*.tmp`` file) breaks or lingers.

The random kill points come from ``ROBENCH_KILL_SEED`` (a fresh one each run, printed on failure).
"""

import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from robench import checkpoint
from robench.cli import cli
from robench.models import build_model

SEED = int(os.environ.get("ROBENCH_KILL_SEED", random.randrange(10**9)))
TRAIN = ["train", "pgdat", "--arch", "tiny-cnn", "--steps", "60", "--attack-steps", "2", "--checkpoint-every", "10",
         "--log-every", "10", "--no-progress", "--device", "cpu"]
EVAL = ["eval", "--defense", "pgdat", "--attacks", "pgd", "--n", "160", "--batch-size", "16", "--no-progress",
        "--device", "cpu"]
RUN = "pgdat-digits-s0"


def invoke(args):
    r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    return r


# The processes under test are ``python -m robench ARGS`` forked from one "zygote" interpreter
# that has already imported torch, robench and scikit-learn: each is a separate OS process that
# runs robench/__main__.py as ``-m`` does (runpy) and dies by a real SIGKILL, but none pays the
# seconds of imports again (on two busy cores, eleven fresh interpreters cost over a minute).
# tests/test_cli_errors.py runs the real ``python -m robench`` entry point.
ZYGOTE = r"""
import json, os, runpy, sys, traceback
import robench.cli, robench.train, robench.evaluate, sklearn.datasets, sklearn.model_selection, torch._dynamo
import robench.attacks, robench.defenses, robench.models
while True:
    cmd, _, arg = sys.stdin.readline().strip().partition(" ")
    if cmd == "run":
        req = json.loads(arg)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(req["cwd"])
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                f = os.open(os.devnull, os.O_RDONLY)
                os.dup2(f, 0)
                os.close(f)
                sys.argv = ["robench", *req["args"]]
                try:
                    runpy.run_module("robench", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print("pid", pid, flush=True)
    elif cmd == "wait":
        print("exit", os.waitstatus_to_exitcode(os.waitpid(int(arg), 0)[1]), flush=True)
    else:
        break
"""


class Child:
    def __init__(self, pid, out, err):
        self.pid, self.out, self.err = pid, out, err

    def alive(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def output(self):
        return self.out.read_text() + self.err.read_text()


class Zygote:
    def __init__(self, logdir):
        self.logdir, self.n = logdir, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(logdir / "zygote.err", "w"), text=True)

    def _ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer, f"zygote died: {(self.logdir / 'zygote.err').read_text()}"
        return int(answer[1])

    def run(self, args, cwd):
        """Start ``python -m robench ARGS`` in ``cwd``."""
        self.n += 1
        out, err = self.logdir / f"{self.n}.out", self.logdir / f"{self.n}.err"
        pid = self._ask("run " + json.dumps({"args": [str(a) for a in args], "cwd": str(cwd),
                                              "stdout": str(out), "stderr": str(err)}))
        return Child(pid, out, err)

    def wait(self, child, timeout=300.0):
        """The child's exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while child.alive():
            if time.monotonic() > deadline:
                os.kill(child.pid, signal.SIGKILL)
                pytest.fail(f"robench {child.pid} timed out: {child.output()}")
            time.sleep(0.01)
        return self._ask(f"wait {child.pid}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def wait_until(zygote, child, ready, what, timeout=180.0):
    """Poll ``ready()`` every few ms while ``child`` runs; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            pytest.fail(f"robench ended (rc {zygote.wait(child)}) before {what} [seed {SEED}]\n{child.output()}")
        if time.monotonic() > deadline:
            os.kill(child.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what} [seed {SEED}]")
        time.sleep(0.005)


def kill9(zygote, child, delay):
    time.sleep(delay)
    assert child.alive(), f"robench finished before the kill [seed {SEED}]"
    os.kill(child.pid, signal.SIGKILL)
    assert zygote.wait(child) == -signal.SIGKILL


def tmp_files(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


def saved_step(run_dir):
    try:
        return json.loads((run_dir / checkpoint.META).read_text())["step"]
    except FileNotFoundError:
        return -1


def weights(run_dir):
    return load_file(str(run_dir / checkpoint.read_meta(run_dir)["files"]["weights"]["name"]))


def log(run_dir):
    with open(run_dir / "train_log.csv", newline="") as f:
        return [(r["step"], r["loss"], r["train_acc"]) for r in csv.DictReader(f)]


def test_training_killed_three_times_resumes_bit_identical(zygote, tmp_path):
    rng = random.Random(SEED)
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    run_dir = cut / "runs" / RUN
    invoke([*TRAIN, "--workdir", clean])

    # Kill once the run has saved a random checkpoint (0..30, increasing; a resumed process saves
    # at least one of its own first), at a random moment of the following stretch, which may be
    # in the middle of writing the next checkpoint.
    targets = sorted(rng.sample(range(0, 40, 10), 3))
    for i, target in enumerate(targets):
        need = max(target, saved_step(run_dir) + 10) if i else target
        child = zygote.run([*TRAIN, *(["--resume"] if i else []), "--workdir", cut], tmp_path)
        wait_until(zygote, child, lambda: saved_step(run_dir) >= need, f"checkpoint step {need}")
        kill9(zygote, child, rng.uniform(0, 0.15))
        # Whatever the moment of the kill, the run holds a complete, verified checkpoint.
        meta = checkpoint.load(run_dir, build_model("tiny-cnn", 1, 10))
        assert meta["step"] >= need and not meta["finished"], f"[seed {SEED}]"

    # A writer killed mid-write leaves its temporary file; plant some to be sure.
    for name in (".checkpoint.json.x1.tmp", f".weights-{targets[-1] + 10:08d}.safetensors.x2.tmp",
                 ".train_log.csv.x3.tmp"):
        (run_dir / name).write_bytes(b"half a file")
    invoke([*TRAIN, "--resume", "--workdir", cut])

    a, b = weights(clean / "runs" / RUN), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs [seed {SEED}, kills after {targets}]"
    assert log(run_dir) == log(clean / "runs" / RUN) and len(log(run_dir)) == 6
    meta = checkpoint.read_meta(run_dir)
    assert meta["step"] == 60 and meta["finished"]
    assert tmp_files(cut) == []
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in (clean / "runs" / RUN).iterdir())


def results(db: Path):
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT checkpoint, dataset, split, kind, name, params, n, seed, value, outcomes "
                           "FROM results ORDER BY name").fetchall()
        partial = con.execute("SELECT count(*) FROM partial").fetchone()[0]
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    return rows, partial


def test_evaluation_killed_mid_attack_resumes_to_the_same_outcomes(zygote, tmp_path):
    rng = random.Random(SEED + 1)
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    trained = tmp_path / "trained"
    invoke(["train", "pgdat", "--arch", "tiny-cnn", "--steps", "20", "--attack-steps", "2", "--no-progress",
            "--device", "cpu", "--workdir", trained])
    for wd in (clean, cut):
        shutil.copytree(trained / "runs", wd / "runs")
    invoke([*EVAL, "--workdir", clean])

    # Kill after a random number of the 10 PGD batches are stored, a random moment later.
    db = cut / "results.sqlite"
    done = rng.randint(1, 6)

    def pgd_batches():
        if not db.exists():
            return 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT count(*) FROM partial WHERE key LIKE '%\"name\":\"pgd\"%'").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0
        finally:
            con.close()

    child = zygote.run([*EVAL, "--workdir", cut], tmp_path)
    wait_until(zygote, child, lambda: pgd_batches() >= done, f"{done} stored PGD batches")
    kill9(zygote, child, rng.uniform(0, 0.05))
    rows, partial = results(db)
    assert [r[4] for r in rows] == ["clean"] and 0 < partial < 10  # the PGD result is not finished
    invoke([*EVAL, "--workdir", cut])

    got, got_partial = results(db)
    want, want_partial = results(clean / "results.sqlite")
    assert [r[4] for r in got] == ["clean", "pgd"]  # exactly one row per result
    assert got == want, f"[seed {SEED}]"  # same keys, accuracies and per-example outcomes
    assert got_partial == want_partial == 0
    assert tmp_files(cut) == []
