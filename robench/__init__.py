"""robench: train and benchmark robust image classifiers around RLFAT (ICLR 2020).

The Python API (``robench.api``; imported on first use, so ``import robench`` stays light):

- ``load_model(name)``: a zoo entry or a trained run as an ``nn.Module``;
- ``evaluate(model, data, attacks)``: per-example outcomes of any ``nn.Module`` -> ``Results``;
- ``compare(results_a, results_b)``: the paired difference, Newcombe interval and McNemar p;
- ``train(defense, dataset, workdir=...)``: what ``robench train`` does, returning the run;
- ``benchmark(model, dataset)``: clean and AutoAttack accuracy as RobustBench model info;
- ``outcomes_frame(workdir)``: every stored per-example outcome as a DataFrame.

``robench.evaluate``, ``robench.train`` and ``robench.compare`` are also the names of the
engine's modules. Those modules stay importable as they are (``from robench.evaluate import
run_eval``), and calling one (``robench.evaluate(model, ...)``) calls the API function of that
name: the package gives the three modules a callable module type when they are imported.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from robench.frame import outcomes_frame  # noqa: E402  (light: pandas is imported when it is called)

if TYPE_CHECKING:
    from robench.api import Comparison, Results, benchmark, compare, evaluate, load_model, train
    from robench.errors import UserError

__all__ = ["Comparison", "Results", "UserError", "__version__", "benchmark", "compare", "evaluate", "load_model",
           "outcomes_frame", "train"]

_API = {"Comparison", "Results", "benchmark", "compare", "evaluate", "load_model", "train"}
_CALLABLE_MODULES = {"evaluate", "train", "compare"}  # engine modules that share an API function's name


class _CallableModule(types.ModuleType):
    """An engine module that, called, runs the API function of its name (``robench.evaluate``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from robench import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds a submodule here once it is imported: make it callable.
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in _CALLABLE_MODULES:  # any imported before the package was complete
    if type(sys.modules.get(f"{__name__}.{_name}")) is types.ModuleType:
        sys.modules[f"{__name__}.{_name}"].__class__ = _CallableModule


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:  # not imported yet: the module, made callable on import
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _API:
        from robench import api

        return getattr(api, name)
    if name == "UserError":
        from robench.errors import UserError

        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
