"""The `digits` plugin: scikit-learn's bundled 8x8 handwritten digits (nothing to download), and the evaluator
`digits-accuracy`, a digit classifier that checks whether samples show the class they were asked for."""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("conditional", bool, True, "feed the 10 class labels (False: unconditional)"),
    Option("limit", int, 0, "use only the first N images (0: all 1797)", ge=0),
]

EVAL_OPTIONS = [
    Option("holdout", float, 0.25, "share of the real digits kept out of the classifier's fit (its own accuracy)",
           gt=0, lt=1),
    Option("split_seed", int, 0, "seed of the stratified fit / held-out split", ge=0),
]


@hookimpl
def register_datasets(register):
    register("digits", "fewstep_plugins.digits.data:Digits", options=OPTIONS, compare_recipe="compare_digits.toml",
             description="scikit-learn's 1797 handwritten digits, 8x8 grey, 10 classes, scaled to [-1, 1]")


@hookimpl
def register_evaluators(register):
    register("digits-accuracy", "fewstep_plugins.digits.evaluator:DigitsAccuracy", options=EVAL_OPTIONS,
             description="share of digit samples an SVC fitted on the real digits labels as their asked-for class")
