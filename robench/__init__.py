"""robench: train and benchmark robust image classifiers around RLFAT (ICLR 2020).

The Python API (``robench.api``; imported on first use, so ``import robench`` stays light):

- ``load_model(name)``: a zoo entry or a trained run as an ``nn.Module``;
- ``evaluate(model, data, attacks)``: per-example outcomes of any ``nn.Module`` -> ``Results``;
- ``compare(results_a, results_b)``: the paired difference, Newcombe interval and McNemar p;
- ``train(defense, dataset, workdir=...)``: what ``robench train`` does, returning the run;
- ``benchmark(model, dataset)``: clean and AutoAttack accuracy as RobustBench model info;
- ``outcomes_frame(workdir)``: every stored per-example outcome as a DataFrame.

The engine modules behind them are ``robench.evaluation``, ``robench.training`` and
``robench.comparison``, so the API's names never shadow a module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from robench.frame import outcomes_frame  # noqa: E402  (light: pandas is imported when it is called)

if TYPE_CHECKING:
    from robench.api import Comparison, Results, benchmark, compare, evaluate, load_model, train
    from robench.errors import UserError

__all__ = ["Comparison", "Results", "UserError", "__version__", "benchmark", "compare", "evaluate", "load_model",
           "outcomes_frame", "train"]

_API = {"Comparison", "Results", "benchmark", "compare", "evaluate", "load_model", "train"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from robench import api

        return getattr(api, name)
    if name == "UserError":
        from robench.errors import UserError

        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
