"""Editing pictures on the demo model: image-to-image, inpainting, outpainting, sizes, bad pictures, records.

The demo model draws coloured shapes the checker (demo_world.read / read_shapes) reads back, so each edit is
judged by what it draws, through the public API. float32 is pinned: the figures below were measured in it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pixart_sigma import PixArtSigmaModel, SettingsError, picture_sha256, read_picture, read_settings
from pixart_sigma import demo_world as world
from pixart_sigma.settings import SCHEDULERS

RED_LEFT = "a large red circle on the left on a white background"
BLUE_LEFT = "a large blue circle on the left on a white background"
TWO_SHAPES = "a large red circle on the left and a large blue square on the right on a white background"
GREEN_RIGHT = "a large red circle on the left and a large green triangle on the right on a white background"


@pytest.fixture(scope="module")
def demo():
    return PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", num_inference_steps=20)


@pytest.fixture(scope="module")
def red_left(demo):
    image = demo.generate(RED_LEFT, seed=0)[0]
    assert world.read(image).colour == "red"
    return image


@pytest.fixture(scope="module")
def two_shapes(demo):
    image = demo.generate(TWO_SHAPES, seed=3)[0]
    assert [shape.colour for shape in world.read_shapes(image)[:2]] == ["red", "blue"]
    return image


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def distance(first, second) -> float:
    return float(np.abs(pixels(first) - pixels(second)).mean())


def right_half_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    return mask


# -- image to image -------------------------------------------------------------------------------
def test_image_to_image_follows_the_prompt_more_the_higher_the_strength(demo, red_left):
    steps = []
    redrawn = demo.generate(BLUE_LEFT, image=red_left, strength=0.6, seed=1,
                            on_progress=lambda step, total: steps.append(total))[0]
    reading = world.read(redrawn)
    assert (reading.colour, reading.shape, reading.position) == ("blue", "circle", "left")
    assert steps[-1] == 12  # round(0.6 x 20) steps run, from the picture noised to the 9th
    # One step (strength 0.05) keeps the red: this flat-colour model recolours early (measured: blue from 0.1 on,
    # distance 6.1 at 0.05, 27.5 at 0.1, 34.9 at 0.6 levels on average).
    kept = demo.generate(BLUE_LEFT, image=red_left, strength=0.05, seed=1)[0]
    assert world.read(kept).colour == "red"
    middle = demo.generate(BLUE_LEFT, image=red_left, strength=0.1, seed=1)[0]
    assert distance(kept, red_left) < distance(middle, red_left) <= distance(redrawn, red_left) + 1
    # The picture's own prompt keeps it (measured 2.9 levels at 0.6).
    assert distance(demo.generate(RED_LEFT, image=red_left, strength=0.6, seed=1)[0], red_left) < 8


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_sampler_edits_reproducibly_from_the_picture(demo, red_left, scheduler):
    made = [demo.generate(BLUE_LEFT, image=red_left, strength=0.5, seed=7, scheduler=scheduler,
                          num_inference_steps=8)[0] for _ in range(2)]
    assert made[0].tobytes() == made[1].tobytes()
    assert world.read(made[0]).position == "left"  # started from the picture: the circle stays where it was
    other_seed = demo.generate(BLUE_LEFT, image=red_left, strength=0.5, seed=8, scheduler=scheduler,
                               num_inference_steps=8)[0]
    assert other_seed.tobytes() != made[0].tobytes()


def test_image_k_of_an_edit_batch_uses_seed_plus_k(demo, red_left):
    batch = demo.generate(BLUE_LEFT, image=red_left, strength=0.5, seed=20, num_images_per_prompt=2,
                          num_inference_steps=8)
    alone = demo.generate(BLUE_LEFT, image=red_left, strength=0.5, seed=21, num_inference_steps=8)[0]
    assert [read_settings(image)["seed"] for image in batch] == [20, 21]
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2  # batched sums round differently, by a level or two


# -- inpainting -----------------------------------------------------------------------------------
def test_inpainting_repaints_the_masked_half_and_keeps_the_rest_byte_for_byte(demo, two_shapes):
    painted = demo.generate(GREEN_RIGHT, image=two_shapes, mask=right_half_mask(), strength=1.0, seed=0)[0]
    shapes = world.read_shapes(painted)
    assert any(shape.colour == "green" and shape.position == "right" for shape in shapes), shapes
    assert not any(shape.colour == "blue" for shape in shapes), shapes
    # mask_blur=4: the left 28 columns are farther than 4 pixels from the mask.
    assert np.array_equal(pixels(painted)[:, :28], pixels(two_shapes)[:, :28])
    record = read_settings(painted)
    assert record["mask_sha256"] == picture_sha256(right_half_mask()) and record["mask_blur"] == 4
    assert "Denoising strength: 1.0" in painted.info["parameters"] and "Mask blur: 4" in painted.info["parameters"]


def test_a_transparent_mask_marks_what_to_repaint_as_in_openai_edits(demo, two_shapes):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (32, 0, 64, 64))
    by_alpha = demo.generate(GREEN_RIGHT, image=two_shapes, mask=rgba, strength=1.0, seed=0, num_inference_steps=8)
    by_white = demo.generate(GREEN_RIGHT, image=two_shapes, mask=right_half_mask(), strength=1.0, seed=0,
                             num_inference_steps=8)
    assert by_alpha[0].tobytes() == by_white[0].tobytes()
    inverted = Image.eval(right_half_mask(), lambda value: 255 - value)
    by_invert = demo.generate(GREEN_RIGHT, image=two_shapes, mask=inverted, invert_mask=True, strength=1.0, seed=0,
                              num_inference_steps=8)
    assert by_invert[0].tobytes() == by_white[0].tobytes()


def test_only_masked_works_on_the_masks_box_and_pastes_it_back(demo, two_shapes):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 24, 56, 40))
    painted = demo.generate(GREEN_RIGHT, image=two_shapes, mask=mask, inpaint_area="masked", inpaint_padding=4,
                            strength=1.0, seed=0, num_inference_steps=8)[0]
    assert painted.size == (64, 64)
    record = read_settings(painted)
    assert record["inpaint_area"] == "masked" and record["sampled_size"] == [64, 64]  # the 24x24 box, at 64x64
    near = np.zeros((64, 64), bool)
    near[24 - 4:40 + 4, 40 - 4:56 + 4] = True  # the mask and its blur
    assert np.array_equal(pixels(painted)[~near], pixels(two_shapes)[~near])
    assert not np.array_equal(pixels(painted)[near], pixels(two_shapes)[near])


# -- outpainting ----------------------------------------------------------------------------------
def test_outpainting_grows_the_canvas_and_keeps_the_picture_exact(demo, red_left):
    grown = demo.generate(RED_LEFT, image=red_left, expand=[0, 0, 32, 0], strength=1.0, seed=2)[0]
    assert grown.size == (96, 64)
    assert np.array_equal(pixels(grown)[:, :64], pixels(red_left))
    new_area = pixels(grown)[:, 68:].reshape(-1, 3).mean(axis=0)
    assert np.abs(new_area - np.array(world.PALETTE["white"])).max() < 25  # measured: within 10 of white
    assert read_settings(grown)["expand"] == [0, 0, 32, 0]


def test_noise_fill_draws_each_images_start_from_its_seed(demo, red_left):
    settings = dict(image=red_left, expand=[16, 0, 16, 0], fill="noise", strength=0.6, num_inference_steps=8)
    first, again = (demo.generate(RED_LEFT, seed=5, **settings)[0] for _ in range(2))
    assert first.size == (96, 64) and first.tobytes() == again.tobytes()
    assert np.array_equal(pixels(first)[:, 16:80], pixels(red_left))


# -- sizes and pictures ---------------------------------------------------------------------------
def test_a_size_given_crops_and_resizes_the_picture_and_an_odd_size_needs_one(demo, red_left, tmp_path):
    wide = demo.generate(RED_LEFT, image=red_left, strength=0.3, seed=1, width=128, height=64,
                         num_inference_steps=4)[0]
    assert wide.size == (128, 64)
    odd = red_left.resize((70, 50))
    with pytest.raises(SettingsError, match=r"- width=70 \(the 70x50 canvas\) is not valid.*give width and height"):
        demo.generate(RED_LEFT, image=odd, strength=0.3)
    assert demo.generate(RED_LEFT, image=odd, strength=0.3, width=96, height=64, num_inference_steps=2)[0].size == (96, 64)
    with pytest.raises(SettingsError, match="mask is 32x32 but the image is 64x64"):
        demo.generate(RED_LEFT, image=red_left, mask=Image.new("L", (32, 32), 255))


def test_exif_orientation_is_applied_and_any_mode_becomes_rgb(tmp_path):
    tall = Image.new("RGB", (64, 32), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    tall.save(path, exif=exif)
    assert read_picture(path).size == (32, 64)
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(read_picture(sixteen))[0, 0].tolist() == [255, 255, 255]
    for mode in ("P", "L", "CMYK", "1", "LA"):
        assert read_picture(Image.new(mode, (8, 8))).mode in ("RGB", "RGBA")
    assert read_picture(Image.new("RGBA", (8, 8))).mode == "RGBA"


def picture_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def claiming(png: bytes, side: int) -> bytes:
    """The PNG with its header saying side x side pixels (and a matching checksum)."""
    header = b"IHDR" + side.to_bytes(4, "big") * 2 + png[24:29]
    return png[:12] + header + zlib.crc32(header).to_bytes(4, "big") + png[33:]


def test_bad_pictures_are_refused_with_the_file_named(demo, tmp_path):
    good = png_bytes(Image.new("RGB", (64, 64), (0, 0, 255)))
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    # PNG headers claiming 5,000 x 5,000 and 100,000 x 100,000 pixels: refused before anything is decoded.
    bombs = [claiming(png_bytes(Image.new("L", (1, 1))), side) for side in (5_000, 100_000)]
    cases = {
        "empty.png": (b"", "is empty"),
        "notes.png": (b"just some text, not an image", "not an image"),
        "cut.png": (good[:len(good) // 2], "truncated or damaged"),
        "moving.gif": (animated.getvalue(), r"animated \(2 frames\)"),
        "bomb.png": (bombs[0], "5000x5000 = 25,000,000 pixels: a picture may have at most 16,777,216 pixels"),
        "huge.png": (bombs[1], "far more pixels than the 16,777,216"),
    }
    for name, (data, message) in cases.items():
        path = picture_file(tmp_path, name, data)
        with pytest.raises(SettingsError, match=message) as caught:
            demo.generate(RED_LEFT, image=path)
        assert name in str(caught.value)
    with pytest.raises(SettingsError, match="image=12 is not valid"):
        demo.generate(RED_LEFT, image=12)
    with pytest.raises(SettingsError, match="not a regular file"):
        demo.generate(RED_LEFT, image=tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(SettingsError, match="not a regular file"):
        demo.generate(RED_LEFT, image=tmp_path / "pipe.png")
    assert demo.generate(RED_LEFT, image=good, strength=0.2, num_inference_steps=2)[0].size == (64, 64)


def test_edit_settings_are_checked_and_need_a_picture(demo, red_left):
    for value in (0, 1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(SettingsError, match="strength="):
            demo.generate(RED_LEFT, image=red_left, strength=value)
    with pytest.raises(SettingsError, match="strength, mask apply to edits only: give image="):
        demo.generate(RED_LEFT, strength=0.5, mask=right_half_mask())
    with pytest.raises(SettingsError, match="apply to inpainting: give a mask"):
        demo.generate(RED_LEFT, image=red_left, inpaint_area="masked")
    with pytest.raises(SettingsError, match="mask marks nothing to repaint"):
        demo.generate(RED_LEFT, image=red_left, mask=Image.new("L", (64, 64), 0))
    with pytest.raises(SettingsError, match="grows the 64x64 picture to 2112x64"):
        demo.generate(RED_LEFT, image=red_left, expand=[0, 0, 2048, 0])


# -- the command line ------------------------------------------------------------------------------
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pixart_sigma", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_the_cli_edits_and_remakes_an_edit_only_from_the_same_pictures(two_shapes, tmp_path):
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    two_shapes.save(source)
    right_half_mask().save(mask)
    made = run_cli("generate", GREEN_RIGHT, "--model-name", "demo", "--dtype", "float32", "--image", str(source),
                   "--mask", str(mask), "--strength", "0.9", "--mask-blur", "2", "--num-inference-steps", "6",
                   "--seed", "4", "-q", "-o", "first", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    first = next((tmp_path / "first").glob("*.png"))
    info = run_cli("info", str(first), cwd=tmp_path)
    assert '"strength": 0.9' in info.stdout and '"mask_blur": 2' in info.stdout
    missing = run_cli("generate", "--from", str(first), "-q", "-o", "again", cwd=tmp_path)
    assert missing.returncode == 2 and "give that picture with --image and its mask with --mask" in missing.stderr
    wrong = run_cli("generate", "--from", str(first), "--image", str(first), "--mask", str(mask), "-q", "-o", "again",
                    cwd=tmp_path)
    assert wrong.returncode == 2 and f"the record's {picture_sha256(two_shapes)}" in wrong.stderr
    again = run_cli("generate", "--from", str(first), "--image", str(source), "--mask", str(mask), "-q", "-o", "again",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert next((tmp_path / "again").glob("*.png")).read_bytes() == first.read_bytes()
    stray = run_cli("generate", "x", "--model-name", "demo", "--expand", "0,0,8,0", cwd=tmp_path)
    assert stray.returncode == 2 and "--expand: for editing a picture, give it with --image" in stray.stderr


def test_a_service_can_check_an_edit_before_queueing_it(demo, red_left, tmp_path):
    source = tmp_path / "source.png"
    red_left.save(source)
    prompt, settings = demo.validate_call(BLUE_LEFT, image=source, strength=0.4, expand=[0, 0, 8, 0])
    assert prompt == BLUE_LEFT and settings["strength"] == 0.4 and settings["expand"] == [0, 0, 8, 0]
    assert demo.generate(prompt, image=source, **settings)[0].size == (72, 64)
    with pytest.raises(SettingsError) as caught:  # every problem at once, the pictures' too
        demo.validate_call("", image=tmp_path / "missing.png", strength=2, num_inference_steps=0)
    problems = "\n".join(caught.value.problems)
    assert "prompt" in problems and "num_inference_steps" in problems
    with pytest.raises(SettingsError, match="missing.png' cannot be read: No such file"):
        demo.validate_call(BLUE_LEFT, image=tmp_path / "missing.png")
    assert demo.validate_call(BLUE_LEFT) == demo.validate_call(BLUE_LEFT)  # text to image: no edit settings
    assert "strength" not in demo.validate_call(BLUE_LEFT)[1]


def test_the_editing_docs_examples_run_on_the_demo(tmp_path, monkeypatch):
    from test_docs import ROOT, blocks, commands  # tests/ beside this file

    doc = ROOT / "docs" / "editing.md"
    (code,) = blocks(doc, "python")
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(doc), "exec"), namespace)
    assert world.read(namespace["blue"]).colour == "blue" and namespace["wide"].size == (96, 64)
    namespace["picture"].save(tmp_path / "picture.png")
    namespace["mask"].save(tmp_path / "mask.png")
    for line in commands(blocks(doc, "bash")[0]):
        args = line.split(" ", 1)[1]
        done = subprocess.run(f"{sys.executable} -m pixart_sigma {args} --num-inference-steps 2 -q", shell=True,
                              cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              timeout=300)
        assert done.returncode == 0, (line, done.stderr)
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 3


# -- found by trying to break it ------------------------------------------------------------------
def test_a_thin_mask_is_repainted_whole_and_the_blur_only_reaches_outward(demo):
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    line = Image.new("L", (64, 64), 0)
    line.paste(255, (30, 0, 32, 64))  # 2 pixels wide: less than a latent pixel
    painted = pixels(demo.generate("a black background", image=white, mask=line, strength=1.0, seed=1,
                                   num_inference_steps=8)[0])
    assert 255 - painted[:, 30:32].mean() > 60  # measured 116 levels darker (8 before: the blur faded it inward)
    assert (painted[:, :26] == 255).all() and (painted[:, 36:] == 255).all()  # beyond the 4-pixel blur


def test_an_opaque_rgba_mask_marks_by_its_white_as_a_canvas_export_does(demo, two_shapes):
    canvas_export = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    canvas_export.paste((255, 255, 255, 255), (32, 0, 64, 64))
    by_export = demo.generate(GREEN_RIGHT, image=two_shapes, mask=canvas_export, strength=1.0, seed=0,
                              num_inference_steps=4)
    by_white = demo.generate(GREEN_RIGHT, image=two_shapes, mask=right_half_mask(), strength=1.0, seed=0,
                             num_inference_steps=4)
    assert by_export[0].tobytes() == by_white[0].tobytes()


def test_odd_pictures_are_read_or_refused_as_settings_errors(tmp_path):
    camera = io.BytesIO()  # a camera's MPO JPEG: the picture and a preview, one picture
    Image.new("RGB", (64, 64), (200, 0, 0)).save(camera, "MPO", save_all=True,
                                                  append_images=[Image.new("RGB", (16, 16))])
    assert read_picture(camera.getvalue()).size == (64, 64)
    unit_floats = Image.fromarray(np.full((4, 4), 1.0, np.float32), "F")
    assert np.asarray(read_picture(unit_floats))[0, 0].tolist() == [255, 255, 255]
    assert read_picture(Image.new("LA", (4, 4)).convert("La")).mode == "RGBA"
    with pytest.raises(SettingsError, match="cannot be read"):
        read_picture(str(tmp_path / "bad\0name.png"))


def test_only_masked_keeps_the_boxs_shape_when_a_side_is_held_at_a_bound():
    from pixart_sigma.editing import _masked_box

    strip = Image.new("L", (2048, 2048), 0)
    strip.paste(255, (100, 100, 101, 2000))  # 1 x 1900: the work size is held at 64 wide
    (left, top, right, bottom), (width, height) = _masked_box(strip, 0, 1024)
    assert (width, height) == (64, 2048)
    assert abs((right - left) / (bottom - top) - width / height) < 0.002  # the box grew to the work's ratio
    assert left <= 100 and right >= 101 and 0 <= left and right <= 2048


def test_the_cli_inverts_a_mask_once_and_replays_it(demo, two_shapes, tmp_path):
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    two_shapes.save(source)
    right_half_mask().save(mask)
    made = run_cli("generate", GREEN_RIGHT, "--model-name", "demo", "--dtype", "float32", "--image", str(source),
                   "--mask", str(mask), "--invert-mask", "--strength", "1", "--num-inference-steps", "4", "--seed", "2",
                   "-q", "-o", "first", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    first = next((tmp_path / "first").glob("*.png"))
    library = demo.generate(GREEN_RIGHT, image=two_shapes, mask=right_half_mask(), invert_mask=True, strength=1.0,
                            seed=2, num_inference_steps=4)[0]
    with Image.open(first) as written:
        assert np.array_equal(pixels(written), pixels(library))
    again = run_cli("generate", "--from", str(first), "--image", str(source), "--mask", str(mask), "-q", "-o",
                    "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert next((tmp_path / "again").glob("*.png")).read_bytes() == first.read_bytes()


def test_an_edit_known_only_from_its_a1111_text_asks_for_the_picture_and_replays_its_strength(demo, red_left,
                                                                                              tmp_path):
    source = tmp_path / "source.png"
    red_left.save(source)
    edited = demo.generate(BLUE_LEFT, image=red_left, strength=0.3, seed=9, num_inference_steps=4)[0]
    a1111_only = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", edited.info["parameters"])
    edited.save(a1111_only, pnginfo=info)
    missing = run_cli("generate", "--from", str(a1111_only), "-q", "-o", "again", cwd=tmp_path)
    assert missing.returncode == 2 and "is an edit of a picture: give that picture with --image" in missing.stderr
    again = run_cli("generate", "--from", str(a1111_only), "--image", str(source), "--dtype", "float32", "-q", "-o",
                    "again", cwd=tmp_path)
    assert again.returncode == 0 and "cannot be checked" in again.stderr, again.stderr
    remade = next((tmp_path / "again").glob("*.png"))
    assert read_settings(remade)["strength"] == 0.3
    with Image.open(remade) as image:
        assert np.array_equal(pixels(image), pixels(edited))
