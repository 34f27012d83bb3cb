"""Images that remember how they were made: metadata in and out, safe file names.

Each image carries two texts:
- `parameters`: the A1111 text other tools already read (prompt, negative prompt, key: value line);
- `pixart_sigma`: JSON with the exact settings, enough to make the same pixels again.
A PNG holds them in text chunks (Pillow picks iTXt, UTF-8, for text outside Latin-1). A JPEG or WebP
holds them in EXIF: the A1111 text in UserComment, as A1111 writes it, and the JSON, ASCII-escaped,
in ImageDescription. Reading walks the file's chunks or segments by hand, each bounded, and never
decodes pixels; what is read is validated with the same rules as any other settings.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import stat
import struct
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

from PIL import Image, PngImagePlugin

from .errors import MetadataError, SettingsError
from .settings import (MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, PLACEMENT_SETTINGS, SAMPLERS,
                       SHORT_HASH_DIGITS, STEP_CACHE_PARAMETERS, EditSettings, LoraRecord, Settings, check_text,
                       is_plain_lora_name, parse_settings, shown)

JSON_KEY = "pixart_sigma"
PARTIAL_PREFIX = ".partial-"  # an image being written; never a finished one
A1111_KEY = "parameters"
SAMPLER_NAMES = {name: sampler.a1111_name for name, sampler in SAMPLERS.items()}
# Settings that decide the pixels; the rest of the JSON chunk is information. A record's LoRAs decide them too, but
# they are found by their SHA-256 in the LoRA folder (loras.recorded_loras), never by the name a file gives.
RECORDED_ELSEWHERE = ("num_images_per_prompt", "loras")
REPRODUCIBLE_KEYS = tuple(name for name in Settings.model_fields
                          if name not in PLACEMENT_SETTINGS and name not in RECORDED_ELSEWHERE)
# What a record may hold besides the settings and the prompt; any other key read from a file is dropped.
INFO_KEYS = ("batch_index", "batch_seed", "batch_size", "sampled_size", "truncated_tokens", "model_revision",
             "base_revision", "version", "cpu_threads", "full_transformer_steps")
MAX_CPU_THREADS = 1024
# An edit's record: its settings and what identifies its pictures (the SHA-256 of their pixels, editing.py).
PICTURE_KEYS = ("source_sha256", "mask_sha256")
EDIT_KEYS = tuple(EditSettings.model_fields) + PICTURE_KEYS
RECORD_KEYS = frozenset(Settings.model_fields) | {"prompt"} | frozenset(INFO_KEYS) | frozenset(EDIT_KEYS)

# Bounds on what is read from a file: a record is a few KB (a prompt is at most 10,000 characters).
MAX_TEXT_BYTES = 1 << 20  # one text chunk or EXIF block, and what a compressed chunk may inflate to
MAX_CHUNKS = 100_000  # chunks or segments walked; a 1 GB PNG from libpng has about 130,000
MAX_TRUNCATED_TOKENS = 2 * MAX_PROMPT_CHARS  # T5 makes at most about one token per character
MAX_SAMPLED_SIDE = 4 * MAX_SIDE  # resolution binning may sample a larger size than asked (4096 on the 2K model)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
FORMAT_SIGNATURES = {"PNG": (PNG_SIGNATURE,), "JPEG": (b"\xff\xd8\xff",), "WEBP": (b"RIFF",)}
EXIF_IFD, IMAGE_DESCRIPTION, USER_COMMENT = 0x8769, 0x010E, 0x9286
MAX_JPEG_EXIF_BYTES = 65_533  # one APP1 segment: 65,535 less its length field


# -- writing ---------------------------------------------------------------------------------------

def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r"[,:\n\"]", text) else text


LORA_TAG = re.compile(r"\s*<lora:([^<>\n]+):(-?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)>")  # A1111's prompt syntax


def _lora_tags(loras: list[dict[str, Any]]) -> str:
    return "".join(f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in loras)


def _lora_hashes(loras: list[dict[str, Any]]) -> Optional[str]:
    """A1111's "Lora hashes" value: each LoRA's name and the first 10 hexadecimal digits of its SHA-256."""
    return ", ".join(f"{lora['name']}: {lora['sha256'][:SHORT_HASH_DIGITS]}" for lora in loras) or None


def a1111_text(record: dict[str, Any]) -> str:
    """The A1111 `parameters` text for one image's record (LoRAs as A1111 writes them: tags after the prompt)."""
    loras = record.get("loras") or []
    lines = [record["prompt"] + _lora_tags(loras)]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    pairs = {
        "Steps": record["num_inference_steps"],
        "Sampler": SAMPLER_NAMES.get(record["scheduler"], record["scheduler"]),
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Denoising strength": record.get("strength"),  # an edit's; A1111's names
        "Mask blur": record.get("mask_blur") if record.get("mask_sha256") else None,
        "Lora hashes": _lora_hashes(loras),
        **_step_cache_pairs(record),
        "Model": record["model_name"],
        "Dtype": record.get("dtype"),
        "Version": f"pixart-sigma {record.get('version')}",
    }
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def attach(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    """Put a record into `image.info` (both texts), so saving and reading need no side channel."""
    image.info[JSON_KEY] = json.dumps(record, ensure_ascii=False, sort_keys=True)
    image.info[A1111_KEY] = a1111_text(record)
    return image


def png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key in (A1111_KEY, JSON_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])  # Pillow picks iTXt when the text is not Latin-1
    return info


def exif_bytes(image: Image.Image) -> bytes:
    """The EXIF block carrying `image.info`'s two texts, for a JPEG or WebP."""
    exif = Image.Exif()
    if JSON_KEY in image.info:
        # An EXIF string is ASCII: re-dumping escapes the rest the JSON way, which reads back to the same values.
        exif[IMAGE_DESCRIPTION] = f"{JSON_KEY}:" + json.dumps(json.loads(image.info[JSON_KEY]), sort_keys=True)
    if A1111_KEY in image.info:  # as A1111 writes it (piexif's "unicode" encoding: UTF-16 big-endian)
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + image.info[A1111_KEY].encode("utf-16-be")
    return exif.tobytes()


def _format(path: Path) -> str:
    """The format `path`'s suffix names; SettingsError before anything is written."""
    format = SAVE_FORMATS.get(path.suffix.lower())
    if format is None:
        what = f"its suffix '{path.suffix}' names no format we write" if path.suffix else "it has no suffix"
        raise SettingsError([f"cannot save {path}: {what}; use one of {', '.join(SAVE_FORMATS)}"])
    return format


def _save_options(image: Image.Image, path: Path) -> dict[str, Any]:
    """Pillow's save arguments for the format `path`'s suffix names; SettingsError before anything is written."""
    format = _format(path)
    if format == "PNG":
        return {"format": format, "pnginfo": png_info(image)}
    exif = exif_bytes(image)
    if format == "JPEG" and len(exif) > MAX_JPEG_EXIF_BYTES:
        raise SettingsError([f"cannot save {path}: its settings need {len(exif):,} bytes of EXIF, more than a JPEG's "
                             "64 KB; save it as .png or .webp"])
    return {"format": format, "exif": exif, "quality": 95}


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new empty file next to `path`, open for writing; mode 0o666 so the umask applies (mkstemp: 0o600)."""
    for _ in range(100):
        temporary = path.with_name(f"{PARTIAL_PREFIX}{secrets.token_hex(8)}{path.suffix}")
        try:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name next to {path}")


def _naming(path: Path, error: OSError) -> OSError:
    """The same kind of error, naming the file the caller asked for rather than our temporary file."""
    if error.errno is None:
        return OSError(f"cannot write {path}: {error}")
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}")  # OSError picks the subclass


def save_image(image: Image.Image, path: Union[str, os.PathLike], *, overwrite: bool = True) -> Path:
    """Write `image` with its settings, in the format the suffix names: .png, .jpg/.jpeg or .webp.

    Atomic: the file is written under a temporary name, then renamed, so a crash never leaves a
    half-written file under `path`. With `overwrite=False` an existing file is never replaced:
    FileExistsError instead. A suffix we cannot write is a SettingsError, raised before anything is written.
    """
    path = Path(path)
    options = _save_options(image, path)
    return _publish(path, lambda stream: image.save(stream, **options), overwrite)


def image_bytes(image: Image.Image, suffix: str = ".png") -> bytes:
    """The file `save_image` would write for this suffix (settings inside), as bytes: to send to another machine."""
    stream = io.BytesIO()
    image.save(stream, **_save_options(image, Path(f"image{suffix}")))
    return stream.getvalue()


def save_bytes(data: bytes, path: Union[str, os.PathLike], *, overwrite: bool = True) -> Path:
    """Write an encoded image (from `image_bytes`, perhaps made elsewhere) as `save_image` writes a file.

    Atomic, and with `overwrite=False` never replacing a file, as `save_image`. The bytes must be of
    the format the suffix names (checked by their signature): SettingsError before anything is written.
    """
    path = Path(path)
    format = _format(path)
    if not any(data.startswith(magic) for magic in FORMAT_SIGNATURES[format]):
        raise SettingsError([f"cannot save {path}: the data is not a {format} file ({bytes(data[:8])!r}...)"])
    return _publish(path, lambda stream: stream.write(data), overwrite)


def _publish(path: Path, write: Callable[[BinaryIO], Any], overwrite: bool) -> Path:
    """Have `write` fill a temporary file next to `path`, then give it its name: a rename, or a link that never replaces."""
    temporary: Optional[Path] = None
    published = True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary, handle = _create_temporary(path)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())  # on disk before it has its name: a power cut never leaves half an image
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # unlike a rename, a link fails when `path` exists
            except FileExistsError:
                published = False
    except OSError as error:
        raise _naming(path, error) from error
    finally:
        if temporary is not None:  # gone after a rename; a second name after a link
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    if not published:
        raise FileExistsError(errno.EEXIST, f"{path} exists already: not replaced (overwrite=False)")
    return path


def check_output_dir(path: Union[str, os.PathLike]) -> Path:
    """The output folder, created if missing (parents too) and proven writable: call it before any model loads."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SettingsError([f"output folder {folder} is a file, not a folder"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((parent for parent in folder.parents if parent.exists()), None)
        reason = f"{blocker} is a file" if blocker and not blocker.is_dir() else error.strerror or str(error)
        raise SettingsError([f"output folder {folder} cannot be created: {reason}"]) from None
    try:
        temporary, handle = _create_temporary(folder / "write-test")
        os.close(handle)
        os.unlink(temporary)
    except OSError as error:
        raise SettingsError([f"output folder {folder} is not writable: {error.strerror or error}"]) from None
    return folder


# -- reading: the two texts, found without decoding pixels ---------------------------------------

def _inflate(data: bytes, name: str, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_BYTES + 1)  # bounded: a few KB may inflate to gigabytes
    except zlib.error:
        raise MetadataError(f"{name}: its {where} is damaged (its compressed text does not inflate)") from None
    if len(text) > MAX_TEXT_BYTES:
        raise MetadataError(f"{name}: its {where} is over the limit of {MAX_TEXT_BYTES:,} bytes once inflated")
    if not inflater.eof:
        raise MetadataError(f"{name}: its {where} is damaged (its compressed text is cut short)")
    return text


def _png_chunk_text(kind: bytes, data: bytes, name: str, where: str) -> str:
    """The text of a tEXt (Latin-1), zTXt (compressed Latin-1) or iTXt (UTF-8, maybe compressed) chunk."""
    rest = data.partition(b"\0")[2]  # after the keyword
    if kind == b"tEXt":
        raw, encoding = rest, "latin-1"
    elif kind == b"zTXt":  # compression method byte, then zlib data
        raw, encoding = _inflate(rest[1:], name, where), "latin-1"
    else:  # compression flag, method, language tag NUL, translated keyword NUL, text
        parts = rest[2:].split(b"\0", 2)
        if len(rest) < 2 or len(parts) < 3:
            raise MetadataError(f"{name}: its {where} is damaged (an iTXt chunk without its fields)")
        raw, encoding = (_inflate(parts[2], name, where) if rest[0] else parts[2]), "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise MetadataError(f"{name}: its {where} is damaged (not {encoding} at byte {error.start})") from None


def _png_texts(stream: BinaryIO, name: str) -> dict[str, tuple[str, str]]:
    """Our two text chunks of a PNG, by walking its chunks: pixel data is skipped, never read.

    Text chunks may come before or after the pixels. A truncated file gives what it still holds.
    """
    texts: dict[str, tuple[str, str]] = {}
    stream.seek(len(PNG_SIGNATURE))
    for _ in range(MAX_CHUNKS):
        head = stream.read(8)
        if len(head) < 8:
            break  # the end of the file, maybe cut short
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND" or length > 0x7FFFFFFF:  # the spec's largest chunk; beyond it the file is garbage
            break
        peek = stream.read(min(length, 80)) if kind in PNG_TEXT_CHUNKS else b""  # keyword: 1-79 bytes, NUL
        key = peek.partition(b"\0")[0].decode("latin-1")
        if key not in (JSON_KEY, A1111_KEY) or key in texts:
            stream.seek(length - len(peek) + 4, os.SEEK_CUR)  # the data and its CRC
            continue
        where = f"'{key}' text chunk"
        if length > MAX_TEXT_BYTES:
            raise MetadataError(f"{name}: its {where} is {length:,} bytes, over the limit of {MAX_TEXT_BYTES:,}")
        data = peek + stream.read(length - len(peek))
        crc = stream.read(4)
        if len(data) < length or len(crc) < 4:
            raise MetadataError(f"{name}: its {where} is cut short (the file is truncated)")
        if zlib.crc32(kind + data) != int.from_bytes(crc, "big"):
            raise MetadataError(f"{name}: its {where} is damaged (its checksum does not match)")
        texts[key] = (_png_chunk_text(kind, data, name, where), where)
        if key == JSON_KEY:
            break  # the JSON is all we need
    return texts


def _jpeg_exif(stream: BinaryIO) -> Optional[bytes]:
    """A JPEG's EXIF block: an APP1 segment among the header segments, which all come before the pixels."""
    stream.seek(2)  # past SOI
    for _ in range(MAX_CHUNKS):
        head = stream.read(4)  # 0xFF, marker, big-endian length counting itself
        if len(head) < 4 or head[0] != 0xFF or head[1] in (0xD9, 0xDA):  # the end, or SOS: pixels follow
            return None
        length = int.from_bytes(head[2:], "big")
        if length < 2:  # a length counts its own two bytes: anything less is garbage
            return None
        if head[1] == 0xE1 and length > 8:
            data = stream.read(length - 2)
            if data.startswith(b"Exif\0\0"):  # another APP1 may hold XMP
                return data
        else:
            stream.seek(length - 2, os.SEEK_CUR)
    return None


def _webp_exif(stream: BinaryIO, name: str) -> Optional[bytes]:
    """A WebP's EXIF chunk, by walking its RIFF chunks (four-letter kind, little-endian size, padded to even)."""
    stream.seek(12)  # past "RIFF", the file size and "WEBP"
    for _ in range(MAX_CHUNKS):
        head = stream.read(8)
        if len(head) < 8:
            return None
        kind, size = head[:4], int.from_bytes(head[4:], "little")
        if kind == b"EXIF":
            if size > MAX_TEXT_BYTES:
                raise MetadataError(f"{name}: its EXIF block is {size:,} bytes, over the limit of {MAX_TEXT_BYTES:,}")
            data = stream.read(size)
            if len(data) < size:
                raise MetadataError(f"{name}: its EXIF block is cut short (the file is truncated)")
            return data
        stream.seek(size + size % 2, os.SEEK_CUR)
    return None


def _exif_texts(data: bytes, name: str) -> dict[str, tuple[str, str]]:
    """Our two texts in an EXIF block: the JSON in ImageDescription, the A1111 text in UserComment."""
    exif = Image.Exif()
    try:
        exif.load(data)
        description = exif.get(IMAGE_DESCRIPTION)
        comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception as error:  # Pillow's TIFF reader raises many kinds of error on damaged data
        raise MetadataError(f"{name}: its EXIF block is damaged ({error})") from None
    texts: dict[str, tuple[str, str]] = {}
    prefix = f"{JSON_KEY}:"
    if isinstance(description, str) and description.startswith(prefix):  # cameras put captions there too
        texts[JSON_KEY] = (description[len(prefix):], f"'{JSON_KEY}' EXIF ImageDescription")
    where = f"'{A1111_KEY}' EXIF UserComment"
    try:
        if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
            texts[A1111_KEY] = (comment[8:].decode("utf-16-be"), where)
        elif isinstance(comment, bytes) and comment.startswith(b"ASCII\0\0\0"):
            texts[A1111_KEY] = (comment[8:].decode("ascii"), where)
    except UnicodeDecodeError as error:
        raise MetadataError(f"{name}: its {where} is damaged (not {error.encoding} at byte {error.start})") from None
    return texts


def _file_texts(stream: BinaryIO, name: str) -> dict[str, tuple[str, str]]:
    head = stream.read(12)
    if head.startswith(PNG_SIGNATURE):
        return _png_texts(stream, name)
    if head.startswith(b"\xff\xd8"):
        exif = _jpeg_exif(stream)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        exif = _webp_exif(stream, name)
    else:
        raise MetadataError(f"{name} is not a PNG, JPEG or WebP file")
    return _exif_texts(exif, name) if exif else {}


def _info_texts(info: dict, name: str) -> dict[str, tuple[str, str]]:
    """Our two texts in a Pillow image's `info`: as `attach` put them, or as Pillow read them from the header."""
    texts = {key: (info[key], f"'{key}' text") for key in (JSON_KEY, A1111_KEY) if isinstance(info.get(key), str)}
    if not texts and isinstance(info.get("exif"), bytes):
        texts = _exif_texts(info["exif"], name)
    for text, where in texts.values():
        if len(text) > MAX_TEXT_BYTES:
            raise MetadataError(f"{name}: its {where} is {len(text):,} characters, "
                                f"over the limit of {MAX_TEXT_BYTES:,}")
    return texts


# -- reading: from text to a validated record -----------------------------------------------------

def _a1111_pairs(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value"` as a dict, in one pass over the line: no regex, no backtracking."""
    pairs: dict[str, str] = {}
    i, end = 0, len(line)
    while i < end:
        start = i
        while i < end and line[i] not in ":,":
            i += 1
        if i == end:
            break
        if line[i] == ",":  # a piece without "key:" is no pair
            i += 1
            continue
        key = line[start:i].strip()
        i += 1
        while i < end and line[i] == " ":
            i += 1
        start = i
        if i < end and line[i] == '"':  # a JSON string: up to the first quote that is not escaped
            i += 1
            while i < end and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
            try:
                value = json.loads(line[start:i])
            except ValueError:
                value = line[start:i]
            while i < end and line[i] != ",":
                i += 1
        else:
            while i < end and line[i] != ",":
                i += 1
            value = line[start:i].strip()
        i += 1
        if key:
            pairs.setdefault(key, value)
    return pairs


def _a1111_integer(text: str) -> Optional[int]:
    return int(text) if re.fullmatch(r"-?[0-9]{1,20}", text) else None


def _a1111_number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


# A step cache as A1111-style pairs (A1111 has none of its own): the method and the parameters it reads.
A1111_STEP_CACHE = {"step_cache": "Step cache", "step_cache_threshold": "Step cache threshold",
                    "step_cache_interval": "Step cache interval", "step_cache_warmup": "Step cache warm-up",
                    "step_cache_cooldown": "Step cache cool-down"}


def _step_cache_pairs(record: dict[str, Any]) -> dict[str, Any]:
    method = record.get("step_cache", "off")
    if method == "off" or method not in STEP_CACHE_PARAMETERS:
        return {}
    return {A1111_STEP_CACHE[name]: record.get(name) for name in ("step_cache", *STEP_CACHE_PARAMETERS[method])}


def _parse_a1111(text: str) -> dict[str, Any]:
    """Read A1111 `parameters` text (ours or another tool's) into our setting names; what it cannot read is left out."""
    lines = text.split("\n")
    last = lines[-1] if lines[-1].lstrip().startswith("Steps: ") else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    values = _a1111_pairs(last)
    prompt, loras = _a1111_loras("\n".join(prompt_lines), values.get("Lora hashes", ""))
    record: dict[str, Any] = {"prompt": prompt, **({"loras": loras} if loras else {})}
    if negative_lines:
        record["negative_prompt"] = "\n".join(negative_lines)
    samplers = {name: key for key, name in SAMPLER_NAMES.items()}
    readers = {
        "Steps": ("num_inference_steps", _a1111_integer), "CFG scale": ("guidance_scale", _a1111_number),
        "Seed": ("seed", _a1111_integer), "Model": ("model_name", str), "Dtype": ("dtype", str),
        "Sampler": ("scheduler", samplers.get),  # a sampler we do not have is left out
        "Denoising strength": ("strength", _a1111_number), "Mask blur": ("mask_blur", _a1111_integer),
        A1111_STEP_CACHE["step_cache"]: ("step_cache", lambda text: text if text in STEP_CACHE_PARAMETERS else None),
        A1111_STEP_CACHE["step_cache_threshold"]: ("step_cache_threshold", _a1111_number),
        **{A1111_STEP_CACHE[name]: (name, _a1111_integer)
           for name in ("step_cache_interval", "step_cache_warmup", "step_cache_cooldown")},
    }
    for key, (name, read) in readers.items():
        value = read(values[key]) if key in values else None
        if value is not None:
            record[name] = value
    size = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", values.get("Size", ""))
    if size:
        record["width"], record["height"] = int(size[1]), int(size[2])
    return record


def _a1111_loras(prompt: str, hashes: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its `<lora:name:scale>` tags, and those LoRAs with their hashes from "Lora hashes".

    Only LoRAs with a plain name and a hash are taken out (another tag stays prompt text: nothing could find its file).
    """
    known = {}
    for pair in hashes.split(","):
        name, _, digest = pair.rpartition(":")
        if name.strip():
            known[name.strip()] = digest.strip()
    loras: list[dict[str, Any]] = []

    def take(match: re.Match) -> str:
        name = match[1]
        if not (is_plain_lora_name(name) and re.fullmatch(f"[0-9a-f]{{{SHORT_HASH_DIGITS},}}", known.get(name, ""))):
            return match[0]
        loras.append({"name": name, "scale": float(match[2]), "sha256": known[name]})
        return ""

    return LORA_TAG.sub(take, prompt).rstrip(" "), loras


class _NonFinite:
    """NaN, Infinity or an overflowing number in JSON, kept aside so the error can name its field."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _json_number(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _parse_json(text: str, name: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_NonFinite, parse_float=_json_number)
    except RecursionError:
        raise _invalid(name, where, ["it is not valid JSON: nested too deeply"]) from None
    except ValueError as error:  # also an integer of more than 4,300 digits
        raise _invalid(name, where, [f"it is not valid JSON: {error}"]) from None


def _invalid(name: str, where: str, problems: list[str]) -> MetadataError:
    head = f"{name}: the settings in its {where} are not valid"
    if len(problems) == 1:
        return MetadataError(f"{head}: {problems[0]}")
    return MetadataError("\n".join([f"{head}:"] + [f"  - {problem}" for problem in problems]))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float, _NonFinite)):
        return "a number"
    return {list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _info_problems(record: dict[str, Any]) -> list[str]:
    """The rules of the informational fields: what `generate` writes, nothing else."""
    problems: list[str] = []

    def integer(key: str, low: int, high: int, note: str = "") -> None:
        value = record.get(key)
        if key in record and (type(value) is not int or not low <= value <= high):  # type(): True is no integer here
            problems.append(f"{key}={value!r} is not valid: it must be an integer from {low} to {high}{note}")

    size = record.get("batch_size", 1)
    integer("batch_size", 1, MAX_IMAGES)
    if type(size) is int and 1 <= size <= MAX_IMAGES:
        integer("batch_index", 0, size - 1, f" (batch_size={size})")
    integer("batch_seed", 0, MAX_SEED)
    integer("truncated_tokens", 0, MAX_TRUNCATED_TOKENS)
    if not problems and all(type(record.get(key)) is int for key in ("seed", "batch_seed", "batch_index")):
        if record["seed"] != record["batch_seed"] + record["batch_index"]:
            problems.append(f"seed={record['seed']} does not match batch_seed={record['batch_seed']} + "
                            f"batch_index={record['batch_index']}: image k of a batch has the seed batch_seed + k")
    sampled = record.get("sampled_size")
    if "sampled_size" in record and not (
            isinstance(sampled, list) and len(sampled) == 2
            and all(type(side) is int and 1 <= side <= MAX_SAMPLED_SIDE for side in sampled)):
        problems.append(f"sampled_size={sampled!r} is not valid: it must be a list of two integers from 1 to "
                        f"{MAX_SAMPLED_SIDE} (width, height)")
    for key in ("model_revision", "base_revision"):  # absent in files from before they were recorded
        revision = record.get(key)
        if revision is not None and not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
            problems.append(f"{key}={revision!r} is not valid: it must be a 40 hexadecimal digit commit hash, "
                            "or null for a local checkpoint")
    integer("cpu_threads", 1, MAX_CPU_THREADS)  # on a CPU the thread count changes the rounding
    integer("full_transformer_steps", 0, MAX_STEPS)  # what a step cache left to run in full
    for key in PICTURE_KEYS:
        digest = record.get(key)
        if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            problems.append(f"{key}={shown(digest)} is not valid: it must be a SHA-256 (64 hexadecimal digits) or null")
    if "version" in record:
        try:
            check_text("version", record["version"], required=False)
        except SettingsError as error:
            problems += error.problems
    return problems


def _validated(raw: Any, name: str, where: str) -> dict[str, Any]:
    """The record with every known field checked by the library's own rules; unknown keys are dropped."""
    if not isinstance(raw, dict):
        raise _invalid(name, where, [f"it must be a JSON object, not {_kind(raw)}"])
    problems: list[str] = []
    record = {key: value for key, value in raw.items() if key in RECORD_KEYS}
    for key, value in list(record.items()):
        if isinstance(value, _NonFinite) or (isinstance(value, list) and any(isinstance(v, _NonFinite) for v in value)):
            problems.append(f"{key}={value!r} is not valid: NaN and Infinity are not accepted, a number must be finite")
            del record[key]
    for model in (Settings, EditSettings, LoraRecord):  # a record's loras have their hashes: LoraRecord's rules
        given = {key: value for key, value in record.items() if key in model.model_fields
                 and (model is LoraRecord or key not in LoraRecord.model_fields)}
        try:
            settings = parse_settings(given, model)
            dumped = settings.model_dump()
            record.update({key: dumped[key] for key in given})
        except SettingsError as error:
            problems += error.problems
    if "prompt" in record:
        try:
            check_text("prompt", record["prompt"], required=True)
        except SettingsError as error:
            problems += error.problems
    elif "prompt" not in raw:
        problems.append("prompt is missing: an image's settings must say what it shows")
    problems += _info_problems(record)
    if problems:
        raise _invalid(name, where, problems)
    return record


def read_settings(source: Union[str, os.PathLike, Image.Image]) -> dict[str, Any]:
    """The validated settings an image was made with: our JSON, else its A1111 `parameters` text.

    A path is read without decoding pixels (PNG, JPEG or WebP); a Pillow image is read from its `info`.
    Raises MetadataError (a ValueError) naming the file, the field and the rule when the image carries
    no settings or settings that are malformed or invalid.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "the image"
        texts = _info_texts(source.info, name)
    else:
        name = os.fsdecode(source)
        try:
            if not stat.S_ISREG(os.stat(source).st_mode):  # a FIFO would block forever, a device never end
                raise MetadataError(f"{name} is not a regular file: it cannot be an image")
            with open(source, "rb") as stream:
                texts = _file_texts(stream, name)
        except OSError as exc:
            raise MetadataError(f"{name}: {exc.strerror or exc}") from None
    if JSON_KEY in texts:
        text, where = texts[JSON_KEY]
        return _validated(_parse_json(text, name, where), name, where)
    if A1111_KEY in texts:
        text, where = texts[A1111_KEY]
        return _validated(_parse_a1111(text), name, where)
    raise MetadataError(f"{name} carries no generation settings (no '{JSON_KEY}' or '{A1111_KEY}' text chunk "
                        "or EXIF field)")


def reproducible_settings(record: dict[str, Any]) -> dict[str, Any]:
    """Settings that make this one image again (same starting noise).

    An image from a batch, made alone, can differ by one colour level in a few pixels, because
    batched matrix products round differently; `batch_settings` gives bit-identical pixels.
    """
    return {key: record[key] for key in REPRODUCIBLE_KEYS if key in record}


def edit_settings(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """An edit's settings and picture hashes as recorded (None for text-to-image): what `--from` asks the pictures
    for. A record read from A1111 text alone has an edit's settings ("Denoising strength") but no hashes."""
    found = {key: record[key] for key in EDIT_KEYS if record.get(key) is not None}
    return found if found.keys() & set(EditSettings.model_fields) else None


def batch_settings(record: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Settings that remake the whole batch an image came from, and the image's index in it: same pixels."""
    settings = reproducible_settings(record)
    size = int(record.get("batch_size", 1))
    if size > 1 and "batch_seed" in record:
        settings.update(seed=record["batch_seed"], num_images_per_prompt=size)
        return settings, int(record.get("batch_index", 0))
    return settings, 0


def safe_stem(prompt: str, limit: int = 48) -> str:
    """A file-name-safe slug of a prompt: ASCII letters, digits and dashes only; never a path."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-").lower()
    return slug[:limit].rstrip("-") or "image"


def output_name(prompt: str, seed: int) -> str:
    """A new file name chosen by us: time, seed and a slug of the prompt."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{seed}-{safe_stem(prompt)}.png"
