"""`PixArtSigmaModel`: the component, with the parameters, names and methods DashAI's seed defined."""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from . import __version__
from .checkpoints import Checkpoint, resolve_checkpoint
from .devices import dtype_name, held_dtype, resolve_device, resolve_dtype, text_encoder_dtype
from .calls import (call_settings, check_call, check_edit, check_prompt, check_text_encoder_memory, fill_size,
                    random_seed, split_edit_values)
from .editing import Edit, EditRun, PictureInput
from .engine import (CancelFlag, Engine, Output, ProgressCallback, check_callbacks, get_engine, is_warm,
                     memory_budget)
from .errors import CheckpointError, SettingsError
from .images import attach
from .loras import LoraUse, prepare_loras
from .settings import (LOAD_SETTINGS, MAX_SEED, PLACEMENT_SETTINGS, Settings, check_images_per_call,
                       check_pixel_budget, json_schema, parse_settings, shown)

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
    except CheckpointError as exc:  # most already name the field; each message names it once
        problems.append(str(exc) if str(exc).startswith("model_name=") else f"model_name={settings.model_name!r}: {exc}")
    device = dtype = text_dtype = None
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        text_dtype = text_encoder_dtype(settings.text_encoder_dtype, settings.dtype, device, dtype)
    except SettingsError as exc:
        problems += exc.problems
    try:
        check_text_encoder_memory(settings.text_encoder_dtype, settings.memory)
    except SettingsError as exc:
        problems += exc.problems
    if problems:
        raise SettingsError(problems)
    fill_size(values, checkpoint.native_size)
    values.update(checkpoint=checkpoint, torch_device=device, torch_dtype=dtype, torch_text_encoder_dtype=text_dtype)
    return values


class PixArtSigmaModel:
    """PixArt-Sigma text-to-image generation, loaded once per (checkpoint, device, dtype) and kept warm.

    >>> model = PixArtSigmaModel(model_name="demo", seed=42)      # doctest: +SKIP
    >>> images = model.generate("a red circle on a blue background")  # doctest: +SKIP
    """

    SCHEMA = Settings

    def __init__(self, *, lora_dir: Optional[Union[str, os.PathLike]] = None, lora_paths: bool = True, **kwargs: Any):
        """`kwargs`: the settings (Settings). `lora_dir`: the folder LoRA names are looked up in (default:
        $PIXART_SIGMA_HOME/loras); `lora_paths=False` accepts only names of that folder, never a path (a service)."""
        self.settings = self.validate_and_transform(kwargs)
        self._set_lora_source(lora_dir, lora_paths)
        self._pipeline_engine: Optional[Engine] = None
        # Load (or find warm) now, not at the first generate; calls are checked against the mode it resolved.
        self.memory_mode = self.engine.memory

    def _set_lora_source(self, lora_dir: Optional[Union[str, os.PathLike]], lora_paths: bool) -> None:
        if not isinstance(lora_paths, bool):
            raise SettingsError([f"lora_paths={shown(lora_paths)} is not valid: it must be true or false"])
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir is not None else None  # None: looked up at each use
        self.lora_paths = lora_paths

    def lora_uses(self, loras: Sequence[Any]) -> list[LoraUse]:
        """A call's checked `loras` setting resolved in this model's LoRA folder, hashed and read (cached): what is
        fused."""
        if not loras:
            return []
        return prepare_loras(loras, self.engine.pipeline.transformer.config, self.lora_dir, self.lora_paths)

    @classmethod
    def from_pipeline(cls, pipeline, memory: str = "resident", lora_dir: Optional[Union[str, os.PathLike]] = None,
                      lora_paths: bool = True, **kwargs: Any) -> "PixArtSigmaModel":
        """Wrap a diffusers `PixArtSigmaPipeline` you already have (your quantization, your compile, your device).

        The pipeline is used as it is: not cast, not cached, and not moved unless `memory` names an offload
        mode (then its parts wait on the CPU between uses; sequential-offload adds diffusers' offloading
        hooks to them). `kwargs` are the per-call settings (model_name, device and dtype come from the
        pipeline: the device is where its transformer is now).
        """
        mode = parse_settings({"memory": memory}).memory
        if mode == "auto":
            raise SettingsError(["memory='auto' is not valid with from_pipeline: name the mode (resident keeps the "
                                 "pipeline as it is)"])
        given = sorted(set(kwargs) & set(LOAD_SETTINGS))
        if given:
            raise SettingsError([f"{', '.join(given)} cannot be given with from_pipeline: they come from the pipeline"])
        missing = [part for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler", "image_processor")
                   if getattr(pipeline, part, None) is None]
        if missing:
            raise SettingsError([f"from_pipeline needs a diffusers PixArtSigmaPipeline; {type(pipeline).__name__} "
                                 f"has no {', '.join(missing)}"])
        settings = parse_settings(kwargs)
        values = settings.model_dump()
        transformer = pipeline.transformer
        for part in (pipeline.transformer, pipeline.text_encoder, pipeline.vae):
            part.eval()  # a module built in code starts in training mode: T5's dropout would make images random
        engine = Engine(pipeline, transformer.device, transformer.dtype, move=False, memory=mode)
        if mode != "resident":
            engine.placement.settle()
        name = str(getattr(pipeline, "name_or_path", "") or getattr(transformer.config, "_name_or_path", "")
                   or "from_pipeline")
        fill_size(values, engine.native_size)
        values.update(model_name=name, device=str(engine.device), dtype=dtype_name(engine.dtype), memory=mode,
                      checkpoint=Checkpoint(name, name, None, engine.native_size), torch_device=engine.device,
                      text_encoder_dtype=dtype_name(held_dtype(pipeline.text_encoder)), torch_dtype=engine.dtype,
                      torch_text_encoder_dtype=held_dtype(pipeline.text_encoder))
        model = cls.__new__(cls)
        model.settings = values
        model._set_lora_source(lora_dir, lora_paths)
        model._pipeline_engine = engine
        model.memory_mode = mode
        return model

    @property
    def engine(self) -> Engine:
        """The warm engine; looked up on each use, so `unload_all()` frees memory even while this object lives."""
        if self._pipeline_engine is not None:
            return self._pipeline_engine
        s = self.settings
        return get_engine(s["checkpoint"], s["torch_device"], s["torch_dtype"], s["torch_text_encoder_dtype"], s["memory"])

    @property
    def warm_budget_bytes(self) -> int:
        """Bytes of warm weights kept on this model's device before the least recently used models go
        (the variable MEMORY_BUDGET_ENV names, else 90% of a GPU or half the RAM)."""
        return memory_budget(self.settings["torch_device"])

    @property
    def is_warm(self) -> bool:
        """Whether this model's weights are loaded now; False once evicted past `warm_budget_bytes` or after
        `unload_all()`. Asking never loads them."""
        if self._pipeline_engine is not None:
            return True
        s = self.settings
        return is_warm(s["checkpoint"], s["torch_device"], s["torch_dtype"], s["torch_text_encoder_dtype"], s["memory"])

    @classmethod
    def get_schema(cls) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the parameters."""
        return json_schema()

    @classmethod
    def validate_and_transform(cls, raw_data: dict[str, Any]) -> dict[str, Any]:
        """The validated values plus `checkpoint`, `torch_device`, `torch_dtype` and `torch_text_encoder_dtype`;
        SettingsError on bad input."""
        return validate(raw_data)

    def call_settings(self, overrides: dict[str, Any]) -> Settings:
        """This model's settings with per-call overrides, checked by the rules of a call (calls.py)."""
        return call_settings(self.settings, overrides, native_size=self.settings["checkpoint"].native_size,
                             memory_mode=self.memory_mode)

    def validate_call(self, prompt: Any, /, *, image: Optional[PictureInput] = None,
                      mask: Optional[PictureInput] = None, **overrides: Any) -> tuple[str, dict[str, Any]]:
        """The checked prompt and per-call settings that `generate(prompt, image=, mask=, **overrides)` would use
        (an edit's settings included).

        Raises SettingsError exactly as `generate` would, without touching the model: a service checks
        a request with it before queueing the work, against the memory mode the weights were placed in.
        An edit's pictures are read and checked too.
        """
        checked, values = check_call(prompt, self.settings, overrides, native_size=self.settings["checkpoint"].native_size,
                                     memory_mode=self.memory_mode, image=image, mask=mask)
        self.lora_uses(values["loras"])  # found and read now (then cached), not at its turn
        return checked, values

    def generate(self, input: Optional[str] = None, *, prompt: Optional[str] = None,
                 image: Optional[PictureInput] = None, mask: Optional[PictureInput] = None,
                 on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                 **overrides: Any) -> list[Image.Image]:
        """One image per `num_images_per_prompt`, each carrying its settings in `image.info`.

        The prompt is the first argument, or `prompt=` (`input` is the name DashAI's contract uses).
        `image=` (a PIL image, a path or bytes) edits that picture instead of starting from noise:
        image-to-image by `strength`; with `mask=` (white, or fully transparent, marks what to repaint)
        inpainting; with `expand=[left, top, right, bottom]` outpainting (EditSettings has every edit
        setting). An edit keeps the picture's size unless the call gives width and height.

        Any setting but model_name, device and dtype can be given per call (`seed=7, width=512`), checked
        by the same rules. `loras=[{"name": "my-style", "scale": 0.8}]` applies LoRAs for this call: fused
        into the shared transformer for the call's turn and kept there until a call with another set (or
        none) puts the base weights back exactly. `on_progress(step, total)` is called after each denoising step; when
        `cancel.is_set()` turns true, generation stops before the next step (or while waiting for the
        device) and raises `Cancelled`.
        """
        if "seeds" in overrides:  # generate_many's argument, not a setting
            raise SettingsError([f"unknown setting 'seeds': valid names are {', '.join(Settings.field_names())} "
                                 "(one prompt takes seed=...)"])
        if (input is None) == (prompt is None):
            given = "both input= and prompt=" if prompt is not None else "no prompt"
            raise SettingsError([f"generate got {given}: pass the prompt once, as the first argument or prompt=..."])
        text = prompt if input is None else input
        return self.generate_many([text], image=image, mask=mask, on_progress=on_progress, cancel=cancel,
                                  **overrides)[0]

    def generate_many(self, prompts: Sequence[str], *, seeds: Optional[Sequence[int]] = None,
                      image: Optional[PictureInput] = None, mask: Optional[PictureInput] = None,
                      on_progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                      **overrides: Any) -> list[list[Image.Image]]:
        """Several prompts in one batch on the device: for each prompt, its `num_images_per_prompt` images.

        Each prompt's images are those `generate(prompt, seed=...)` makes (the same seeds, the same
        record); batching only fills the device better. `seeds`: one first seed per prompt, -1 drawing one
        (default: the `seed` setting for each prompt, -1 drawing one each). The settings apply to every prompt;
        all images of the call count against the per-call pixel budget.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise SettingsError([f"prompts={shown(prompts)} is not valid: pass a list of prompts"])
        check_images_per_call(len(prompts), 1)  # before reading a million prompts; with the images count below
        problems: list[str] = []
        checked = []
        for index, prompt in enumerate(prompts):
            try:
                checked.append(check_prompt(prompt))
            except SettingsError as exc:
                problems += [f"prompts[{index}]: {problem}" if len(prompts) > 1 else problem
                             for problem in exc.problems]
        if not prompts:
            problems.append("prompts is empty: pass at least one prompt")
        check_callbacks(on_progress, cancel)
        overrides, edit_values = split_edit_values(overrides)
        settings = self.call_settings(overrides)
        first_seeds = self._first_seeds(settings, len(prompts), seeds, problems)
        if problems:
            raise SettingsError(problems)
        edit = check_edit(image, mask, edit_values, overrides, self.settings["checkpoint"].native_size)
        if edit is not None:  # the engine works at the edit's size; the images have the canvas's
            settings = self.call_settings({**overrides, "width": edit.sample_size[0], "height": edit.sample_size[1]})
        check_images_per_call(len(checked), settings.num_images_per_prompt)
        count = settings.num_images_per_prompt
        check_pixel_budget(settings.width, settings.height, count, prompts=len(checked))
        engine = self.engine
        loras = self.lora_uses(settings.loras)
        groups = [[first + k for k in range(count)] for first in first_seeds]
        if edit is None:
            outputs = engine.generate_many(checked, settings, groups, on_progress=on_progress, cancel=cancel,
                                           loras=loras)
        else:
            outputs = self._run_edit(edit, checked, settings, groups, on_progress, cancel, loras)
        located = engine.located
        chosen = settings.model_dump(exclude={"num_images_per_prompt", "loras", *LOAD_SETTINGS, *PLACEMENT_SETTINGS})
        if loras:  # by name, scale and SHA-256: never a path (`--from` finds them by hash)
            chosen["loras"] = [use.record() for use in loras]
        if edit is not None:
            chosen.update(width=edit.size[0], height=edit.size[1], **edit.record())
        # On a CPU the thread count changes how sums are split, so the last bit of some pixels: recorded, replayed.
        cpu_threads = {"cpu_threads": torch.get_num_threads()} if engine.device.type == "cpu" else {}
        for prompt, group, output in zip(checked, groups, outputs):
            for index, (image, seed, full_steps) in enumerate(zip(output.images, group, output.full_steps)):
                attach(image, {
                    "prompt": prompt, **chosen, "seed": seed, "model_name": self.settings["checkpoint"].model_name,
                    "model_revision": located.revision if located else None,
                    "base_revision": located.base_revision if located else None,
                    "dtype": dtype_name(engine.dtype), "text_encoder_dtype": dtype_name(held_dtype(engine.text.encoder)),
                    "device": str(engine.device), **cpu_threads,
                    "batch_index": index, "batch_seed": group[0], "batch_size": len(group),
                    "sampled_size": list(output.generated_size), "truncated_tokens": output.truncated_tokens,
                    "full_transformer_steps": full_steps,
                    "version": __version__,
                })
        return [output.images for output in outputs]

    def _run_edit(self, edit: Edit, prompts: list[str], settings: Settings, groups: list[list[int]],
                  on_progress: Optional[ProgressCallback], cancel: Optional[CancelFlag],
                  loras: Sequence[LoraUse] = ()) -> list[Output]:
        engine = self.engine
        plan = engine.plan(settings.width, settings.height, settings.use_resolution_binning)
        run = EditRun(edit, engine, plan, [seed for group in groups for seed in group], settings.num_inference_steps,
                      tiled=settings.vae_tiling)
        outputs = engine.generate_many(prompts, settings, groups, on_progress=on_progress, cancel=cancel,
                                       start=run.start, hooks=run.hooks, loras=loras)
        pasted = iter(run.paste([image for output in outputs for image in output.images]))
        return [dataclasses.replace(output, images=[next(pasted) for _ in output.images]) for output in outputs]

    @staticmethod
    def _first_seeds(settings: Settings, count: int, seeds: Optional[Sequence[int]], problems: list[str]) -> list[int]:
        if seeds is None:
            return [settings.seed if settings.seed >= 0 else random_seed() for _ in range(count)]
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) != count:
            problems.append(f"seeds={shown(seeds)} is not valid: pass one first seed per prompt ({count})")
            return []
        last = MAX_SEED - settings.num_images_per_prompt + 1
        for index, seed in enumerate(seeds):
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -1 <= seed <= last:
                problems.append(f"seeds[{index}]={shown(seed)} is not valid: it must be an integer from 0 to {last}, "
                                "or -1 to draw one")
        return [int(seed) if seed >= 0 else random_seed() for seed in seeds
                if isinstance(seed, numbers.Integral)]
