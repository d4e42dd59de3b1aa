"""`fewstep import soflow|meanflow`: official checkpoints -> run folders. The official parameter names and shapes are
listed here from the official files; the mapping is tested both ways, and an exported-then-imported model gives
identical outputs through `fewstep sample`'s loader."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fakes import fake_cifar_root
from fewstep.cli import app, main  # noqa: F401
from fewstep.recipe import load_recipe
from fewstep.runs import load_model
from fewstep_plugins.official import layouts as L

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def cli(*args):
    from fewstep.registry import get_registry

    get_registry().add_commands(app)  # plugin commands (`import`) as `fewstep` itself adds them
    from fewstep.cli import guard_commands

    guard_commands(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def official_soflow_dit(depth, D, p, C=4, classes=1000, size=32, null_row=True):
    """zlab-princeton/SoFlow dit.py: DiT.__init__ (x/t/s/y embedders, pos_embed, blocks, final_layer),
    TimestepEmbedder.mlp (Linear(256, D), SiLU, Linear(D, D)), LabelEmbedder.embedding_table (num_classes +
    use_cfg_embedding rows), DiTBlock (timm Attention(qkv_bias=True), timm Mlp(4 D), adaLN_modulation = SiLU,
    Linear(D, 6 D)), FinalLayer (LayerNorm without affine, Linear(D, p p C), adaLN Linear(D, 2 D)); models.py
    Soflow keeps the DiT as `network`."""
    n = {"network.pos_embed": (1, (size // p) ** 2, D),
         "network.x_embedder.proj.weight": (D, C, p, p), "network.x_embedder.proj.bias": (D,),
         "network.y_embedder.embedding_table.weight": (classes + int(null_row), D)}
    for e in ("t_embedder", "s_embedder"):
        n |= {f"network.{e}.mlp.0.weight": (D, 256), f"network.{e}.mlp.0.bias": (D,),
              f"network.{e}.mlp.2.weight": (D, D), f"network.{e}.mlp.2.bias": (D,)}
    for i in range(depth):
        b = f"network.blocks.{i}."
        n |= {b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D),
              b + "attn.proj.bias": (D,), b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
              b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
              b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)}
    n |= {"network.final_layer.linear.weight": (p * p * C, D), "network.final_layer.linear.bias": (p * p * C,),
          "network.final_layer.adaLN_modulation.1.weight": (2 * D, D),
          "network.final_layer.adaLN_modulation.1.bias": (2 * D,)}
    return n


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("size,depth,D,p", [("XL/2", 28, 1152, 2), ("B/4", 12, 768, 4)])
def test_soflow_dit_names_and_shapes_map_both_ways(size, depth, D, p):
    from conftest import make_dit
    from fewstep_plugins.dit.model import sincos_2d

    with torch.device("meta"):
        net = make_dit(4, 32, 1000, size=size)
    ours = net.state_dict()
    official = official_soflow_dit(depth, D, p)
    assert shapes(L.fewstep_to_soflow(ours, image_size=32)) == official
    fake = {k: torch.empty(s, device="meta") for k, s in official.items()}
    fake["network.pos_embed"] = sincos_2d(D, 32 // p)[None]  # the official table (dit.py get_2d_sincos_pos_embed)
    assert shapes(L.soflow_to_fewstep(fake)) == shapes(ours)
    n_official = sum(torch.Size(s).numel() for k, s in official.items() if k != "network.pos_embed")
    assert n_official == sum(p_.numel() for p_ in net.parameters())


def test_a_label_table_without_the_null_row_gets_a_zero_row():
    from conftest import make_dit

    net = make_dit(1, 8, 10, size="T/2", hidden=32, depth=1, heads=2)
    exported = L.fewstep_to_soflow(net.state_dict(), image_size=8, null_row=False)
    assert exported["network.y_embedder.embedding_table.weight"].shape == (10, 32)
    back = L.soflow_to_fewstep(exported, null_row=False)
    assert torch.equal(back["y_embedder.weight"][:10], net.state_dict()["y_embedder.weight"][:10])
    assert torch.equal(back["y_embedder.weight"][10], torch.zeros(32))


def perturbed(net, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in net.state_dict().items()}


def test_exported_then_imported_soflow_dit_gives_identical_outputs(tmp_path):
    from fewstep.build import build_components

    recipe = load_recipe(RECIPES / "quickstart.toml")
    net = build_components(recipe).net
    raw, ema = perturbed(net, 1), perturbed(net, 2)
    ckpt = tmp_path / "ckpts" / "1200.pt"
    ckpt.parent.mkdir()
    torch.save({"model": L.fewstep_to_soflow(raw, image_size=8), "ema_model": L.fewstep_to_soflow(ema, image_size=8),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, ckpt)
    res = cli("import", "soflow", ckpt, "--recipe", RECIPES / "quickstart.toml", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    x, t, s = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 0.7, 0.5, 0.2]), torch.tensor([0.0, 0.1, 0.5, 0.0])
    y = torch.tensor([0, 3, 9, 10])
    for index, state in ((0, ema), (-1, raw)):
        run = load_model(tmp_path / "run", ema_index=index, device="cpu")
        ref = build_components(recipe).net
        ref.load_state_dict(state)
        ref.eval()
        with torch.no_grad():
            assert torch.equal(run.net(x, t, s, y), ref(x, t, s, y))
        assert run.checkpoint.name == "step_00001200"
    res = cli("sample", tmp_path / "run", "--num", 4, "--nfe", 2, "--out", tmp_path / "s.npz")
    assert res.exit_code == 0, res.output
    import numpy as np

    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 8, 8, 1)


def test_importing_a_checkpoint_with_missing_or_extra_keys_names_them(tmp_path):
    from fewstep.build import build_components

    recipe = load_recipe(RECIPES / "quickstart.toml")
    sd = L.fewstep_to_soflow(build_components(recipe).net.state_dict(), image_size=8)
    del sd["network.final_layer.linear.bias"]
    sd["network.blocks.9.attn.qkv.weight"] = torch.zeros(3)
    torch.save({"model": sd, "ema_model": sd}, tmp_path / "bad.pt")
    res = cli("import", "soflow", tmp_path / "bad.pt", "--recipe", RECIPES / "quickstart.toml", "--out", tmp_path / "run")
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "final_layer.linear.bias" in out and "blocks.9.attn.qkv.weight" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()
    torch.save({"weights": sd}, tmp_path / "other.pt")  # not a SoFlow checkpoint at all
    res = cli("import", "soflow", tmp_path / "other.pt", "--recipe", RECIPES / "quickstart.toml", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "'model'" in res.output


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / ".unpickled-marker",))


def test_a_checkpoint_that_needs_unpickling_code_is_refused_and_nothing_runs(tmp_path):
    marker = Path(__file__).parent / ".unpickled-marker"
    marker.unlink(missing_ok=True)
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    marker.unlink(missing_ok=True)  # torch.save itself does not run __reduce__'s result, but be sure
    res = cli("import", "soflow", tmp_path / "evil.pt", "--recipe", RECIPES / "quickstart.toml", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "nothing in it was executed" in " ".join(res.output.split())
    assert not marker.exists()


# -- py-meanflow (CIFAR-10 U-Net) ------------------------------------------------------------------------------

SHRINK = ["backbone.model_channels=8", "backbone.channel_mult=[1, 1]", "backbone.num_blocks=1", "train.device=cpu"]


def test_py_meanflow_qkv_is_three_blocks_and_maps_back_exactly():
    """py-meanflow models/unet.py QKVAttention: q, k, v = qkv.chunk(3, dim=1); EDM (and fewstep): the rows of
    channel i are 3 i, 3 i + 1, 3 i + 2."""
    w = torch.arange(12 * 5.0).reshape(12, 5)  # C = 4 channels
    blocks = L.interleaved_to_blocks(w)
    assert torch.equal(blocks[:4], w[0::3]) and torch.equal(blocks[4:8], w[1::3]) and torch.equal(blocks[8:], w[2::3])
    assert torch.equal(L.blocks_to_interleaved(blocks), w)


def test_exported_then_imported_py_meanflow_unet_gives_identical_outputs(tmp_path):
    from fewstep.build import build_components

    root = fake_cifar_root(tmp_path / "cifar")
    sets = [f"data.root={root}", "data.cache_dir=", *SHRINK]
    recipe = load_recipe(RECIPES / "meanflow_cifar10.toml", sets)
    net = build_components(recipe).net
    raw, emas = perturbed(net, 1), [perturbed(net, 2), perturbed(net, 3), perturbed(net, 4)]
    official = L.fewstep_to_meanflow(raw, emas, num_updates=480)
    assert set(official) == {"num_updates"} | {f"{p}{k}" for p in ("net.", "net_ema.", "net_ema1.", "net_ema2.") for k in raw}
    qkv = [k for k in raw if k.endswith("qkv.weight")][0]
    assert torch.equal(official["net." + qkv][: raw[qkv].shape[0] // 3], raw[qkv][0::3])  # q rows first
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9,
                "args": argparse.Namespace(lr=6e-4, ema_decays=[0.99995, 0.9996])}, tmp_path / "checkpoint-9.pth")
    res = cli("import", "meanflow", tmp_path / "checkpoint-9.pth", "--recipe", RECIPES / "meanflow_cifar10.toml",
              *[a for s in sets for a in ("--set", s)], "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    x, t, s = torch.randn(2, 3, 32, 32), torch.tensor([1.0, 0.6]), torch.tensor([0.0, 0.2])
    aug = torch.zeros(2, 6)
    for index, state in ((0, emas[0]), (1, emas[1]), (2, emas[2]), (-1, raw)):
        run = load_model(tmp_path / "run", ema_index=index, device="cpu")
        ref = build_components(recipe).net
        ref.load_state_dict(state)
        ref.eval()
        with torch.no_grad():
            assert torch.equal(run.net(x, t, s, None, augment_labels=aug), ref(x, t, s, None, augment_labels=aug))
    assert run.checkpoint.name == "step_00000480"
