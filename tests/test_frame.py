"""Per-example outcomes as a data frame (robench.outcomes_frame) and `robench export`."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from robench import outcomes_frame
from robench.attack import make_attack
from robench.cli import cli
from robench.store import Examples, Key, Row, Store, wilson

STRINGS = {c: str for c in ("checkpoint", "defense", "dataset", "split", "data", "kind", "attack", "norm", "params",
                            "setting", "created")}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="robench")


def put(store, sha, defense, name, outcomes, start=0, kind="attack", **params):
    outcomes = np.asarray(outcomes, dtype=np.float32)
    if kind == "attack" and name != "clean":
        params = {**make_attack(name, "digits", params.pop("eps", None)).params(), **params}
    key = Key.make(sha, "digits", Examples("test", start, start + len(outcomes), "d1g1t5"), kind, name, params)
    ci = wilson(outcomes.sum(), len(outcomes)) if kind == "attack" else None
    created = f"2024-01-0{len(outcomes) % 9 + 1}T00:00:00"
    row = Row(key, defense, float(outcomes.mean()), ci, outcomes, 1.0, {}, "cpu", created)
    store.put(row)
    return row


@pytest.fixture
def wd(tmp_path):
    rng = np.random.default_rng(0)
    wd = tmp_path / "wd"
    with Store.in_workdir(wd) as store:
        rows = [put(store, "a" * 64, "pgdat", "clean", rng.random(30) < 0.9),
                put(store, "a" * 64, "pgdat", "pgd", rng.random(30) < 0.6),
                put(store, "a" * 64, "pgdat", "pgd", rng.random(10) < 0.6, start=5, eps=0.1),
                put(store, "a" * 64, "pgdat", "pgd", rng.random(12) < 0.6, attack_steps=1),
                put(store, "b" * 64, "standard", "pgd", np.zeros(30)),
                put(store, "b" * 64, "standard", "gamma", rng.random(20), kind="sensitivity", value=0.8)]
    return wd, rows


def test_the_frame_is_the_stored_outcomes(wd):
    wd, rows = wd
    frame = outcomes_frame(wd)
    assert list(frame.columns) == ["checkpoint", "defense", "dataset", "split", "example", "data", "kind", "attack",
                                   "eps", "norm", "params", "setting", "outcome", "created"]
    assert len(frame) == sum(r.key.n for r in rows)
    for r in rows:
        part = frame[(frame.checkpoint == r.key.checkpoint) & (frame.attack == r.key.name)
                     & (frame.params == r.key.params)]
        start, stop = r.key.range
        assert part.example.tolist() == list(range(start, stop))
        assert np.array_equal(part.outcome.to_numpy(), r.outcomes.astype(np.float64))
        assert set(part.created) == {r.created} and set(part.defense) == {r.defense} and set(part.data) == {"d1g1t5"}
    settings = frame.groupby(["attack", "params"], sort=False).setting.first().tolist()
    assert settings == ["", "eps=0.2", "eps=0.1", "eps=0.2, attack_steps=1", "value=0.8"]
    pgd = frame[frame.attack == "pgd"]
    assert set(pgd.norm) == {"linf"} and set(pgd.eps) == {0.2, 0.1}
    assert frame[frame.kind == "sensitivity"].eps.isna().all() and frame[frame.attack == "clean"].norm.isna().all()


def test_filters(wd):
    wd, rows = wd
    assert set(outcomes_frame(wd, defenses="standard").attack) == {"pgd", "gamma"}
    only = outcomes_frame(wd, defenses=["pgdat"], attacks=["pgd"])
    assert len(only) == 30 + 10 + 12 and set(only.defense) == {"pgdat"}
    assert outcomes_frame(wd, dataset="cifar10").empty
    (wd.parent / "no-db").mkdir()
    assert outcomes_frame(wd.parent / "no-db").empty  # no results database: nothing, and none created
    assert not (wd.parent / "no-db" / "results.sqlite").exists()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_round_trips(wd, fmt, tmp_path):
    wd, _ = wd
    frame = outcomes_frame(wd)
    out = tmp_path / f"outcomes.{fmt}"
    r = invoke("export", "--format", fmt, "--out", out, "--workdir", wd)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"wrote {len(frame)} rows to {out}"
    back = (pd.read_csv(out, dtype=STRINGS, keep_default_na=False, na_values={"eps": [""], "norm": [""]})
            if fmt == "csv" else pd.read_json(out, lines=True, dtype={**STRINGS, "eps": float}))
    assert back.columns.tolist() == frame.columns.tolist() and len(back) == len(frame)
    for c in frame.columns:
        if c in ("eps", "outcome", "example"):
            exact = fmt == "csv"  # JSON lines hold 15 significant digits
            assert np.allclose(back[c].to_numpy(float), frame[c].to_numpy(float), equal_nan=True,
                               rtol=0 if exact else 1e-13, atol=0), c
        else:
            assert back[c].fillna("").astype(str).tolist() == frame[c].fillna("").astype(str).tolist(), c
    # To standard output, with filters.
    r = invoke("export", "--format", fmt, "--defense", "standard", "--attacks", "pgd", "--workdir", wd)
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    if fmt == "jsonl":
        assert [json.loads(line)["outcome"] for line in lines] == [0.0] * 30
    else:
        assert len(lines) == 31 and lines[0].startswith("checkpoint,defense,")


@pytest.mark.parametrize("args,expect", [
    (["--defense", "trades"], "no stored results in"),
    (["--format", "parquet"], "Invalid value for '--format'"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/missing/x.csv"], "does not exist"),
])
def test_export_errors(wd, tmp_path, args, expect):
    wd, _ = wd
    r = invoke("export", *(a.format(tmp=tmp_path) for a in args), "--workdir", wd)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/.*.tmp"))
