"""Training: resume is bit-identical, checkpoints are verified, bad settings are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import robench.training as train_mod
from robench import checkpoint
from robench.errors import UserError
from robench.models import build_model
from robench.training import TrainConfig, train

FAST = dict(arch="tiny-cnn", steps=24, attack_steps=2, n_train=256)


def cfg(defense="rlfat-t", **kw):
    """A TrainConfig; keyword arguments that are not its fields are the defense's ``options``."""
    kw = {**FAST, **kw}
    if defense == "standard":
        del kw["attack_steps"]  # no adversary, so no attack settings
    own = {k: v for k, v in kw.items() if k in train_mod.CONFIG_FIELDS}
    return TrainConfig(defense, "digits", **own, options={k: v for k, v in kw.items() if k not in own})


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


def _draws(defense_name, mode, step, rank, exclude=False):
    """What ``train`` draws at ``step`` on ``rank``: the global RNG (flip, PGD start) and the
    shuffle RBS applies (shown on an image whose pixels are numbered)."""
    c = cfg(defense_name, rbs_mode=mode, rbs_exclude_identity=exclude).resolved()
    d = c.make_defense()
    train_mod.seed_step(c, step, rank, d)
    flip = torch.rand(8)
    probe = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    return flip, d.rbs(probe)


@pytest.mark.parametrize("exclude", [False, True])
def test_batch_mode_rbs_is_one_draw_per_global_batch(exclude):
    """Under torchrun each rank holds a shard of the global batch; batch-mode RBS must shuffle
    every shard the same way (one draw per global batch, as the official code), while the flip
    and PGD start stay per rank. The draw depends on (seed, step) only."""
    for step in (0, 7, 100):
        flip0, rbs0 = _draws("rlfat-p", "batch", step, rank=0, exclude=exclude)
        flip1, rbs1 = _draws("rlfat-p", "batch", step, rank=1, exclude=exclude)
        assert torch.equal(rbs0, rbs1)  # the same shuffle on both ranks
        assert not torch.equal(flip0, flip1)  # per-rank draws stay per rank
        assert torch.equal(rbs0, _draws("rlfat-p", "batch", step, rank=0, exclude=exclude)[1])  # reproducible
    assert train_mod.rbs_seed(0, 5) != train_mod.rbs_seed(0, 6) != train_mod.rbs_seed(1, 6)
    shuffles = {tuple(_draws("rlfat-t", "batch", s, rank=0)[1].flatten().tolist()) for s in range(40)}
    assert len(shuffles) > 10  # a fresh draw every step


def test_image_mode_rbs_draws_per_rank():
    a = _draws("rlfat-t", "image", 3, rank=0)[1]
    b = _draws("rlfat-t", "image", 3, rank=1)[1]
    assert not torch.equal(a, b)
    assert torch.equal(a, _draws("rlfat-t", "image", 3, rank=0)[1])


def test_rbs_exclude_identity_is_recorded_and_checked_on_resume(tmp_path, digits):
    meta = run(tmp_path, digits, "x", c=cfg(steps=4, rbs_exclude_identity=True)).meta
    assert meta["config"]["rbs_exclude_identity"] is True
    assert meta["objective"]["rbs_exclude_identity"] is True
    on_disk = json.loads((tmp_path / "runs" / "x" / "checkpoint.json").read_text())
    assert on_disk["config"]["rbs_exclude_identity"] is True
    with pytest.raises(UserError, match="differ.*rbs_exclude_identity"):
        run(tmp_path, digits, "x", c=cfg(steps=8), resume=True)
    assert run(tmp_path, digits, "x", c=cfg(steps=8, rbs_exclude_identity=True), resume=True).meta["step"] == 8
    assert run(tmp_path, digits, "off", c=cfg(steps=4)).meta["objective"]["rbs_exclude_identity"] is False


def test_run_from_before_a_setting_existed_resumes(tmp_path, digits):
    """A checkpoint record without a newer setting compares it with the setting's default."""
    run_dir = run(tmp_path, digits, "old", c=cfg(steps=4)).run_dir
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    del meta["config"]["rbs_exclude_identity"]
    (run_dir / "checkpoint.json").write_text(json.dumps(meta))
    assert run(tmp_path, digits, "old", c=cfg(steps=8), resume=True).meta["step"] == 8


def test_run_from_before_defense_options_resumes(tmp_path, digits):
    """A record written when every defense setting was a TrainConfig field (PGDAT with lam, eta
    and the RBS settings it never used) resumes; a changed setting that it uses is refused."""
    c = cfg("pgdat", steps=4)
    run_dir = run(tmp_path, digits, "old", c=c).run_dir
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    meta["config"].update(lam=0.0, eta=0.0, rbs_k=2, rbs_mode="batch", rbs_exclude_identity=False)
    (run_dir / "checkpoint.json").write_text(json.dumps(meta))
    assert run(tmp_path, digits, "old", c=cfg("pgdat", steps=8), resume=True).meta["step"] == 8
    with pytest.raises(UserError, match="differ.*attack_mode"):
        run(tmp_path, digits, "old", c=cfg("pgdat", steps=12, attack_mode="train"), resume=True)


def test_options_are_resolved_against_the_defense(digits):
    c = cfg("trades", lam=3).resolved()
    assert c.options == {"eps": 0.2, "step_size": 0.05, "attack_steps": 2, "attack_mode": "eval", "lam": 3.0}
    assert c.record()["lam"] == 3.0 and c.record()["steps"] == 24
    with pytest.raises(UserError, match="defense pgdat has no parameter.* lam; its parameters: eps, step_size"):
        cfg("pgdat", lam=3).resolved()
    with pytest.raises(UserError, match="defense standard has no parameter.* attack_steps; its parameters: none"):
        TrainConfig("standard", options={"attack_steps": 3}).resolved()


def test_shortcut_flags_feed_the_same_options_as_o():
    from robench.cli.training import defense_options

    flags = dict(lam=3.0, rbs_mode=None, rbs_exclude_identity=False)
    assert defense_options("trades", (), flags) == defense_options("trades", ("trades.lam=3.0",), {}) == {"lam": 3.0}
    both = defense_options("rlfat-p", ("rlfat-p.rbs_k=3",), dict(rbs_exclude_identity=True, rbs_mode="image"))
    assert both == {"rbs_k": 3, "rbs_exclude_identity": True, "rbs_mode": "image"}


def test_n_train_larger_than_the_training_set_is_refused(tmp_path, digits):
    with pytest.raises(UserError, match="--n-train 5000 is larger"):
        run(tmp_path, digits, "big", c=cfg(n_train=5000))
    assert not (tmp_path / "runs" / "big").exists()


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", ".hidden", " x", "x ", "a\\b"])
def test_run_names_must_be_plain(tmp_path, digits, name):
    with pytest.raises(UserError, match="--name"):
        run(tmp_path, digits, name, c=cfg(steps=4))
    assert not (tmp_path / "runs").exists()
