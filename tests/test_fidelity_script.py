"""benchmarks/fidelity_cifar10.py: it skips cleanly without its data, its whole pipeline
(unpack, train, evaluate on the class-balanced test order, sensitivity, report + summary) runs in
--smoke mode on a tiny synthetic archive, its results are keyed by that order, and a second run
trains and measures nothing."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fidelity_cifar10.py"


def _run(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBENCH_CACHE": str(tmp_path / "robench-cache")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_skips_without_archive(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--archive", str(tmp_path / "missing.tar.gz"), "--cache", str(tmp_path / "c"),
                 "--workdir", str(tmp_path / "w"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "missing.tar.gz" in lines[0]
    assert not out.exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["dir", "through-a-file"])
def test_bad_publish_target_is_refused_before_any_work(tmp_path, where):
    (tmp_path / "file").write_text("x")
    target = tmp_path if where == "dir" else tmp_path / "file" / "manifest.json"
    proc = _run(["--archive", str(tmp_path / "missing.tar.gz"), "--workdir", str(tmp_path / "w"),
                 "--publish", str(target)], tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "w").exists()
    assert proc.stderr.strip().splitlines() == [f"error: --publish {target} must be a manifest file's path, not a "
                                                "folder or a path through a file"], proc.stderr


def _synthetic_archive(path: Path, classes: int = 4, n_train: int = 10, n_test: int = 5) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    src = path.parent / "src"
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((8, 8, 3)) * 80 + c * 50).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    with tarfile.open(path, "w:gz") as tar:  # the real archive's layout: train/ and test/ at the top
        for top in ("train", "test"):
            tar.add(src / top, arcname=top)


def _stored(workdir: Path) -> dict:
    """Per robench workdir (main, variant-*): its results and partial rows, and every file of its
    trained runs with size and mtime."""
    out = {}
    for db in sorted(workdir.glob("*/results.sqlite")):
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT checkpoint, kind, name, params, examples, data, created FROM results "
                               "ORDER BY id").fetchall()
            partial = con.execute("SELECT COUNT(*) FROM partial").fetchone()[0]
        finally:
            con.close()
        files = {str(f.relative_to(db.parent)): (f.stat().st_size, f.stat().st_mtime_ns)
                 for f in sorted((db.parent / "runs").rglob("*")) if f.is_file()}
        out[db.parent.name] = {"results": rows, "partial": partial, "run files": files}
    return out


def test_smoke_run_writes_report(tmp_path, monkeypatch):
    archive = tmp_path / "tiny.tar.gz"
    _synthetic_archive(archive)
    out = tmp_path / "out"
    args = ["--archive", str(archive), "--cache", str(tmp_path / "unpacked"), "--workdir", str(tmp_path / "w"),
            "--out", str(out), "--smoke", "--n-test", "20", "--n-nattack", "4", "--n-autoattack", "4",
            "--n-large-eps", "8"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "unpacked" / "train" / "class0").is_dir()
    report = (out / "report.md").read_text()
    assert report.startswith("# Fidelity benchmark")
    assert "SMOKE RUN" in report and "CIFAR-10 (JPEG copy)" in report
    assert "Pairwise orderings against the paper" in report
    assert "# robench report" in report  # the generated report follows the header
    assert "rbs-image" in report and "attack-train" in report

    # Every result is keyed by the benchmark's test order: the whole test split in robench's
    # class-balanced shuffle, first n images.
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "robench-cache"))
    from robench.data import balanced_test, load_dataset
    from robench.store import split_digest

    test = balanced_test(load_dataset("folder", tmp_path / "unpacked"))
    digest = split_digest(test.x_test, test.y_test)
    first = _stored(tmp_path / "w")
    assert set(first) == {"main", "variant-rbs-image", "variant-attack-train"}
    main = first["main"]["results"]
    assert {r[5] for wd in first.values() for r in wd["results"]} == {digest}
    sens = [r for r in main if r[1] == "sensitivity"]
    assert len(sens) == 5 * 4 and {r[4] for r in sens} == {"0:20"}  # run_sensitivity, 4 points x 5 defenses
    assert {(r[2], r[4]) for r in main if r[1] == "attack"} == {
        ("clean", "0:20"), ("pgd", "0:20"), ("cw", "0:20"), ("nattack", "0:4"), ("autoattack", "0:4"),
        ("pgd", "0:8")}
    assert all(wd["partial"] == 0 for wd in first.values())
    assert all(wd["run files"] for wd in first.values())
    assert "tasks: 0 of" not in proc.stdout

    # Resuming: a second run trains and measures nothing new (no result row and no checkpoint file
    # is written again), says so, and still writes the report.
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _stored(tmp_path / "w") == first
    summary = [line for line in proc.stdout.splitlines() if "tasks: " in line]
    assert len(summary) == 1 and "tasks: 0 of " in summary[0], proc.stdout[-2000:]
    assert "trained or stored something new" in summary[0]
    assert (out / "report.md").read_text().startswith("# Fidelity benchmark")


def test_smoke_run_with_eval_steps(tmp_path):
    """--eval-steps: each run is trained to step 2, evaluated, resumed to step 4 and evaluated again;
    each stage's weights are recorded, the report has a learning-curve row per pair and step, and a
    second run does nothing new."""
    import json

    archive = tmp_path / "tiny.tar.gz"
    _synthetic_archive(archive)
    out, workdir = tmp_path / "out", tmp_path / "w"
    args = ["--archive", str(archive), "--cache", str(tmp_path / "unpacked"), "--workdir", str(workdir),
            "--out", str(out), "--smoke", "--steps", "4", "--eval-steps", "2", "--n-test", "12",
            "--n-nattack", "2", "--n-autoattack", "2", "--n-large-eps", "4", "--no-variants",
            "--publish", str(tmp_path / "zoo" / "manifest.json")]
    proc = _run(args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    stages = json.loads((workdir / "fidelity_stages.json").read_text())["main"]
    assert set(stages) == {"standard", "pgdat", "trades", "rlfat-p", "rlfat-t"}
    for defense, by_step in stages.items():
        assert set(by_step) == {"2", "4"} and by_step["2"] != by_step["4"], defense
    first = _stored(workdir)
    assert set(first) == {"main"}
    per_sha = {}
    for r in first["main"]["results"]:
        per_sha.setdefault(r[0], set()).add((r[1], r[2], r[3], r[4]))
    for by_step in stages.values():  # every stage evaluated in full
        assert per_sha[by_step["2"]] == per_sha[by_step["4"]]
        assert ("attack", "pgd", "0:12") in {(k, n, e) for k, n, _, e in per_sha[by_step["2"]]}
        assert sum(k == "sensitivity" for k, _, _, _ in per_sha[by_step["2"]]) == 4
    report = (out / "report.md").read_text()
    assert "### Learning curve" in report
    curve = report.split("### Learning curve", 1)[1].split("\n## ", 1)[0]
    for a, b in (("rlfat-p", "pgdat"), ("rlfat-t", "trades"), ("trades", "pgdat")):
        for step in (2, 4):
            line = next(x for x in curve.splitlines() if x.startswith(f"| {a} vs {b} | {step} |"))
            assert "—" not in line, line  # PGD and every sensitivity point found for both stages
    # the orderings table: per step, Table 1's 24 and Table 2's 24 orderings scored (at most; paper
    # ties are not), and every model's clean / PGD accuracy
    for step in (2, 4):
        line = next(x for x in curve.splitlines() if x.startswith(f"| {step} | "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+ of \d+ \(\d+ sig\.\)", cells[1]) and re.fullmatch(r"\d+ of 24 \(\d+ sig\.\)", cells[2])
        assert len(cells) == 3 + 5 and all(re.fullmatch(r"\d+\.\d / \d+\.\d", c) for c in cells[3:]), line

    # --publish: each final checkpoint shipped into the manifest with its results
    from robench import zoo

    entries = {e.name: e for e in zoo.read_manifest(tmp_path / "zoo" / "manifest.json")}
    assert set(entries) == {f"{d}-smoke" for d in stages}
    for defense, by_step in stages.items():
        e = entries[f"{defense}-smoke"]
        assert e.shipped and e.sha256 == by_step["4"] and e.dataset == "folder" and e.config["steps"] == 4
        assert zoo.verify(e) == "ok"
        assert {"clean", "pgd", "cw"} <= set(e.results) and e.results["pgd"]["n"] == 12
        # smoke mode's shortened N-attack and AutoAttack are not at the default parameters: not published
        assert not {"nattack", "autoattack"} & set(e.results)
        assert "fidelity_cifar10.py" in e.notes

    proc = _run(args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _stored(workdir) == first
    assert json.loads((workdir / "fidelity_stages.json").read_text())["main"] == stages
    summary = [line for line in proc.stdout.splitlines() if "tasks: " in line]
    assert len(summary) == 1 and "tasks: 0 of " in summary[0], proc.stdout[-2000:]
    assert "### Learning curve" in (out / "report.md").read_text()


def test_test_order_is_class_balanced():
    """The benchmark's test order (robench.data.balanced_order): every prefix of 10m indices holds
    m of each class, fixed per seed."""
    from robench.data import balanced_order

    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 7))
    order = balanced_order(y, 0)
    assert sorted(order.tolist()) == list(range(len(y)))
    for m in range(1, 8):
        assert np.bincount(y[order[:10 * m]], minlength=10).tolist() == [m] * 10
    assert np.array_equal(order, balanced_order(y, 0)) and not np.array_equal(order, balanced_order(y, 1))
