"""Load two zoo models and compare them on the same images: the paired difference in PGD
accuracy with Newcombe's 95% interval, the exact McNemar p and the images needed to resolve it."""

import os

import robench

n = 60 if os.environ.get("ROBENCH_EXAMPLE_QUICK") else None  # the test suite's setting; None: all 360

pgdat = robench.load_model("pgdat-digits")  # sha256-verified, eval mode, on the CPU
trades = robench.load_model("trades-digits")
a = robench.evaluate(pgdat, "digits", ["pgd"], n=n, workdir="robench-runs")
b = robench.evaluate(trades, "digits", ["pgd"], n=n, workdir="robench-runs")
comparison = robench.compare(a, b, "pgd")
print(comparison.table())  # what `robench compare --defense pgdat,trades --attacks pgd` prints
stats = comparison["pgd"]
print(f"pgdat - trades: {100 * stats.diff:+.1f} points, 95% CI [{100 * stats.ci[0]:+.1f}, "
      f"{100 * stats.ci[1]:+.1f}], McNemar p = {stats.p:.3f}")
