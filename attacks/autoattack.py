"""AutoAttack (Croce & Hein 2020), reference implementation (pyautoattack): APGD-CE, APGD-T, FAB-T, Square.

AutoAttack is not in the RLFAT paper; it is the now-standard check that a defense's PGD numbers
are not an artefact of a weak attack. ``version="standard"`` runs, on the images still correctly
classified after each step, APGD-CE (100 iterations), APGD-T (DLR-targeted, 9 target classes,
100 iterations each), FAB-T (9 targets) and Square (5,000 queries), as in RobustBench.

Why the reference code, through ``pyautoattack``:

- The official implementation (github.com/fra31/auto-attack) is not on PyPI; it is installed
  from a git URL, which we cannot pin by hash or resolve offline.
- ``pyautoattack`` repackages that reference code unchanged in substance, with a keyword-only
  constructor (``AutoAttack(model, *, eps, norm, version, device, seed, attacks)``), and it
  imports and runs here (torch 2.x, CPU).
- torchattacks ships its own re-implementation, ``torchattacks.AutoAttack``, which users report
  gives different numbers from the reference. Reading torchattacks 3.5.1 shows why: its
  "standard" version builds APGD, APGD-T and FAB with their class defaults of 10 iterations
  (the reference uses 100) and Square with ``resc_schedule=True`` (the reference: False), so it
  is a weaker attack. We use torchattacks only as a cross-check
  (``benchmarks/autoattack_crosscheck.py``), never to report numbers.

What this module adds around the reference call (``run_standard_evaluation``, which returns the
tuple ``(x_adv, y_adv)``: adversarial images, with x itself for images never broken or
misclassified from the start, and the model's predicted labels on them):

- the model runs in eval mode, and its train/eval mode is restored afterwards (``Attack.__call__``);
- the reference's logging (logger ``"auto-attack"``), prints and Python warnings are kept off the
  terminal, so the evaluator's progress bar stays clean; its warning-level messages (randomised
  or dynamic defense, zero gradients, Square beating the gradient attacks: signs of gradient
  masking) are kept in ``last_warnings`` for inspection;
- every sub-attack calls ``torch.manual_seed(seed)``; that would reset the caller's global RNG, so
  the run happens inside ``torch.random.fork_rng``;
- its dynamic-defense check calls ``sys.settrace(None)``, which would switch off a running tracer
  (coverage, a debugger); the previous trace function is put back;
- the targeted attacks (APGD-T, FAB-T) use min(9, classes - 1) target classes, so datasets with
  fewer than 10 classes (an image folder) work; the reference would index past the logits;
- x_adv is projected into the eps-ball and [0, 1] before the threat-model check (see the comment
  in ``_run_group``).

Both threat models of the reference are supported: ``norm`` "linf" (the paper's; the
reference's "Linf") and "l2" (its "L2", the RobustBench L2 setting: eps 0.5 on CIFAR-10).
``version`` may be "standard", "plus", "rand" (EOT, for randomised defenses) or
"custom" with ``attacks`` a subset of ``ATTACK_NAMES`` (tests use ``("apgd-ce",)``, cheap).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robench.attack import Attack, ContiguousInput
from robench.errors import UserError
from robench.threat import L2Ball, LinfBall
from robench.registry import ATTACKS
from robench.seeding import mix

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# Attacks built on the DLR loss, which needs at least 4 classes (3 for the untargeted variant
# in theory; the reference's targeted DLR reads the 3rd-largest logit and the target's).
_DLR = ("apgd-dlr", "apgd-t")
_LOGGER = "auto-attack"
# robench's norm names -> the reference's
_REFERENCE_NORM = {"linf": "Linf", "l2": "L2"}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _quiet_reference():
    """Silence the reference's logger, prints and warnings; yield the warning texts seen."""
    logger = logging.getLogger(_LOGGER)
    saved = (logger.level, logger.propagate, logger.handlers[:], logger.disabled)
    collect = _Collect()
    logger.handlers[:] = [collect]
    logger.setLevel(logging.WARNING)  # debug/info progress lines are not even formatted
    logger.propagate = False
    logger.disabled = False
    trace = sys.gettrace()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield collect.messages
        for w in caught:
            if str(w.message) not in collect.messages:
                collect.messages.append(str(w.message))
    finally:
        sys.settrace(trace)
        logger.handlers[:] = saved[2]
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.disabled = saved[3]


@ATTACKS.register("autoattack")
@dataclass
class AutoAttack(Attack):
    """AutoAttack (Croce & Hein 2020), reference implementation (pyautoattack): APGD-CE, APGD-T, FAB-T, Square."""

    label: ClassVar[str] = "AutoAttack"
    ensemble: ClassVar[bool] = True
    order: ClassVar[int] = 40
    demo_n: ClassVar[int | None] = 40
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    version: str = "standard"
    # Only with version="custom": which of ATTACK_NAMES to run, in order.
    attacks: tuple[str, ...] = ()
    # The reference draws its random numbers for a whole batch (APGD's starts, Square's patch
    # positions). Examples therefore run in fixed groups of this many consecutive indices, group
    # g with seed mix(seed, g), so the evaluator's batch size cannot change an outcome.
    group: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group < 1:
            raise UserError(f"autoattack group must be at least 1, got {self.group}")
        if self.version not in VERSIONS:
            raise UserError(f"autoattack version must be one of {', '.join(VERSIONS)}, got {self.version!r}")
        if isinstance(self.attacks, str):  # "apgd-ce,apgd-t" from a command line
            self.attacks = tuple(a.strip() for a in self.attacks.split(",") if a.strip())
        self.attacks = tuple(self.attacks)
        unknown = [a for a in self.attacks if a not in ATTACK_NAMES]
        if unknown:
            raise UserError(f"unknown autoattack attack(s) {', '.join(unknown)}; choose from: {', '.join(ATTACK_NAMES)}")
        if self.version == "custom" and not self.attacks:
            raise UserError("autoattack version 'custom' needs attacks, e.g. attacks=('apgd-ce', 'apgd-t')")
        if self.version != "custom" and self.attacks:
            raise UserError(f"autoattack attacks can only be chosen with version 'custom' (version is {self.version!r})")

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["attacks"] = list(self.attacks)  # JSON has no tuples
        return p

    @property
    def unit(self) -> int:
        return self.group

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Runs the reference once per group of examples (see ``group``)."""
        x_adv = x.detach().clone()
        seen: list[str] = []
        groups = torch.div(index, self.group, rounding_mode="floor")
        for g in torch.unique(groups).tolist():
            members = (groups == g).nonzero().flatten().to(x.device)
            x_adv[members] = self._run_group(model, x[members], y[members], mix(self.seed, g))
            seen += [w for w in self.last_warnings if w not in seen]
        self.last_warnings = seen
        return x_adv

    def _run_group(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        from pyautoattack import AutoAttack as Reference  # imported lazily: the registry loads every attack

        if len(x) == 0:
            return x.clone()
        x = x.detach().contiguous()  # the reference reshapes with .view
        y = y.detach().to(x.device)
        with torch.no_grad():
            n_classes = model(x[:1]).shape[-1]
        ref = Reference(
            ContiguousInput(model), eps=self.eps, norm=_REFERENCE_NORM[self.norm], version=self.version,
            device=x.device, seed=seed, attacks=list(self.attacks) if self.version == "custom" else None,
        )
        to_run = ref.attacks_to_run or []
        if n_classes < 4 and any(a in _DLR for a in to_run):
            raise UserError(f"autoattack {', '.join(a for a in to_run if a in _DLR)} needs at least 4 "
                            f"classes (DLR loss), the model has {n_classes}; use version 'custom' "
                            "with attacks apgd-ce,fab,square")
        targets = max(1, min(ref.apgd_targeted.n_target_classes, n_classes - 1))
        ref.apgd_targeted.n_target_classes = targets
        ref.fab.n_target_classes = min(ref.fab.n_target_classes, targets)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _quiet_reference() as seen:
            x_adv, _y_adv = ref.run_standard_evaluation(x, y, batch_size=len(x))
        self.last_warnings = list(seen)
        x_adv = x_adv.detach().to(device=x.device, dtype=x.dtype)
        # The reference keeps its iterates in the ball, but by float arithmetic of its own:
        # FAB-T accepts a point when ||x_adv - x||_inf <= eps computed in float32 against a
        # float64 eps, and FAB/Square build x_adv as x + delta then clip, so a pixel can land
        # an ulp or so outside the eps-ball or [0, 1]. The projection moves such pixels by at
        # most that rounding, far below one grey level (1/255), so the reference's verdict on the
        # example stands; the evaluator re-classifies x_adv anyway. Projecting first means the
        # threat-model check (``Attack.__call__``) only ever fires on a real escape, not on rounding.
        # L2 likewise: the reference scales delta to norm eps in float32 and then clips, so a norm
        # can come out a few ulps above eps; the projection scales such a delta by 1 - O(1e-7).
        if self.norm == "l2":
            return L2Ball(self.eps).project(x_adv, x)
        return x_adv.clamp(*LinfBall(self.eps).bounds(x))
