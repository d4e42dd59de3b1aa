"""The paper recipes (CIFAR-10 and ImageNet 256): official values, `fewstep check`, a few shrunk CPU steps."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fakes import fake_cifar_root, fake_latents
from fewstep.build import check_components
from fewstep.cli import app
from fewstep.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CIFAR = ["soflow_cifar10", "meanflow_cifar10", "ect_cifar10", "ect_cifar10_tune", "fm_cifar10"]
SIZES = ["b4", "b2", "m2", "l2", "xl2"]
IMAGENET = [f"{m}_{s}" for m in ("soflow", "meanflow") for s in SIZES]
# official parameter counts of the DiTs (MeanFlow's table: 131M, 131M, 308M, 459M, 676M), ours to 1%
DIT_PARAMS = {"b4": 131e6, "b2": 131e6, "m2": 308e6, "l2": 459e6, "xl2": 676e6}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"cifar": fake_cifar_root(base / "cifar"), "latents": fake_latents(base / "latents")}


def root_of(name, roots):
    return roots["cifar"] if "cifar" in name else roots["latents"]


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_every_paper_recipe_passes_check(name, roots):
    r = load_recipe(RECIPES / f"{name}.toml", [f"data.root={root_of(name, roots)}"])
    facts = check_components(r)
    if name in IMAGENET:
        assert facts["shape"] == (4, 32, 32) and facts["classes"] == 1000
        assert facts["parameters"] == pytest.approx(DIT_PARAMS[name.split("_")[1]], rel=0.01)
    else:
        assert facts["shape"] == (3, 32, 32) and facts["classes"] == 0
        # SoFlow's and py-meanflow's SongUNet: 55,932,419 (official count); ECT's DDPM++ 55,732,739 plus the
        # second time embedding's 128 x 512 map_layer0 weights (tests/test_unet.py)
        assert facts["parameters"] == (55_732_739 + 128 * 512 if "ect" in name or "fm" in name else 55_932_419)


def test_the_headers_give_the_official_numbers():
    text = {n: (RECIPES / f"{n}.toml").read_text() for n in CIFAR + IMAGENET}
    assert "2.9617" in text["soflow_xl2"] and "2.6606" in text["soflow_xl2"] and "240 epochs" in text["soflow_xl2"]
    assert "3.43" in text["meanflow_xl2"] and "2.93" in text["meanflow_xl2"]
    assert "2.8600" in text["soflow_cifar10"] and "2.2827" in text["soflow_cifar10"]
    assert "2.92" in text["meanflow_cifar10"] and "3.86" in text["ect_cifar10"]
    for s in ("b2", "m2", "l2", "xl2"):  # values the official code does not give are marked
        assert "[not in the official code]" in text[f"soflow_{s}"]


def test_soflow_cifar10_is_the_official_config(roots):
    r = load_recipe(RECIPES / "soflow_cifar10.toml", [f"data.root={roots['cifar']}"])
    o, t = r.objective.options, r.train
    assert (o["fm_ratio"], o["p"], o["eps"], o["cfg_scale"], o["cfg_drop"], o["mix_ratio"]) == (0.0, 0.75, 0.001, 1.0, 0.0, 1.0)
    assert (o["fm_t_mean"], o["s_mean"], o["t_mean"], o["s_std"], o["t_std"]) == (-0.9, -4.0, -0.9, 1.6, 1.6)
    assert (o["r_init"], o["r_end"], o["total_steps"]) == (1.0, 0.0003125, 800_000)
    assert (t["optimizer"], t["lr"], t["betas"], t["batch"], t["ema"], t["ema_every"], t["steps"]) == \
        ("radam", 1e-4, [0.9, 0.999], 1024, [0.9999], 16, 800_000)
    b = r.backbone.options
    assert (b["dropout"], b["channel_mult_noise"], b["resample_filter"], b["augment_dim"]) == (0.3, 2, [1, 3, 3, 1], 6)
    assert r.data.options["augment"] == 0.12 and r.data.options["conditional"] is False


def test_imagenet_recipes_follow_the_official_tables(roots):
    load = lambda n: load_recipe(RECIPES / f"{n}.toml", [f"data.root={roots['latents']}"])  # noqa: E731
    b4 = load("soflow_b4")
    assert (b4.objective.options["fm_ratio"], b4.objective.options["cfg_scale"], b4.objective.options["mix_ratio"]) == (0.75, 3.0, 0.25)
    assert (b4.train["steps"], b4.train["batch"], b4.train["betas"], b4.train["optimizer"]) == (400_000, 256, [0.9, 0.99], "adamw")
    xl = load("soflow_xl2")
    assert xl.backbone.options["size"] == "XL/2" and xl.train["steps"] == 1_200_000
    expected = {"b4": (1.0, 0.5, 1.0), "b2": (1.0, 0.5, 1.0), "m2": (1.0, 0.5, 1.0), "l2": (0.2, 0.92, 0.8),
                "xl2": (0.2, 0.92, 0.75)}
    for s, (omega, kappa, tmax) in expected.items():
        o = load(f"meanflow_{s}").objective.options
        assert (o["omega"], o["kappa"], o["cfg_t_max"]) == (omega, kappa, tmax)
        assert omega / (1 - kappa) == pytest.approx({"l2": 2.5, "xl2": 2.5}.get(s, 2.0))
    mf = load("meanflow_xl2")
    # 240 epochs of floor(1,281,167 / 256) = 5,004 steps (the official loader drops the last partial batch)
    assert (mf.train["betas"], mf.train["steps"], mf.backbone.options["gap_init"]) == ([0.9, 0.95], 240 * (1_281_167 // 256), "normal")
    assert mf.train["checkpoint_every"] == mf.eval["every"] == 10 * 5_004  # checkpoint_per_epoch, sample_per_epoch 10
    assert load("soflow_xl2").eval["precision"] == load("soflow_cifar10").eval["precision"] == "tf32"  # inference.py:39
    assert load("meanflow_cifar10").eval["precision"] == "tf32" and load("ect_cifar10").eval["precision"] == "fp32"
    assert load("soflow_cifar10").train["ema_offset"] == 1 and load("meanflow_cifar10").train["ema_offset"] == 0


def test_check_without_the_data_folder_says_what_to_make():
    res = CliRunner().invoke(app, ["check", str(RECIPES / "soflow_xl2.toml"), "--set", "data.root=/nonexistent/latents"])
    assert res.exit_code == 2, res.output
    assert "/nonexistent/latents" in res.output and "cache-latents" in res.output and "Traceback" not in res.output


SHRINK_UNET = ["backbone.model_channels=8", "backbone.channel_mult=[1, 1]", "backbone.num_blocks=1",
               "backbone.attn_resolutions=[16]"]
COMMON = ["train.steps=2", "train.batch=4", "train.log_every=1", "train.checkpoint_every=0", "eval.every=0",
          "eval.grid=4", "eval.nfe=[1]", "train.device=cpu", "train.compile=false"]


def test_ect_cifar10_feeds_the_official_noise_input_and_its_tuning_variant_the_flow_matching_time():
    ect = load_recipe(RECIPES / "ect_cifar10.toml").objective.options
    tune = load_recipe(RECIPES / "ect_cifar10_tune.toml").objective.options
    assert (ect["noise_input"], ect["sigma_min"]) == ("edm", 0.003)  # networks.py:713 ln(sigma)/4, :684 sigma_min
    assert (tune["noise_input"], tune["init_from"]) == ("fm", "runs/fm_cifar10")  # what the FM run's network saw


@pytest.mark.parametrize("name", ["soflow_cifar10", "meanflow_cifar10", "ect_cifar10", "fm_cifar10", "ect_cifar10_tune"])
def test_a_few_cpu_steps_of_each_cifar_recipe(name, roots, tmp_path):
    from fewstep.engine.trainer import Trainer

    sets = [f"data.root={roots['cifar']}", "data.cache_dir=", "data.keep_on_device=false", *SHRINK_UNET, *COMMON]
    if name == "ect_cifar10_tune":  # warm start from a shrunk flow-matching run
        src = tmp_path / "fm"
        Trainer(load_recipe(RECIPES / "fm_cifar10.toml", sets), src, show_progress=False).run()
        sets.append(f"objective.init_from={src}")
    if name == "meanflow_cifar10":
        sets.append("objective.jvp_mode=lean")  # both modes are tested in test_meanflow.py; lean is the quick one
    res = Trainer(load_recipe(RECIPES / f"{name}.toml", sets), tmp_path / name, show_progress=False).run()
    assert res.step == 2 and res.skipped_steps == 0 and res.final_metrics["loss"] == res.final_metrics["loss"]


def test_the_512_px_bench_recipe_has_1024_tokens_and_the_256_px_tokens_per_step(tmp_path):
    root = fake_latents(tmp_path / "l512", shape=(4, 64, 64), resolution=512)
    r = load_recipe(RECIPES / "bench_latents_b2_512.toml", [f"data.root={root}"])
    facts = check_components(r)
    assert facts["shape"] == (4, 64, 64) and r.backbone.options["size"] == "B/2"
    assert (64 // 2) ** 2 == 1024
    assert r.train["batch"] * 1024 == 256 * (32 // 2) ** 2  # as many tokens a step as bench_latents_b2.toml
    wrong = fake_latents(tmp_path / "l256")  # a 256 px cache is refused by name
    with pytest.raises(Exception, match="512|resolution"):
        check_components(load_recipe(RECIPES / "bench_latents_b2_512.toml", [f"data.root={wrong}"]))
