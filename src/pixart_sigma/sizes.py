"""From the size a user asks for to the size the model samples at, and back, in exact integers.

diffusers' `resize_and_crop_tensor` sizes its resize as `int(side * float_ratio)`, which can truncate
1279.999 to 1279, one pixel short of the request; its centre crop then starts at -1 and returns a
1-pixel side (1280x960 on the 1024 table comes back 1280x1; upstream diffusers#8911). Here the
covering size is computed with integer arithmetic, so no side is ever smaller than asked, and sizes
that need no resize (no binning: only rounded up to the patch grid) are cropped, never resampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SizePlan:
    width: int  # what the user asked for
    height: int
    sample_width: int  # what the model samples at (pixels)
    sample_height: int
    resize_width: int  # size after resizing the decoded image (== sample size when no resize)
    resize_height: int
    crop_left: int  # centre-crop offsets into the resized image
    crop_top: int

    @property
    def resizes(self) -> bool:
        return (self.resize_width, self.resize_height) != (self.sample_width, self.sample_height)


def aspect_ratio_bins(native_size: Optional[int]) -> Optional[dict]:
    """PixArt's trained aspect-ratio table for a checkpoint's native pixel size (256, 512, 1024, 2048); None otherwise."""
    # Imported here: these modules pull in much of diffusers, and the tables are only needed when binning.
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    return {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
            2048: ASPECT_RATIO_2048_BIN}.get(native_size)


@lru_cache(maxsize=None)
def _parsed_bins(native_size: int) -> Optional[tuple[tuple[float, int, int], ...]]:
    # (ratio, height, width) in the table's order, parsed once: plan_size runs per request and tests run it 300k times.
    bins = aspect_ratio_bins(native_size)
    if bins is None:
        return None
    return tuple((float(ratio), int(hw[0]), int(hw[1])) for ratio, hw in bins.items())


def _nearest_bin(width: int, height: int, bins: tuple[tuple[float, int, int], ...]) -> tuple[int, int]:
    # diffusers' classify_height_width_bin: same float comparison, first of equals wins (min keeps the first).
    ar = float(height / width)
    _, bin_height, bin_width = min(bins, key=lambda entry: abs(entry[0] - ar))
    return bin_width, bin_height


def plan_size(width: int, height: int, *, native_size: Optional[int], multiple: int, binning: bool) -> SizePlan:
    """multiple = vae_scale_factor * patch_size (16 for PixArt). With binning and a table: sample at the nearest
    aspect-ratio bin (the same choice as diffusers' classify_height_width_bin), resize to cover the request with
    exact integer arithmetic, centre-crop. Without binning (or no table): sample at width/height rounded up to
    `multiple`, no resize, centre-crop."""
    if width < 1 or height < 1 or multiple < 1:
        raise ValueError(f"sizes must be positive: width={width}, height={height}, multiple={multiple}")
    bins = _parsed_bins(native_size) if binning and native_size is not None else None
    if bins is None:
        # The transformer cuts the latent into patches, so sides round up to the patch grid; the extra
        # (8 pixels for a side that is a multiple of 8 but not 16) is cropped away, not resampled.
        sample_w, sample_h = -(-width // multiple) * multiple, -(-height // multiple) * multiple
        resize_w, resize_h = sample_w, sample_h
    else:
        sample_w, sample_h = _nearest_bin(width, height, bins)
        if width * sample_h >= height * sample_w:
            # Width is the tighter side: scale so it fits exactly; floor keeps height >= asked by the inequality.
            resize_w, resize_h = width, sample_h * width // sample_w
        else:
            resize_w, resize_h = sample_w * height // sample_h, height
    return SizePlan(width=width, height=height, sample_width=sample_w, sample_height=sample_h,
                    resize_width=resize_w, resize_height=resize_h,
                    crop_left=(resize_w - width) // 2, crop_top=(resize_h - height) // 2)


def fit_to_size(pixels: "torch.Tensor", plan: SizePlan) -> "torch.Tensor":
    """Decoded images (N, C, sample_height, sample_width) -> (N, C, height, width): bilinear resize (align_corners=False,
    as diffusers, only when the plan resizes) then centre crop."""
    import torch.nn.functional as F

    if tuple(pixels.shape[-2:]) != (plan.sample_height, plan.sample_width):
        raise ValueError(f"expected images of {plan.sample_width}x{plan.sample_height}, "
                         f"got {pixels.shape[-1]}x{pixels.shape[-2]}")
    if plan.resizes:
        pixels = F.interpolate(pixels, size=(plan.resize_height, plan.resize_width), mode="bilinear",
                               align_corners=False)
    return pixels[:, :, plan.crop_top:plan.crop_top + plan.height, plan.crop_left:plan.crop_left + plan.width]


def to_sample_size(pixels: "torch.Tensor", plan: SizePlan) -> "torch.Tensor":
    """`fit_to_size` undone for a picture an edit starts from: (N, C, height, width) -> (N, C, sample_height,
    sample_width). The picture is put where the crop took the output from, the cropped-away margins repeat its
    edges, and the whole is resized (antialiased) to the sample size."""
    import torch.nn.functional as F

    if tuple(pixels.shape[-2:]) != (plan.height, plan.width):
        raise ValueError(f"expected pictures of {plan.width}x{plan.height}, got {pixels.shape[-1]}x{pixels.shape[-2]}")
    right = plan.resize_width - plan.width - plan.crop_left
    bottom = plan.resize_height - plan.height - plan.crop_top
    if plan.crop_left or plan.crop_top or right or bottom:
        pixels = F.pad(pixels, (plan.crop_left, right, plan.crop_top, bottom), mode="replicate")
    if plan.resizes:
        pixels = F.interpolate(pixels, size=(plan.sample_height, plan.sample_width), mode="bilinear",
                               align_corners=False, antialias=True)
    return pixels
