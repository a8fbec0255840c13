"""A new defense is exactly one file: written outside robench at test time, named in
$ROBENCH_PLUGINS, it is listed, trained with its own setting (-o), evaluated and reported."""

import re
import sys
import uuid

import pytest
from click.testing import CliRunner

from robench import checkpoint
from robench.cli import cli
from robench.registry import DEFENSES, PLUGINS_ENV

NAME = "toy-mix"

# The whole plugin: one dataclass field is its one new hyper-parameter.
TOY = f'''
from dataclasses import dataclass

from torch.nn import functional as F

from robench.defense import AdversarialDefense, setting
from robench.registry import DEFENSES


@DEFENSES.register("{NAME}")
@dataclass
class ToyMix(AdversarialDefense):
    summary = "CE(z(x'), y) + alpha CE(z(x), y), x' = PGD on CE (a test plugin)"

    alpha: float = setting(0.25, lambda v: v >= 0, "-o {NAME}.alpha must be non-negative")

    def loss(self, model, x, x_adv, y):
        logits_adv = model(x_adv)
        clean = F.cross_entropy(model(x).float(), y)
        return F.cross_entropy(logits_adv.float(), y) + self.alpha * clean, logits_adv
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    module = f"robench_toy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(PLUGINS_ENV, module)
    try:
        yield NAME
    finally:  # other tests must not see the plugin
        DEFENSES.unregister(NAME)
        sys.modules.pop(module, None)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")


def test_a_defense_in_one_file_is_listed_trained_and_evaluated(plugin, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    r = invoke("list", "--workdir", wd)
    assert r.exit_code == 0, r.output
    assert plugin in r.output and "alpha=0.25" in r.output

    r = invoke("train", plugin, "--dataset", "digits", "--arch", "tiny-cnn", "--steps", "5", "--attack-steps", "2",
               "-o", f"{plugin}.alpha=0.5", "--no-progress", "--workdir", wd)
    assert r.exit_code == 0, r.output
    meta = checkpoint.read_meta(wd / "runs" / f"{plugin}-digits-s0")
    assert meta["objective"]["alpha"] == 0.5 and meta["config"]["alpha"] == 0.5
    assert meta["objective"]["attack_steps"] == 2 and meta["finished"]

    r = invoke("eval", "--defense", plugin, "--attacks", "pgd", "--n", "20", "--no-progress", "--workdir", wd)
    assert r.exit_code == 0, r.output
    assert plugin in r.output and "pgd" in r.output

    r = invoke("report", "--workdir", wd, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    report = (tmp_path / "out" / "report.md").read_text()
    table1 = report.split("## Accuracy (Table 1 format)")[1].split("\n## ")[0]
    assert re.search(rf"\| {plugin} \| [\d.]+ \[", table1)  # its row, with clean accuracy
    assert "alpha=0.5" in report.split("## Provenance")[1]  # its own setting, in provenance


@pytest.mark.parametrize("args,expect", [
    (["-o", f"{NAME}.alpha=-1"], f"-o {NAME}.alpha must be non-negative, got -1.0"),
    (["-o", f"{NAME}.alpha=abc"], f"-o {NAME}.alpha='abc': expected float"),
    (["-o", f"{NAME}.beta=1"], f"defense {NAME} has no parameter.* beta; its parameters: eps, .*alpha"),
    (["--lam", "1"], f"--lam has no effect on {NAME}; it applies to: rbsat-t, rlfat-t, trades"),
])
def test_the_plugins_settings_are_checked(plugin, tmp_path, args, expect):
    r = invoke("train", plugin, "--arch", "tiny-cnn", "--steps", "5", *args, "--workdir", tmp_path / "wd")
    assert r.exit_code == 2
    assert re.search(expect, r.stderr), r.stderr
    assert not (tmp_path / "wd" / "runs").exists()
