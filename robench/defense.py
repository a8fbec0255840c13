"""What every defense is: a dataclass of its settings, how it builds the adversarial batch, and
its loss on that batch.

Defenses live one per module under ``defenses/`` and register themselves in ``DEFENSES``. The
training loop is shared (``robench.training``); a defense only says
- its settings, as dataclass fields (set with ``robench train NAME -o NAME.PARAM=VALUE``);
- ``inner_loss``: which loss PGD maximises in training ("ce", "kl" for TRADES-style, or None);
- ``loss(model, x, x_adv, y)``: its training objective (docs/design.md, section 3 "Training objectives").

The bases below hold the settings several defenses share, each default in one place:
``AdversarialDefense`` the training attack's threat model, ``TradesKL`` the KL weight,
``RandomBlockShuffle`` the RBS settings. A new setting is a field declared with ``setting``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from robench.attack import THREAT_FIELDS
from robench.config import DATASET_DEFAULTS
from robench.errors import UserError
from robench.options import check_option_types
from robench.rbs import MODES as RBS_MODES
from robench.rbs import rbs
from robench.registry import DEFENSES
from robench.seeding import rbs_seed
from robench.threat import cross_entropy_objective, kl_objective, pgd

AUTOCAST_OFF: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

ATTACK_MODES = ("eval", "train")


def setting(default: Any = MISSING, check: Callable[[Any], bool] | None = None, error: str = "") -> Any:
    """A defense setting: a dataclass field whose value ``check`` accepts, else a UserError
    ``"{error}, got VALUE"`` when the defense is made. No default: the dataset's (``eps``,
    ``step_size``, ``attack_steps``; ``DATASET_DEFAULTS``)."""
    return dataclasses.field(default=default, metadata={"check": check, "error": error})


def non_negative(flag: str) -> dict:
    return dict(check=lambda v: v >= 0, error=f"{flag} must be non-negative")


@dataclass
class Defense:
    """A training objective with no adversary. Subclasses add their settings as fields."""

    inner_loss: ClassVar[str | None] = None
    # The objective in one line; ``{field}`` placeholders are filled with the settings' defaults
    # (``describe``), so a changed default never leaves a stale number here.
    summary: ClassVar[str] = ""
    # What the report and the demo need to know, declared here and nowhere else.
    order: ClassVar[int] = 100  # row order in tables (the paper's order first)
    parent: ClassVar[str | None] = None  # the defense this one ablates (paper section 4.4 chains)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and not check(value):
                raise UserError(f"{f.metadata['error']}, got {value!r}")
        # Not settings: the runtime's autocast (bf16 on CUDA), set by the training loop.
        self.autocast: Callable[[], contextlib.AbstractContextManager] = AUTOCAST_OFF

    @classmethod
    def describe(cls) -> str:
        """``summary`` with its placeholders filled by the settings' defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not MISSING}
        return cls.summary.format(**defaults)

    def params(self) -> dict[str, Any]:
        """The settings, as the checkpoint records them (``objective``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The adversarial batch x' the loss trains on; None without an adversary."""
        return None

    def seed_step(self, seed: int, step: int, rank: int) -> None:
        """Seed the defense's own random draws for training step ``step`` on ``rank`` (the loop
        seeds torch's global RNG itself). Nothing here; RBS seeds its generator."""

    def loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor | None, y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, logits whose accuracy the training log reports)."""
        raise NotImplementedError


@dataclass
class AdversarialDefense(Defense):
    """Trains on x' from PGD on ``inner_loss``, in the dataset's threat model (App. A)."""

    inner_loss: ClassVar[str | None] = "ce"

    eps: float = setting(check=lambda v: 0 < v <= 1, error="--eps must be in (0, 1]")
    step_size: float = setting(check=lambda v: v > 0, error="--step-size must be positive")
    attack_steps: int = setting(check=lambda v: v > 0, error="--attack-steps must be positive")
    # "eval": our default, as the TRADES code; "train": the official code (BatchNorm moves)
    attack_mode: str = setting("eval", lambda v: v in ATTACK_MODES,
                               f"--attack-mode must be one of {', '.join(ATTACK_MODES)}")

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on the defense's inner loss, with the model in eval mode (default) or, as in the
        official code, in train mode so that BatchNorm uses and updates batch statistics."""
        was_training = model.training
        model.train(self.attack_mode == "train")
        try:
            if self.inner_loss == "ce":
                objective, start = cross_entropy_objective(y), "uniform"
            else:
                with torch.no_grad(), self.autocast():
                    objective, start = kl_objective(F.log_softmax(model(x).float(), 1)), "normal"
            return pgd(model, x, objective, self.eps, self.step_size, self.attack_steps, start, self.autocast)
        finally:
            model.train(was_training)


@dataclass
class TradesKL(AdversarialDefense):
    """TRADES-style: x' from PGD on KL(p(x) || p(x')), and a KL term weighted by ``lam``."""

    inner_loss: ClassVar[str | None] = "kl"

    lam: float = setting(6.0, **non_negative("--lam"))  # RLFAT paper, App. A


@dataclass
class RandomBlockShuffle(AdversarialDefense):
    """Trains on RBS(x'); ``self.rbs`` applies it with these settings."""

    rbs_k: int = setting(2, lambda v: v >= 1, "--rbs-k must be at least 1")  # the paper's k
    # "batch": one draw per batch (official code); "image": one per image
    rbs_mode: str = setting("batch", lambda v: v in RBS_MODES, f"--rbs-mode must be one of {', '.join(RBS_MODES)}")
    # Never return the input unchanged (off: the official code, ~27% unchanged at k=2)
    rbs_exclude_identity: bool = setting(False, lambda v: isinstance(v, bool),
                                         "--rbs-exclude-identity must be true or false")

    def __post_init__(self) -> None:
        super().__post_init__()
        # Where RBS draws from: None is torch's global RNG. The training loop gives it a generator
        # seeded from (seed, step) alone in batch mode, so every torchrun rank applies the same
        # shuffle to its shard: one draw per global batch, as the official code makes.
        self.rbs_generator: torch.Generator | None = None
        # Tests replace this with a fixed permutation to check losses by hand.
        self.rbs: Callable[[torch.Tensor], torch.Tensor] = self._rbs

    def seed_step(self, seed: int, step: int, rank: int) -> None:
        """Batch mode: one draw per (seed, step), the same on every torchrun rank (one draw per
        global batch, as the official code). Image mode: per rank as well."""
        if self.rbs_generator is None:
            self.rbs_generator = torch.Generator()
        self.rbs_generator.manual_seed(rbs_seed(seed, step, rank if self.rbs_mode == "image" else None))

    def _rbs(self, x: torch.Tensor) -> torch.Tensor:
        return rbs(x, self.rbs_k, self.rbs_mode, exclude_identity=self.rbs_exclude_identity,
                   generator=self.rbs_generator)


def param_names(cls: type[Defense]) -> list[str]:
    """The defense class's settings, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def make_defense(name: str, dataset: str, options: dict[str, Any] | None = None) -> Defense:
    """The registered defense ``name`` with the user's ``options``; the threat model it is not
    given comes from the dataset's row of ``DATASET_DEFAULTS`` (App. A)."""
    cls = DEFENSES.get(name)
    defaults = DATASET_DEFAULTS.get(dataset)
    if defaults is None:
        raise UserError(f"unknown dataset {dataset!r}; choose from: {', '.join(sorted(DATASET_DEFAULTS))}")
    known = param_names(cls)
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"defense {name} has no parameter(s) {', '.join(unknown)}; its parameters: "
                        f"{', '.join(known) or 'none'}")
    base = {k: getattr(defaults, k) for k in THREAT_FIELDS if k in known}
    reference = cls(**base)
    check_option_types(name, reference, options)
    # An int given for a float setting (-o trades.lam=6) is recorded as the float it means.
    options = {k: float(v) if isinstance(getattr(reference, k), float) and type(v) is int else v
               for k, v in options.items()}
    return cls(**{**base, **options})


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p || q), the TRADES regulariser (sum over classes, mean over the batch)."""
    log_p, log_q = F.log_softmax(logits_p.float(), 1), F.log_softmax(logits_q.float(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def transfer(logits_rbs: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """RLFAT's robust-local-feature transfer: (1/B) sum_i ||z(RBS(x'_i)) - z(x'_i)||^2.
    Gradients flow through both sets of logits, as in the official code."""
    return (logits_rbs.float() - logits_adv.float()).pow(2).sum(1).mean()
