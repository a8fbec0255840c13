"""torchrun with 2 CPU processes (gloo): one checkpoint, one RBS draw per global batch, and
sharded evaluation under every attack equal to a single-process evaluation example by example,
at another batch size."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from robench.store import Store

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

    # Every attack, sharded over 2 ranks at batch size 7, against one process at batch size 64.
    shutil.copytree(multi / "runs", single / "runs")
    eval_args = ["eval", "--defense", "pgdat", "--attacks", "pgd,cw,nattack,autoattack", "--n-examples", "40",
                 "-o", "nattack.population=20", "-o", "nattack.iterations=20", "-o", "nattack.check_every=5",
                 "-o", "autoattack.version=custom", "-o", "autoattack.attacks=apgd-ce", "-o", "autoattack.group=16",
                 "--no-progress"]
    out = run([*TORCHRUN, "-m", "robench", *eval_args, "--batch-size", "7", "--workdir", str(multi)], tmp_path)
    assert out.stdout.count("checkpoint pgdat: run") == 1  # only rank 0 prints
    run([sys.executable, "-m", "robench", *eval_args, "--batch-size", "64", "--workdir", str(single)], tmp_path)

    def outcomes(workdir):
        with Store.in_workdir(workdir) as store:
            return {r.key: r.outcomes for r in store.rows()}

    a, b = outcomes(multi), outcomes(single)
    assert a.keys() == b.keys()
    assert {k.name for k in a} == {"clean", "pgd", "cw", "nattack", "autoattack"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key.name)


# Runs `robench train` with robench.defense.rbs wrapped to record, per step, the shuffle it
# applies (shown on an image whose pixels are numbered), into draws-RANK.pt.
RECORD_RBS = """
import os, sys
import torch
import robench.defense as defense_mod

real, draws = defense_mod.rbs, []

def recording(x, *args, generator=None, **kwargs):
    probe = torch.arange(x.shape[-2] * x.shape[-1], dtype=torch.float32).reshape(1, 1, *x.shape[-2:])
    twin = torch.Generator().set_state(generator.get_state())
    draws.append(real(probe, *args, generator=twin, **kwargs))
    return real(x, *args, generator=generator, **kwargs)

defense_mod.rbs = recording
from robench.cli import cli
try:
    cli(sys.argv[1:], prog_name="robench")
finally:
    torch.save(torch.cat(draws), os.path.join(os.environ["RBS_OUT"], f"draws-{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_torchrun_batch_mode_rbs_is_one_draw_per_global_batch(tmp_path):
    """Two gloo ranks training RLFAT-P apply the same RBS shuffle at every step: one draw per
    global batch, as the official code makes, not one per rank's shard."""
    import torch

    script = tmp_path / "record_rbs.py"
    script.write_text(RECORD_RBS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBENCH_BACKEND": "gloo", "RBS_OUT": str(tmp_path)}
    proc = subprocess.run([*TORCHRUN, str(script), "train", "rlfat-p", "--arch", "tiny-cnn", "--steps", "6",
                           "--attack-steps", "1", "--n-train", "256", "--batch-size", "32", "--no-progress",
                           "--workdir", str(tmp_path / "wd")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "draws-0.pt"), torch.load(tmp_path / "draws-1.pt")
    assert a.shape == (6, 1, 8, 8)  # one RBS call per step
    assert torch.equal(a, b)
    assert len({tuple(d.flatten().tolist()) for d in a}) > 1  # a fresh draw each step
