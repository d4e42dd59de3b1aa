"""Official parameter names <-> fewstep's, for the checkpoints `fewstep import` reads.

SoFlow (zlab-princeton/SoFlow): train.py saves ``{'model': Soflow.state_dict(), 'ema_model': ..., 'optimizer': ...}``;
the Soflow module (models.py) holds the backbone as ``network``, so every key starts with ``network.``.
- DiT (dit.py): the names are fewstep's DiT names except ``y_embedder.embedding_table.weight`` (here
  ``y_embedder.weight``) and ``pos_embed``, a frozen parameter there and a non-persistent buffer here (the same
  fixed sine-cosine table: checked on import, recomputed on export). A label table without the null row (a
  model trained with cfg_drop_rate 0 has num_classes rows) gets a zero row appended: the null class it never saw.
- U-Net (unet.py, EDM's SongUNet with a second time embedding): fewstep's U-Net has the official names and layout.

py-meanflow (Gsunshine/py-meanflow): training/load_and_save.py saves ``{'model': MeanFlow.state_dict(), 'optimizer',
'lr_schedule', 'epoch', 'args'}``; models/meanflow.py holds ``net``, ``net_ema`` and ``net_ema1``... (the extra decays)
and a ``num_updates`` counter. Its SongUNet has EDM's names, but its attention splits ``qkv`` into three blocks
(models/unet.py QKVAttention: ``qkv.chunk(3, dim=1)``, row j C + i is channel i of q, k, v for j = 0, 1, 2) where
EDM's (and fewstep's) interleave them (row 3 i + j).
"""
from __future__ import annotations

import torch

SOFLOW_PREFIX = "network."
DIT_LABELS = ("y_embedder.embedding_table.weight", "y_embedder.weight")  # official, fewstep


def is_dit(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("blocks.") for k in state)


def _strip(state: dict[str, torch.Tensor], prefix: str, what: str) -> dict[str, torch.Tensor]:
    if not any(k.startswith(prefix) for k in state):
        from fewstep.api import CheckpointError

        raise CheckpointError(f"{what}: no parameter name starts with {prefix!r} (found e.g. {', '.join(list(state)[:3])}); "
                              f"this is not a checkpoint of that code")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- SoFlow -------------------------------------------------------------------------------------------------------

def soflow_to_fewstep(official: dict[str, torch.Tensor], null_row: bool = True,
                      what: str = "soflow checkpoint") -> dict[str, torch.Tensor]:
    """A SoFlow Soflow.state_dict() (keys ``network.*``) -> a fewstep DiT or U-Net state dict.

    null_row: whether the official label table has the null row, which dit.py's LabelEmbedder adds exactly when
    the model was trained with label dropout (cfg_drop_rate > 0); without it a zero row is appended."""
    sd = _strip(official, SOFLOW_PREFIX, what)
    if not is_dit(sd):
        return sd  # the U-Net: same names and layout
    from fewstep_plugins.dit.model import sincos_2d

    out = {}
    for k, v in sd.items():
        if k == "pos_embed":
            hidden, tokens = v.shape[-1], v.shape[-2]
            grid = int(round(tokens ** 0.5))
            ours = sincos_2d(hidden, grid)[None]
            if tuple(v.shape) != tuple(ours.shape) or not torch.allclose(v.float(), ours, atol=1e-5):
                from fewstep.api import CheckpointError

                raise CheckpointError(f"{what}: network.pos_embed is not the fixed sine-cosine table fewstep's DiT "
                                      f"uses (largest difference {float((v.float() - ours).abs().max()):.3g}); it "
                                      f"cannot be imported as this DiT")
            continue  # a buffer fewstep recomputes
        out[DIT_LABELS[1] if k == DIT_LABELS[0] else k] = v
    table = out.get(DIT_LABELS[1])
    if table is not None and not null_row:
        out[DIT_LABELS[1]] = torch.cat([table, table.new_zeros(1, table.shape[1])])  # the null row it never used
    return out


def fewstep_to_soflow(ours: dict[str, torch.Tensor], image_size: int | None = None, patch: int | None = None,
                      null_row: bool = True) -> dict[str, torch.Tensor]:
    """The inverse: a fewstep DiT or U-Net state dict -> the official ``network.*`` names (DiT: image_size and
    patch give the pos_embed grid; null_row False drops the null row, as a model trained with cfg_drop_rate 0)."""
    if not is_dit(ours):
        return {SOFLOW_PREFIX + k: v for k, v in ours.items()}
    from fewstep_plugins.dit.model import sincos_2d

    out = {}
    for k, v in ours.items():
        out[SOFLOW_PREFIX + (DIT_LABELS[0] if k == DIT_LABELS[1] else k)] = v if (k != DIT_LABELS[1] or null_row) else v[:-1]
    hidden = ours["x_embedder.proj.weight"].shape[0]
    patch = patch or ours["x_embedder.proj.weight"].shape[-1]
    if image_size is None:
        raise ValueError("fewstep_to_soflow: a DiT needs image_size (the latent side) to write its pos_embed")
    grid = image_size // patch
    out[SOFLOW_PREFIX + "pos_embed"] = sincos_2d(hidden, grid)[None]
    return out


# -- py-meanflow --------------------------------------------------------------------------------------------------

def _qkv(name: str) -> bool:
    return name.endswith("qkv.weight") or name.endswith("qkv.bias")


def blocks_to_interleaved(w: torch.Tensor) -> torch.Tensor:
    """py-meanflow's qkv rows [q; k; v] (row j C + i) -> EDM's interleaved rows (row 3 i + j)."""
    c = w.shape[0] // 3
    return w.reshape(3, c, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def interleaved_to_blocks(w: torch.Tensor) -> torch.Tensor:
    c = w.shape[0] // 3
    return w.reshape(c, 3, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def meanflow_to_fewstep(official: dict[str, torch.Tensor], what: str = "py-meanflow checkpoint"
                        ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], int | None]:
    """A py-meanflow MeanFlow.state_dict() -> (raw weights, [EMA copies: net_ema, net_ema1, ...], num_updates)."""
    def one(prefix):
        return {k: (blocks_to_interleaved(v) if _qkv(k) else v) for k, v in _strip(official, prefix, what).items()}

    raw = one("net.")
    emas = [one("net_ema.")] if any(k.startswith("net_ema.") for k in official) else []
    i = 1
    while any(k.startswith(f"net_ema{i}.") for k in official):
        emas.append(one(f"net_ema{i}."))
        i += 1
    steps = official.get("num_updates")
    return raw, emas, (int(steps) if steps is not None else None)


def fewstep_to_meanflow(raw: dict[str, torch.Tensor], emas: list[dict[str, torch.Tensor]], num_updates: int = 0
                        ) -> dict[str, torch.Tensor]:
    def one(prefix, sd):
        return {prefix + k: (interleaved_to_blocks(v) if _qkv(k) else v) for k, v in sd.items()}

    out = {"num_updates": torch.tensor(num_updates), **one("net.", raw)}
    for i, sd in enumerate(emas):
        out.update(one("net_ema." if i == 0 else f"net_ema{i}.", sd))
    return out
