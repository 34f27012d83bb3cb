"""The comparison grid (`pixart-sigma grid`, pixart_sigma.grid): the sheet is its cells under their headers, each
cell is the image a single generate call makes (and --from remakes it), lora_scale 0 is the base model, and bad
axes are refused naming the axis, the value and the rule before anything is made. The demo model, 2 steps."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart_sigma import (MAX_GRID_CELLS, MetadataError, PixArtSigmaModel, SettingsError, make_grid, plan_grid,
                          read_grid, read_settings)
from pixart_sigma.checkpoints import DEMO_DIR
from pixart_sigma.cli import main
from pixart_sigma.lora_formats import write_lora
from test_loras import _random_lora

PROMPT = "a red circle on a blue background"
DEMO = ["--model-name", "demo", "--num-inference-steps", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(image_or_path):
    if isinstance(image_or_path, Image.Image):
        return np.asarray(image_or_path.convert("RGB"))
    with Image.open(image_or_path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def model():
    return PixArtSigmaModel(model_name="demo", num_inference_steps=2)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    config = json.loads((DEMO_DIR / "transformer" / "config.json").read_text())
    write_lora(folder / "style.safetensors", _random_lora(config, 1), "kohya")
    write_lora(folder / "other.safetensors", _random_lora(config, 2), "diffusers")
    return folder


def test_the_sheet_is_its_cells_under_their_headers_and_each_cell_is_a_single_generate(model, tmp_path, capsys):
    code, out, err = run(capsys, "grid", PROMPT, *DEMO, "--x", "guidance_scale=1,4.5", "--y", "seed=1,2,3",
                         "-o", tmp_path, "-q")
    assert code == 0, err
    lines = out.split()
    cells, sheet = [Path(line) for line in lines[:-3]], Path(lines[-3])
    assert lines[-2:] == ["6", "cells"] and len(cells) == 6 and sheet.suffix == ".png"
    grid = read_grid(sheet)
    assert grid["prompt"] == PROMPT
    assert (grid["x"]["name"], grid["x"]["labels"]) == ("guidance_scale", ["1", "4.5"])
    assert (grid["y"]["name"], grid["y"]["values"]) == ("seed", [1, 2, 3])
    boxes = {(cell["row"], cell["column"]): cell for cell in grid["cells"]}
    assert sorted(boxes) == [(r, c) for r in range(3) for c in range(2)]
    with Image.open(sheet) as opened:
        picture = np.asarray(opened.convert("RGB"))
        size = opened.size
    left, top = boxes[0, 0]["box"][:2]
    assert left > 0 and top > 0  # room for the row headers and the title and column headers
    assert size == (left + 2 * 64, top + 3 * 64)  # cells edge to edge, 64 px each, after the headers
    dark = picture.sum(axis=2) < 200
    assert dark[:top, :].any(axis=1).sum() > 10  # a title and column headers are written
    for (row, column), cell in boxes.items():
        l, t, r, b = cell["box"]
        assert (l, t, r, b) == (left + 64 * column, top + 64 * row, left + 64 * (column + 1), top + 64 * (row + 1))
        assert dark[t:b, :left].any() and dark[:top, l:r].any()  # its row's and its column's headers
        path = sheet.parent / cell["file"]
        assert path in cells
        assert np.array_equal(picture[t:b, l:r], pixels(path))
        settings = {"guidance_scale": [1.0, 4.5][column], "seed": [1, 2, 3][row]}
        assert cell["settings"] == settings
        record = read_settings(path)
        assert {key: record[key] for key in settings} == settings and record["prompt"] == PROMPT
        assert np.array_equal(pixels(path), pixels(model.generate(PROMPT, **settings)[0]))
    # --from remakes a cell
    code, out, err = run(capsys, "generate", "--from", sheet.parent / boxes[2, 1]["file"], "-o", tmp_path / "again",
                         "-q")
    assert code == 0, err
    assert np.array_equal(pixels(out.split()[0]), pixels(sheet.parent / boxes[2, 1]["file"]))


def test_a_random_seed_is_drawn_once_for_the_whole_grid_and_one_axis_is_one_row(model, tmp_path):
    plan = plan_grid(PROMPT, {"model_name": "demo", "num_inference_steps": 2}, ("scheduler", ["euler", "ddim"]))
    assert plan.y is None and plan.count == 2
    seeds = {cell["seed"] for row in plan.cells for cell in row}
    assert len(seeds) == 1 and seeds.pop() >= 0
    files = make_grid(model, plan).save(tmp_path)
    assert [read_settings(path)["scheduler"] for path in files.cells[0]] == ["euler", "ddim"]
    assert read_grid(files.sheet)["y"] is None
    with pytest.raises(MetadataError, match="not a grid's sheet"):
        read_grid(files.cells[0][0])


def test_lora_scale_zero_is_the_base_model_and_lora_scale_name_sets_one_lora(model, loras, tmp_path, capsys):
    code, out, err = run(capsys, "grid", PROMPT, *DEMO, "--seed", 5, "--lora-dir", loras, "--lora", "style:0.7",
                         "--lora", "other", "--x", "lora_scale:other=0,1", "--y", "lora_scale:style=0,0.5",
                         "-o", tmp_path, "-q")
    assert code == 0, err
    sheet = Path(out.split()[-3])
    grid = read_grid(sheet)
    cells = {(cell["row"], cell["column"]): sheet.parent / cell["file"] for cell in grid["cells"]}
    scales = {key: [(lora["name"], lora["scale"]) for lora in read_settings(path)["loras"]]
              for key, path in cells.items()}
    assert scales == {(0, 0): [("style", 0.0), ("other", 0.0)], (0, 1): [("style", 0.0), ("other", 1.0)],
                      (1, 0): [("style", 0.5), ("other", 0.0)], (1, 1): [("style", 0.5), ("other", 1.0)]}
    base = pixels(model.generate(PROMPT, seed=5)[0])
    assert np.array_equal(pixels(cells[0, 0]), base)  # both at 0: the base model, bit for bit
    assert not np.array_equal(pixels(cells[0, 1]), base) and not np.array_equal(pixels(cells[1, 0]), base)
    model.lora_dir = loras
    try:
        both = model.generate(PROMPT, seed=5, loras=[{"name": "style", "scale": 0.5}, {"name": "other", "scale": 1.0}])
    finally:
        model.lora_dir = None
    assert np.array_equal(pixels(cells[1, 1]), pixels(both[0]))
    # every LoRA at once, by the scale axis
    code, out, err = run(capsys, "grid", PROMPT, *DEMO, "--seed", 5, "--lora-dir", loras, "--lora", "style",
                         "--x", "lora_scale=0,0.5", "-o", tmp_path / "all", "-q")
    assert code == 0, err
    first = Path(out.split()[0])
    assert np.array_equal(pixels(first), base) and read_settings(first)["loras"][0]["scale"] == 0.0


@pytest.mark.parametrize("flags, expected", [
    (["--x", "seed=1,abc"], "x (seed): seed='abc' is not valid: it must be an integer"),
    (["--x", "guidance_scale=1,99"], "x (guidance_scale): guidance_scale=99.0 is not valid: it must be from 0.0 to 20.0"),
    (["--x", "seed=1", "--y", "width=64,65"], "y (width): width=65 is not valid: it must be a multiple of 8"),
    (["--x", "scheduler=euler,fast"], "x (scheduler): scheduler='fast' is not valid: choose one of"),
    (["--x", "lora_scale=0,1"], "x: lora_scale sets the scale of the LoRAs given, and none is: give LoRAs (--lora"),
    (["--lora", "style", "--x", "lora_scale=0,9"], "x (lora_scale): loras.0.scale=9.0 is not valid: it must be from "
                                                   "-4.0 to 4.0"),
    (["--lora", "style", "--x", "lora_scale:nope=0,1"], "x: lora_scale:nope: no LoRA given is called 'nope'; those "
                                                        "given are style"),
    (["--lora", "style", "--x", "lora_scale=0,1", "--y", "lora_scale:style=0,1"], "both set the LoRAs' scales"),
    (["--x", "model_name=demo"], "x: model_name cannot be an axis: it chooses the weights, which a grid loads once"),
    (["--x", "seed=1", "--y", "dtype=float32,bfloat16"], "y: dtype cannot be an axis"),
    (["--x", "num_images_per_prompt=1,2"], "x: num_images_per_prompt cannot be an axis: a cell is one image"),
    (["--num-images-per-prompt", "2", "--x", "seed=1,2"], "num_images_per_prompt=2 is not valid for a grid"),
    (["--x", "colour=red,blue"], "x: 'colour' is not a setting: an axis is one of negative_prompt,"),
    (["--x", "seed=1,2", "--y", "seed=3"], "y: seed is axis x already"),
    (["--x", "seed"], "x='seed' is not valid: write NAME=V1,V2,..."),
    (["--x", "loras=none"], "x (loras): each value is a list in JSON"),
    (["--x", "seed=" + ",".join(map(str, range(11))), "--y", "num_inference_steps=" + ",".join(["1"] * 10)],
     f"x has 11 values and y 10: 110 cells, at most {MAX_GRID_CELLS}"),
])
def test_bad_axes_are_refused_naming_the_axis_value_and_rule_before_the_model_loads(flags, expected, tmp_path,
                                                                                   capsys, monkeypatch):
    import pixart_sigma.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: pytest.fail("the model loaded before the check"))
    code, out, err = run(capsys, "grid", PROMPT, *DEMO, *flags, "-o", tmp_path / "out")
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and out == ""


def test_every_problem_is_said_at_once():
    with pytest.raises(SettingsError) as error:
        plan_grid(PROMPT, {"model_name": "demo"}, "seed=-5,1", ("guidance_scale", [1.0, "high"]))
    assert error.value.problems == ["x (seed): seed=-5 is not valid: it must be from -1 to 9007199254740991 "
                                    "(-1 draws a random seed)",
                                    "y (guidance_scale): guidance_scale='high' is not valid: it must be a number"]


def test_a_lora_missing_from_the_folder_is_refused_before_the_first_image(loras, tmp_path, capsys):
    code, _, err = run(capsys, "grid", PROMPT, *DEMO, "--lora-dir", loras, "--lora", "missing", "--x",
                       "lora_scale=0,1", "-o", tmp_path, "-q")
    assert code == 2 and "loras.0.name='missing' is not in the LoRA folder" in err and "other, style" in err
    assert not list(tmp_path.rglob("*.png"))


def test_text_values_may_hold_commas_and_list_settings_take_json(model, loras, tmp_path):
    plan = plan_grid(PROMPT, {"model_name": "demo", "num_inference_steps": 2},
                     'negative_prompt="blurry, dark",', 'loras=[[], [{"name": "style", "scale": 0.5}]]')
    assert plan.x.values == ("blurry, dark", None) and plan.x.labels == ("blurry, dark", "(none)")
    assert plan.y.values == ([], [{"name": "style", "scale": 0.5}])
    model.lora_dir = loras
    try:
        grid = make_grid(model, plan)
    finally:
        model.lora_dir = None
    assert read_settings(grid.images[0][0])["negative_prompt"] == "blurry, dark"
    assert "loras" not in read_settings(grid.images[0][1])
    assert read_settings(grid.images[1][1])["loras"][0]["scale"] == 0.5


def test_an_axis_value_with_a_line_break_is_named_not_a_traceback():
    with pytest.raises(SettingsError, match="write them on one line"):
        plan_grid(PROMPT, {"model_name": "demo"}, "negative_prompt=a\nb,c")


def test_read_grid_treats_the_file_as_untrusted(tmp_path):
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(MetadataError, match="not a regular file"):
        read_grid(fifo)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(MetadataError, match="cannot be read"):
        read_grid(tmp_path / "junk.png")
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("pixart_sigma_grid", "[" * 100_000)
    Image.new("RGB", (4, 4)).save(tmp_path / "deep.png", pnginfo=info)
    with pytest.raises(MetadataError):
        read_grid(tmp_path / "deep.png")
