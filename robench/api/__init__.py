"""robench from Python: load, evaluate, compare, train and benchmark your own ``nn.Module``
with the results store's guarantees (per-example outcomes, batch-size invariance, resume,
Wilson intervals, paired tests). The same names are exported by ``robench`` itself::

    import robench
    model = robench.load_model("pgdat-digits")
    results = robench.evaluate(model, "digits", ["pgd"], n=100, workdir="robench-runs")
    results.accuracy("pgd"), results.interval("pgd"), results.worst_case()
"""

from robench.api.models import load_model, model_digest
from robench.api.results import Comparison, Results
from robench.api.run import benchmark, compare, evaluate, train
from robench.errors import UserError

__all__ = ["Comparison", "Results", "UserError", "benchmark", "compare", "evaluate", "load_model", "model_digest",
           "train"]
