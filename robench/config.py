"""Per-dataset defaults, in one table, and the configuration dataclasses.

Every number in ``DATASET_DEFAULTS`` cites its source. "App. A" is Appendix A of Song et al.,
"Robust Local Features for Improving the Generalization of Adversarial Training", ICLR 2020;
"code" is the official TensorFlow code (github.com/JHL-HUST/RLFAT), as docs/design.md describes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetDefaults:
    eps: float  # L-inf radius, inputs in [0, 1]
    step_size: float  # PGD step
    attack_steps: int  # PGD steps, in training and in evaluation
    train_steps: int  # optimiser steps
    batch_size: int
    arch: str
    lr: float  # Adam, constant
    flip: bool  # random horizontal flip, the only augmentation in App. A
    source: str
    label: str  # how reports name the dataset
    paper: str | None = None  # whose numbers in the paper's tables to print beside ours
    # L2 radius for ``--norm l2`` where a paper gives one (see L2_SOURCES); None: pass --eps.
    l2_eps: float | None = None


# Where each L2 radius comes from (the RLFAT paper evaluates L-inf only).
L2_SOURCES = {
    "cifar10": "0.5: Croce & Hein, AutoAttack (ICML 2020), Table 2, and the RobustBench CIFAR-10 L2 leaderboard",
    "folder": "CIFAR-10's (the usual folder is the CIFAR-10 JPEG copy)",
    "digits": "robench choice (measured): 1.0 on 8x8 digits, the smallest of 0.25/0.5/0.75/1.0 where L2 "
              "PGD-10 (step eps/4) leaves the undefended tiny CNN near 0% (0.3%; 8.6% at 0.75) while L-inf "
              "PGD-AT keeps 29% (default training, all 360 test images)",
}


# The embedded dataset: what `robench train` uses and which zoo checkpoint a bare defense name means.
DEFAULT_DATASET = "digits"

DATASET_DEFAULTS: dict[str, DatasetDefaults] = {
    "cifar10": DatasetDefaults(
        0.03, 0.0075, 10, 79_800, 32, "wrn-32-10", 1e-3, True,
        source="App. A: eps 0.03, step 0.0075, 10 steps, 79,800 steps, batch 32, Adam 1e-3; "
        "WRN-32-10 from code (Madry cifar10_challenge model)",
        label="CIFAR-10", paper="cifar10", l2_eps=0.5,
    ),
    "cifar100": DatasetDefaults(
        0.03, 0.0075, 7, 79_800, 32, "wrn-32-10", 1e-3, True,
        source="App. A: as CIFAR-10 but 7 attack steps",
        label="CIFAR-100", paper="cifar100",
    ),
    "stl10": DatasetDefaults(
        0.03, 0.0075, 7, 29_700, 32, "wrn-40-2", 1e-3, True,
        source="App. A: eps 0.03, step 0.0075, 7 steps, 29,700 steps; 'w40-2' WRN from code",
        label="STL-10", paper="stl10",
    ),
    # An image folder is usually the CIFAR-10 JPEG copy (shared/data), so it takes CIFAR-10's
    # numbers; every one can be overridden on the command line.
    "folder": DatasetDefaults(
        0.03, 0.0075, 10, 79_800, 32, "wrn-32-10", 1e-3, True,
        source="CIFAR-10's row (App. A), since the usual folder is the CIFAR-10 JPEG copy",
        label="folder (e.g. CIFAR-10 JPEG copy)", paper="cifar10", l2_eps=0.5,
    ),
    # The embedded default: scikit-learn's 8x8 digits (17 grey levels, 1/16 apart). Not in the
    # paper. eps 0.2 (3.2 grey levels) is where an undefended CNN falls to 0% under PGD-10 while
    # PGD-AT keeps about 70% (measured; at 0.1 the undefended model still keeps ~45%). The step
    # keeps the paper's ratio step = eps / 4. Batch 64 and 600 steps (27 epochs): on CPU a tiny
    # model's step costs about the same at 32 or 64, so this halves training time for the same
    # epochs, and the demo's seven defenses train in a few minutes.
    "digits": DatasetDefaults(
        0.2, 0.05, 10, 600, 64, "tiny-cnn", 1e-3, False,
        source="robench choice (not in the paper): eps/step ratio and attack steps as App. A "
        "CIFAR-10; eps, batch and step count sized for 2 CPU cores; no flip, digits are not "
        "mirror-symmetric",
        label="digits (8x8, scikit-learn)", l2_eps=1.0,
    ),
}
