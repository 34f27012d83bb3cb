"""LoRAs as a server offers them: one folder, names only, listed for clients; and A1111's prompt tags.

- `ServedLoras`: the served LoRA folder (`pixart-sigma serve --lora-dir`, default $PIXART_SIGMA_HOME/loras), the
  only place a request's LoRA names are looked up. `check` refuses a path, or a name the folder lacks, before the
  library reads a file, saying what the folder holds; `listing` reads every LoRA of it against the served
  transformer (name, path inside the folder, layout, ranks, targets, size, SHA-256, or why it cannot be used),
  kept until a file of the folder changes (or `refresh`); `private` takes the server's own path out of a message,
  so no client learns where the folder is.
- `take_tags`: A1111's prompt syntax, `<lora:NAME>` or `<lora:NAME:SCALE>` (`<lyco:...>` too, as A1111 1.5+
  reads it), read out of a prompt: the text without its tags, and each tag's LoRA, in the order written.
  What cannot be honoured is refused naming the tag: a tag without its closing `>`, no name, a scale that is
  not a number, A1111's separate text-encoder and UNet multipliers (`<lora:NAME:TE:UNET>`: a LoRA here changes
  the transformer only), and any LoRA tag in a negative prompt (`negative_tags`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import SettingsError
from ..home import default_lora_dir
from ..loras import SHOWN_NAMES, LoraFile, folder_loras, lora_name, list_loras
from ..settings import MAX_LORA_SCALE, MAX_LORAS, SHORT_HASH_DIGITS, is_plain_lora_name, shown

LISTING_ROUTES = "GET /v1/loras, or A1111's GET /sdapi/v1/loras, lists them"
MAX_METADATA_CHARS = 64 * 1024  # of one LoRA's training metadata in A1111's listing; a larger value is left out

# -- A1111's tags ------------------------------------------------------------------------------------
TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)  # A1111: <(\w+):([^>]+)>, read for its LoRA types
TAG_START = re.compile(r"<(?:lora|lyco):", re.IGNORECASE)
NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
TAG_RULE = (f"write <lora:NAME> or <lora:NAME:SCALE>, SCALE a number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} "
            "(1 when left out)")


@dataclass(frozen=True)
class Tag:
    """One LoRA tag of a prompt: as written, and the `loras` entry it makes."""

    text: str
    name: str
    scale: float

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


MAX_TAGS = 64  # LoRA tags one prompt may hold (a call applies at most MAX_LORAS): more is refused unread


def take_tags(prompt: str, holds: Callable[[], str], field: str = "prompt") -> tuple[str, list[Tag], list[str]]:
    """(the prompt without its LoRA tags, the tags in the order written, problems naming each bad tag).

    A tag goes with the spaces before it; the rest of the text is left as written (then stripped at its ends).
    `holds()` says what the LoRA folder holds, for the problems."""
    tags: list[Tag] = []
    problems: list[str] = []
    held: list[str] = []

    def holds_once() -> str:  # the folder is walked once per prompt, however many tags need it
        if not held:
            held.append(holds())
        return held[0]

    def take(match: re.Match) -> str:
        text = match[0]
        name, *values = [part.strip() for part in match[2].split(":")]
        if not name:
            problems.append(f"{field}: the tag {shown(text)} names no LoRA: {TAG_RULE}, NAME one of this server's "
                            f"LoRAs ({holds_once()})")
        elif len(values) > 1:
            problems.append(f"{field}: the tag {shown(text)} has {len(values)} values after the name: A1111's separate "
                            "text-encoder and UNet multipliers (<lora:NAME:TE:UNET>) have no meaning here, where a "
                            f"LoRA changes the transformer only; write <lora:{name}:SCALE> (1 when left out)")
        elif values and not NUMBER.fullmatch(values[0]):
            problems.append(f"{field}: the tag {shown(text)} has the scale {shown(values[0])}, not a number: {TAG_RULE}")
        else:
            tags.append(Tag(text, name, float(values[0]) if values else 1.0))
        return ""

    starts = 0
    for starts, _ in enumerate(TAG_START.finditer(prompt), 1):
        if starts > MAX_TAGS:
            return prompt, [], [f"{field} holds more than {MAX_TAGS} LoRA tags (<lora:...>): a call applies at most "
                                f"{MAX_LORAS} LoRAs"]
    unclosed = [match.start() for match in TAG_START.finditer(prompt)
                if not TAG.match(prompt, match.start())]
    if unclosed:
        fragment = prompt[unclosed[0]:unclosed[0] + 40]
        more = f" (and {len(unclosed) - 1} more like it)" if len(unclosed) > 1 else ""
        problems.append(f"{field} holds {shown(fragment)}, a LoRA tag without its closing '>'{more}: {TAG_RULE}")
    pieces, end = [], 0
    for match in TAG.finditer(prompt):  # linear: no pattern here backtracks over a long run of spaces
        pieces += [prompt[end:match.start()].rstrip(), take(match)]
        end = match.end()
    return ("".join(pieces) + prompt[end:]).strip(), tags, problems


def negative_tags(negative_prompt: Any, field: str = "negative_prompt") -> list[str]:
    """A negative prompt's LoRA tags, refused: a LoRA changes the whole image, not what to steer away from."""
    if not isinstance(negative_prompt, str):
        return []
    found = [match[0] for match in TAG.finditer(negative_prompt)] or [
        negative_prompt[m.start():m.start() + 40] for m in TAG_START.finditer(negative_prompt)]
    if not found:
        return []
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return [f"{field} holds the LoRA tag {shown(found[0])}{more}: LoRA tags are read from prompt only (a LoRA "
            "changes the whole image, not what to steer away from; A1111 would pass it to the text encoder as "
            "words); move it to prompt, or remove it"]


def tag_renamer(tags: Mapping[int, Tag], given: int, field: str = "prompt") -> Callable[[str], str]:
    """The library's messages about `loras` entry i, when it came from a tag, in the tag's words (the client
    wrote no `loras`): `loras.3.scale=5 ...` becomes `prompt: the tag <lora:x:5>: scale=5 ...`. `given`: the
    entries sent as `loras` itself, before the tags."""
    def rename(problem: str) -> str:
        match = re.match(r"loras\.([0-9]+)\.", problem)
        if match and int(match[1]) in tags:
            return f"{field}: the tag {shown(tags[int(match[1])].text)}: {problem[match.end():]}"
        if tags and problem.startswith("loras has "):
            return problem + (f" ({len(tags)} from <lora:...> tags in {field}" +
                              (f", {given} sent as loras)" if given else ")"))
        return problem

    return rename


# -- the folder ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Listed:
    """One LoRA of the served folder as clients see it; `problem` says why it cannot be used."""

    name: str
    path: str  # inside the folder
    layout: str
    ranks: tuple[int, ...]
    targets: int
    bytes: int
    sha256: str
    problem: Optional[str]
    metadata: dict[str, Any]  # the file's training metadata (safetensors __metadata__), for A1111's listing

    def view(self) -> dict[str, Any]:
        """As GET /v1/loras shows it."""
        shown_fields = {k: v for k, v in asdict(self).items() if k != "metadata"}
        return {**shown_fields, "ranks": list(self.ranks), "short_hash": self.sha256[:SHORT_HASH_DIGITS]}

    def a1111(self) -> dict[str, Any]:
        """As A1111's GET /sdapi/v1/loras shows it (its `path` inside the folder, never the server's own)."""
        return {"name": self.name, "alias": self.name, "path": self.path, "metadata": self.metadata}


LISTING_SCHEMA = {"type": "object", "required": ["loras"], "properties": {"loras": {"type": "array", "items": {
    "type": "object", "required": ["name", "path", "layout", "ranks", "targets", "bytes", "sha256", "short_hash",
                                   "problem"],
    "properties": {"name": {"type": "string", "description": "What a request names it by"},
                   "path": {"type": "string", "description": "Its file or PEFT folder, inside the LoRA folder"},
                   "layout": {"type": "string"}, "ranks": {"type": "array", "items": {"type": "integer"}},
                   "targets": {"type": "integer", "description": "Transformer modules it changes"},
                   "bytes": {"type": "integer"}, "sha256": {"type": "string"},
                   "short_hash": {"type": "string", "description": "A1111's short hash (its first 10 digits)"},
                   "problem": {"type": ["string", "null"], "description": "Why it cannot be used (then the rest is "
                               "empty), or null"}}}}}}
A1111_LISTING_SCHEMA = {"type": "array", "items": {"type": "object", "required": ["name", "alias", "path", "metadata"],
                                                    "properties": {"name": {"type": "string"},
                                                                   "alias": {"type": "string"},
                                                                   "path": {"type": "string"},
                                                                   "metadata": {"type": "object"}}}}


class ServedLoras:
    """The served LoRA folder. `transformer_config()`: the served transformer's config, read when a listing is
    made (the default model's). `local=False`: the folder is on other machines (Ray Serve's replicas), so only
    the form of a name is checked here and `listing` is not available."""

    def __init__(self, folder: Optional[Path] = None, transformer_config: Optional[Callable[[], Mapping]] = None,
                 local: bool = True):
        # Absolute: `private` replaces the folder's text in messages, and "loras" or "." would match other words.
        self.folder = (Path(folder).expanduser() if folder is not None else default_lora_dir()).absolute()
        self.transformer_config = transformer_config
        self.local = local
        self._lock = threading.Lock()  # one listing is read at a time; a second waits and gets it
        self._listed: Optional[tuple[tuple, list[Listed]]] = None  # (the folder's state, its listing)

    # -- names --------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The folder's LoRA files and PEFT folders ([] without a folder); SettingsError without the server's path."""
        if not self.folder.is_dir():
            return []
        try:
            return folder_loras(self.folder)
        except SettingsError as exc:
            raise self.private_error(exc) from None

    def names(self) -> dict[str, list[str]]:
        """Each name a request may give -> its places inside the folder (more than one: ambiguous)."""
        places: dict[str, list[str]] = {}
        for path in self.files():
            places.setdefault(lora_name(path), []).append(str(path.relative_to(self.folder)))
        return places

    def holds(self, names: Optional[Sequence[str]] = None) -> str:
        """What the folder holds, in a few words for an error."""
        if not self.local:
            return "the names are those of the served LoRA folder"
        names = sorted(self.names()) if names is None else sorted(names)
        if not names:
            return ("this server has no LoRAs: its operator puts .safetensors files or PEFT folders in its LoRA folder "
                    "(pixart-sigma serve --lora-dir)")
        more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        return f"this server's LoRAs are {', '.join(names[:SHOWN_NAMES])}{more} ({LISTING_ROUTES})"

    def check(self, value: Any) -> tuple[set[int], list[str]]:
        """A request's `loras`, named against the folder before anything is read: (the entries refused here,
        problems). Entries that are not {"name": text, ...} are left to the library's checks."""
        if not isinstance(value, list) or not value or len(value) > MAX_LORAS:  # too many: the library says so
            return set(), []
        places = self.names() if self.local else None
        refused, problems = set(), []
        for index, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not name.strip():
                continue
            where = f"loras.{index}.name={shown(name)}"
            if not is_plain_lora_name(name):
                holds = f"; {self.holds(places)}" if self.local else ""
                problems.append(f"{where} is not valid here: name a LoRA of this server's LoRA folder by its name "
                                f"(no / or \\, not starting with a dot), never a path{holds}")
            elif places is None:
                continue
            elif name.removesuffix(".safetensors") not in places:
                problems.append(f"{where} is not in this server's LoRA folder: {self.holds(places)}")
            elif len(places[name.removesuffix(".safetensors")]) > 1:
                problems.append(f"{where} is ambiguous: this server's LoRA folder holds "
                                f"{' and '.join(places[name.removesuffix('.safetensors')])}; its operator must "
                                "rename one")
            else:
                continue
            refused.add(index)
        return refused, problems

    # -- the server's own path, kept -------------------------------------------------------------------
    def private(self, text: str) -> str:
        """A message without the folder's place on the server: its files named inside it."""
        for folder in sorted({str(self.folder), str(self.folder.resolve())} - {os.sep}, key=len, reverse=True):
            text = text.replace(f"the LoRA folder {folder}", "this server's LoRA folder")
            text = text.replace(folder + os.sep, "").replace(folder, "this server's LoRA folder")
        return text

    def private_error(self, exc: SettingsError) -> SettingsError:
        return SettingsError([self.private(problem) for problem in exc.problems])

    # -- the listing -----------------------------------------------------------------------------------
    def _state(self) -> tuple:
        """What says the folder changed: each LoRA's place, size and time (a PEFT folder's two files)."""
        state = []
        for path in self.files():
            for part in ((path / "adapter_config.json", path / "adapter_model.safetensors") if path.is_dir()
                         else (path,)):
                try:
                    info = part.stat()
                    state.append((str(part), info.st_size, info.st_mtime_ns, info.st_ino))
                except OSError as exc:
                    state.append((str(part), type(exc).__name__))
        return tuple(state)

    def listing(self, refresh: bool = False) -> list[Listed]:
        """Every LoRA of the folder, read against the served transformer; read again only when the folder
        changed or `refresh` (A1111's refresh-loras). Reads files: call it off the event loop."""
        if not self.local or self.transformer_config is None:
            raise RuntimeError("this server's LoRA folder cannot be listed here")
        with self._lock:
            state = self._state()
            if not refresh and self._listed is not None and self._listed[0] == state:
                return self._listed[1]
            listed = [self._shown(item) for item in list_loras(self.folder, self.transformer_config())] \
                if self.folder.is_dir() else []
            self._listed = (state, listed)
            return listed

    def _shown(self, item) -> Listed:
        problem = self.private(item.problem) if item.problem else None
        metadata = {} if problem else _metadata(LoraFile(item.name, self.folder / item.path).weights)
        return Listed(item.name, item.path, item.layout, tuple(item.ranks), item.targets, item.bytes, item.sha256,
                      problem, metadata)


def _metadata(weights: Path) -> dict[str, Any]:
    """A LoRA file's training metadata as A1111 shows it (values that hold JSON objects decoded), or {}."""
    from ..lora_formats import safetensors_header

    try:
        _, metadata = safetensors_header(weights)
    except Exception:  # listed as usable, so it was read a moment ago; a file changed meanwhile shows none
        return {}
    shown_metadata: dict[str, Any] = {}
    for key, value in metadata.items():
        if len(value) > MAX_METADATA_CHARS:
            continue
        if value.startswith("{"):
            try:
                value = json.loads(value, parse_constant=_no_constant)  # NaN/Infinity: not JSON an answer may carry
            except (ValueError, RecursionError):  # deep nesting: kept as the text it is
                pass
        shown_metadata[key] = value
    return shown_metadata


__all__ = ["ServedLoras", "Listed", "Tag", "take_tags", "negative_tags", "tag_renamer", "LISTING_SCHEMA",
           "A1111_LISTING_SCHEMA"]
