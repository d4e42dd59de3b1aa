"""Pixel data sets: `cifar10` and `imagefolder`, with EDM's non-leaking augmentation as an option of both.

Registration only (no torch here); see docs/data.md.
"""
from fewstep.api import Option, hookimpl

# EDM's augmentation (Karras et al. 2022, App. F.2). The multipliers default to SoFlow's and py-meanflow's CIFAR-10
# pipeline, AugmentPipe(p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1, translate_frac=1)
# (zlab-princeton/SoFlow train.py:101, Gsunshine/py-meanflow meanflow/training/train_loop.py:68): 6 label dims.
# EDM's own CIFAR-10 runs also set yflip=1 and rotate_frac=1 (NVlabs/edm train.py:145): 9 label dims.
AUGMENT_OPTIONS = [
    Option("augment", float, 0.0, "EDM augmentation probability p (SoFlow, MeanFlow and EDM on CIFAR-10: 0.12); "
           "0: off, no augment_labels", ge=0, le=1),
    Option("augment_xflip", float, 1e8, "x-flip multiplier; the official 1e8 caps xflip * p at 1: every image is "
           "mirrored with probability 1/2 and labelled", ge=0),
    Option("augment_yflip", float, 0.0, "y-flip multiplier (EDM: 1)", ge=0),
    Option("augment_scale", float, 1.0, "isotropic-scale multiplier (scale 2 ** (0.2 N(0, 1)))", ge=0),
    Option("augment_rotate", float, 0.0, "rotation multiplier (angle U(-pi, pi); EDM: 1)", ge=0),
    Option("augment_aniso", float, 1.0, "anisotropic-scale multiplier", ge=0),
    Option("augment_translate", float, 1.0, "translation multiplier (0.125 x size x N(0, 1) per axis)", ge=0),
]

BAD_IMAGES = Option("bad_images", str, "error", "an unreadable (or, for cifar10, not 32x32) image: stop with its "
                    "name, or leave it out", choices=("error", "skip"))
CACHE_DIR = Option("cache_dir", str, "auto", "where decoded data / folder scans are cached: auto = $FEWSTEP_CACHE, "
                   "else ~/.cache/fewstep; \"\" = no cache")

CIFAR10_OPTIONS = [
    Option("root", str, "", "folder holding cifar-10-batches-py/ (or its .tar.gz), <split>/<class>/ images or "
           "<split>.tar.gz", required=True),
    Option("split", str, "train", "the split to train on", choices=("train", "test")),
    Option("conditional", bool, False, "feed the 10 class labels (False: unconditional, as in the official runs)"),
    Option("flip", bool, False, "mirror half of the images at random (unlabelled; py-meanflow does this besides "
           "the augmentation's x-flip, SoFlow does not)"),
    Option("limit", int, 0, "train on the first N images only (0: all)", ge=0),
    Option("download", bool, False, "fetch the python archive from cs.toronto.edu when root holds no data "
           "(needs internet)"),
    CACHE_DIR,
    Option("keep_on_device", bool, True, "hold the uint8 images on the training device (150 MiB) and augment there"),
    BAD_IMAGES,
    *AUGMENT_OPTIONS,
]

IMAGEFOLDER_OPTIONS = [
    Option("root", str, "", "folder of class folders, root/<class>/<image> (the ImageNet layout)", required=True),
    Option("resolution", int, 256, "side of the ADM centre crop, in pixels", ge=8),
    Option("conditional", bool, True, "feed the class-folder labels (False: unconditional)"),
    Option("flip", bool, False, "mirror half of the images at random (SoFlow and MeanFlow on ImageNet: no flip)"),
    Option("workers", int, 8, "DataLoader worker processes that decode and crop (0: in the training process)", ge=0),
    Option("prefetch", int, 4, "batches each worker prepares ahead", ge=1),
    Option("small_images", str, "error", "an image whose short side is below the resolution: stop with its name, "
           "enlarge it (ADM's bicubic resize), or leave it out", choices=("error", "upscale", "skip")),
    BAD_IMAGES,
    Option("check", str, "header", "build-time check of every file: read its header, or decode it fully "
           "(slow; also finds truncated files)", choices=("header", "decode")),
    CACHE_DIR,
    *AUGMENT_OPTIONS,
]


@hookimpl
def register_datasets(register):
    register("cifar10", "fewstep_plugins.images.cifar10:Cifar10", options=CIFAR10_OPTIONS,
             description="CIFAR-10 32x32 (python archive, image tree or its tar.gz), optional flip and EDM augmentation")
    register("imagefolder", "fewstep_plugins.images.imagefolder:ImageFolder", options=IMAGEFOLDER_OPTIONS,
             description="class-per-folder images (ImageNet layout), ADM centre crop, decoded by DataLoader workers")
