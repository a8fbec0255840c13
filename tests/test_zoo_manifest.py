"""Zoo manifests with values of the right JSON type but no sense (issue 18, item 3): each is refused
when the manifest is read, in one line that names the manifest, the entry and the field, never
by a traceback later (`zoo show`, `zoo export`, a 512 GB allocation)."""

import json

import pytest
from click.testing import CliRunner

from robench import zoo
from robench.cli import cli
from robench.errors import UserError
from test_zoo import cache, make_entry, weights  # noqa: F401 (fixtures)


def _set(key, value):
    return lambda e: e.update({key: value})


def _result(**changes):
    def change(e):
        e["results"] = {"pgd": {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "params": {"eps": 0.2}, **changes}}
    return change


BAD = [
    (_set("urls", ["http://[::1/x.safetensors"]), "urls[0]", "not a valid URL"),
    (_set("urls", ["http://127.0.0.1:99999/x.safetensors"]), "urls[0]", "not a valid URL"),
    (_set("urls", ["https:///x.safetensors"]), "urls[0]", "no host"),
    (_set("urls", ["http://example.org/a b.safetensors"]), "urls[0]", "a space or a control character"),
    (_set("file", "a\x00b.safetensors"), "file", "plain NAME.safetensors"),
    (_set("file", "a\nb.safetensors"), "file", "plain NAME.safetensors"),
    (_set("num_classes", 2_000_000_000), "num_classes", "at most 100000"),
    (_set("in_channels", 0), "in_channels", "must be positive"),
    (_set("size", 0), "size", "must be positive"),
    (_set("image_size", [32.5, 32]), "image_size", "two whole numbers"),
    (_set("image_size", [32]), "image_size", "two whole numbers"),
    (_set("image_size", [0, 32]), "image_size", "two whole numbers"),
    (_set("image_size", [True, 32]), "image_size", "two whole numbers"),
    (_set("mean", [0.5]), "mean and std", "both or neither"),
    (_set("std", [0.5]), "mean and std", "both or neither"),
    (lambda e: e.update(mean=[0.5], std=[0]), "std", "positive"),
    (lambda e: e.update(mean=[0.5], std=["a"]), "std", "numbers"),
    (lambda e: e.update(mean=[float("nan")], std=[1]), "mean", "numbers"),
    (_set("classes", list(range(10))), "classes", "lines of text"),
    (_set("classes", ["a", "b"]), "classes", "num_classes is 10"),
    (_set("arch", ""), "arch", "line of text"),
    (_set("dataset", "digits\n"), "dataset", "line of text"),
    (_set("objective", {"eps": "8/255"}), "objective.eps", "number"),
    (_set("config", {"eps": -1}), "config.eps", "number"),
    (_set("reference", {"title": 3}), "reference", "strings"),
    (_result(ci95=["low", "high"]), "ci95", "numbers from 0 to 1"),
    (_result(ci95=[0.6, 0.4]), "ci95", "[low, high]"),
    (_result(params={"eps": "8/255"}), "params.eps", "number"),
    (_result(accuracy=1.5), "accuracy", "from 0 to 1"),
    (_result(accuracy=True), "accuracy", "from 0 to 1"),
    (_result(n=0), "n positive", ""),
    (_result(measured=12), "measured", "string"),
]


@pytest.mark.parametrize("change,field,expect", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_a_senseless_field_is_one_line_naming_manifest_entry_and_field(tmp_path, weights, change, field, expect):
    path = tmp_path / "m.json"
    zoo.write_manifest(path, [make_entry(weights)])
    data = json.loads(path.read_text())
    change(data["entries"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        zoo.entries([path])
    message = str(e.value)
    assert f"zoo manifest {path} entry 'synthetic'" in message and field in message and expect in message
    assert "\n" not in message


@pytest.mark.parametrize("command", ["show", "export"])
def test_show_and_export_refuse_a_non_numeric_result_in_one_line(tmp_path, weights, command):
    """These used to end in a traceback (100 * 'low', float('8/255'))."""
    path = tmp_path / "m.json"
    aa = {"accuracy": 0.5, "ci95": ["low", "high"], "n": 100, "params": {"eps": "8/255"}}
    zoo.write_manifest(path, [make_entry(weights, results={"autoattack": aa})])
    r = CliRunner().invoke(cli, ["zoo", command, "synthetic", "--manifest", str(path)], prog_name="robench")
    assert r.exit_code == 2 and r.stderr.startswith("error: zoo manifest") and r.stderr.count("\n") == 1
    assert "ci95" in r.stderr


def test_the_good_values_still_pass(tmp_path, weights):
    path = tmp_path / "m.json"
    e = make_entry(weights, ["http://127.0.0.1:8000/w.safetensors", "https://example.org/w.safetensors",
                             weights.as_uri()], image_size=[8, 8], classes=[str(i) for i in range(10)],
                   mean=[0.5], std=[0.25], objective={"eps": 0.2}, reference={"title": "T"},
                   results={"pgd": {"accuracy": 0.0, "ci95": [0.0, 0.03], "n": 100, "params": {"eps": 0.2}},
                            "clean": {"accuracy": 1, "ci95": None, "n": 1, "params": {}}})
    zoo.write_manifest(path, [e])
    assert zoo.read_manifest(path) == [e]
