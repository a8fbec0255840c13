"""PGD speed and fidelity: robench's PGD against its arithmetic floor and against torchattacks,
plus the effect of ``torch.set_num_threads`` on these small models.

Run from the repository root (about 4 minutes on 2 CPU cores shared with other jobs, load ~5,
plus an estimated half minute for part v's extrapolated fixed cost; part iv's 2-thread runs
dominate when the machine is busy, ``--skip threads`` drops them):

    .venv/bin/python benchmarks/pgd_speed.py       # writes benchmarks/results/pgd_speed.md
    .venv/bin/python benchmarks/pgd_speed.py --quick --out /tmp/p.md   # seconds; checks it runs

(i)   ``ATTACKS["pgd"].perturb`` (PGD-10, random start) over the "arithmetic floor": 10 x (one
      eval-mode forward + cross-entropy + ``torch.autograd.grad`` to the input) of the same batch.
      Target <= 1.05.
(ii)  torchattacks' ``PGD(model, eps, alpha, steps, random_start=True)`` time over ours (our
      throughput relative to torchattacks). Target >= 1.0.
(iii) Robust accuracy of both on the same trained model and data (digits test set, several eps,
      averaged over random starts). They should agree within about 1 point.
(iv)  ``torch.set_num_threads(1)`` vs 2: PGD on both models and one PGDAT training step of the
      embedded default (robench.config's digits arch and batch).
(v)   What robench's PGD spends besides the arithmetic: the per-step projection and sign step,
      timed alone, against a fused alternative; and the fixed cost per call (everything but the
      steps: mode switches, per-example generators, bounds, random start, copies).

The fixed cost is extrapolated from whole calls: t(0) = 2 t(1) - t(2), with t(k) the time of a
``perturb`` with k steps, per repetition. ``ATTACKS["pgd"]`` refuses 0 steps, and timing the
engine (``robench.threat.pgd`` with 0 steps) alone would leave out what ``perturb`` does around it,
so the extrapolation is the measure of the attack users run; it is the difference of two timings
of one and two full steps, hence noisier than a direct timing (its quartiles are reported). Two
direct 0-step timings sit beside it as checks: torchattacks' PGD with ``steps=0`` (its
extrapolated value should agree with it within the noise) and robench's engine alone.

Models: a small-cnn trained briefly on scikit-learn digits (1x8x8, batch 256) and an untrained
Madry WRN on uniform random 3x32x32 images (batch 128; timing only). Timings are interleaved
(ABC, BCA, CAB, ...: the order rotates every repetition) and every ratio is the median of
per-repetition ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from robench.attack import check_adversarial
from robench.config import DATASET_DEFAULTS
from robench.data import load_dataset
from robench.models import build_model, count_params
from robench.threat import cross_entropy_objective, pgd
from robench.registry import ATTACKS, DEFENSES

from common import QUICK_NOTE, add_out_args, cpu_model, interleaved, load, out_path, parse_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pgd_speed.md"
FLOOR_TARGET = 1.05
TA_TARGET = 1.0
# --quick: every part on tiny sizes (seconds); the numbers mean nothing.
QUICK = dict(digits_batch=16, wrn_batch=4, train_steps=5, reps=2, wrn_reps=2, acc_eps="0.05",
             acc_seeds=1, acc_n=32, thread_reps=1, thread_wrn_batch=2, overhead_iters=5,
             overhead_reps=2, fixed_inner=2, wrn_fixed_inner=1)


def machine_info() -> dict[str, str]:
    cpu = cpu_model()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "torch threads (parts i, ii, iii, v)": str(torch.get_num_threads()),
        "torch interop threads": str(torch.get_num_interop_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "(unset)"),
    }


def med_ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """Median and quartiles (min / max below 4 reps) of the per-repetition ratios a / b."""
    r = [x / y for x, y in zip(times[a], times[b])]
    if len(r) < 4:
        return statistics.median(r), min(r), max(r)
    q1, _, q3 = statistics.quantiles(r, n=4)
    return statistics.median(r), q1, q3


# --------------------------------------------------------------------------- models


def train_digits(steps: int, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    splits = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("small-cnn", 1, splits.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(splits.x_train), (batch,), generator=g)
        loss = F.cross_entropy(model(splits.x_train[idx]), splits.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    return model, splits.x_test, splits.y_test, acc


# --------------------------------------------------------------------------- parts


def variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, k: int):
    ours = ATTACKS["pgd"](eps=eps, step_size=step, attack_steps=k)
    theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=k, random_start=True)
    xr = x.clone().requires_grad_(True)

    def floor():
        for _ in range(k):
            loss = F.cross_entropy(model(xr), y, reduction="none").sum()
            torch.autograd.grad(loss, [xr])

    return {"floor": floor, "robench": lambda: ours(model, x, y), "torchattacks": lambda: theirs(x, y)}


def speed(label: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
          k: int, reps: int, inner: int = 1) -> dict:
    model.eval()
    fns = variants(model, x, y, eps, step, k)
    before = load()
    interleaved(fns, 1)  # warm-up
    t0 = time.perf_counter()
    times, wall_times = interleaved(fns, reps, inner)
    return {"label": label, "times": times, "wall_times": wall_times, "wall": time.perf_counter() - t0, "load": (before, load()),
            "batch": len(x), "eps": eps, "step": step, "k": k, "inner": inner}


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float], k: int,
                    seeds: int, batch: int) -> list[dict]:
    model.eval()
    rows = []
    for eps in eps_list:
        step = eps / 4  # the paper's step / eps ratio
        theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=k, random_start=True)
        accs: dict[str, list[float]] = {"robench": [], "torchattacks": []}
        for s in range(seeds):
            # Seeded like torchattacks' global RNG below; robench draws each example's start
            # from its own generator derived from (seed, example index).
            ours = ATTACKS["pgd"](eps=eps, step_size=step, attack_steps=k, seed=1000 + s)
            for name, attack in (("robench", lambda a, b: ours(model, a, b)), ("torchattacks", theirs)):
                torch.manual_seed(1000 + s)
                correct = 0
                for i in range(0, len(x), batch):
                    xb, yb = x[i:i + batch], y[i:i + batch]
                    xa = attack(xb, yb)
                    check_adversarial(xa, xb, eps, name)
                    with torch.no_grad():
                        correct += int((model(xa).argmax(1) == yb).sum())
                accs[name].append(100.0 * correct / len(x))
        rows.append({"eps": eps, "step": step, **accs})
    return rows


def threads_effect(fns: dict[str, Callable[[], object]], reps: int, inner: int) -> dict[str, tuple]:
    out = {}
    for name, fn in fns.items():
        pair = {"1 thread": fn, "2 threads": fn}
        setup = {"1 thread": lambda: torch.set_num_threads(1), "2 threads": lambda: torch.set_num_threads(2)}
        interleaved(pair, 1, 1, setup)
        before = load()
        # Wall time: with 2 threads, CPU time would also count the OpenMP workers' spinning.
        _, times = interleaved(pair, reps, inner, setup)
        out[name] = (times, before, load())
    return out


def overhead(x: torch.Tensor, eps: float, step: float, iters: int, reps: int) -> dict[str, list[float]]:
    """Per PGD step, the non-arithmetic work (the update between two gradients), in three forms,
    written out here so the comparison does not depend on robench's current code."""
    grad = torch.randn_like(x)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(lo, hi)
    buf = x_adv.clone()

    def unfused():  # x_adv + step * sign(grad), then project: min/max to the ball, clamp to [0, 1]
        for _ in range(iters):
            torch.minimum(torch.maximum(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp_(0, 1)

    def fused():  # robench.threat's update: bounds computed once per attack, in-place add + clamp
        for _ in range(iters):
            buf.add_(grad.sign(), alpha=step).clamp_(lo, hi)

    def torchattacks_step():  # torchattacks 3.5.1 PGD.forward, the update lines
        for _ in range(iters):
            adv = x_adv.detach() + step * grad.sign()
            delta = torch.clamp(adv - x, min=-eps, max=eps)
            torch.clamp(x + delta, min=0, max=1).detach()

    return interleaved({"unfused": unfused, "torchattacks": torchattacks_step, "fused": fused}, reps)[0]


def fixed_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, reps: int,
               inner: int) -> dict[str, list[float]]:
    """Per call, everything but the steps, per repetition (CPU seconds): ``robench`` and
    ``torchattacks`` extrapolated as 2 t(1) - t(2) from whole calls (see the module docstring),
    ``torchattacks 0 steps`` and ``engine 0 steps`` (``robench.threat.pgd`` alone) timed directly."""
    step = eps / 4
    fns: dict[str, Callable[[], object]] = {}
    for k in (1, 2):
        ours = ATTACKS["pgd"](eps=eps, step_size=step, attack_steps=k)
        theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=k, random_start=True)
        fns[f"robench {k}"] = lambda ours=ours: ours(model, x, y)
        fns[f"torchattacks {k}"] = lambda theirs=theirs: theirs(x, y)
    theirs0 = torchattacks.PGD(model, eps=eps, alpha=step, steps=0, random_start=True)
    fns["torchattacks 0 steps"] = lambda: theirs0(x, y)
    objective = cross_entropy_objective(y)
    fns["engine 0 steps"] = lambda: pgd(model, x, objective, eps, step, 0, "uniform")
    model.eval()
    interleaved(fns, 1)  # warm-up
    t = interleaved(fns, reps, inner)[0]
    return {
        "robench": [2 * a - b for a, b in zip(t["robench 1"], t["robench 2"])],
        "torchattacks": [2 * a - b for a, b in zip(t["torchattacks 1"], t["torchattacks 2"])],
        "torchattacks 0 steps": t["torchattacks 0 steps"],
        "engine 0 steps": t["engine 0 steps"],
    }


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and quartiles (min / max below 4 values)."""
    if len(values) < 4:
        return statistics.median(values), min(values), max(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return statistics.median(values), q1, q3


# --------------------------------------------------------------------------- report


def speed_lines(res: dict) -> list[str]:
    t, tw = res["times"], res["wall_times"]
    med = {n: statistics.median(v) for n, v in t.items()}
    medw = {n: statistics.median(v) for n, v in tw.items()}
    fl = med_ratio(t, "robench", "floor")
    ta = med_ratio(t, "torchattacks", "robench")
    flw = med_ratio(tw, "robench", "floor")
    taw = med_ratio(tw, "torchattacks", "robench")
    return [
        f"#### {res['label']}: batch {res['batch']}, eps {res['eps']}, step {res['step']}, "
        f"{res['k']} steps",
        "",
        f"{len(t['floor'])} repetitions x {res['inner']} interleaved calls of each variant, "
        f"{res['wall']:.0f} s; load average before "
        f"{res['load'][0]}, after {res['load'][1]}.",
        "",
        "| variant | median CPU time (ms) | median wall time (ms) |",
        "|---|---:|---:|",
        *[f"| {n} | {v * 1e3:.1f} | {medw[n] * 1e3:.1f} |" for n, v in med.items()],
        "",
        "| ratio | CPU time, median of per-rep ratios | quartiles | wall time, median (quartiles) | "
        "target | met |",
        "|---|---:|---:|---:|---:|:---:|",
        f"| (i) robench / floor | **{fl[0]:.3f}** | {fl[1]:.3f} / {fl[2]:.3f} | {flw[0]:.3f} "
        f"({flw[1]:.3f} / {flw[2]:.3f}) | <= {FLOOR_TARGET} | "
        f"{'yes' if fl[0] <= FLOOR_TARGET else '**no**'} |",
        f"| (ii) torchattacks time / robench time (our relative throughput) | **{ta[0]:.3f}** | "
        f"{ta[1]:.3f} / {ta[2]:.3f} | {taw[0]:.3f} ({taw[1]:.3f} / {taw[2]:.3f}) | >= {TA_TARGET} | "
        f"{'yes' if ta[0] >= TA_TARGET else '**no**'} |",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits-batch", type=int, default=256)
    p.add_argument("--wrn-batch", type=int, default=128)
    p.add_argument("--wrn", default="wrn-10-1", help="Madry WRN for the 3x32x32 timing")
    p.add_argument("--train-steps", type=int, default=200, help="plain training steps on digits")
    p.add_argument("--reps", type=int, default=18, help="interleaved repetitions, digits timing")
    p.add_argument("--inner", type=int, default=1, help="calls of each variant per rep, digits timing")
    p.add_argument("--wrn-reps", type=int, default=7, help="interleaved repetitions, WRN timing")
    p.add_argument("--acc-eps", default="0.02,0.05,0.1",
                   help="eps values for the accuracy check (digits' default eps is added)")
    p.add_argument("--acc-seeds", type=int, default=3, help="random starts averaged per eps")
    p.add_argument("--thread-reps", type=int, default=2, help="reps of part iv (after a warm-up)")
    p.add_argument("--thread-wrn-batch", type=int, default=32,
                   help="WRN batch for part iv (2 threads can be several times slower under load)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for parts i, ii, iii, v (0: torch default)")
    p.add_argument("--acc-n", type=int, default=0, help="test images for part iii (0: all 360)")
    p.add_argument("--overhead-iters", type=int, default=100,
                   help="update steps per timed call, part v, digits (the WRN gets a fifth)")
    p.add_argument("--overhead-reps", type=int, default=9, help="interleaved repetitions, part v")
    p.add_argument("--fixed-inner", type=int, default=20,
                   help="calls of each variant per rep, part v's fixed cost, digits")
    p.add_argument("--wrn-fixed-inner", type=int, default=3,
                   help="calls of each variant per rep, part v's fixed cost, WRN")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: wrn,threads")
    add_out_args(p, RESULTS)
    args = parse_args(p, argv, QUICK)
    out = out_path(args, RESULTS)
    skip = set(filter(None, args.skip.split(",")))
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    main_threads = torch.get_num_threads()
    info = machine_info()
    info["torch default threads (before set_num_threads)"] = str(default_threads)
    d = DATASET_DEFAULTS["digits"]
    wall0 = time.perf_counter()

    print("training small-cnn on digits ...", flush=True)
    t0 = time.perf_counter()
    model, x_test, y_test, clean = train_digits(args.train_steps, 64, 0)
    x_acc, y_acc = (x_test[:args.acc_n], y_test[:args.acc_n]) if args.acc_n else (x_test, y_test)
    train_s = time.perf_counter() - t0
    xd, yd = x_test[:args.digits_batch], y_test[:args.digits_batch]
    if len(xd) < args.digits_batch:  # the digits test set has 360 images
        reps_needed = -(-args.digits_batch // len(xd))
        xd, yd = xd.repeat(reps_needed, 1, 1, 1)[:args.digits_batch], yd.repeat(reps_needed)[:args.digits_batch]

    print("speed: digits ...", flush=True)
    speeds = [speed(f"small-cnn ({count_params(model):,} parameters), digits 1x8x8", model, xd, yd,
                    d.eps, d.step_size, d.attack_steps, args.reps, args.inner)]
    print("\n".join(speed_lines(speeds[-1])), flush=True)
    wrn = xw = yw = None
    if "wrn" not in skip:
        torch.manual_seed(0)
        wrn = build_model(args.wrn, 3, 10).eval()
        xw, yw = torch.rand(args.wrn_batch, 3, 32, 32), torch.randint(0, 10, (args.wrn_batch,))
        print("speed: wrn ...", flush=True)
        speeds.append(speed(f"{args.wrn} ({count_params(wrn):,} parameters, untrained), uniform "
                            "random 3x32x32", wrn, xw, yw, 0.03, 0.0075, 10, args.wrn_reps))
        print("\n".join(speed_lines(speeds[-1])), flush=True)

    print("robust accuracy ...", flush=True)
    eps_list = sorted({float(e) for e in args.acc_eps.split(",")} | {d.eps})
    acc_before = load()
    accs = robust_accuracy(model, x_acc, y_acc, eps_list, d.attack_steps, args.acc_seeds,
                           args.digits_batch)
    acc_after = load()

    print("overhead ...", flush=True)
    iters = {"digits": args.overhead_iters, "wrn": max(1, args.overhead_iters // 5)}
    over = {"digits": overhead(xd, d.eps, d.step_size, iters["digits"], args.overhead_reps)}
    fixed = {"digits": fixed_cost(model, xd, yd, d.eps, args.overhead_reps, args.fixed_inner)}
    if wrn is not None:
        over["wrn"] = overhead(xw, 0.03, 0.0075, iters["wrn"], args.overhead_reps)
        fixed["wrn"] = fixed_cost(wrn, xw, yw, 0.03, args.overhead_reps, args.wrn_fixed_inner)

    thr = {}
    if "threads" not in skip:
        print("threads ...", flush=True)
        tfns: dict[str, Callable[[], object]] = {}
        vd = variants(model, xd, yd, d.eps, d.step_size, d.attack_steps)
        tfns[f"robench PGD-10, small-cnn, batch {args.digits_batch}"] = vd["robench"]
        torch.manual_seed(0)
        tm = build_model(d.arch, 1, 10).train()
        opt = torch.optim.Adam(tm.parameters(), lr=1e-3)
        pgdat = DEFENSES["pgdat"](d.eps, d.step_size, d.attack_steps)
        xb, yb = x_test[:d.batch_size], y_test[:d.batch_size]
        step_name = f"PGDAT training step, {d.arch}, batch {d.batch_size} (embedded default)"

        def train_step():
            x_adv = pgdat.adversarial(tm, xb, yb)
            loss, _ = pgdat.loss(tm, xb, x_adv, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        tfns[step_name] = train_step
        inner = {n: 1 for n in tfns}
        inner[step_name] = 2
        if wrn is not None:
            nb = args.thread_wrn_batch
            vw = variants(wrn, xw[:nb], yw[:nb], 0.03, 0.0075, 10)
            tfns[f"robench PGD-10, {args.wrn}, batch {nb}"] = vw["robench"]
            inner[f"robench PGD-10, {args.wrn}, batch {nb}"] = 1
        for name, fn in tfns.items():
            thr.update(threads_effect({name: fn}, args.thread_reps, inner[name]))
        torch.set_num_threads(main_threads)

    total = time.perf_counter() - wall0
    cmd = " ".join([".venv/bin/python", "benchmarks/pgd_speed.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# PGD speed and fidelity",
        "",
        *([QUICK_NOTE, ""] if args.quick else []),
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- total run time: {total:.0f} s",
        "- the machine's cores are shared with other jobs. Every ratio is the median of "
        "per-repetition ratios of interleaved runs. Parts i, ii and v use one torch thread and "
        "measure the process's CPU time (`time.process_time`), which counts the work done and not "
        "the time the scheduler gave to other processes; wall-time ratios are shown beside them. "
        "Part iv compares thread counts, so it uses wall time.",
        "",
        "## (i) floor and (ii) torchattacks",
        "",
        f"Floor: {d.attack_steps} x (eval forward + CE + `torch.autograd.grad` to the input) on the "
        "same batch, with no start, sign, projection or clipping. torchattacks: "
        "`torchattacks.PGD(model, eps, alpha, steps, random_start=True)`, called as `atk(x, y)`.",
        "",
    ]
    for res in speeds:
        lines += speed_lines(res)
    lines += [
        "## (iii) robust accuracy, robench vs torchattacks",
        "",
        f"small-cnn trained {args.train_steps} plain Adam steps (batch 64, lr 1e-3, {train_s:.0f} s) on "
        f"digits; {'the whole test set' if len(x_acc) == len(x_test) else 'the start of the test set'} ({len(x_acc)} "
        f"images); clean accuracy (whole test set) **{100 * clean:.1f}%**. "
        f"PGD-{d.attack_steps}, step eps/4, random start; mean over {args.acc_seeds} random starts "
        f"(each seed's value in brackets). Every adversarial batch passed `check_adversarial`. Load "
        f"average before {acc_before}, after {acc_after}. For seed s, torchattacks draws its random "
        "start from the global RNG after `torch.manual_seed(1000 + s)` and robench's attack is "
        "built with `seed=1000 + s`, from which it derives each example's start (robench.seeding): "
        "the two do not start from the same points, so they agree on average over the seeds, not "
        "example by example.",
        "",
        "| eps | robench robust acc % | torchattacks robust acc % | difference (points) | within 1 point |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in accs:
        a, b = statistics.mean(r["robench"]), statistics.mean(r["torchattacks"])
        lines.append(f"| {r['eps']} | {a:.2f} [{', '.join(f'{v:.1f}' for v in r['robench'])}] | "
                     f"{b:.2f} [{', '.join(f'{v:.1f}' for v in r['torchattacks'])}] | {a - b:+.2f} | "
                     f"{'yes' if abs(a - b) <= 1.0 else '**no**'} |")
    lines += [
        "",
        "## (v) per-step overhead besides the arithmetic",
        "",
        "Ours and torchattacks' differ from the floor only in the update between gradient "
        "evaluations and in a fixed per-call cost; both are timed alone here, in a tight loop, "
        "where the noise of the whole-attack timings above does not hide them.",
        "",
        "Unfused: `project(x_adv + step * grad.sign(), x)` as robench had it before (sign, scale, add, x - eps, "
        "x + eps, maximum, minimum, clamp_: 8 kernels, 7 new tensors; robench's update until "
        "the fused form replaced it). torchattacks' update (sign, scale, add, sub, clamp, add, "
        "clamp: 7 kernels). Fused, what `robench.threat.pgd` does now: bounds `lo = (x - eps)"
        ".clamp(0, 1)`, `hi = (x + eps).clamp(0, 1)` computed once per attack, then "
        "`x_adv.add_(grad.sign_(), alpha=step).clamp_(lo, hi)` (2-3 kernels, no new tensor but "
        "the sign; identical result).",
        "",
        "| batch | unfused (CPU us per PGD step) | torchattacks (us) | fused (us) | fused update over "
        "PGD-10, % of the floor | unfused - fused over PGD-10, % of the floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floors = {"digits": statistics.median(speeds[0]["times"]["floor"])}
    if len(speeds) > 1:
        floors["wrn"] = statistics.median(speeds[1]["times"]["floor"])
    for key, t in over.items():
        a = statistics.median(t["unfused"]) / iters[key]
        b = statistics.median(t["fused"]) / iters[key]
        c = statistics.median(t["torchattacks"]) / iters[key]
        shape = "x".join(map(str, (xd if key == "digits" else xw).shape))
        lines.append(f"| {shape} | {a * 1e6:.0f} | {c * 1e6:.0f} | {b * 1e6:.0f} | "
                     f"{100 * 10 * b / floors[key]:.2f}% | {100 * 10 * (a - b) / floors[key]:.2f}% |")
    lines += [
        "",
        "Fixed cost per call (everything but the steps: mode switches, per-example generators, "
        "bounds, random start, copies; CPU time). `ATTACKS[\"pgd\"]` refuses 0 steps, so the "
        "registry attack's fixed cost is extrapolated from whole calls, 2 t(1) - t(2) per "
        f"repetition ({args.overhead_reps} repetitions of {args.fixed_inner} calls per variant on "
        f"digits, {args.wrn_fixed_inner} on the WRN; median, quartiles in brackets), and "
        "torchattacks' the same way. As checks, torchattacks with `steps=0` and robench's engine "
        "alone (`robench.threat.pgd` with 0 steps, without what `perturb` adds around it) are timed "
        "directly.",
        "",
        "| batch | robench, 2t(1) - t(2) (us) | torchattacks, 2t(1) - t(2) (us) | torchattacks, "
        "0 steps (us) | robench engine alone, 0 steps (us) | robench - torchattacks "
        "(extrapolated), % of the floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def us(v: list[float]) -> str:
        m, lo, hi = spread(v)
        return f"{m * 1e6:.0f} [{lo * 1e6:.0f} / {hi * 1e6:.0f}]"

    for key, t in fixed.items():
        a, c = statistics.median(t["robench"]), statistics.median(t["torchattacks"])
        shape = "x".join(map(str, (xd if key == "digits" else xw).shape))
        lines.append(f"| {shape} | {us(t['robench'])} | {us(t['torchattacks'])} | "
                     f"{us(t['torchattacks 0 steps'])} | {us(t['engine 0 steps'])} | "
                     f"{100 * (a - c) / floors[key]:+.3f}% |")
    lines += ["", "Net, robench's non-arithmetic work minus torchattacks' over one PGD-10 call (10 x "
              "update difference + fixed-cost difference), as a share of the floor:"]
    net = {}
    for key in fixed:
        upd = (statistics.median(over[key]["fused"]) - statistics.median(over[key]["torchattacks"])) / iters[key]
        fix = statistics.median(fixed[key]["robench"]) - statistics.median(fixed[key]["torchattacks"])
        net[key] = 100 * (10 * upd + fix) / floors[key]
        lines.append(f"- {key}: {net[key]:+.3f}%")
    worst = max(net, key=lambda k: abs(net[k]))
    if all(abs(v) < 1.0 for v in net.values()):
        lines += ["", "So the two attacks do the same arithmetic and differ by under 1% of the floor "
                  f"in the code around it (at most {net[worst]:+.3f}%, {worst}); the whole-attack "
                  "ratio (ii) above cannot resolve a difference that small on this shared machine "
                  "(see its quartiles), and any reading below 1.0 there is noise."]
    else:
        lines += ["", f"The code around the arithmetic differs by {net[worst]:+.3f}% of the floor "
                  f"({worst}): more than 1%, so ratio (ii) can show it; the fixed-cost row above "
                  "says how much of it is per call."]
    if thr:
        lines += [
            "",
            "## (iv) torch.set_num_threads(1) vs 2",
            "",
            f"torch's default here is {default_threads} threads. Each repetition runs the same call "
            "with 1 thread, then with 2 (order alternating), switching with `torch.set_num_threads` "
            "(untimed) before each call.",
            "",
            "| workload | 1 thread (ms, median) | 2 threads (ms, median) | t(1) / t(2), median of per-rep ratios | range | load before / after |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, (times, before, after) in thr.items():
            r = med_ratio(times, "1 thread", "2 threads")
            lines.append(f"| {name} | {statistics.median(times['1 thread']) * 1e3:.1f} | "
                         f"{statistics.median(times['2 threads']) * 1e3:.1f} | **{r[0]:.2f}** | "
                         f"{r[1]:.2f} / {r[2]:.2f} | {before} / {after} |")
        lines += [
            "",
            "t(1) / t(2) < 1 means one thread is faster. On these small models each kernel is a "
            "few microseconds to a millisecond; with 2 threads every kernel pays an OpenMP "
            "fork/join, and when the other core is busy with another process a thread waits "
            "for a descheduled partner at the barrier. The result depends on the machine's load "
            "at the time (see the load column).",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
