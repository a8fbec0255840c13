"""Benchmark a model RobustBench-style: clean and reference-AutoAttack accuracy on the first n
test images, returned as the model-info fields of a RobustBench JSON file (with 95% intervals)."""

import json
import os

import robench

quick = bool(os.environ.get("ROBENCH_EXAMPLE_QUICK"))  # the test suite's setting: 10 images, APGD-CE only

model = robench.load_model("pgdat-digits")
# On CIFAR-10, robench.benchmark(model) is RobustBench's setting: eps 8/255, the 10,000 test images.
info = robench.benchmark(model, "digits", eps=0.2, n=10 if quick else 100, workdir="robench-runs",
                         **({"version": "custom", "attacks": ("apgd-ce",)} if quick else {}))
print(json.dumps(info, indent=2))
