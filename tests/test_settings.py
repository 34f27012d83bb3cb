"""The bad-input checklist at the library level: every error names the field, the value and what is valid."""

import math

import jsonschema
import pytest
import torch

from pixart_sigma import PixArtSigmaModel, SettingsError
from pixart_sigma.devices import cpu_has_native_bfloat16
from pixart_sigma.settings import Settings

NAMES = ["model_name", "negative_prompt", "num_inference_steps", "guidance_scale", "device", "seed", "width",
         "height", "num_images_per_prompt"]


def errors_for(tiny, **raw) -> str:
    with pytest.raises(SettingsError) as info:
        PixArtSigmaModel.validate_and_transform({"model_name": tiny, **raw})
    return str(info.value)


@pytest.mark.parametrize("raw, expected", [
    ({"width": 1001}, ["width=1001", "multiple of 8", "1000 or 1008"]),
    ({"height": 1001}, ["height=1001", "1000 or 1008"]),
    ({"width": 0}, ["width=0", "nearest valid: 64"]),
    ({"width": -8}, ["width=-8", "nearest valid: 64"]),
    ({"width": 56}, ["width=56", "nearest valid: 64"]),
    ({"height": 4096}, ["height=4096", "nearest valid: 2048"]),
    ({"width": 2048, "height": 2048, "num_images_per_prompt": 8}, ["2048x2048x8", "at most 4 images"]),
    ({"num_inference_steps": 0}, ["num_inference_steps=0", "from 1 to 200"]),
    ({"num_inference_steps": -3}, ["num_inference_steps=-3", "from 1 to 200"]),
    ({"num_inference_steps": 201}, ["num_inference_steps=201", "from 1 to 200"]),
    ({"num_inference_steps": 2.5}, ["num_inference_steps=2.5", "integer"]),
    ({"guidance_scale": math.nan}, ["guidance_scale=nan", "finite"]),
    ({"guidance_scale": math.inf}, ["guidance_scale=inf", "finite"]),
    ({"guidance_scale": -0.5}, ["guidance_scale=-0.5", "from 0.0 to 20.0"]),
    ({"guidance_scale": 20.5}, ["guidance_scale=20.5", "from 0.0 to 20.0"]),
    ({"guidance_scale": "high"}, ["guidance_scale='high'", "a number"]),
    ({"seed": -2}, ["seed=-2", "-1 draws a random seed"]),
    ({"seed": 2**53}, ["seed=9007199254740992", "9007199254740991"]),
    ({"seed": 4.2}, ["seed=4.2", "integer"]),
    ({"seed": True}, ["seed=True", "integer"]),
    ({"seed": "7"}, ["seed='7'", "integer"]),
    ({"num_images_per_prompt": 0}, ["num_images_per_prompt=0", "from 1 to 16"]),
    ({"num_images_per_prompt": -1}, ["num_images_per_prompt=-1", "from 1 to 16"]),
    ({"num_images_per_prompt": 10**6}, ["num_images_per_prompt=1000000", "from 1 to 16"]),
    ({"scheduler": "plms"}, ["scheduler='plms'", "'dpm-solver++'", "'unipc'"]),
    ({"dtype": "int8"}, ["dtype='int8'", "'bfloat16'"]),
    ({"max_sequence_length": 301}, ["max_sequence_length=301", "from 1 to 300"]),
    ({"negative_prompt": "blurry\x00"}, ["negative_prompt", "U+0000"]),
    ({"cfg": 7}, ["unknown setting 'cfg'", *NAMES]),
    ({"device": "tpu"}, ["device='tpu'", "cuda:N"]),
    ({"dtype": "float16", "device": "cpu"}, ["float16", "CPU", "float32"]),
    # Crafted values that used to escape as other exceptions (ValueError from int(), OSError, the current folder).
    ({"device": "cuda:²"}, ["device='cuda:²'", "cuda:N"]),
    ({"device": "cuda:" + "9" * 5000}, ["device is 5005 characters long"]),
    ({"device": "cuda:" + "9" * 150}, ["device='cuda:999", "cuda:N"]),
    ({"device": "GPU ٣"}, ["device='GPU ٣'", "cuda:N"]),
    ({"model_name": "x" * 5000}, ["model_name is 5000 characters long", "at most 1024"]),
    ({"model_name": "x" * 1000}, ["model_name='xxxx", "cannot be a directory here"]),
    ({"model_name": ""}, ["model_name is empty"]),
    ({"model_name": "   "}, ["model_name is empty"]),
    ({"model_name": "demo\x00"}, ["model_name", "U+0000"]),
])
def test_bad_settings_are_named_with_what_is_valid(tiny, raw, expected):
    message = errors_for(tiny, **raw)
    for fragment in expected:
        assert fragment in message


def test_every_problem_is_reported_at_once(tiny):
    message = errors_for(tiny, width=13, seed=-5, foo=1)
    assert "width=13" in message and "seed=-5" in message and "unknown setting 'foo'" in message


def test_seed_plus_batch_must_stay_in_range(tiny):
    assert "seed + k" in errors_for(tiny, seed=2**53 - 1, num_images_per_prompt=2)


def test_zero_is_a_valid_fixed_seed(tiny):
    assert PixArtSigmaModel.validate_and_transform({"model_name": tiny, "seed": 0})["seed"] == 0


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(SettingsError) as info:
        PixArtSigmaModel.validate_and_transform({"model_name": "stabilityai/sdxl"})
    assert "PixArt-alpha/PixArt-Sigma-XL-2-512-MS" in str(info.value) and "demo" in str(info.value)


def test_validate_returns_values_and_the_objects_the_model_needs(tiny):
    values = PixArtSigmaModel.validate_and_transform({"model_name": tiny, "device": "CPU"})
    assert values["torch_device"] == torch.device("cpu")
    # auto on a CPU: bfloat16 where it is native (AVX512-BF16, AMX), else float32; T5 in bfloat16 either way.
    assert values["torch_dtype"] == (torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32)
    assert values["torch_text_encoder_dtype"] == torch.bfloat16 and values["text_encoder_dtype"] == "auto"
    assert values["memory"] == "auto"
    assert values["checkpoint"].pipeline_source == tiny
    assert (values["width"], values["height"]) == (64, 64)  # the checkpoint's native size
    assert values["num_inference_steps"] == 20 and values["guidance_scale"] == 4.5 and values["seed"] == -1


def test_every_refusal_is_a_pixart_sigma_error(tiny):
    from pixart_sigma import CheckpointError, GenerationError, MetadataError, PixArtSigmaError

    for error in (SettingsError, CheckpointError, GenerationError, MetadataError):
        assert issubclass(error, PixArtSigmaError)
    with pytest.raises(PixArtSigmaError):
        PixArtSigmaModel.validate_and_transform({"model_name": tiny, "device": "cuda:²"})


def test_auto_dtype_takes_float16_on_gpus_that_only_emulate_bfloat16(monkeypatch):
    from pixart_sigma.devices import resolve_dtype

    asked = {}

    def bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a T4 or V100: emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert asked == {"including_emulation": False}


def test_auto_device_picks_apple_silicon_when_there_is_no_cuda(monkeypatch):
    from pixart_sigma.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("label", ["cpu", "CPU", "Cpu"])
def test_cpu_labels(tiny, label):
    assert PixArtSigmaModel.validate_and_transform({"model_name": tiny, "device": label})["torch_device"].type == "cpu"


def test_auto_takes_the_first_gpu_if_there_is_one(tiny):
    values = PixArtSigmaModel.validate_and_transform({"model_name": tiny, "device": "auto"})
    if torch.cuda.is_available():
        assert str(values["torch_device"]) == "cuda:0"
        assert values["torch_dtype"] in (torch.bfloat16, torch.float16)  # bfloat16 where the GPU supports it
    else:
        assert str(values["torch_device"]) == "cpu"
        assert values["torch_dtype"] == (torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32)


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_a_cpu_never_holds_a_float32_text_encoder(monkeypatch, native):
    from pixart_sigma.devices import resolve_dtype, text_encoder_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    dtype = resolve_dtype("auto", cpu)
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert text_encoder_dtype("auto", "auto", cpu, dtype) == torch.bfloat16  # T5-XXL: 9.5 GB, not 19
    assert text_encoder_dtype("auto", "float32", cpu, torch.float32) == torch.float32  # asked for: the exact reference
    assert text_encoder_dtype("bfloat16", "float32", cpu, torch.float32) == torch.bfloat16  # replayed from a record
    with pytest.raises(SettingsError, match="text_encoder_dtype='float16' is not supported on the CPU"):
        text_encoder_dtype("float16", "float32", cpu, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("label", ["GPU", "gpu", "cuda", "cuda:3", "GPU 0: NVIDIA H100 - Compute Capability 9.0"])
def test_missing_gpu_is_an_error_that_lists_what_is_there(tiny, label):
    message = errors_for(tiny, device=label)
    assert "not available here" in message and "cpu" in message


def test_defaults_match_the_component_table():
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert defaults["model_name"] == "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    assert defaults["negative_prompt"] is None
    assert defaults["num_inference_steps"] == 20 and defaults["guidance_scale"] == 4.5
    assert defaults["seed"] == -1 and defaults["num_images_per_prompt"] == 1
    assert defaults["scheduler"] == "dpm-solver++" and defaults["use_resolution_binning"] is True
    assert defaults["max_sequence_length"] == 300 and defaults["dtype"] == "auto"
    assert defaults["memory"] == "auto" and defaults["vae_tiling"] is False


def test_schema_is_valid_draft_2020_12_and_describes_every_field():
    schema = PixArtSigmaModel.get_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert set(NAMES) <= set(schema["properties"])
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
        assert "default" in prop, name
    assert schema["properties"]["scheduler"]["enum"] == ["dpm-solver++", "sa-solver", "euler", "euler-ancestral",
                                                         "ddim", "unipc"]
    assert schema["properties"]["width"]["multipleOf"] == 8


def test_schema_agrees_with_validation():
    validator = jsonschema.Draft202012Validator(PixArtSigmaModel.get_schema())
    assert validator.is_valid({"width": 512, "seed": 0})
    for bad in ({"width": 1001}, {"seed": -2}, {"num_inference_steps": 0}, {"nope": 1}, {"scheduler": "x"}):
        assert not validator.is_valid(bad), bad
