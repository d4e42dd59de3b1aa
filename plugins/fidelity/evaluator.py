"""The `fid`, `kid`, `isc` and `prc` evaluators: torch-fidelity through fewstep's adapter.

Each evaluator resolves its weights when it is built (so `fewstep compare` stops before any
training when they are missing), and records with every number what produced it
(:attr:`FidelityEvaluator.record`): sample counts, reference name/split/resolution and its cache
key, extractor, weights file and hash, torch-fidelity version.

Evaluators that run on the same samples with the same extractor (fid and kid, say) share one
torch-fidelity call: the caller passes them as ``peers``; the first computes every peer's metric
in one pass over the images and the others read the result from a small in-process memo.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable, ClassVar, Sequence

import torch

from fewstep.api import BuildContext, Evaluator

from . import weights as W
from .adapter import INCEPTION, VGG16, FidelitySettings, calculate, extractor_for, torch_fidelity_version

_MEMO: "OrderedDict[str, dict[str, float]]" = OrderedDict()
_MEMO_SIZE = 16
_EXTRACTORS: dict = {}  # (extractor, weights, device, batch) -> stream.Extractor
_REFERENCES: dict = {}  # (cache path, keep features) -> stream.FeatureSet of the last reference


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes."""
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("_") or "none"


def reference_cache_key(dataset: str, split: str, shape: Sequence[int], num_images: int, extractor: str,
                        weights_sha256: str, content_sha256: str) -> str:
    """The name reference features/statistics are cached under (torch-fidelity's input2_cache_name).

    One entry per (dataset, split, resolution, number of images, extractor, weights hash); the
    content hash makes a changed data source (other options, other files) a new entry as well.
    """
    res = "x".join(str(int(s)) for s in shape)
    return (f"fewstep-{_slug(dataset)}-{_slug(split)}-{res}-n{int(num_images)}-{_slug(extractor)}"
            f"-w{(weights_sha256 or 'none')[:12]}-d{content_sha256[:12]}")


class FidelityEvaluator(Evaluator):
    """One torch-fidelity metric. Subclasses set `metric` (isc, fid, kid, prc) and the keys it returns."""

    metric: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: BuildContext, feature_extractor: str = "", inception_weights: str = "", vgg16_weights: str = "",
                 batch: int = 64, device: str = "auto", download: bool = False, cache: bool = True,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10, prc_neighborhood: int = 3):
        super().__init__(ctx)
        self.extractor = extractor_for([self.metric], feature_extractor)
        self.download = download
        self.cache = cache
        self.weights: W.Weights | None = None
        what = {"isc": "the Inception Score (isc)", "fid": "FID", "kid": "KID", "prc": "precision/recall (prc)"}[self.metric]
        need_logits = self.metric == "isc"

        def resolve():
            if self.extractor == INCEPTION:
                return W.resolve_inception(inception_weights, need_logits=need_logits, metric_names=what)
            if self.extractor == VGG16:
                return W.resolve_vgg16(vgg16_weights)
            return None

        try:
            self.weights = resolve()
        except W.MissingWeightsError:
            if not download or inception_weights or vgg16_weights:
                raise
            # download=true with nothing on disk: fewstep fetches the file into the torch hub cache and then reads
            # it like any other (torch-fidelity's own download would unpickle it with weights_only=False)
            url, hub = (W.VGG16_URL, W.VGG16_HUB_FILE) if self.extractor == VGG16 else (W.INCEPTION_URL, W.INCEPTION_HUB_FILE)
            try:
                W.download_weights(url, hub)
            except OSError as exc:
                helptext = W.vgg16_help() if self.extractor == VGG16 else W.inception_help(what)
                raise W.MissingWeightsError(f"downloading {url} failed ({exc}).\n{helptext}") from None
            self.weights = resolve()
        self.settings = FidelitySettings(
            feature_extractor=self.extractor, weights_path=str(self.weights.path) if self.weights else "",
            batch_size=batch, device=device, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
            isc_splits=isc_splits, prc_neighborhood=prc_neighborhood,
            cache_root=str(W.cache_dir() / "fidelity"))
        self.record: dict[str, Any] = {}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, generated: torch.Tensor, reference: torch.Tensor, *, reference_name: str = "", reference_split: str = "",
                 peers: Sequence[Evaluator] = (), progress: Callable[[int], None] | None = None,
                 **info: Any) -> dict[str, float]:
        """Metrics of uint8 `generated` against uint8 `reference` (N, C, H, W).

        reference_name/reference_split name the reference for its cache entry and the record;
        peers: other evaluators run on the same samples (shared torch-fidelity call);
        progress(n): called as images pass through the feature extractor.
        """
        group = [self] + [p for p in peers if isinstance(p, FidelityEvaluator) and p is not self
                          and p.extractor == self.extractor and p.settings == self.settings]
        metrics = sorted({e.metric for e in group})
        needs_ref = any(m != "isc" for m in metrics)
        ref_key = ""
        if needs_ref:
            ref_key = reference_cache_key(reference_name or "unnamed", reference_split or "-", reference.shape[1:], len(reference),
                                          self.extractor, self.weights.sha256 if self.weights else "", tensor_digest(reference))
        memo_key = "|".join([tensor_digest(generated), ref_key, repr(self.settings), ",".join(metrics)])
        if memo_key not in _MEMO:
            # torch-fidelity's own feature cache is read back with torch.load(weights_only=False): fewstep never uses
            # it; reference features are cached by the streaming path as .npz (stream.py)
            settings = self.settings
            _MEMO[memo_key] = self._call(generated, reference if needs_ref else None, metrics, settings, progress)
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
        result = _MEMO[memo_key]
        self.record = self._record(generated, reference if self.metric != "isc" else None, reference_name, reference_split, ref_key)
        return {k: result[k] for k in self.keys}

    # -- streaming (FID, KID) -------------------------------------------------------------------
    def _extractor(self):
        key = (self.extractor, self.settings.weights_path, self.settings.device, self.settings.batch_size)
        if key not in _EXTRACTORS:
            from .stream import Extractor

            _EXTRACTORS.clear()  # one network in memory at a time
            _EXTRACTORS[key] = Extractor(self.extractor, self.settings.weights_path, self.settings.device,
                                         self.settings.batch_size)
        return _EXTRACTORS[key]

    def _group(self, peers):
        return [self] + [p for p in peers if isinstance(p, FidelityEvaluator) and p is not self and p.streams
                         and p.extractor == self.extractor and p.settings == self.settings]

    def reference_features(self, reference, keep: bool, progress=None):
        """The reference's FeatureSet: the user's statistics file, fewstep's .npz cache, or one pass over it."""
        from . import stream as S

        ext = self._extractor()
        if reference.statistics is not None:
            return S.load_stats(reference.statistics, ext.dim, need_features=keep)
        sha = self.weights.sha256 if self.weights else ""
        path = W.cache_dir() / "fidelity" / S.cache_name(reference.key, self.extractor, sha) if reference.key else None
        memo = (str(path), keep)
        if path is not None and memo in _REFERENCES:
            return _REFERENCES[memo]
        fs = None
        if self.cache and path is not None and path.is_file():
            try:
                fs = S.load_stats(path, ext.dim, need_features=keep)
            except S.ReferenceStatsError:
                fs = None  # a stale or partial cache entry: compute again
        if fs is None:
            if keep:
                S.check_feature_memory(reference.num or 0, ext.dim, "KID")
            fs = S.feature_pass(reference, ext, keep, progress)
            if self.cache and path is not None and reference.rank == 0:
                S.save_stats(path, fs, extractor=self.extractor, weights_sha256=sha, reference=reference.key)
        if path is not None:
            _REFERENCES.clear()
            _REFERENCES[memo] = fs
        return fs

    def evaluate_stream(self, generated, reference, *, peers: Sequence[Evaluator] = (), shared: dict | None = None,
                        progress: Callable[[int], None] | None = None, reference_name: str = "", reference_split: str = "",
                        **info: Any) -> dict[str, float]:
        """FID / KID of the streamed generated images against the streamed (or stored) reference; FID and KID
        evaluators on the same extractor share one pass over the generated images (through `shared`)."""
        from . import stream as S

        shared = {} if shared is None else shared
        group = self._group(peers)
        keep = any(e.metric == "kid" for e in group)
        key = f"fidelity|{self.extractor}|{self.settings!r}|keep={keep}"
        ext = self._extractor()
        if key not in shared:
            if keep:
                S.check_feature_memory(generated.num, ext.dim, "KID")
            shared[key] = S.feature_pass(generated, ext, keep, progress)
        gen = shared[key]
        ref = self.reference_features(reference, keep)
        self.record = self._stream_record(gen, ref, reference)
        if self.metric == "fid":
            return {"fid": S.fid_from(gen, ref)}
        return S.kid_from(gen, ref, self.settings.kid_subsets, self.settings.kid_subset_size, self.settings.rng_seed)

    def write_statistics(self, stream, path, progress=None) -> dict[str, Any]:
        """`fewstep stats`: mu and sigma of a stream's features, written as .npz by rank 0."""
        from . import stream as S

        fs = S.feature_pass(stream, self._extractor(), keep=False, progress=progress)
        if stream.rank == 0:
            S.save_stats(Path(path), fs, extractor=self.extractor, weights_sha256=self.weights.sha256 if self.weights else "",
                         reference=stream.key or f"{stream.name} {stream.split}")
        return {"num": fs.num, "features": len(fs.mu)}

    def _stream_record(self, gen, ref, reference) -> dict[str, Any]:
        rec = {"metric": self.metric, "num_generated": gen.num, "resolution": list(gen.shape or ()), "extractor": self.extractor,
               "weights": self.weights.record() if self.weights else None, "torch_fidelity": torch_fidelity_version(),
               "tool": self._tool(), "uint8": "floor(clamp(127.5 x + 128, 0, 255)); grey repeated to 3 channels",
               "num_reference": ref.num, "reference": reference.name, "reference_split": reference.split,
               "reference_statistics": str(reference.statistics) if reference.statistics else None,
               "streamed": True, "ranks": reference.world}
        if self.metric == "kid":
            n = min(gen.num, ref.num or gen.num)
            rec.update(kid_subsets=self.settings.kid_subsets, kid_subset_size=min(self.settings.kid_subset_size, n))
        return rec

    def _tool(self) -> str:
        w = f", weights {self.weights.sha256[:8]}" if self.weights else ""
        return f"torch-fidelity {torch_fidelity_version()} ({self.extractor}{w})"

    def _call(self, generated, reference, metrics, settings, progress) -> dict[str, float]:
        try:
            return calculate(generated, reference, metrics, settings, progress)
        except OSError as exc:  # URLError included: an offline download attempt
            if self.weights is None and self.extractor in (INCEPTION, VGG16):
                helptext = W.vgg16_help() if self.extractor == VGG16 else W.inception_help(self.metric)
                raise W.MissingWeightsError(f"downloading the {self.extractor} weights failed ({exc}).\n{helptext}") from exc
            raise

    def _record(self, generated, reference, reference_name, reference_split, ref_key) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "metric": self.metric,
            "num_generated": int(len(generated)),
            "resolution": list(generated.shape[1:]),
            "extractor": self.extractor,
            "weights": self.weights.record() if self.weights else ("torch-fidelity download" if self.download else None),
            "torch_fidelity": torch_fidelity_version(),
            "tool": self._tool(),
            "uint8": "floor(clamp(127.5 x + 128, 0, 255)); grey repeated to 3 channels",
        }
        if reference is not None:
            rec.update(num_reference=int(len(reference)), reference=reference_name, reference_split=reference_split,
                       reference_cache_key=ref_key if self.cache else None)
        if self.metric == "kid":
            n = min(len(generated), len(reference))
            rec.update(kid_subsets=self.settings.kid_subsets, kid_subset_size=min(self.settings.kid_subset_size, n))
        if self.metric == "isc":
            rec.update(isc_splits=min(self.settings.isc_splits, len(generated)))
        if self.metric == "prc":
            rec.update(prc_neighborhood=self.settings.prc_neighborhood)
        return rec


class FID(FidelityEvaluator):
    metric, keys = "fid", ("fid",)
    streams = True

    def __init__(self, ctx: BuildContext, *, feature_extractor: str, inception_weights: str, batch: int, device: str,
                 download: bool, cache: bool):
        super().__init__(ctx, feature_extractor=feature_extractor, inception_weights=inception_weights, batch=batch,
                         device=device, download=download, cache=cache)


class KID(FidelityEvaluator):
    metric, keys = "kid", ("kid_mean", "kid_std")
    streams = True

    def __init__(self, ctx: BuildContext, *, feature_extractor: str, inception_weights: str, batch: int, device: str,
                 download: bool, cache: bool, kid_subsets: int, kid_subset_size: int):
        super().__init__(ctx, feature_extractor=feature_extractor, inception_weights=inception_weights, batch=batch,
                         device=device, download=download, cache=cache, kid_subsets=kid_subsets,
                         kid_subset_size=kid_subset_size)


class ISC(FidelityEvaluator):
    metric, keys = "isc", ("isc_mean", "isc_std")

    def __init__(self, ctx: BuildContext, *, feature_extractor: str, inception_weights: str, batch: int, device: str,
                 download: bool, cache: bool, isc_splits: int):
        super().__init__(ctx, feature_extractor=feature_extractor, inception_weights=inception_weights, batch=batch,
                         device=device, download=download, cache=cache, isc_splits=isc_splits)


class PRC(FidelityEvaluator):
    metric, keys = "prc", ("precision", "recall", "f_score")

    def __init__(self, ctx: BuildContext, *, feature_extractor: str, inception_weights: str, vgg16_weights: str, batch: int,
                 device: str, download: bool, cache: bool, prc_neighborhood: int):
        super().__init__(ctx, feature_extractor=feature_extractor, inception_weights=inception_weights,
                         vgg16_weights=vgg16_weights, batch=batch, device=device, download=download, cache=cache,
                         prc_neighborhood=prc_neighborhood)
