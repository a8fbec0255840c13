"""The torchattacks 3.5.1 catalogue as robench attacks, ``ta.<name>`` (e.g. ``ta.square``).

Every torchattacks attack whose output lies in an L-inf or L2 ball on [0, 1] images is here, one
registered class per row of ``CATALOGUE``; each runs through the evaluator like robench's own
attacks (per-example store, resume, the threat-model check, torchrun sharding), with its
parameters through ``-o ta.NAME.PARAM=VALUE``. torchattacks is imported only when an attack
runs: ``pip install --no-deps torchattacks==3.5.1`` (its pin ``requests~=2.25.1`` would
downgrade the environment, and only its stale bundled ``robustbench`` package imports requests).

Parameters: ``eps`` is robench's radius (the dataset's, or ``--eps``; with ``-o ta.X.norm=l2``
or an L2-only attack, the dataset's L2 radius). Where torchattacks takes a step size ``alpha``
and a step count ``steps`` (the PGD family), they are robench's ``step_size`` and
``attack_steps`` and default to the dataset's threat model as robench's ``pgd`` does (App. A:
step = eps / 4, torchattacks' own 2/255 at 8/255; ``--eps`` keeps the ratio). Every other
parameter keeps torchattacks' name and default (``ta.apgd.steps``, ``ta.square.n_queries``).
APGD, APGD-T, FAB, Square and torchattacks' AutoAttack take ``norm`` linf or l2.

Minimum-norm attacks (``ta.cw``: CW-L2, ``ta.deepfool``) have no radius: an example whose
perturbation is longer than eps (L2) counts as not broken, x_adv = x, which is how robust
accuracy at eps is defined for them. Not adapted: VANILA (no attack), GN (unbounded Gaussian
noise), EADL1 and EADEN (L1 / elastic-net), JSMA, SparseFool, OnePixel and Pixle (L0), and the
wrappers MultiAttack and LGV (trains surrogate models).

What the adapter adds around torchattacks:

- Batch-size invariance: torchattacks draws random numbers for a whole batch and some attacks
  (CW's early stop, SPSA's shared directions) couple the examples of a batch, so examples run
  in fixed groups of ``group`` consecutive indices, group g seeded with mix(seed, g) inside
  ``torch.random.fork_rng`` (as robench's ``autoattack``); ``--batch-size`` and torchrun cannot
  change an outcome, and the caller's global RNG is untouched.
- The model's modes are robench's: torchattacks' own ``model.eval()`` is undone per submodule by
  ``Attack.__call__``; parameter gradients that its ``backward()`` calls leave are put back.
- Its prints go nowhere and its Python warnings are dropped; inputs are [0, 1] images (no
  ``set_normalization_used``); the number of classes is read from the model.
- TI-FGSM and PI-FGSM(++) hard-code three channels; greyscale images run as three channels whose
  extra two the model never sees (zero gradient, so they never move) and the first is returned.
- Outputs come back on the input's device and dtype. Pixels outside the eps-ball or [0, 1] by
  float rounding only (< ``ROUNDING``) are projected back; a real escape is left for the
  evaluator's check to refuse. An example torchattacks returns non-finite (MI-FGSM's family
  divides by the mean |gradient|, 0/0 on a zero gradient) counts as not broken, with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from robench.attack import Attack, ContiguousInput
from robench.errors import UserError
from robench.registry import ATTACKS
from robench.seeding import mix

VERSION = "3.5.1"
INSTALL = f"pip install --no-deps torchattacks=={VERSION}"
PREFIX = "ta."
# Float rounding an output may show beyond the ball or [0, 1] and still be projected (far below
# one 8-bit grey level, 1/255); anything larger is a real escape and is refused.
ROUNDING = 1e-5
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
PGD_STEPS = {"step_size": "alpha", "attack_steps": "steps"}


@dataclass(frozen=True)
class Spec:
    cls: str  # the torchattacks class
    doc: str  # what it is: the first line of the robench class's docstring
    params: dict[str, Any] = field(default_factory=dict)  # torchattacks' names and defaults
    rename: dict[str, str] = field(default_factory=dict)  # robench field -> torchattacks argument
    norms: tuple[str, ...] = ("linf",)
    eps_arg: str | None = "eps"  # None: a minimum-norm attack (no radius; over-budget is rejected)
    ratio: dict[str, str] = field(default_factory=dict)  # robench field -> argument = value * eps
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seeded: bool = False  # takes seed= (and seeds torch itself)
    n_classes: bool = False  # takes n_classes=
    rgb: bool = False  # hard-codes three channels (conv2d groups=3)
    black_box: bool = False
    label: str = ""


def _pgd(cls: str, doc: str, norms: tuple[str, ...] = ("linf",), **params: Any) -> Spec:
    return Spec(cls, doc, params, PGD_STEPS, norms)


_BOTH = ("linf", "l2")
CATALOGUE: dict[str, Spec] = {
    "fgsm": Spec("FGSM", "one signed-gradient step (Goodfellow et al. 2015)"),
    "bim": _pgd("BIM", "basic iterative method, signed steps from x (Kurakin et al. 2017)"),
    "rfgsm": _pgd("RFGSM", "a random signed step, then iterative FGSM (R+FGSM, Tramer et al. 2018)"),
    "ffgsm": Spec("FFGSM", "a uniform start, then one step of alpha_ratio * eps (fast FGSM, Wong et al. 2020)",
                  {"alpha_ratio": 1.25}, ratio={"alpha_ratio": "alpha"}),
    "pgd": _pgd("PGD", "PGD on cross-entropy, uniform random start (Madry et al. 2018)", random_start=True),
    "eotpgd": _pgd("EOTPGD", "PGD on eot_iter gradients a step, expectation over transformation (Athalye et al. 2018)",
                   eot_iter=2, random_start=True),
    "tpgd": _pgd("TPGD", "TRADES' PGD on KL(p(x) || p(x_adv)) (Zhang et al. 2019)"),
    "mifgsm": _pgd("MIFGSM", "momentum iterative FGSM (Dong et al. 2018)", decay=1.0),
    "nifgsm": _pgd("NIFGSM", "Nesterov iterative FGSM (Lin et al. 2020)", decay=1.0),
    "sinifgsm": _pgd("SINIFGSM", "scale-invariant Nesterov iterative FGSM (Lin et al. 2020)", decay=1.0, m=5),
    "vmifgsm": _pgd("VMIFGSM", "variance-tuned momentum iterative FGSM (Wang & He 2021)", decay=1.0, N=5, beta=1.5),
    "vnifgsm": _pgd("VNIFGSM", "variance-tuned Nesterov iterative FGSM (Wang & He 2021)", decay=1.0, N=5, beta=1.5),
    "difgsm": _pgd("DIFGSM", "diverse-inputs iterative FGSM, random resize and pad (Xie et al. 2019)", decay=0.0,
                   resize_rate=0.9, diversity_prob=0.5, random_start=False),
    "tifgsm": dataclasses.replace(
        _pgd("TIFGSM", "translation-invariant iterative FGSM, smoothed gradients (Dong et al. 2019)", decay=0.0,
             kernel_name="gaussian", len_kernel=15, nsig=3.0, resize_rate=0.9, diversity_prob=0.5,
             random_start=False),
        rgb=True, choices={"kernel_name": ("gaussian", "linear", "uniform")}),
    "jitter": _pgd("Jitter", "PGD on a scaled, noised softmax (Schwinn et al. 2021)",
                   scale=10.0, std=0.1, random_start=True),
    "upgd": dataclasses.replace(
        _pgd("UPGD", "PGD with a choice of loss, momentum and EOT", random_start=False, loss="ce", decay=1.0,
             eot_iter=1), choices={"loss": ("ce", "dlr", "margin")}),
    "pgdrs": dataclasses.replace(
        _pgd("PGDRS", "PGD against randomised smoothing, noise_batch_size noisy copies (Salman et al. 2019)",
             noise_type="guassian", noise_sd=0.5, noise_batch_size=5, batch_max=2048),
        choices={"noise_type": ("guassian", "uniform")}),
    "pifgsm": Spec("PIFGSM", "patch-wise iterative FGSM (Gao et al. 2020)",
                   {"momentum": 1.0, "amplification": 10.0, "prob": 0.7}, {"attack_steps": "num_iter_set"},
                   eps_arg="max_epsilon", rgb=True),
    "pifgsmpp": Spec("PIFGSMPP", "patch-wise++ iterative FGSM (Gao et al. 2020)",
                     {"momentum": 1.0, "amplification": 10.0, "prob": 0.7, "project_factor": 0.8},
                     {"attack_steps": "num_iter_set"}, eps_arg="max_epsilon", rgb=True, label="TA-PIFGSM++"),
    "apgd": Spec("APGD", "auto-PGD, step-size free (Croce & Hein 2020)",
                 {"steps": 10, "n_restarts": 1, "loss": "ce", "eot_iter": 1, "rho": 0.75}, norms=_BOTH,
                 choices={"loss": ("ce", "dlr")}, seeded=True),
    "apgdt": Spec("APGDT", "auto-PGD on the targeted DLR loss, every other class a target (Croce & Hein 2020)",
                  {"steps": 10, "n_restarts": 1, "eot_iter": 1, "rho": 0.75}, norms=_BOTH, seeded=True,
                  n_classes=True, label="TA-APGD-T"),
    "fab": Spec("FAB", "fast adaptive boundary attack, accepts points within eps (Croce & Hein 2020)",
                {"steps": 10, "n_restarts": 1, "alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "multi_targeted": False},
                norms=_BOTH, seeded=True, n_classes=True),
    "square": Spec("Square", "random square updates, queries only (Andriushchenko et al. 2020)",
                   {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8, "loss": "margin", "resc_schedule": True},
                   norms=_BOTH, choices={"loss": ("margin", "ce")}, seeded=True, black_box=True),
    "spsa": Spec("SPSA", "finite-difference gradient estimates, queries only (Uesato et al. 2018)",
                 {"delta": 0.01, "lr": 0.01, "nb_iter": 1, "nb_sample": 128, "max_batch_size": 64}, black_box=True),
    "autoattack": Spec("AutoAttack", "a re-implementation, weaker than robench's reference `autoattack` "
                       "(10-step APGD/FAB)", {"version": "standard"}, norms=_BOTH,
                       choices={"version": ("standard", "plus", "rand")}, seeded=True, n_classes=True),
    "pgdl2": _pgd("PGDL2", "L2 PGD on cross-entropy, random start in the ball", ("l2",), random_start=True,
                  eps_for_division=1e-10),
    "pgdrsl2": dataclasses.replace(
        _pgd("PGDRSL2", "L2 PGD against randomised smoothing (Salman et al. 2019)", ("l2",),
             noise_type="guassian", noise_sd=0.5, noise_batch_size=5, batch_max=2048, eps_for_division=1e-10),
        choices={"noise_type": ("guassian", "uniform")}),
    "cw": Spec("CW", "Carlini-Wagner L2, minimum-norm: longer than eps is not broken (Carlini & Wagner 2017)",
               {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01}, norms=("l2",), eps_arg=None, label="TA-CW-L2"),
    "deepfool": Spec("DeepFool", "L2, minimum-norm: longer than eps is not broken "
                     "(Moosavi-Dezfooli et al. 2016)", {"steps": 50, "overshoot": 0.02}, norms=("l2",), eps_arg=None),
}
_RENAMED_DEFAULTS = {"step_size": 2 / 255, "attack_steps": 10}  # torchattacks' own, for a bare constructor


@contextlib.contextmanager
def _quiet():
    """torchattacks prints (mode changes, a model without parameters) and may warn; neither is
    robench's output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _parameter_grads_kept(model: nn.Module):
    """Some attacks call ``loss.backward()``, which also fills the parameters' ``.grad``."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


class _FirstChannels(nn.Module):
    """The model on the first ``c`` channels of a three-channel input."""

    def __init__(self, model: nn.Module, c: int) -> None:
        super().__init__()
        self.model, self.c = model, c
        self.training = model.training  # torchattacks restores the mode it reads here onto the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :self.c])


def _import(name: str):
    try:
        import torchattacks
    except ImportError:
        raise UserError(f"{name} needs torchattacks: {INSTALL}") from None
    found = getattr(torchattacks, "__version__", "?")
    if found != VERSION:
        raise UserError(f"{name} is written against torchattacks {VERSION}, found {found}: {INSTALL}")
    return torchattacks


@dataclass
class TorchAttack(Attack):
    """A torchattacks attack run in fixed groups of examples (the base of every ``ta.*``)."""

    # torchattacks draws for a whole batch; groups of this many consecutive example indices, group
    # g seeded with mix(seed, g), make an outcome independent of the evaluator's batches.
    group: int = 256

    spec: ClassVar[Spec]
    core: ClassVar[bool] = False  # a catalogue attack: run when asked, never by the demo
    name: ClassVar[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or isinstance(value, bool):
                continue
            if isinstance(value, int) and value < 1:
                raise UserError(f"{self.name} {f.name} must be at least 1, got {value}")
            if f.name == "step_size" and not value > 0:
                raise UserError(f"{self.name} step_size must be positive, got {value}")
        for param, allowed in self.spec.choices.items():
            if getattr(self, param) not in allowed:
                raise UserError(f"{self.name} {param} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, param)!r}")

    @property
    def unit(self) -> int:
        return self.group

    def arguments(self, seed: int, n_classes: int) -> dict[str, Any]:
        """The torchattacks constructor's keyword arguments."""
        spec = self.spec
        out: dict[str, Any] = {}
        skip = {f.name for f in dataclasses.fields(TorchAttack)}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            if f.name in spec.ratio:
                out[spec.ratio[f.name]] = value * self.eps
            else:
                out[spec.rename.get(f.name, f.name)] = value
        if spec.eps_arg is not None:
            out[spec.eps_arg] = self.eps
        if len(spec.norms) > 1:
            out["norm"] = NORM_NAMES[self.norm]
        if spec.seeded:
            out["seed"] = seed
        if spec.n_classes:
            out["n_classes"] = n_classes
        return out

    def min_classes(self) -> int:
        """DLR losses read the 3rd (untargeted) or 4th (targeted) largest logit."""
        if self.spec.cls in ("APGDT", "AutoAttack"):
            return 3 if getattr(self, "version", "") == "rand" else 4
        return 3 if getattr(self, "loss", "") == "dlr" else 2

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Runs torchattacks once per group of examples (see ``group``)."""
        ta = _import(self.name)
        x_adv = x.detach().clone()
        seen: list[str] = []
        groups = torch.div(index, self.group, rounding_mode="floor")
        for g in torch.unique(groups).tolist():
            members = (groups == g).nonzero().flatten().to(x.device)
            x_adv[members] = self._run_group(ta, model, x[members], y[members], mix(self.seed, g), seen)
        self.last_warnings = seen
        return x_adv

    def _run_group(self, ta, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
                   seen: list[str]) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        x, y = x.detach(), y.detach().to(x.device)
        with torch.no_grad():
            n_classes = model(x[:1]).shape[-1]
        if n_classes < self.min_classes():
            raise UserError(f"{self.name} needs at least {self.min_classes()} classes (its DLR loss), "
                            f"the model has {n_classes}")
        x = x.contiguous()  # torchattacks reshapes inputs and their gradients with .view
        net, x_in = ContiguousInput(model), x
        if self.spec.rgb:
            c = x.shape[1]
            if c > 3:
                raise UserError(f"{self.name} works on images of at most 3 channels (torchattacks fixes 3), got {c}")
            if c < 3:
                net, x_in = _FirstChannels(net, c), torch.cat([x, x.new_zeros(len(x), 3 - c, *x.shape[2:])], 1)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _quiet(), _parameter_grads_kept(model):
            torch.manual_seed(seed)
            attack = getattr(ta, self.spec.cls)(net, **self.arguments(seed, n_classes))
            attack.set_device(x.device)
            out = attack(x_in, y)
        out = out.detach()[:, :x.shape[1]].to(device=x.device, dtype=x.dtype)
        return self._settle(out, x, seen)

    def _settle(self, out: torch.Tensor, x: torch.Tensor, seen: list[str]) -> torch.Tensor:
        """Non-finite and (minimum-norm) over-budget examples -> x; rounding excess projected."""
        out = out.clone()
        bad = ~torch.isfinite(out).flatten(1).all(1)
        if bad.any():
            out[bad] = x[bad]
            msg = (f"torchattacks {self.spec.cls} returned non-finite pixels for some examples (e.g. 0/0 on a "
                   "zero gradient); they count as not broken (x_adv = x)")
            if msg not in seen:
                seen.append(msg)
        delta = out - x
        if self.spec.eps_arg is None:  # minimum-norm: a longer perturbation does not count at eps
            over = delta.flatten(1).double().norm(dim=1) > self.eps
            out[over], delta[over] = x[over], 0
        if self.norm == "l2":
            dist = delta.flatten(1).norm(dim=1)
            rounding = (dist > self.eps) & (dist <= self.eps * (1 + ROUNDING) + ROUNDING)
            shape = (-1, *[1] * (x.dim() - 1))
            out = torch.where(rounding.view(shape), x + delta * (self.eps / dist.clamp_min(1e-30)).view(shape), out)
            lo, hi = torch.zeros_like(x), torch.ones_like(x)
        else:
            lo, hi = (x - self.eps).clamp(0, 1), (x + self.eps).clamp(0, 1)
        escaped = (out < lo - ROUNDING) | (out > hi + ROUNDING)
        return torch.where(escaped, out, out.clamp(lo, hi))


def _make(name: str, spec: Spec, order: int) -> type[TorchAttack]:
    fields: list[tuple[str, type, Any]] = [("norm", str, dataclasses.field(default=spec.norms[0]))]
    fields += [(k, type(_RENAMED_DEFAULTS[k]), dataclasses.field(default=_RENAMED_DEFAULTS[k])) for k in spec.rename]
    fields += [(k, type(v), dataclasses.field(default=v)) for k, v in spec.params.items()]
    norms = " or ".join(n.replace("linf", "L-inf").replace("l2", "L2") for n in spec.norms)
    namespace = {
        "__doc__": f"torchattacks {spec.cls}: {spec.doc}; {norms}.",
        "spec": spec, "name": PREFIX + name, "label": spec.label or f"TA-{spec.cls}", "order": order,
        "norms": spec.norms, "black_box": spec.black_box,
    }
    cls_name = "TA" + spec.cls
    cls = dataclasses.make_dataclass(cls_name, fields, bases=(TorchAttack,), namespace=namespace)
    cls.__module__ = __name__
    return cls


# After robench's own attacks (pgd 10, cw 20, nattack 30, autoattack 40), in the table's order.
for _i, (_name, _spec) in enumerate(CATALOGUE.items()):
    globals()[f"TA{_spec.cls}"] = ATTACKS.register(PREFIX + _name)(_make(_name, _spec, 100 + _i))
