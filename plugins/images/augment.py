"""EDM's non-leaking augmentation: random geometric transforms plus a label vector saying which were applied.

Karras et al. 2022 (EDM), App. F.2, after Karras et al. 2020 (ADA): each transform is applied to an
image with probability ``multiplier * p``; the network is conditioned on the label vector, so it
learns the augmented distributions as separate conditions and is sampled with zero labels (no
augmentation), which keeps the augmentations from leaking into the samples.

Written for fewstep from the description of the official pipeline (NVlabs/edm
``training/augment.py``; zlab-princeton/SoFlow and Gsunshine/py-meanflow use the same file). Kept
from it, for parity:

* the transforms the official CIFAR-10 configs enable and their distributions: x-flip, y-flip,
  isotropic scale ``2 ** (0.2 w)``, rotation ``w ~ U(-pi, pi)``, anisotropic scale ``2 ** (0.2 w)``
  along an axis at angle ``r`` (``r ~ U(-pi, pi)`` with probability 1/2, else 0) and fractional
  translation ``w * 0.125 * size`` (``w ~ N(0, 1)`` per axis);
* the label layout: one slot per enabled transform, in the order
  ``xflip, yflip, scale, rotate (cos w - 1, sin w), aniso (w cos r, w sin r), translate (wx, wy)``;
  an enabled transform that was not applied to an image writes zeros;
* the resampling: reflect padding, 2x upsampling with the Symlet-6 low-pass filter, bilinear
  sampling, 2x downsampling with the same filter (alias-free up to the filter).

The integer-pixel blits (``rotate_int``, ``translate_int``) and the colour transforms are not
implemented: no official CIFAR-10 config of SoFlow, MeanFlow, EDM or ECT uses them.

Randomness comes from an explicit generator (see :func:`AugmentPipe.draw`), so a data source can
make the augmentation of step k a function of (seed, k) alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The draws (CPU) to the images' device without the host waiting: pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

SCALE_STD = 0.2  # log2 std of the isotropic scale
ANISO_STD = 0.2  # log2 std of the anisotropic scale
ANISO_ROTATE_PROB = 0.5  # chance that the anisotropic axis is rotated by r ~ U(-pi, pi) (else r = 0)
TRANSLATE_STD = 0.125  # std of the fractional translation, relative to the image size
ROTATE_MAX = 1.0  # rotation range, 1 = the full circle

# Symlet-6 scaling (low-pass) filter, as tabulated by PyWavelets; orthonormal: sum h = sqrt 2, sum h^2 = 1
# and sum_k h[k] h[k + 2j] = 0 for j != 0, so upsampling and then downsampling with it is the identity.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
_FILTER_PAD = 3  # output pixels lost to the filters at each border (len(SYM6) // 4)

LABEL_SLOTS = (("xflip", 1), ("yflip", 1), ("scale", 1), ("rotate", 2), ("aniso", 2), ("translate", 2))


@dataclass
class AugmentDraw:
    """The random choices for n images; a transform that is off or not applied has its neutral value."""

    xflip: torch.Tensor  # (n,) 0/1
    yflip: torch.Tensor  # (n,) 0/1
    scale: torch.Tensor  # (n,) w: isotropic factor 2 ** (SCALE_STD w)
    rotate: torch.Tensor  # (n,) angle w in radians
    aniso: torch.Tensor  # (n,) w: factor 2 ** (ANISO_STD w) along the axis at angle r
    aniso_angle: torch.Tensor  # (n,) r
    tx: torch.Tensor  # (n,) translation in units of TRANSLATE_STD * width
    ty: torch.Tensor  # (n,) translation in units of TRANSLATE_STD * height

    def __getitem__(self, rows) -> "AugmentDraw":
        return AugmentDraw(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


class AugmentPipe:
    """Geometric augmentation with labels. `p` is the overall probability; each multiplier scales it per
    transform (a transform with multiplier 0 is off and has no label slot)."""

    def __init__(self, *, p: float, xflip: float, yflip: float, scale: float, rotate: float, aniso: float,
                 translate: float):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p = {p} must be in [0, 1]")
        self.p = p
        self.multipliers = {"xflip": xflip, "yflip": yflip, "scale": scale, "rotate": rotate, "aniso": aniso,
                            "translate": translate}
        for k, v in self.multipliers.items():
            if v < 0:
                raise ValueError(f"augmentation multiplier {k} = {v} must be >= 0")
        self.enabled = {k: v > 0 for k, v in self.multipliers.items()}

    @property
    def dim(self) -> int:
        """Length of the label vector (the backbone's `augment_dim`): 6 for SoFlow's / py-meanflow's CIFAR-10
        pipeline (xflip, scale, aniso, translate), 9 for EDM's (all six transforms)."""
        return sum(width for name, width in LABEL_SLOTS if self.enabled[name])

    def label_names(self) -> list[str]:
        names = {"rotate": ["rotate_cos_minus_1", "rotate_sin"], "aniso": ["aniso_w_cos_r", "aniso_w_sin_r"],
                 "translate": ["translate_x", "translate_y"]}
        return [n for name, _ in LABEL_SLOTS if self.enabled[name] for n in names.get(name, [name])]

    # -- random choices ---------------------------------------------------------------------------
    def draw(self, n: int, generator: torch.Generator) -> AugmentDraw:
        """Draw the choices for n images from `generator` (CPU). The same generator state gives the same
        draws whatever device the images live on."""
        g = generator

        def applied(name: str) -> torch.Tensor:  # (n,) bool: the transform happens to this image
            chance = min(1.0, self.multipliers[name] * self.p)  # the official xflip = 1e8 makes this 1
            return torch.rand(n, generator=g) < chance

        zeros = torch.zeros(n)
        out = {}
        for name in ("xflip", "yflip"):
            if self.enabled[name]:  # a coin flip, when the transform is applied at all
                out[name] = torch.where(applied(name), torch.randint(0, 2, (n,), generator=g).float(), zeros)
            else:
                out[name] = zeros
        if self.enabled["scale"]:
            out["scale"] = torch.where(applied("scale"), torch.randn(n, generator=g), zeros)
        else:
            out["scale"] = zeros
        if self.enabled["rotate"]:
            w = (torch.rand(n, generator=g) * 2 - 1) * (math.pi * ROTATE_MAX)
            out["rotate"] = torch.where(applied("rotate"), w, zeros)
        else:
            out["rotate"] = zeros
        if self.enabled["aniso"]:
            w = torch.randn(n, generator=g)
            r = (torch.rand(n, generator=g) * 2 - 1) * math.pi
            out["aniso"] = torch.where(applied("aniso"), w, zeros)
            out["aniso_angle"] = torch.where(torch.rand(n, generator=g) < ANISO_ROTATE_PROB, r, zeros)
        else:
            out["aniso"] = out["aniso_angle"] = zeros
        if self.enabled["translate"]:
            w = torch.randn(2, n, generator=g)
            hit = applied("translate")  # one decision for both axes
            out["tx"], out["ty"] = torch.where(hit, w[0], zeros), torch.where(hit, w[1], zeros)
        else:
            out["tx"] = out["ty"] = zeros
        return AugmentDraw(**out)

    def labels(self, d: AugmentDraw) -> torch.Tensor:
        """(n, dim) float32 labels in the official layout; all zeros means "not augmented"."""
        cols = []
        if self.enabled["xflip"]:
            cols.append(d.xflip)
        if self.enabled["yflip"]:
            cols.append(d.yflip)
        if self.enabled["scale"]:
            cols.append(d.scale)
        if self.enabled["rotate"]:
            cols += [d.rotate.cos() - 1, d.rotate.sin()]
        if self.enabled["aniso"]:
            cols += [d.aniso * d.aniso_angle.cos(), d.aniso * d.aniso_angle.sin()]
        if self.enabled["translate"]:
            cols += [d.tx, d.ty]
        n = len(d.xflip)
        return torch.stack(cols, 1).float() if cols else torch.zeros(n, 0)

    # -- applying them ----------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
        """Augment (N, C, H, W) float images with the choices `d` (rows of `d` match rows of `images`)."""
        dev = images.device
        x = images
        fx = _to(d.xflip, dev).bool()[:, None, None, None]
        fy = _to(d.yflip, dev).bool()[:, None, None, None]
        x = torch.where(fx, x.flip(3), x)
        x = torch.where(fy, x.flip(2), x)
        A, t = inverse_affine(d, x.shape[-2], x.shape[-1])  # output pixel -> input pixel, per image
        moved = ~(torch.all(A == torch.eye(2), dim=(1, 2)) & torch.all(t == 0, dim=1))
        if moved.any():  # only the images that a geometric transform touches are resampled
            rows = _to(moved.nonzero().squeeze(1), dev)
            warped = warp(x.index_select(0, rows), _to(A[moved], dev), _to(t[moved], dev))
            x = x.index_copy(0, rows, warped.to(x.dtype))
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.draw(len(images), generator)
        return self.apply(images, d), _to(self.labels(d), images.device)


def _rot(a: torch.Tensor) -> torch.Tensor:
    """(n,) angles -> (n, 2, 2) rotations [[cos, -sin], [sin, cos]]."""
    c, s = a.cos(), a.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, z], -1), torch.stack([z, b], -1)], -2)


def inverse_affine(d: AugmentDraw, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixel p shows input point A (p - t) (pixel units, centred on the image, x right, y down). The
    forward transform scales, rotates, scales anisotropically, then translates by t; A is the inverse of its
    linear part, A = S(1/s) R(w) R(-r) diag(1/sa, sa) R(r) as in the official matrix chain. Returns A (n, 2, 2)
    and t (n, 2), float32 (built in float64)."""
    d64 = AugmentDraw(*(getattr(d, f).double() for f in d.__dataclass_fields__))
    s = torch.exp2(d64.scale * SCALE_STD)
    sa = torch.exp2(d64.aniso * ANISO_STD)
    r = d64.aniso_angle
    A = _diag(1 / s, 1 / s) @ _rot(d64.rotate) @ _rot(-r) @ _diag(1 / sa, sa) @ _rot(r)
    t = torch.stack([d64.tx * TRANSLATE_STD * width, d64.ty * TRANSLATE_STD * height], 1)
    return A.float(), t.float()


def _filter(channels: int, device, dtype) -> torch.Tensor:
    h = torch.tensor(SYM6, device=device, dtype=dtype)
    return h.view(1, 1, -1).repeat(channels, 1, 1)  # (C, 1, L) depthwise


def _up2(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling along both axes: zero insertion and the Symlet-6 filter (N, C, H, W) -> (N, C, 2H, 2W)."""
    n, c, h, w = x.shape
    k = _filter(c, x.device, x.dtype)
    p = (len(SYM6) - 2) // 2  # 5: output length exactly 2 * input length
    x = F.conv_transpose2d(x, k[:, :, None, :], stride=(1, 2), padding=(0, p), groups=c)
    return F.conv_transpose2d(x, k[:, :, :, None], stride=(2, 1), padding=(p, 0), groups=c)


def _down2(x: torch.Tensor) -> torch.Tensor:
    """2x downsampling with the same filter, the adjoint of `_up2` ((N, C, 2H, 2W) -> (N, C, H, W))."""
    c = x.shape[1]
    k = _filter(c, x.device, x.dtype)
    p = (len(SYM6) - 2) // 2
    x = F.conv2d(x, k[:, :, None, :], stride=(1, 2), padding=(0, p), groups=c)
    return F.conv2d(x, k[:, :, :, None], stride=(2, 1), padding=(p, 0), groups=c)


def warp(x: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Resample (N, C, H, W) images so that output pixel p shows input point A (p - t) (centred pixel units).

    Reflect-pad by what the transformed corners need, upsample 2x, sample bilinearly at the mapped points of a
    2x output grid that overhangs the image by the filter's reach, downsample 2x and crop the overhang."""
    n, c, H, W = x.shape
    dev = x.device
    cx, cy = (W - 1) / 2, (H - 1) / 2
    f = _FILTER_PAD
    # -- padding: the input extent the transformed output corners reach, plus the filters' reach (2f) --
    corners = torch.tensor([[-cx, -cy], [cx, -cy], [cx, cy], [-cx, cy]], device=dev)  # (4, 2)
    src = torch.einsum("nij,nkj->nki", A, corners[None] - t[:, None])  # (n, 4, 2)
    lo = (-src).amax(dim=(0, 1)) - torch.tensor([cx, cy], device=dev) + 2 * f  # left / top
    hi = src.amax(dim=(0, 1)) - torch.tensor([cx, cy], device=dev) + 2 * f  # right / bottom
    lim = torch.tensor([W - 1, H - 1], device=dev, dtype=lo.dtype)
    lo = torch.minimum(lo.clamp(min=0), lim).ceil().int().tolist()
    hi = torch.minimum(hi.clamp(min=0), lim).ceil().int().tolist()
    (px0, py0), (px1, py1) = lo, hi
    x = F.pad(x, [px0, px1, py0, py1], mode="reflect")
    up = _up2(x)  # (n, c, 2H', 2W'); up index u sits at padded input pixel u / 2 (the official phase)
    # -- the 2x output grid: index o sits at output pixel o / 2 - f --
    oy = torch.arange(2 * (H + 2 * f), device=dev, dtype=torch.float32) / 2 - f - cy
    ox = torch.arange(2 * (W + 2 * f), device=dev, dtype=torch.float32) / 2 - f - cx
    gy, gx = torch.meshgrid(oy, ox, indexing="ij")
    pts = torch.stack([gx, gy], -1).reshape(1, -1, 2) - t[:, None]  # (n, P, 2)
    sx, sy = torch.einsum("nij,npj->npi", A, pts).unbind(-1)  # input coordinates, centred
    ux = 2 * (sx + cx + px0)  # index into `up`
    uy = 2 * (sy + cy + py0)
    grid = torch.stack([2 * ux / (up.shape[-1] - 1) - 1, 2 * uy / (up.shape[-2] - 1) - 1], -1)
    grid = grid.view(n, len(oy), len(ox), 2).to(up.dtype)
    v = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return _down2(v)[:, :, f:f + H, f:f + W]
