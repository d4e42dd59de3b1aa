"""The `digits-accuracy` evaluator: a digit classifier that checks one-step samples show the class asked for.

Claims: the classifier itself is accurate on held-out real digits; real digits fed as "samples" score as real
digits do, and the same images with shuffled labels score what chance predicts (closed form below); a run
with eval.after_train writes the score into its folder, the same number `fewstep eval` gets from the same
weights; bad input is a named error.
"""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import builtin, tiny_dict
from fewstep.api import BuildContext, DataError, DataSpec
from fewstep.cli import app
from fewstep.recipe import recipe_from_dict

DIGITS = DataSpec((1, 8, 8), 10, "digits")


@pytest.fixture(scope="module")
def evaluator():
    return builtin("evaluator", "digits-accuracy")(BuildContext(data=DIGITS))


def test_the_classifier_is_accurate_on_held_out_real_digits(evaluator):
    x, y = evaluator.held_out
    assert x.shape == (450, 1, 8, 8) and len(y) == 450  # 25% of 1797, stratified
    from fewstep_plugins.digits.data import real_digits

    per_class = torch.bincount(real_digits()[1], minlength=10).double()  # 174..183 images per digit
    assert (torch.bincount(y, minlength=10) - 0.25 * per_class).abs().max() < 1  # stratified: every class in proportion
    assert evaluator.classifier_accuracy >= 0.97
    assert evaluator.record["held_out_accuracy"] == evaluator.classifier_accuracy


def test_held_out_digits_as_samples_score_like_real_digits_and_shuffled_labels_score_chance(evaluator):
    x, y = evaluator.held_out
    out = evaluator.evaluate(x, x, labels=y)
    assert out["digits_accuracy"] >= 0.95
    assert out["digits_accuracy"] == pytest.approx(evaluator.classifier_accuracy, abs=1e-6)
    # A random permutation pi of the labels: P(pred_i == y_pi(i)) = m_pred(k_i) / N summed over i, so the expected
    # score is sum_k n_k m_k / N^2 (n_k: predictions of class k, m_k: labels of class k), ~0.1 for balanced digits.
    pred = evaluator.predict(x)
    n_k = torch.bincount(pred, minlength=10).double()
    m_k = torch.bincount(y, minlength=10).double()
    expected = float((n_k * m_k).sum() / len(y) ** 2)
    assert expected == pytest.approx(0.1, abs=0.002)
    g = torch.Generator().manual_seed(0)
    scores = [evaluator.accuracy(x, y[torch.randperm(len(y), generator=g)]) for _ in range(20)]
    mean = sum(scores) / len(scores)
    sd_of_mean = (expected * (1 - expected) / len(y) / len(scores)) ** 0.5  # ~0.003
    assert abs(mean - expected) < 4 * sd_of_mean


def test_the_classifier_sees_digits_as_the_data_source_presents_them(evaluator):
    """Pixels are x = v / 8 - 1 exactly as the `digits` source yields them; out-of-range samples are clamped."""
    digits = builtin("dataset", "digits")(BuildContext(), conditional=True, limit=0)
    x, y = evaluator.held_out
    assert x.min() == -1.0 and x.max() == 1.0
    rows = (digits.x.flatten(1)[:, None] == x.flatten(1)[None]).all(-1).any(0)
    assert bool(rows.all())  # every held-out image is one of the source's images, unchanged
    assert torch.equal(evaluator.predict(x * 5), evaluator.predict((x * 5).clamp(-1, 1)))


def test_a_train_run_writes_the_score_that_fewstep_eval_finds(tmp_path):
    from fewstep.engine.trainer import Trainer

    r = recipe_from_dict(tiny_dict(eval={"nfe": [1, 2], "grid": 4, "after_train": ["digits-accuracy"], "num_samples": 30,
                                         "batch": 16}))
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    payload = json.loads((tmp_path / "run" / "eval_after_train.json").read_text())
    assert [x["nfe"] for x in payload["results"]] == [1, 2]
    assert payload["step"] == 6 and payload["protocol"]["num_samples"] == 30
    got = {x["nfe"]: x["metrics"] for x in payload["results"]}
    assert res.evaluation == {n: pytest.approx(m) for n, m in got.items()}
    for m in got.values():
        assert m["digits_classifier_accuracy"] >= 0.97
        assert 0 <= m["digits_accuracy"] <= 1 and round(m["digits_accuracy"] * 30, 4) % 1 == 0  # k of 30 samples
    # the same protocol from the saved EMA weights (fewstep eval): the same samples, labels and score
    out = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--metrics", "digits-accuracy", "--num", "30",
                                   "--nfe", "1,2", "--out", str(tmp_path / "eval.json")])
    assert out.exit_code == 0, out.output
    again = {x["nfe"]: x["metrics"] for x in json.loads((tmp_path / "eval.json").read_text())["results"]}
    assert again == got
    # and by hand: the protocol's samples and labels, classified one by one
    from fewstep.evaluation import generated_batches
    from fewstep.runs import load_model

    loaded = load_model(tmp_path / "run")
    clf = builtin("evaluator", "digits-accuracy")(BuildContext(data=DIGITS))
    for nfe in (1, 2):
        parts = list(generated_batches(loaded, 30, nfe, seed=0, batch=16))
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert got[nfe]["digits_accuracy"] == pytest.approx(float((clf.predict(x) == y).double().mean()), abs=1e-6)


def test_labels_reach_the_evaluator_row_for_row(tmp_path):
    """evaluate_loaded hands the asked-for classes as labels=, in the order of the samples."""
    from fewstep.engine.trainer import Trainer
    from fewstep.evaluation import EvalSettings, Reference, evaluate_loaded
    from fewstep.interfaces import Evaluator
    from fewstep.runs import load_model

    Trainer(recipe_from_dict(tiny_dict()), tmp_path / "run", show_progress=False).run()
    loaded = load_model(tmp_path / "run")
    seen = {}

    class Spy(Evaluator):
        inputs = "samples"

        def evaluate(self, generated, reference, **info):
            seen["n"], seen["labels"] = len(generated), info["labels"]
            return {}

    settings = EvalSettings(metrics=["spy"], num=21, seed=5, batch=8)
    evaluate_loaded(loaded, [1], {"spy": Spy(BuildContext())}, settings, Reference(loaded.data, "digits", "train", 21))
    from fewstep.evaluation import batch_noise

    want = torch.cat([batch_noise(k, 8, 21, (1, 8, 8), 10, 5)[1] for k in range(3)])
    assert seen["n"] == 21 and torch.equal(seen["labels"], want)


def test_bad_input_is_a_named_error(evaluator):
    with pytest.raises(DataError, match=r"digits-accuracy .*\(N, 1, 8, 8\).*\(5, 64\)"):
        evaluator.predict(torch.zeros(5, 64))
    with pytest.raises(DataError, match=r"digits-accuracy .*\(N, 1, 8, 8\).*\(5, 3, 32, 32\)"):
        evaluator.evaluate(torch.zeros(5, 3, 32, 32), None, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="one asked-for class per sample.*data.conditional"):
        evaluator.evaluate(torch.zeros(5, 1, 8, 8), None, labels=None)
    with pytest.raises(DataError, match=r"'cifar10' of shape \(3, 32, 32\) with 10 classes; drop it"):
        builtin("evaluator", "digits-accuracy")(BuildContext(data=DataSpec((3, 32, 32), 10, "cifar10")))
    with pytest.raises(DataError, match="0 classes; set data.conditional = true"):
        builtin("evaluator", "digits-accuracy")(BuildContext(data=DataSpec((1, 8, 8), 0, "digits")))
