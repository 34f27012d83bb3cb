"""step_cache: fewer full transformer steps (counted in the blocks themselves), recorded and replayed, the same image
in any batch, gone after the call, refused where it cannot work. What it costs in meaning: test_demo_model.py's
held-out check with a step cache, and tools/evaluate_step_cache.py."""

import math

import numpy as np
import pytest

from pixart_sigma import PixArtSigmaModel, SettingsError
from pixart_sigma.images import read_settings, reproducible_settings, save_image

PROMPT = "a large red circle on a white background"


@pytest.fixture(scope="module")
def model():
    return PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", num_inference_steps=20, seed=4)


class Calls:
    """Counts the forward calls of some modules."""

    def __init__(self, modules: dict):
        self.counts = {name: 0 for name in modules}
        self.handles = [module.register_forward_hook(self._counter(name)) for name, module in modules.items()]

    def _counter(self, name):
        def count(*_):
            self.counts[name] += 1
        return count

    def close(self):
        for handle in self.handles:
            handle.remove()


def block_calls(model) -> Calls:
    blocks = model.engine.pipeline.transformer.transformer_blocks
    return Calls({"first": blocks[0].attn1.to_q, "second": blocks[1].attn1.to_q, "last_ff": blocks[-1].ff.net[0],
                  "last_cross": blocks[-1].attn2.to_q})


def full_steps(image) -> int:
    return read_settings(image)["full_transformer_steps"]


def test_off_by_default_runs_every_step_in_full(model):
    calls = block_calls(model)
    try:
        image = model.generate(PROMPT)[0]
    finally:
        calls.close()
    record = read_settings(image)
    assert record["step_cache"] == "off" and record["full_transformer_steps"] == 20
    assert calls.counts == {"first": 20, "second": 20, "last_ff": 20, "last_cross": 20}


def test_first_block_skips_the_other_blocks_on_the_steps_it_reuses(model):
    calls = block_calls(model)
    try:
        image = model.generate(PROMPT, step_cache="first-block", step_cache_threshold=0.3)[0]
    finally:
        calls.close()
    full = full_steps(image)
    assert 3 <= full <= 12  # the warm-up's step and the cool-down's 2 always run; the demo measured 8 of 20 at 0.3
    assert calls.counts == {"first": 20, "second": full, "last_ff": full, "last_cross": full}
    record = read_settings(image)
    assert record["step_cache"] == "first-block" and record["step_cache_threshold"] == 0.3


def test_first_block_below_any_change_is_the_uncached_image_bit_for_bit(model):
    plain = np.asarray(model.generate(PROMPT)[0])
    image = model.generate(PROMPT, step_cache="first-block", step_cache_threshold=1e-9)[0]
    assert full_steps(image) == 20
    assert np.array_equal(np.asarray(image), plain)


@pytest.mark.parametrize("method", ["taylorseer", "taylorseer-lite"])
@pytest.mark.parametrize("interval, warmup, cooldown, expected", [(2, 1, 2, 11), (2, 3, 2, 12), (4, 1, 0, 6)])
def test_taylorseer_runs_the_blocks_every_interval_between_warmup_and_cooldown(model, method, interval, warmup,
                                                                                cooldown, expected):
    calls = block_calls(model)
    try:
        image = model.generate(PROMPT, step_cache=method, step_cache_interval=interval,
                               step_cache_warmup=warmup, step_cache_cooldown=cooldown)[0]
    finally:
        calls.close()
    assert full_steps(image) == expected
    assert calls.counts == {"first": expected, "second": expected, "last_ff": expected, "last_cross": expected}


@pytest.mark.parametrize("cache", [{"step_cache": "first-block", "step_cache_threshold": 0.2},
                                   {"step_cache": "taylorseer", "step_cache_interval": 3},
                                   {"step_cache": "taylorseer-lite"}])
def test_a_cached_image_is_the_same_alone_or_in_a_batch(model, image_array, cache):
    """First-block decides per image (diffusers' hook decides per batch): a neighbour never changes an image."""
    batch = model.generate(PROMPT, seed=30, num_images_per_prompt=3, **cache)
    alone = model.generate(PROMPT, seed=32, **cache)[0]
    assert full_steps(alone) == full_steps(batch[2])
    assert np.abs(image_array(alone) - image_array(batch[2])).max() <= 1
    mixed = model.generate_many([PROMPT, "a small blue square at the top"], seeds=[32, 40], **cache)
    assert np.abs(image_array(alone) - image_array(mixed[0][0])).max() <= 1


def test_the_cache_works_without_guidance_and_with_a_negative_prompt(model):
    for settings in ({"guidance_scale": 1.0}, {"negative_prompt": "a blue square"}):
        for cache in ({"step_cache": "first-block", "step_cache_threshold": 0.3},
                      {"step_cache": "taylorseer"}, {"step_cache": "taylorseer-lite"}):
            image = model.generate(PROMPT, **settings, **cache)[0]
            assert image.size == (64, 64) and full_steps(image) < 20


def test_the_hooks_are_gone_after_a_call_even_a_failed_one(model):
    plain = np.asarray(model.generate(PROMPT)[0])

    def fail(step, total):
        if step == 5:
            raise RuntimeError("stop here")

    for cache in ({"step_cache": "first-block", "step_cache_threshold": 0.3}, {"step_cache": "taylorseer"},
                  {"step_cache": "taylorseer-lite"}):
        with pytest.raises(RuntimeError, match="stop here"):
            model.generate(PROMPT, on_progress=fail, **cache)
        transformer = model.engine.pipeline.transformer
        assert not [name for name, module in transformer.named_modules()
                    if getattr(getattr(module, "_diffusers_hook", None), "hooks", None)]
        assert np.array_equal(np.asarray(model.generate(PROMPT)[0]), plain)


def test_a_record_remakes_the_cached_image(model, tmp_path):
    image = model.generate(PROMPT, step_cache="taylorseer", step_cache_interval=3, step_cache_warmup=4)[0]
    path = save_image(image, tmp_path / "cached.png")
    settings = reproducible_settings(read_settings(path))
    assert (settings["step_cache"], settings["step_cache_interval"], settings["step_cache_warmup"]) == (
        "taylorseer", 3, 4)
    assert settings["model_name"] == "demo" and settings["dtype"] == "float32"
    again = PixArtSigmaModel(device="cpu", **settings).generate(PROMPT)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_compile_with_a_step_cache_is_refused_by_name(model):
    with pytest.raises(SettingsError, match="step_cache='first-block' cannot be used with compile=True"):
        model.generate(PROMPT, step_cache="first-block", compile=True)
    with pytest.raises(SettingsError, match="compile=True"):
        PixArtSigmaModel(model_name="demo", step_cache="taylorseer", compile=True)


@pytest.mark.parametrize("settings, message", [
    ({"step_cache_threshold": 0}, "step_cache_threshold=0 is not valid: it must be a number above 0 and at most 1"),
    ({"step_cache_threshold": 1.5}, "step_cache_threshold=1.5 is not valid"),
    ({"step_cache_threshold": math.nan}, "step_cache_threshold=nan is not valid"),
    ({"step_cache_threshold": "0.1"}, "step_cache_threshold='0.1' is not valid: it must be a number"),
    ({"step_cache_interval": 1}, "step_cache_interval=1 is not valid: it must be from 2 to 8"),
    ({"step_cache_warmup": 0}, "step_cache_warmup=0 is not valid: it must be from 1 to 200"),
    ({"step_cache_cooldown": -1}, "step_cache_cooldown=-1 is not valid: it must be from 0 to 200"),
    ({"step_cache": "tea-cache"}, "step_cache='tea-cache' is not valid: choose one of 'off', 'first-block', "
                                  "'taylorseer' or 'taylorseer-lite'"),
])
def test_bad_cache_settings_are_named(model, settings, message):
    with pytest.raises(SettingsError) as error:
        model.generate(PROMPT, **settings)
    assert message in str(error.value)


def test_the_schema_declares_the_cache_settings():
    schema = PixArtSigmaModel.get_schema()["properties"]
    assert schema["step_cache"]["enum"] == ["off", "first-block", "taylorseer", "taylorseer-lite"]
    assert schema["step_cache_threshold"]["exclusiveMinimum"] == 0 and schema["step_cache_threshold"]["maximum"] == 1
    assert (schema["step_cache_interval"]["minimum"], schema["step_cache_interval"]["maximum"]) == (2, 8)


def test_the_cache_gives_the_same_image_with_model_offload_and_is_refused_when_streamed(model):
    """The hooks wrap whole blocks and their attention and feed-forward modules, outside model-offload's hooks;
    sequential-offload's own hooks on each block would displace them (on a GPU), so it is refused by name."""
    offloaded = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", num_inference_steps=20, seed=4,
                                 memory="model-offload")
    for cache in ({"step_cache": "first-block", "step_cache_threshold": 0.2}, {"step_cache": "taylorseer"},
                  {"step_cache": "taylorseer-lite"}):
        expected = model.generate(PROMPT, **cache)[0]
        image = offloaded.generate(PROMPT, **cache)[0]
        assert np.array_equal(np.asarray(image), np.asarray(expected)) and full_steps(image) == full_steps(expected)
    streamed = PixArtSigmaModel(model_name="demo", device="cpu", dtype="float32", memory="sequential-offload")
    with pytest.raises(SettingsError, match="step_cache='taylorseer' cannot be used with memory='sequential-offload'"):
        streamed.generate(PROMPT, step_cache="taylorseer")


def test_batch_names_key_only_the_cache_parameters_that_change_the_images():
    """A resumed batch finds its images: names stay as before the cache existed, and a parameter the chosen method
    does not read never renames them."""
    from pixart_sigma import plan_batch

    def name(**settings):
        values = PixArtSigmaModel.validate_and_transform({"model_name": "demo", "seed": 1, "num_inference_steps": 2,
                                                          "dtype": "float32", **settings})
        return plan_batch([(1, "a red circle")], values)[0].names[0]

    plain = name()
    assert plain == "a-red-circle-70f8d6b899e5-0.png"  # the name from before step_cache existed
    assert name(step_cache_threshold=0.3, step_cache_interval=4) == plain
    taylorseer = name(step_cache="taylorseer")
    assert taylorseer != plain and name(step_cache="taylorseer", step_cache_threshold=0.3) == taylorseer
    assert name(step_cache="taylorseer", step_cache_interval=3) != taylorseer
    first_block = name(step_cache="first-block")
    assert name(step_cache="first-block", step_cache_interval=5) == first_block
    assert name(step_cache="first-block", step_cache_threshold=0.2) != first_block


def test_the_a1111_text_carries_the_cache_and_remakes_the_image(model):
    """A copy that keeps only the A1111 `parameters` text (another tool's metadata) still says what was cached."""
    image = model.generate(PROMPT, step_cache="taylorseer-lite", step_cache_interval=3)[0]
    text = image.info["parameters"]
    assert "Step cache: taylorseer-lite, Step cache interval: 3, Step cache warm-up: 1, Step cache cool-down: 2" in text
    assert "threshold" not in text  # taylorseer reads no threshold
    image.info.pop("pixart_sigma")
    settings = reproducible_settings(read_settings(image))
    assert (settings["step_cache"], settings["step_cache_interval"], settings["step_cache_cooldown"]) == (
        "taylorseer-lite", 3, 2)
    plain = model.generate(PROMPT)[0]
    assert "Step cache" not in plain.info["parameters"]
