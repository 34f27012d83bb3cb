"""Images that remember how they were made: PNG metadata in and out, safe file names.

Each image carries two text chunks:
- `parameters`: the A1111 text other tools already read (prompt, negative prompt, key: value line);
- `pixart_sigma`: JSON with the exact settings, enough to make the same pixels again.
Pillow writes iTXt (UTF-8) for text outside Latin-1, so any prompt survives the round trip.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any, Union

from PIL import Image, PngImagePlugin

JSON_KEY = "pixart_sigma"
A1111_KEY = "parameters"
SAMPLER_NAMES = {"dpm-solver++": "DPM++ 2M", "sa-solver": "SA-Solver", "euler": "Euler",
                 "euler-ancestral": "Euler a", "ddim": "DDIM", "unipc": "UniPC"}
# Settings that decide the pixels; the rest of the JSON chunk is information.
REPRODUCIBLE_KEYS = ("model_name", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "width",
                     "height", "dtype", "scheduler", "use_resolution_binning", "max_sequence_length")


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if re.search(r"[,:\n\"]", text) else text


def a1111_text(record: dict[str, Any]) -> str:
    """The A1111 `parameters` text for one image's record."""
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    pairs = {
        "Steps": record["num_inference_steps"],
        "Sampler": SAMPLER_NAMES.get(record["scheduler"], record["scheduler"]),
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model_name"],
        "Dtype": record.get("dtype"),
        "Version": f"pixart-sigma {record.get('version')}",
    }
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def attach(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    """Put a record into `image.info` (both chunks), so saving and reading need no side channel."""
    image.info[JSON_KEY] = json.dumps(record, ensure_ascii=False, sort_keys=True)
    image.info[A1111_KEY] = a1111_text(record)
    return image


def png_info(image: Image.Image) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key in (A1111_KEY, JSON_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])  # Pillow picks iTXt when the text is not Latin-1
    return info


def save_image(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    """Write a PNG with its metadata atomically: a crash never leaves a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=png_info(image))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _parse_a1111(text: str) -> dict[str, Any]:
    """Read A1111 `parameters` text (ours or another tool's) into our setting names."""
    lines = text.split("\n")
    last = lines[-1] if len(lines) > 1 and re.match(r"^\s*Steps: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    record: dict[str, Any] = {"prompt": "\n".join(prompt_lines)}
    if negative_lines:
        record["negative_prompt"] = "\n".join(negative_lines)
    pairs = dict(re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last))
    values = {key.strip(): json.loads(value) if value.startswith('"') else value.strip() for key, value in pairs.items()}
    samplers = {name: key for key, name in SAMPLER_NAMES.items()}
    converters = {
        "Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
        "Model": ("model_name", str), "Sampler": ("scheduler", lambda v: samplers.get(v, v)), "Dtype": ("dtype", str),
    }
    for key, (name, convert) in converters.items():
        if key in values:
            try:
                record[name] = convert(values[key])
            except ValueError:
                pass
    if re.fullmatch(r"\d+x\d+", values.get("Size", "")):
        record["width"], record["height"] = (int(v) for v in values["Size"].split("x"))
    return record


def read_settings(source: Union[str, os.PathLike, Image.Image]) -> dict[str, Any]:
    """The settings an image was made with: our JSON chunk, else its A1111 `parameters` text.

    Raises ValueError when the image carries neither.
    """
    image = source if isinstance(source, Image.Image) else Image.open(source)
    info = getattr(image, "text", None) or image.info
    if JSON_KEY in info:
        return json.loads(info[JSON_KEY])
    if A1111_KEY in info:
        return _parse_a1111(info[A1111_KEY])
    name = getattr(image, "filename", None) or "the image"
    raise ValueError(f"{name} carries no generation settings (no '{JSON_KEY}' or '{A1111_KEY}' PNG text chunk)")


def reproducible_settings(record: dict[str, Any]) -> dict[str, Any]:
    """Settings that make this one image again (same starting noise).

    An image from a batch, made alone, can differ by one colour level in a few pixels, because
    batched matrix products round differently; `batch_settings` gives bit-identical pixels.
    """
    return {key: record[key] for key in REPRODUCIBLE_KEYS if key in record}


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
