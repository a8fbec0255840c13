"""benchmarks/fidelity_cifar10.py: it skips cleanly without its data, and its whole pipeline
(unpack, train, evaluate on the shuffled subset, sensitivity, report + summary) runs in --smoke
mode on a tiny synthetic archive."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

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


def test_smoke_run_writes_report(tmp_path):
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
    # Resuming: a second run trains and attacks nothing new, and still writes the report.
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "report.md").read_text().startswith("# Fidelity benchmark")
