"""``robench experiment``: the shipped files parse; the digits example runs end to end, a second run
does nothing, and a run killed with SIGKILL and started again ends with the same report tables
and stage weights as one never interrupted; bad files are one line; the GPU and fidelity files
run at smoke scale on a tiny synthetic archive; the fidelity benchmark is a thin wrapper."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from robench.errors import UserError
from robench.experiment import load_experiment, run_experiment
from robench.experiment.runner import execute

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

TINY = """
name = "tiny"
[data]
dataset = "digits"
n_train = 256
n_val = 100
[model]
arch = "tiny-cnn"
[train]
epochs = 6
eval_at = [2, 4]
batch_size = 64
flip = false
options = { attack_steps = 3 }
[defenses]
standard = {}
pgdat = {}
rlfat-t = {}
[attacks.clean]
n = 120
train_n = 100
[attacks.pgd]
n = 120
train_n = 100
[attacks.cw]
n = 120
at = "final+best"
[sensitivity]
n = 60
at = "final"
[report]
pairs = [["rlfat-t", "pgdat"]]
"""


def _tables(report: Path) -> list[str]:
    """The report's lines that hold results: everything but timings, paths, the host, the date and
    the weights' sha256 (a weights file records when it was saved, so its hash differs between
    two runs that compute the same tensors; ``_stages`` compares the tensors)."""
    skip = ("- File:", "- Ran on:", "- Wall time", "_Written")
    return [line for line in report.read_text().splitlines() if not line.startswith(skip) and "`" not in line]


def _stages(root: Path) -> dict[tuple, tuple[str, dict]]:
    """weights sha256 -> (workdir, label, step) and the stage's tensors, for every stage copy."""
    import json

    from safetensors.torch import load_file

    out = {}
    for meta in sorted(root.glob("stages/*/*/*/checkpoint.json")):
        record = json.loads(meta.read_text())
        weights = record["files"]["weights"]
        out[weights["sha256"]] = (meta.parts[-4:-1], load_file(str(meta.parent / weights["name"])))
    return out


def _rows(root: Path) -> list[tuple]:
    """Every stored outcome, its checkpoint named by stage (workdir, label, step)."""
    stages = _stages(root)
    out = []
    for db in sorted(root.glob("*/results.sqlite")):
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT checkpoint, split, examples, kind, name, params, outcomes "
                               "FROM results").fetchall()
        finally:
            con.close()
        out += [(stages[r[0]][0], *r[1:]) for r in rows]
    return sorted(out)


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = ({where: tensors for where, tensors in _stages(root).values()} for root in (a, b))
    return sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(bool((sa[k][t] == sb[k][t]).all()) for t in sa[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.toml")))
def test_shipped_files_parse(name):
    exp = load_experiment(EXPERIMENTS / f"{name}.toml")
    assert exp.stages[-1] == exp.steps and list(exp.stages) == sorted(set(exp.stages))


def test_digits_example_end_to_end_then_nothing_to_do(tmp_path):
    exp = load_experiment(EXPERIMENTS / "digits-quick.toml")
    out = tmp_path / "out"
    report = run_experiment(exp, tmp_path / "w", out, progress=False)
    text = report.read_text()
    for section in ("## Test accuracy at the final stage", "## Robust generalization gap (PGD)",
                    "## Robust overfitting", "## The file's pairs", "## Loss sensitivity at the final stage", "## Stage records"):
        assert section in text
    assert (out / "gap.png").stat().st_size > 1000 and (out / "engine" / "report.md").is_file()
    # A trained defense beats the undefended one under attack: PGDAT's final PGD accuracy exceeds
    # standard's by more than the paired Newcombe interval's half-width (a 5% false-alarm bound).
    final = text.split("## Test accuracy at the final stage")[1].split("\n## ")[0]
    pairs = re.findall(r"^\| (standard|pgdat) \| 12 \(96\) \| [^|]+ \| ([\d.]+) \[([\d.]+)–([\d.]+)\]", final, re.M)
    acc = {d: (float(v), float(lo), float(hi)) for d, v, lo, hi in pairs}
    assert acc["pgdat"][1] > acc["standard"][2], acc  # disjoint 95% Wilson intervals
    before = _rows(tmp_path / "w")
    fresh, total = execute(exp, tmp_path / "w", progress=False)
    assert fresh == 0 and total > 0 and _rows(tmp_path / "w") == before


def test_killed_run_resumes_to_the_same_report(tmp_path):
    """SIGKILL of the whole process group while it trains and evaluates (two workers), then a
    restart: the stored outcomes, the stage weights and the report's tables equal those of an
    uninterrupted run (one worker, in this process)."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    exp = load_experiment(spec)
    clean = run_experiment(exp, tmp_path / "a", tmp_path / "out-a", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "robench", "experiment", str(spec), "--workdir", str(tmp_path / "b"),
           "--out", str(tmp_path / "out-b"), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    log = tmp_path / "b" / "progress.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines())
    assert done < 40  # killed part-way (the run has 3 chains x 3 stages and their evaluations)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _same_weights(tmp_path / "b", tmp_path / "a")  # deterministic on one machine, by construction
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    assert _tables(tmp_path / "out-b" / "report.md") == _tables(clean)


BAD = [
    ("name = 1", "top", "name must be str"),
    ("[data]\ndataset = 'digits'\nfoo = 1", "data", "foo is not a known field"),
    ("[train]\nsteps = 10\nepochs = 2", "train", "give exactly one"),
    ("[train]\nsteps = 10\neval_at = [20]", "train", "eval_at values must lie in 1..10"),
    ("[train]\nsteps = 0", "train", "steps must be positive"),
    ("[defenses]\nnope = {}", "defenses", "names no registered defense"),
    ("[attacks.zap]\nn = 5", "attacks", "is no registered attack"),
    ("[attacks.pgd]\nn = 5\nat = 'sometimes'", "attacks.pgd", "at must be one of"),
    ("[attacks.cw]\nn = 5\nat = 'final'\ntrain_n = 5", "attacks.cw", "train_n needs at"),
    ("[report]\npairs = [['pgdat', 'nope']]", "report", "names 'nope'"),
]


@pytest.mark.parametrize("patch,table,message", BAD, ids=[b[2] for b in BAD])
def test_a_bad_file_is_one_line_naming_table_and_field(tmp_path, patch, table, message):
    base = {"top": "", "data": "[data]\ndataset = 'digits'", "model": "[model]\narch = 'tiny-cnn'",
            "train": "[train]\nsteps = 10", "defenses": "[defenses]\npgdat = {}",
            "attacks": "[attacks.pgd]\nn = 5", "report": ""}
    section = patch.split("\n")[0].strip("[]").split(".")[0] if patch.startswith("[") else "top"
    parts = {**base, section: patch} if section != "top" else {**base, "top": patch}
    path = tmp_path / "bad.toml"
    path.write_text("\n".join(parts[k] for k in ("top", "data", "model", "train", "defenses", "attacks", "report")))
    with pytest.raises(UserError) as e:
        load_experiment(path)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and f"[{table}]" in text and message in text


def test_cli_refuses_a_bad_file_and_a_bad_setting_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, expect in ((["missing.toml"], "does not exist"), ([""], "FILE is empty"),
                         ([str(EXPERIMENTS / "digits-quick.toml"), "--set", "train"], "expected SECTION.KEY=VALUE"),
                         ([str(EXPERIMENTS / "digits-quick.toml"), "--set", "train.nope=1"], "nope is not a known")):
        r = subprocess.run([sys.executable, "-m", "robench", "experiment", *args, "--workdir", str(tmp_path / "w")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "w").exists()


def _synthetic_archive(path: Path, classes: int = 10, n_train: int = 12, n_test: int = 6) -> str:
    """A tiny image-folder archive in the CIFAR-10 JPEG copy's layout; returns its sha256."""
    from PIL import Image

    rng = np.random.default_rng(0)
    src = path.parent / "src"
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((8, 8, 3)) * 80 + c * 17).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    with tarfile.open(path, "w:gz") as tar:
        for top in ("train", "test"):
            tar.add(src / top, arcname=top)
    return hashlib.sha256(path.read_bytes()).hexdigest()


SMOKE = {
    # The GPU file at smoke scale on CPU: its defenses, attacks and report, few steps, a tiny model
    # (PreActResNet-18 itself is tested in test_external*.py).
    "paper-gpu": ["model.arch='tiny-cnn'", "train.steps=2", "train.eval_at=[1]", "train.batch_size=4",
                  "run.device='cpu'", "run.workers=1",
                  "run.threads=1", "attacks.clean.n=4", "attacks.pgd.n=4", "attacks.cw.n=4", "attacks.autoattack.n=4",
                  "attacks.autoattack.options={version='custom', attacks=['apgd-ce']}", "sensitivity.n=4"],
    # The fidelity file: its variants, the N-attack and the large-eps PGD check, few steps.
    "fidelity-cifar10": ["train.steps=3", "train.eval_at=[1]", "model.arch='tiny-cnn'", "run.workers=1",
                         "attacks.clean.n=8", "attacks.pgd.n=8", "attacks.cw.n=8", "attacks.autoattack.n=4",
                         "attacks.autoattack.options={version='custom', attacks=['apgd-ce']}",
                         "attacks.nattack.n=2", "attacks.nattack.options={population=10, iterations=5}",
                         'attacks."pgd-eps0.5".n=4', "sensitivity.n=8", "report.salience_samples=2"],
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_shipped_cifar_files_run_at_smoke_scale(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBENCH_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "tiny.tar.gz"
    sha = _synthetic_archive(archive)
    settings = (f"data.archive='{archive}'", f"data.archive_sha256='{sha}'", *SMOKE[name])
    exp = load_experiment(EXPERIMENTS / f"{name}.toml", settings)
    report = run_experiment(exp, tmp_path / "w", tmp_path / "out", progress=False).read_text()
    assert "## Against the paper's orderings" in report and "## The file's pairs" in report
    labels = [d.label for d in exp.defenses]
    assert all(f"| {label} |" in report for label in labels)
    assert all(f"--set {s}" in report for s in SMOKE[name])  # the overrides are on record


def test_fidelity_benchmark_is_a_thin_wrapper(tmp_path):
    """benchmarks/fidelity_cifar10.py runs experiments/fidelity-cifar10.toml, passing its arguments on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBENCH_CACHE": str(tmp_path / "cache")}
    archive = tmp_path / "tiny.tar.gz"
    sha = _synthetic_archive(archive, classes=10, n_train=4, n_test=2)
    args = ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--no-progress",
            "--set", f"data.archive='{archive}'", "--set", f"data.archive_sha256='{sha}'",
            *(a for s in SMOKE["fidelity-cifar10"] for a in ("--set", s)), "--set", "report.salience_samples=0",
            "--set", "attacks.nattack.n=1", "--set", "attacks.autoattack.n=2"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity_cifar10.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# Experiment: fidelity-cifar10" in (tmp_path / "out" / "report.md").read_text()


def test_test_order_is_class_balanced():
    """The test order of the CIFAR experiments (robench.data.balanced_order): every prefix of 10m
    indices holds m of each class, fixed per seed."""
    from robench.data import balanced_order

    y = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 7))
    order = balanced_order(y, 0)
    assert sorted(order.tolist()) == list(range(len(y)))
    for m in range(1, 8):
        assert np.bincount(y[order[:10 * m]], minlength=10).tolist() == [m] * 10
    assert np.array_equal(order, balanced_order(y, 0)) and not np.array_equal(order, balanced_order(y, 1))
