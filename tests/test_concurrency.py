"""Concurrency: several ``python -m robench eval`` processes share one workdir, with overlapping
work; every result is stored exactly once, equal to a one-process run's, and the database is intact."""

import json
import shutil
import sqlite3

from click.testing import CliRunner

from robench.cli import cli

EVAL = ["eval", "--defense", "pgdat", "--n", "64", "--batch-size", "16", "--no-progress", "--device", "cpu"]
JOBS = [["--attacks", "pgd,cw"], ["--attacks", "pgd,cw"], ["--attacks", "cw", "--seed", "1"],
        ["--attacks", "cw", "--seed", "2"]]


def invoke(args):
    r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)


def stored(db):
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT checkpoint, name, params, examples, data, value, outcomes FROM results "
                           "ORDER BY name, params").fetchall()
        partial = con.execute("SELECT count(*) FROM partial").fetchone()[0]
    finally:
        con.close()
    return rows, partial


def test_concurrent_evaluations_share_one_workdir(zygote, tmp_path):
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    invoke(["train", "pgdat", "--arch", "tiny-cnn", "--steps", "20", "--attack-steps", "2", "--no-progress",
            "--device", "cpu", "--workdir", alone])
    shutil.copytree(alone / "runs", shared / "runs")
    children = [zygote.run([*EVAL, *job, "--workdir", shared], tmp_path) for job in JOBS]  # all at once
    for child in children:
        assert zygote.wait(child) == 0, child.output()
        assert "Traceback" not in child.output()

    # The same work, one command after another, in a workdir of its own.
    for job in JOBS[1:]:
        invoke([*EVAL, *job, "--workdir", alone])
    rows, partial = stored(shared / "results.sqlite")
    want, want_partial = stored(alone / "results.sqlite")
    keys = [(name, json.loads(params).get("seed")) for _, name, params, *_ in rows]
    # clean accuracy has no seed: one row whatever --seed the three commands were given
    assert keys == [("clean", None), ("cw", 0), ("cw", 1), ("cw", 2), ("pgd", 0)]
    assert rows == want  # every result exactly once, with the outcomes of an undisturbed run
    assert partial == want_partial == 0
