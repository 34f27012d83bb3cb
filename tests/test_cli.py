"""The command line: generate, --from, batch (resumable), schema, info; bad input exits 2 without a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart_sigma import read_settings
from pixart_sigma.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def written(out):
    return [line.split("  ")[0] for line in out.strip().splitlines()]


def test_generate_writes_pngs_and_prints_their_seeds(tiny, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "a red circle", "--model-name", tiny, "--seed", 5,
                       "--num-images-per-prompt", 2, "--num-inference-steps", 3, "-o", tmp_path, "-q")
    assert code == 0
    files = written(out)
    assert len(files) == 2 and "seed=5" in out and "seed=6" in out
    assert [read_settings(f)["seed"] for f in files] == [5, 6]
    assert all(Image.open(f).size == (64, 64) for f in files)


def test_every_setting_is_a_flag(tiny, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "a fox", "--model-name", tiny, "--negative-prompt", "blur",
                       "--num-inference-steps", 2, "--guidance-scale", 3.5, "--device", "CPU", "--seed", 0,
                       "--width", 96, "--height", 64, "--num-images-per-prompt", 1, "--dtype", "float32",
                       "--scheduler", "ddim", "--no-use-resolution-binning", "--max-sequence-length", 100,
                       "-o", tmp_path, "-q")
    assert code == 0
    record = read_settings(written(out)[0])
    assert record["negative_prompt"] == "blur" and record["guidance_scale"] == 3.5 and record["seed"] == 0
    assert (record["width"], record["height"]) == (96, 64) and record["scheduler"] == "ddim"
    assert record["use_resolution_binning"] is False and record["max_sequence_length"] == 100


def test_generate_from_a_png_makes_the_same_pixels(tiny, tmp_path, capsys):
    _, out, _ = run(capsys, "generate", "a blue square", "--model-name", tiny, "--num-inference-steps", 3,
                    "--num-images-per-prompt", 3, "-o", tmp_path / "first", "-q")
    source = written(out)[2]
    code, out, err = run(capsys, "generate", "--from", source, "--model-name", tiny, "-o", tmp_path / "again", "-q")
    seed = read_settings(source)["seed"]  # the third of its batch: what the line says is what it makes
    assert code == 0 and f"from {source}: model_name={tiny!r}, seed={seed}" in err
    again = written(out)
    assert len(again) == 1
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(source)))
    assert read_settings(again[0])["seed"] == read_settings(source)["seed"]


def test_from_replays_the_number_formats_resolved_when_the_image_was_made(tiny, tmp_path, capsys, monkeypatch):
    import pixart_sigma.devices as devices

    # A CPU without native bfloat16: dtype=auto is float32 there, with the T5 encoder in bfloat16.
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)
    _, out, _ = run(capsys, "generate", "a blue square", "--model-name", tiny, "--num-inference-steps", 3,
                    "--seed", 11, "-o", tmp_path / "first", "-q")
    source = written(out)[0]
    record = read_settings(source)
    assert (record["dtype"], record["text_encoder_dtype"]) == ("float32", "bfloat16") and record["cpu_threads"] >= 1
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)  # remade where auto would pick bfloat16
    code, out, _ = run(capsys, "generate", "--from", source, "--model-name", tiny, "-o", tmp_path / "again", "-q")
    assert code == 0
    again = read_settings(written(out)[0])
    assert (again["dtype"], again["text_encoder_dtype"]) == ("float32", "bfloat16")
    assert np.array_equal(np.asarray(Image.open(written(out)[0])), np.asarray(Image.open(source)))


def test_from_says_when_this_machine_cannot_run_the_recorded_formats(tiny, tmp_path, capsys):
    from pixart_sigma import save_image

    _, out, _ = run(capsys, "generate", "a cat", "--model-name", tiny, "--num-inference-steps", 1, "-o", tmp_path, "-q")
    made = Image.open(written(out)[0])
    made.load()
    record = json.loads(made.text["pixart_sigma"])
    record.update(dtype="float16", text_encoder_dtype="float16", device="cuda:0")  # as a GPU made it
    made.info["pixart_sigma"] = json.dumps(record)
    save_image(made, tmp_path / "gpu.png")
    code, _, err = run(capsys, "generate", "--from", tmp_path / "gpu.png", "--model-name", tiny, "--device", "cpu",
                       "-o", tmp_path / "again")
    assert code == 2 and "was made with dtype='float16'" in err and "on cuda:0" in err
    assert "use float32 (the closest" in err and "--text-encoder-dtype" in err and "Traceback" not in err


def test_a_png_cannot_choose_a_local_folder_to_load(tiny, tmp_path, capsys):
    _, out, _ = run(capsys, "generate", "a cat", "--model-name", tiny, "--num-inference-steps", 1, "-o", tmp_path, "-q")
    code, out, err = run(capsys, "generate", "--from", written(out)[0], "-o", tmp_path / "again", "-q")
    assert code == 2 and "a local folder" in err and f"--model-name {tiny!r}" in err
    assert not (tmp_path / "again").exists()


def test_a_png_may_choose_the_demo_and_says_so_even_when_quiet(tmp_path, capsys):
    _, out, _ = run(capsys, "generate", "a red circle", "--model-name", "demo", "--seed", 3,
                    "--num-inference-steps", 2, "-o", tmp_path, "-q")
    code, out, err = run(capsys, "generate", "--from", written(out)[0], "-o", tmp_path / "again", "-q")
    assert code == 0 and "model_name='demo'" in err and "seed=3" in err


@pytest.mark.parametrize("record, fragment", [
    ("[1, 2]", "must be a JSON object"), ('"text"', "must be a JSON object"), ("null", "must be a JSON object"),
    ('{"prompt": "x", "seed": 1, "batch_size": null}', "batch_size"),
    ('{"prompt": "x", "seed": Infinity}', "Infinity"),
    ('{"prompt": "x", "seed": 1, "batch_size": 2, "batch_index": 5, "batch_seed": 1}', "batch_index"),
])
def test_crafted_metadata_is_a_clear_error_naming_the_file(tmp_path, capsys, record, fragment):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("pixart_sigma", record)
    path = tmp_path / "crafted.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    for command in (["generate", "--from", path, "-o", tmp_path / "out"], ["info", path]):
        code, out, err = run(capsys, *command)
        assert code == 2 and "crafted.png" in err and fragment in err and "Traceback" not in err, (command, err)
        assert not out and not (tmp_path / "out").exists()


def test_the_output_folder_is_checked_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    from pixart_sigma import engine

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    loads = engine.load_count
    for command in ("generate", "batch"):
        prompts = tmp_path / "p.txt"
        prompts.write_text("a cat\n")
        first = ["a cat"] if command == "generate" else [prompts]
        code, _, err = run(capsys, command, *first, "--model-name", "demo", "-o", blocker / "sub", "-q")
        assert code == 2 and str(blocker) in err and ".partial" not in err
    assert engine.load_count == loads


def test_batch_is_resumable(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n# a comment\na green triangle\n一只猫\n", encoding="utf-8")
    args = ["batch", prompts, "--model-name", tiny, "--num-inference-steps", 2, "--seed", 1, "-o", tmp_path / "out", "-q"]
    code, out, err = run(capsys, *args)
    assert code == 0 and len(written(out)) == 3 and "3 prompt(s) generated, 0 already done" in err
    assert sorted(read_settings(f)["prompt"] for f in written(out)) == sorted(["a red circle", "a green triangle", "一只猫"])
    first = written(out)
    (tmp_path / "out" / first[1].split("/")[-1]).unlink()
    code, out, err = run(capsys, *args)
    assert code == 0 and written(out) == [first[1]] and "1 prompt(s) generated, 2 already done" in err


def _folder(path):
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(path.glob("*.png"))}


def test_batch_names_follow_content_so_inserting_a_line_changes_nothing(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\n", encoding="utf-8")
    args = ["batch", prompts, "--model-name", tiny, "--num-inference-steps", 1, "--num-images-per-prompt", 2,
            "-o", tmp_path / "out", "-q"]
    assert run(capsys, *args)[0] == 0
    before = _folder(tmp_path / "out")
    prompts.write_text("a blue square\na red circle\na green triangle\n", encoding="utf-8")
    code, out, err = run(capsys, *args)
    after = _folder(tmp_path / "out")
    assert code == 0 and "1 prompt(s) generated, 2 already done" in err
    assert len(after) == 6 and all(after[name] == pixels for name, pixels in before.items())
    assert all("blue-square" in line for line in written(out))


def test_batch_resume_with_random_seeds_never_overwrites_and_completes_the_same_batch(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na red circle\n", encoding="utf-8")  # the same prompt twice: two batches
    args = ["batch", prompts, "--model-name", tiny, "--num-inference-steps", 2, "--num-images-per-prompt", 3,
            "-o", tmp_path / "out", "-q"]
    assert run(capsys, *args)[0] == 0
    before = _folder(tmp_path / "out")
    assert len(before) == 6
    names = sorted(before)
    (tmp_path / "out" / names[1]).unlink()
    (tmp_path / "out" / names[2]).unlink()
    code, out, err = run(capsys, *args)
    after = _folder(tmp_path / "out")
    assert code == 0 and sorted(written(out)) == sorted(str(tmp_path / "out" / n) for n in names[1:3])
    assert after == before  # the missing images are remade from the earlier run's seed, the others untouched


def test_prompt_files_are_read_as_editors_show_them(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red circle\r\nline\u2028same line\n".encode("utf-8"))
    code, out, _ = run(capsys, "batch", prompts, "--model-name", tiny, "--num-inference-steps", 1,
                       "-o", tmp_path / "out", "-q")
    assert code == 0
    assert sorted(read_settings(f)["prompt"] for f in written(out)) == ["a red circle", "line\u2028same line"]


@pytest.mark.parametrize("content, fragment", [
    (b"fine\nbad \xff byte\n", "prompts.txt:2: not valid UTF-8"),
    (b"fine\nform\x0cfeed\n", "prompts.txt:2"),
])
def test_bad_prompt_files_name_the_file_and_line(tiny, tmp_path, capsys, content, fragment):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    code, _, err = run(capsys, "batch", prompts, "--model-name", tiny, "-o", tmp_path / "out", "-q")
    assert code == 2 and fragment in err and "Traceback" not in err


def test_batch_checks_every_line_before_generating(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("fine\nbad\x07line\n", encoding="utf-8")
    code, out, err = run(capsys, "batch", prompts, "--model-name", tiny, "-o", tmp_path / "out", "-q")
    assert code == 2 and "prompts.txt:2" in err and "U+0007" in err
    assert not (tmp_path / "out").exists()


def test_models_lists_the_known_checkpoints(capsys, hub_cache):
    code, out, _ = run(capsys, "models")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert code == 0 and "ready" in lines["demo"] and "ready" in lines["PixArt-alpha/PixArt-Sigma-XL-2-512-MS"]
    assert "not downloaded (about 2.4 GB)" in lines["PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"]
    code, out, _ = run(capsys, "models", "--json")
    rows = {row["model_name"]: row for row in json.loads(out)}
    assert rows["demo"]["complete"] and rows["demo"]["size_bytes"] > 1e6 and rows["demo"]["native_size"] == 64
    code, out, _ = run(capsys, "models", "-v")
    assert "hf download PixArt-alpha/PixArt-Sigma-XL-2-2K-MS" in out


def test_schema_prints_the_json_schema(capsys):
    code, out, _ = run(capsys, "schema")
    schema = json.loads(out)
    assert code == 0 and schema["properties"]["num_inference_steps"]["default"] == 20


def test_info_prints_the_settings(tiny, tmp_path, capsys):
    _, out, _ = run(capsys, "generate", "ünïcode prompt", "--model-name", tiny, "--seed", 9,
                    "--num-inference-steps", 2, "-o", tmp_path, "-q")
    code, out, _ = run(capsys, "info", written(out)[0])
    record = json.loads(out)
    assert code == 0 and record["prompt"] == "ünïcode prompt" and record["seed"] == 9


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "x", "--width", "1001"], "width=1001"),
    (["generate", "x", "--guidance-scale", "nan"], "guidance_scale=nan"),
    (["generate", "x", "--seed", "-2"], "seed=-2"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "x", "--model-name", "no/such-model"], "neither a known checkpoint"),
    (["generate"], "give a PROMPT"),
    (["info", "/does/not/exist.png"], "No such file"),
    (["batch", "/does/not/exist.txt"], "No such file"),
])
def test_bad_input_exits_2_with_the_library_message(tiny, argv, fragment, capsys, tmp_path):
    if "--model-name" not in argv and argv[0] == "generate":
        argv = argv + ["--model-name", tiny]
    code, _, err = run(capsys, *argv, *(["-o", tmp_path] if argv[0] != "info" else []))
    assert code == 2 and fragment in err and "Traceback" not in err and err.startswith("error:")


def test_python_dash_m_works(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pixart_sigma", "generate", "a cat", "--model-name", tiny,
                             "--seed", "1", "--num-inference-steps", "2", "-o", str(tmp_path), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "seed=1" in result.stdout and list(tmp_path.glob("*.png"))
    bad = subprocess.run([sys.executable, "-m", "pixart_sigma", "generate", "x", "--model-name", tiny,
                          "--num-inference-steps", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "num_inference_steps=0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_fifo_or_folder_given_as_an_image_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.png")
    for target in (tmp_path / "fifo.png", tmp_path):
        for command in (["info", str(target)], ["generate", "--from", str(target), "-o", str(tmp_path / "o")]):
            result = subprocess.run([sys.executable, "-m", "pixart_sigma", *command], capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 2 and "not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_prompt_files_with_old_mac_line_endings_are_one_prompt_a_line(tmp_path):
    from pixart_sigma.batch import read_prompt_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\ra blue square\r\n# comment\ra green triangle")
    assert [p for _, p in read_prompt_file(prompts)] == ["a red circle", "a blue square", "a green triangle"]


def test_messages_quote_a_huge_value_shortly(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", "--model-name", "demo", "--seed", "9" * 4000, "-o", tmp_path)
    assert code == 2 and "seed=" in err and len(err) < 400


def test_batch_with_several_prompts_per_call_makes_the_same_files(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green triangle\na blue square\na red circle\na yellow star\n", encoding="utf-8")
    common = ["batch", prompts, "--model-name", tiny, "--num-inference-steps", 2, "--num-images-per-prompt", 2,
              "--seed", 4, "-q"]
    assert run(capsys, *common, "-o", tmp_path / "one")[0] == 0
    code, out, err = run(capsys, *common, "--prompts-per-call", 3, "-o", tmp_path / "three")
    assert code == 0 and "5 prompt(s) generated, 0 already done" in err
    one, three = (sorted((tmp_path / name).glob("*.png")) for name in ("one", "three"))
    assert [p.name for p in one] == [p.name for p in three] and len(one) == 10
    for a, b in zip(one, three):
        assert read_settings(a) | {"version": None} == read_settings(b) | {"version": None}
        difference = np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16)
        assert np.abs(difference).max() <= 1
    (tmp_path / "three" / three[3].name).unlink()  # resumable as before: only the missing image is made
    code, out, err = run(capsys, *common, "--prompts-per-call", 3, "-o", tmp_path / "three")
    assert code == 0 and written(out) == [str(tmp_path / "three" / three[3].name)]
    assert "1 prompt(s) generated, 4 already done" in err
    for bad in ("0", "abc"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in common] + ["--prompts-per-call", bad, "-o", str(tmp_path / "zero")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "--prompts-per-call:" in err and "is not valid" in err and bad in err


def test_batch_says_a_call_is_too_big_before_loading_the_model(tiny, tmp_path, capsys):
    from pixart_sigma import engine

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n")
    loads = engine.load_count
    code, _, err = run(capsys, "batch", prompts, "--model-name", tiny, "--width", 2048, "--height", 2048,
                       "--num-images-per-prompt", 2, "--prompts-per-call", 3, "-o", tmp_path / "out", "-q")
    assert code == 2 and "2048x2048x2x3" in err and "prompts per call" in err
    code, _, err = run(capsys, "batch", prompts, "--model-name", tiny, "--prompts-per-call", 2, "--ray",
                       "-o", tmp_path / "out", "-q")
    assert code == 2 and "--prompts-per-call is for local runs" in err
    assert engine.load_count == loads


def test_a_closed_pipe_ends_quietly():
    # `pixart-sigma schema | head -1`: the reader leaves first; no "Broken pipe" error, a SIGPIPE-like status.
    child = subprocess.Popen([sys.executable, "-m", "pixart_sigma", "schema"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()
    errors = child.stderr.read()
    assert child.wait(timeout=120) == 141 and errors == b""


def test_the_python_api_loads_without_the_libraries_loading_bars(tmp_path):
    code = "from pixart_sigma import PixArtSigmaModel; PixArtSigmaModel(model_name='demo').generate('a red circle', num_inference_steps=1)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr


def test_batch_names_key_each_lora_by_its_sha256_and_scale_and_are_unchanged_without_loras(tmp_path, capsys):
    import shutil

    from pixart_sigma import PixArtSigmaModel, plan_batch
    from pixart_sigma.checkpoints import DEMO_DIR
    from pixart_sigma.lora_formats import write_lora
    from test_loras import _random_lora

    # Without LoRAs a batch keeps the names it had before LoRAs existed (this one, from then), so reruns resume.
    values = PixArtSigmaModel.validate_and_transform({"model_name": "demo", "seed": 1, "num_inference_steps": 2,
                                                      "dtype": "float32"})
    assert plan_batch([(1, "a red circle")], values)[0].names == ("a-red-circle-70f8d6b899e5-0.png",)
    with pytest.raises(ValueError, match="SHA-256 of each of the 1 LoRAs"):
        plan_batch([(1, "a red circle")], {**values, "loras": [{"name": "style", "scale": 1.0}]})
    folder, moved = tmp_path / "loras", tmp_path / "moved"
    config = json.loads((DEMO_DIR / "transformer" / "config.json").read_text())
    write_lora(folder / "style.safetensors", _random_lora(config, 1), "kohya")
    moved.mkdir()
    shutil.copy(folder / "style.safetensors", moved / "renamed.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = ["batch", prompts, "--model-name", "demo", "--num-inference-steps", 1, "--seed", 1, "-o", tmp_path / "out",
              "-q"]
    code, out, err = run(capsys, *common, "--lora-dir", folder, "--lora", "style:0.5")
    assert code == 0, err
    first = written(out)
    assert len(first) == 1 and not first[0].endswith("70f8d6b899e5-0.png")
    # the same bytes under another name, in another folder or by path: the same file name, nothing to make
    for lora in (["--lora-dir", moved, "--lora", "renamed:0.5"], ["--lora", f"{folder / 'style.safetensors'}:0.5"]):
        code, out, err = run(capsys, *common, *lora)
        assert code == 0 and out == "" and "0 prompt(s) generated, 1 already done" in err, err
    code, out, err = run(capsys, *common, "--lora-dir", folder, "--lora", "style:0.7")  # another scale: another name
    assert code == 0 and len(written(out)) == 1 and written(out) != first
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(
        Path(path).name for path in first + written(out))


def test_grid_is_a_command_and_its_help_says_the_axes_and_the_bound(capsys):
    from pixart_sigma import MAX_GRID_CELLS, axis_names

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "grid" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["grid", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"NAME is one of {', '.join(axis_names())}" in text and f"at most {MAX_GRID_CELLS} cells" in text
    assert "lora_scale is the scale of every LoRA given, lora_scale:NAME of that one" in text
    assert "--lora NAME[:SCALE]" in text and "--num-inference-steps" in text
