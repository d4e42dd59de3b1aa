"""`digits-accuracy`: does a class-conditional model draw the digit it was asked for?

A support-vector classifier (RBF kernel, C = 10, gamma = 'scale') is fitted on scikit-learn's digits,
seen exactly as the `digits` data source presents them: 8x8, one channel, x = v / 8 - 1 in [-1, 1]
(v in 0..16), flattened to 64 numbers. A stratified share `holdout` of the 1797 images is kept out
of its fit and measures the classifier itself (~0.99). Each generated sample, clamped to [-1, 1], is
classified; the metric is the share labelled as the class the sample was asked for.

    digits_accuracy              share of samples classified as their asked-for class
    digits_classifier_accuracy   the classifier's accuracy on the held-out real digits
"""
from __future__ import annotations

from typing import Any

import torch

from fewstep.api import BuildContext, DataError, DataSpec, Evaluator

from .data import real_digits

SHAPE = (1, 8, 8)
CLASSES = 10


def check_spec(spec: DataSpec | None) -> None:
    """A named error unless `spec` is (or may be) scikit-learn's class-conditional digits."""
    if spec is None:
        return
    digits = tuple(spec.shape) == SHAPE and spec.name in ("", "digits")
    if not digits or spec.num_classes != CLASSES:
        fix = ("set data.conditional = true (the classes asked for are what it checks)" if digits else
               "drop it from eval.after_train / eval.metrics (it only knows these digits)")
        raise DataError(f"evaluator digits-accuracy classifies scikit-learn's 8x8 digits: it needs the class-conditional "
                        f"`digits` data source (shape {SHAPE}, {CLASSES} classes), got data {spec.name or '(unnamed)'!r} "
                        f"of shape {tuple(spec.shape)} with {spec.num_classes} classes; {fix}")


class DigitsAccuracy(Evaluator):
    inputs = "samples"

    def __init__(self, ctx: BuildContext, *, holdout: float, split_seed: int):
        super().__init__(ctx)
        check_spec(ctx.data)
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        x, y = real_digits()
        x_fit, x_held, y_fit, y_held = train_test_split(x.flatten(1).numpy(), y.numpy(), test_size=holdout,
                                                        random_state=split_seed, stratify=y.numpy())
        self.classifier = SVC(kernel="rbf", C=10.0, gamma="scale").fit(x_fit, y_fit)
        self.held_out = (torch.from_numpy(x_held).view(-1, *SHAPE), torch.from_numpy(y_held))  # (N, 1, 8, 8), (N,)
        self.classifier_accuracy = float((self.classifier.predict(x_held) == y_held).mean())
        self.record = {"classifier": "sklearn SVC(kernel='rbf', C=10, gamma='scale')", "fit_images": len(y_fit),
                       "held_out_images": len(y_held), "held_out_accuracy": self.classifier_accuracy, "split_seed": split_seed,
                       "input": "x / 8 - 1 of sklearn's digits, 64 pixels; samples clamped to [-1, 1]"}

    def predict(self, samples: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) samples in [-1, 1] -> (N,) predicted digits."""
        if samples.ndim != 4 or tuple(samples.shape[1:]) != SHAPE:
            raise DataError(f"evaluator digits-accuracy classifies (N, 1, 8, 8) digit samples in [-1, 1], got a tensor of "
                            f"shape {tuple(samples.shape)}; use it on the `digits` data source")
        flat = samples.detach().float().cpu().clamp(-1, 1).flatten(1).numpy()  # (N, 64)
        return torch.from_numpy(self.classifier.predict(flat)).long()

    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of `samples` classified as `labels` (the classes they were asked for)."""
        if labels is None or labels.shape != (samples.shape[0],):
            raise DataError(f"evaluator digits-accuracy needs one asked-for class per sample: got labels of shape "
                            f"{None if labels is None else tuple(labels.shape)} for {samples.shape[0]} samples (an "
                            f"unconditional model has none; set data.conditional = true)")
        return float((self.predict(samples) == labels.cpu().long()).float().mean())

    def evaluate(self, generated: torch.Tensor, reference: torch.Tensor, **info: Any) -> dict[str, float]:
        data = info.get("data")
        check_spec(getattr(data, "spec", None))
        return {"digits_accuracy": self.accuracy(generated, info.get("labels")),
                "digits_classifier_accuracy": self.classifier_accuracy}
