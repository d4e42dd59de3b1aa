"""No weights file can run code: every route to a feature extractor's weights is read as plain tensors.

torch-fidelity 0.4.0 unpickles its weights with ``weights_only=False``. A pickle whose ``__reduce__``
creates a file is put where each route looks (the ``inception_weights`` option, ``$FEWSTEP_INCEPTION_WEIGHTS``,
the torch hub cache, and VGG16's routes); the file must never appear, the error must name the file, and the
command line must exit with 2 before any work.
"""
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fewstep.build import build_evaluator
from fewstep.cli import app
from fewstep.interfaces import BuildContext
from fewstep_plugins.fidelity import weights as W

from conftest import tiny_dict


class Evil:
    """Unpickling this creates `marker` (what an attacker's payload would do instead of something worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "fewstep-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("FEWSTEP_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("FEWSTEP_VGG16_WEIGHTS", raising=False)
    monkeypatch.setattr(W, "_fid_helper_default", lambda: None)


def evil_pth(path: Path, marker: Path) -> Path:
    """A torch.save file (zip) whose pickle runs code."""
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Evil(marker)}, path)
    return path


def evil_legacy(path: Path, marker: Path) -> Path:
    """A plain pickle (torch's legacy, non-zip format) that runs code."""
    path.write_bytes(pickle.dumps(Evil(marker)))
    return path


def evil_torchscript(path: Path, marker: Path) -> Path:
    """A zip laid out like a TorchScript archive whose data.pkl runs code."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("net/data.pkl", pickle.dumps({"conv": Evil(marker)}, protocol=2))
        zf.writestr("net/code/__torch__/net.py", "")
        zf.writestr("net/version", "3\n")
    assert W.is_torchscript(path)
    return path


MAKERS = {"pth": evil_pth, "legacy-pickle": evil_legacy, "torchscript": evil_torchscript}


def hub_file(name: str) -> Path:
    p = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("route", ["option", "env", "hub"])
def test_a_pickle_never_runs_through_any_inception_route(tmp_path, monkeypatch, route, kind):
    marker = tmp_path / "pwned"
    target = hub_file(W.INCEPTION_HUB_FILE) if route == "hub" else tmp_path / "weights.pt"
    MAKERS[kind](target, marker)
    options = {"inception_weights": str(target)} if route == "option" else {}
    if route == "env":
        monkeypatch.setenv("FEWSTEP_INCEPTION_WEIGHTS", str(target))
    for metric in ("fid", "kid"):
        with pytest.raises(W.UnsafeWeightsError) as exc:
            build_evaluator(metric, BuildContext(), options)
        assert str(target) in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("route", ["option", "env", "hub"])
def test_a_pickle_never_runs_through_any_vgg16_route(tmp_path, monkeypatch, route):
    marker = tmp_path / "pwned"
    target = hub_file(W.VGG16_HUB_FILE) if route == "hub" else tmp_path / "vgg.pth"
    evil_pth(target, marker)
    options = {"vgg16_weights": str(target)} if route == "option" else {}
    if route == "env":
        monkeypatch.setenv("FEWSTEP_VGG16_WEIGHTS", str(target))
    with pytest.raises(W.UnsafeWeightsError, match=str(target)):
        build_evaluator("prc", BuildContext(), options)
    assert not marker.exists()


def test_the_cli_names_the_file_and_exits_2_before_any_work(tmp_path, monkeypatch):
    import tomli_w

    marker = tmp_path / "pwned"
    evil = evil_pth(tmp_path / "evil.pth", marker)
    d = tiny_dict()
    d["train"].update(steps=2)
    d["eval"].update(metrics=["fid"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(d))
    out = tmp_path / "cmp"
    for args, env in ((["-O", f"inception_weights={evil}"], None), ([], str(evil))):
        if env:
            monkeypatch.setenv("FEWSTEP_INCEPTION_WEIGHTS", env)
        res = CliRunner().invoke(app, ["compare", "fm", "--recipe", str(recipe), "--out", str(out), *args],
                                 prog_name="fewstep")
        assert res.exit_code == 2, res.output
        assert str(evil) in res.output.replace("\n", "") and "Traceback" not in res.output
        assert not marker.exists()
        assert not (out / "fm").exists()  # nothing trained


def test_plain_tensors_are_read_and_a_wrong_network_is_named(tmp_path):
    sd = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.ones(2, 2)}, sd)
    assert W.read_weights(sd)["fc.weight"].shape == (2, 2)  # weights_only=True reads a state dict
    from safetensors.torch import save_file

    st = tmp_path / "small.safetensors"
    save_file({"a": torch.arange(3.0)}, str(st))
    assert torch.equal(W.read_weights(st)["a"], torch.arange(3.0))
    with pytest.raises(W.UnsafeWeightsError, match="small.pth.*not the inception network"):
        W.resolve_inception(str(sd))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated, still the way to write one
def test_torchscript_tensors_are_read_without_jit_load(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ts = tmp_path / "net.pt"
    torch.jit.script(net).save(str(ts))
    ours = W.read_torchscript_tensors(ts)
    assert set(ours) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(ours[k], v), k
