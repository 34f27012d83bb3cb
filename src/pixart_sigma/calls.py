"""The one check of a generation call, used by every front end and the engine: the prompt, the per-call
settings laid over a model's, the size filled in, compile against the memory mode, and the seeds drawn.

Pure (no torch, no weights): a service or a gateway checks a request with it before any work is queued,
against what the loaded model really is (its native size, the memory mode its weights were placed in).
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping, Optional

from .errors import SettingsError
from .editing import Edit, prepare_edit
from .settings import (LOAD_SETTINGS, MAX_SEED, MIN_SIDE, EditSettings, Settings, check_pixel_budget, check_text,
                       parse_settings)

FALLBACK_SIZE = 1024  # width/height when neither the call nor the checkpoint says
RANDOM_SEED_RANGE = 2**32  # seed=-1 draws from [0, 2**32): room for seed + k up to MAX_SEED
COMPILE_STREAMED = ("compile=True cannot be used with memory='sequential-offload' (memory=auto picks it when the "
                    "model does not fit whole; its hooks stream the weights block by block): use model-offload, "
                    "text-offload or resident, or compile=False")
LORAS_STREAMED = ("loras cannot be used with memory='sequential-offload' (memory=auto picks it when the model does not "
                  "fit whole): its offloading hooks keep their own copies of the weights, which a LoRA cannot change; "
                  "use model-offload, text-offload or resident, or no loras")

# diffusers' group offloading puts a hook of its own on every block for the first forward and rewires the
# blocks' forwards when it takes it off: a step cache's hooks installed before then stop running.
STEP_CACHE_STREAMED = ("step_cache={step_cache!r} cannot be used with memory='sequential-offload' (memory=auto picks "
                       "it when the model does not fit whole): the streaming hooks on each block displace the "
                       "cache's; use model-offload, text-offload or resident, or step_cache='off'")
INT8_STREAMED = ("text_encoder_dtype='int8' cannot be used with memory='sequential-offload' (memory=auto picks it "
                 "when the model does not fit whole): its int8 weights cannot be streamed block by block; use "
                 "memory='model-offload' or 'text-offload', or text_encoder_dtype='bfloat16'")


def random_seed() -> int:
    """A seed for seed=-1, drawn once and then recorded, so the same image can be made again."""
    return secrets.randbelow(RANDOM_SEED_RANGE)


def check_prompt(prompt: Any) -> str:
    """The prompt as text (UTF-8 bytes decoded), checked like any text a person sends."""
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SettingsError([f"prompt is not valid UTF-8 (byte {exc.start}): send UTF-8 text"]) from None
    return check_text("prompt", prompt, required=True)


def fill_size(values: dict[str, Any], native_size: Optional[int]) -> None:
    """width/height default to the checkpoint's native size; the pixel budget and the seed range then apply."""
    values["width"] = values["width"] or native_size or FALLBACK_SIZE
    values["height"] = values["height"] or native_size or FALLBACK_SIZE
    check_pixel_budget(values["width"], values["height"], values["num_images_per_prompt"])
    if values["seed"] + values["num_images_per_prompt"] - 1 > MAX_SEED:
        raise SettingsError([f"seed={values['seed']} is too large for {values['num_images_per_prompt']} images: "
                             f"image k uses seed + k, which must stay at most {MAX_SEED}"])


def call_settings(model_settings: Mapping[str, Any], overrides: Mapping[str, Any], *, native_size: Optional[int],
                  memory_mode: str) -> Settings:
    """A model's settings with per-call overrides, checked by the rules of a call.

    `memory_mode`: the mode the model's weights are placed in (auto made concrete when they loaded),
    so a call that cannot run on them (compile with sequential-offload) is refused before it is queued.
    """
    loaded = sorted(set(overrides) & set(LOAD_SETTINGS))
    if loaded:
        raise SettingsError([f"{name} cannot change per call (it chooses the weights): make another "
                             f"PixArtSigmaModel with {name}=..." for name in loaded])
    values = {name: model_settings[name] for name in Settings.field_names()}
    values.update(overrides)
    values = parse_settings(values).model_dump()
    check_memory_mode(values["compile"], values["loras"], memory_mode, values["step_cache"])
    fill_size(values, native_size)
    return Settings.model_construct(**values)


def check_call(prompt: Any, model_settings: Mapping[str, Any], overrides: Mapping[str, Any], *,
               native_size: Optional[int], memory_mode: str, image: Any = None,
               mask: Any = None) -> tuple[str, dict[str, Any]]:
    """The checked prompt and the per-call settings a generation would use; every problem at once.

    With `image` (an edit), `overrides` may hold EditSettings too; the pictures are read and laid out
    (check_edit) and the edit settings come back with the others.
    """
    problems: list[str] = []
    checked = settings = edit = None
    overrides, edit_values = split_edit_values(overrides)
    try:
        checked = check_prompt(prompt)
    except SettingsError as exc:
        problems += exc.problems
    try:
        settings = call_settings(model_settings, overrides, native_size=native_size, memory_mode=memory_mode)
    except SettingsError as exc:
        problems += exc.problems
    if settings is not None:
        try:
            edit = check_edit(image, mask, edit_values, overrides, native_size)
        except SettingsError as exc:
            problems += exc.problems
    if problems:
        raise SettingsError(problems)
    values = {name: getattr(settings, name) for name in Settings.per_call_names()}
    if edit is None:
        return checked, values
    # The canvas's size, so that these settings given back to generate keep it (a size given resizes it).
    check_pixel_budget(*edit.sample_size, settings.num_images_per_prompt)
    return checked, {**values, "width": edit.size[0], "height": edit.size[1], **edit.settings.model_dump()}


def split_edit_values(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, edit settings) of a call's overrides."""
    edit_names = EditSettings.model_fields
    return ({name: value for name, value in overrides.items() if name not in edit_names},
            {name: value for name, value in overrides.items() if name in edit_names})


def check_edit(image: Any, mask: Any, edit_values: Mapping[str, Any], overrides: Mapping[str, Any],
               native_size: Optional[int]) -> Optional[Edit]:
    """An edit's pictures read and laid out (editing.prepare_edit), or None without a picture; edit settings
    and a mask without one are refused. The canvas keeps the picture's size unless the call gives width/height."""
    if image is None:
        given = sorted(edit_values) + (["mask"] if mask is not None else [])
        if given:
            raise SettingsError([f"{', '.join(given)} apply to edits only: give image=... (the picture to edit)"])
        return None
    settings = parse_settings(dict(edit_values), EditSettings)
    return prepare_edit(image, mask, settings, overrides.get("width"), overrides.get("height"),
                        native_size or MIN_SIDE)


def check_memory_mode(compile: bool, loras: Any, memory_mode: str, step_cache: str = "off") -> None:
    """What a memory mode cannot run: compile and LoRAs need the weights whole (a streamed model's hooks move
    and copy them), a step cache its own hooks on the blocks; every problem at once."""
    problems = []
    try:
        check_compile(compile, memory_mode)
    except SettingsError as exc:
        problems += exc.problems
    if loras and memory_mode == "sequential-offload":
        problems.append(LORAS_STREAMED)
    if step_cache != "off" and memory_mode == "sequential-offload":
        problems.append(STEP_CACHE_STREAMED.format(step_cache=step_cache))
    if problems:
        raise SettingsError(problems)


def check_text_encoder_memory(text_encoder_dtype: str, memory_mode: str) -> None:
    """An int8 T5 is never streamed: diffusers' group offloading fails to pin torchao's int8 weights on their
    way to a GPU (huggingface/diffusers#14433)."""
    if text_encoder_dtype == "int8" and memory_mode == "sequential-offload":
        raise SettingsError([INT8_STREAMED])


def check_compile(compile: bool, memory_mode: str) -> None:
    """compile only where the weights stay whole on the device (a streamed model's hooks move them)."""
    if compile and memory_mode == "sequential-offload":
        raise SettingsError([COMPILE_STREAMED])
