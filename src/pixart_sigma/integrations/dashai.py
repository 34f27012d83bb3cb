"""DashAI plugin: `PixArtSigmaModel` as a DashAI `TextToImageGenerationTaskModel`.

Found by DashAI through the `dashai.plugins` entry point; only that entry point imports this
module, so the core package never needs DashAI. Validation, loading and generation are the
core library's: DashAI builds a new model object for every generation job, and the second job in
a process finds the weights warm instead of loading them again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, List, Optional, get_args

from pydantic import AfterValidator, create_model

from DashAI.back.core.schema_fields import (bool_field, enum_field, float_field, int_field, list_field, schema_field,
                                            string_field)
from DashAI.back.core.schema_fields.base_schema import BaseSchema
from DashAI.back.core.utils import MultilingualString
from DashAI.back.dependencies.downloads.downloadable import DownloadableMixin
from DashAI.back.models.text_to_image_generation_model import TextToImageGenerationTaskModel
from DashAI.back.models.utils import DEVICE_ENUM, DEVICE_PLACEHOLDER

from .. import PixArtSigmaModel as CoreModel
from ..checkpoints import (BASE_REPO, DEMO_NAME, KNOWN_CHECKPOINTS, KNOWN_MODEL_NAMES, is_available, locate,
                           resolve_checkpoint)
from ..settings import DEFAULT_MODEL, Settings, parse_settings

log = logging.getLogger(__name__)

REPO_512 = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
# What DashAI's download button fetches: the 1024 pipeline and the 512 transformer, as DashAI's own
# PixArt-Sigma component does; the 2K transformer is fetched on first use when the hub is reachable.
DOWNLOADED_MODELS = (BASE_REPO, REPO_512)
GB = 1_000_000_000
DOWNLOAD_BYTES = {name: int(known.download_gb * GB) for name, known in KNOWN_CHECKPOINTS.items()}
DOWNLOAD_BYTES[DEMO_NAME] = 0


NATIVE_SIZE = KNOWN_CHECKPOINTS[DEFAULT_MODEL].native_size
# Choices that live outside Settings (which takes any checkpoint path and any device string).
ENUMS = {"model_name": list(KNOWN_MODEL_NAMES), "device": DEVICE_ENUM}
# The form's starting value where Settings' default cannot be shown: DashAI's device labels have no
# "auto"; None means "the checkpoint's native size" or "no negative prompt".
PLACEHOLDERS = {"device": DEVICE_PLACEHOLDER, "width": NATIVE_SIZE, "height": NATIVE_SIZE, "negative_prompt": ""}
# The form always sends a size, so these are plain integers in DashAI although Settings also takes None.
NEVER_NULL = ("width", "height")
# JSON Schema keyword -> int_field/float_field keyword.
BOUND_KEYWORDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
                  "multipleOf": "multiple_of"}
# JSON types DashAI has an input for; a list of them gets DashAI's list input (values separated by commas).
SCALAR_TYPES = ("boolean", "integer", "number", "string")


def _bounds(schema: dict) -> dict:
    """int_field/float_field keywords from a schema's bounds (Field(ge=...) and json_schema_extra both land there)."""
    return {BOUND_KEYWORDS[key]: value for key, value in schema.items() if key in BOUND_KEYWORDS}


def _is_json_text(schema: dict) -> bool:
    """An object, or a list of anything but scalars: DashAI has no input for these, so the form takes JSON text."""
    kind = schema.get("type")
    return kind == "object" or (kind == "array" and schema.get("items", {}).get("type") not in SCALAR_TYPES)


def _form_type(name: str, schema: dict) -> Any:
    """DashAI's type for a setting's schema (Settings.field_schemas: nullability aside) or a list item's."""
    if "enum" in schema:
        return enum_field(enum=list(schema["enum"]))
    kind = schema.get("type")
    if kind == "boolean":
        return bool_field()
    if kind == "integer":
        return int_field(**_bounds(schema))
    if kind == "number":
        return float_field(**_bounds(schema))
    if kind == "string":
        return string_field()
    if kind == "array" and not _is_json_text(schema):
        return list_field(_form_type(name, schema["items"]), min_items=schema.get("minItems"),
                          max_items=schema.get("maxItems"))
    raise TypeError(f"Settings.{name}: no DashAI field for {schema}; teach {__name__}._form_type")


def _json_text(settings: type[Settings], name: str) -> Any:
    """DashAI's input for a list or object setting: text holding JSON, checked by `settings` as the form sends it."""
    def check(text: str) -> str:
        parse_settings({name: settings.json_value(name, text)}, settings)  # SettingsError: a ValueError to pydantic
        return text  # DashAI stores the text as sent; the plugin decodes it again (from_form)
    return Annotated[string_field(), AfterValidator(check)]


def from_form(values: Any, settings: type[Settings] = Settings) -> Any:
    """The form's values as `settings` takes them: JSON text decoded to lists and objects; the rest as sent."""
    if not isinstance(values, dict):
        return values  # Settings says what is wrong with it
    schemas = settings.field_schemas()
    return {name: settings.json_value(name, value)
            if isinstance(value, str) and name in schemas and _is_json_text(schemas[name]) else value
            for name, value in values.items()}


def dashai_schema(settings: type[Settings] = Settings) -> type[BaseSchema]:
    """DashAI's form, built from `settings` so that each setting is declared once, in Settings.

    Label (title), description, default (placeholder), bounds and choices come from the Settings
    field; only what Settings cannot say lives in the tables above. Field order is Settings' order.
    A list of scalars is DashAI's list input; an object or a list of objects is JSON text (_is_json_text).
    """
    schemas = settings.field_schemas()
    fields = {}
    for name, field in settings.model_fields.items():
        schema, description = schemas[name], field.description
        placeholder = PLACEHOLDERS.get(name, schema.get("default"))
        if name in ENUMS:
            form_type = enum_field(enum=ENUMS[name])
        elif _is_json_text(schema):
            form_type, placeholder = _json_text(settings, name), json.dumps(placeholder)
            description = f"{description} Write {settings.json_hint(name)}."
        else:
            form_type = _form_type(name, schema)
        annotation = schema_field(form_type, placeholder=placeholder, description=description,
                                  alias=MultilingualString(en=field.title))
        if type(None) in get_args(field.annotation) and name not in NEVER_NULL:
            # Optional outside schema_field, as DashAI's own components do: the description goes inside anyOf.
            annotation = Optional[annotation]
        fields[name] = (annotation, ...)  # required, as before: the form sends every field
    return create_model(
        "PixArtSigmaSchema", __base__=BaseSchema, __module__=__name__,
        __doc__="PixArt-Sigma text-to-image settings: checkpoint, guidance, size, seed, sampler and device.",
        **fields)


PixArtSigmaSchema = dashai_schema()


class PixArtSigmaModel(DownloadableMixin, TextToImageGenerationTaskModel):
    """PixArt-Sigma (DiT-XL/2 + T5-XXL + SDXL VAE) text-to-image generation, kept warm between jobs."""

    SCHEMA = PixArtSigmaSchema
    DISPLAY_NAME: str = "PixArt-Sigma (pixart-sigma plugin)"
    DESCRIPTION: str = (
        "PixArt-Sigma, a Diffusion Transformer (DiT-XL/2) conditioned by a T5-XXL text encoder: good images in "
        "14-25 steps at guidance 3.5-5.5, at 512, 1024 or 2048 px. The model stays loaded between generations, "
        "every image remembers its settings and seed, and bad settings are explained before any work starts. "
        "A GPU is strongly recommended."
    )
    COLOR: str = "#4a148c"
    DOWNLOAD_SIZE_BYTES: int = sum(DOWNLOAD_BYTES[name] for name in DOWNLOADED_MODELS)

    def __init__(self, **kwargs: Any):
        start = time.perf_counter()
        settings = {name: value for name, value in from_form(kwargs).items()
                    if value is not None or name == "negative_prompt"}
        self.model = CoreModel(**settings)
        self.construction_seconds = time.perf_counter() - start
        log.info("PixArt-Sigma ready in %.2f s", self.construction_seconds)

    @classmethod
    def validate_and_transform(cls, raw_data: dict) -> dict:
        """Our validation (messages that name field, value and what is valid), not only DashAI's schema."""
        return CoreModel.validate_and_transform(from_form(raw_data))

    def generate(self, input: str) -> List[Any]:
        return self.model.generate(input)

    @classmethod
    def get_metadata(cls) -> dict:
        metadata = super().get_metadata()
        metadata["download_size_bytes_by_model"] = dict(DOWNLOAD_BYTES)
        return metadata

    # -- DashAI's download contract, on the shared Hugging Face cache (HF_HOME) ------------------
    @classmethod
    def is_downloaded(cls) -> bool:
        return all(is_available(name) for name in DOWNLOADED_MODELS)

    @classmethod
    def download(cls, report=None) -> None:
        for index, name in enumerate(DOWNLOADED_MODELS):
            if report:
                report(index / len(DOWNLOADED_MODELS), f"downloading {name}")
            locate(resolve_checkpoint(name))
        if report:
            report(1.0, "done")

    @classmethod
    def delete(cls) -> None:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
        revisions = [revision.commit_hash for repo in cache.repos if repo.repo_id in KNOWN_CHECKPOINTS
                     for revision in repo.revisions]
        cache.delete_revisions(*revisions).execute()
