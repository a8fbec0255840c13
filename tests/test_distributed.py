"""torchrun with 2 CPU processes (gloo): one checkpoint, and sharded evaluation equal to a
single-process evaluation example by example."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from robench.results import Store

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TINY = ["--arch", "tiny-cnn", "--steps", "20", "--attack-steps", "2", "--log-every", "10", "--checkpoint-every", "10"]


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBENCH_BACKEND": "gloo"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_train_and_sharded_eval(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    run([*TORCHRUN, "-m", "robench", "train", "pgdat", *TINY, "--workdir", str(multi), "--no-progress"], tmp_path)
    runs = list((multi / "runs").iterdir())
    assert len(runs) == 1
    assert len(list(runs[0].glob("weights-*.safetensors"))) == 1
    log = (runs[0] / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log] == ["step", "10", "20"]  # one writer, no duplicates

    shutil.copytree(multi / "runs", single / "runs")
    eval_args = ["eval", "--defense", "pgdat", "--attacks", "pgd", "--n-examples", "200", "--batch-size", "32", "--no-progress"]
    out = run([*TORCHRUN, "-m", "robench", *eval_args, "--workdir", str(multi)], tmp_path)
    assert out.stdout.count("pgdat") == 1  # only rank 0 prints
    run([sys.executable, "-m", "robench", *eval_args, "--workdir", str(single)], tmp_path)

    def outcomes(workdir):
        with Store.in_workdir(workdir) as store:
            return {r.key.name: r.outcomes for r in store.rows()}

    a, b = outcomes(multi), outcomes(single)
    assert a.keys() == b.keys() == {"clean", "pgd"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
