"""DDP on CPU: 2 processes (torchrun, gloo) against 1 process on the same total work.

Training: the same global batch and step count, so the two runs do the same arithmetic; the
ratio is t(1 process) / t(2 processes). Evaluation: PGD on the same checkpoint, sharded across
2 ranks vs one process; the per-example outcomes must be identical.

    .venv/bin/python benchmarks/ddp_cpu.py     # writes benchmarks/results/ddp_cpu.md
    .venv/bin/python benchmarks/ddp_cpu.py --quick --out /tmp/d.md   # seconds; checks it runs

On 2 cores the best case is 2x, and small models are dominated by per-step communication and
Python overhead, so expect far less; the number is recorded as measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import QUICK_NOTE, add_out_args, out_path, parse_args

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ddp_cpu.md"
# --quick: a tiny model, a few steps and examples (the four runs are mostly process start-up).
QUICK = dict(arch="tiny-cnn", steps=4, batch_size=16, n=40, attack_steps=2, eval_batch=20)


def timed(args: list[str], cwd: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ROBENCH_BACKEND": "gloo"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return time.perf_counter() - t0


def outcomes(workdir: Path) -> dict[str, np.ndarray]:
    from robench.store import Store

    with Store.in_workdir(workdir) as store:
        return {r.key.name: r.outcomes for r in store.rows()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small-cnn")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n", type=int, default=360)
    p.add_argument("--attack-steps", type=int, default=0,
                   help="PGD steps in training and evaluation (0: the dataset's default)")
    p.add_argument("--eval-batch", type=int, default=40)
    add_out_args(p, OUT)
    args = parse_args(p, argv, QUICK)
    out = out_path(args, OUT)
    train_steps = ["--attack-steps", str(args.attack_steps)] if args.attack_steps else []
    eval_steps = ["-o", f"pgd.attack_steps={args.attack_steps}"] if args.attack_steps else []
    py = [sys.executable, "-m"]
    torchrun = [*py, "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    train = ["robench", "train", "pgdat", "--arch", args.arch, "--steps", str(args.steps), "--batch-size",
             str(args.batch_size), "--no-progress", "--checkpoint-every", str(args.steps), *train_steps]
    evaluate = ["robench", "eval", "--defense", "pgdat", "--attacks", "pgd", "--n-examples", str(args.n),
                "--batch-size", str(args.eval_batch), "--no-progress", *eval_steps]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1 process gets both cores' worth of threads; 2 processes get one thread each.
        t1 = timed([*py, *train, "--workdir", str(tmp / "one")], tmp, threads=2)
        t2 = timed([*torchrun, *train, "--workdir", str(tmp / "two")], tmp, threads=1)
        shutil.copytree(tmp / "one" / "runs", tmp / "e1" / "runs")
        shutil.copytree(tmp / "one" / "runs", tmp / "e2" / "runs")
        e1 = timed([*py, *evaluate, "--workdir", str(tmp / "e1")], tmp, threads=2)
        e2 = timed([*torchrun, *evaluate, "--workdir", str(tmp / "e2")], tmp, threads=1)
        a, b = outcomes(tmp / "e1"), outcomes(tmp / "e2")
        same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    lines = [
        "# DDP on CPU: 2 processes (gloo) vs 1 process, same total work",
        "",
        *([QUICK_NOTE, ""] if args.quick else []),
        f"- command: `.venv/bin/python benchmarks/ddp_cpu.py --arch {args.arch} --steps {args.steps} "
        f"--batch-size {args.batch_size} --n {args.n}"
        + (f" --attack-steps {args.attack_steps}" if args.attack_steps else "")
        + (f" --eval-batch {args.eval_batch}" if args.eval_batch != 40 else "") + "`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        f"- load average before the run: {os.getloadavg()[0]:.2f}",
        "",
        "| work | 1 process (s) | 2 processes (s) | speed-up t1/t2 |",
        "|---|---:|---:|---:|",
        f"| train pgdat, {args.arch}, {args.steps} steps of global batch {args.batch_size} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f} |",
        f"| eval clean + PGD-{args.attack_steps or 10}, first {args.n} digits test images | {e1:.1f} | {e2:.1f} | {e1 / e2:.2f} |",
        "",
        f"Per-example outcomes of the sharded evaluation identical to the single process: **{same}**.",
        "",
        "Times include process start-up (importing torch, joining the gloo group, loading data), which "
        "is a large share of these short runs. Two cores leave little to gain: each rank's step is "
        "small, and gloo's all-reduce of the gradients is paid every step.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    if not same:
        sys.exit("sharded evaluation differs from the single-process one")


if __name__ == "__main__":
    main()
