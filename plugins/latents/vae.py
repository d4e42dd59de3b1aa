"""The latent autoencoder: diffusers' AutoencoderKL, Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse) by default.

SoFlow, MeanFlow and DiT train on its latents: a 256x256 image becomes a (4, 32, 32) posterior
N(mean, std^2); the model sees (mean + std * eps) * 0.18215 and samples are decoded after dividing by
0.18215 (zlab-princeton/SoFlow latent_dataset.py and train.py; facebookresearch/DiT train.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from fewstep.api import DataError

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_SCALING = 0.18215

#: The architecture of stabilityai/sd-vae-ft-mse (and -ft-ema, and every SD-1.x VAE): 83.65M parameters,
#: downsampling 8. Built with random weights it stands in for the real one where the hub cannot be reached.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, sample_size=256, norm_num_groups=32, act_fn="silu")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_vae(name: str, device: torch.device | str = "cpu", dtype: str = "fp32") -> tuple["torch.nn.Module", str]:
    """AutoencoderKL from a local folder (config.json + diffusion_pytorch_model.safetensors, as
    `save_pretrained` writes) or a hub name; safetensors weights only (nothing is unpickled). Returns the
    model (eval, no gradients, on `device` in `dtype`) and the fingerprint of its float32 weights."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    local = path.is_dir() or name.startswith((".", "/", "~")) or path.exists()
    if local and not path.is_dir():
        raise DataError(f"VAE {name!r}: no such folder (expected config.json and diffusion_pytorch_model.safetensors)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path) if local else name, use_safetensors=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"the folder {path}" if local else "the Hugging Face hub"
        hint = ("it needs config.json and diffusion_pytorch_model.safetensors" if local else
                f"offline? where the hub is reachable run AutoencoderKL.from_pretrained({name!r})"
                ".save_pretrained(DIR) and pass the folder DIR")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"VAE {name!r}: cannot load it from {where} ({first}); {hint}") from None
    fp = fingerprint(vae)
    # nn.Module.to: diffusers' own `to` warns about casts even for this model, which keeps no layer in float32
    return torch.nn.Module.to(vae.eval().requires_grad_(False), device=device, dtype=DTYPES[dtype]), fp


def fingerprint(vae: "torch.nn.Module") -> str:
    """sha256 of every weight (names, shapes and float32 bytes): two VAEs with equal fingerprints encode and
    decode identically, whatever they are called."""
    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        t = v.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}:{tuple(t.shape)};".encode())
        h.update(t.numpy().data)
    return h.hexdigest()


def downsampling(vae: "torch.nn.Module") -> int:
    """Pixels per latent cell along a side: 2 ** (number of encoder blocks - 1) (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae: "torch.nn.Module", images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (B, 3, H, W) -> the posterior's mean and std (B, C, H/8, W/8), float32."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


@torch.no_grad()
def decode(vae: "torch.nn.Module", z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, 8h, 8w) float32, clamped to [-1, 1]."""
    return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)
