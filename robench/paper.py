"""The RLFAT paper's published numbers, as plain data, to print beside ours in reports.

Source: Song et al., "Robust Local Features for Improving the Generalization of Adversarial
Training", ICLR 2020, transcribed from the paper (docs/design.md, section 10).
TABLE1 is the paper's accuracy table (Table 1), TABLE2 its loss-sensitivity table (Table 2).
"""

from __future__ import annotations

# L-inf radius of every number in TABLE1 (inputs in [0, 1]).
EPS = 0.03

# Paper Table 1: accuracy % on the test set; N-attack on 1,500 test images.
TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "stl10": {
        "pgdat": dict(clean=67.05, pgd=30.00, cw=31.97, nattack=34.80),
        "trades": dict(clean=65.24, pgd=38.99, cw=38.35, nattack=42.07),
        "rlfat-p": dict(clean=71.47, pgd=38.42, cw=38.42, nattack=44.80),
        "rlfat-t": dict(clean=72.38, pgd=43.36, cw=39.31, nattack=48.13),
    },
    "cifar10": {
        "pgdat": dict(clean=82.96, pgd=46.19, cw=46.41, nattack=46.67),
        "trades": dict(clean=80.35, pgd=50.95, cw=49.80, nattack=52.47),
        "rlfat-p": dict(clean=84.77, pgd=53.97, cw=52.40, nattack=54.60),
        "rlfat-t": dict(clean=82.72, pgd=58.75, cw=51.94, nattack=54.60),
    },
    "cifar100": {
        "pgdat": dict(clean=55.86, pgd=23.32, cw=22.87, nattack=22.47),
        "trades": dict(clean=52.13, pgd=27.26, cw=24.66, nattack=25.13),
        "rlfat-p": dict(clean=56.70, pgd=31.99, cw=29.04, nattack=32.53),
        "rlfat-t": dict(clean=58.96, pgd=31.63, cw=27.54, nattack=30.86),
    },
}

# Paper Table 2: loss sensitivity l = mean ||grad_x CE||_2 under a shift;
# brightness = (l(-0.15), l(0.15)), gamma = (l(0.8), l(1.2)).
TABLE2: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "stl10": {
        "pgdat": dict(brightness=(0.85, 0.82), gamma=(0.77, 0.79)),
        "trades": dict(brightness=(0.46, 0.48), gamma=(0.44, 0.42)),
        "rlfat-p": dict(brightness=(0.32, 0.34), gamma=(0.30, 0.29)),
        "rlfat-t": dict(brightness=(0.22, 0.23), gamma=(0.21, 0.19)),
    },
    "cifar10": {
        "pgdat": dict(brightness=(1.41, 1.36), gamma=(1.27, 1.20)),
        "trades": dict(brightness=(0.88, 0.90), gamma=(0.84, 0.76)),
        "rlfat-p": dict(brightness=(0.70, 0.71), gamma=(0.69, 0.62)),
        "rlfat-t": dict(brightness=(0.54, 0.56), gamma=(0.54, 0.48)),
    },
    "cifar100": {
        "pgdat": dict(brightness=(3.93, 3.66), gamma=(2.82, 2.80)),
        "trades": dict(brightness=(2.31, 2.12), gamma=(1.78, 1.76)),
        "rlfat-p": dict(brightness=(1.25, 1.31), gamma=(1.09, 1.01)),
        "rlfat-t": dict(brightness=(1.00, 0.98), gamma=(0.95, 0.88)),
    },
}
