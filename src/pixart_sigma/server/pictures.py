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
    """Form fields (name -> the texts sent) as request values: each name once, a `name[]` list as a list."""
    values: dict[str, Any] = {}
    for name, texts in fields.items():
        if name.endswith("[]"):
            values[name[:-2]] = [form_value(name[:-2], text, typed) for text in texts]
        elif len(texts) > 1:
            raise SettingsError([f"{name[:100]} is sent {len(texts)} times: send each field once"])
        else:
            values[name] = form_value(name, texts[0], typed)
    return values


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
