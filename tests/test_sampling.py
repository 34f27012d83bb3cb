"""The sampling loop's stages: step hooks, starts from given latents, the guided denoiser, the VAE's encode."""

import types

import numpy as np
import pytest
import torch

from pixart_sigma import PixArtSigmaModel
from pixart_sigma import demo_world as world
from pixart_sigma.engine import make_scheduler
from pixart_sigma.sampling import (Conditioning, GuidedDenoiser, LatentLayout, Start, check_start, given_start,
                                   image_noise, noised_start, run_hooks)

PROMPT = "a red circle on a blue background"
DEMO_PROMPT = "a large red circle on a blue background"


def draw(model, seeds=(4,), **stages):
    """Images straight from the engine (no record attached), with the model's settings."""
    return model.engine.generate(PROMPT, model.call_settings({}), list(seeds), **stages).images


def same_pixels(first, second) -> bool:
    return all(a.tobytes() == b.tobytes() for a, b in zip(first, second)) and len(first) == len(second)


def test_a_hook_that_only_looks_sees_every_step_and_changes_nothing(tiny):
    # A stochastic sampler: a hook must not shift what the images' generators draw.
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", num_inference_steps=5,
                             scheduler="euler-ancestral")
    seen = []

    def look(index, timestep, latents):
        seen.append((index, float(timestep), tuple(latents.shape)))

    looked = draw(model, seeds=(4, 5), hooks=[look])
    scheduler = make_scheduler("euler-ancestral", model.engine.pipeline.scheduler.config)
    scheduler.set_timesteps(5)
    assert seen == [(index, float(t), (2, 4, 8, 8)) for index, t in enumerate(scheduler.timesteps)]
    assert same_pixels(looked, draw(model, seeds=(4, 5)))


def test_latents_a_hook_returns_replace_the_latents(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", num_inference_steps=3)
    engine = model.engine
    planted = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    last = model.call_settings({}).num_inference_steps - 1
    images = draw(model, hooks=[lambda index, timestep, latents: planted if index == last else None])
    with torch.inference_mode():
        expected = engine.finish(planted, engine.plan(64, 64, binning=False))
    assert same_pixels(images, expected)
    assert not same_pixels(images, draw(model))


def test_a_given_start_runs_only_the_kept_steps_and_ends_where_the_whole_run_ends(tiny):
    # Euler keeps no state between steps: going on from step 3's latents is the same arithmetic as never stopping.
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", num_inference_steps=6, scheduler="euler")
    kept, timesteps = {}, []

    def keep_step_3(index, timestep, latents):
        timesteps.append(float(timestep))
        if index == 2:
            kept["latents"] = latents.clone()

    whole = draw(model, hooks=[keep_step_3])
    progress, resumed_timesteps = [], []
    resumed = draw(model, start=given_start(kept["latents"], skip_steps=3),
                   hooks=[lambda index, timestep, latents: resumed_timesteps.append(float(timestep))],
                   on_progress=lambda step, total: progress.append((step, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert resumed_timesteps == timesteps[3:]
    assert same_pixels(resumed, whole)


def test_a_noised_start_noises_clean_latents_to_the_first_timestep_kept(tiny):
    scheduler = make_scheduler("dpm-solver++", PixArtSigmaModel(model_name=tiny).engine.pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    layout = LatentLayout((2, 4, 8, 8), torch.float32, torch.device("cpu"))
    clean = torch.randn(layout.shape, generator=torch.Generator().manual_seed(1))
    start = noised_start(clean, skip_steps=4)(scheduler, layout, [torch.Generator().manual_seed(s) for s in (7, 8)])
    assert torch.equal(start.timesteps, scheduler.timesteps[4:])
    noise = image_noise(layout, [torch.Generator().manual_seed(s) for s in (7, 8)])
    assert torch.equal(start.latents, scheduler.add_noise(clean, noise, scheduler.timesteps[4:5]))
    with pytest.raises(ValueError, match="at least one of the 10 steps"):
        noised_start(clean, skip_steps=10)(scheduler, layout, [])


def test_starts_and_hooks_that_do_not_fit_the_batch_are_refused():
    layout = LatentLayout((1, 4, 8, 8), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8, 8\); this batch needs \(1, 4, 8, 8\)"):
        check_start(Start(torch.zeros(2, 4, 8, 8), torch.arange(3)), layout)
    with pytest.raises(ValueError, match="no timestep"):
        check_start(Start(torch.zeros(1, 4, 8, 8), torch.arange(0)), layout)
    with pytest.raises(ValueError, match="a step hook returned latents of shape"):
        run_hooks([lambda index, timestep, latents: latents[:, :2]], 0, torch.tensor(1), torch.zeros(1, 4, 8, 8))


def test_the_guided_denoiser_mixes_the_two_passes_by_the_scale_and_drops_the_learned_variance():
    calls = []

    def transformer(model_input, encoder_hidden_states, encoder_attention_mask, timestep, added_cond_kwargs,
                    return_dict):
        calls.append((model_input.shape[0], encoder_hidden_states[:, 0, 0].tolist(), timestep.tolist()))
        # Noise channels 0-3 say which prompt each row read; variance channels 4-7 are junk.
        noise = encoder_hidden_states[:, :1, :1, None].expand(-1, 4, 2, 2)
        return (torch.cat([noise, torch.full_like(noise, 99.0)], dim=1),)

    conditioning = Conditioning(torch.full((1, 3, 5), 2.0), torch.ones(1, 3), torch.full((1, 3, 5), 1.0),
                                torch.ones(1, 3))
    denoiser = GuidedDenoiser(transformer, conditioning, guidance_scale=4.5, learned_sigma=True)
    noise = denoiser(torch.zeros(1, 4, 2, 2), torch.tensor(500))
    assert calls == [(2, [1.0, 2.0], [500, 500])]  # one pass: the negative rows first
    assert torch.equal(noise, torch.full((1, 4, 2, 2), 1.0 + 4.5 * (2.0 - 1.0)))
    unguided = GuidedDenoiser(transformer, Conditioning(conditioning.embeds, conditioning.mask), 4.5, True)
    assert torch.equal(unguided(torch.zeros(1, 4, 2, 2), torch.tensor(500)), torch.full((1, 4, 2, 2), 2.0))


# -- the VAE's encode -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_picture():
    model = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", seed=0)
    image = model.generate(DEMO_PROMPT)[0]
    return model, image, model.engine.pipeline.image_processor.preprocess(image)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoding_a_picture_and_decoding_it_gives_it_back(demo_picture, dtype):
    _, image, pixels = demo_picture
    engine = PixArtSigmaModel(model_name="demo", device="cpu", dtype=dtype).engine
    latents = engine.encode_pixels(pixels)
    assert latents.shape == (1, 4, 16, 16) and latents.dtype == engine.dtype
    assert torch.equal(engine.encode_pixels(pixels), latents)  # the posterior's mean: no noise drawn
    back = engine.finish(latents, engine.plan(64, 64, binning=False))[0]
    difference = np.asarray(back).astype(float) - np.asarray(image).astype(float)
    # Measured: PSNR 35.6 dB, 1.1 levels on average (float32); the latent pools 4x4 pixels, so outlines soften.
    assert 10 * np.log10(255**2 / np.mean(difference**2)) > 30
    assert np.abs(difference).mean() < 3
    assert world.read(back) == world.read(image)


def test_an_encode_that_overflows_in_half_precision_runs_again_in_float32(tiny, monkeypatch):
    engine = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="bfloat16").engine
    vae = engine.pipeline.vae
    real_encode = vae.encode

    def overflowing_encode(pixels):
        mean = real_encode(pixels).latent_dist.mean
        if pixels.dtype != torch.float32:
            mean = torch.full_like(mean, float("nan"))
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean))

    monkeypatch.setattr(vae, "encode", overflowing_encode)
    latents = engine.encode_pixels(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(latents).all() and latents.dtype == torch.bfloat16
    assert vae.dtype == torch.bfloat16  # restored after the float32 retry


def test_an_encoded_picture_noised_part_way_is_kept_or_redrawn_as_the_prompt_says(demo_picture):
    # What image to image will do, through the start stage alone: 15 of 20 steps skipped keep the picture;
    # 10 skipped leave room to draw another prompt.
    model, image, pixels = demo_picture
    engine, settings = model.engine, model.call_settings({"num_inference_steps": 20})
    latents = engine.encode_pixels(pixels)
    kept = engine.generate(DEMO_PROMPT, settings, [3], start=noised_start(latents, skip_steps=15)).images[0]
    assert np.abs(np.asarray(kept).astype(int) - np.asarray(image).astype(int)).mean() < 8  # measured 3.4
    other = "a large green square on a white background"
    redrawn = engine.generate(other, settings, [3], start=noised_start(latents, skip_steps=10)).images[0]
    reading = world.read(redrawn)
    assert (reading.background, reading.colour, reading.shape) == ("white", "green", "square")
