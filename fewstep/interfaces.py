"""The contracts every plugin honours.

Time convention everywhere in the core: t = 0 is data, t = 1 is noise,
x_t = (1 - t) x0 + t e. An objective that thinks in another convention (EDM
sigma for consistency training) converts at its own boundary.

Backbone:   ``net(x, t, s, y, **cond) -> Tensor`` shaped like x; t, s of shape (B,), s <= t;
            y of shape (B,) with ``num_classes`` as the null class (None: all null);
            ``cond``: extra named per-row conditions the backbone declares in its class
            attribute ``conditions`` (e.g. ``augment_labels`` (B, A)); a missing one means "none".
Objective:  ``loss(net, batch, step) -> LossOutput``; ``flow_map(net, x, t, s, y)``;
            ``velocity(net, x, t, y)``; names its default sampler at registration;
            optional ``prepare(net)`` runs once on a fresh run before the optimizer/EMA exist;
            optional ``extend(net)`` runs on every build (fresh, resumed, check, eval) and may add submodules
            the objective trains with the backbone (sCT's adaptive-weighting head);
            ``flow_map``/``velocity`` may take the backbone's extra conditions as keywords (``**cond``), which
            samplers set at sampling time (iMF's guidance scale and interval).
Sampler:    ``sample(objective, net, noise, y, nfe, generator) -> x0``.
DataSource: ``spec``; ``batches(batch, seed, start_step, rank, world)``; ``to_images``;
            ``reference_batches(split, batch, limit, rank, world)`` streams real images.
Evaluator:  ``evaluate(samples, reference, **ctx) -> dict[str, float]``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import DataError  # noqa: F401  (public through fewstep.api)

if TYPE_CHECKING:  # torch is imported lazily: this module is read by the CLI
    from pathlib import Path

    import torch
    from torch import Tensor, nn


@dataclass(frozen=True)
class DataSpec:
    """What a data source yields: the model-space tensors (pixels or latents)."""

    shape: tuple[int, ...]  # (C, H, W) of one sample in model space
    num_classes: int  # 0: unconditional; labels are 0..num_classes-1, null class = num_classes
    name: str = ""
    #: the extra per-row conditions its batches carry in Batch.cond, name -> shape of one row's value
    #: (e.g. {"augment_labels": (6,)}); the backbone must declare each in its `conditions`
    cond_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: class names for labelled data (shown above the columns of sample grids); () for plain indices
    class_names: tuple[str, ...] = ()

    @property
    def null_class(self) -> int:
        return self.num_classes


@dataclass
class BuildContext:
    """Handed to every factory: what the run knows that a component may need."""

    data: DataSpec | None = None
    train_steps: int = 0  # the run's total optimizer steps (schedules may default to it)
    seed: int = 0
    device: Any = "cpu"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    x: "Tensor"  # (B, C, H, W) model-space data, t = 0
    y: "Tensor | None"  # (B,) int64 labels or None for unconditional data
    #: extra per-row conditions for the backbone, each (B, ...), e.g. {"augment_labels": (B, 9)}; objectives
    #: hand them to every network call on the same rows (net(x, t, s, y, **cond))
    cond: dict[str, "Tensor"] = field(default_factory=dict)


@dataclass
class LossOutput:
    """The scalar to back-propagate plus named float metrics (raw, unweighted errors)."""

    loss: "Tensor"
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(abc.ABC):
    """A training objective: owns its parameterisation, time sampling, CFG and weighting.

    Its default sampler is not an attribute: it is named once, at registration
    (``register(..., default_sampler="...")``, kept in ``PluginSpec.extras``), and a recipe without a
    ``[sampler]`` table gets it from there (fewstep/recipe.py).
    """

    #: the metric (a key of LossOutput.metrics) that tells how training goes: the progress bar and the final
    #: table show it beside the loss, whose value under adaptive weighting (p = 1) sits near 1 whatever the error.
    headline_metric: str = ""
    #: True when loss() calls the unwrapped module (e.g. torch.func.jvp), bypassing DDP: the engine
    #: then skips the DDP wrapper and all-reduces gradients itself after backward
    manual_grad_sync: bool = False

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx

    @abc.abstractmethod
    def loss(self, net: "nn.Module", batch: Batch, step: int) -> LossOutput:
        """One training loss on a batch at optimizer step `step` (0-based, finished steps)."""

    @abc.abstractmethod
    def flow_map(self, net: "nn.Module", x: "Tensor", t: "Tensor", s: "Tensor", y: "Tensor | None") -> "Tensor":
        """Carry x at time t to time s <= t (t, s of shape (B,))."""

    def velocity(self, net: "nn.Module", x: "Tensor", t: "Tensor", y: "Tensor | None") -> "Tensor":
        """Instantaneous velocity dx/dt at (x, t): by default the network at s = t."""
        return net(x, t, t, y)

    def extend(self, net: "nn.Module") -> None:
        """Called on every build of the components (fresh run, resume, ``fewstep check``, evaluation), right after
        the backbone is built and before it moves to the device: an objective that trains parameters of its own (a
        learned loss weighting) adds them here as a submodule of `net` (``net.add_module(name, module)``), so that
        the optimizer, the EMA copies, checkpoints and resumes carry them with the backbone. Default: nothing."""

    def prepare(self, net: "nn.Module") -> None:
        """Called once on a fresh run (never on resume), after the backbone is built and before
        the optimizer and EMA copies exist, e.g. to load warm-start weights. Default: nothing."""


class Sampler(abc.ABC):
    """Turns noise into data with a fixed number of network evaluations."""

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx

    @abc.abstractmethod
    def sample(self, objective: Objective, net: "nn.Module", noise: "Tensor", y: "Tensor | None", nfe: int,
               generator: "torch.Generator | None" = None) -> "Tensor":
        """Return samples at t = 0 from `noise` at t = 1, using `nfe` network evaluations."""


class DataSource(abc.ABC):
    """Yields (x, y) batches in model space and turns samples back into images."""

    spec: DataSpec

    @abc.abstractmethod
    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """An endless, deterministic stream of this rank's batches, starting at step `start_step`.

        The global batch of step k is the same whatever `world` is; rank r gets its slice.
        """

    def place(self, device: "torch.device") -> str:
        """Called once by the trainer before the first batch: a source that holds its data in memory may move it
        to the training device here (fewstep's TensorSource does when it takes at most a quarter of the free
        device memory). Returns a line saying what moved ("" for nothing). Default: nothing.

        `batches()` runs on a background thread from its second batch on (the trainer's prefetcher), so it must
        draw its randomness from generators of its own, keyed by (seed, step), never from the global RNG."""
        return ""

    def to_images(self, x: "Tensor") -> "Tensor":
        """Model-space samples -> images in [-1, 1], (B, C, H, W) (decode latents here)."""
        return x

    def save_preview(self, samples: "Tensor", path: "Path", nrow: int | None = None, *, caption: str | None = None,
                     column_labels: list[str] | None = None) -> "Path":
        """Write a picture of samples (as returned by `to_images`): an image grid by default, with `caption` (what
        made them: objective, step, NFE, EMA copy) and `column_labels` (the class of each column) drawn above it.
        An override that does not accept `caption` and `column_labels` still works: it gets no captions."""
        from .images import save_grid

        return save_grid(samples, path, nrow=nrow, caption=caption, column_labels=column_labels)

    def reference_images(self, split: str = "train", limit: int | None = None) -> "Tensor":
        """Real images in [-1, 1] for reference statistics (all at once: small data sources only)."""
        raise NotImplementedError(f"{type(self).__name__} provides no reference images")

    def reference_batches(self, split: str = "train", batch_size: int = 256, limit: int | None = None,
                          rank: int = 0, world: int = 1) -> Iterator["Tensor"]:
        """Real images in [-1, 1], (b, C, H, W) float, streamed: rank `rank` of `world` gets the batches
        i with i % world == rank of the first `limit` images (None: all) in a fixed order.

        Data sources too large for memory override this; the default slices `reference_images`.
        """
        images = self.reference_images(split, limit=limit)
        for k, i in enumerate(range(0, len(images), batch_size)):
            if k % world == rank:
                yield images[i:i + batch_size]


class Logger(abc.ABC):
    """An experiment-tracking sink (metrics.jsonl, TensorBoard, Weights & Biases, ...), rank 0 only.

    The trainer calls, in order: ``start`` once, ``log_scalars`` at every logged step, ``log_images`` at every
    evaluation point, ``finish`` once at the end (also after an error or a preemption, with what is known), then
    ``close``. A logger that raises is named in the run's output and switched off; the run and the other loggers
    go on.
    """

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx

    @abc.abstractmethod
    def start(self, run_dir: "Path", recipe: dict[str, Any], resume_step: int | None) -> None:
        """A run starts in `run_dir` with the resolved `recipe` (a plain dict); `resume_step` is the step it resumes
        from (lines logged after it will be logged again: drop them), None for a fresh run."""

    @abc.abstractmethod
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars of one logged step (loss, the objective's metrics, lr, steps/s, ...)."""

    def log_images(self, step: int, images: dict[str, "Path"]) -> None:
        """Pictures written at an evaluation point, name -> PNG file (e.g. "samples/nfe1"). Default: nothing."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's summary (steps, wall time, final metrics, how it ended). Default: nothing."""

    def close(self) -> None:
        """Release files and connections. Default: nothing."""


def _cat(parts: list) -> "Tensor | None":
    import torch

    return torch.cat(parts) if parts else None


@dataclass
class ImageStream:
    """This process's share of a set of uint8 images, produced batch by batch (streaming evaluators).

    ``batches()`` yields (b, C, H, W) uint8 tensors; under ``torchrun`` the set's batches are dealt round robin
    (batch k to rank k % world) and the evaluator combines partial results with ``all_reduce_sum`` (sum of a
    tensor over ranks), ``gather_batches`` (a list of per-batch tensors, one per batch this rank pulled -> the
    whole set's rows in one process's order, on every rank) or ``gather`` (tensors concatenated in rank order,
    on every rank). ``num`` counts images over all ranks.
    A reference stream may carry ``statistics``: a stored file of reference statistics the user gave
    (``--reference X.npz``), to use instead of its images; ``key`` names the reference for caches.
    """

    batches: Callable[[], Iterator["Tensor"]]
    num: int
    shape: tuple[int, ...] | None = None
    name: str = ""
    split: str = ""
    key: str = ""
    statistics: "Path | None" = None
    all_reduce_sum: Callable[["Tensor"], "Tensor"] = lambda t: t
    gather: Callable[["Tensor"], "Tensor"] = lambda t: t
    gather_batches: Callable[[list], "Tensor | None"] = lambda parts: _cat(parts)
    rank: int = 0
    world: int = 1


class Evaluator(abc.ABC):
    """Given generated samples and a reference, returns named metrics."""

    #: "images": generated/reference arrive as uint8 (N, C, H, W) images (FID and friends);
    #: "samples": as float tensors in model space, exactly what the sampler returned (e.g. GMM points)
    inputs: str = "images"
    #: True: the caller invokes ``evaluate_stream(generated, reference, **info)`` with two :class:`ImageStream`
    #: instead of ``evaluate``; the evaluator pulls the batches itself and never needs every image at once
    streams: bool = False

    def evaluate_stream(self, generated: ImageStream, reference: ImageStream, **info: Any) -> dict[str, float]:
        """Metrics of the streamed generated images against the streamed (or stored) reference; every rank
        calls it with its share, every rank returns the same numbers."""
        raise NotImplementedError(f"{type(self).__name__} does not stream; set streams = False")

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx

    @abc.abstractmethod
    def evaluate(self, generated: "Tensor", reference: "Tensor", **info: Any) -> dict[str, float]:
        """Metrics of `generated` against `reference`.

        `info` carries what the caller knows and an evaluator may use: nfe, num_samples, labels (the
        (N,) int64 classes the generated samples were asked for, row for row; None for unconditional
        data), and for evaluators that query the model itself, objective, net (EMA weights, eval mode),
        sampler, data and device.
        """
