"""The Python API (issue 21): your own nn.Module, tensors and loaders through the engine, with the
store's guarantees; the same rows as `robench eval`; one UserError for bad input, nothing stored."""

import runpy
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import robench
from robench.errors import UserError
from robench.registry import ATTACKS

ROOT = Path(__file__).resolve().parents[1]
FAST = {"pgd": {"attack_steps": 3}}  # a cheap PGD for the tests that only need an attack


class TinyNet(nn.Module):
    """A CNN robench does not know, with BatchNorm (its mode matters)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(8 * 8 * 8, classes))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def tiny(digits):
    """TinyNet trained for a few steps on digits with plain torch, in eval mode."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        i = torch.arange(step * 20, step * 20 + 20) % len(digits.x_train)
        loss = nn.functional.cross_entropy(model(digits.x_train[i]), digits.y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def count_rows(workdir: Path) -> int:
    with sqlite3.connect(workdir / "results.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def test_outcomes_of_own_model_on_tensors_do_not_depend_on_batch_size(tiny, digits):
    x, y = digits.x_test[:60], digits.y_test[:60]
    a = robench.evaluate(tiny, (x, y), ["pgd", "cw"], eps=0.2, batch_size=7, progress=False, **FAST)
    b = robench.evaluate(tiny, (x, y), ["pgd", "cw"], eps=0.2, batch_size=64, progress=False, **FAST)
    for attack in ("clean", "pgd", "cw"):
        assert np.array_equal(a.outcomes(attack), b.outcomes(attack))
    assert a.accuracy("clean") > 0.5  # the few steps trained something
    assert a.accuracy("pgd") < a.accuracy("clean")  # and the attack does something
    assert a.checkpoint == robench.api.model_digest(tiny)
    assert a.dataset == "custom" and a.label == "TinyNet"


def test_a_dataloader_a_splits_and_a_name_give_the_same_outcomes(tiny, digits):
    from robench.data import Splits

    x, y = digits.x_test, digits.y_test
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=33)
    runs = [robench.evaluate(tiny, data, ["pgd"], n=40, dataset="digits", progress=False, **FAST)
            for data in (loader, (x, y), Splits("digits", x[:0], y[:0], x, y, digits.classes))]
    runs.append(robench.evaluate(tiny, "digits", ["pgd"], n=40, progress=False, **FAST))
    for r in runs[1:]:
        assert r.rows["pgd"].key == runs[0].rows["pgd"].key
        assert np.array_equal(r.outcomes("pgd"), runs[0].outcomes("pgd"))


def test_api_and_cli_store_the_same_rows_and_a_second_call_runs_nothing(tmp_path, monkeypatch):
    from robench.cli import cli

    cli_wd, api_wd = tmp_path / "cli", tmp_path / "api"
    r = CliRunner().invoke(cli, ["eval", "--defense", "pgdat-digits", "--attacks", "pgd", "--n", "100",
                                 "--no-progress", "--workdir", str(cli_wd)], prog_name="robench")
    assert r.exit_code == 0, r.output
    results = robench.evaluate(robench.load_model("pgdat-digits"), "digits", ["pgd"], n=100, workdir=api_wd,
                               progress=False)
    cols = "checkpoint, defense, dataset, split, examples, data, kind, name, params, n, value, ci_low, ci_high, " \
           "outcomes, versions, device, warnings"  # all but when it ran and how long it took
    rows = []
    for wd in (cli_wd, api_wd):
        with sqlite3.connect(wd / "results.sqlite") as db:
            rows.append(db.execute(f"SELECT {cols} FROM results ORDER BY kind, name").fetchall())
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert results.table().splitlines()[-3:] == r.output.strip().splitlines()[-3:]

    def boom(*a, **k):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(ATTACKS.get("pgd"), "perturb", boom)
    again = robench.evaluate(robench.load_model("pgdat-digits"), "digits", ["pgd"], n=100, workdir=api_wd,
                             progress=False, batch_size=13)
    assert count_rows(api_wd) == 2
    assert again.to_dict() == results.to_dict()


def test_an_interrupted_evaluation_resumes_at_another_batch_size(tiny, digits, tmp_path, monkeypatch):
    x, y = digits.x_test[:30], digits.y_test[:30]
    whole = robench.evaluate(tiny, (x, y), ["pgd"], eps=0.2, progress=False, **FAST)
    cls, real, calls = ATTACKS.get("pgd"), ATTACKS.get("pgd").perturb, []

    def stop_after_two(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "perturb", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        robench.evaluate(tiny, (x, y), ["pgd"], eps=0.2, batch_size=5, workdir=tmp_path, progress=False, **FAST)
    monkeypatch.setattr(cls, "perturb", real)
    resumed = robench.evaluate(tiny, (x, y), ["pgd"], eps=0.2, batch_size=8, workdir=tmp_path, progress=False, **FAST)
    assert np.array_equal(resumed.outcomes("pgd"), whole.outcomes("pgd"))
    assert resumed.rows["pgd"].key == whole.rows["pgd"].key


def test_a_changed_model_is_a_new_identity(tiny, digits):
    import copy

    x, y = digits.x_test[:10], digits.y_test[:10]
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.body[0].bias.add_(0.01)
    assert robench.api.model_digest(other) != robench.api.model_digest(tiny)
    zoo = robench.load_model("pgdat-digits")
    same = robench.evaluate(zoo, (x, y), ["pgd"], dataset="digits", progress=False, **FAST)
    with torch.no_grad():
        next(zoo.parameters()).mul_(1.0001)
    changed = robench.evaluate(zoo, (x, y), ["pgd"], dataset="digits", progress=False, **FAST)
    assert same.label == "pgdat" and changed.label == "SmallCNN"
    assert same.checkpoint != changed.checkpoint == robench.api.model_digest(zoo)


def test_results_views(tiny, digits):
    r = robench.evaluate(tiny, "digits", ["pgd"], n=50, name="mine", progress=False, **FAST)
    assert r.attacks == ["clean", "pgd"]
    lo, hi = r.interval("pgd")
    assert lo <= r.accuracy("pgd") <= hi
    assert r.worst_case() <= min(r.accuracy("clean"), r.accuracy("pgd"))
    frame = r.frame()
    from robench.frame import COLUMNS

    assert tuple(frame.columns) == COLUMNS and len(frame) == 100
    assert frame[frame.attack == "pgd"].outcome.mean() == pytest.approx(r.accuracy("pgd"))
    assert "mine" in r.table() and "worst case" in r.table()
    assert r.to_dict()["results"][0]["defense"] == "mine"
    assert repr(r).startswith("<Results mine on digits") and len(repr(r)) < 200
    assert "| mine |" in r._repr_markdown_() and "<table>" in r._repr_html_()
    with pytest.raises(UserError, match="these results hold: clean, pgd"):
        r.accuracy("cw")


def test_a_model_in_training_mode_is_evaluated_in_eval_mode_and_given_back(tiny, digits):
    x, y = digits.x_test[:20], digits.y_test[:20]
    expected = robench.evaluate(tiny, (x, y), ["pgd"], eps=0.2, progress=False, **FAST)
    tiny.train()
    try:
        with pytest.warns(UserWarning, match="training mode.*BatchNorm2d"):
            got = robench.evaluate(tiny, (x, y), ["pgd"], eps=0.2, progress=False, **FAST)
        assert tiny.training and all(m.training for m in tiny.modules())
        assert all(p.is_contiguous() and p.device.type == "cpu" for p in tiny.parameters())
    finally:
        tiny.eval()
    assert np.array_equal(got.outcomes("pgd"), expected.outcomes("pgd"))


class TwoLogits(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :2]


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: robench.evaluate(TwoLogits(), "digits", ["pgd"], n=10), "returns 2 logits.*10 classes"),
    (lambda m, x, y: robench.evaluate(m, (x * 2, y), ["pgd"], eps=0.2), r"in \[0, 1\]"),
    (lambda m, x, y: robench.evaluate(m, (x, y + 5), ["pgd"], eps=0.2), "label 14 is out of range"),
    (lambda m, x, y: robench.evaluate(m, (x, y[:-1]), ["pgd"], eps=0.2), "10 images but y 9 labels"),
    (lambda m, x, y: robench.evaluate(m, (x, y), ["pgdd"], eps=0.2), "unknown attack 'pgdd'; choose from: .*pgd"),
    (lambda m, x, y: robench.evaluate(m, (x, y), ["pgd"]), "pass eps="),
    (lambda m, x, y: robench.evaluate(m, (x, y), ["pgd"], eps=0.2, cw={"seed": 1}), "not run: cw"),
    (lambda m, x, y: robench.evaluate(m, (x, y), ["pgd"], eps=0.2, n=11), "n=11 is larger"),
    (lambda m, x, y: robench.evaluate(m, (x, y), ["pgd"], eps=0.2, batch_size=0), "batch_size must be a positive integer"),
    (lambda m, x, y: robench.evaluate(m, (x[:, 0], y), ["pgd"], eps=0.2), "4-D tensor"),
    (lambda m, x, y: robench.evaluate("model", (x, y), ["pgd"], eps=0.2), "must be a torch.nn.Module"),
    (lambda m, x, y: robench.evaluate(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                                     shuffle=True), ["pgd"], eps=0.2), "shuffles"),
    (lambda m, x, y: robench.load_model("no-such-model"), "unknown model 'no-such-model'"),
])
def test_bad_input_is_one_user_error_and_nothing_runs_or_is_stored(tiny, digits, tmp_path, monkeypatch, call,
                                                                   message):
    def boom(*a, **k):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(ATTACKS.get("pgd"), "perturb", boom)
    monkeypatch.chdir(tmp_path)  # a stray default workdir would appear here
    x, y = digits.x_test[:10], digits.y_test[:10]
    with pytest.raises(UserError, match=message):
        call(tiny, x, y)
    assert list(tmp_path.iterdir()) == []


def test_compare_two_results(tiny, digits):
    a = robench.evaluate(robench.load_model("pgdat-digits"), "digits", ["pgd"], n=60, progress=False)
    b = robench.evaluate(robench.load_model("standard-digits"), "digits", ["pgd"], n=60, progress=False)
    c = robench.compare(a, b, "pgd")
    s = c["pgd"]
    assert s.n == 60 and s.diff == pytest.approx(a.accuracy("pgd") - b.accuracy("pgd"))
    assert s.ci[0] <= s.diff <= s.ci[1] and 0 <= s.p <= 1
    assert "McNemar p" in c.table() and "pgdat" in repr(c)
    assert list(robench.compare(a, b).results) == ["clean", "pgd"]
    other = robench.evaluate(tiny, "digits", ["pgd"], n=60, progress=False, **FAST)
    with pytest.raises(UserError, match="other settings"):
        robench.compare(a, other, "pgd")


def test_train_returns_the_run_and_load_model_loads_it(tmp_path):
    run = robench.train("standard", "digits", steps=20, workdir=tmp_path, arch="tiny-cnn", progress=False)
    assert run == tmp_path / "runs" / "standard-digits-s0"
    model = robench.load_model("standard-digits-s0", workdir=tmp_path)
    assert robench.load_model("standard", workdir=tmp_path).state_dict().keys() == model.state_dict().keys()
    r = robench.evaluate(model, "digits", ["pgd"], n=20, workdir=tmp_path, progress=False, **FAST)
    from robench import checkpoint

    assert r.checkpoint == checkpoint.read_meta(run)["files"]["weights"]["sha256"] and r.label == "standard"
    with pytest.raises(UserError, match="eta"):
        robench.train("trades", "digits", steps=1, workdir=tmp_path / "x", eta=1.0, progress=False)


def test_benchmark_gives_robustbench_fields(tiny, tmp_path):
    info = robench.benchmark(tiny, "digits", eps=0.2, n=12, workdir=tmp_path, progress=False,
                             version="custom", attacks=("apgd-ce",))
    assert info["dataset"] == "digits" and info["threat_model"] == "Linf" and info["n"] == 12
    assert float(info["autoattack_acc"]) <= float(info["clean_acc"])
    assert info["robench"]["sha256"] == robench.api.model_digest(tiny)
    assert count_rows(tmp_path) == 2


def test_public_names_are_documented_and_typed():
    assert (ROOT / "robench" / "py.typed").is_file()
    for name in robench.__all__:
        if name != "__version__":
            assert getattr(robench, name).__doc__, name
    import robench.evaluation as engine  # the engine's module has its own name, not shadowed by the API's

    assert callable(engine.run_eval) and robench.evaluate is robench.api.evaluate


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBENCH_EXAMPLE_QUICK", "1")
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")


def test_the_readme_example_is_an_example():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "examples" / "evaluate_own_model.py").read_text().split("# --- README ---\n", 1)[1]
