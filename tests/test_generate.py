"""Generation: equal to diffusers' PixArtSigmaPipeline, reproducible, cached, cancellable, NaN-safe."""

import logging
import re
import threading

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline

from pixart_sigma import Cancelled, GenerationError, PixArtSigmaModel, SettingsError, read_settings
from pixart_sigma.engine import make_scheduler
from pixart_sigma.settings import SCHEDULERS
from pixart_sigma.testing import save_tiny_pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def reference(tiny):
    pipe = PixArtSigmaPipeline.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    pipe.shipped_scheduler_config = pipe.scheduler.config  # tests swap the scheduler; start each from this
    return pipe


def diffusers_images(pipe, seeds, **kwargs):
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(generator=generators, num_images_per_prompt=len(seeds), clean_caption=False, output_type="np",
                **kwargs).images


def ours(model, prompt=PROMPT):
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in model.generate(prompt)])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_sampler_equals_diffusers_pipeline_with_that_scheduler(tiny, reference, scheduler):
    # On the CPU in float32, as the reference ("auto" would pick bfloat16 where the CPU or GPU has it).
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=11, num_images_per_prompt=2, num_inference_steps=8,
                             negative_prompt="green", width=64, height=96, scheduler=scheduler)
    reference.scheduler = make_scheduler(scheduler, reference.shipped_scheduler_config)
    expected = diffusers_images(reference, [11, 12], prompt=PROMPT, negative_prompt="green", num_inference_steps=8,
                                guidance_scale=4.5, width=64, height=96, use_resolution_binning=False)
    # diffusers quantises with round(x * 255): identical uint8 images.
    assert np.array_equal(ours(model), np.round(expected * 255) / 255)


def test_guidance_of_one_skips_the_unconditional_pass_like_diffusers(tiny, reference):
    from diffusers import DPMSolverMultistepScheduler

    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.shipped_scheduler_config)
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=3, guidance_scale=1.0, num_inference_steps=5)
    expected = diffusers_images(reference, [3], prompt=PROMPT, guidance_scale=1.0, num_inference_steps=5,
                                use_resolution_binning=False)
    assert np.array_equal(ours(model), np.round(expected * 255) / 255)


def test_resolution_binning_matches_diffusers(tmp_path):
    # sample_size 32 has a bin table (256 px): 272x232 is sampled at a trained bin and resized back.
    directory = save_tiny_pipeline(tmp_path / "binned", seed=4, sample_size=32)
    reference = PixArtSigmaPipeline.from_pretrained(directory)
    reference.set_progress_bar_config(disable=True)
    model = PixArtSigmaModel(model_name=str(directory), device="cpu", dtype="float32", seed=5, num_inference_steps=4,
                             width=272, height=232)
    images = model.generate(PROMPT)
    assert images[0].size == (272, 232)
    assert read_settings(images[0])["sampled_size"] != [272, 232]
    expected = diffusers_images(reference, [5], prompt=PROMPT, num_inference_steps=4, width=272, height=232)
    assert np.abs(ours(model) - expected).max() <= 1 / 255 + 1e-6
    unbinned = PixArtSigmaModel(model_name=str(directory), seed=5, num_inference_steps=4, width=272, height=232,
                                use_resolution_binning=False)
    image = unbinned.generate(PROMPT)[0]
    assert image.size == (272, 232)
    assert read_settings(image)["sampled_size"] == [272, 240]  # 232 is no multiple of 16: sampled larger, cropped


@pytest.mark.parametrize("scheduler", ["dpm-solver++", "sa-solver", "euler", "euler-ancestral", "ddim", "unipc"])
def test_every_scheduler_draws_reproducibly(tiny, scheduler, image_array):
    def draw():
        return PixArtSigmaModel(model_name=tiny, seed=21, num_inference_steps=6, scheduler=scheduler).generate(PROMPT)[0]

    first = draw()
    assert np.array_equal(image_array(first), image_array(draw()))
    assert read_settings(first)["scheduler"] == scheduler


def test_a_checkpoint_without_bin_table_generates_at_the_requested_size(tiny):
    image = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=2, width=96, height=80).generate("x")[0]
    assert image.size == (96, 80) and read_settings(image)["sampled_size"] == [96, 80]
    odd = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=2, width=72, height=88).generate("x")[0]
    assert odd.size == (72, 88) and read_settings(odd)["sampled_size"] == [80, 96]


def test_same_seed_same_pixels_and_different_seeds_differ(tiny, image_array):
    first = PixArtSigmaModel(model_name=tiny, seed=0, num_inference_steps=4).generate(PROMPT)[0]
    again = PixArtSigmaModel(model_name=tiny, seed=0, num_inference_steps=4).generate(PROMPT)[0]
    other = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=4).generate(PROMPT)[0]
    assert np.array_equal(image_array(first), image_array(again))
    assert not np.array_equal(image_array(first), image_array(other))


def test_each_image_of_a_batch_can_be_made_alone(tiny, image_array):
    batch = PixArtSigmaModel(model_name=tiny, seed=100, num_images_per_prompt=3, num_inference_steps=4).generate(PROMPT)
    assert [read_settings(image)["seed"] for image in batch] == [100, 101, 102]
    alone = PixArtSigmaModel(model_name=tiny, seed=102, num_inference_steps=4).generate(PROMPT)[0]
    # Same starting noise; batched and single matmuls may round one level apart, never more.
    assert np.abs(image_array(alone) - image_array(batch[2])).max() <= 1
    assert (image_array(alone) != image_array(batch[2])).mean() < 0.001


def test_random_seed_is_drawn_and_recorded(tiny, image_array):
    model = PixArtSigmaModel(model_name=tiny, num_inference_steps=2)
    first, second = model.generate(PROMPT)[0], model.generate(PROMPT)[0]
    seeds = [read_settings(first)["seed"], read_settings(second)["seed"]]
    assert seeds[0] != seeds[1] and all(seed >= 0 for seed in seeds)
    replay = PixArtSigmaModel(model_name=tiny, num_inference_steps=2, seed=seeds[0]).generate(PROMPT)[0]
    assert np.array_equal(image_array(replay), image_array(first))


def test_text_encoder_runs_once_per_prompt(tiny):
    model = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=2, negative_prompt="a dog")
    model.generate("a cat in the snow")
    calls = model.engine.text_encoder_calls
    model.generate("a cat in the snow")
    PixArtSigmaModel(model_name=tiny, seed=9, num_inference_steps=2, negative_prompt="a dog").generate("a cat in the snow")
    assert model.engine.text_encoder_calls == calls
    model.generate("a dog in the snow")
    assert model.engine.text_encoder_calls == calls + 1  # new prompt; the negative prompt is cached by its text


def test_warm_model_is_reused(tiny):
    from pixart_sigma import engine

    first = PixArtSigmaModel(model_name=tiny, seed=1)
    loads = engine.load_count
    second = PixArtSigmaModel(model_name=tiny, seed=2, num_inference_steps=3, guidance_scale=5.0)
    assert engine.load_count == loads and second.engine is first.engine


def test_progress_is_reported_every_step(tiny):
    steps = []
    PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=6).generate(
        PROMPT, on_progress=lambda step, total: steps.append((step, total)))
    assert steps == [(i, 6) for i in range(1, 7)]


def test_cancel_stops_between_steps_and_the_next_job_runs(tiny):
    model = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=20)
    flag, seen = threading.Event(), []

    def progress(step, total):
        seen.append(step)
        if step == 5:
            flag.set()

    with pytest.raises(Cancelled):
        model.generate(PROMPT, on_progress=progress, cancel=flag)
    assert seen == [1, 2, 3, 4, 5]
    assert len(model.generate(PROMPT)) == 1


def test_vae_nan_in_half_precision_is_decoded_again_in_float32(tiny, monkeypatch, image_array):
    model = PixArtSigmaModel(model_name=tiny, seed=2, num_inference_steps=3, dtype="bfloat16")
    vae = model.engine.pipeline.vae
    real_decode = vae.decode

    def overflowing_decode(latents, return_dict=False):
        out = real_decode(latents, return_dict=False)[0]
        if latents.dtype != torch.float32:  # what the SDXL VAE does in float16
            out = torch.full_like(out, float("nan"))
        return (out,)

    monkeypatch.setattr(vae, "decode", overflowing_decode)
    image = model.generate(PROMPT)[0]
    assert image_array(image).std() > 0  # not a black image
    assert vae.dtype == torch.bfloat16  # restored after the float32 retry


def test_persistent_nan_is_a_clear_error(tiny, monkeypatch):
    model = PixArtSigmaModel(model_name=tiny, seed=2, num_inference_steps=2)
    vae = model.engine.pipeline.vae
    monkeypatch.setattr(vae, "decode", lambda latents, return_dict=False: (torch.full((1, 3, 64, 64), float("nan")),))
    with pytest.raises(GenerationError, match="non-finite"):
        model.generate(PROMPT)


@pytest.mark.parametrize("prompt, fragment", [
    ("", "prompt is empty"), ("   \n\t", "prompt is empty"), ("a cat\x00", "U+0000"), ("a\x1bcat", "U+001B"),
    ("bad \udcff text", "invalid UTF-8"), (b"\xff\xfe", "not valid UTF-8"), ("x" * 10_001, "at most 10000"),
])
def test_bad_prompts_are_refused_before_the_model_runs(tiny, prompt, fragment):
    model = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=2)
    calls = model.engine.text_encoder_calls
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        model.generate(prompt)
    assert model.engine.text_encoder_calls == calls


def test_long_prompt_is_generated_and_truncation_reported_without_the_text(tiny, caplog):
    prompt = " ".join(["red circle"] * 20) + " secretword"
    model = PixArtSigmaModel(model_name=tiny, seed=1, num_inference_steps=2, max_sequence_length=16)
    with caplog.at_level(logging.WARNING):
        image = model.generate(prompt)[0]
    assert read_settings(image)["truncated_tokens"] > 0
    assert "max_sequence_length=16" in caplog.text and "secretword" not in caplog.text


def test_settings_can_be_given_per_call_by_the_same_rules(tiny, image_array):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", seed=1, num_inference_steps=2)
    image = model.generate(PROMPT, seed=7, width=96, height=80, guidance_scale=3.0, scheduler="euler")[0]
    record = read_settings(image)
    assert image.size == (96, 80) and record["seed"] == 7 and record["guidance_scale"] == 3.0
    assert record["scheduler"] == "euler" and record["num_inference_steps"] == 2
    same = PixArtSigmaModel(model_name=tiny, device="cpu", seed=7, num_inference_steps=2, width=96, height=80,
                            guidance_scale=3.0, scheduler="euler").generate(PROMPT)[0]
    assert np.array_equal(image_array(image), image_array(same))
    assert model.generate(PROMPT)[0].size == (64, 64)  # the model's own settings are unchanged
    assert len(model.generate(PROMPT, num_images_per_prompt=3)) == 3


@pytest.mark.parametrize("overrides, fragment", [
    ({"width": 1001}, "width=1001"), ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
    ({"seed": -5}, "seed=-5"), ({"steps": 3}, "unknown setting 'steps'"),
    ({"model_name": "demo"}, "model_name cannot change per call"), ({"device": "cpu"}, "device cannot change"),
    ({"dtype": "float32"}, "dtype cannot change"),
])
def test_bad_per_call_settings_are_refused_before_any_model_work(tiny, overrides, fragment):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", seed=1, num_inference_steps=2)
    calls = model.engine.text_encoder_calls
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        model.generate("a prompt not encoded yet", **overrides)
    assert model.engine.text_encoder_calls == calls


def test_from_pipeline_wraps_a_pipeline_the_user_already_has(tiny, image_array):
    pipe = PixArtSigmaPipeline.from_pretrained(tiny)
    wrapped = PixArtSigmaModel.from_pipeline(pipe, seed=4, num_inference_steps=3)
    ours_image = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=4,
                                  num_inference_steps=3).generate(PROMPT)[0]
    image = wrapped.generate(PROMPT)[0]
    assert np.array_equal(image_array(image), image_array(ours_image))
    assert wrapped.engine.pipeline is pipe and read_settings(image)["seed"] == 4
    with pytest.raises(SettingsError, match="come from the pipeline"):
        PixArtSigmaModel.from_pipeline(pipe, device="cpu")


def test_the_per_call_caps_count_the_seeds_handed_to_the_engine(tiny):
    # One image per seed, whatever num_images_per_prompt (1 here) says. The cancel flag is set, so a call that
    # got past the caps would stop before drawing anything (and raise Cancelled, not SettingsError).
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=1)
    engine, large = model.engine, model.call_settings({"width": 1024, "height": 1024})
    assert large.num_images_per_prompt == 1
    cancelled, calls = threading.Event(), model.engine.text_encoder_calls
    cancelled.set()
    with pytest.raises(SettingsError, match="1024x1024x17"):
        engine.generate(PROMPT, large, list(range(17)), cancel=cancelled)
    with pytest.raises(SettingsError, match="1024x1024x18"):  # prompts with different counts: all their images
        engine.generate_many([PROMPT, "a blue square"], large, [list(range(10)), list(range(8))], cancel=cancelled)
    with pytest.raises(SettingsError, match="65 images is too many"):
        engine.generate_many([PROMPT], model.call_settings({}), [list(range(65))], cancel=cancelled)
    assert engine.text_encoder_calls == calls
    with pytest.raises(Cancelled):  # within the caps: it starts (and stops at once)
        engine.generate(PROMPT, large, list(range(16)), cancel=cancelled)


def test_the_prompt_can_be_passed_by_name_as_the_readme_shows(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=1, seed=3)
    by_name = model.generate(prompt=PROMPT)[0]
    assert by_name.tobytes() == model.generate(PROMPT)[0].tobytes() == model.generate(input=PROMPT)[0].tobytes()
    with pytest.raises(SettingsError, match="both input= and prompt="):
        model.generate(PROMPT, prompt=PROMPT)
    with pytest.raises(SettingsError, match="no prompt"):
        model.generate()
