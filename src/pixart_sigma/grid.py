"""A comparison grid, as A1111's X/Y plot is used to judge a LoRA or a setting: one prompt, cells that vary one
or two settings, every cell saved with its record, and one labelled contact sheet.

- `plan_grid(prompt, settings, x, y=None)`: the axes read and checked before any weight loads. An axis is
  a per-call setting with its values (`"seed=1,2,3"`, or `("seed", [1, 2, 3])`), or `lora_scale` (the scale
  of every LoRA of the `loras` setting) or `lora_scale:NAME` (of that one). Each value is checked by the
  setting's own rules, and every problem names the axis, the value and the rule. A random seed is drawn
  here, once, so every cell of a row or column starts from the same noise.
- `make_grid(model, plan)`: every cell checked against the loaded model (its LoRAs found and read) before
  the first image, then one `model.generate` call per cell: a cell is the image that call makes.
- `Grid.save(folder)`: each cell written by `save_image` (its record inside: `--from` remakes it) and the
  contact sheet: the prompt as a title, column headers the x values, row headers the y values, and the
  grid (axes, cells, their boxes on the sheet and files) as PNG text under GRID_KEY.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from . import __version__
from .calls import random_seed
from .errors import MetadataError, SettingsError
from .images import safe_stem, save_bytes, save_image
from .model import validate
from .settings import LOAD_SETTINGS, Settings, check_text, parse_settings, shown

MAX_GRID_TEXT_CHARS = 4 * 1024 * 1024  # a sheet's grid text: 100 cells' settings are far less
MAX_GRID_CELLS = 100  # x values times y values: each cell is one generation (10 x 10, as X/Y plots go)
# Pillow warns that a larger picture may be a decompression bomb when it opens it: a sheet viewers open.
MAX_SHEET_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
LORA_SCALE = "lora_scale"  # the axis of every LoRA's scale; lora_scale:NAME is one LoRA's
_SCALES = "lora scales"  # in an axis value: {index of a given LoRA: its scale}; never a setting's name
NOT_AXES = {"num_images_per_prompt": "a cell is one image: put seed on an axis to compare seeds"}
GRID_KEY = "pixart_sigma_grid"  # the sheet's PNG text: the grid as JSON
MAX_LABEL_CHARS = 40  # of a header; longer values are cut with "..."
MAX_TITLE_LINES = 3
FONT_SIZES = (10, 48)  # a header's font, from 4% of the smallest cell side within these
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)

AxisInput = Union[str, tuple[str, Sequence[Any]]]


def axis_names() -> list[str]:
    """What may be an axis: the per-call settings (but those in NOT_AXES), and lora_scale."""
    return [name for name in Settings.per_call_names() if name not in NOT_AXES] + [LORA_SCALE, f"{LORA_SCALE}:NAME"]


@dataclass(frozen=True)
class Axis:
    """One axis: its name as written (`seed`, `lora_scale:my-style`), its checked values and their headers."""

    name: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class GridPlan:
    """A checked grid: the prompt, its axes and each cell's `generate` overrides, rows (y) of columns (x)."""

    prompt: str
    x: Axis
    y: Optional[Axis]
    cells: tuple[tuple[dict[str, Any], ...], ...]
    sizes: tuple[tuple[tuple[int, int], ...], ...]  # each cell's (width, height)

    @property
    def count(self) -> int:
        return sum(len(row) for row in self.cells)


# -- reading an axis ---------------------------------------------------------------------------------------
def _split(where: str, text: str) -> tuple[str, Union[str, list]]:
    """(name, values) of `NAME=V1,V2,...`: values as text, or a JSON list when they start with [."""
    name, equals, values = text.partition("=")
    name, values = name.strip(), values.strip()
    if not equals or not name or not values:
        raise SettingsError([f"{where}={shown(text)} is not valid: write NAME=V1,V2,... (e.g. seed=1,2,3 or "
                             f"{LORA_SCALE}=0,0.5,1)"])
    if not values.startswith("["):
        return name, values
    try:
        parsed = json.loads(values)
    except (ValueError, RecursionError) as exc:
        raise SettingsError([f"{where} ({name}): {shown(values)} is not a valid JSON list ({exc}): write "
                             "[V1, V2, ...]"]) from None
    if not isinstance(parsed, list):
        raise SettingsError([f"{where} ({name}): {shown(values)} is not a list: write [V1, V2, ...]"])
    return name, parsed


def _typed(kind: Optional[str], token: str) -> Any:
    """A text value as the setting's type, when it reads as one; else the text, for the setting's rule to refuse."""
    text = token.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        return token
    if kind == "boolean":
        return {"true": True, "yes": True, "on": True, "1": True,
                "false": False, "no": False, "off": False, "0": False}.get(text.lower(), token)
    return token


def _label(value: Any) -> str:
    if value is None:
        text = "(none)"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str):
        text = value if value.strip() else "(none)"
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 3] + "..."


def _lora_matches(name: str, loras: Sequence[Mapping[str, Any]]) -> list[int]:
    """Which of the given LoRAs `lora_scale:NAME` means: by the name given, or a path's file or folder name."""
    def known_as(given: str) -> set[str]:
        last = given.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return {given, last, last.removesuffix(".safetensors")}

    return [index for index, item in enumerate(loras) if name in known_as(item["name"])]


@dataclass
class _AxisCheck:
    where: str
    name: str
    overrides: list[dict[str, Any]] = field(default_factory=list)  # one per value
    labels: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)


def _read_axis(where: str, given: AxisInput, raw: dict[str, Any], base: Settings,
               problems: list[str]) -> Optional[_AxisCheck]:
    """An axis read and each value checked by its setting's rules, problems added; None when it cannot be read."""
    if isinstance(given, str):
        try:
            name, values = _split(where, given)
        except SettingsError as exc:
            problems += exc.problems
            return None
    elif isinstance(given, (tuple, list)) and len(given) == 2 and isinstance(given[0], str) \
            and isinstance(given[1], (list, tuple)):
        name, values = given[0], list(given[1])
    else:
        problems.append(f"{where}={shown(given)} is not valid: give \"NAME=V1,V2,...\" or (NAME, [V1, V2, ...])")
        return None
    scale_of = name.partition(":")[2] if name.startswith(f"{LORA_SCALE}:") else None
    setting = "loras" if name == LORA_SCALE or scale_of is not None else name
    refusal = None
    if name in LOAD_SETTINGS:
        refusal = (f"{name} cannot be an axis: it chooses the weights, which a grid loads once; make one grid per "
                   f"{name}")
    elif name in NOT_AXES:
        refusal = f"{name} cannot be an axis: {NOT_AXES[name]}"
    elif setting != "loras" and name not in Settings.per_call_names():
        refusal = f"{shown(name)} is not a setting: an axis is one of {', '.join(axis_names())}"
    elif setting == "loras" and name != "loras" and not base.loras:
        refusal = (f"{name} sets the scale of the LoRAs given, and none is: give LoRAs (--lora NAME, or the loras "
                   "setting)")
    elif scale_of is not None:
        given_names = ", ".join(item.name for item in base.loras)
        found = _lora_matches(scale_of, base.model_dump()["loras"])
        if len(found) != 1:
            refusal = (f"{name}: {'no' if not found else 'more than one'} LoRA given is called {shown(scale_of)}; "
                       f"those given are {given_names}")
    if refusal:
        problems.append(f"{where}: {refusal}")
        return None
    kind = Settings.field_schemas()[setting].get("type") if setting in Settings.model_fields else None
    if isinstance(values, str):
        if kind in ("array", "object") and name == setting:
            problems.append(f"{where} ({name}): each value is {Settings.json_hint(name)}: give the axis as a JSON "
                            f"list of them, e.g. {name}=[[], {json.dumps(Settings.field_schemas()[name]['examples'][0])}]")
            return None
        try:
            tokens = next(csv.reader([values], skipinitialspace=True))
        except csv.Error as exc:  # a line break or NUL inside a value
            problems.append(f"{where} ({name}): its values cannot be read ({exc}): write them on one line")
            return None
        values = [_typed("number" if setting == "loras" else kind, token) for token in tokens]
    if not values:
        problems.append(f"{where} ({name}) has no values: give at least one")
        return None
    if len(values) > MAX_GRID_CELLS:
        problems.append(f"{where} ({name}) has {len(values)} values: a grid has at most {MAX_GRID_CELLS} cells")
        return None
    axis = _AxisCheck(where, name)
    loras = base.model_dump()["loras"]
    scaled = ([_lora_matches(scale_of, loras)[0]] if scale_of is not None else list(range(len(loras))))
    for value in values:
        if setting == "loras" and name != "loras":
            override = {"loras": [{**item, "scale": value} if index in scaled else item
                                  for index, item in enumerate(loras)]}
        else:
            override = {name: value}
        try:
            checked = parse_settings({**raw, **override}).model_dump()
        except SettingsError as exc:
            problems += [f"{where} ({name}): {problem}" for problem in exc.problems if problem not in problems]
            continue
        if name != setting:  # lora_scale: the scales of the LoRAs it names, laid over the others' at each cell
            value = checked["loras"][scaled[0]]["scale"]
            axis.overrides.append({_SCALES: {index: value for index in scaled}})
        else:
            value = checked[setting]
            if name == "seed" and value == -1:
                value = random_seed()  # drawn once: the header shows the seed the cells use
            axis.overrides.append({setting: value})
        axis.values.append(value)
        axis.labels.append(_label(value))
    return axis


def _clashes(x: _AxisCheck, y: _AxisCheck) -> Optional[str]:
    def changes(axis: _AxisCheck) -> str:
        return "loras" if axis.name.startswith(LORA_SCALE) else axis.name

    if x.name == y.name:
        return f"y: {y.name} is axis x already: give each axis another setting"
    if changes(x) == changes(y) == "loras" and (x.name in ("loras", LORA_SCALE) or y.name in ("loras", LORA_SCALE)):
        return (f"y: {y.name} and axis x ({x.name}) both set the LoRAs' scales: vary one LoRA's scale on each axis "
                f"({LORA_SCALE}:NAME), or all of them on one")
    return None


def plan_grid(prompt: str, settings: Mapping[str, Any], x: AxisInput, y: Optional[AxisInput] = None) -> GridPlan:
    """A grid checked before any weight loads: the prompt, the settings (as `PixArtSigmaModel(**settings)` takes
    them), the axes (`"seed=1,2,3"`, `'negative_prompt="blurry, dark",'`, `'loras=[[], [{"name": "style"}]]'`,
    or `("seed", [1, 2, 3])`). SettingsError lists every problem, each naming the axis, the value and the rule."""
    prompt = check_text("prompt", prompt, required=True)
    raw = dict(settings)
    values = validate(raw)  # the settings' own problems first, as generate says them
    base = parse_settings(raw)
    problems: list[str] = []
    if values["num_images_per_prompt"] != 1:
        problems.append(f"num_images_per_prompt={values['num_images_per_prompt']} is not valid for a grid: "
                        f"{NOT_AXES['num_images_per_prompt']}")
    axes = [_read_axis(where, given, raw, base, problems) for where, given in (("x", x), ("y", y))
            if where == "x" or given is not None]
    if len(axes) == 2 and all(axes) and (clash := _clashes(*axes)):
        problems.append(clash)
    if problems or not all(axes):
        raise SettingsError(problems)
    columns, rows = axes[0], (axes[1] if len(axes) == 2 else None)
    cells_count = len(columns.overrides) * (len(rows.overrides) if rows else 1)
    if cells_count > MAX_GRID_CELLS:
        counts = f"x has {len(columns.overrides)} values" + (f" and y {len(rows.overrides)}" if rows else "")
        raise SettingsError([f"{counts}: {cells_count} cells, at most {MAX_GRID_CELLS}; give fewer values"])
    seed = values["seed"] if values["seed"] >= 0 else random_seed()  # one noise for every cell
    loras = base.model_dump()["loras"]
    cells, sizes = [], []
    for row in (rows.overrides if rows else [{}]):
        cells.append(tuple(_cell(seed, loras, row, column) for column in columns.overrides))
        sizes.append(tuple(((cell.get("width") or values["width"]), (cell.get("height") or values["height"]))
                           for cell in cells[-1]))
    plan = GridPlan(prompt, *(Axis(a.name, tuple(a.values), tuple(a.labels)) if a else None
                              for a in (columns, rows)), tuple(cells), tuple(sizes))
    width, height = _Layout(plan).size
    if width * height > MAX_SHEET_PIXELS:
        raise SettingsError([f"the grid's sheet would be {width}x{height} = {width * height:,} pixels: at most "
                             f"{MAX_SHEET_PIXELS:,} (what image viewers open); give fewer values or a smaller size"])
    return plan


def _cell(seed: int, loras: list[dict[str, Any]], *parts: dict[str, Any]) -> dict[str, Any]:
    """A cell's overrides: the grid's seed, then each axis's value (lora_scale's laid over the LoRAs given)."""
    cell: dict[str, Any] = {"seed": seed}
    scales: dict[int, float] = {}
    for part in parts:
        scales.update(part.get(_SCALES, {}))
        cell.update({key: value for key, value in part.items() if key != _SCALES})
    if scales:
        cell["loras"] = [{**item, "scale": scales.get(index, item["scale"])} for index, item in enumerate(loras)]
    return cell


# -- making the cells --------------------------------------------------------------------------------------
def _cell_name(plan: GridPlan, row: int, column: int) -> str:
    parts = [f"{plan.x.name}={plan.x.labels[column]}"] + ([f"{plan.y.name}={plan.y.labels[row]}"] if plan.y else [])
    return "cell " + ", ".join(parts)


def make_grid(model, plan: GridPlan, on_cell: Optional[Callable[[int, int], None]] = None, cancel=None) -> "Grid":
    """Every cell of `plan` made by `model` (a PixArtSigmaModel): all of them checked first (the LoRAs found and
    read), then one `model.generate(prompt, **cell)` each. `on_cell(done, total)` after each; `cancel` as for
    generate."""
    where: dict[str, list[str]] = {}  # problem -> the cells that have it
    for r, row in enumerate(plan.cells):
        for c, cell in enumerate(row):
            try:
                model.validate_call(plan.prompt, **cell)
            except SettingsError as exc:
                for problem in exc.problems:
                    where.setdefault(problem, []).append(_cell_name(plan, r, c))
    problems: list[str] = []
    for problem, cells in where.items():  # a problem of every cell (a LoRA missing) is said once, plainly
        problems += [problem] if len(cells) == plan.count else [f"{cell}: {problem}" for cell in cells]
    if problems:
        raise SettingsError(problems)
    images, done = [], 0
    for row in plan.cells:
        images.append([])
        for cell in row:
            images[-1].append(model.generate(plan.prompt, cancel=cancel, **cell)[0])
            done += 1
            if on_cell is not None:
                on_cell(done, plan.count)
    return Grid(plan, tuple(tuple(row) for row in images))


@dataclass(frozen=True)
class GridFiles:
    sheet: Path
    cells: tuple[tuple[Path, ...], ...]  # rows of columns, as the plan's cells


@dataclass(frozen=True)
class Grid:
    """A made grid: its plan and images (rows of columns), each carrying its record."""

    plan: GridPlan
    images: tuple[tuple[Image.Image, ...], ...]

    def record(self, files: Optional[Sequence[Sequence[str]]] = None) -> dict[str, Any]:
        """What the sheet carries: the prompt, the axes, and each cell's settings, box on the sheet and file."""
        layout = _Layout(self.plan)
        cells = []
        for r, row in enumerate(self.plan.cells):
            for c, cell in enumerate(row):
                cells.append({"row": r, "column": c, "settings": cell, "box": list(layout.box(r, c)),
                              **({"file": files[r][c]} if files else {})})
        axis = lambda a: {"name": a.name, "values": list(a.values), "labels": list(a.labels)} if a else None  # noqa: E731
        return {"prompt": self.plan.prompt, "x": axis(self.plan.x), "y": axis(self.plan.y), "cells": cells,
                "version": __version__}

    def sheet(self, files: Optional[Sequence[Sequence[str]]] = None) -> Image.Image:
        """The contact sheet: title, headers and cells; the grid's record in `info[GRID_KEY]`."""
        layout = _Layout(self.plan)
        sheet = Image.new("RGB", layout.size, BACKGROUND)
        layout.draw(ImageDraw.Draw(sheet))
        for r, row in enumerate(self.images):
            for c, image in enumerate(row):
                sheet.paste(image.convert("RGB"), layout.box(r, c)[:2])
        sheet.info[GRID_KEY] = json.dumps(self.record(files), ensure_ascii=False, sort_keys=True)
        return sheet

    def save(self, output_dir: Union[str, Path]) -> GridFiles:
        """Write the cells (each with its record) into a new folder and the sheet beside it, named
        `<time>-grid-<prompt>`; nothing is ever replaced."""
        folder = Path(output_dir)
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-grid-{safe_stem(self.plan.prompt, 32)}"
        for counter in range(1000):
            stem = base if counter == 0 else f"{base}-{counter}"
            if (folder / f"{stem}.png").exists():
                continue
            try:
                (folder / stem).mkdir(parents=True)  # claims the name: a second run picks the next
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free name for a grid {base} in {folder}")
        names = [[f"{stem}/{r}-{c}.png" for c in range(len(row))] for r, row in enumerate(self.images)]
        cells = tuple(tuple(save_image(image, folder / name, overwrite=False) for image, name in zip(row, row_names))
                      for row, row_names in zip(self.images, names))
        sheet = self.sheet(names)
        info = PngImagePlugin.PngInfo()
        info.add_text(GRID_KEY, sheet.info[GRID_KEY])
        data = io.BytesIO()
        sheet.save(data, format="PNG", pnginfo=info)
        return GridFiles(save_bytes(data.getvalue(), folder / f"{stem}.png", overwrite=False), cells)


def read_grid(path: Union[str, Path]) -> dict[str, Any]:
    """The grid a sheet carries (Grid.record): its prompt, axes and cells; MetadataError naming the file if none."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever
            raise MetadataError(f"{path} is not a regular file: it cannot be a grid's sheet")
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(GRID_KEY)
    except MetadataError:
        raise
    except Exception as exc:  # not an image, damaged, a bomb, text chunks over Pillow's limits: never a traceback
        raise MetadataError(f"{path} cannot be read as a grid's sheet ({type(exc).__name__}: {exc})"[:500]) from None
    if text is None:
        raise MetadataError(f"{path} is not a grid's sheet: it has no '{GRID_KEY}' text")
    if len(text) > MAX_GRID_TEXT_CHARS:
        raise MetadataError(f"{path}: its '{GRID_KEY}' text is over {MAX_GRID_TEXT_CHARS:,} characters")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MetadataError(f"{path}: its '{GRID_KEY}' text is not JSON this reader takes ({exc})"[:500]) from None


# -- the sheet's layout ------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


class _Layout:
    """Where everything goes: the title, the column and row headers, each cell centred in its column and row."""

    def __init__(self, plan: GridPlan):
        sides = [side for row in plan.sizes for size in row for side in size]
        self.font = _font(max(FONT_SIZES[0], min(FONT_SIZES[1], round(min(sides) * 0.04))))
        ascent, descent = self.font.getmetrics()
        self.line = ascent + descent
        self.pad = max(2, self.line // 3)
        self.plan = plan
        heads = self.line + 2 * self.pad
        self.widths = [max(max(row[c][0] for row in plan.sizes), self._width(plan.x.labels[c]) + 2 * self.pad)
                       for c in range(len(plan.x.labels))]
        self.heights = [max(max(size[1] for size in row), heads) for row in plan.sizes]
        self.left = (max(self._width(label) for label in plan.y.labels) + 2 * self.pad) if plan.y else 0
        width = self.left + sum(self.widths)
        axes = f"x: {plan.x.name}" + (f"    y: {plan.y.name}" if plan.y else "")
        self.title = self._wrap(plan.prompt, width - 2 * self.pad) + [axes]
        self.top = len(self.title) * self.line + 2 * self.pad
        self.size = (max(width, self._width(axes) + 2 * self.pad), self.top + heads + sum(self.heights))

    def _width(self, text: str) -> int:
        return int(round(self.font.getlength(text)))

    def _wrap(self, text: str, width: int) -> list[str]:
        """The prompt in lines that fit the sheet, MAX_TITLE_LINES at most (the last cut with ...)."""
        words = " ".join(text.split())
        per_line = max(8, int(width / max(1.0, self.font.getlength("abcdefghij") / 10)))
        lines = textwrap.wrap(words, per_line) or [""]
        while len(lines) > 1 and any(self._width(line) > width for line in lines) and per_line > 8:
            per_line -= 2
            lines = textwrap.wrap(words, per_line)
        if len(lines) > MAX_TITLE_LINES:
            lines = lines[:MAX_TITLE_LINES]
            lines[-1] = lines[-1][:max(0, per_line - 3)] + "..."
        return lines

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """The cell's box on the sheet (left, top, right, bottom), centred in its column and row."""
        width, height = self.plan.sizes[row][column]
        left = self.left + sum(self.widths[:column]) + (self.widths[column] - width) // 2
        top = self.top + self.line + 2 * self.pad + sum(self.heights[:row]) + (self.heights[row] - height) // 2
        return left, top, left + width, top + height

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        for index, line in enumerate(self.title):
            draw.text((self.pad, self.pad + index * self.line), line, fill=INK, font=self.font)
        x = self.left
        for label, width in zip(self.plan.x.labels, self.widths):
            draw.text((x + (width - self._width(label)) // 2, self.top + self.pad), label, fill=INK, font=self.font)
            x += width
        if self.plan.y:
            y = self.top + self.line + 2 * self.pad
            for label, height in zip(self.plan.y.labels, self.heights):
                draw.text((self.pad, y + (height - self.line) // 2), label, fill=INK, font=self.font)
                y += height


__all__ = ["MAX_GRID_CELLS", "MAX_SHEET_PIXELS", "GRID_KEY", "LORA_SCALE", "Axis", "GridPlan", "Grid", "GridFiles",
           "axis_names", "plan_grid", "make_grid", "read_grid"]
