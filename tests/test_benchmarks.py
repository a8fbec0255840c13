"""The benchmark scripts keep working: each runs end to end in its ``--quick`` mode (tiny sizes,
seconds) and writes its table, and ``benchmarks/run_all.py`` lists every one of them.

fidelity_cifar10.py (a wrapper of experiments/fidelity-cifar10.toml) has its own test in tests/test_experiment.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NOT_BENCHMARKS = {"common.py", "run_all.py"}
OWN_TEST = {"fidelity_cifar10.py"}  # tests/test_experiment.py
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in NOT_BENCHMARKS | OWN_TEST)

# Lines each quick run's results file must contain: its tables and ratios.
EXPECTED = {
    "train_step.py": ["# Training-step cost", "| defense | median step", "| rlfat-p / pgdat | **",
                      "| rlfat-t / trades | **", "| rbsat-p / pgdat | **", "| rbsat-t / trades | **",
                      "Components (median CPU ms per call)"],
    "pgd_speed.py": ["# PGD speed and fidelity", "| (i) robench / floor | **",
                     "| (ii) torchattacks time / robench time", "## (iii) robust accuracy",
                     "## (v) per-step overhead", "| robench, 2t(1) - t(2) (us)",
                     "Net, robench's non-arithmetic work", "## (iv) torch.set_num_threads(1) vs 2"],
    "nattack_batching.py": ["# N-attack batching benchmark", "| (a) batched `NAttack`",
                            "| (b) per-image loop", "- loop / batched time: **",
                            "- batched / bare forward: **",
                            "Same images broken by (a) and (b): True"],
    "autoattack_crosscheck.py": ["# AutoAttack: reference (pyautoattack) vs torchattacks",
                                 "| reference (pyautoattack", "| torchattacks 3.5.1 `AutoAttack` standard |",
                                 "(`--matched`)", "## Conclusion"],
    "cpu_runtime.py": ["# CPU runtime: float32 vs channels_last vs bf16", "| tiny-cnn | 64 | 1 |",
                       "| wrn-10-1 | 32 | 2 |", "Fastest variant per architecture"],
    "ddp_cpu.py": ["# DDP on CPU", "| train pgdat, tiny-cnn", "| eval clean + PGD-2",
                   "identical to the single process: **True**"],
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_lists_every_benchmark():
    listed = _load("run_all.py").BENCHMARKS
    assert len(listed) == len(set(listed))
    assert sorted(listed) == SCRIPTS, "add the new benchmark to BENCHMARKS in benchmarks/run_all.py"
    assert sorted(EXPECTED) == SCRIPTS, "give the new benchmark a --quick mode and its lines in EXPECTED"


def test_quick_never_writes_the_committed_results(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    common = _load("common.py")
    p = common.argparse.ArgumentParser()
    common.add_out_args(p, common.RESULTS_DIR / "x.md")
    default = common.RESULTS_DIR / "x.md"
    assert common.out_path(p.parse_args([]), default) == default
    tmp = common.out_path(p.parse_args(["--quick"]), default)
    assert tmp.name == "x.md" and common.RESULTS_DIR not in tmp.resolve().parents and tmp.parent.is_dir()
    tmp.parent.rmdir()
    for out in (default, common.RESULTS_DIR / "sub" / "y.md"):
        with pytest.raises(SystemExit, match="--quick does not write"):
            common.out_path(p.parse_args(["--quick", "--out", str(out)]), default)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script, tmp_path):
    out = tmp_path / "out" / f"{Path(script).stem}.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "QUICK RUN" in text
    missing = [line for line in EXPECTED[script] if line not in text]
    assert not missing, f"{script} --quick wrote no {missing}:\n{text}"
