"""Evaluate your own model on digits: a small CNN robench does not know, trained for a few steps
with plain torch, then attacked with PGD and CW; the README's "From Python" example."""

# --- README ---
import torch
from torch import nn

import robench
from robench.data import load_dataset

digits = load_dataset("digits")  # 8x8 grey images in [0, 1], embedded: no download
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(100):
    i = torch.randint(len(digits.x_train), (64,))
    loss = nn.functional.cross_entropy(model(digits.x_train[i]), digits.y_train[i])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

# Any nn.Module mapping images in [0, 1] to logits; tensors, a DataLoader or a dataset name.
results = robench.evaluate(model.eval(), (digits.x_test, digits.y_test), ["pgd", "cw"], eps=0.2, n=100,
                           name="my-cnn", workdir="robench-runs")
print(results.table())  # the table `robench eval` prints
print(f"PGD accuracy {results.accuracy('pgd'):.3f}, 95% interval {results.interval('pgd')}")
print(f"worst case over clean, PGD and CW: {results.worst_case():.3f}")
frame = results.frame()  # one row per example and attack, the columns of `robench export`
print(frame.groupby("attack").outcome.mean())
# Run it again: the outcomes are read from robench-runs/results.sqlite, no attack runs.
