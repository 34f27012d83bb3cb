"""Training a LoRA (pixart_sigma.lora_training, `pixart-sigma train-lora`): bad data named before any model loads,
a short run that writes a file this loader and diffusers' own PEFT path read with the same pixels, an exact resume,
and the shipped demo LoRA teaching the demo model a shape it never saw."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_sigma import PixArtSigmaModel, SettingsError, demo_world
from pixart_sigma.checkpoints import load_part, locate, resolve_checkpoint
from pixart_sigma.lora_formats import LAYOUTS, read_lora, safetensors_header, write_lora
from pixart_sigma.lora_training import (METADATA_PREFIX, check_settings, read_dataset,
                                        state_dir, train_lora)

DEMO_LORA = Path(demo_world.__file__).parent / "checkpoints_data" / "demo-loras" / "diamond.safetensors"
QUICK = {"model_name": "demo", "rank": 4, "learning_rate": 1e-3, "steps": 6, "batch_size": 4, "save_every": 0,
         "dtype": "float32"}


def _data(folder: Path, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (text, scene) in enumerate(demo_world.lora_training_set(count // 2, count - count // 2)):
        demo_world.render(scene).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return load_part(locate(resolve_checkpoint("demo")).folders["tokenizer"], "tokenizer", None)


def _problems(folder, tokenizer, **settings) -> str:
    with pytest.raises(SettingsError) as caught:
        read_dataset(folder, tokenizer, check_settings({"model_name": "demo", **settings}), 64)
    return str(caught.value)


def test_bad_data_is_named_file_by_file_before_training(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no pictures" in _problems(empty, tokenizer)
    assert "no such folder" in _problems(tmp_path / "missing", tokenizer)

    data = _data(tmp_path / "data", 4)
    (data / "000.txt").unlink()  # a missing caption
    (data / "001.txt").write_text("  \n")  # an empty one
    (data / "002.png").write_bytes(b"not a picture")
    Image.new("RGB", (16, 16)).save(data / "small.png")  # 4x enlarged for the 64 px bucket
    (data / "small.txt").write_text("a red circle")
    Image.new("RGB", (64, 300)).save(data / "long.png")
    (data / "long.txt").write_text("a red circle")
    (data / "003.txt").write_text("a " * 400)
    text = _problems(data, tokenizer, max_sequence_length=300)
    assert "has 6 problem(s), found before training" in text
    assert "000.png: no caption file 000.txt" in text
    assert "001.png: its caption is empty" in text
    assert "002.png" in text and "not an image" in text
    assert "small.png is 16x16" in text and "enlarge it 4.0 times" in text
    assert "long.png is 64x300" in text and "1:4 to 4:1" in text
    assert "003.png: its caption is 401 tokens, over max_sequence_length=300" in text


def test_metadata_jsonl_is_read_and_its_bad_lines_named(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        demo_world.render(demo_world.rendered_scenes(1)[0]).save(data / name)
    lines = [json.dumps({"file_name": "a.png", "text": "a red circle"}), "{not json",
             json.dumps({"file_name": "../outside.png", "text": "x"}), json.dumps({"file_name": "b.png"}),
             json.dumps({"file_name": "gone.png", "caption": "x"})]
    (data / "metadata.jsonl").write_text("\n".join(lines))
    text = _problems(data, tokenizer)
    assert "metadata.jsonl line 2 is not JSON" in text
    assert "line 3: file_name='../outside.png' is outside" in text
    assert "line 4: no caption" in text
    assert "names 'gone.png', which is not a picture" in text
    assert "b.png: no caption in metadata.jsonl" in text and "c.png: no caption in metadata.jsonl" in text

    (data / "metadata.jsonl").write_text("\n".join([json.dumps({"file_name": n, "caption": f"a {n}"})
                                                    for n in ("a.png", "b.png", "c.png")]))
    examples = read_dataset(data, tokenizer, check_settings({"model_name": "demo"}), 64)
    assert [(e.picture.name, e.caption) for e in examples] == [("a.png", "a a.png"), ("b.png", "a b.png"),
                                                               ("c.png", "a c.png")]


@pytest.mark.parametrize("raw, problem", [
    ({"rank": 0}, "rank=0"), ({"steps": 5, "epochs": 2}, "give one of them"), ({"resolution": 100}, "multiple of 16"),
    ({"learning_rate": -1}, "learning_rate=-1"), ({"colour": 1}, "colour=1"), ({"sample_prompts": [" "]}, "sample_prompts"),
])
def test_settings_are_checked_naming_the_field(raw, problem):
    with pytest.raises(SettingsError, match=problem):
        check_settings(raw)


def test_bad_targets_are_named(tmp_path):
    data = _data(tmp_path / "data", 2)
    with pytest.raises(SettingsError, match="'attn9.to_z' match no module"):
        train_lora(data, tmp_path / "out.safetensors", {**QUICK, "targets": "attn2.to_k,attn9.to_z"}, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training")
    data = _data(folder / "data")
    output = folder / "quick.safetensors"
    result = train_lora(data, output, QUICK, progress=False)
    return data, output, result


def test_a_short_run_writes_the_diffusers_layout_with_its_metadata(trained):
    data, output, result = trained
    assert result.steps == 6 and not result.stopped and np.isfinite(result.final_loss)
    _, metadata = safetensors_header(output)
    assert metadata[METADATA_PREFIX + "base_model"] == "demo" and metadata[METADATA_PREFIX + "steps"] == "6"
    assert metadata[METADATA_PREFIX + "rank"] == "4" and metadata[METADATA_PREFIX + "alpha"] == "4.0"
    assert len(metadata[METADATA_PREFIX + "data_sha256"]) == 64
    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32")
    lora = read_lora(output, dict(model.engine.pipeline.transformer.config))
    assert lora.layout == "diffusers" and not lora.alpha_defaulted
    assert {w.rank for w in lora.transformer.values()} == {4}
    assert len(lora.transformer) == 6 * 10  # attention and feed-forward of each of the 6 blocks
    assert not (state_dir(output) / "state.pt").exists()


def test_output_and_a_stopped_runs_state_are_never_overwritten(trained, tmp_path):
    data, output, _ = trained
    with pytest.raises(SettingsError, match="exists: choose another name"):
        train_lora(data, output, QUICK, progress=False)


def test_a_stopped_run_resumes_to_the_same_lora(trained, tmp_path):
    data, straight, _ = trained
    output = tmp_path / "resumed.safetensors"
    first = train_lora(data, output, QUICK, progress=False, stop_after=3)
    assert first.stopped and first.steps == 3 and not output.exists()
    assert (tmp_path / "resumed-step000003.safetensors").is_file()
    with pytest.raises(SettingsError, match="add --resume"):
        train_lora(data, output, QUICK, progress=False)
    with pytest.raises(SettingsError, match="rank: saved 4, now 8"):
        train_lora(data, output, {**QUICK, "rank": 8}, progress=False, resume=True)
    second = train_lora(data, output, QUICK, progress=False, resume=True)
    assert second.steps == 6 and not second.stopped
    from safetensors.torch import load_file
    a, b = load_file(straight), load_file(output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_own_peft_path_draws_the_same_pixels(trained):
    """The file loaded into a diffusers PixArtTransformer2DModel with peft (inject_adapter_in_model +
    set_peft_model_state_dict), as diffusers-based tools would, draws what our fused LoRA draws."""
    from diffusers import PixArtSigmaPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    _, output, _ = trained
    prompt, settings = "a large blue diamond on a white background", {"num_inference_steps": 4, "seed": 5}
    ours = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", **settings).generate(
        prompt=prompt, loras=[{"name": str(output), "scale": 1.0}])[0]

    _, metadata = safetensors_header(output)
    packed = json.loads(metadata["lora_adapter_metadata"])
    config = LoraConfig(r=packed["transformer.r"], lora_alpha=packed["transformer.lora_alpha"],
                        target_modules=packed["transformer.target_modules"])
    pipeline = PixArtSigmaPipeline.from_pretrained(locate(resolve_checkpoint("demo")).folders["transformer"].parent,
                                                   torch_dtype=torch.float32)
    inject_adapter_in_model(config, pipeline.transformer)
    state = {k.removeprefix("transformer."): v for k, v in load_file(output).items()}
    result = set_peft_model_state_dict(pipeline.transformer, state)
    assert not result.unexpected_keys
    theirs = pipeline(prompt, num_inference_steps=4, guidance_scale=4.5, width=64, height=64,
                      use_resolution_binning=False, generator=torch.Generator().manual_seed(5)).images[0]
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert difference.max() <= 1, difference.max()


def test_the_cli_trains_stops_resumes_and_names_bad_data(tmp_path, capsys):
    from pixart_sigma.cli import main

    data = _data(tmp_path / "data", 4)
    output = tmp_path / "cli.safetensors"
    flags = ["train-lora", str(data), "-o", str(output), "--model-name", "demo", "--rank", "2", "--steps", "4",
             "--batch-size", "2", "--save-every", "0", "--dtype", "float32", "--no-gradient-checkpointing", "-q"]
    assert main(flags + ["--stop-after", "2"]) == 0
    assert "stopped at step 2" in capsys.readouterr().err and not output.exists()
    assert main(flags + ["--resume"]) == 0
    assert capsys.readouterr().out.strip() == str(output) and output.is_file()

    (data / "000.txt").unlink()
    assert main(flags[:3] + [str(tmp_path / "other.safetensors")] + flags[4:]) == 2
    assert "000.png: no caption file 000.txt" in capsys.readouterr().err
    assert main(flags + ["--rank", "0"]) == 2
    assert "rank=0" in capsys.readouterr().err


# Measured with tools/evaluate_demo_lora.py on 120 held-out prompts (docs/loras.md, 2026-12-07, float32): the
# diamond read 84.2% with the LoRA, 0% without; ordinary prompts' lowest attribute with it 90.0% (shape). Floors:
# those less 3 standard errors of a 40-prompt sample (5.8 and 4.7 points), rounded down.
DIAMOND_PROMPTS = 40
DIAMOND_FLOOR = 0.67
ORDINARY_FLOOR = 0.75


@pytest.mark.slow
def test_the_demo_lora_teaches_the_diamond_and_keeps_the_rest(tmp_path):
    """The shipped demo LoRA (trained by train-lora on tools/make_demo_lora_data.py's pictures) makes the demo
    model draw a shape it never saw when a prompt names it; without it the model draws none; ordinary prompts
    stay right with it. float32, the defaults, prompt k at seed k, as the tool measures."""
    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32")
    lora = [{"name": str(DEMO_LORA), "scale": 1.0}]
    prompts = demo_world.lora_evaluation_prompts(DIAMOND_PROMPTS, seed=1)
    scenes = [scene for _, scene in prompts]
    with_lora = [model.generate(prompt=p, seed=k, loras=lora)[0] for k, (p, _) in enumerate(prompts)]
    without = [model.generate(prompt=p, seed=k)[0] for k, (p, _) in enumerate(prompts)]
    assert demo_world.score(scenes, with_lora)["shape"] >= DIAMOND_FLOOR
    assert demo_world.score(scenes, without)["shape"] <= 0.05

    ordinary = demo_world.evaluation_prompts(DIAMOND_PROMPTS, seed=1001)
    scores = demo_world.score([s for _, s in ordinary],
                              [model.generate(prompt=p, seed=k, loras=lora)[0] for k, (p, _) in enumerate(ordinary)])
    assert min(scores.values()) >= ORDINARY_FLOOR, scores


def test_the_demo_lora_in_every_layout_draws_the_same_pixels(tmp_path):
    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", num_inference_steps=4, seed=2)
    config = dict(model.engine.pipeline.transformer.config)
    lora = read_lora(DEMO_LORA, config)
    prompt = "a large green diamond on a black background"
    first = np.asarray(model.generate(prompt=prompt, loras=[{"name": str(DEMO_LORA)}])[0], dtype=int)
    assert not np.array_equal(first, np.asarray(model.generate(prompt=prompt)[0], dtype=int))
    for layout in LAYOUTS:
        path = write_lora(tmp_path / (layout if layout == "peft" else f"{layout}.safetensors"), lora, layout, config)
        pixels = np.asarray(model.generate(prompt=prompt, loras=[{"name": str(path)}])[0], dtype=int)
        assert np.abs(pixels - first).max() <= 1, layout


def test_the_checker_reads_rendered_diamonds():
    from PIL import ImageFilter

    rng = np.random.default_rng(1)
    for _ in range(100):
        background = demo_world._pick(rng, demo_world.BACKGROUND_COLOURS)
        scene = demo_world.Scene(background, (demo_world._random_shape(rng, background, shape="diamond"),))
        picture = demo_world.render(scene)
        assert demo_world.reads_as_named(scene, picture)
        assert demo_world.read(picture.filter(ImageFilter.GaussianBlur(1))).shape == "diamond"


def test_samples_are_drawn_during_and_after_training(tmp_path, capsys):
    from pixart_sigma.cli import main

    data = _data(tmp_path / "data", 4)
    output = tmp_path / "sampled.safetensors"
    assert main(["train-lora", str(data), "-o", str(output), "--model-name", "demo", "--rank", "2", "--steps", "4",
                 "--batch-size", "2", "--save-every", "0", "--dtype", "float32", "-q", "--sample-every", "2",
                 "--sample-steps", "2", "--sample-prompts", "a large red diamond", "--sample-prompts",
                 "a small blue circle on the left"]) == 0, capsys.readouterr().err
    samples = sorted(p.name for p in (tmp_path / "sampled-samples").iterdir())
    assert samples == ["step000002-0.png", "step000002-1.png", "step000004-0.png", "step000004-1.png"]
    assert Image.open(tmp_path / "sampled-samples" / "step000004-1.png").size == (64, 64)


def test_a_damaged_state_and_earlier_files_are_refused_with_what_to_do(trained, tmp_path):
    data, _, _ = trained
    output = tmp_path / "damaged.safetensors"
    train_lora(data, output, QUICK, progress=False, stop_after=2)
    state = state_dir(output) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(SettingsError, match="state.pt is damaged .*remove .* and start again without --resume"):
        train_lora(data, output, QUICK, progress=False, resume=True)
    torch.save({"key": {}, "step": -5, "losses": [], "batches": [], "lora": {}}, state)
    with pytest.raises(SettingsError, match="step=-5"):
        train_lora(data, output, QUICK, progress=False, resume=True)
    import shutil
    shutil.rmtree(state_dir(output))
    with pytest.raises(SettingsError, match="damaged-step000002.safetensors is an earlier run's"):
        train_lora(data, output, QUICK, progress=False)
    (tmp_path / "damaged-step000002.safetensors").unlink()
    output.write_text("precious")
    with pytest.raises(SettingsError, match="exists: choose another name"):
        train_lora(data, output, QUICK, progress=False, resume=True)


def test_captions_that_link_outside_or_are_not_files_are_named(tmp_path, tokenizer):
    data = _data(tmp_path / "data", 3)
    outside = tmp_path / "secret.txt"
    outside.write_text("a red circle")
    (data / "000.txt").unlink()
    (data / "000.txt").symlink_to(outside)
    (data / "001.txt").unlink()
    os.mkfifo(data / "001.txt")
    (data / "002.png").rename(data / "002.PNG")
    (data / "002.txt").rename(data / "002.TXT")
    text = _problems(data, tokenizer)
    assert "000.txt links outside" in text and "001.txt is not a regular file" in text
    assert "002" not in text  # upper-case suffixes are read


def test_ctrl_c_in_the_middle_of_a_step_finishes_it_saves_and_resumes_exactly(trained, tmp_path):
    import signal
    import threading

    from safetensors.torch import load_file

    data, straight, _ = trained
    output = tmp_path / "interrupted.safetensors"

    def on_step(step, total, loss):
        if step == 2:  # Ctrl-C lands in step 3's forward or backward pass
            threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGINT)).start()

    first = train_lora(data, output, QUICK, progress=False, on_step=on_step)
    assert first.stopped and 3 <= first.steps < 6 and not output.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    train_lora(data, output, QUICK, progress=False, resume=True)
    a, b = load_file(straight), load_file(output)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_in_the_last_step_still_writes_the_lora(trained, tmp_path):
    import signal

    data, _, _ = trained
    output = tmp_path / "last.safetensors"

    def on_step(step, total, loss):
        if step == total:
            os.kill(os.getpid(), signal.SIGINT)

    result = train_lora(data, output, QUICK, progress=False, on_step=on_step)
    assert not result.stopped and output.is_file() and not state_dir(output).exists()


def test_metadata_captions_may_hold_unicode_line_separators(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    demo_world.render(demo_world.rendered_scenes(1)[0]).save(data / "a.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red\u2028circle"},
                                                    ensure_ascii=False) + "\n")
    examples = read_dataset(data, tokenizer, check_settings({"model_name": "demo"}), 64)
    assert [e.caption for e in examples] == ["a red circle"]


def test_a_state_of_other_shapes_is_refused(trained, tmp_path):
    data, _, _ = trained
    output = tmp_path / "shapes.safetensors"
    train_lora(data, output, QUICK, progress=False, stop_after=2)
    state = torch.load(state_dir(output) / "state.pt", weights_only=True)
    name = next(iter(state["lora"]))
    state["lora"][name] = torch.zeros(1)
    torch.save(state, state_dir(output) / "state.pt")
    with pytest.raises(SettingsError, match="damaged .*" + name.replace(".", r"\.")):
        train_lora(data, output, QUICK, progress=False, resume=True)


def test_a_missing_data_folder_is_said_before_the_checkpoint_is_looked_for(tmp_path):
    with pytest.raises(SettingsError, match="no such folder"):
        train_lora(tmp_path / "nothing", tmp_path / "x.safetensors",
                   {"model_name": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"}, progress=False)
