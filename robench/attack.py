"""What every attack is: a dataclass of its parameters with a ``perturb`` method.

Attacks live one per module under ``attacks/`` and register themselves in ``ATTACKS``. The
dataclass fields are the attack's parameters; ``params()`` is what the results store keys on.

Calling an attack, ``attack(model, x, y, index)``, runs its ``perturb`` with the model in eval
mode and checks the result against the threat model; ``index`` holds each example's index in
its dataset split. Every
random draw for example ``i`` derives from ``(seed, i)`` (``robench.seeding``), so an outcome
never depends on the batch: not on ``--batch-size``, a resume point or the torchrun world size.
An attack whose reference code draws for a whole batch at once (AutoAttack) declares ``unit``:
it runs on fixed groups of ``unit`` consecutive examples, group ``g`` seeded by ``(seed, g)``,
and the evaluator aligns its batches to those groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from robench.config import DATASET_DEFAULTS, DatasetDefaults
from robench.errors import UserError
from robench.options import check_option_types
from robench.registry import ATTACKS
from robench.runtime import model_mode
from robench.seeding import example_index

# The dataset defaults an attack inherits; nothing else (e.g. the training lr) leaks in.
THREAT_FIELDS = ("eps", "step_size", "attack_steps")

# Slack for float rounding when checking the eps-ball (issue: tolerance 1e-6).
BALL_TOL = 1e-6


@dataclasses.dataclass
class Attack:
    eps: float
    seed: int = 0
    norm: str = "linf"  # the threat model: "linf" (the paper's) or "l2"; part of every result key

    # The threat models this attack implements (NORMS names them all).
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    # What the report and the demo need to know about the plugin, declared here and nowhere else.
    label: ClassVar[str] = ""  # column heading, e.g. "PGD" (default: the registered name)
    order: ClassVar[int] = 100  # column order in tables (paper's order first)
    black_box: ClassVar[bool] = False  # only queries outputs, never gradients
    ensemble: ClassVar[bool] = False  # runs several attacks per example: it should break all they break
    core: ClassVar[bool] = True  # robench's own set: the demo runs it, the report asks for it (not ta.*)
    paper: ClassVar[bool] = False  # one of the paper's Table 1 attacks: the report asks for it
    eps_curve: ClassVar[bool] = False  # the attack the demo and the report sweep over eps
    # Number of test images evaluated when the user gives no --n (None: the whole test set).
    default_n: ClassVar[int | None] = None
    demo_n: ClassVar[int | None] = None  # images the demo attacks (None: all), to fit its budget

    @classmethod
    def for_dataset(cls, defaults: DatasetDefaults, **overrides: Any) -> "Attack":
        """The attack with the dataset's threat model (eps, and PGD's step and steps; App. A:
        evaluation uses the training attack's parameters), then the user's overrides."""
        known = {f.name for f in dataclasses.fields(cls)}
        base = {k: getattr(defaults, k) for k in THREAT_FIELDS if k in known}
        unknown = set(overrides) - known
        if unknown:
            raise UserError(f"attack {cls.__name__} has no parameter(s) {', '.join(sorted(unknown))}")
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def __post_init__(self) -> None:
        # What the attack itself found suspicious in its last call (e.g. AutoAttack's signs of
        # gradient masking): an attribute, not a parameter; the evaluator stores it with the result.
        self.last_warnings: list[str] = []
        if self.norm not in self.norms:
            supported = ", ".join(self.norms)
            raise UserError(f"{self.label or type(self).__name__} supports norm {supported}, not {self.norm!r}")
        if not 0 < self.eps <= (1 if self.norm == "linf" else float("inf")):
            raise UserError(f"eps must be in (0, 1] for norm linf and positive for l2, got {self.eps}")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def unit(self) -> int:
        """Consecutive examples that share random draws; 1 when every draw is per example."""
        return 1

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for (x, y), with what every attack shares done once: the model
        runs in eval mode (each submodule's own mode is restored afterwards), and the output is
        checked against the threat model (``ThreatModelError`` if it left the eps-ball or [0, 1]).
        ``index``: the examples' indices in their split (``None``: 0..len(x)-1)."""
        index = example_index(index, len(x))
        with model_mode(model, training=False):
            x_adv = self.perturb(model, x, y, index)
        check_adversarial(x_adv, x, self.eps, self.label or type(self).__name__, self.norm)
        return x_adv

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The attack itself, on a model already in eval mode; ``index`` as in ``__call__``."""
        raise NotImplementedError


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


class ContiguousInput(nn.Module):
    """``model`` as third-party attack code (AutoAttack, torchattacks) expects it: that code
    flattens input gradients with ``.view``, which fails on the channels_last gradients a
    channels_last model (robench's runtime default) hands back. Here the gradient with respect to
    the input is contiguous; the model itself runs as prepared."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # code that reads the wrapper's mode and restores it sees the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_ContiguousGrad.apply(x))


class ThreatModelError(RuntimeError):
    """An attack returned examples outside its threat model."""


def check_adversarial(x_adv: torch.Tensor, x: torch.Tensor, eps: float, name: str = "attack",
                      norm: str = "linf") -> None:
    """Refuse an adversarial batch that left the eps-ball (L-inf or per-example L2) or [0, 1]:
    an error, never a number."""
    if x_adv.shape != x.shape:
        raise ThreatModelError(f"{name} returned shape {tuple(x_adv.shape)} for input {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise ThreatModelError(f"{name} returned non-finite pixels")
    if x.numel() == 0:
        return
    delta = (x_adv.float() - x.float()).flatten(1)
    if norm == "linf":
        dist = delta.abs().amax().item()
        tol = BALL_TOL
    elif norm == "l2":
        dist = delta.norm(dim=1).amax().item()
        tol = BALL_TOL + 1e-5 * eps  # float32 rounding of a norm over many pixels
    else:
        raise ValueError(f"unknown norm {norm!r}")
    if dist > eps + tol:
        raise ThreatModelError(f"{name} left the eps-ball: ||x_adv - x||_{norm[1:]} = {dist:.6g} > eps = {eps:.6g}")
    lo, hi = x_adv.min().item(), x_adv.max().item()
    if lo < -BALL_TOL or hi > 1 + BALL_TOL:
        raise ThreatModelError(f"{name} left [0, 1]: pixel range [{lo:.6g}, {hi:.6g}]")


def make_attack(name: str, dataset: str, eps: float | None = None, overrides: dict[str, Any] | None = None,
                autocast=None, seed: int | None = None) -> Attack:
    """The named attack with the dataset's paper defaults. A user ``eps`` keeps the dataset's
    step/eps ratio (App. A: step = eps / 4); ``seed`` is the attack's seed unless the overrides
    name one. Under the L2 threat model (``norm`` "l2" in the overrides, or an L2-only attack)
    the radius defaults to the dataset's L2 one."""
    cls = ATTACKS.get(name)
    overrides = dict(overrides or {})
    norm = overrides.get("norm", next(f.default for f in dataclasses.fields(cls) if f.name == "norm"))
    defaults = DATASET_DEFAULTS.get(dataset)
    if defaults is None:  # e.g. results on one's own tensors (robench.evaluation), stored as "custom"
        raise UserError(f"no default attack settings for dataset {dataset!r}; "
                        f"known: {', '.join(sorted(DATASET_DEFAULTS))}")
    if norm == "l2":
        if defaults.l2_eps is None:
            raise UserError(f"no default L2 radius for {dataset} (no paper gives one); pass --eps")
        defaults = dataclasses.replace(defaults, eps=defaults.l2_eps,
                                       step_size=round(defaults.step_size * defaults.l2_eps / defaults.eps, 12))
    if eps is not None and eps != defaults.eps:
        if norm == "linf" and not 0 < eps <= 1:
            raise UserError(f"--eps must be in (0, 1] for the L-inf threat model, got {eps}")
        if not 0 < eps:
            raise UserError(f"--eps must be positive, got {eps}")
        # rounded, so that float noise in the ratio never makes a new result key
        step = round(defaults.step_size * eps / defaults.eps, 12)
        defaults = dataclasses.replace(defaults, eps=eps, step_size=step)
    if seed is not None:
        overrides.setdefault("seed", seed)
    reference = cls.for_dataset(defaults, **({"norm": overrides["norm"]} if "norm" in overrides else {}))
    check_option_types(name, reference, overrides)
    attack = cls.for_dataset(defaults, **overrides)
    if autocast is not None and hasattr(attack, "autocast"):
        attack.autocast = autocast
    return attack
