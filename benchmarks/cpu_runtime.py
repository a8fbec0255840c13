"""CPU runtime choices, measured: float32 vs channels_last vs bf16 autocast, 1 vs 2 threads.

One PGD-10 training step of ``pgdat`` (the inner attack, the loss, the backward and Adam's step)
through robench's own API (``make_defense`` + ``Runtime``), per architecture: ``tiny-cnn`` on
8x8 digits (batch 64, its default), ``wrn-10-1`` and ``wrn-16-2`` on 32x32x3 images (batch 32,
the paper's). The variants of one architecture run interleaved, in rotating order, so they see
the same machine load; the ratios are what robench's CPU defaults are chosen from
(``robench/runtime.py``). Run on a quiet machine:

    .venv/bin/python benchmarks/cpu_runtime.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/cpu_runtime.py --quick    # seconds; checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QUICK_NOTE, add_out_args, cpu_model, interleaved, load, out_path, parse_args  # noqa: E402

from robench.defense import make_defense  # noqa: E402
from robench.models import build_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "cpu_runtime.md"
ARCHS = {"tiny-cnn": ("digits", (1, 8, 8), 64), "wrn-10-1": ("folder", (3, 32, 32), 32),
         "wrn-16-2": ("folder", (3, 32, 32), 32)}
VARIANTS = {"fp32": (False, False), "fp32+cl": (False, True), "bf16": (True, False), "bf16+cl": (True, True)}
QUICK = dict(archs="tiny-cnn,wrn-10-1", reps=2, inner=1, attack_steps=2)


def step_fn(arch: str, amp: bool, channels_last: bool, attack_steps: int):
    """One training step of pgdat on random data, as robench.training runs it."""
    dataset, shape, batch = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, shape[0], 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = torch.rand(batch, *shape).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    defense = make_defense("pgdat", dataset, {"attack_steps": attack_steps})
    defense.autocast = autocast
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run() -> None:
        x_adv = defense.adversarial(model, x, y)
        with autocast():
            loss, _ = defense.loss(model, x, x_adv, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run()  # warm-up: first-call allocations and oneDNN kernel selection
    return run, batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--inner", type=int, default=2, help="steps per repetition and variant")
    p.add_argument("--attack-steps", type=int, default=10)
    add_out_args(p, OUT)
    args = parse_args(p, argv, QUICK)
    out = out_path(args, OUT)
    threads = [1, 2] if (os.cpu_count() or 1) >= 2 else [1]
    lines = ["# CPU runtime: float32 vs channels_last vs bf16 autocast, 1 vs 2 threads", "",
             *([QUICK_NOTE, ""] if args.quick else []),
             f"- command: `.venv/bin/python benchmarks/cpu_runtime.py{' --quick' if args.quick else ''}`",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; load before {load()}",
             f"- work: one pgdat training step (PGD-{args.attack_steps} + loss + backward + Adam), median of "
             f"{args.reps} interleaved repetitions of {args.inner} steps", "",
             "| arch | batch | threads | " + " | ".join(f"{v} img/s" for v in VARIANTS) + " | "
             + " | ".join(f"{v}/fp32" for v in list(VARIANTS)[1:]) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(VARIANTS) - 1)]
    best: dict[str, tuple[str, int, float]] = {}
    saved = torch.get_num_threads()
    try:
        for arch in args.archs.split(","):
            fns, sizes = {}, {}
            for t in threads:
                for name, (amp, cl) in VARIANTS.items():
                    fns[f"{name}@{t}"], sizes[arch] = step_fn(arch, amp, cl, args.attack_steps)
            setup = {k: (lambda t=int(k.split("@")[1]): torch.set_num_threads(t)) for k in fns}
            _, wall = interleaved(fns, args.reps, args.inner, setup=setup)
            rate = {k: sizes[arch] / statistics.median(v) for k, v in wall.items()}
            for t in threads:
                base = rate[f"fp32@{t}"]
                lines.append(f"| {arch} | {sizes[arch]} | {t} | "
                             + " | ".join(f"{rate[f'{v}@{t}']:.0f}" for v in VARIANTS) + " | "
                             + " | ".join(f"{rate[f'{v}@{t}'] / base:.2f}" for v in list(VARIANTS)[1:]) + " |")
            top = max(rate, key=rate.get)
            best[arch] = (top.split("@")[0], int(top.split("@")[1]), rate[top] / rate[f"fp32@{threads[-1]}"])
            print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(saved)
    lines += ["", "Fastest variant per architecture (vs float32 at the most threads):", ""]
    lines += [f"- {a}: {v} with {t} thread(s), {r:.2f}x" for a, (v, t, r) in best.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
