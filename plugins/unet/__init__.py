"""The `unet` backbone plugin (registration only: importing this module does not import torch).

Defaults: ECT's DDPM++ CIFAR-10 network (locuslab/ect run_ecm.sh: --arch=ddpmpp --dropout=0.2
--augment=0.0). The values of the other official CIFAR-10 configs are in each option's help and in
docs/backbones.md: SoFlow (cifar.yaml / models.py) sets channel_mult_noise 2, dropout 0.3,
resample_filter [1, 3, 3, 1], augment_dim 6; py-meanflow (model_configs.py, cifar10_v1.sh) the same
with dropout 0.2; EDM's DDPM++ dropout 0.13 and augment_dim 9.
"""
from fewstep.api import Option, hookimpl

OPTIONS = [
    Option("model_channels", int, 128, "base width: channels = model_channels x channel_mult[level] (128 in every "
           "official CIFAR config)", ge=4),
    Option("channel_mult", int, [2, 2, 2], "width multiplier per resolution, one entry per level (each level halves "
           "the image): [2, 2, 2] for 32x32 in EDM, ECT, SoFlow, py-meanflow", is_list=True, ge=1),
    Option("channel_mult_emb", int, 4, "embedding width = model_channels x channel_mult_emb (4 everywhere)", ge=1),
    Option("channel_mult_noise", int, 1, "width of each time feature (of t and of t - s) = model_channels x this: "
           "1 (EDM/ECT DDPM++), 2 (SoFlow, py-meanflow)", ge=1),
    Option("num_blocks", int, 4, "residual blocks per resolution (4 everywhere)", ge=1),
    Option("attn_resolutions", int, [16], "resolutions with self-attention ([16] everywhere; the middle block "
           "always attends)", is_list=True, ge=1),
    Option("dropout", float, 0.2, "dropout before each block's second conv: 0.2 (ECT, py-meanflow), 0.3 (SoFlow), "
           "0.13 (EDM DDPM++)", ge=0, lt=1),
    Option("resample_filter", int, [1, 1], "FIR taps of the 2x up/downsampling: [1, 1] (EDM/ECT DDPM++), "
           "[1, 3, 3, 1] (SoFlow, py-meanflow, NCSN++)", is_list=True, ge=0),
    Option("embedding_type", str, "positional", "time features: 'positional' (DDPM++, every official CIFAR config "
           "here) or 'fourier' (NCSN++)", choices=("positional", "fourier")),
    Option("fourier_scale", float, 16.0, "std of the random Fourier frequencies (embedding_type = 'fourier' only; "
           "EDM NCSN++ 16)", gt=0),
    Option("encoder_type", str, "standard", "'standard' (DDPM++, every official CIFAR config here), 'residual' "
           "(NCSN++) or 'skip'", choices=("standard", "skip", "residual")),
    Option("decoder_type", str, "standard", "'standard' (DDPM++ and NCSN++) or 'skip' (image-space outputs of every "
           "level summed)", choices=("standard", "skip")),
    Option("augment_dim", int, 0, "width of the augmentation labels (Batch.cond['augment_labels']; 0: none): 0 "
           "(ECT), 6 (SoFlow, py-meanflow), 9 (EDM)", ge=0),
    Option("attention", str, "fused", "'fused' (torch SDPA kernels) or 'math' (explicit softmax)",
           choices=("fused", "math")),
    Option("channels_last", bool, False, "run the convolutions on channels-last activations (same numbers; "
           "often faster on GPUs, see benchmarks/unet_jvp.py)"),
]


@hookimpl
def register_backbones(register):
    register("unet", "fewstep_plugins.unet.build:build", options=OPTIONS,
             description="DDPM++ / NCSN++ SongUNet for small images (CIFAR-10 32x32), conditioned on t, the gap "
                         "t - s, an optional class label (null class) and optional augmentation labels")
