"""ADM's centre crop (Dhariwal & Nichol 2021, openai/guided-diffusion `image_datasets.py::center_crop_arr`),
the preprocessing of SoFlow's, MeanFlow's and DiT's ImageNet latents."""
from __future__ import annotations

import numpy as np


def adm_center_crop(img, resolution: int) -> np.ndarray:
    """A PIL RGB image -> (resolution, resolution, 3) uint8.

    1. Halve both sides with a box filter (sizes floor-divided by 2) while the short side is at least
       2 x resolution: cheap, alias-free reduction of large photos.
    2. Resize with a bicubic filter so that the short side is exactly `resolution` (the long side is
       rounded to the nearest integer; images smaller than `resolution` are enlarged here).
    3. Cut the centred square; an odd surplus leaves the extra pixel on the right / bottom.
    """
    from PIL import Image

    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    factor = resolution / min(img.size)
    img = img.resize((round(img.width * factor), round(img.height * factor)), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - resolution) // 2, (a.shape[1] - resolution) // 2
    return a[top:top + resolution, left:left + resolution]
