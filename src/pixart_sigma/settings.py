"""The component's parameters: names, defaults, bounds, descriptions, JSON Schema, errors.

One pydantic model (`Settings`) is the single source of truth: the CLI flags, the JSON
Schema and the README table are all derived from it. Validation errors are rewritten
into sentences that name the field, the value, the rule and what would be valid.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema

from .errors import SettingsError

DEFAULT_MODEL = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
DTYPES = ("auto", "bfloat16", "float16", "float32")
TEXT_ENCODER_DTYPES = DTYPES + ("int8",)  # int8: weight-only, T5 alone (devices.INT8)

# Where the weights live between uses, as diffusers users know it (ComfyUI: high/normal/low VRAM).
# No mode changes a pixel: each runs the same kernels in the same dtype on the same device.
MEMORY_MODES = {
    "auto": "picks the first of the modes below that fits the device's free memory (resident on the CPU)",
    "resident": "every part stays on the device: fastest",
    "text-offload": "the T5 encoder goes to the device only to encode a new prompt (cached prompts skip it)",
    "model-offload": "each part (T5, transformer, VAE) is on the device only while it runs",
    "sequential-offload": "weights stream to the device block by block: the least memory, the slowest",
}


# Step caches (step_cache.py): fewer full transformer passes per image, approximately the same image.
STEP_CACHES = {
    "off": "every step runs the whole transformer",
    "first-block": "a step whose first block barely changed (step_cache_threshold) skips the other blocks and "
                   "reuses what they added at the image's last full step",
    "taylorseer": "the whole transformer runs every step_cache_interval-th step; in between, each block's attention "
                  "and feed-forward outputs are extrapolated from the last two full steps (copied from the first while there is "
                  "only one)",
    "taylorseer-lite": "as taylorseer, but in between only the transformer's output is extrapolated and the blocks do "
                       "not run at all: faster, almost no extra memory",
}
MAX_STEP_CACHE_INTERVAL = 8
# The parameters each step cache reads (the others do not change its images).
STEP_CACHE_PARAMETERS = {
    "off": (),
    "first-block": ("step_cache_threshold", "step_cache_warmup", "step_cache_cooldown"),
    "taylorseer": ("step_cache_interval", "step_cache_warmup", "step_cache_cooldown"),
    "taylorseer-lite": ("step_cache_interval", "step_cache_warmup", "step_cache_cooldown"),
}
STEP_CACHE_SETTINGS = ("step_cache", "step_cache_threshold", "step_cache_interval", "step_cache_warmup",
                       "step_cache_cooldown")


@dataclass(frozen=True)
class Sampler:
    """One `scheduler` choice: the diffusers class, the name A1111-style tools show, config overrides."""

    diffusers_class: str
    a1111_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


# The samplers, declared once: the setting's choices, the engine's classes and the metadata names derive from it.
SAMPLERS: dict[str, Sampler] = {
    "dpm-solver++": Sampler("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "sa-solver": Sampler("SASolverScheduler", "SA-Solver", {"algorithm_type": "data_prediction"}),
    "euler": Sampler("EulerDiscreteScheduler", "Euler"),
    "euler-ancestral": Sampler("EulerAncestralDiscreteScheduler", "Euler a"),
    # DDIM's default clip_sample=True clips predicted latents to [-1, 1]: right for pixel-space
    # models, wrong for VAE latents (scaled latents reach beyond +-1, colours wash out).
    "ddim": Sampler("DDIMScheduler", "DDIM", {"clip_sample": False}),
    "unipc": Sampler("UniPCMultistepScheduler", "UniPC"),
}
SCHEDULERS = tuple(SAMPLERS)

# Settings that pick the weights and where they live: changing one means another load. Every
# other setting can be given per call of `generate`.
LOAD_SETTINGS = ("model_name", "device", "dtype", "text_encoder_dtype", "memory")
# Settings that decide where and how the work runs, never which image comes out: they are left out of
# the image's record and of the batch's file names.
PLACEMENT_SETTINGS = ("device", "memory")
MAX_MODEL_NAME_CHARS = 1024
MAX_DEVICE_CHARS = 200

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 8
MAX_STEPS = 200
MAX_GUIDANCE = 20.0
MAX_IMAGES = 16
MAX_IMAGES_PER_CALL = 64  # prompts x images per prompt in one generate_many: their embeddings stay in memory
MAX_SEED = 2**53 - 1
MAX_SEQUENCE_LENGTH = 300
MAX_PROMPT_CHARS = 10_000
# One call may hold at most this many output pixels (16 images at 1024², 4 at 2048²):
# beyond it a batch exhausts even an 80 GB GPU in the VAE decoder.
MAX_PIXELS_PER_CALL = 16 * 1024 * 1024


def _nearest_sides(value: int) -> str:
    if value < MIN_SIDE:
        return str(MIN_SIDE)
    if value > MAX_SIDE:
        return str(MAX_SIDE)
    low = value // SIDE_MULTIPLE * SIDE_MULTIPLE
    return f"{low} or {low + SIDE_MULTIPLE}"


def _side_rule(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if value < MIN_SIDE or value > MAX_SIDE or value % SIDE_MULTIPLE:
        raise ValueError(
            f"{field}={value} is not valid: it must be a multiple of {SIDE_MULTIPLE} between "
            f"{MIN_SIDE} and {MAX_SIDE}; nearest valid: {_nearest_sides(value)}"
        )
    return value


def check_pixel_budget(width: int, height: int, num_images: int, prompts: int = 1) -> None:
    pixels = width * height * num_images * prompts
    if pixels > MAX_PIXELS_PER_CALL:
        factors = f"{width}x{height}x{num_images}" + (f"x{prompts}" if prompts > 1 else "")
        names = "width x height x num_images_per_prompt" + (" x prompts per call" if prompts > 1 else "")
        raise SettingsError([
            f"{names} = {factors} = {pixels:,} pixels is over the budget of {MAX_PIXELS_PER_CALL:,} per call: use "
            f"at most {max(1, MAX_PIXELS_PER_CALL // (width * height))} images at this size in one call, or a "
            "smaller size"
        ])


def check_images_per_call(prompts: int, num_images: int) -> None:
    if prompts * num_images > MAX_IMAGES_PER_CALL:
        raise SettingsError([
            f"{prompts} prompts x num_images_per_prompt={num_images} = {prompts * num_images} images is too many for "
            f"one call: at most {MAX_IMAGES_PER_CALL}; send fewer prompts per call"
        ])


def check_text(field: str, text: str, *, required: bool) -> str:
    """Reject text a person did not mean to send: control characters, broken UTF-8, empty prompts."""
    if not isinstance(text, str):
        raise SettingsError([f"{field}={shown(text)} is not valid: it must be a string"])
    if len(text) > MAX_PROMPT_CHARS:  # first: a huge text is refused without reading it
        raise SettingsError([
            f"{field} is {len(text)} characters long: at most {MAX_PROMPT_CHARS} are accepted "
            f"(the text encoder reads only the first {MAX_SEQUENCE_LENGTH} tokens anyway)"
        ])
    for index, char in enumerate(text):
        if char in "\t\n\r":
            continue
        category = unicodedata.category(char)
        if category == "Cc":
            raise SettingsError([
                f"{field} contains the control character U+{ord(char):04X} at position {index}: "
                "remove it (only tab and newline are allowed)"
            ])
        if category == "Cs":
            raise SettingsError([
                f"{field} contains invalid UTF-8 (a lone surrogate U+{ord(char):04X} at position {index}): "
                "send the text as valid UTF-8"
            ])
    if required and not text.strip():
        raise SettingsError([f"{field} is empty: describe the image you want, e.g. \"a red fox in the snow\""])
    return text


def above_zero_at_most_one(field: str, value: Any, hint: str) -> Any:
    """A number in (0, 1] (an integer made a float); anything not a number is left for pydantic to name."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
            math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{field}={shown(value)} is not valid: it must be a number above 0 and at most 1 ({hint})")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _printable(field: str, text: str) -> None:
    for index, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"{field} contains the control character U+{ord(char):04X} at position {index}: remove it")


class _SelfContainedSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema with every $ref replaced by its definition and factory defaults shown.

    Front ends read one property at a time (DashAI's form, the service's request schema, the CLI, the
    README table): a list of objects must not point into a $defs that they leave behind.
    """

    def generate(self, schema, mode="validation"):
        result = super().generate(schema, mode)
        return _inline(result, result.pop("$defs", {}))

    def get_default_value(self, schema):
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            return schema["default_factory"]()  # e.g. list: an empty list is a default like any other
        return super().get_default_value(schema)


def _inline(node: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            raise TypeError(f"{name} contains itself: a setting's value must be finite JSON")
        siblings = {key: value for key, value in node.items() if key != "$ref"}  # the field's own title, default...
        return _inline({**definitions[name], **siblings}, definitions, seen + (name,))
    return {key: _inline(value, definitions, seen) for key, value in node.items()}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class SettingsModel(BaseModel):
    """What every group of settings shares: strict validation, a self-contained schema, JSON for list values."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True,
                              json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"})

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Pydantic's schema, self-contained: every property can be read on its own (see _SelfContainedSchema)."""
        kwargs.setdefault("schema_generator", _SelfContainedSchema)
        return super().model_json_schema(*args, **kwargs)

    @classmethod
    def field_schemas(cls) -> dict[str, dict[str, Any]]:
        """Each setting's schema property with an Optional one's non-null branch merged in: the type, items,
        bounds, choices, default and examples a front end builds its input from."""
        schemas = {}
        for name, prop in cls.model_json_schema()["properties"].items():
            merged = {key: value for key, value in prop.items() if key != "anyOf"}
            for branch in prop.get("anyOf", []):
                if branch.get("type") != "null":
                    merged.update(branch)
            schemas[name] = merged
        return schemas

    @classmethod
    def json_value(cls, name: str, text: str) -> Any:
        """A list or object setting written as JSON text (a CLI flag, a form's text box), decoded for validation.

        Only the JSON is read here; what it holds is Settings' to check. SettingsError says what is wrong.
        """
        items = cls.field_schemas()[name].get("items", {})
        if items.get("type") == "integer" and re.fullmatch(r"\s*-?[0-9]+(\s*,\s*-?[0-9]+)*\s*", text):
            return [int(number) for number in text.split(",")]  # a list of integers may be written 0,0,64,0
        try:
            return json.loads(text, parse_constant=_no_constant)  # NaN and Infinity: Python's, not JSON
        except (ValueError, RecursionError) as exc:
            problem = f"{name}={shown(text)} is not valid JSON ({exc}): write {cls.json_hint(name)}"
        raise SettingsError([problem])

    @classmethod
    def json_hint(cls, name: str) -> str:
        """How to write a list or object setting, for help and messages: its kind and its first example."""
        schema = cls.field_schemas()[name]
        what = {"array": "a list", "object": "an object"}.get(schema.get("type"), "the value")
        return f"{what} in JSON" + (f", e.g. {json.dumps(schema['examples'][0])}" if schema.get("examples") else "")


# LoRAs per call. A LoRA is trained for scale 1; people use -2..2 (a negative scale pushes away from the style);
# past +-4 the change is several times anything trained and gives noise, and in float16 it can overflow the weights.
MAX_LORA_SCALE = 4.0
MAX_LORAS = 8  # per call: each one's weight change is fused into the transformer for the call
MAX_LORA_NAME_CHARS = 1024
SHA256_DIGITS, SHORT_HASH_DIGITS = 64, 10  # a LoRA's SHA-256; A1111's "Lora hashes" keep its first 10


class LoraSetting(SettingsModel):
    """One LoRA of a call: which one (`name`) and how strongly (`scale`)."""

    model_config = ConfigDict(json_schema_extra=None)  # a part of Settings' schema, not a schema of its own

    name: str = Field(
        title="LoRA", json_schema_extra={"minLength": 1, "maxLength": MAX_LORA_NAME_CHARS, "pattern": r"\S"},
        description="A name in the LoRA folder ($PIXART_SIGMA_HOME/loras, or lora_dir / --lora-dir): a "
        "file's name without .safetensors, or a PEFT folder's name; or the path of a .safetensors file or PEFT "
        "folder (a path has a / in it).",
    )
    scale: float = Field(
        1.0, title="Scale", ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE,
        description=f"How strongly it applies: 1 as trained, 0 not at all, negative pushes away from it; "
        f"-{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (beyond that a LoRA gives noise, not more of its style).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or len(value) > MAX_LORA_NAME_CHARS:
            raise ValueError(f"name={shown(value)} is not valid: it must be 1 to {MAX_LORA_NAME_CHARS} "
                             "characters, a name in the LoRA folder or a path")
        _printable("name", value)
        return value

    @field_validator("scale", mode="before")
    @classmethod
    def _finite_scale(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"scale={shown(value)} is not valid: it must be a finite number from "
                             f"-{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}")
        return value


def check_lora_count(loras: list) -> list:
    """At most MAX_LORAS LoRAs, for a call and in a record."""
    if len(loras) > MAX_LORAS:
        raise ValueError(f"loras has {len(loras)} LoRAs: at most {MAX_LORAS} are applied in one call")
    return loras


class RecordedLora(LoraSetting):
    """A LoRA as an image records it: its plain name (never a path), its scale and its file's SHA-256 (or, read from
    A1111 text, A1111's short hash: the first 10 hexadecimal digits)."""

    sha256: str = Field(title="SHA-256", description="The LoRA file's SHA-256 (a PEFT folder: of its weights file).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not is_plain_lora_name(value):
            raise ValueError(f"name={shown(value)} is not valid in a record: it must be a plain name (no / or \\, "
                             "not . or ..): an image names its LoRAs, it never chooses a path")
        return value

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not re.fullmatch(f"[0-9a-f]{{{SHORT_HASH_DIGITS}}}|[0-9a-f]{{{SHA256_DIGITS}}}", value):
            raise ValueError(f"sha256={shown(value)} is not valid: it must be a SHA-256 ({SHA256_DIGITS} "
                             f"lowercase hexadecimal digits) or A1111's short hash (its first {SHORT_HASH_DIGITS})")
        return value


class LoraRecord(SettingsModel):
    """The `loras` of an image's record."""

    loras: list[RecordedLora] = Field([], json_schema_extra={"maxItems": MAX_LORAS})

    @field_validator("loras")
    @classmethod
    def _lora_count(cls, value: list) -> list:
        return check_lora_count(value)


def is_plain_lora_name(name: str) -> bool:
    """A name looked up in the LoRA folder: no path separator, not . or .., no leading dot."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name


class Settings(SettingsModel):
    """Everything that decides an image, except the prompt itself (and, for an edit, its pictures: EditSettings)."""

    model_name: str = Field(
        DEFAULT_MODEL, title="Checkpoint",
        description="Checkpoint: a known id (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, ...-512-MS faster "
        "and lighter, ...-2K-MS, or 'demo', the small bundled shapes model, 64x64) or a local diffusers directory.",
        examples=[DEFAULT_MODEL, "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", "demo"],
    )
    negative_prompt: Optional[str] = Field(
        None, title="Negative prompt", description="What to keep out of the image, e.g. 'blurry, watermark'. Empty or null: none."
    )
    num_inference_steps: int = Field(
        20, title="Inference steps", ge=1, le=MAX_STEPS, description="Denoising steps; 14-25 give good images."
    )
    guidance_scale: float = Field(
        4.5, title="Guidance scale", ge=0.0, le=MAX_GUIDANCE,
        description="Classifier-free guidance: how strictly to follow the prompt; best 3.5-5.5, 1 or less turns it off.",
    )
    device: str = Field(
        "auto", title="Device",
        description="Where to run: auto (first GPU if present, else Apple's mps, else CPU), CPU, GPU, cuda, cuda:N, mps, "
        "or a DashAI device label. A GPU is strongly recommended.",
        examples=["auto", "CPU", "GPU", "cuda:0", "mps"],
    )
    seed: int = Field(
        -1, title="Seed", ge=-1, le=MAX_SEED,
        description="-1 draws a random seed; any other value always gives the same image. Image k of a batch uses seed + k.",
    )
    width: Optional[int] = Field(
        None, title="Width", description=f"Image width in pixels, a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}; "
        "null: the checkpoint's native size (1024 for the default model).",
        json_schema_extra={"minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIDE_MULTIPLE},
    )
    height: Optional[int] = Field(
        None, title="Height", description=f"Image height in pixels, a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}; "
        "null: the checkpoint's native size (1024 for the default model).",
        json_schema_extra={"minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIDE_MULTIPLE},
    )
    num_images_per_prompt: int = Field(
        1, title="Images per prompt", ge=1, le=MAX_IMAGES, description="Images generated from the prompt in one batch."
    )
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "auto", title="Number format", description="Number format: auto = bfloat16 on GPUs and CPUs with native bfloat16 "
        "(AVX512-BF16, AMX), float16 on older GPUs (T4, V100), float32 on other CPUs (with the T5 encoder in bfloat16, "
        "half the RAM) and mps."
    )
    text_encoder_dtype: Literal[TEXT_ENCODER_DTYPES] = Field(  # type: ignore[valid-type]
        "auto", title="Text encoder number format", description="Number format of the T5 text encoder: auto = as "
        "dtype, except bfloat16 on a CPU when dtype is auto (T5-XXL in float32 is 19 GB); int8 = weight-only 8-bit "
        "weights with activations in bfloat16 (float32 on GPUs without bfloat16): about half of bfloat16's memory, "
        "embeddings very close to bfloat16's but not identical (CPU and CUDA, needs pixart-sigma[int8]; not with "
        "memory=sequential-offload). Each image records the formats it was made with, so a remake (--from) uses "
        "the same."
    )
    memory: Literal[tuple(MEMORY_MODES)] = Field(  # type: ignore[valid-type]
        "auto", title="Memory mode", description="Where the weights wait between uses; no mode changes the image. "
        + "; ".join(f"{name}: {text}" for name, text in MEMORY_MODES.items()) + "."
    )
    vae_tiling: bool = Field(
        False, title="Tiled VAE decode", description="Decode images larger than the VAE's tile (1024 px for the SDXL "
        "VAE) in overlapping tiles: far less memory at 2048²; no effect at 1024² and below. Seams are blended, pixels "
        "differ slightly from the whole decode."
    )
    compile: bool = Field(
        False, title="Compile (torch.compile)", description="Compile the transformer with torch.compile (with CUDA "
        "graphs on a GPU when it stays on the device): faster steps after a one-time compile per image size, kept on "
        "disk for the next process; pixels may differ in the last bit from the uncompiled run."
    )
    scheduler: Literal[SCHEDULERS] = Field(  # type: ignore[valid-type]
        "dpm-solver++", title="Sampler", description="Sampler; dpm-solver++ is what the checkpoint ships."
    )
    use_resolution_binning: bool = Field(
        True, title="Resolution binning", description="Sample at the nearest trained aspect-ratio size, then resize to cover and centre-crop to exactly the "
        "requested size, as PixArt's authors intend. Off: sample at the requested size (rounded up to 16, cropped back)."
    )
    max_sequence_length: int = Field(
        MAX_SEQUENCE_LENGTH, title="Max prompt tokens", ge=1, le=MAX_SEQUENCE_LENGTH,
        description="Prompt tokens the T5 encoder reads; longer prompts are truncated and the image says so.",
    )
    loras: list[LoraSetting] = Field(
        [], title="LoRAs", description=f"LoRA adapters applied for this call, at most {MAX_LORAS}, each with its scale; "
        "the base weights come back exactly after the call. Each image records each LoRA's name, scale and SHA-256.",
        examples=[[{"name": "my-style", "scale": 0.8}]], json_schema_extra={"maxItems": MAX_LORAS},
    )

    step_cache: Literal[tuple(STEP_CACHES)] = Field(  # type: ignore[valid-type]
        "off", title="Step cache", description="Fewer transformer passes per image, for a slightly different image "
        "(docs/performance.md measures each): " + "; ".join(f"{name}: {text}" for name, text in STEP_CACHES.items())
        + ". Not with compile.",
    )
    step_cache_threshold: float = Field(
        0.1, title="Step cache threshold", description="first-block: how much the first block's output may change "
        "(relative, above 0 up to 1) before a step runs in full; higher skips more steps and drifts more.",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": 1},
    )
    step_cache_interval: int = Field(
        2, title="Step cache interval", ge=2, le=MAX_STEP_CACHE_INTERVAL, description="taylorseer(-lite): the whole "
        "transformer runs every this many steps after the warm-up; higher is faster and drifts more.",
    )
    step_cache_warmup: int = Field(
        1, title="Step cache warm-up", ge=1, le=MAX_STEPS, description="Steps at the start that always run the whole "
        "transformer.",
    )
    step_cache_cooldown: int = Field(
        2, title="Step cache cool-down", ge=0, le=MAX_STEPS, description="Steps at the end that always run the whole "
        "transformer: they settle colours and edges (on the demo model, predicting either of the last two steps "
        "cost 5 to 20 points of its checker).",
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model_name is empty: use a known checkpoint id, 'demo', or the path of a local directory")
        if len(value) > MAX_MODEL_NAME_CHARS:
            raise ValueError(f"model_name is {len(value)} characters long: at most {MAX_MODEL_NAME_CHARS} are accepted")
        _printable("model_name", value)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if len(value) > MAX_DEVICE_CHARS:
            raise ValueError(f"device is {len(value)} characters long: use auto, CPU, GPU, cuda, cuda:N or mps")
        _printable("device", value)
        return value

    @field_validator("loras")
    @classmethod
    def _lora_count(cls, value: list) -> list:
        return check_lora_count(value)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _finite_guidance(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"guidance_scale={shown(value)} is not valid: it must be a finite number from 0 to {MAX_GUIDANCE:g} (best 3.5-5.5)"
            )
        return value

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: Optional[int], info) -> Optional[int]:
        return _side_rule(info.field_name, value)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        check_text("negative_prompt", value, required=False)
        return value if value.strip() else None

    @field_validator("step_cache_threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        return above_zero_at_most_one("step_cache_threshold", value, "0.05 to 0.2 are usual")

    @model_validator(mode="after")
    def _step_cache_not_compiled(self) -> "Settings":
        if self.compile and self.step_cache != "off":
            raise ValueError(f"step_cache={self.step_cache!r} cannot be used with compile=True: the cache decides in "
                             "Python at every step, which breaks the compiled graph; use one of them "
                             "(step_cache='off' or compile=False)")
        return self

    @model_validator(mode="after")
    def _pixel_budget(self) -> "Settings":
        if self.width and self.height:
            check_pixel_budget(self.width, self.height, self.num_images_per_prompt)
        return self

    @classmethod
    def per_call_names(cls) -> list[str]:
        """Settings `generate` accepts per call: all but those that choose the weights (LOAD_SETTINGS)."""
        return [name for name in cls.model_fields if name not in LOAD_SETTINGS]

EDIT_AREAS = {
    "whole": "the whole picture is denoised (the mask says what may change)",
    "masked": "only the mask's bounding box plus inpaint_padding, scaled to the checkpoint's native size and pasted "
              "back: more detail for a small mask",
}
OUTPAINT_FILLS = {
    "edge": "the new area starts as the picture's edge colours, stretched outward",
    "noise": "the new area starts as random colours (from each image's seed)",
}
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength


class EditSettings(SettingsModel):
    """How an edit uses its source picture and mask: image-to-image, inpainting and outpainting.

    They apply only to a call given a picture (`image=`); the picture and mask themselves are inputs, not
    settings. Recorded in the image with the pictures' SHA-256, so that `--from` can remake it.
    """

    strength: float = Field(
        DEFAULT_STRENGTH, title="Denoising strength", description="How much of the picture is redrawn, above 0 up "
        "to 1: the last round(strength x num_inference_steps) steps run (at least one) from the picture noised to "
        "that step; 1 keeps only its broad layout, 0.2 its colours and shapes.",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": 1},
    )
    mask_blur: int = Field(
        4, title="Mask blur", ge=0, le=MAX_MASK_BLUR, description="Soften the mask's edge outward by this many "
        "pixels (a Gaussian blur, cut off at this distance; the marked pixels are always repainted): pixels farther "
        "than this from the mask are the picture's, byte for byte.",
    )
    invert_mask: bool = Field(
        False, title="Invert mask", description="Repaint what the mask leaves unmarked instead of what it marks.",
    )
    inpaint_area: Literal[tuple(EDIT_AREAS)] = Field(  # type: ignore[valid-type]
        "whole", title="Inpaint area", description="; ".join(f"{name}: {text}" for name, text in EDIT_AREAS.items())
        + ".",
    )
    inpaint_padding: int = Field(
        32, title="Inpaint padding", ge=0, le=MAX_INPAINT_PADDING, description="Pixels of context around the mask's "
        "bounding box when inpaint_area is masked.",
    )
    expand: list[int] = Field(
        [0, 0, 0, 0], title="Outpaint (expand)", description="Grow the canvas by left, top, right, bottom pixels and "
        "paint the new area (outpainting); the picture itself is kept exactly.", examples=[[0, 0, 64, 0]],
    )
    fill: Literal[tuple(OUTPAINT_FILLS)] = Field(  # type: ignore[valid-type]
        "edge", title="Outpaint fill", description="; ".join(f"{name}: {text}" for name, text in
                                                               OUTPAINT_FILLS.items()) + ".",
    )

    @field_validator("strength", mode="before")
    @classmethod
    def _strength(cls, value: Any) -> Any:
        return above_zero_at_most_one("strength", value,
                                      "0.2 keeps the picture's colours and shapes, 1 only its broad layout")

    @field_validator("expand", mode="before")
    @classmethod
    def _expand_tuple(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value  # expand=(0, 0, 64, 0) reads as naturally

    @field_validator("expand")
    @classmethod
    def _expand(cls, value: list[int]) -> list[int]:
        if len(value) != 4 or any(not 0 <= side <= MAX_SIDE for side in value):
            raise ValueError(f"expand={shown(value)} is not valid: it must be four integers from 0 to {MAX_SIDE}, the "
                             "pixels to add at the left, top, right and bottom")
        return value

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(cls.model_fields)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "str": "a string", "list": "a list", "tuple": "a list", "dict": "an object", "model": "an object"}


def shown(value: Any, limit: int = 80) -> str:
    """repr() of a value, cut to `limit` characters: messages quote what was sent, not megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model a field holds, alone or inside a list or Optional (None for plain values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _model_in(arg))), None)


def _locate(model: type[BaseModel], loc: tuple) -> tuple[Optional[type[BaseModel]], Optional[FieldInfo]]:
    """The model an error's location ends in and the field it names: loc ("loras", 0, "scale") is LoRA's scale."""
    owner, info = model, None
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the list's model holds it
        if owner is None or part not in owner.model_fields:
            return owner, None
        info = owner.model_fields[part]
        owner = _model_in(info.annotation)
    return owner, info


def _describe(error: dict, model: type[BaseModel]) -> str:
    field = ".".join(str(part) for part in error["loc"])[:80] or "settings"
    value = error.get("input")
    kind = error["type"]
    ctx = error.get("ctx", {})
    owner, info = _locate(model, error["loc"])
    if kind == "extra_forbidden":
        return f"unknown setting {field!r}: valid names are {', '.join(owner.model_fields if owner else [])}"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        parents = field.rpartition(".")[0]  # inside a list or object: name the whole path (loras.0.scale=...)
        last = str(error["loc"][-1]) if error["loc"] else ""
        return f"{parents}.{message}" if parents and message.startswith((f"{last}=", f"{last} ")) else message
    if kind == "missing":
        return f"{field} is missing: it is required" + (f" ({info.description})" if info and info.description else "")
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low = next((m.ge for m in info.metadata if hasattr(m, "ge")), None) if info else None
        high = next((m.le for m in info.metadata if hasattr(m, "le")), None) if info else None
        if low is not None and high is not None:
            hint = " (-1 draws a random seed)" if field == "seed" else ""
            return f"{field}={shown(value)} is not valid: it must be from {low} to {high}{hint}"
        return f"{field}={shown(value)} is not valid: {error['msg'].lower()}"
    if kind == "literal_error":
        return f"{field}={shown(value)} is not valid: choose one of {ctx.get('expected')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        wanted = next((word for key, word in _TYPE_WORDS.items() if kind.startswith(key)), kind)
        if kind == "int_from_float":
            wanted = "an integer"
        return f"{field}={shown(value)} is not valid: it must be {wanted}"
    return f"{field}={shown(value)} is not valid: {error['msg']}"


def parse_settings(raw: dict[str, Any], model: type[Settings] = Settings) -> Settings:
    """Validate user values (against `model`, Settings or a subclass); raise SettingsError listing every
    problem in plain words."""
    if not isinstance(raw, dict):
        raise SettingsError([f"settings must be a mapping of names to values, not {type(raw).__name__}"])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError([_describe(error, model) for error in exc.errors()]) from None


def json_schema(model: type[Settings] = Settings) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the settings (`model`: Settings or a subclass), good enough to build a
    form from: self-contained, every property readable on its own."""
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "PixArtSigmaModel settings"
    schema["additionalProperties"] = False
    return schema
