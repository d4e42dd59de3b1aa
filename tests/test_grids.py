"""Sample grids carry a caption (objective, step, NFE, EMA copy) and, for labelled data, the class of each column."""
import numpy as np
import torch
from PIL import Image

from fewstep.engine.trainer import Trainer
from fewstep.images import caption_band_height, grid_captions, save_grid, to_uint8
from fewstep.recipe import recipe_from_dict
from fewstep.sampling import save_sample_grid

from conftest import tiny_dict


def test_captions_say_what_made_the_grid():
    c = grid_captions("soflow", 1500, 1, 0.999, 10, 10, tuple("0123456789"))
    assert c == {"caption": "soflow · step 1500 · 1 NFE · EMA 0.999", "column_labels": list("0123456789")}
    # unlabelled data, or a grid whose columns are not the classes: no column labels
    assert grid_captions("fm", 3, 16, None, 0, None)["column_labels"] is None
    assert grid_captions("fm", 3, 16, None, 100, None) == {"caption": "fm · step 3 · 16 NFE", "column_labels": None}
    # labelled data without names: the class indices
    assert grid_captions("ect", None, 2, 0.5, 3, 3)["column_labels"] == ["0", "1", "2"]


def test_caption_band_leaves_the_grid_pixels_untouched(tmp_path):
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    plain = np.asarray(Image.open(save_grid(x, tmp_path / "a.png", nrow=3)))
    cap = np.asarray(Image.open(save_grid(x, tmp_path / "b.png", nrow=3, caption="fm · step 1 · 1 NFE",
                                          column_labels=["cat", "dog", "a-very-long-class-name"])))
    band = caption_band_height("x", ["y"])
    assert band == 30 and cap.shape == (plain.shape[0] + band, plain.shape[1], 3)
    assert np.array_equal(cap[band:], plain)  # the images themselves are exactly the uncaptioned grid
    assert (cap[:band] < 128).any()  # something (the text) was drawn in the band
    # the first cell is the first image, converted as the evaluators convert it
    first = cap[band + 2:band + 34, 2:34]
    assert np.array_equal(first, to_uint8(x[0]).permute(1, 2, 0).numpy())


def test_training_grids_are_captioned_with_objective_step_nfe_and_ema(tmp_path):
    r = recipe_from_dict(tiny_dict(train={"steps": 2, "ema": [0.9]}, eval={"nfe": [1, 2], "grid": 20}))
    res = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert [p.name for p in res.grids] == ["step_00000002_nfe1.png", "step_00000002_nfe2.png"]
    img = np.asarray(Image.open(res.grids[0]))
    # digits are labelled: 10 columns (8x8 upscaled to 32, padding 2), 2 rows, under a caption band and class labels
    band = caption_band_height("x", ["y"])
    assert img.shape == (band + 2 + 2 * 34, 2 + 10 * 34, 3)


def test_an_old_save_preview_without_captions_still_works(tmp_path):
    class Old:
        class spec:
            num_classes, class_names = 0, ()

        def save_preview(self, samples, path, nrow=None):
            self.called = (samples.shape, nrow)
            return save_grid(samples, path, nrow=nrow)

    old = Old()
    out = save_sample_grid(old, torch.zeros(4, 1, 8, 8), tmp_path / "g.png", objective="fm", nfe=1, step=1)
    assert out.is_file() and old.called == ((4, 1, 8, 8), None)
