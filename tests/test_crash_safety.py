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
        rows = con.execute("SELECT checkpoint, dataset, split, examples, data, kind, name, params, n, value, outcomes "
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
    assert [r[6] for r in rows] == ["clean"] and 0 < partial < 10  # the PGD result is not finished
    invoke([*EVAL, "--workdir", cut])

    got, got_partial = results(db)
    want, want_partial = results(clean / "results.sqlite")
    assert [r[6] for r in got] == ["clean", "pgd"]  # exactly one row per result
    assert got == want, f"[seed {SEED}]"  # same keys, accuracies and per-example outcomes
    assert got_partial == want_partial == 0
    assert tmp_files(cut) == []
