"""An edit's pictures as the routes receive them: files of a multipart/form-data upload, or base64 text (plain
or a data: URL) in a JSON body or a form field.

Only bytes come out of here: a picture is never read from a path a request names, and an upload's own file
name is never used (the store names what it keeps). Whether the bytes are a picture, and a fitting one, is
the library's to say (`validate_call` reads them before a job exists).

Form fields are text: the value of a setting that is not text (a number, true/false, a list) is read as JSON
(`expand` also as `0,0,64,0`), so `strength=0.6` is 0.6; a value that does not read stays text, and the
library then names the field and the type it wants. Repeated fields written `name[]` (as the `openai`
client sends a list) make a list.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import SettingsError
from ..settings import EditSettings, Settings, shown
from .protocol import MAX_EDIT_BODY_BYTES, json_number
from .store import PICTURE_ROLES

DATA_URL = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)
MAX_FORM_FIELDS = 200
SETTING_SCHEMAS = {**Settings.field_schemas(), **EditSettings.field_schemas()}
TEXT_TYPES = ("string", None)  # settings whose form value is kept as it is


class BadForm(Exception):
    """A multipart body that cannot be read as one (malformed, too many files or fields)."""


def decode_base64(field: str, value: Any) -> bytes:
    """A picture sent as base64 text (plain, or a data: URL) as its file's bytes; SettingsError naming `field`."""
    how = "send the picture's file in base64, plain or as a data: URL (data:image/png;base64,...)"
    if not isinstance(value, str):
        raise SettingsError([f"{field}={shown(value)} is not valid: {how}"])
    text = value.strip()
    prefix = DATA_URL.match(text)
    if prefix:
        text = text[prefix.end():]
    elif text[:5].lower() == "data:":
        raise SettingsError([f"{field} is a data: URL without ';base64,': {how}"])
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SettingsError([f"{field} is not valid base64 ({exc}): {how}"]) from None


def form_value(name: str, text: str, typed: frozenset[str] = frozenset()) -> Any:
    """A form field's text as the setting `name` takes it: JSON for a setting that is not text (and for the
    names in `typed`, a route's own numbers), else the text; a value that does not read stays text."""
    kind = "number" if name in typed else SETTING_SCHEMAS.get(name, {}).get("type")
    if kind in TEXT_TYPES:
        return text
    try:
        if kind in ("array", "object"):
            return (EditSettings if name in EditSettings.model_fields else Settings).json_value(name, text)
        return json.loads(text, parse_float=json_number)
    except ValueError:  # SettingsError included: the library says what is wrong with the value
        return text


def typed_fields(fields: dict[str, list[str]], typed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Form fields (name -> the texts sent) as request values: each name once, a `name[]` list as a list, and a
    list of objects as `name[][key]` (what the `openai` client sends for extra_body={"loras": [{...}, ...]}) or
    `name[0][key]`."""
    values: dict[str, Any] = {}
    items = {name: texts for name, texts in fields.items() if ITEM_FIELD.fullmatch(name)}
    if items:
        values.update(_object_lists(items))
    for name, texts in fields.items():
        if name in items:
            continue
        if name.endswith("[]"):
            values[name[:-2]] = [form_value(name[:-2], text, typed) for text in texts]
        elif len(texts) > 1 and SETTING_SCHEMAS.get(name, {}).get("type") == "array":
            # A list setting sent as repeated fields without [] (how OpenAPI tools encode an array in a form):
            # each field one item, read as the list's items are.
            item_kind = SETTING_SCHEMAS[name].get("items", {}).get("type")
            values[name] = [text if item_kind in TEXT_TYPES else _json_item(text) for text in texts]
        elif len(texts) > 1:
            raise SettingsError([f"{name[:100]} is sent {len(texts)} times: send each field once"])
        else:
            values[name] = form_value(name, texts[0], typed)
    return values


def _json_item(text: str) -> Any:
    """One item of a list sent as repeated fields: JSON where it reads, else the text (the library names it)."""
    try:
        return json.loads(text, parse_float=json_number)
    except (ValueError, RecursionError):
        return text


ITEM_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\[([0-9]*)\]\[([A-Za-z_][A-Za-z0-9_]*)\]")


def _object_lists(fields: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """`name[][key]` fields (the n-th text of each key makes the n-th object) or `name[i][key]` ones, as lists of
    objects, each value typed by the item's schema (text for a text property, else JSON)."""
    grouped: dict[str, dict[str, dict[str, list[str]]]] = {}  # list name -> index ("" unnumbered) -> key -> texts
    for field, texts in fields.items():
        name, index, key = ITEM_FIELD.fullmatch(field).groups()
        grouped.setdefault(name, {}).setdefault(index, {})[key] = texts
    lists, problems = {}, []
    for name, by_index in grouped.items():
        properties = SETTING_SCHEMAS.get(name, {}).get("items", {}).get("properties", {})

        def typed(key: str, text: str) -> Any:
            if properties.get(key, {}).get("type") in TEXT_TYPES:
                return text
            try:
                return json.loads(text, parse_float=json_number)
            except ValueError:
                return text  # the library names the key and the type it wants

        if "" in by_index and len(by_index) > 1:
            problems.append(f"{name}[][...] and {name}[N][...] are both sent: send the list one way")
            continue
        if "" in by_index:
            counts = {key: len(texts) for key, texts in by_index[""].items()}
            if len(set(counts.values())) > 1:
                sent = ", ".join(f"{name}[][{key}] {count} time(s)" for key, count in counts.items())
                problems.append(f"{name} is sent as {sent}: each item must have every key, so the n-th of each makes "
                                f"the n-th item (give each {name} item the same keys, e.g. a scale for every LoRA), "
                                f"or send {name} as one JSON field")
                continue
            keys = list(counts)
            lists[name] = [{key: typed(key, by_index[""][key][n]) for key in keys} for n in range(max(counts.values()))]
            continue
        repeated = [f"{name}[{index}][{key}]" for index, keys in by_index.items() for key, texts in keys.items()
                    if len(texts) > 1]
        if repeated:
            problems.append(f"{', '.join(repeated[:5])} sent more than once: send each field once")
            continue
        lists[name] = [{key: typed(key, texts[0]) for key, texts in by_index[index].items()}
                       for index in sorted(by_index, key=int)]
    if problems:
        raise SettingsError(problems)
    return lists


async def read_form(request: Request, roles: tuple[str, ...] = PICTURE_ROLES
                    ) -> tuple[dict[str, list[str]], dict[str, list[bytes]]]:
    """A multipart/form-data body as (text fields: name -> texts, pictures: role -> bytes of each sent).

    A file part must be one of `roles` (`name[]` counts as `name`); a picture sent as a text part is read as
    base64. BadForm when the body cannot be read; SettingsError for a file under another name.
    """
    try:
        form = await request.form(max_files=2 * len(roles), max_fields=MAX_FORM_FIELDS,
                                  max_part_size=MAX_EDIT_BODY_BYTES)
    except (HTTPException, ValueError) as exc:  # python-multipart's parse errors are ValueErrors
        raise BadForm(f"the request body is not readable multipart/form-data: {getattr(exc, 'detail', exc)}") from None
    fields: dict[str, list[str]] = {}
    pictures: dict[str, list[bytes]] = {}
    problems = []
    for name, value in form.multi_items():
        role = name.removesuffix("[]")
        if isinstance(value, UploadFile):
            if role in roles:
                pictures.setdefault(role, []).append(await value.read())
            else:
                problems.append(f"{name[:100]} is sent as a file: only {' and '.join(roles)} may be files")
        elif role in roles:
            try:
                pictures.setdefault(role, []).append(decode_base64(role, value))
            except SettingsError as exc:
                problems += exc.problems
        else:
            fields.setdefault(name, []).append(value)
    await form.close()
    if problems:
        raise SettingsError(problems)
    return fields, pictures


def one_each(pictures: dict[str, list[bytes]], names: dict[str, str]) -> dict[str, bytes]:
    """One picture per role (`names`: role -> the field's name in the client's words); SettingsError otherwise."""
    problems = [f"{names.get(role, role)} has {len(sent)} pictures: one is edited per request here; send one"
                for role, sent in pictures.items() if len(sent) != 1]
    if problems:
        raise SettingsError(problems)
    return {role: sent[0] for role, sent in pictures.items()}
