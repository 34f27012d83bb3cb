"""LoRA layouts from the wild read into one canonical form (pixart_sigma.lora_formats).

One random LoRA on the tiny checkpoint's transformer (and T5) is written in every layout and read
back; each must give the same tensors (or, where the layout stores no alpha, the same weight change).
A last test applies the canonical form through peft to a real PixArtTransformer2DModel and compares
with W + (alpha / rank) * up @ down computed by hand.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixart_sigma.errors import CheckpointError, SettingsError
from pixart_sigma.lora_formats import (
    LAYOUTS, PEFT_CONFIG, Lora, LoraWeights, peft_config, read_lora, text_encoder_targets,
    transformer_targets, write_lora,
)


@pytest.fixture(scope="module")
def configs(tiny_dir):
    """The tiny checkpoint's transformer and T5 configs."""
    read = lambda part: json.loads((Path(tiny_dir) / part / "config.json").read_text())  # noqa: E731
    return read("transformer"), read("text_encoder")


def _pair(target, rank, alpha, generator, down=None):
    kernel = (target.kernel, target.kernel) if target.kernel else ()
    down = down if down is not None else torch.randn(rank, target.in_features, *kernel, generator=generator)
    up = torch.randn(target.out_features, rank, *((1, 1) if target.kernel else ()), generator=generator)
    return LoraWeights(down, up, alpha)


@pytest.fixture(scope="module")
def lora(configs):
    """A random LoRA: self-attention q/k/v share a down (as a fused qkv LoRA does), cross-attention k/v do not;
    ranks and alphas differ by module; a conv LoRA on the patch embedding; a T5 part."""
    transformer_config, t5_config = configs
    targets, t5 = transformer_targets(transformer_config), text_encoder_targets(t5_config)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, targets["transformer_blocks.0.attn1.to_q"].in_features, generator=g)
    weights = {m: _pair(targets[m], 4, 8.0, g, down=shared)
               for m in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                         "transformer_blocks.0.attn1.to_v")}
    for module, rank, alpha in (("transformer_blocks.0.attn2.to_k", 4, 8.0), ("transformer_blocks.0.attn2.to_v", 4, 8.0),
                                ("transformer_blocks.1.attn1.to_out.0", 2, 1.0), ("transformer_blocks.1.ff.net.0.proj", 4, 8.0),
                                ("transformer_blocks.1.ff.net.2", 4, 8.0), ("adaln_single.linear", 3, 6.0),
                                ("caption_projection.linear_1", 4, 4.0), ("proj_out", 4, 8.0),
                                ("pos_embed.proj", 2, 2.0), ("adaln_single.emb.timestep_embedder.linear_1", 4, 8.0)):
        weights[module] = _pair(targets[module], rank, alpha, g)
    text = {m: _pair(t5[m], 2, 4.0, g) for m in ("encoder.block.0.layer.0.SelfAttention.q",
                                                  "encoder.block.1.layer.1.DenseReluDense.wi_0")}
    return Lora(weights, text)


def _same_tensors(read, wrote):
    assert sorted(read) == sorted(wrote)
    for module, w in wrote.items():
        assert torch.equal(read[module].down, w.down), module
        assert torch.equal(read[module].up, w.up), module
        assert read[module].alpha == w.alpha, module


def _same_deltas(read, wrote):
    assert sorted(read) == sorted(wrote)
    for module, w in wrote.items():
        torch.testing.assert_close(read[module].delta(), w.delta(), rtol=1e-6, atol=1e-6)


def _write(tmp_path, lora, layout, configs, name=None):
    path = tmp_path / (name or (layout if layout == "peft" else f"{layout}.safetensors"))
    return write_lora(path, lora, layout, transformer_config=configs[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_the_same_lora(tmp_path, configs, lora, layout, caplog):
    with_text = lora if layout != "peft" else Lora(lora.transformer)  # a PEFT folder holds one model
    path = _write(tmp_path, with_text, layout, configs)
    with caplog.at_level(logging.WARNING, logger="pixart_sigma.lora_formats"):
        read = read_lora(path, *configs)
    assert read.layout == layout
    if layout == "pixart-script":  # stores no alpha: alpha / rank was folded into up, read back as alpha = rank
        assert read.alpha_defaulted and len(caplog.records) == 1
        _same_deltas(read.transformer, lora.transformer)
        _same_deltas(read.text_encoder, lora.text_encoder)
    else:
        assert not read.alpha_defaulted and not caplog.records
        _same_tensors(read.transformer, lora.transformer)
        _same_tensors(read.text_encoder, with_text.text_encoder)
    _same_deltas(read.transformer, lora.transformer)


def test_fused_qkv_and_kv_are_split_exactly(tmp_path, configs, lora):
    path = _write(tmp_path, lora, "original", configs)
    keys = load_file(path)
    # q/k/v share a down: one fused qkv LoRA, up rows q, k, v; cross k/v do not: OneTrainer's per-piece names
    assert keys["blocks.0.attn.qkv.lora_up.weight"].shape == (3 * 16, 4)
    assert "blocks.0.cross_attn.kv_linear.0.lora_down.weight" in keys
    assert "x_embedder.proj.lora_down.weight" in keys and "t_block.1.alpha" in keys
    # a fused kv with one down, written by hand as the original code's LoRAs are
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(3, 16, generator=g), torch.randn(32, 3, generator=g)
    fused = tmp_path / "kv.safetensors"
    save_file({"blocks.1.cross_attn.kv_linear.lora_down.weight": down,
               "blocks.1.cross_attn.kv_linear.lora_up.weight": up,
               "blocks.1.cross_attn.kv_linear.alpha": torch.tensor(6.0)}, fused)
    read = read_lora(fused, configs[0]).transformer
    assert torch.equal(read["transformer_blocks.1.attn2.to_k"].up, up[:16])
    assert torch.equal(read["transformer_blocks.1.attn2.to_v"].up, up[16:])
    assert all(torch.equal(read[m].down, down) and read[m].alpha == 6.0 for m in read)


def _renamed(source: Path, target: Path, rename) -> Path:
    tensors = load_file(source)
    save_file({rename(k): v for k, v in tensors.items()}, target)
    return target


@pytest.mark.parametrize("spelling, layout", [
    (lambda k: k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"), "diffusers"),
    (lambda k: k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."), "diffusers"),
    (lambda k: k.replace("transformer.", "transformer.base_model.model.", 1), "diffusers"),
    (lambda k: k.removeprefix("transformer."), "diffusers"),
    (lambda k: k.replace("transformer.", "unet.", 1), "pixart-script"),
    (lambda k: k.replace("transformer.", "lora_transformer.", 1).replace("lora_A.", "lora_down.")
     .replace("lora_B.", "lora_up."), "kohya"),
])
def test_key_spellings_of_the_diffusers_family(tmp_path, configs, lora, spelling, layout):
    only = Lora({m: w for m, w in lora.transformer.items() if w.alpha == w.rank * 2})  # alpha from metadata
    path = _write(tmp_path, only, "diffusers", configs)
    renamed = _renamed(path, tmp_path / "renamed.safetensors", spelling)
    metadata = read_lora(path, configs[0]).metadata
    save_file(load_file(renamed), renamed, metadata=metadata)  # the header's alphas travel with the file
    read = read_lora(renamed, configs[0])
    assert read.layout == layout
    _same_tensors(read.transformer, only.transformer)


@pytest.mark.parametrize("prefix, underscored", [("transformer.", False), ("diffusion_model.", False),
                                                   ("lora_unet_", True), ("lora_transformer_", True)])
def test_original_names_dotted_or_underscored(tmp_path, configs, lora, prefix, underscored):
    path = _write(tmp_path, Lora(lora.transformer), "original", configs)

    def rename(key):
        stem, _, role = key.partition(".lora_") if ".lora_" in key else key.rpartition(".")
        stem = stem.replace(".", "_") if underscored else stem
        return prefix + stem + (".lora_" + role if ".lora_" in key else "." + role)

    read = read_lora(_renamed(path, tmp_path / "renamed.safetensors", rename), configs[0])
    assert read.layout == "original"
    _same_tensors(read.transformer, lora.transformer)


def test_missing_alpha_means_rank_and_warns_once_naming_the_file(tmp_path, configs, lora, caplog):
    path = _write(tmp_path, lora, "kohya", configs)
    no_alpha = _renamed(path, tmp_path / "no-alpha.safetensors", lambda k: k)
    tensors = {k: v for k, v in load_file(no_alpha).items() if not k.endswith(".alpha")}
    tensors["lora_transformer_proj_out.alpha"] = torch.tensor(0.0)  # kohya: alpha 0 means alpha = rank
    save_file(tensors, no_alpha)
    with caplog.at_level(logging.WARNING, logger="pixart_sigma.lora_formats"):
        read = read_lora(no_alpha, *configs)
    assert read.alpha_defaulted
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(no_alpha) in caplog.records[0].getMessage() and "alpha = rank" in caplog.records[0].getMessage()
    assert all(w.alpha == w.rank for w in [*read.transformer.values(), *read.text_encoder.values()])


def test_unknown_keys_and_bad_shapes_are_listed_in_one_error(tmp_path, configs, lora):
    path = _write(tmp_path, lora, "kohya", configs)
    tensors = load_file(path)
    tensors["lora_transformer_transformer_blocks_7_attn1_to_q.lora_down.weight"] = torch.zeros(2, 16)  # no block 7
    tensors["lora_transformer_transformer_blocks_7_attn1_to_q.lora_up.weight"] = torch.zeros(16, 2)
    tensors["bundle_emb.red.t5"] = torch.zeros(1, 32)  # OneTrainer's embedding bundle: no module of ours
    tensors["lora_transformer_proj_out.lora_down.weight"] = torch.zeros(4, 15)  # proj_out takes 16
    tensors["lora_transformer_adaln_single_linear.lora_up.weight"] = torch.zeros(96, 3, 1, 1)  # 4-D on a Linear
    tensors["lora_transformer_caption_projection_linear_1.lora_up.weight"] = torch.zeros(16, 4, dtype=torch.int32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as caught:
        read_lora(path, *configs)
    text = str(caught.value)
    assert str(path) in text
    for named in ("transformer_blocks_7_attn1_to_q.lora_down.weight", "bundle_emb.red.t5",
                  "lora_transformer_proj_out.lora_down.weight [4, 15]", "do not fit proj_out (a Linear)",
                  "lora_transformer_adaln_single_linear.lora_up.weight [96, 3, 1, 1]",
                  "caption_projection_linear_1.lora_up.weight is I32", "Valid targets"):
        assert named in text


def test_text_encoder_shapes_are_checked_against_the_t5_config(tmp_path, configs, lora):
    path = _write(tmp_path, lora, "kohya", configs)
    without_config = read_lora(path, configs[0]).text_encoder  # names checked, shapes only for agreement
    _same_tensors(without_config, lora.text_encoder)
    tensors = load_file(path)
    tensors["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(99, 2)
    tensors["lora_te_encoder_block_9_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 2)  # 2 blocks
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as caught:
        read_lora(path, *configs)
    assert "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight [99, 2]" in str(caught.value)
    assert "match no module of this model (1): lora_te_encoder_block_9" in str(caught.value)


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "lora.bin", "lora.pth"])
def test_pickle_files_are_refused_by_name(tmp_path, configs, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=rf"{name}.*pickle.*safetensors only"):
        read_lora(path, configs[0])
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="adapter_model.bin: pickle files are never read"):
        read_lora(folder, configs[0])


def test_malformed_and_oversized_files_are_refused(tmp_path, configs, monkeypatch):
    import pixart_sigma.lora_formats as lora_formats

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_lora(junk, configs[0])
    junk.write_bytes((5).to_bytes(8, "little") + b"nope!")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        read_lora(junk, configs[0])
    save_file({}, junk)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_lora(junk, configs[0])
    save_file({"proj_out.lora_A.weight": torch.full((2, 16), float("nan")), "proj_out.lora_B.weight": torch.ones(32, 2)},
              junk)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values .* proj_out.lora_A.weight"):
        read_lora(junk, configs[0])
    save_file({"proj_out.lora_A.weight": torch.ones(2, 16), "proj_out.lora_down.weight": torch.ones(2, 16),
               "proj_out.lora_B.weight": torch.ones(32, 2)}, junk)
    with pytest.raises(CheckpointError, match="tensors given twice for one module: proj_out.lora_"):
        read_lora(junk, configs[0])
    monkeypatch.setattr(lora_formats, "MAX_LORA_BYTES", 4)
    with pytest.raises(CheckpointError, match="at most 4 are expected"):
        read_lora(junk, configs[0])


@pytest.mark.parametrize("key, format_name", [
    ("lora_transformer_transformer_blocks_0_attn1_to_q.hada_w1_a", "LyCORIS LoHa"),
    ("lora_transformer_transformer_blocks_0_attn1_to_q.lokr_w1", "LyCORIS LoKr"),
    ("transformer.transformer_blocks.0.attn1.to_q.lora_magnitude_vector", "DoRA"),
])
def test_lycoris_and_dora_are_refused_naming_the_file_and_format(tmp_path, configs, key, format_name):
    path = tmp_path / "lycoris.safetensors"
    save_file({key: torch.zeros(2, 16)}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name} is a {format_name}.*not a LoRA"):
        read_lora(path, configs[0])


def test_peft_folder_config_decides_alpha_rank_and_targets(tmp_path, configs, lora):
    folder = _write(tmp_path, Lora(lora.transformer), "peft", configs)
    config = json.loads((folder / PEFT_CONFIG).read_text())
    assert config["alpha_pattern"] and config["rank_pattern"]  # the fixture's modules differ
    config["use_rslora"] = True  # rsLoRA: alpha / sqrt(rank), i.e. canonical alpha * sqrt(rank)
    (folder / PEFT_CONFIG).write_text(json.dumps(config))
    read = read_lora(folder, configs[0]).transformer
    assert read["proj_out"].alpha == pytest.approx(8.0 * 2)
    config.update(use_rslora=False, target_modules=["to_q", "to_k", "to_v"])
    (folder / PEFT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="target_modules.*do not name: .*proj_out"):
        read_lora(folder, configs[0])
    config.update(target_modules=None, rank_pattern={}, r=16)
    (folder / PEFT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the config says rank 16, the tensors have rank 4"):
        read_lora(folder, configs[0])
    (folder / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LOHA", "r": 4}))
    with pytest.raises(CheckpointError, match="PEFT LOHA adapter"):
        read_lora(folder, configs[0])


def test_a_folder_with_one_lora_file_is_read(tmp_path, configs, lora):
    folder = tmp_path / "output"
    _write(folder, lora, "pixart-script", configs, name="pytorch_lora_weights.safetensors")
    assert read_lora(folder, configs[0]).layout == "pixart-script"
    _write(folder, lora, "kohya", configs)
    with pytest.raises(CheckpointError, match="several safetensors files"):
        read_lora(folder, configs[0])


def test_write_lora_refuses_what_a_layout_cannot_hold(tmp_path, configs, lora):
    with pytest.raises(SettingsError, match="layout='comfy' is not a LoRA layout: valid are peft, diffusers"):
        write_lora(tmp_path / "x", lora, "comfy")
    with pytest.raises(SettingsError, match="text-encoder"):
        write_lora(tmp_path / "x", lora, "peft")


def test_diffusers_layout_keeps_alpha_in_the_header_and_user_metadata(tmp_path, configs, lora):
    path = write_lora(tmp_path / "mine.safetensors", lora, "diffusers", metadata={"base_model": "demo", "steps": 10})
    read = read_lora(path, *configs)
    assert read.metadata["base_model"] == "demo" and read.metadata["steps"] == "10"
    packed = json.loads(read.metadata["lora_adapter_metadata"])
    assert packed["transformer.lora_alpha"] == 8.0 and packed["transformer.r"] == 4
    assert not any(k.endswith(".alpha") for k in load_file(path))  # diffusers' loaders want lora_A/B keys only


def test_targets_are_the_real_modules(configs, tiny_dir):
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    def modules(model):
        return {n: tuple(m.weight.shape) for n, m in model.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    def declared(targets):
        return {n: (t.out_features, t.in_features, *((t.kernel,) * 2 if t.kernel else ())) for n, t in targets.items()}

    transformer_config, t5_config = configs
    with_sizes = {**transformer_config, "use_additional_conditions": True}
    for config in (transformer_config, with_sizes):
        model = PixArtTransformer2DModel.from_config(config)
        assert declared(transformer_targets(config)) == modules(model)
    t5 = modules(T5EncoderModel(T5Config(**t5_config)))
    assert declared(text_encoder_targets(t5_config)) == {n: s for n, s in t5.items() if n.startswith("encoder.block.")}


def test_canonical_form_is_what_peft_means(tmp_path, tiny_dir, configs, lora):
    """Applied through peft at a scale, the canonical LoRA changes each weight by scale * (alpha / rank) * up @ down."""
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    folder = Path(tiny_dir) / "transformer"
    load = lambda: PixArtTransformer2DModel.from_pretrained(folder).eval()  # noqa: E731
    read = read_lora(write_lora(tmp_path / "lora.safetensors", lora, "kohya"), *configs)
    state = {}
    for module, w in read.transformer.items():
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = w.down, w.up
    adapted = inject_adapter_in_model(LoraConfig(**peft_config(read.transformer)), load())
    result = set_peft_model_state_dict(adapted, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]

    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 5, configs[0]["caption_channels"], generator=g)

    def run(model):
        with torch.no_grad():
            return model(latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    untouched = run(load())
    for scale in (1.0, -0.5):
        manual = load()
        for module, w in read.transformer.items():
            manual.get_submodule(module).weight.data += scale * w.delta()
        for layer in adapted.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("default", scale)
        through_peft = run(adapted)
        torch.testing.assert_close(through_peft, run(manual), rtol=1e-4, atol=1e-4)
        assert (through_peft - untouched).abs().max() > 1e-2  # the LoRA did change the output


def test_written_headers_are_in_one_order_so_the_same_lora_has_one_hash(tmp_path, configs):
    """safetensors orders its header's metadata differently in each process; the writer sorts it, so a LoRA
    written twice (by two runs of train-lora, say) has one SHA-256."""
    import json as json_module

    width = transformer_targets(configs[0])["transformer_blocks.0.attn1.to_q"].in_features
    lora = Lora({"transformer_blocks.0.attn1.to_q": LoraWeights(torch.ones(2, width), torch.ones(width, 2), 2.0)})
    for layout in ("diffusers", "kohya"):
        path = write_lora(tmp_path / f"{layout}.safetensors", lora, layout, metadata={f"k{i}": str(i) for i in range(30)})
        raw = path.read_bytes()
        header = json_module.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
        assert read_lora(path, configs[0]).transformer["transformer_blocks.0.attn1.to_q"].alpha == 2.0
