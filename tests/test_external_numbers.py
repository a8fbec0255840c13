"""Weights that are not numbers (issue 18, item 9): a model file with NaN or Inf weights, or with
integer (or complex) tensors where the architecture has floating-point weights, is refused with
one line, instead of being evaluated into a 0% result. Integer buffers that are integer in the
model too (BatchNorm's ``num_batches_tracked``) load as they always did, and so do half-precision
files."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from robench.cli import cli
from robench.errors import UserError
from robench.targets import target_from_file
from test_external import logits, random_model, synthetic


def _saved(tmp_path, arch: str = "rb-wrn-10-1", change=None, safetensors: bool = False, c: int = 3):
    model = random_model(arch, c)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if change is not None:
        change(sd)
    path = tmp_path / ("m.safetensors" if safetensors else "m.pt")
    save_file(sd, str(path)) if safetensors else torch.save({"state_dict": sd}, path)
    return model, path


def _refused(path, arch: str = "rb-wrn-10-1") -> str:
    with pytest.raises(UserError) as e:
        target_from_file(path, arch, "synthetic", synthetic())
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("safetensors", [False, True])
def test_non_finite_weights_are_refused(tmp_path, value, safetensors):
    def poison(sd):
        sd["block2.layer.0.conv1.weight"][0, 0, 0, 0] = value
        sd["fc.bias"][3] = value

    _, path = _saved(tmp_path, change=poison, safetensors=safetensors)
    msg = _refused(path)
    assert "NaN or Inf" in msg and "2 tensors" in msg and "block2.layer.0.conv1.weight" in msg


def test_non_finite_bn_statistics_are_refused(tmp_path):
    def poison(sd):
        sd["bn1.running_var"][0] = float("inf")

    _, path = _saved(tmp_path, change=poison)
    assert "bn1.running_var" in _refused(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool])
def test_integer_weights_are_refused(tmp_path, dtype):
    def to_int(sd):
        sd["fc.weight"] = sd["fc.weight"].round().to(dtype)

    _, path = _saved(tmp_path, change=to_int)
    msg = _refused(path)
    assert "fc.weight" in msg and str(dtype).removeprefix("torch.") in msg and "floating-point" in msg


def test_complex_weights_are_refused(tmp_path):
    def to_complex(sd):
        sd["conv1.weight"] = sd["conv1.weight"].to(torch.complex64)

    _, path = _saved(tmp_path, change=to_complex)
    assert "conv1.weight (complex64)" in _refused(path)


def test_integer_buffers_and_half_precision_still_load(tmp_path):
    """num_batches_tracked is int64 in the model too; fp16 weights are numbers (converted by
    load_state_dict as always)."""
    def to_half(sd):
        for k, v in sd.items():
            if v.is_floating_point():
                sd[k] = v.half()

    model, path = _saved(tmp_path, change=to_half, safetensors=True)
    target = target_from_file(path, "rb-wrn-10-1", "synthetic", synthetic())
    x = synthetic().x_test
    assert torch.allclose(logits(target.model, x), logits(model.half().float(), x), atol=1e-5)
    assert target.model.bn1.num_batches_tracked.dtype == torch.int64


def test_cli_says_it_in_one_line(tmp_path):
    def poison(sd):
        sd["fc.weight"][0, 0] = float("nan")

    _, path = _saved(tmp_path, "tiny-cnn", change=poison, c=1)
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(path), "--arch", "tiny-cnn", "--dataset", "digits",
                                 "--attacks", "pgd", "--n", "4", "--no-progress", "--device", "cpu",
                                 "--workdir", str(tmp_path / "wd")], prog_name="robench")
    assert r.exit_code != 0 and "NaN or Inf" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
