"""The text's projection and cross-attention keys/values are computed once per call (text_cache): the same pixels as
computing them every step, on every sampler and with guidance off, and the work really is skipped."""

import numpy as np
import pytest
import torch

from pixart_sigma import PixArtSigmaModel
from pixart_sigma import text_cache
from pixart_sigma.settings import SAMPLERS


@pytest.fixture(scope="module")
def model():
    return PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", num_inference_steps=5, seed=4)


def _uncached(monkeypatch):
    """Every call computes the text side at every step, as diffusers does."""
    monkeypatch.setattr(text_cache, "session", lambda transformer, embeds: __import__("contextlib").nullcontext())


@pytest.mark.parametrize("settings", [{"guidance_scale": 4.5}, {"guidance_scale": 1.0},
                                      {"negative_prompt": "a blue square"}, {"num_images_per_prompt": 2}]
                         + [{"scheduler": name} for name in SAMPLERS])
def test_reusing_the_text_work_gives_the_same_pixels_bit_for_bit(model, monkeypatch, settings):
    prompt = "a large red circle on a white background"
    cached = [np.asarray(image) for image in model.generate(prompt=prompt, **settings)]
    _uncached(monkeypatch)
    plain = [np.asarray(image) for image in model.generate(prompt=prompt, **settings)]
    assert all(np.array_equal(a, b) for a, b in zip(cached, plain))


def test_the_projection_and_keys_values_run_once_per_call(model, monkeypatch):
    transformer = model.engine.pipeline.transformer
    calls = {"to_k": 0, "projection": 0}
    first_block = transformer.transformer_blocks[0].attn2
    hooks = [first_block.to_k.register_forward_hook(lambda *a: calls.__setitem__("to_k", calls["to_k"] + 1)),
             transformer.caption_projection.linear_1.register_forward_hook(
                 lambda *a: calls.__setitem__("projection", calls["projection"] + 1))]
    try:
        model.generate(prompt="a small blue square at the top", num_inference_steps=6)
        assert calls == {"to_k": 1, "projection": 1}
        _uncached(monkeypatch)
        model.generate(prompt="a small blue square at the top", num_inference_steps=6)
        assert calls == {"to_k": 7, "projection": 7}
    finally:
        for hook in hooks:
            hook.remove()


def test_outside_a_call_the_transformer_is_diffusers_own(model):
    """The installed processor computes what diffusers' AttnProcessor2_0 computes, when no session is open."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    transformer = model.engine.pipeline.transformer
    text_cache.install(transformer)
    torch.manual_seed(0)
    latents, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 12, transformer.config.caption_channels)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 6:] = 0

    def run():
        with torch.no_grad():
            return transformer(latents, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep=torch.tensor([500, 500]), added_cond_kwargs={"resolution": None,
                                                                                      "aspect_ratio": None}).sample
    ours = run()
    processors = [block.attn2.processor for block in transformer.transformer_blocks]
    try:
        for block in transformer.transformer_blocks:
            block.attn2.set_processor(AttnProcessor2_0())
        assert torch.equal(ours, run())
    finally:
        for block, processor in zip(transformer.transformer_blocks, processors):
            block.attn2.set_processor(processor)
