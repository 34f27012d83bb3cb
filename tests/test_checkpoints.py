"""Checkpoints: hub ids through the HF cache, transformer-only injection, local dirs, safetensors only."""

import re
from pathlib import Path

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

    # diffusers' own loader reads it as a PixArt-Sigma pipeline, with every part of the release's classes.
    pipeline = PixArtSigmaPipeline.from_pretrained(DEMO_DIR)
    assert {name: type(part).__name__ for name, part in pipeline.components.items()} == {
        "transformer": "PixArtTransformer2DModel", "text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer",
        "vae": "AutoencoderKL", "scheduler": "DPMSolverMultistepScheduler"}
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size < 15e6
    image = PixArtSigmaModel(model_name="demo", seed=42, num_inference_steps=4).generate("a red circle")[0]
    assert image.size == (64, 64)


# -- a checkpoint is complete or refused, and crafted folders cannot hang or crash us ---------------
@pytest.fixture
def copy_of(tmp_path, tiny_dir):
    import shutil

    def make(name="copy"):
        return Path(shutil.copytree(tiny_dir, tmp_path / name))
    return make


def test_a_pipeline_without_its_tokenizer_is_refused_not_run_with_unk_tokens(copy_of):
    import shutil

    directory = copy_of()
    shutil.rmtree(directory / "tokenizer")
    with pytest.raises(SettingsError, match="tokenizer"):
        PixArtSigmaModel(model_name=str(directory))
    (directory / "tokenizer").mkdir()
    with pytest.raises(SettingsError, match="has no tokenizer"):
        PixArtSigmaModel(model_name=str(directory))


def test_an_incomplete_hub_cache_is_not_downloaded_and_says_what_to_fetch(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from pixart_sigma import unload_all
    from pixart_sigma.checkpoints import is_available
    from conftest import put_in_hub_cache

    unload_all()  # weights already in memory would be used as they are

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_dir / "model_index.json", partial)
    shutil.copytree(tiny_dir / "transformer", partial / "transformer")
    repo = "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"  # its transformer-only repo stands in: never cached otherwise
    put_in_hub_cache(BASE_REPO, partial)
    try:
        assert not is_available(BASE_REPO)
        with pytest.raises(CheckpointError, match="hf download PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"):
            PixArtSigmaModel(model_name=BASE_REPO)
        assert not is_available(repo)
    finally:
        put_in_hub_cache(BASE_REPO, tiny_dir)
    assert is_available(BASE_REPO)


def test_a_fifo_config_is_refused_at_once(copy_of):
    import os
    import subprocess
    import sys

    directory = copy_of()
    (directory / "vae" / "config.json").unlink()
    os.mkfifo(directory / "vae" / "config.json")
    code = f"from pixart_sigma import PixArtSigmaModel\nPixArtSigmaModel(model_name={str(directory)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "is not a regular file" in result.stderr and "vae/config.json" in result.stderr


def test_a_config_linked_to_dev_zero_is_refused_without_reading_it(copy_of):
    directory = copy_of()
    (directory / "transformer" / "config.json").unlink()
    (directory / "transformer" / "config.json").symlink_to("/dev/zero")
    with pytest.raises(SettingsError, match="not a regular file"):
        PixArtSigmaModel(model_name=str(directory))


def test_an_oversized_config_is_refused(copy_of):
    directory = copy_of()
    (directory / "scheduler" / "scheduler_config.json").write_text("{" + " " * (2 << 20) + "}")
    with pytest.raises(SettingsError, match="at most"):
        PixArtSigmaModel(model_name=str(directory))


@pytest.mark.parametrize("part, file, key, value", [
    ("transformer", "config.json", "sample_size", "big"),
    ("transformer", "config.json", "num_layers", -3),
    ("vae", "config.json", "block_out_channels", "wide"),
    ("vae", "config.json", "scaling_factor", None),  # removed below: a loader default is fine
    ("text_encoder", "config.json", "d_model", [32]),
    ("scheduler", "scheduler_config.json", "num_train_timesteps", "many"),
])
def test_configs_with_wrong_types_are_checkpoint_errors_naming_the_file(copy_of, part, file, key, value):
    import json

    directory = copy_of()
    path = directory / part / file
    config = json.loads(path.read_text())
    if value is None:
        config.pop(key)
    else:
        config[key] = value
    path.write_text(json.dumps(config))
    if value is None:
        assert len(PixArtSigmaModel(model_name=str(directory), num_inference_steps=1).generate("x")) == 1
        return
    with pytest.raises(SettingsError) as info:
        PixArtSigmaModel(model_name=str(directory))
    assert f"{part}/{file}" in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2]", "not json", '"text"', "null"])
def test_a_config_that_is_not_a_json_object_is_refused(copy_of, content):
    directory = copy_of()
    (directory / "vae" / "config.json").write_text(content)
    with pytest.raises(SettingsError, match="vae/config.json"):
        PixArtSigmaModel(model_name=str(directory))


def test_shapes_that_do_not_fit_the_weights_are_a_checkpoint_error(copy_of):
    import json

    directory = copy_of()
    path = directory / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["num_attention_heads"] = 3  # weights were saved with 2 heads
    path.write_text(json.dumps(config))
    with pytest.raises(SettingsError, match="does not fit its weights: num_attention_heads x attention_head_dim=24 "
                                            "but the weights hold 16"):
        PixArtSigmaModel(model_name=str(directory))


@pytest.mark.parametrize("part, key, value, fragment", [
    ("transformer", "num_layers", 1_048_576, "num_layers=1048576 (an integer from 1 to 128)"),
    ("transformer", "num_layers", 5, "num_layers=5 but the weights hold 2"),
    ("text_encoder", "num_layers", 7, "num_layers=7 but the weights hold 2"),
    ("text_encoder", "d_model", 16384, "d_model=16384 but the weights hold 32"),
    ("text_encoder", "vocab_size", 999_999, "vocab_size=999999 but the weights hold"),
    ("vae", "latent_channels", 16, "latent_channels=16 but the weights hold 4"),
])
def test_a_config_cannot_make_us_build_what_its_weights_do_not_fill(copy_of, part, key, value, fragment):
    import json

    directory = copy_of()
    path = directory / part / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        PixArtSigmaModel(model_name=str(directory))


def test_deeply_nested_json_is_a_checkpoint_error_not_a_recursion_traceback(copy_of):
    directory = copy_of()
    (directory / "transformer" / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SettingsError, match="transformer/config.json is not valid JSON"):
        PixArtSigmaModel(model_name=str(directory))


def test_every_shard_index_is_checked_so_a_decoy_cannot_point_the_loader_at_a_fifo(copy_of):
    import json
    import os
    import subprocess
    import sys

    directory = copy_of()
    folder = directory / "transformer"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"pos_embed.proj.weight": "evil.safetensors"}}))
    os.mkfifo(folder / "evil.safetensors")
    code = f"from pixart_sigma import PixArtSigmaModel\nPixArtSigmaModel(model_name={str(directory)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "evil.safetensors is not a regular file" in result.stderr


def test_many_checkpoints_load_at_once_with_their_own_weights(tiny_dir, tmp_path):
    import shutil
    import threading

    from pixart_sigma import unload_all

    unload_all()
    folders = [tmp_path / f"copy{i}" for i in range(4)]
    for folder in folders:
        shutil.copytree(tiny_dir, folder)
    models, failures = {}, []

    def load(name):
        try:
            models[name] = PixArtSigmaModel(model_name=name, device="cpu")
        except Exception as exc:  # noqa: BLE001 - the test reports whatever escaped
            failures.append(exc)

    threads = [threading.Thread(target=load, args=(str(folder),)) for folder in folders] + [
        threading.Thread(target=load, args=("demo",))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures and len(models) == 5
    reference = text_encoder_weights(tiny_dir)
    for folder in folders:
        state = models[str(folder)].engine.pipeline.text_encoder.state_dict()
        # dtype=auto keeps T5 in bfloat16 on a CPU: compare in the dtype it was loaded in.
        assert all(torch.equal(state[name], tensor.to(state[name].dtype)) for name, tensor in reference.items())


def text_encoder_weights(directory):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(directory / "text_encoder").state_dict()


def test_a_missing_weight_shard_is_refused(copy_of):
    import json

    directory = copy_of()
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (directory / "text_encoder" / "model.safetensors").rename(directory / "text_encoder" / "model-00001-of-00002.safetensors")
    (directory / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SettingsError, match="shard"):
        PixArtSigmaModel(model_name=str(directory))


def test_the_record_names_what_was_loaded(tiny_dir, hub_cache, monkeypatch):
    from pixart_sigma import read_settings

    monkeypatch.chdir(tiny_dir.parent)
    image = PixArtSigmaModel(model_name=tiny_dir.name, seed=1, num_inference_steps=1).generate("x")[0]
    record = read_settings(image)
    assert record["model_name"] == str(tiny_dir.resolve())  # usable from any folder
    hub = read_settings(PixArtSigmaModel(model_name=REPO_512, seed=1, num_inference_steps=1).generate("x")[0])
    assert hub["model_name"] == REPO_512 and hub["model_revision"] == "0" * 40  # the snapshot's commit
    assert read_settings(PixArtSigmaModel(model_name="demo", num_inference_steps=1).generate("x")[0])["model_name"] == "demo"


def test_models_lists_every_known_checkpoint_with_its_state(hub_cache):
    from pixart_sigma.checkpoints import checkpoint_statuses

    statuses = {status.model_name: status for status in checkpoint_statuses()}
    assert set(statuses) == {BASE_REPO, REPO_512, "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", "demo"}
    assert statuses[BASE_REPO].complete and statuses[REPO_512].complete and statuses["demo"].complete
    assert not statuses["PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"].complete
    assert statuses["demo"].size_bytes > 1_000_000 and statuses["demo"].folders
    assert "hf download" in statuses["PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"].problem
