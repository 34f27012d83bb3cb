"""`PixArtSigmaModel`: the component, with the parameters, names and methods DashAI's seed defined."""

from __future__ import annotations

import secrets
from typing import Any, Optional

from PIL import Image

from . import __version__
from .checkpoints import CheckpointError, resolve_checkpoint
from .devices import dtype_name, resolve_device, resolve_dtype
from .engine import CancelFlag, ProgressCallback, Request, get_engine
from .images import attach
from .settings import MAX_SEED, Settings, SettingsError, check_pixel_budget, check_text, json_schema, parse_settings

FALLBACK_SIZE = 1024
RANDOM_SEED_RANGE = 2**32


def validate(raw_data: dict[str, Any]) -> dict[str, Any]:
    """Check user values and resolve what the model needs; raises SettingsError, never loads weights."""
    settings = parse_settings(raw_data)
    values = settings.model_dump()
    problems: list[str] = []
    checkpoint = None
    try:
        checkpoint = resolve_checkpoint(settings.model_name)
    except SettingsError as exc:
        problems += exc.problems
    except CheckpointError as exc:
        problems.append(f"model_name={settings.model_name!r}: {exc}")
    device = dtype = None
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    except SettingsError as exc:
        problems += exc.problems
    if problems:
        raise SettingsError(problems)
    native = checkpoint.native_size or FALLBACK_SIZE
    values["width"] = settings.width or native
    values["height"] = settings.height or native
    check_pixel_budget(values["width"], values["height"], settings.num_images_per_prompt)
    if settings.seed + settings.num_images_per_prompt - 1 > MAX_SEED:
        raise SettingsError([f"seed={settings.seed} is too large for {settings.num_images_per_prompt} images: "
                             f"image k uses seed + k, which must stay at most {MAX_SEED}"])
    values.update(checkpoint=checkpoint, torch_device=device, torch_dtype=dtype)
    return values


class PixArtSigmaModel:
    """PixArt-Sigma text-to-image generation, loaded once per (checkpoint, device, dtype) and kept warm.

    >>> model = PixArtSigmaModel(model_name="demo", seed=42)      # doctest: +SKIP
    >>> images = model.generate("a red circle on a blue background")  # doctest: +SKIP
    """

    SCHEMA = Settings

    def __init__(self, **kwargs: Any):
        self.settings = self.validate_and_transform(kwargs)
        self.engine = get_engine(self.settings["checkpoint"], self.settings["torch_device"],
                                 self.settings["torch_dtype"])

    @classmethod
    def get_schema(cls) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the parameters."""
        return json_schema()

    @classmethod
    def validate_and_transform(cls, raw_data: dict[str, Any]) -> dict[str, Any]:
        """The validated values plus `checkpoint`, `torch_device` and `torch_dtype`; SettingsError on bad input."""
        return validate(raw_data)

    def generate(self, input: str, *, on_progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelFlag] = None) -> list[Image.Image]:
        """One image per `num_images_per_prompt`, each carrying its settings in `image.info`.

        `on_progress(step, total)` is called after each denoising step; when `cancel.is_set()`
        turns true, generation stops before the next step and raises `Cancelled`.
        """
        if isinstance(input, bytes):
            try:
                input = input.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SettingsError([f"prompt is not valid UTF-8 (byte {exc.start}): send UTF-8 text"]) from None
        prompt = check_text("prompt", input, required=True)
        s = self.settings
        first_seed = s["seed"] if s["seed"] >= 0 else secrets.randbelow(RANDOM_SEED_RANGE)
        seeds = [first_seed + k for k in range(s["num_images_per_prompt"])]
        output = self.engine.generate(
            Request(prompt=prompt, negative_prompt=s["negative_prompt"], num_inference_steps=s["num_inference_steps"],
                    guidance_scale=s["guidance_scale"], width=s["width"], height=s["height"], seeds=seeds,
                    scheduler=s["scheduler"], use_resolution_binning=s["use_resolution_binning"],
                    max_sequence_length=s["max_sequence_length"]),
            on_progress=on_progress, cancel=cancel,
        )
        for index, (image, seed) in enumerate(zip(output.images, seeds)):
            attach(image, {
                "prompt": prompt, "negative_prompt": s["negative_prompt"],
                "num_inference_steps": s["num_inference_steps"], "guidance_scale": s["guidance_scale"],
                "seed": seed, "width": s["width"], "height": s["height"], "model_name": s["model_name"],
                "scheduler": s["scheduler"], "dtype": dtype_name(self.engine.dtype),
                "use_resolution_binning": s["use_resolution_binning"],
                "max_sequence_length": s["max_sequence_length"],
                "batch_index": index, "batch_seed": first_seed, "batch_size": len(seeds), "device": str(self.engine.device),
                "sampled_size": list(output.generated_size), "truncated_tokens": output.truncated_tokens,
                "version": __version__,
            })
        return output.images
