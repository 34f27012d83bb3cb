"""PNG files remember how they were made: A1111 text plus exact JSON, any language."""

import importlib
import json
import os
import stat
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pixart_sigma import (MetadataError, PixArtSigmaModel, SettingsError, read_settings, reproducible_settings,
                          save_image)
from pixart_sigma.images import (A1111_KEY, JSON_KEY, MAX_TEXT_BYTES, _parse_a1111, a1111_text, attach, batch_settings,
                                 check_output_dir, output_name, safe_stem)

PROMPTS = ["a red circle", "一只在雪地里的红狐狸", "лиса в снегу, «ночь»", "🦊 fox: \"quoted\", comma\nsecond line"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_settings_survive_a_png_round_trip(tiny, tmp_path, prompt):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=7, num_inference_steps=2, negative_prompt="模糊, blurry",
                             scheduler="unipc", guidance_scale=3.5)
    image = model.generate(prompt)[0]
    path = save_image(image, tmp_path / "out.png")
    record = read_settings(path)
    assert record["prompt"] == prompt and record["negative_prompt"] == "模糊, blurry"
    assert record["seed"] == 7 and record["num_inference_steps"] == 2 and record["guidance_scale"] == 3.5
    assert record["scheduler"] == "unipc" and record["dtype"] == "float32" and record["model_name"] == tiny
    assert (record["width"], record["height"]) == (64, 64) and record["version"]
    assert "memory" not in record and record["vae_tiling"] is False  # where it ran is no part of the image
    assert record["text_encoder_dtype"] == "float32"  # T5's own (bfloat16 under dtype=auto on a CPU)
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
    with pytest.raises(MetadataError, match=f"{tmp_path / 'plain.png'} carries no generation settings"):
        read_settings(tmp_path / "plain.png")
    assert issubclass(MetadataError, ValueError)  # callers that caught ValueError keep working


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
    with pytest.raises(OSError, match=f"{target}.*disk full") as error:
        save_image(image, target)
    assert ".partial" not in str(error.value)
    assert not target.exists() and not list(tmp_path.glob(".partial-*"))


# -- crafted files: PNG chunks by hand, so a test controls every byte --------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECORD = {
    "prompt": "a fox, 狐狸: \"quoted\"\nsecond line", "negative_prompt": "blurry, 模糊", "num_inference_steps": 20,
    "guidance_scale": 4.5, "seed": 7, "width": 64, "height": 64, "scheduler": "unipc",
    "use_resolution_binning": True, "max_sequence_length": 300, "model_name": "demo", "model_revision": None,
    "dtype": "float32", "device": "cpu", "batch_index": 1, "batch_seed": 6, "batch_size": 2,
    "sampled_size": [64, 64], "truncated_tokens": 0, "version": "0.1.0",
}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(key: str, text: str, kind: str = "iTXt") -> bytes:
    """One PNG text chunk of the given kind; "iTXt-z" is a compressed iTXt."""
    name = key.encode("latin-1") + b"\0"
    if kind == "tEXt":
        return png_chunk(b"tEXt", name + text.encode("latin-1"))
    if kind == "zTXt":
        return png_chunk(b"zTXt", name + b"\0" + zlib.compress(text.encode("latin-1")))
    if kind == "iTXt":
        return png_chunk(b"iTXt", name + b"\0\0" + b"\0\0" + text.encode())
    return png_chunk(b"iTXt", name + b"\1\0" + b"en\0\0" + zlib.compress(text.encode()))


def crafted_png(before=(), after=(), size=(40000, 40000), idat=b"not really pixels") -> bytes:
    """A PNG whose header declares `size` but whose IDAT is a few bytes: any pixel decoder chokes on it."""
    header = struct.pack(">IIBBBBB", size[0], size[1], 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", header) + b"".join(before) + png_chunk(b"IDAT", idat)
            + b"".join(after) + png_chunk(b"IEND", b""))


def json_png(tmp_path, text: str, name: str = "crafted.png") -> Path:
    path = tmp_path / name
    path.write_bytes(crafted_png([text_chunk(JSON_KEY, text)], size=(64, 64)))
    return path


def open_files() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["tEXt", "zTXt", "iTXt", "iTXt-z"])
@pytest.mark.parametrize("where", ["before IDAT", "after IDAT"])
def test_settings_of_a_huge_png_are_read_without_decoding_pixels(tmp_path, kind, where):
    text = json.dumps(RECORD, ensure_ascii=kind == "tEXt" or kind == "zTXt")
    chunks = [text_chunk(JSON_KEY, text, kind), text_chunk(A1111_KEY, "ignored\nSteps: 3", "tEXt")]
    path = tmp_path / "huge.png"
    path.write_bytes(crafted_png(before=chunks if where == "before IDAT" else (),
                                 after=chunks if where == "after IDAT" else ()))
    with pytest.raises(Image.DecompressionBombError):  # what decoding would do: 1.6 billion pixels
        Image.open(path)
    start = time.perf_counter()
    assert read_settings(path) == RECORD
    assert time.perf_counter() - start < 0.5


def test_a_truncated_png_still_gives_its_settings(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    whole = save_image(attach(Image.fromarray(pixels), RECORD), tmp_path / "whole.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[:len(whole) // 2])  # the text chunks come first, the pixels are cut in half
    before = open_files()
    assert read_settings(cut) == RECORD
    assert open_files() == before


def test_text_chunks_are_bounded(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(crafted_png([text_chunk(JSON_KEY, "x" * (MAX_TEXT_BYTES + 1))], size=(64, 64)))
    with pytest.raises(MetadataError, match=f"{big}.*'{JSON_KEY}'.*over the limit"):
        read_settings(big)
    bomb = tmp_path / "bomb.png"  # 100 MB of spaces compress to 100 KB
    bomb.write_bytes(crafted_png([text_chunk(JSON_KEY, " " * 100_000_000, "zTXt")], size=(64, 64)))
    start = time.perf_counter()
    with pytest.raises(MetadataError, match=f"{bomb}.*'{JSON_KEY}'.*over the limit"):
        read_settings(bomb)
    assert time.perf_counter() - start < 1
    other = tmp_path / "other.png"  # a big chunk we do not read is skipped, not refused
    other.write_bytes(crafted_png([text_chunk("Comment", "x" * 2 * MAX_TEXT_BYTES, "tEXt"),
                                   text_chunk(JSON_KEY, json.dumps(RECORD))], size=(64, 64)))
    assert read_settings(other) == RECORD


def test_a_damaged_settings_chunk_is_a_clear_error(tmp_path):
    chunk = bytearray(text_chunk(JSON_KEY, json.dumps(RECORD), "tEXt"))
    chunk[40] ^= 1  # inside the JSON, past the keyword
    path = tmp_path / "damaged.png"
    path.write_bytes(crafted_png([bytes(chunk)], size=(64, 64)))
    with pytest.raises(MetadataError, match=f"{path}.*'{JSON_KEY}'.*damaged"):
        read_settings(path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_files_are_closed_whatever_happens(tmp_path):
    good = save_image(attach(Image.new("RGB", (8, 8)), RECORD), tmp_path / "good.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    before = open_files()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_settings(good)
        for name in ("plain.png", "plain.jpg", "cut.png"):
            with pytest.raises(MetadataError) as error:
                read_settings(tmp_path / name)
            assert open_files() == before, (name, error.value)


def test_an_image_object_is_read_from_its_info_without_loading_pixels(tmp_path):
    path = save_image(attach(Image.new("RGB", (8, 8)), RECORD), tmp_path / "x.png")
    with Image.open(path) as image:
        image.load = lambda: pytest.fail("read_settings decoded the pixels")
        assert read_settings(image) == RECORD


# -- what is read is validated like anything else --------------------------------------------------

def record_text(**changes) -> str:
    return json.dumps({**RECORD, **changes}, ensure_ascii=False)


@pytest.mark.parametrize("text, fragments", [
    ("[1, 2]", ["must be a JSON object, not a list"]),
    ('"a fox"', ["must be a JSON object, not a string"]),
    ("null", ["must be a JSON object, not null"]),
    ("{", ["not valid JSON"]),
    ("[" * 100_000, ["not valid JSON"]),
    (record_text(batch_size=None), ["batch_size=None", "an integer from 1 to 16"]),
    (record_text(batch_size=True), ["batch_size=True", "an integer"]),
    (record_text(batch_size=17), ["batch_size=17", "from 1 to 16"]),
    (record_text(batch_index=2), ["batch_index=2", "batch_size=2"]),
    (record_text(batch_index=-1), ["batch_index=-1"]),
    (record_text(batch_seed=5), ["seed=7", "batch_seed=5", "batch_index=1"]),
    (record_text(truncated_tokens=-1), ["truncated_tokens=-1"]),
    (record_text(sampled_size=[64]), ["sampled_size=[64]", "two integers"]),
    (record_text(sampled_size="64x64"), ["sampled_size='64x64'", "two integers"]),
    (record_text(model_revision="main"), ["model_revision='main'", "40 hexadecimal"]),
    (record_text(base_revision="x" * 40), [f"base_revision='{'x' * 40}'", "40 hexadecimal"]),
    (record_text(version=5), ["version=5", "a string"]),
    (record_text(guidance_scale=1.0).replace('"guidance_scale": 1.0', '"guidance_scale": Infinity'),
     ["guidance_scale=Infinity", "NaN and Infinity"]),
    (record_text(seed=1).replace('"seed": 1', '"seed": NaN'), ["seed=NaN", "NaN and Infinity"]),
    (record_text(guidance_scale=1.0).replace('"guidance_scale": 1.0', '"guidance_scale": 1e400'),
     ["guidance_scale=1e400", "NaN and Infinity"]),
    (record_text(num_inference_steps=0), ["num_inference_steps=0", "from 1 to 200"]),
    (record_text(num_inference_steps=20.0), ["num_inference_steps=20.0", "an integer"]),
    (record_text(guidance_scale="4.5"), ["guidance_scale='4.5'", "a number"]),
    (record_text(scheduler="magic"), ["scheduler='magic'", "choose one of"]),
    (record_text(width=1001), ["width=1001", "multiple of 8"]),
    (record_text(prompt=""), ["prompt is empty"]),
    (record_text(prompt=None), ["prompt=None", "a string"]),
    (record_text(prompt="a\x07fox"), ["prompt", "U+0007"]),
    (json.dumps({k: v for k, v in RECORD.items() if k != "prompt"}), ["prompt", "missing"]),
])
def test_settings_read_from_a_file_are_validated(tmp_path, text, fragments):
    path = json_png(tmp_path, text)
    with pytest.raises(MetadataError) as error:
        read_settings(path)
    message = str(error.value)
    assert str(path) in message and f"'{JSON_KEY}'" in message, message
    assert all(fragment in message for fragment in fragments), message


def test_valid_records_are_returned_whole_and_unknown_keys_dropped(tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    record = read_settings(json_png(tmp_path, record_text(model_revision=revision, base_revision=revision)))
    assert record["model_revision"] == record["base_revision"] == revision
    older = {k: v for k, v in RECORD.items() if k != "model_revision"}  # files from before model_revision
    assert read_settings(json_png(tmp_path, json.dumps(older), "older.png")) == older
    assert read_settings(json_png(tmp_path, record_text(made_by="someone"), "extra.png")) == RECORD


def test_a1111_settings_are_validated_too(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text(A1111_KEY, "a castle\nSteps: 0, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    with pytest.raises(MetadataError, match=f"{tmp_path / 'a1111.png'}.*num_inference_steps=0 is not valid"):
        read_settings(tmp_path / "a1111.png")
    info = PngImagePlugin.PngInfo()  # what we cannot read (a sampler we do not have, a bad size) is left out
    info.add_text(A1111_KEY, "a castle\nSteps: 30, Sampler: DPM++ SDE Karras, CFG scale: high, Size: big")
    Image.new("RGB", (8, 8)).save(tmp_path / "other.png", pnginfo=info)
    assert read_settings(tmp_path / "other.png") == {"prompt": "a castle", "num_inference_steps": 30}


def test_the_a1111_line_is_parsed_in_linear_time():
    for line in ["Steps: 1, " + "a" * 1500 + " " * 1500, "Steps: 1," + " " * 3000 + "x",
                 'Steps: 1, Model: "' + '\\"' * 1500, "Steps: 1, " + "," * 3000 + ":" * 3000]:
        start = time.perf_counter()
        record = _parse_a1111("a fox\n" + line)
        assert time.perf_counter() - start < 0.1 and record["num_inference_steps"] == 1


def test_a1111_text_round_trips_through_the_parser():
    text = a1111_text(RECORD | {"model_name": "/models/a, b: \"c\"\nd"})
    assert _parse_a1111(text) == {
        "prompt": RECORD["prompt"], "negative_prompt": RECORD["negative_prompt"], "num_inference_steps": 20,
        "scheduler": "unipc", "guidance_scale": 4.5, "seed": 7, "width": 64, "height": 64,
        "model_name": "/models/a, b: \"c\"\nd", "dtype": "float32"}


def test_sampler_names_and_reproducible_keys_derive_from_the_settings(monkeypatch):
    from pixart_sigma import images, settings

    monkeypatch.setitem(settings.SAMPLERS, "new-sampler", settings.Sampler("NewScheduler", "New A"))
    try:
        importlib.reload(images)
        assert images.SAMPLER_NAMES["new-sampler"] == "New A"
        assert images.SAMPLER_NAMES["euler-ancestral"] == "Euler a"
        assert images.REPRODUCIBLE_KEYS == tuple(name for name in settings.Settings.model_fields
                                                 if name not in ("device", "memory", "num_images_per_prompt", "loras"))
    finally:
        monkeypatch.undo()
        importlib.reload(images)


# -- saving ------------------------------------------------------------------------------------

def test_save_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_image(Image.new("RGB", (4, 4)), tmp_path / "shared.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("suffix, format", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_save_writes_the_format_its_suffix_names(tmp_path, suffix, format):
    path = save_image(attach(Image.new("RGB", (16, 16), "red"), RECORD), tmp_path / f"x{suffix}")
    with Image.open(path) as image:
        assert image.format == format
        assert read_settings(image) == RECORD
    assert read_settings(path) == RECORD
    if format != "PNG":  # other tools read A1111's text from EXIF UserComment, UTF-16 after b"UNICODE\0"
        with Image.open(path) as image:
            comment = image.getexif().get_ifd(0x8769)[0x9286]
        assert comment == b"UNICODE\0" + a1111_text(RECORD).encode("utf-16-be")


def test_a_jpeg_too_small_for_the_settings_is_refused_before_writing(tmp_path):
    image = attach(Image.new("RGB", (16, 16)), RECORD | {"prompt": "狐" * 10_000, "negative_prompt": "雪" * 10_000})
    with pytest.raises(SettingsError, match=r"x\.jpg.*64 KB.*\.png or \.webp"):
        save_image(image, tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())
    assert read_settings(save_image(image, tmp_path / "x.webp"))["prompt"] == "狐" * 10_000


@pytest.mark.parametrize("name", ["x.gif", "x.txt", "x", "x.png.tmp"])
def test_save_refuses_a_suffix_it_cannot_write(tmp_path, name):
    with pytest.raises(SettingsError) as error:
        save_image(Image.new("RGB", (4, 4)), tmp_path / name)
    suffix = Path(name).suffix
    assert (f"'{suffix}'" if suffix else "no suffix") in str(error.value)
    assert ".png, .jpg, .jpeg, .webp" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_save_without_overwrite_never_replaces_a_file(tmp_path):
    path = tmp_path / "taken.png"
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match=str(path)):
        save_image(Image.new("RGB", (4, 4)), path, overwrite=False)
    assert path.read_bytes() == b"someone else's" and [p.name for p in tmp_path.iterdir()] == ["taken.png"]
    save_image(Image.new("RGB", (4, 4)), tmp_path / "new.png", overwrite=False)
    save_image(Image.new("RGB", (4, 4)), path)  # the default replaces
    assert Image.open(path).size == (4, 4) and sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "taken.png"]


def test_save_errors_name_the_target_never_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "x.png"

    def refuse(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError) as error:
        save_image(Image.new("RGB", (4, 4)), target)
    assert str(target) in str(error.value) and ".partial" not in str(error.value)


# -- the output folder ---------------------------------------------------------------------------

def test_the_output_folder_is_created_and_checked(tmp_path, monkeypatch):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingsError, match=f"output folder {tmp_path / 'file'} is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(SettingsError, match=f"output folder {tmp_path / 'file' / 'sub'} cannot be created"):
        check_output_dir(tmp_path / "file" / "sub")

    def refuse(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SettingsError, match=f"output folder {tmp_path} is not writable: Permission denied"):
        check_output_dir(tmp_path)
