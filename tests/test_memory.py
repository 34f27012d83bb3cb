"""Memory modes, many prompts per call, VAE tiling: less memory or more throughput, the same images."""

import numpy as np
import pytest
import torch

from pixart_sigma import PixArtSigmaModel, SettingsError, read_settings
from pixart_sigma.placement import PartSizes, Placement, choose_mode

PROMPT = "a red circle on a blue background"
GIB = 2**30
# The release sizes in bfloat16: T5-XXL encoder 4.76 B, DiT-XL/2 0.61 B, SDXL VAE 84 M parameters.
RELEASE = PartSizes(text_encoder=int(9.5 * GIB), transformer=int(1.2 * GIB), vae=int(0.16 * GIB))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("free_gib, mode", [
    (139, "resident"),  # an H200
    (14, "resident"),  # 9.5 + 1.2 + 0.16 + 3 GiB of activations = 13.9
    (12, "text-offload"),  # T5 alone while it encodes (10.9 with the rest), 4.4 while denoising
    (10, "model-offload"),  # at most T5 alone (9.5) on the card at any time
    (6, "sequential-offload"),  # a 6-8 GB card: block by block
])
def test_auto_picks_the_fastest_mode_that_fits_the_free_memory(free_gib, mode):
    assert choose_mode(int(free_gib * GIB), RELEASE) == mode


class RecordingPart(torch.nn.Module):
    """A part that records where it is sent (without moving: this machine may have no GPU)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


@pytest.mark.parametrize("mode, expected", [
    ("resident", {"text_encoder": ["cuda:0"], "transformer": ["cuda:0"], "vae": ["cuda:0"]}),
    ("text-offload", {"text_encoder": ["cuda:0", "cpu"], "transformer": ["cuda:0"], "vae": ["cuda:0"]}),
    ("model-offload", {"text_encoder": ["cuda:0", "cpu"], "transformer": ["cuda:0", "cpu"], "vae": ["cuda:0", "cpu"]}),
    ("sequential-offload", {"text_encoder": [], "transformer": [], "vae": []}),  # its hooks move blocks
])
def test_each_mode_puts_a_part_on_the_device_only_while_it_runs(mode, expected):
    parts = {name: RecordingPart() for name in expected}
    placement = Placement(mode, torch.device("cuda:0"), parts)
    for name in ("text_encoder", "transformer", "vae"):
        with placement.using(name) as module:
            assert module is parts[name]
            if mode != "sequential-offload":
                assert module.moves[-1] == "cuda:0"  # on the device while it runs
    assert {name: part.moves for name, part in parts.items()} == expected


def test_a_part_goes_back_off_the_device_even_when_its_stage_fails():
    part = RecordingPart()
    placement = Placement("model-offload", torch.device("cuda:0"), {"text_encoder": part})
    with pytest.raises(RuntimeError):
        with placement.using("text_encoder"):
            raise RuntimeError("out of memory")
    assert part.moves == ["cuda:0", "cpu"]


def test_a_move_that_runs_out_of_memory_half_way_leaves_nothing_split():
    class FailingPart(RecordingPart):
        def to(self, device):
            super().to(device)
            if str(device) != "cpu":
                raise RuntimeError("CUDA out of memory")
            return self

    part = FailingPart()
    with pytest.raises(RuntimeError, match="out of memory"):
        with Placement("text-offload", torch.device("cuda:0"), {"text_encoder": part}).using("text_encoder"):
            pass
    assert part.moves == ["cuda:0", "cpu"]  # sent back whole: the next call starts clean


def test_a_part_another_engine_keeps_on_the_device_is_not_moved_off():
    shared = RecordingPart()
    resident = Placement("resident", torch.device("cuda:0"), {"text_encoder": shared})
    offloading = Placement("text-offload", torch.device("cuda:0"), {"text_encoder": shared})
    with offloading.using("text_encoder"):
        pass
    assert shared.moves == ["cuda:0"]  # not dragged back and forth under the resident engine
    del resident
    import gc

    gc.collect()
    with offloading.using("text_encoder"):
        pass
    assert shared.moves[-1] == "cpu"  # once no engine keeps it, it waits in RAM again


def test_auto_reads_the_free_memory_with_what_torch_has_cached(monkeypatch):
    from pixart_sigma.placement import resolve_mode

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(8 * GIB), int(16 * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: int(4 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: int(1 * GIB))
    # 8 GiB free + 3 GiB cached by torch's allocator = 11 GiB: text-offload (10.9) fits, resident (13.9) not.
    assert resolve_mode("auto", torch.device("cuda:0"), lambda: RELEASE) == "text-offload"
    assert resolve_mode("model-offload", torch.device("cuda:0"), lambda: 1 / 0) == "model-offload"  # never asked
    assert resolve_mode("auto", torch.device("cpu"), lambda: 1 / 0) == "resident"


def test_sequential_offload_streams_the_text_encoder_block_by_block(tiny):
    engine = PixArtSigmaModel(model_name=tiny, device="cpu", memory="sequential-offload").engine
    hooked = {name for name, module in engine.pipeline.text_encoder.named_modules()
              if getattr(module, "_diffusers_hook", None) is not None}
    # Not the whole T5 as one group (9.5 GB at once on the card): each of its blocks on its own.
    assert {"encoder.block.0", "encoder.block.1"} <= hooked
    assert any(name.startswith("transformer_blocks.") for name, module in engine.pipeline.transformer.named_modules()
               if getattr(module, "_diffusers_hook", None) is not None)


def test_every_memory_mode_gives_the_same_pixels(tiny):
    # On the CPU the offload target is the device itself, so text- and model-offload move nothing here (the
    # Placement tests above check their moves); sequential-offload really runs diffusers' group-offloading
    # hooks through T5, the transformer and the VAE.
    images = {}
    for memory in ("resident", "text-offload", "model-offload", "sequential-offload", "auto"):
        model = PixArtSigmaModel(model_name=tiny, device="cpu", seed=3, num_inference_steps=3, memory=memory)
        assert model.engine.memory == ("resident" if memory == "auto" else memory)
        images[memory] = model.generate(PROMPT, negative_prompt="green")[0]
        assert "memory" not in read_settings(images[memory])  # where it ran is no part of the image's record
    for memory, image in images.items():
        assert np.array_equal(pixels(image), pixels(images["resident"])), memory


def test_streamed_parts_are_not_shared_with_engines_that_move_whole_parts(tiny):
    streamed = PixArtSigmaModel(model_name=tiny, device="cpu", memory="sequential-offload").engine
    resident = PixArtSigmaModel(model_name=tiny, device="cpu", memory="resident").engine
    whole = PixArtSigmaModel(model_name=tiny, device="cpu", memory="model-offload").engine
    assert streamed.pipeline.text_encoder is not resident.pipeline.text_encoder
    assert whole.pipeline.text_encoder is resident.pipeline.text_encoder  # same weights, moved as a whole


def test_memory_is_chosen_at_load_not_per_call(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=2)
    with pytest.raises(SettingsError, match="memory cannot change per call"):
        model.generate(PROMPT, memory="model-offload")
    with pytest.raises(SettingsError, match="memory='tiny-vram' is not valid: choose one of"):
        PixArtSigmaModel(model_name=tiny, memory="tiny-vram")


# -- many prompts per call ------------------------------------------------------------------------
def test_many_prompts_in_one_batch_give_each_prompt_its_own_images(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=3, num_images_per_prompt=2)
    prompts = ["a red circle", "a blue square on green", "a red circle"]
    batched = model.generate_many(prompts, seeds=[10, 20, 30])
    assert [len(images) for images in batched] == [2, 2, 2]
    for prompt, first, images in zip(prompts, [10, 20, 30], batched):
        alone = model.generate(prompt, seed=first)
        for image, single in zip(images, alone):
            assert read_settings(image) | {"version": None} == read_settings(single) | {"version": None}
            # One batch or one call each: the same pixels (the same kernels, rows computed independently).
            assert np.abs(pixels(image) - pixels(single)).max() <= 1
    assert [read_settings(image)["seed"] for image in batched[1]] == [20, 21]
    assert not np.array_equal(pixels(batched[0][0]), pixels(batched[1][0]))


def test_many_prompts_with_a_fixed_seed_each_start_from_it(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=2, seed=5)
    images = model.generate_many(["a fox", "a cat"])
    assert [read_settings(group[0])["seed"] for group in images] == [5, 5]
    drawn = model.generate_many(["a fox", "a cat"], seeds=[np.int64(9), -1])  # numpy integers; -1 draws
    assert read_settings(drawn[0][0])["seed"] == 9 and read_settings(drawn[1][0])["seed"] >= 0


def test_new_prompts_bring_the_text_encoder_to_the_device_once_per_call(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=1, memory="model-offload")
    engine = model.engine
    entered = []
    real_using = engine.placement.using

    def counting(part):
        entered.append(part)
        return real_using(part)

    engine.placement.using = counting
    model.generate_many(["one new prompt", "another new prompt", "a third"], negative_prompt="a new negative")
    assert entered.count("text_encoder") == 1
    entered.clear()
    model.generate_many(["one new prompt", "a third"], negative_prompt="a new negative")  # all cached
    assert entered.count("text_encoder") == 0


@pytest.mark.parametrize("call, fragment", [
    (lambda m: m.generate_many("a fox"), "pass a list of prompts"),
    (lambda m: m.generate_many([]), "prompts is empty"),
    (lambda m: m.generate_many(["a fox", ""]), "prompts[1]: prompt is empty"),
    (lambda m: m.generate_many(["a fox", "a cat"], seeds=[1]), "one first seed per prompt (2)"),
    (lambda m: m.generate_many(["a fox"], seeds=[-2]), "seeds[0]=-2 is not valid"),
    (lambda m: m.generate_many(["a fox"], seeds=[True]), "seeds[0]=True is not valid"),
    (lambda m: m.generate_many(["a fox"] * 17, width=1024, height=1024),
     "width x height x num_images_per_prompt x prompts per call = 1024x1024x1x17"),
    (lambda m: m.generate_many(["a fox"] * 65), "65 prompts x num_images_per_prompt=1 = 65 images is too many"),
    (lambda m: m.generate_many(["a fox"] * 5, num_images_per_prompt=16), "at most 64"),
    (lambda m: m.generate("a fox", seeds=[77]), "unknown setting 'seeds'"),
])
def test_many_prompts_are_checked_before_any_work(tiny, call, fragment):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=2)
    calls = model.engine.text_encoder_calls
    with pytest.raises(SettingsError) as info:
        call(model)
    assert fragment in str(info.value)
    assert model.engine.text_encoder_calls == calls


# -- VAE tiling -----------------------------------------------------------------------------------
def test_vae_tiling_decodes_large_images_in_tiles_close_to_the_whole_decode(tiny):
    # The tiny VAE tiles above 64 px (its sample_size), as the SDXL VAE does above 1024 px.
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=2, num_inference_steps=3,
                             width=192, height=128)
    whole = model.generate(PROMPT)[0]
    tiled = model.generate(PROMPT, vae_tiling=True)[0]
    assert tiled.size == whole.size == (192, 128)
    assert read_settings(tiled)["vae_tiling"] is True and read_settings(whole)["vae_tiling"] is False
    difference = pixels(tiled) - pixels(whole)
    assert np.abs(difference).max() > 0  # it really decoded in tiles
    mse = float(np.mean(difference.astype(np.float64) ** 2))
    assert 10 * np.log10(255**2 / mse) > 20  # seams blended: close to the whole decode
    assert np.array_equal(pixels(model.generate(PROMPT)[0]), pixels(whole))  # switched off again after the call


def test_a_pipeline_the_user_has_can_be_offloaded_too(tiny):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(tiny)
    resident = PixArtSigmaModel.from_pipeline(pipe, seed=4, num_inference_steps=2).generate(PROMPT)[0]
    streamed = PixArtSigmaModel.from_pipeline(pipe, memory="sequential-offload", seed=4, num_inference_steps=2)
    assert streamed.engine.memory == "sequential-offload"
    assert np.array_equal(pixels(streamed.generate(PROMPT)[0]), pixels(resident))
    with pytest.raises(SettingsError, match="name the mode"):
        PixArtSigmaModel.from_pipeline(pipe, memory="auto")


# -- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_gives_the_eager_images_within_a_level_and_keeps_its_code_on_disk(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compiled"))
    model = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", seed=6, num_inference_steps=3)
    eager = model.generate(PROMPT)[0]
    fast = model.generate(PROMPT, compile=True)[0]  # compiles here (about a minute on 2 cores)
    assert read_settings(fast)["compile"] is True and read_settings(eager)["compile"] is False
    assert np.abs(pixels(fast) - pixels(eager)).max() <= 1
    assert np.array_equal(pixels(model.generate(PROMPT, compile=True)[0]), pixels(fast))  # reused, same pixels
    assert any((tmp_path / "compiled").rglob("*.py")), "the compiled code should be on disk for the next process"
    timed = model.engine.denoiser(True)
    assert len(timed.first_call_seconds) == 1  # one input shape, compiled once


def test_compile_refuses_the_mode_that_streams_weights(tiny):
    model = PixArtSigmaModel(model_name=tiny, device="cpu", num_inference_steps=2, memory="sequential-offload")
    for call in (model.generate, model.validate_call):  # a service hears it before it queues the job
        with pytest.raises(SettingsError, match="compile=True cannot be used with memory='sequential-offload'"):
            call(PROMPT, compile=True)


def test_cuda_graphs_only_where_the_weights_stay_put(monkeypatch, tmp_path):
    from pixart_sigma.compiling import cache_dir, compile_mode

    assert compile_mode(torch.device("cuda:0"), resident=True) == "reduce-overhead"
    assert compile_mode(torch.device("cuda:0"), resident=False) == "default"  # moved weights: stale graph addresses
    assert compile_mode(torch.device("cpu"), resident=True) == "default"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "pixart-sigma" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # torch's own variable wins
