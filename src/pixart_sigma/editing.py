"""Editing a picture: image-to-image, inpainting and outpainting, on the sampling loop's stages.

`prepare_edit` reads the picture and mask (bounded, validated, normalised to RGB) and lays out the
canvas: grown for outpainting, resized to cover and centre-cropped when a size is asked, cut to the
mask's box for `inpaint_area="masked"`. `EditRun` then gives the engine its stages:

- start: the canvas, brought to the sample size the way the decode is brought back (sizes.to_sample_size),
  encoded by the VAE (the latent mean: no noise drawn), noised to the first timestep that `strength`
  keeps with each image's own noise (sampling.noised_start);
- a step hook (inpainting): after each step, the known region is put back, noised to the next timestep
  with the same noise the start used (drawn again from each image's seed, so the images' generators
  draw exactly what they draw for text-to-image);
- after the finish: the result is pasted onto the picture through the blurred mask, so that pixels
  farther than `mask_blur` from the mask are the picture's, byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import SettingsError
from .sampling import LatentLayout, Scheduler, Start, image_noise, noised_start
from .settings import MAX_PIXELS_PER_CALL, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, EditSettings, shown
from .sizes import SizePlan, to_sample_size

PictureInput = Union[Image.Image, str, os.PathLike, bytes]
MAX_PICTURE_BYTES = 64 * 1024 * 1024  # a 16-megapixel PNG of noise is about 48 MB
MAX_PICTURE_PIXELS = MAX_PIXELS_PER_CALL  # read before decoding: a decompression bomb is refused unread
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Several frames, one picture: a camera's MPO JPEG carries a preview, a PSD its layers (Pillow opens the composite).
ONE_PICTURE_FORMATS = ("MPO", "PSD")
PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}


# -- reading pictures -------------------------------------------------------------------------------
def _picture_bytes(value: Union[str, os.PathLike, bytes], field: str) -> tuple[bytes, str]:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, name = bytes(value), f"{field} (bytes)"
    else:
        path = Path(os.fsdecode(value))
        name = f"{field}={str(path)!r}"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hang the call
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise SettingsError([f"{name} is not a regular file: give the path of an image file"])
                if info.st_size > MAX_PICTURE_BYTES:
                    raise SettingsError([f"{name} is {info.st_size:,} bytes: a picture may be at most "
                                         f"{MAX_PICTURE_BYTES:,} bytes"])
                with os.fdopen(os.dup(fd), "rb") as stream:
                    data = stream.read(MAX_PICTURE_BYTES + 1)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise SettingsError([f"{name} cannot be read: {getattr(exc, 'strerror', None) or exc}"]) from None
    if len(data) > MAX_PICTURE_BYTES:
        raise SettingsError([f"{name} is over {MAX_PICTURE_BYTES:,} bytes: a picture may be at most that"])
    if not data:
        raise SettingsError([f"{name} is empty (0 bytes): give a PNG, JPEG or WebP picture"])
    return data, name


def read_picture(value: PictureInput, field: str = "image") -> Image.Image:
    """A picture as RGB, or RGBA when it has transparency: EXIF orientation applied, any mode Pillow reads.

    `value`: a PIL image, a path, or the file's bytes. Refused, naming `field` (and the file): empty, not an
    image, truncated or damaged, animated, or over MAX_PICTURE_PIXELS (checked before the pixels are decoded).
    """
    if isinstance(value, Image.Image):
        image, name = value, field
    elif isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
        data, name = _picture_bytes(value, field)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # over twice Pillow's own limit, refused by Pillow from the header
            raise SettingsError([f"{name} has far more pixels than the {MAX_PICTURE_PIXELS:,} a picture may have at "
                                 "most"]) from None
        except UnidentifiedImageError:
            raise SettingsError([f"{name} is not an image Pillow can read: give a PNG, JPEG or WebP picture"]) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise SettingsError([f"{name} cannot be read as an image ({exc})"]) from None
    else:
        raise SettingsError([f"{field}={shown(value)} is not valid: give a PIL image, a file path or the file's bytes"])
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PICTURE_PIXELS:
        raise SettingsError([f"{name} is {width}x{height} = {width * height:,} pixels: a picture may have at most "
                             f"{MAX_PICTURE_PIXELS:,} pixels"])
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in ONE_PICTURE_FORMATS:
        raise SettingsError([f"{name} is animated ({frames} frames): give a still picture (save the frame you want)"])
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, a damaged chunk, a bad palette
        raise SettingsError([f"{name} is truncated or damaged ({exc}): it cannot be decoded"]) from None
    try:
        return _normalised(ImageOps.exif_transpose(image))
    except (OSError, ValueError) as exc:  # a mode Pillow cannot convert (La, ...), a bad EXIF block
        raise SettingsError([f"{name} has a colour mode that cannot be read as RGB ({image.mode}: {exc})"]) from None


def _normalised(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit grey: Pillow's convert would clip it, not scale it
        return Image.fromarray((np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # floats: 0..1 when nothing is above 1, else 0..255
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray((values * scale).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if image.mode in PREMULTIPLIED:  # Pillow converts premultiplied alpha only to its plain twin
        image = image.convert(PREMULTIPLIED[image.mode])
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    return image.convert("RGBA" if transparent else "RGB")


def picture_sha256(image: Image.Image) -> str:
    """The SHA-256 of a picture's pixels as the edit uses them (mode, size, bytes): a re-saved copy matches."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def read_mask(value: PictureInput, size: tuple[int, int], invert: bool = False) -> Image.Image:
    """The mask as "L", 255 where to repaint: white (grey 128 and up), or for a mask with some transparency, the
    fully transparent pixels (OpenAI's convention). It must have the picture's size (it is never stretched)."""
    image = read_picture(value, "mask")
    if image.size != size:
        raise SettingsError([f"mask is {image.width}x{image.height} but the image is {size[0]}x{size[1]}: a mask must "
                             "have the picture's size"])
    if image.mode == "RGBA" and image.getextrema()[3][0] < 255:  # some transparency: OpenAI's rule
        repaint = np.asarray(image)[:, :, 3] == 0
    else:  # opaque (a canvas export is RGBA with alpha 255 everywhere): white marks
        repaint = np.asarray(image.convert("L")) >= 128
    if invert:
        repaint = ~repaint
    return Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), "L")


# -- laying out the canvas ----------------------------------------------------------------------------
def _cover(image: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    """Resize to cover width x height and centre-crop (A1111's "crop and resize")."""
    return ImageOps.fit(image, (width, height), method=resample, centering=(0.5, 0.5))


def _edge_fill(picture: np.ndarray, expand: list[int]) -> np.ndarray:
    left, top, right, bottom = expand
    return np.pad(picture, ((top, bottom), (left, right), (0, 0)), mode="edge")


def soften(mask: Image.Image, blur: int) -> Image.Image:
    """The mask's edge softened outward by `blur` pixels: 255 on the mask, fading to zero `blur` pixels from it."""
    if blur == 0:
        return mask
    blurred = torch.from_numpy(np.array(mask.filter(ImageFilter.GaussianBlur(blur / 2)))).float()
    hard = torch.from_numpy(np.array(mask)).float()[None, None]
    near = F.max_pool2d(hard, kernel_size=2 * blur + 1, stride=1, padding=blur)[0, 0] > 0
    # Marked pixels stay fully repainted; the blur fades outward, and beyond `blur` pixels nothing of it shows.
    softened = torch.maximum(torch.where(near, blurred, 0), hard[0, 0])
    return Image.fromarray(softened.round().to(torch.uint8).numpy(), "L")


@dataclass
class Edit:
    """A prepared edit: the canvas the model works on and how its result goes back into the picture."""

    settings: EditSettings
    picture: Image.Image  # RGB at the output size: the source, grown and fitted
    mask: Optional[Image.Image]  # "L" at the output size, 255 = repaint; None: image-to-image
    new_area: Optional[Image.Image]  # "L", 255 where outpainting added the canvas (for fill="noise")
    source_sha256: str
    mask_sha256: Optional[str]
    box: Optional[tuple[int, int, int, int]] = None  # inpaint_area="masked": the part of the canvas worked on
    work_size: Optional[tuple[int, int]] = None  # ... and the size it is worked at

    @property
    def size(self) -> tuple[int, int]:
        return self.picture.size

    @property
    def sample_size(self) -> tuple[int, int]:
        """The width and height the engine is asked for."""
        return self.work_size or self.size

    def record(self) -> dict:
        """What goes into each image's record besides the settings."""
        return {**self.settings.model_dump(), "source_sha256": self.source_sha256, "mask_sha256": self.mask_sha256}


def _side_problem(field: str, value: int, what: str) -> Optional[str]:
    if MIN_SIDE <= value <= MAX_SIDE and value % SIDE_MULTIPLE == 0:
        return None
    return (f"{field}={value} ({what}) is not valid: an edit's size must be a multiple of {SIDE_MULTIPLE} from "
            f"{MIN_SIDE} to {MAX_SIDE}; give width and height (the picture is resized to cover them and centre-cropped)")


def prepare_edit(image: PictureInput, mask: Optional[PictureInput], settings: EditSettings, width: Optional[int],
                 height: Optional[int], native_size: int) -> Edit:
    """Read and lay out an edit; SettingsError names what is wrong before anything reaches the model."""
    source = read_picture(image, "image")
    rgb = source.convert("RGB")
    source_hash = picture_sha256(rgb)
    hard = read_mask(mask, source.size, settings.invert_mask) if mask is not None else None
    mask_hash = picture_sha256(hard) if hard is not None else None
    if hard is None and (settings.inpaint_area != "whole" or settings.invert_mask):
        raise SettingsError(["inpaint_area and invert_mask apply to inpainting: give a mask too"])

    new_area = None
    if any(settings.expand):
        left, top, right, bottom = settings.expand
        grown = (rgb.width + left + right, rgb.height + top + bottom)
        if max(grown) > MAX_SIDE:
            raise SettingsError([f"expand={settings.expand} grows the {rgb.width}x{rgb.height} picture to "
                                 f"{grown[0]}x{grown[1]}: each side may be at most {MAX_SIDE}"])
        rgb = Image.fromarray(_edge_fill(np.asarray(rgb), settings.expand))
        new_area = Image.new("L", grown, 255)
        new_area.paste(0, (left, top, left + source.width, top + source.height))
        old = hard if hard is not None else Image.new("L", source.size, 0)
        hard = new_area.copy()
        hard.paste(old, (left, top))

    if width is not None or height is not None:
        width, height = width or rgb.width, height or rgb.height
        if (width, height) != rgb.size:
            rgb = _cover(rgb, width, height, Image.LANCZOS)
            hard = _cover(hard, width, height, Image.NEAREST) if hard is not None else None
            new_area = _cover(new_area, width, height, Image.NEAREST) if new_area is not None else None
    problems = [problem for problem in (_side_problem("width", rgb.width, f"the {rgb.width}x{rgb.height} canvas"),
                                        _side_problem("height", rgb.height, f"the {rgb.width}x{rgb.height} canvas"))
                if problem]
    if problems:
        raise SettingsError(problems)
    if hard is not None and not np.asarray(hard).any():
        raise SettingsError(["mask marks nothing to repaint (no white pixel, or in a mask with transparency no fully "
                             "transparent one): mark the part to repaint, or drop the mask for image-to-image"])
    edit = Edit(settings, rgb, hard, new_area, source_hash, mask_hash)
    if hard is not None and settings.inpaint_area == "masked":
        edit.box, edit.work_size = _masked_box(hard, settings.inpaint_padding + settings.mask_blur, native_size)
    return edit


def _masked_box(mask: Image.Image, padding: int, native_size: int) -> tuple[tuple[int, int, int, int],
                                                                            tuple[int, int]]:
    """The mask's bounding box plus padding, grown to the aspect ratio it is worked at (inside the canvas where it
    fits), and that size: the checkpoint's native area at the box's ratio, sides multiples of 8 from 64 to 2048."""
    left, top, right, bottom = mask.getbbox()
    box = (max(0, left - padding), max(0, top - padding), min(mask.width, right + padding),
           min(mask.height, bottom + padding))
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    scale = native_size / math.sqrt(box_width * box_height)

    def side(length: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(length / SIDE_MULTIPLE) * SIDE_MULTIPLE))

    work = (side(box_width * scale), side(box_height * scale))
    # A side held at a bound bends the ratio: grow the box's other side to match (A1111's expand_crop_region).
    wanted_width = round(box_height * work[0] / work[1])
    if wanted_width > box_width:
        box = _grown(box, 0, wanted_width, mask.width)
    else:
        box = _grown(box, 1, round(box_width * work[1] / work[0]), mask.height)
    return box, work


def _grown(box: tuple[int, int, int, int], axis: int, length: int, limit: int) -> tuple[int, int, int, int]:
    """`box` grown along `axis` (0: x, 1: y) to `length`, evenly both ways, shifted to stay in 0..limit."""
    low, high = box[axis], box[axis + 2]
    length = min(max(length, high - low), limit)
    low = min(max(0, low - (length - (high - low)) // 2), limit - length)
    grown = list(box)
    grown[axis], grown[axis + 2] = low, low + length
    return tuple(grown)


# -- running it -------------------------------------------------------------------------------------
def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures -> (N, 3, H, W) floats in [-1, 1], as the VAE takes them."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def _weights(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]


def steps_to_skip(strength: float, steps: int) -> int:
    """The first steps an edit skips: it runs round(strength x steps), at least one."""
    return steps - max(1, min(steps, round(strength * steps)))


class EditRun:
    """One edit call's start stage, step hook and paste-back, for a batch of images (one seed each)."""

    def __init__(self, edit: Edit, engine, plan: SizePlan, seeds: list[int], steps: int, tiled: bool = False):
        self.edit, self.engine, self.plan, self.seeds, self.tiled = edit, engine, plan, seeds, tiled
        self.skip = steps_to_skip(edit.settings.strength, steps)
        noise_filled = edit.new_area is not None and edit.settings.fill == "noise"
        # Each image's whole canvas: the picture, with its new area filled from that image's seed when asked.
        self.filled = [self._noise_filled(seed) for seed in seeds] if noise_filled else [edit.picture] * len(seeds)
        self.scheduler: Optional[Scheduler] = None

    def _noise_filled(self, seed: int) -> Image.Image:
        picture = self.edit.picture
        colours = np.random.default_rng(seed).integers(0, 256, (picture.height, picture.width, 3), dtype=np.uint8)
        return Image.composite(Image.fromarray(colours), picture, self.edit.new_area)

    def _work(self, image: Image.Image, resample: int) -> Image.Image:
        """The part of the canvas the model works on, at the size it works at."""
        edit = self.edit
        return image if edit.box is None else image.crop(edit.box).resize(edit.work_size, resample)

    @functools.cached_property
    def paste_mask(self) -> Image.Image:
        """Where the result shows: the softened mask, and all of outpainting's new area (the picture stays exact)."""
        edit = self.edit
        if edit.new_area is None:
            return soften(edit.mask, edit.settings.mask_blur)
        marked = Image.composite(Image.new("L", edit.size, 0), edit.mask, edit.new_area)  # the mask given with it
        return ImageChops.lighter(soften(marked, edit.settings.mask_blur), edit.new_area)

    def start(self, scheduler: Scheduler, layout: LatentLayout, generators: list[torch.Generator]) -> Start:
        """Encode the canvases and noise them to the first step kept (each image with its own noise)."""
        unique = {id(canvas): self._work(canvas, Image.LANCZOS) for canvas in self.filled}
        pixels = to_sample_size(_pixels(list(unique.values())), self.plan)
        encoded = dict(zip(unique, self.engine.encode_pixels(pixels, tiled=self.tiled)))
        self.clean = torch.stack([encoded[id(canvas)] for canvas in self.filled])
        start = noised_start(self.clean, self.skip)(scheduler, layout, generators)
        if self.edit.mask is not None:
            self.scheduler, self.timesteps = scheduler, start.timesteps
            # The start's own noise, drawn again from fresh generators: the images' generators are left alone.
            self.noise = image_noise(layout, [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds])
            weights = to_sample_size(_weights(self._work(self.paste_mask, Image.BILINEAR)), self.plan)
            # A latent pixel any marked pixel touches is repainted whole: a thin mask still gets room to change.
            self.repaint = F.adaptive_max_pool2d(weights, layout.shape[2:]).to(layout.device, layout.dtype)
        return start

    @property
    def hooks(self) -> list:
        return [self.keep_known] if self.edit.mask is not None else []

    def keep_known(self, index: int, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """After step `index`: the known region as the picture noised to the next timestep (clean after the last)."""
        following = self.timesteps[index + 1:index + 2]
        clean = self.clean.to(latents.device, latents.dtype)
        known = clean if len(following) == 0 else self.scheduler.add_noise(clean, self.noise, following)
        return self.repaint * latents + (1 - self.repaint) * known

    def paste(self, images: list[Image.Image]) -> list[Image.Image]:
        """Each result put back into its canvas through the paste mask (inpainting, outpainting); the rest exact."""
        edit = self.edit
        if edit.mask is None:
            return images
        mask, pasted = self.paste_mask, []
        for image, canvas in zip(images, self.filled):
            if edit.box is not None:
                whole = canvas.copy()
                whole.paste(image.resize((edit.box[2] - edit.box[0], edit.box[3] - edit.box[1]), Image.LANCZOS),
                            edit.box[:2])
                image = whole
            pasted.append(Image.composite(image, canvas, mask))
        return pasted
