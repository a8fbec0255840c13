"""Cost of one training step of each defense, relative to its baseline (RLFAT-P vs PGDAT,
RLFAT-T vs TRADES), on the same model and batch.

Run from the repository root (about 2.5 minutes on 2 CPU cores shared with other jobs at load
~4; nearer 4 minutes at load ~6):

    .venv/bin/python benchmarks/train_step.py      # writes benchmarks/results/train_step.md
    .venv/bin/python benchmarks/train_step.py --quick --out /tmp/t.md   # seconds; checks it runs

A step is exactly what ``robench.training.train`` does per step: ``defense.adversarial`` (PGD in
eval mode), ``defense.loss`` (model in train mode), ``zero_grad``, ``backward``, Adam ``step``.
Every defense gets its own copy of the same initial model and its own Adam optimiser.

Timing is interleaved to cancel shared-machine noise: in each repetition, every defense runs one
step in turn (ABC, BCA, CAB, ...: the order rotates every repetition), so the steps compared in
one ratio ran seconds apart; the reported ratio is the median of the per-repetition ratios
(``--inner`` > 1 sums several steps per repetition instead).

Theory: with K attack steps and one "unit" = one forward + backward, PGDAT costs K + 1 units and
RLFAT-P K + 2; TRADES costs K + 2 (two forwards in its loss, plus a no-grad clean forward for
the KL start, which RLFAT-T shares) and RLFAT-T K + 3. So the ideal ratios are (K+2)/(K+1) and
(K+3)/(K+2). A unit of the loss (train-mode BN, backward to every parameter) costs more than an
attack unit (eval-mode BN, backward to the input only), so the component timings below also give
a prediction from measured costs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from robench.config import DATASET_DEFAULTS
from robench.defense import kl, transfer
from robench.models import build_model, count_params
from robench.registry import DEFENSES

from common import QUICK_NOTE, add_out_args, cpu_model, interleaved, load, out_path, parse_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_step.md"
NAMES = ("pgdat", "rlfat-p", "rbsat-p", "trades", "rlfat-t", "rbsat-t")
PAIRS = (("rlfat-p", "pgdat"), ("rlfat-t", "trades"), ("rbsat-p", "pgdat"), ("rbsat-t", "trades"))
TARGET = 1.12
EXPLAIN_ABOVE = 1.15
# --quick: both configurations on tiny sizes (seconds); the numbers mean nothing.
QUICK = dict(k=1, batch_a=8, batch_b=2, reps_a=2, reps_b=2, warmup=1, comp_reps=2)


def machine_info() -> dict[str, str]:
    cpu = cpu_model()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "torch interop threads": str(torch.get_num_interop_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "(unset)"),
    }


def theory(name: str, k: int) -> float:
    """Units (forward + backward) per step: the K attack steps plus the loss's forwards."""
    units = {"pgdat": k + 1, "rlfat-p": k + 2, "rbsat-p": k + 1,
             "trades": k + 2, "rlfat-t": k + 3, "rbsat-t": k + 2}
    return units[name]


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run_config(label: str, arch: str, shape: tuple[int, int, int], batch: int, k: int, eps: float,
               step_size: float, reps: int, inner: int, warmup: int, comp_reps: int) -> dict:
    torch.manual_seed(0)
    base = build_model(arch, shape[0], 10)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    steps: dict[str, Callable[[], object]] = {}
    for name in NAMES:
        model = copy.deepcopy(base).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        defense = DEFENSES[name](eps, step_size, k)

        def step(model=model, opt=opt, defense=defense):
            # robench.training.train, one step (CPU: autocast is a no-op).
            x_adv = defense.adversarial(model, x, y)
            loss, logits = defense.loss(model, x, x_adv, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach(), logits.detach()

        steps[name] = step

    # Components, to explain the ratios: the attack alone, one loss unit, and the RLFAT extras.
    comp_model = copy.deepcopy(base)
    pgdat, trades, rlfatp = DEFENSES["pgdat"](eps, step_size, k), DEFENSES["trades"](eps, step_size, k), \
        DEFENSES["rlfat-p"](eps, step_size, k)
    x_adv = pgdat.adversarial(comp_model, x, y)

    def attack_unit():  # one PGD step's arithmetic: eval forward + backward to the input
        comp_model.eval()
        xa = x_adv.clone().requires_grad_(True)
        loss = F.cross_entropy(comp_model(xa), y, reduction="none").sum()
        torch.autograd.grad(loss, [xa])

    def loss_unit():  # one loss forward: train-mode forward + backward to every parameter
        comp_model.train()
        F.cross_entropy(comp_model(x_adv), y).backward()
        comp_model.zero_grad(set_to_none=True)

    z1 = torch.randn(batch, 10, requires_grad=True)
    z2 = torch.randn(batch, 10, requires_grad=True)
    components = {
        "attack unit (eval fwd + grad to input)": attack_unit,
        "loss unit (train fwd + grad to params)": loss_unit,
        "PGD-K, CE (pgdat.adversarial)": lambda: pgdat.adversarial(comp_model, x, y),
        "PGD-K, KL (trades.adversarial)": lambda: trades.adversarial(comp_model, x, y),
        "rbs(x_adv), batch mode": lambda: rlfatp.rbs(x_adv),
        "transfer() fwd+bwd on logits": lambda: torch.autograd.grad(transfer(z1, z2), [z1, z2]),
        "kl() fwd+bwd on logits": lambda: torch.autograd.grad(kl(z1, z2), [z1, z2]),
    }

    load_before = load()
    interleaved(steps, 1, warmup)
    t0 = time.perf_counter()
    times, wall_times = interleaved(steps, reps, inner)
    wall = time.perf_counter() - t0
    interleaved(components, 1, 2)
    comp, _ = interleaved(components, comp_reps, 2)
    comp_med = {n: statistics.median(v) for n, v in comp.items()}
    return {
        "label": label, "arch": arch, "params": count_params(base), "shape": shape, "batch": batch,
        "k": k, "eps": eps, "step_size": step_size, "reps": reps, "inner": inner, "times": times,
        "wall_times": wall_times,
        "comp": comp_med, "wall": wall, "load_before": load_before, "load_after": load(),
    }


def report(res: dict) -> list[str]:
    k, times, comp = res["k"], res["times"], res["comp"]
    med = {n: statistics.median(v) for n, v in times.items()}
    wall_times = res["wall_times"]
    med_wall = {n: statistics.median(v) for n, v in wall_times.items()}
    a = comp["attack unit (eval fwd + grad to input)"]
    u = comp["loss unit (train fwd + grad to params)"]
    lines = [
        f"### ({res['label']}) `{res['arch']}` ({res['params']:,} parameters), input "
        f"{'x'.join(map(str, res['shape']))}, batch {res['batch']}, K = {k}, "
        f"eps {res['eps']}, step {res['step_size']}",
        "",
        f"{res['reps']} repetitions x {res['inner']} interleaved step(s) per defense; "
        f"{res['wall']:.0f} s; load average (1/5/15 min) before {res['load_before']}, "
        f"after {res['load_after']}.",
        "",
        "| defense | median step, CPU time (ms) | median step, wall time (ms) | units (theory) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {med[n] * 1e3:.1f} | {med_wall[n] * 1e3:.1f} | {theory(n, k)} |" for n in NAMES]
    lines += ["", "| ratio | measured, CPU time (median of per-rep ratios) | quartiles of per-rep ratios | "
              "wall-time ratio (median) | theory (units) | predicted from measured components | "
              "target | met |",
              "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for num, den in PAIRS:
        per_rep = [x / y for x, y in zip(times[num], times[den])]
        r = statistics.median(per_rep)
        th = theory(num, k) / theory(den, k)
        # Measured-component prediction: the baseline's median step plus the extra loss unit
        # (and the RBS/transfer extras), over the baseline's step.
        extra = comp["rbs(x_adv), batch mode"]
        if num.startswith("rlfat"):
            extra += u + comp["transfer() fwd+bwd on logits"]
        pred = (med[den] + extra) / med[den]
        target = f"<= {TARGET}" if num.startswith("rlfat") else "-"
        met = ("yes" if r <= TARGET else "**no**") if num.startswith("rlfat") else "-"
        q1, _, q3 = statistics.quantiles(per_rep, n=4)
        lines.append(f"| {num} / {den} | **{r:.3f}** | {q1:.3f} / {q3:.3f} | "
                     f"{ratio(wall_times, num, den):.3f} | {th:.3f} | {pred:.3f} | {target} | {met} |")
    lines += ["", "Components (median CPU ms per call):", "", "| component | ms |", "|---|---:|"]
    lines += [f"| {n} | {v * 1e3:.2f} |" for n, v in comp.items()]
    lines += ["", f"A loss unit costs {u / a:.2f} attack units here (backward to every parameter "
              "and train-mode BatchNorm, against backward to the input only), so the extra forward "
              "of RLFAT costs more than 1/(K+1) of a PGDAT step."]
    gaps = [(num, den) for num, den in PAIRS[:2] if ratio(times, num, den) > EXPLAIN_ABOVE]
    if gaps:
        lines += ["", f"**Gap above {EXPLAIN_ABOVE}:** " + "; ".join(
            f"{n}/{d} = {ratio(times, n, d):.3f}" for n, d in gaps) + ". See the explanation below."]
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="a,b",
                   help="which configurations: a (the embedded digits default), b (CIFAR-shaped WRN)")
    p.add_argument("--k", type=int, default=None,
                   help="attack steps (default: digits' default for a, the paper's 10 for b)")
    p.add_argument("--arch-a", default=None, help="model of (a) (default: digits' default arch)")
    p.add_argument("--batch-a", type=int, default=None, help="batch of (a) (default: digits' default)")
    p.add_argument("--batch-b", type=int, default=32, help="batch of (b) (the paper's 32)")
    p.add_argument("--wrn", default="wrn-10-1", help="the Madry WRN of configuration (b)")
    p.add_argument("--reps-a", type=int, default=40, help="repetitions, config (a)")
    p.add_argument("--reps-b", type=int, default=14, help="repetitions, config (b)")
    p.add_argument("--inner", type=int, default=1, help="interleaved steps per defense per rep")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per defense, config (a)")
    p.add_argument("--comp-reps", type=int, default=0,
                   help="repetitions of the component timings (0: 6 for a, 3 for b)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: torch default); 1 is faster and steadier on a "
                   "shared 2-core machine (benchmarks/pgd_speed.py measures it)")
    add_out_args(p, RESULTS)
    args = parse_args(p, argv, QUICK)
    out = out_path(args, RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    results = []
    for c in args.configs.split(","):
        if c == "a":
            # The embedded default, read from robench.config so it follows any change there.
            d = DATASET_DEFAULTS["digits"]
            results.append(run_config("a", args.arch_a or d.arch, (1, 8, 8), args.batch_a or d.batch_size,
                                      args.k or d.attack_steps, d.eps, d.step_size,
                                      args.reps_a, args.inner, args.warmup, args.comp_reps or 6))
        elif c == "b":
            # CIFAR-shaped, the paper's eps 0.03, step 0.0075, 10 steps, batch 32 (App. A).
            results.append(run_config("b", args.wrn, (3, 32, 32), args.batch_b, args.k or 10, 0.03,
                                      0.0075, args.reps_b, args.inner, 1, args.comp_reps or 3))
        else:
            p.error(f"unknown config {c!r}")
        print("\n".join(report(results[-1])), flush=True)

    cmd = " ".join([".venv/bin/python", "benchmarks/train_step.py",
                    *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Training-step cost: RLFAT vs its baseline",
        "",
        *([QUICK_NOTE, ""] if args.quick else []),
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *[f"- {k}: {v}" for k, v in info.items()],
        "- the machine's cores are shared with other jobs. Every ratio is the median of "
        "per-repetition ratios of interleaved runs, and the primary measure is the process's CPU "
        "time (`time.process_time`): with one torch thread all the arithmetic runs on the calling "
        "thread, so CPU time counts the work done and not the time the scheduler gave to other "
        "processes. Wall-time ratios are shown beside it; they are much noisier under load.",
        "",
        f"Targets: rlfat-p / pgdat <= {TARGET} and rlfat-t / trades <= {TARGET}. Theory with K "
        "attack steps: (K+2)/(K+1) and (K+3)/(K+2) (one extra forward + backward on the RBS batch).",
        "",
    ]
    for res in results:
        lines += report(res)
    lines += EXPLANATION
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


EXPLANATION = [
    "## Where the extra time goes",
    "",
    "- The theoretical ratio counts every forward + backward as one unit. The RLFAT extra is a "
    "*loss* unit: a train-mode forward (BatchNorm computes batch statistics) plus a backward that "
    "computes every weight gradient. The K attack units are eval-mode forwards with a backward to "
    "the input only (no weight gradients). The component table gives the measured cost of each; "
    "the column \"predicted from measured components\" adds one loss unit, one RBS and the "
    "transfer term to the baseline's step. The measured ratio should be read against that column, "
    "not the unit count: a gap between theory and measurement that the prediction reproduces is "
    "arithmetic RLFAT must do, not overhead in robench.",
    "- RBS (about 20 tiny index-building ops + one gather) costs about half a millisecond, and "
    "the transfer / KL terms on (B, 10) logits a few tenths: together about 1% of a step. The "
    "ablation rows isolate this: rbsat-p does PGDAT's work plus one RBS, rbsat-t TRADES' work "
    "plus one RBS, and both ratios sit at 1.00 within the noise. So RLFAT's fixed per-step "
    "overhead in robench (RBS, the extra KL softmax, Python dispatch of the extra loss terms) is "
    "not what separates the measured ratio from the unit count.",
    "- The KL start of TRADES / RLFAT-T (a no-grad clean forward before PGD) is in both numerator "
    "and denominator; it lowers the RLFAT-T / TRADES ratio a little.",
    "- Consequently the 1.12 target sits at the arithmetic limit: with a loss unit costing about "
    "1.4 attack units, (K + 1.4 + adam + 1.4) / (K + 1.4 + adam) is about 1.12-1.13 for K = 10. "
    "Beating it would need less arithmetic, not less overhead: e.g. one forward of the "
    "concatenated [x', RBS(x')] batch (2B) instead of two forwards of B, which is faster on small "
    "models but changes train-mode BatchNorm statistics (shared over both halves), so it is not "
    "the official code's loss and is not done.",
    "- The Adam update is the same in both variants, so it cancels in the ratio (it makes the "
    "ratio slightly smaller, not larger).",
    "",
]


if __name__ == "__main__":
    main()
