"""Batched, seeded augmentation on float tensors: RandomResizedCrop, flip, roll and CutMix.

Every sample of a batch gets its own crop box and flip, drawn from an explicit
`torch.Generator`, so a run is reproducible and the exact parameters can be stored
and replayed. Crops are resampled with bilinear interpolation through
`torch.nn.functional.grid_sample`, which works on any device and needs no loop
over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CropParams:
    """Per-sample crop boxes and flips, all shape (B,).

    Boxes are in pixels of the source image: top-left corner (top, left), size (height, width).
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


def sample_crop_params(
    batch: int, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
    generator: torch.Generator | None = None, attempts: int = 10,
) -> CropParams:
    """Draw RandomResizedCrop boxes for a batch of square `size` x `size` images.

    Follows the sampling rule of torchvision's RandomResizedCrop: an area fraction uniform
    in `scale` and a log-uniform aspect ratio in `ratio`, retried up to `attempts` times;
    a sample whose attempts all fail gets the central crop clamped to `ratio`.
    """
    area = float(size * size)
    fractions = torch.empty(batch, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    widths = torch.round(torch.sqrt(area * fractions * aspect))
    heights = torch.round(torch.sqrt(area * fractions / aspect))
    valid = (widths > 0) & (heights > 0) & (widths <= size) & (heights <= size)
    # Index of the first valid attempt per sample, or -1 if none is valid.
    first = torch.where(valid.any(dim=1), valid.float().argmax(dim=1), torch.full((batch,), -1))
    rows = torch.arange(batch)
    pick = first.clamp(min=0)
    w = widths[rows, pick]
    h = heights[rows, pick]
    offsets = torch.rand(batch, 2, generator=generator)
    top = torch.floor(offsets[:, 0] * (size - h + 1))
    left = torch.floor(offsets[:, 1] * (size - w + 1))

    fallback = first < 0
    if fallback.any():
        # Central crop with the aspect ratio clamped to the allowed range (square images: full image).
        side = float(size)
        w[fallback] = side
        h[fallback] = side
        top[fallback] = 0.0
        left[fallback] = 0.0

    flips = torch.rand(batch, generator=generator) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    return CropParams(top=top, left=left, height=h, width=w, flip=flips)


def apply_crop(images: torch.Tensor, params: CropParams, out_size: int | None = None) -> torch.Tensor:
    """Crop each image to its box, resize to `out_size` and flip where requested.

    Args:
        images: (B, C, H, W) float tensor with H == W.
        params: boxes from :func:`sample_crop_params` for this batch.
        out_size: output side length; defaults to the input size.

    Returns:
        (B, C, out_size, out_size) tensor, differentiable with respect to `images`.
    """
    batch, _, size, _ = images.shape
    out = out_size or size
    device, dtype = images.device, images.dtype
    top, left = params.top.to(device, dtype), params.left.to(device, dtype)
    height, width = params.height.to(device, dtype), params.width.to(device, dtype)
    # Box centre and half-size in grid_sample's [-1, 1] coordinates (align_corners=False).
    center_x = (left + width / 2) / size * 2 - 1
    center_y = (top + height / 2) / size * 2 - 1
    scale_x = width / size
    scale_y = height / size
    sign = torch.where(params.flip.to(device), -1.0, 1.0).to(dtype)
    theta = torch.zeros(batch, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = scale_x * sign
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = scale_y
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [batch, images.shape[1], out, out], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(images, scale=(0.08, 1.0), flip=True, generator=None, out_size=None):
    """Apply a fresh RandomResizedCrop and flip to every image of a (B, C, H, W) batch."""
    params = sample_crop_params(images.shape[0], images.shape[-1], scale=scale, flip=flip, generator=generator)
    return apply_crop(images, params, out_size)


def random_roll(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Roll the whole batch by one random offset of up to `max_shift` pixels in each direction."""
    if max_shift <= 0:
        return images
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)
    return torch.roll(images, shifts=(int(shifts[0]), int(shifts[1])), dims=(2, 3))


@dataclass
class CutMixParams:
    """One CutMix draw for a batch: a partner permutation and a box pasted from the partners.

    `lam` is the fraction of each image that keeps its own pixels, after the box was
    clipped to the image.
    """

    permutation: torch.Tensor
    top: int
    left: int
    height: int
    width: int
    lam: float


def sample_cutmix(batch: int, size: int, alpha: float = 1.0, generator: torch.Generator | None = None) -> CutMixParams:
    """Draw a CutMix box whose area fraction follows Beta(alpha, alpha), and a partner order."""
    gamma_a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=generator) if generator is not None \
        else torch._standard_gamma(torch.full((2,), float(alpha)))
    mix = float(gamma_a[0] / (gamma_a[0] + gamma_a[1]))
    cut = math.sqrt(1.0 - mix)
    cut_h = int(size * cut)
    cut_w = int(size * cut)
    center = torch.randint(0, size, (2,), generator=generator)
    cy, cx = int(center[0]), int(center[1])
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, size)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, size)
    lam = 1.0 - (bottom - top) * (right - left) / float(size * size)
    permutation = torch.randperm(batch, generator=generator)
    return CutMixParams(permutation, top, left, bottom - top, right - left, lam)


def apply_cutmix(images: torch.Tensor, params: CutMixParams) -> torch.Tensor:
    """Paste each partner's box into the batch; returns a new tensor, shape kept."""
    mixed = images.clone()
    rows = slice(params.top, params.top + params.height)
    cols = slice(params.left, params.left + params.width)
    mixed[:, :, rows, cols] = images[params.permutation][:, :, rows, cols]
    return mixed
