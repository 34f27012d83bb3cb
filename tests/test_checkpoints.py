"""Checkpoints: hub ids through the HF cache, transformer-only injection, local dirs, safetensors only."""

import pytest
import torch

from pixart_sigma import CheckpointError, PixArtSigmaModel, SettingsError
from pixart_sigma.checkpoints import load_pipeline, resolve_checkpoint
from pixart_sigma.testing import save_tiny_transformer

from conftest import BASE_REPO, REPO_512


def test_1024_id_loads_the_full_pipeline_from_the_hf_cache(hub_cache):
    model = PixArtSigmaModel(model_name=BASE_REPO, seed=1, num_inference_steps=2, width=64, height=64)
    assert len(model.generate("a red circle")) == 1


def test_512_id_puts_its_transformer_into_the_1024_pipeline(hub_cache, tiny_transformer_dir):
    from diffusers import PixArtTransformer2DModel

    pipeline = load_pipeline(resolve_checkpoint(REPO_512), torch.float32)
    expected = PixArtTransformer2DModel.from_pretrained(tiny_transformer_dir / "transformer")
    base = PixArtTransformer2DModel.from_pretrained(hub_cache[BASE_REPO] / "transformer")
    for name, tensor in pipeline.transformer.state_dict().items():
        assert torch.equal(tensor, expected.state_dict()[name]), name
    assert not all(torch.equal(t, base.state_dict()[n]) for n, t in pipeline.transformer.state_dict().items())
    assert type(pipeline.text_encoder).__name__ == "T5EncoderModel"


def test_native_sizes_of_known_checkpoints():
    for name, size in [(BASE_REPO, 1024), (REPO_512, 512), ("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", 2048), ("demo", 64)]:
        values = PixArtSigmaModel.validate_and_transform({"model_name": name, "device": "cpu"})
        assert (values["width"], values["height"]) == (size, size), name


def test_missing_weights_say_what_to_download_how_big_and_where(hub_cache):
    # The 2K transformer is not in the (offline) cache.
    with pytest.raises(CheckpointError) as info:
        PixArtSigmaModel(model_name="PixArt-alpha/PixArt-Sigma-XL-2-2K-MS")
    message = str(info.value)
    assert "hf download PixArt-alpha/PixArt-Sigma-XL-2-2K-MS" in message
    assert "GB" in message and "HF_HOME" in message and "/hub" in message
    assert BASE_REPO not in message.split("Download them")[1]  # the 1024 pipeline is already there


def test_local_transformer_only_directory(tmp_path, hub_cache):
    directory = save_tiny_transformer(tmp_path / "my-finetune", seed=7)
    model = PixArtSigmaModel(model_name=str(directory), seed=1, num_inference_steps=2)
    assert model.settings["width"] == 64  # sample_size 8 x VAE scale 8
    assert len(model.generate("a cat")) == 1


def test_pickle_only_weights_are_refused_and_never_unpickled(tmp_path, tiny_dir, monkeypatch):
    import shutil

    directory = tmp_path / "pickled"
    shutil.copytree(tiny_dir, directory)
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(SettingsError, match="only pickle weights"):
        PixArtSigmaModel(model_name=str(directory))


def test_a_directory_that_is_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="neither model_index.json"):
        PixArtSigmaModel.validate_and_transform({"model_name": str(tmp_path)})


def test_the_bundled_demo_is_a_regular_diffusers_pipeline():
    from diffusers import PixArtSigmaPipeline

    from pixart_sigma.checkpoints import DEMO_DIR

    assert PixArtSigmaPipeline.from_pretrained(DEMO_DIR) is not None
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size < 15e6
    image = PixArtSigmaModel(model_name="demo", seed=42, num_inference_steps=4).generate("a red circle")[0]
    assert image.size == (64, 64)
