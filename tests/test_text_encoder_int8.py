"""text_encoder_dtype=int8: T5's Linear weights in int8 (torchao), activations in bfloat16 on this CPU.

About half of bfloat16's memory, embeddings very close to bfloat16's; recorded as int8 and replayed by
--from; refused by name where it cannot run (mps, memory=sequential-offload)."""

import numpy as np
import pytest
import torch

pytest.importorskip("torchao", reason="text_encoder_dtype=int8 needs the int8 extra (make test installs it)")
from PIL import Image

import pixart_sigma.devices as devices
from pixart_sigma import PixArtSigmaModel, SettingsError, read_settings
from pixart_sigma.checkpoints import locate, parameter_count, resolve_checkpoint
from pixart_sigma.cli import main
from pixart_sigma.demo_world import evaluation_prompts
from pixart_sigma.devices import INT8, held_dtype, module_bytes
from pixart_sigma.settings import MAX_SEQUENCE_LENGTH, parse_settings

# benchmarks/text_encoder_int8.py measured the demo T5's int8 embeddings at cosine 0.99995 mean, 0.99991 min
# (20 demo prompts, bfloat16 activations); the floor leaves a margin for other CPUs' rounding.
COSINE_FLOOR = 0.999
MAX_BYTES_RATIO = 0.6  # of bfloat16's: the demo T5 measured 0.56 (its embedding, kept in bfloat16, is a large share)


@pytest.fixture(autouse=True)
def native_bfloat16(monkeypatch):
    """Pinned formats: int8's activations in bfloat16 (as on CPUs with AVX512-BF16 or AMX), whatever this CPU is."""
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)


def demo(text_encoder_dtype: str, **settings) -> PixArtSigmaModel:
    return PixArtSigmaModel(model_name="demo", device="cpu", dtype="bfloat16", text_encoder_dtype=text_encoder_dtype,
                            num_inference_steps=2, seed=7, **settings)


def linear_weights(encoder) -> list[torch.Tensor]:
    return [module.weight for module in encoder.modules() if isinstance(module, torch.nn.Linear)]


def test_int8_generates_an_image_of_the_right_size_and_records_int8():
    model = demo("int8")
    assert model.settings["torch_text_encoder_dtype"] == INT8
    image = model.generate("a red circle on a blue background")[0]
    assert image.size == (64, 64)
    assert read_settings(image)["text_encoder_dtype"] == "int8"
    encoder = model.engine.text.encoder
    assert held_dtype(encoder) == INT8 and encoder.dtype == torch.bfloat16  # int8 weights, bfloat16 activations
    assert all(devices.tensor_bytes(weight) < weight.numel() * 2 for weight in linear_weights(encoder))


def test_int8_t5_holds_at_most_0_6_of_bfloat16s_bytes_and_is_its_own_part():
    int8, bf16 = demo("int8").engine, demo("bfloat16").engine
    assert int8.text is not bf16.text and int8.text.encoder is not bf16.text.encoder  # distinct shared keys
    assert int8.pipeline.transformer is bf16.pipeline.transformer  # the rest is shared as before
    assert module_bytes(int8.text.encoder) <= MAX_BYTES_RATIO * module_bytes(bf16.text.encoder)
    assert held_dtype(bf16.text.encoder) == torch.bfloat16


def test_part_sizes_count_one_byte_per_int8_weight():
    from pixart_sigma.engine import _part_sizes

    located = locate(resolve_checkpoint("demo"))
    weights = parameter_count(located.folders["text_encoder"])
    assert _part_sizes(located, torch.bfloat16, INT8).text_encoder == weights
    assert _part_sizes(located, torch.bfloat16, torch.bfloat16).text_encoder == 2 * weights


def test_int8_embeddings_stay_close_to_bfloat16s():
    int8, bf16 = demo("int8").engine, demo("bfloat16").engine
    for prompt, _ in evaluation_prompts(8, seed=0):
        a = int8.encode(prompt, MAX_SEQUENCE_LENGTH, use_cache=False)
        b = bf16.encode(prompt, MAX_SEQUENCE_LENGTH, use_cache=False)
        keep = b.mask[0].bool()
        assert a.embeds.dtype == b.embeds.dtype == torch.bfloat16
        cosine = torch.nn.functional.cosine_similarity(a.embeds[0][keep].float().flatten(),
                                                       b.embeds[0][keep].float().flatten(), dim=0)
        assert cosine > COSINE_FLOOR, prompt


def test_from_replays_int8(tmp_path, capsys):
    def run(*argv):
        code = main([str(a) for a in argv])
        out, _ = capsys.readouterr()
        return code, [line.split("  ")[0] for line in out.strip().splitlines()]

    code, files = run("generate", "a red circle", "--model-name", "demo", "--dtype", "bfloat16",
                      "--text-encoder-dtype", "int8", "--num-inference-steps", 2, "--seed", 4, "-o",
                      tmp_path / "first", "-q")
    assert code == 0 and read_settings(files[0])["text_encoder_dtype"] == "int8"
    code, again = run("generate", "--from", files[0], "-o", tmp_path / "again", "-q")
    assert code == 0 and read_settings(again[0])["text_encoder_dtype"] == "int8"
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(files[0])))


def test_int8_is_a_text_encoder_format_only():
    assert parse_settings({"text_encoder_dtype": "int8"}).text_encoder_dtype == "int8"
    with pytest.raises(SettingsError, match="dtype"):
        parse_settings({"dtype": "int8"})
    with pytest.raises(SettingsError, match="int8"):  # the valid choices are listed
        parse_settings({"text_encoder_dtype": "int4"})


def test_int8_is_refused_on_mps_by_name():
    with pytest.raises(SettingsError, match=r"text_encoder_dtype='int8' is not supported on mps.*'bfloat16'"):
        devices.text_encoder_dtype("int8", "auto", torch.device("mps"), torch.float32)


def test_int8_is_refused_with_sequential_offload_by_name():
    with pytest.raises(SettingsError, match=r"text_encoder_dtype='int8' cannot be used with "
                                            r"memory='sequential-offload'.*model-offload"):
        demo("int8", memory="sequential-offload")


def test_int8_is_refused_when_memory_auto_picks_sequential_offload(monkeypatch):
    import pixart_sigma.engine as engine

    engine.unload_all()  # not the warm int8 engine of the tests above: a load that decides its mode
    monkeypatch.setattr(engine, "resolve_mode", lambda mode, device, sizes_of: "sequential-offload")
    with pytest.raises(SettingsError, match="memory=auto picks it"):
        engine.get_engine(resolve_checkpoint("demo"), torch.device("cpu"), torch.bfloat16, INT8, "auto")


def test_int8_computes_in_bfloat16_on_every_cpu_so_a_record_decides_the_pixels(monkeypatch):
    """A record says only "int8": the activations' format must not depend on whether this CPU has native bfloat16."""
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native)
        assert devices.int8_activation_dtype(torch.device("cpu")) == torch.bfloat16
