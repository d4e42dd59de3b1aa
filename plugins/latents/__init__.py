"""VAE latents: the `latents` dataset and the `fewstep cache-latents` command (registration only, no torch here).

See docs/data.md.
"""
from pathlib import Path
from typing import Annotated, Optional

from fewstep.api import Option, hookimpl

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # = vae.DEFAULT_VAE (kept here too: this module imports no torch)

LATENTS_OPTIONS = [
    Option("root", str, "", "folder written by `fewstep cache-latents`", required=True),
    Option("vae", str, DEFAULT_VAE, "the VAE (hub name or local folder) that decodes samples; must be the one the "
           "cache was made with (same name, or the same weights)"),
    Option("resolution", int, 256, "image resolution the cache must have been made at", ge=8),
    Option("scaling_factor", float, 0.18215, "latents are (mean + std * eps) * scaling_factor; decoding divides by it "
           "(SD VAE: 0.18215)", gt=0),
    Option("channel_mean", float, [], "per-channel standardisation instead of scaling_factor: latents are "
           "((mean + std * eps) - channel_mean) / channel_std, one value per latent channel (iMF, "
           "Lyy-iiis/imeanflow utils/vae_util.py: 0.86488, -0.27787343, 0.21616915, 0.3738409); [] = off",
           is_list=True),
    Option("channel_std", float, [], "per-channel std of that standardisation (iMF: 4.85503674, 5.31922414, "
           "3.93725398, 3.9870003); set with channel_mean", is_list=True, gt=0),
    Option("conditional", bool, True, "feed the class-folder labels (False: unconditional)"),
    Option("vae_dtype", str, "fp32", "precision of the decoder", choices=("fp32", "bf16", "fp16")),
    Option("decode_batch", int, 32, "latents decoded per VAE call", ge=1),
    Option("workers", int, 8, "DataLoader workers that decode the source images for reference statistics", ge=0),
]


@hookimpl
def register_datasets(register):
    register("latents", "fewstep_plugins.latents.data:Latents", options=LATENTS_OPTIONS,
             description="cached VAE posteriors (fewstep cache-latents): a fresh latent every step, decoded by the VAE")


@hookimpl
def register_commands(app):
    import typer

    @app.command("cache-latents")
    def cache_latents_cmd(
        data: Annotated[str, typer.Option(metavar="imagefolder:DIR", help="class-per-folder image tree to encode "
                                          "(DIR/<class>/<image>)")],
        out: Annotated[Path, typer.Option(metavar="DIR", help="cache folder (created; a folder of an interrupted run "
                                          "with the same arguments is continued)")],
        resolution: Annotated[int, typer.Option(metavar="PX", min=8, help="side of the ADM centre crop")] = 256,
        vae: Annotated[str, typer.Option(metavar="NAME_OR_DIR", help="AutoencoderKL: hub name or local folder "
                                         "(config.json + diffusion_pytorch_model.safetensors)")] = DEFAULT_VAE,
        batch: Annotated[int, typer.Option(min=1, metavar="N", help="images per VAE call, per process")] = 64,
        workers: Annotated[int, typer.Option(min=0, metavar="N", help="DataLoader workers decoding and cropping, per process")] = 8,
        shard_size: Annotated[int, typer.Option(min=1, metavar="N", help="images per shard file (the unit of resuming)")] = 4096,
        small_images: Annotated[str, typer.Option(metavar="error|upscale|skip", help="images with a short side below "
                                                  "the resolution")] = "error",
        bad_images: Annotated[str, typer.Option(metavar="error|skip", help="unreadable images")] = "error",
        check: Annotated[str, typer.Option(metavar="header|decode", help="what the scan reads of every file first")] = "header",
        dtype: Annotated[str, typer.Option(metavar="fp32|bf16|fp16", help="encoder precision (stored: fp16)")] = "fp32",
        device: Annotated[str, typer.Option(metavar="auto|cuda|cpu", help="where the encoder runs")] = "auto",
        cache_dir: Annotated[str, typer.Option(metavar="DIR", help="where the folder scan is cached (auto: "
                                               "$FEWSTEP_CACHE, else ~/.cache/fewstep; \"\": nowhere)")] = "auto",
        progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    ) -> None:
        """Encode every image of a folder once with the VAE: posterior mean and std (fp16) in resumable shards.

        Images are ADM centre-cropped and not flipped. Under torchrun each process encodes every world-th shard.
        Train on the result with the recipe table \\[data] name = "latents", root = "DIR".

        Examples:
          fewstep cache-latents --data imagefolder:/data/imagenet/train --out /data/in256-latents
          torchrun --nproc-per-node 8 -m fewstep cache-latents --data imagefolder:/data/imagenet/train --out /data/in256-latents
        """
        from rich.console import Console

        err = Console(stderr=True)
        choices = {"small_images": (small_images, ("error", "upscale", "skip")), "bad_images": (bad_images, ("error", "skip")),
                   "check": (check, ("header", "decode")), "dtype": (dtype, ("fp32", "bf16", "fp16")),
                   "device": (device, ("auto", "cuda", "cpu"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                err.print(f"[bold red]error:[/bold red] --{key.replace('_', '-')} must be one of {', '.join(allowed)}; "
                          f"got {value!r}", highlight=False)
                raise typer.Exit(2)
        kind, sep, folder = data.partition(":")
        if not sep:
            kind, folder = "imagefolder", data
        if kind != "imagefolder":
            err.print(f"[bold red]error:[/bold red] --data {data!r}: only imagefolder:DIR can be cached", highlight=False)
            raise typer.Exit(2)

        from fewstep.api import DataError

        from .cache import cache_latents

        try:
            res = cache_latents(source=folder, out=out, resolution=resolution, vae=vae, batch=batch, workers=workers,
                                shard_size=shard_size, small_images=small_images, bad_images=bad_images, check=check,
                                dtype=dtype, device=device, cache_dir=cache_dir, show_progress=progress)
        except DataError as exc:
            err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        import os

        if os.environ.get("RANK", "0") != "0":
            return
        from rich.table import Table

        t = Table(title=f"latent cache {res.out}", show_header=False)
        t.add_row("images", f"{res.num_images:,}")
        t.add_row("encoded by this process", f"{res.encoded_here:,} in {res.seconds:.1f} s "
                  f"({res.images_per_second:.1f} images/s)")
        t.add_row("on disk", f"{res.bytes_on_disk / 2**20:.1f} MiB ({res.bytes_on_disk / max(res.num_images, 1) / 1024:.2f} "
                  "KiB per image)")
        t.add_row("complete", "yes" if res.complete else "no: run the same command again")
        Console().print(t)
