"""Settings that are lists or objects (a LoRA list) go through every derivation: the JSON Schema, the error
messages, the CLI's flags, DashAI's form and the README table. No real setting is one yet, so a Settings
subclass with such fields stands in for the next feature's."""

import argparse
import json
import os
import re
from typing import Optional

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import GenerateJsonSchema

from pixart_sigma import SettingsError
from pixart_sigma.cli import _add_setting_flags
from pixart_sigma.settings import Settings, json_schema, parse_settings

from test_readme import settings_table


class Lora(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str = Field(title="Path", description="the adapter's file")
    scale: float = Field(1.0, title="Scale", ge=0.0, le=2.0, description="how strongly it applies")


class Structured(Settings):
    loras: list[Lora] = Field([], title="LoRAs", description="Adapters applied in order.",
                              examples=[[{"path": "style.safetensors", "scale": 0.8}]])
    tags: list[str] = Field(default_factory=list, title="Tags", description="Words stored with the image.")
    options: dict[str, float] = Field({"eta": 0.0}, title="Options", description="Sampler options by name.")
    refiner: Optional[Lora] = Field(None, title="Refiner", description="One adapter for the last steps; null: none.")


LORAS = [{"path": "style.safetensors", "scale": 0.8}]
GIVEN = {"loras": LORAS, "tags": ["fox", "snow"], "options": {"eta": 0.5}, "refiner": {"path": "detail.safetensors"}}
EXAMPLE = 'e.g. [{"path": "style.safetensors", "scale": 0.8}]'


def test_the_schema_of_lists_and_objects_is_self_contained_json():
    schema = json_schema(Structured)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "$defs" not in schema and "$ref" not in json.dumps(schema)  # each property can be read on its own
    loras = schema["properties"]["loras"]
    assert loras["type"] == "array" and loras["default"] == [] and loras["examples"] == [LORAS]
    item = loras["items"]
    assert item["type"] == "object" and item["required"] == ["path"] and item["additionalProperties"] is False
    assert item["properties"]["scale"] == {"default": 1.0, "description": "how strongly it applies", "maximum": 2.0,
                                           "minimum": 0.0, "title": "Scale", "type": "number"}
    assert schema["properties"]["tags"] == {"default": [], "description": "Words stored with the image.",
                                            "items": {"type": "string"}, "title": "Tags", "type": "array"}
    assert schema["properties"]["options"]["default"] == {"eta": 0.0}
    assert Structured.field_schemas()["refiner"]["type"] == "object"  # Optional: its non-null branch
    assert json.loads(json.dumps(schema)) == schema  # every default and example is plain JSON
    # The scalar settings' schemas are pydantic's own, unchanged: only lists and objects (the real loras) are inlined.
    own = Settings.model_json_schema(schema_generator=GenerateJsonSchema)["properties"]
    scalars = [name for name, prop in own.items() if prop.get("type") not in ("array", "object")]
    assert scalars and "loras" not in scalars
    assert {name: Settings.model_json_schema()["properties"][name] for name in scalars} == {name: own[name] for name in scalars}


def test_the_schema_and_settings_agree_on_lists_and_objects():
    validator = jsonschema.Draft202012Validator(json_schema(Structured))
    assert validator.is_valid(GIVEN)
    assert parse_settings(GIVEN, Structured).loras[0].scale == 0.8
    for bad in ({"loras": [{"path": "a", "scale": 3}]}, {"loras": [{"scale": 1}]}, {"loras": [{"path": "a", "w": 1}]},
                {"loras": LORAS[0]}, {"tags": "fox"}, {"options": []}, {"options": {"eta": "x"}}, {"refiner": 3}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(SettingsError):
            parse_settings(bad, Structured)


def test_errors_inside_lists_and_objects_name_the_path_the_value_and_the_rule():
    with pytest.raises(SettingsError) as caught:
        parse_settings({"loras": [{"path": "a", "scale": 3}, {"scale": 1}, {"path": "b", "weight": 1}], "tags": "fox",
                        "options": [], "refiner": 3}, Structured)
    assert caught.value.problems == [
        "loras.0.scale=3 is not valid: it must be from 0.0 to 2.0",
        "loras.1.path is missing: it is required (the adapter's file)",
        "unknown setting 'loras.2.weight': valid names are path, scale",
        "tags='fox' is not valid: it must be a list",
        "options=[] is not valid: it must be an object",
        "refiner=3 is not valid: it must be an object",
    ]
    assert list(caught.value.by_field()) == ["loras", "tags", "options", "refiner"]


@pytest.mark.parametrize("text, reason", [
    ('[{"path": ', "Expecting value"),
    ("[{'path': 'a.safetensors'}]", "Expecting property name enclosed in double quotes"),
    ("NaN", "NaN is not a JSON number"),
    ("[" * 100_000, "recursion"),
])
def test_json_text_is_read_by_one_rule_that_says_what_is_valid(text, reason):
    assert Structured.json_value("loras", json.dumps(LORAS)) == LORAS
    with pytest.raises(SettingsError) as caught:
        Structured.json_value("loras", text)
    message = str(caught.value)
    assert message.startswith("loras=") and "is not valid JSON" in message and reason in message
    assert message.endswith(f"write a list in JSON, {EXAMPLE}") and len(message) < 400


def test_the_cli_takes_a_list_or_object_setting_as_one_json_flag(capsys):
    parser = argparse.ArgumentParser(prog="pixart-sigma generate")
    _add_setting_flags(parser, Structured)
    args = parser.parse_args(["--seed", "3", *[item for name, value in GIVEN.items()
                                               for item in (f"--{name}", json.dumps(value))]])
    assert {name: getattr(args, name) for name in GIVEN} == GIVEN and args.seed == 3
    assert not hasattr(args, "width")  # as before: only what was given
    assert parse_settings(vars(args), Structured).refiner.path == "detail.safetensors"
    help_text = " ".join(parser.format_help().split())
    assert "--loras JSON" in help_text and f"Give a list in JSON, {EXAMPLE} (default: [])" in help_text
    assert '--options JSON Sampler options by name. Give an object in JSON (default: {"eta": 0.0})' in help_text
    assert "--seed SEED" in help_text  # scalars as before
    for bad, reason in (("[{'path': 'a'}]", "Expecting property name"), ("NaN", "NaN is not a JSON number")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--loras", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert f"argument --loras: loras={bad!r} is not valid JSON" in err and reason in err and EXAMPLE in err


def test_dashais_form_takes_a_list_of_scalars_as_a_list_and_the_rest_as_json_text():
    pytest.importorskip("DashAI", reason="dashai is installed by `make test` (see requirements-dashai-test.txt)")
    os.environ.setdefault("DASHAI_LOCAL_PATH", os.environ["HF_HOME"])  # DashAI's plugin folder: keep it private
    from pixart_sigma.integrations.dashai import PLACEHOLDERS, PixArtSigmaModel, dashai_schema, from_form

    plugin = type("StructuredPixArtSigmaModel", (PixArtSigmaModel,), {"SCHEMA": dashai_schema(Structured)})
    form = plugin.get_schema()  # DashAI's own path to its front end (which drops $defs)
    assert "$ref" not in json.dumps(form, default=str)
    properties = form["properties"]
    assert properties["tags"]["type"] == "array" and properties["tags"]["items"] == {"type": "string"}
    assert properties["tags"]["placeholder"] == []
    for name, placeholder in (("loras", "[]"), ("options", '{"eta": 0.0}')):
        assert properties[name]["type"] == "string" and properties[name]["placeholder"] == placeholder
    assert properties["loras"]["description"].en == f"Adapters applied in order. Write a list in JSON, {EXAMPLE}."
    assert [branch["type"] for branch in properties["refiner"]["anyOf"]] == ["string", "null"]

    # What the form sends: every setting as it starts, then ours; DashAI's API checks it with SCHEMA.
    start = {name: PLACEHOLDERS.get(name, schema.get("default")) for name, schema in Settings.field_schemas().items()}
    sent = {**start, "loras": json.dumps(LORAS), "tags": ["fox", "snow"], "options": '{"eta": 0.5}',
            "refiner": '{"path": "detail.safetensors"}'}
    assert plugin.SCHEMA.model_validate(sent).loras == json.dumps(LORAS)  # stored as sent
    values = from_form(sent, Structured)  # the way back: JSON text decoded, then our Settings checks it
    assert {name: values[name] for name in GIVEN} == GIVEN
    assert parse_settings(values, Structured).options == {"eta": 0.5}
    for bad, fragment in (({"loras": "[{"}, "loras='[{' is not valid JSON"),
                          ({"loras": '[{"path": "a", "scale": 3}]'}, "loras.0.scale=3 is not valid: it must be from 0.0"),
                          ({"options": "[]"}, "options=[] is not valid: it must be an object"),
                          ({"refiner": '{"scale": 1}'}, "refiner.path is missing")):
        with pytest.raises(ValidationError, match=re.escape(fragment)):
            plugin.SCHEMA.model_validate({**sent, **bad})
    with pytest.raises(SettingsError, match=re.escape("loras='[{' is not valid JSON")):
        from_form({**sent, "loras": "[{"}, Structured)


def test_the_readme_table_generator_reads_lists_and_objects():
    table = settings_table(json_schema(Structured)).splitlines()
    today = settings_table().splitlines()
    stand_in = "| `loras` | `[]` | list of {path: text, scale: 0 to 2} | Adapters applied in order. |"
    # today's rows, unchanged but the real loras' (which the stand-in overrides in place), then the new ones
    assert table[:len(today)] == [stand_in if row.startswith("| `loras` |") else row for row in today]
    assert stand_in in table
    assert table[len(today):] == [
        "| `tags` | `[]` | list of text | Words stored with the image. |",
        '| `options` | `{"eta": 0.0}` | object of number | Sampler options by name. |',
        "| `refiner` | `null` | {path: text, scale: 0 to 2} | One adapter for the last steps; null: none. |",
    ]
