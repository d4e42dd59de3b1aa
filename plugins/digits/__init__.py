"""The `digits` dataset plugin: scikit-learn's bundled 8x8 handwritten digits (nothing to download)."""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("conditional", bool, True, "feed the 10 class labels (False: unconditional)"),
    Option("limit", int, 0, "use only the first N images (0: all 1797)", ge=0),
]


@hookimpl
def register_datasets(register):
    register("digits", "fewstep_plugins.digits.data:Digits", options=OPTIONS, compare_recipe="compare_digits.toml",
             description="scikit-learn's 1797 handwritten digits, 8x8 grey, 10 classes, scaled to [-1, 1]")
