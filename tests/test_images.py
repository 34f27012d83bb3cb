"""PNG files remember how they were made: A1111 text plus exact JSON, any language."""

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pixart_sigma import PixArtSigmaModel, read_settings, reproducible_settings, save_image
from pixart_sigma.images import a1111_text, batch_settings, output_name, safe_stem

PROMPTS = ["a red circle", "一只在雪地里的红狐狸", "лиса в снегу, «ночь»", "🦊 fox: \"quoted\", comma\nsecond line"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_settings_survive_a_png_round_trip(tiny, tmp_path, prompt):
    # On the CPU, where dtype=auto is float32 (on a GPU it would be bfloat16).
    model = PixArtSigmaModel(model_name=tiny, device="cpu", seed=7, num_inference_steps=2, negative_prompt="模糊, blurry",
                             scheduler="unipc", guidance_scale=3.5)
    image = model.generate(prompt)[0]
    path = save_image(image, tmp_path / "out.png")
    record = read_settings(path)
    assert record["prompt"] == prompt and record["negative_prompt"] == "模糊, blurry"
    assert record["seed"] == 7 and record["num_inference_steps"] == 2 and record["guidance_scale"] == 3.5
    assert record["scheduler"] == "unipc" and record["dtype"] == "float32" and record["model_name"] == tiny
    assert (record["width"], record["height"]) == (64, 64) and record["version"]
    text = Image.open(path).text["parameters"]
    assert text.startswith(prompt) and "Negative prompt: 模糊, blurry" in text
    assert "Steps: 2, Sampler: UniPC, CFG scale: 3.5, Seed: 7, Size: 64x64" in text
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_settings_read_back_make_the_same_pixels(tiny, tmp_path):
    image = PixArtSigmaModel(model_name=tiny, num_inference_steps=3).generate("a fox")[0]
    record = read_settings(save_image(image, tmp_path / "one.png"))
    again = PixArtSigmaModel(**reproducible_settings(record)).generate(record["prompt"])[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "one.png")))


def test_an_image_from_a_batch_is_remade_bit_identical(tiny, tmp_path):
    image = PixArtSigmaModel(model_name=tiny, num_inference_steps=3, num_images_per_prompt=3).generate("a fox")[1]
    record = read_settings(save_image(image, tmp_path / "second.png"))
    settings, index = batch_settings(record)
    assert index == 1 and settings["num_images_per_prompt"] == 3
    again = PixArtSigmaModel(**settings).generate(record["prompt"])[index]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "second.png")))
    alone = PixArtSigmaModel(**reproducible_settings(record)).generate(record["prompt"])[0]
    assert np.abs(np.asarray(alone).astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_a1111_only_pngs_are_read_too(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle\nNegative prompt: fog\nSteps: 30, Sampler: Euler a, CFG scale: 7, "
                                "Seed: 123, Size: 512x768, Model hash: abc, Model: sdxl")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    record = read_settings(tmp_path / "a1111.png")
    assert record == {"prompt": "a castle", "negative_prompt": "fog", "num_inference_steps": 30,
                      "scheduler": "euler-ancestral", "guidance_scale": 7.0, "seed": 123, "width": 512,
                      "height": 768, "model_name": "sdxl"}


def test_a_png_without_settings_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="carries no generation settings"):
        read_settings(tmp_path / "plain.png")


def test_a1111_values_with_separators_are_quoted():
    text = a1111_text({"prompt": "p", "num_inference_steps": 20, "scheduler": "ddim", "guidance_scale": 4.5,
                       "seed": 1, "width": 64, "height": 64, "model_name": "/models/a, b: c"})
    assert 'Model: "/models/a, b: c"' in text and "Sampler: DDIM" in text


@pytest.mark.parametrize("prompt", ["../../etc/passwd", "/abs/path", "a\\b:c*?<>|", "", "…", "CON"])
def test_output_names_are_ours_never_a_path(prompt):
    name = output_name(prompt, 5)
    assert "/" not in name and "\\" not in name and ".." not in name and name.endswith(".png")
    assert all(c.isalnum() or c in "-." for c in name)
    assert safe_stem(prompt)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    image = Image.new("RGB", (4, 4))
    target = tmp_path / "never.png"

    def crash_midway(stream, **kwargs):
        stream.write(b"\x89PNG half a file")
        raise OSError("disk full")

    monkeypatch.setattr(image, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_image(image, target)
    assert not target.exists() and not list(tmp_path.glob(".partial-*"))
