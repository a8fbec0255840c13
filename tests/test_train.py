"""Training: resume is bit-identical, checkpoints are verified, bad settings are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import robench.train as train_mod
from robench import checkpoint
from robench.errors import UserError
from robench.models import build_model
from robench.train import TrainConfig, train

FAST = dict(arch="tiny-cnn", steps=24, attack_steps=2, n_train=256)


def cfg(defense="rlfat-t", **kw):
    return TrainConfig(defense, "digits", **{**FAST, **kw})


def weights(run_dir):
    meta = checkpoint.read_meta(run_dir)
    return load_file(str(run_dir / meta["files"]["weights"]["name"]))


def run(tmp_path, digits, name, c=None, **kw):
    return train(c or cfg(), tmp_path, name=name, splits=digits, checkpoint_every=8, log_every=4,
                 progress=False, **kw)


def test_interrupted_run_resumes_bit_identical(tmp_path, digits, monkeypatch):
    full = run(tmp_path, digits, "full")
    real_seed = train_mod.step_seed

    def interrupt_at_13(seed, step, rank=0):
        if step == 13:
            raise KeyboardInterrupt
        return real_seed(seed, step, rank)

    monkeypatch.setattr(train_mod, "step_seed", interrupt_at_13)
    with pytest.raises(UserError, match="step 8"):
        run(tmp_path, digits, "cut")
    assert checkpoint.read_meta(tmp_path / "runs" / "cut")["step"] == 8
    monkeypatch.setattr(train_mod, "step_seed", real_seed)
    resumed = run(tmp_path, digits, "cut", resume=True)

    a, b = weights(full.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = lambda r: [(row.split(",")[:3]) for row in (r.run_dir / "train_log.csv").read_text().splitlines()]
    assert log(full) == log(resumed)
    assert resumed.meta["step"] == 24 and resumed.meta["finished"]


def test_extending_steps_with_resume_continues(tmp_path, digits):
    short = run(tmp_path, digits, "r", c=cfg(steps=8))
    longer = run(tmp_path, digits, "r", c=cfg(steps=24), resume=True)
    full = run(tmp_path, digits, "full")
    assert short.meta["step"] == 8 and longer.meta["step"] == 24
    for k, v in weights(full.run_dir).items():
        assert torch.equal(v, weights(longer.run_dir)[k])


def test_existing_run_needs_resume(tmp_path, digits):
    run(tmp_path, digits, "x", c=cfg(steps=4))
    with pytest.raises(UserError, match="already exists"):
        run(tmp_path, digits, "x", c=cfg(steps=4))
    with pytest.raises(UserError, match="differ.*eps"):
        run(tmp_path, digits, "x", c=cfg(steps=4, eps=0.3), resume=True)


def test_checkpoint_records_provenance(tmp_path, digits):
    meta = run(tmp_path, digits, "p", c=cfg(steps=4)).meta
    assert meta["defense"] == "rlfat-t" and meta["dataset"] == "digits" and meta["arch"] == "tiny-cnn"
    assert meta["config"]["lam"] == 6.0 and meta["config"]["eta"] == 1.0 and meta["config"]["seed"] == 0
    assert meta["objective"]["rbs_mode"] == "batch"
    assert meta["versions"]["torch"] == torch.__version__ and "robench" in meta["versions"]
    assert len(meta["files"]["weights"]["sha256"]) == 64
    # only the newest pair of files is kept
    assert len(list((tmp_path / "runs" / "p").glob("weights-*"))) == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
    with pytest.raises(UserError, match="NaN"):
        run(tmp_path, digits, "nan", c=cfg(defense="standard", lr=1e30, steps=200))
    meta = checkpoint.read_meta(tmp_path / "runs" / "nan")
    assert not meta["finished"]
    for v in weights(tmp_path / "runs" / "nan").values():
        assert torch.isfinite(v.float()).all()


def make_run(tmp_path, digits):
    return run(tmp_path, digits, "c", c=cfg(steps=4)).run_dir


def test_corrupted_weights_are_refused(tmp_path, digits):
    run_dir = make_run(tmp_path, digits)
    w = next(run_dir.glob("weights-*"))
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted: sha256"):
        checkpoint.load(run_dir, build_model("tiny-cnn", 1, 10))


def test_garbage_record_is_refused(tmp_path, digits):
    run_dir = make_run(tmp_path, digits)
    (run_dir / "checkpoint.json").write_text("<html>gone</html>")
    with pytest.raises(UserError, match="not a robench checkpoint"):
        checkpoint.read_meta(run_dir)


def test_foreign_weights_are_refused(tmp_path, digits):
    """A valid safetensors file of another model: the hash matches, the architecture does not."""
    run_dir = make_run(tmp_path, digits)
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    w = run_dir / meta["files"]["weights"]["name"]
    save_file({"fc.weight": torch.zeros(3, 3)}, str(w))
    meta["files"]["weights"]["sha256"] = checkpoint.sha256(w)
    (run_dir / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit architecture"):
        checkpoint.load(run_dir, build_model("tiny-cnn", 1, 10))


def test_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a valid safetensors"):
        checkpoint.load_weights(bad)


@pytest.mark.parametrize("kw,msg", [
    (dict(steps=0), "--steps"), (dict(batch_size=0), "--batch-size"), (dict(eps=0.0), "--eps"),
    (dict(eps=1.5), "--eps"), (dict(rbs_mode="pixel"), "--rbs-mode"), (dict(attack_mode="x"), "--attack-mode"),
    (dict(arch="resnet9000"), "unknown architecture"),
])
def test_bad_settings_are_user_errors(tmp_path, digits, kw, msg):
    with pytest.raises(UserError, match=msg):
        run(tmp_path, digits, "bad", c=cfg(**kw))
    assert not (tmp_path / "runs" / "bad" / "checkpoint.json").exists()


def test_batch_order_covers_each_epoch_once():
    order = train_mod.BatchOrder(100, 10, seed=3)
    seen = torch.cat([order.indices(s) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(order.indices(0), order.indices(10))  # a new epoch reshuffles
