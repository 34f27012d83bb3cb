"""Many prompts from a file, resumable: names keyed by content, never by line number; nothing overwritten.

A prompt's images are named `<slug>-<key>-<k>.png`, where the key hashes the prompt, the settings
that decide its pixels (a LoRA by its SHA-256 and scale, not its name or path), and which occurrence of that same prompt in the file it is. Inserting or
reordering lines changes no name; a rerun skips what is done and makes only what is missing,
with the seed the earlier run drew when the seed is random, so a finished file is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .calls import random_seed
from .devices import dtype_name
from .errors import MetadataError, SettingsError
from .images import read_settings, safe_stem
from .settings import PLACEMENT_SETTINGS, STEP_CACHE_PARAMETERS, STEP_CACHE_SETTINGS, Settings, check_text

MAX_PROMPT_FILE_BYTES = 64 << 20
# Settings added after batch names were fixed: keyed only when set, so earlier runs' names still match
# (LoRAs by their SHA-256 and scale: lora_key).
KEYED_WHEN_SET = {"vae_tiling": False, "compile": False, "loras": [],
                  **{name: Settings.model_fields[name].default for name in STEP_CACHE_SETTINGS}}
COMMENT = "#"
LINE_END = re.compile(r"\r\n|\r|\n")  # as editors break lines; not U+2028 or form feeds


def read_prompt_file(path: os.PathLike | str) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt line; blank lines and # comments skipped; all checked first.

    Lines end at LF, CRLF or CR, as editors show them (a form feed or U+2028 does not end a line);
    a UTF-8 byte order mark is dropped; every problem names the file and the line.
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise SettingsError([f"prompt file {path}: {exc.strerror or exc}"]) from None
    if not stat.S_ISREG(info.st_mode):
        raise SettingsError([f"prompt file {path} is not a regular file"])
    if info.st_size > MAX_PROMPT_FILE_BYTES:
        raise SettingsError([f"prompt file {path} is {info.st_size:,} bytes: at most {MAX_PROMPT_FILE_BYTES:,}"])
    data = path.read_bytes()[:MAX_PROMPT_FILE_BYTES]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SettingsError([f"{path}:{line}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"]) from None
    prompts, problems = [], []
    for number, line in enumerate(LINE_END.split(text), 1):
        prompt = line.strip(" \t")
        if not prompt or prompt.startswith(COMMENT):
            continue
        try:
            prompts.append((number, check_text("prompt", prompt, required=True)))
        except SettingsError as exc:
            problems.append(f"{path}:{number}: {exc}")
    if problems:
        raise SettingsError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    return prompts


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch and the file names of its images."""

    line: int
    prompt: str
    names: tuple[str, ...]

    def missing(self, output_dir: Path) -> list[int]:
        """Indices of this prompt's images not yet in `output_dir`."""
        return [k for k, name in enumerate(self.names) if not (output_dir / name).exists()]

    def earlier_seed(self, output_dir: Path) -> Optional[int]:
        """The first seed an earlier run used for this prompt (from a finished image), if any."""
        for name in self.names:
            path = output_dir / name
            if path.is_file():
                try:
                    record = read_settings(path)
                except MetadataError:
                    continue
                if "batch_seed" in record:
                    return record["batch_seed"]
        return None

    def first_seed(self, seed: int, output_dir: Optional[Path]) -> int:
        """The first seed to make this prompt's images with: `seed`, or for -1 the seed an earlier run drew
        when it left this prompt's images half made (the missing ones then complete its batch), else a new one."""
        if seed != -1:
            return seed
        if output_dir is not None and 0 < len(self.missing(output_dir)) < len(self.names):
            earlier = self.earlier_seed(output_dir)
            if earlier is not None:
                return earlier
        return random_seed()


def content_key(prompt: str, settings: dict[str, Any], occurrence: int) -> str:
    text = json.dumps({"prompt": prompt, "settings": settings, "occurrence": occurrence}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def lora_key(settings: dict[str, Any], loras: Optional[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """What a batch's LoRAs are keyed by: each one's SHA-256 and scale, in order, never its name or path (a
    renamed or moved file makes the same images). `loras`: the records of `settings["loras"]` (LoraUse.record(),
    or mappings with "sha256" and "scale")."""
    given = settings.get("loras") or []
    if loras is None or len(loras) != len(given):
        raise ValueError(f"plan_batch needs the SHA-256 of each of the {len(given)} LoRAs of settings['loras'] "
                         "(loras=[use.record() for use in model.lora_uses(...)])")
    return [{"sha256": lora["sha256"], "scale": float(lora["scale"])} for lora in loras]


def plan_batch(prompts: list[tuple[int, str]], settings: dict[str, Any],
               loras: Optional[Sequence[Mapping[str, Any]]] = None) -> list[BatchItem]:
    """Name every prompt's images from its content. `settings`: the model's validated settings; `loras`: with
    LoRAs set, each one's record (SHA-256 and scale: what names are keyed by, see lora_key)."""
    # Every setting but where it runs decides the pixels; a local model is keyed by its absolute path.
    unread = set(STEP_CACHE_SETTINGS) - {"step_cache", *STEP_CACHE_PARAMETERS[settings["step_cache"]]}
    keyed = {name: settings[name] for name in Settings.field_names()
             if name not in PLACEMENT_SETTINGS and name not in unread and KEYED_WHEN_SET.get(name, ...) != settings[name]}
    if "loras" in keyed:
        keyed["loras"] = lora_key(settings, loras)
    if "checkpoint" in settings:
        keyed["model_name"] = settings["checkpoint"].model_name
    if "torch_dtype" in settings:  # the formats resolved decide the pixels, not "auto" (which differs by machine)
        keyed["dtype"] = dtype_name(settings["torch_dtype"])
        encoder = dtype_name(settings["torch_text_encoder_dtype"])
        keyed.pop("text_encoder_dtype", None)
        if encoder != keyed["dtype"]:  # only then: names from runs with one format stay as they were
            keyed["text_encoder_dtype"] = encoder
    if settings.get("edit"):  # an edit's settings and its pictures' SHA-256 decide the pixels too
        keyed["edit"] = settings["edit"]
    seen: dict[str, int] = {}
    items = []
    for line, prompt in prompts:
        occurrence = seen.get(prompt, 0)
        seen[prompt] = occurrence + 1
        stem = f"{safe_stem(prompt, 32)}-{content_key(prompt, keyed, occurrence)}"
        count = settings["num_images_per_prompt"]
        items.append(BatchItem(line, prompt, tuple(f"{stem}-{k}.png" for k in range(count))))
    return items
