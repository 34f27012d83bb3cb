"""LoRAs per call (pixart_sigma.loras): found by name in the LoRA folder, fused for the call and taken off exactly,
recorded by name, scale and SHA-256, found again by that hash, and used from the CLI.

Pixels are compared as bytes where the rule is "bit for bit" (scale 0, no LoRAs, the base after a LoRA call).
"""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pixart_sigma import (MetadataError, PixArtSigmaModel, SettingsError, read_settings, resolve_lora, save_image,
                          unload_all)
from pixart_sigma.cli import main
from pixart_sigma.images import A1111_KEY, JSON_KEY
from pixart_sigma.lora_formats import LAYOUTS, Lora, LoraWeights, transformer_targets, write_lora
from pixart_sigma.loras import fused_set, sha256_of
from pixart_sigma.settings import MAX_LORAS

PROMPT = "a red circle on a blue background"
CALL = {"seed": 3, "num_inference_steps": 2}


def _random_lora(config, seed, size=0.3, modules=None):
    """A LoRA on the attention and feed-forward of every block (self-attention q/k/v sharing one down, as a fused
    qkv LoRA does), big enough to change the pixels."""
    targets = transformer_targets(config)
    g = torch.Generator().manual_seed(seed)
    chosen = modules or [name for name in targets if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v",
                                                                    "attn2.to_q", "ff.net.2"))]
    weights, shared = {}, {}
    for name in chosen:
        target = targets[name]
        block = name.rsplit(".attn1.", 1)[0] if ".attn1.to_" in name else name
        if block not in shared:
            shared[block] = torch.randn(4, target.in_features, generator=g) * size
        weights[name] = LoraWeights(shared[block], torch.randn(target.out_features, 4, generator=g) * size, 8.0)
    return Lora(weights)


@pytest.fixture(scope="module")
def model(tiny):
    return PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", **CALL)


@pytest.fixture(scope="module")
def config(model):
    return dict(model.engine.pipeline.transformer.config)


@pytest.fixture
def folder(tmp_path, config, model):
    folder = tmp_path / "loras"
    write_lora(folder / "style.safetensors", _random_lora(config, 1), "kohya")
    write_lora(folder / "other.safetensors", _random_lora(config, 2), "diffusers")
    model.lora_dir = folder
    yield folder
    model.lora_dir = None


def _bytes(images):
    return [image.tobytes() for image in images]


def _levels(a, b):
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def _weights(model):
    return {name: tensor.clone() for name, tensor in model.engine.pipeline.transformer.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_scale_zero_and_no_loras_are_the_base_bit_for_bit_and_a_lora_comes_off_exactly(name, tiny, tmp_path):
    model = PixArtSigmaModel(model_name=tiny if name == "tiny" else "demo", lora_dir=tmp_path, **CALL)
    transformer = model.engine.pipeline.transformer
    write_lora(tmp_path / "style.safetensors", _random_lora(dict(transformer.config), 1), "kohya")
    base = _bytes(model.generate(PROMPT))
    before = _weights(model)  # after a call without LoRAs: the engine is shared, and an earlier test may have left one
    assert _bytes(model.generate(PROMPT, loras=[{"name": "style", "scale": 0.0}])) == base
    styled = model.generate(PROMPT, loras=[{"name": "style", "scale": 1.0}])
    assert _bytes(styled) != base and fused_set(transformer)
    assert _bytes(model.generate(PROMPT)) == base and fused_set(transformer) == ()
    assert all(torch.equal(before[key], tensor) for key, tensor in transformer.state_dict().items())
    assert _bytes(model.generate(PROMPT, loras=[])) == base
    assert _bytes(model.generate(PROMPT, loras=[{"name": "style"}])) == _bytes(styled)  # scale 1 by default


def test_a_repeated_set_is_fused_once(model, folder, monkeypatch):
    import pixart_sigma.loras as loras

    calls = []
    real = loras._summed_deltas
    monkeypatch.setattr(loras, "_summed_deltas", lambda uses: calls.append(len(uses)) or real(uses))
    for _ in range(3):
        model.generate(PROMPT, loras=[{"name": "style", "scale": 0.5}])
    assert len(calls) == 1  # the next two found it fused
    model.generate(PROMPT)  # taken off: no delta to compute
    assert len(calls) == 2 and calls[-1] == 0


def test_two_loras_at_once_equal_one_whose_change_is_their_sum(model, folder, config, tmp_path):
    one, two = _random_lora(config, 1), _random_lora(config, 2)
    # down stacked, up stacked with each one's alpha / rank folded in: up @ down is the sum of the two changes
    summed = {}
    for module in one.transformer:
        a, b = one.transformer[module], two.transformer[module]
        summed[module] = LoraWeights(torch.cat([a.down, b.down]), torch.cat([a.up * (a.alpha / a.rank) * 0.7,
                                                                             b.up * (b.alpha / b.rank) * -0.4], 1),
                                     float(a.rank + b.rank))
    write_lora(folder / "sum.safetensors", Lora(summed), "kohya")
    write_lora(folder / "two.safetensors", two, "kohya")
    both = model.generate(PROMPT, loras=[{"name": "style", "scale": 0.7}, {"name": "two", "scale": -0.4}])[0]
    alone = model.generate(PROMPT, loras=[{"name": "sum", "scale": 1.0}])[0]
    assert _levels(both, alone) <= 1
    assert _levels(both, model.generate(PROMPT)[0]) > 8  # and the LoRAs did change the picture


def test_the_same_lora_in_every_layout_gives_the_same_pixels(model, config, tmp_path):
    lora = _random_lora(config, 3)
    images = {}
    for layout in LAYOUTS:
        path = write_lora(tmp_path / (layout if layout == "peft" else f"{layout}.safetensors"), lora, layout,
                          transformer_config=config)
        images[layout] = model.generate(PROMPT, loras=[{"name": str(path), "scale": 1.0}])[0]
        assert read_settings(images[layout])["loras"][0]["name"] == layout  # a path records its name only
    first = images[LAYOUTS[0]]
    assert all(_levels(first, image) <= 1 for image in images.values()), {k: _levels(first, v) for k, v in images.items()}


def test_names_are_found_in_the_folder_and_nowhere_else(tmp_path, config):
    folder = tmp_path / "loras"
    write_lora(folder / "sdxl" / "fox.safetensors", _random_lora(config, 1), "kohya")
    write_lora(folder / "peft-style", _random_lora(config, 1), "peft")
    write_lora(folder / "a" / "twin.safetensors", _random_lora(config, 1), "kohya")
    write_lora(folder / "b" / "twin.safetensors", _random_lora(config, 2), "kohya")
    (tmp_path / "outside.safetensors").write_bytes((folder / "sdxl" / "fox.safetensors").read_bytes())
    os.symlink(tmp_path / "outside.safetensors", folder / "linked.safetensors")

    assert resolve_lora("fox", folder).path == folder / "sdxl" / "fox.safetensors"
    assert resolve_lora("fox.safetensors", folder).name == "fox"
    found = resolve_lora("peft-style", folder)
    assert found.path == folder / "peft-style" and found.weights.name == "adapter_model.safetensors"
    with pytest.raises(SettingsError, match=r"loras='twin' is ambiguous: .* holds a/twin.safetensors, b/twin"):
        resolve_lora("twin", folder)
    with pytest.raises(SettingsError, match=r"loras='nope' is not in the LoRA folder .*: it holds fox, linked, "
                                            r"peft-style, twin"):
        resolve_lora("nope", folder)
    with pytest.raises(SettingsError, match="links outside the LoRA folder"):
        resolve_lora("linked", folder)
    for name in ("../outside", "../outside.safetensors", str(tmp_path / "outside.safetensors"), ".hidden"):
        with pytest.raises(SettingsError, match="is not valid here: name a LoRA of the LoRA folder"):
            resolve_lora(name, folder, allow_paths=False)
    assert resolve_lora(str(tmp_path / "outside.safetensors"), folder).name == "outside"  # a path, where allowed
    with pytest.raises(SettingsError, match="no such file or folder"):
        resolve_lora("../x", folder)
    with pytest.raises(SettingsError, match="the LoRA folder .*missing.* does not exist"):
        resolve_lora("fox", tmp_path / "missing")


def test_a_call_names_each_bad_lora_and_the_rule(model, folder, tmp_path, config):
    model.lora_paths = False
    try:
        with pytest.raises(SettingsError) as caught:
            model.validate_call(PROMPT, loras=[{"name": "style"}, {"name": "../style"}, {"name": "nope", "scale": 2}])
        assert caught.value.problems[0].startswith("loras.1.name='../style' is not valid here")
        assert caught.value.problems[1].startswith("loras.2.name='nope' is not in the LoRA folder")
    finally:
        model.lora_paths = True
    with pytest.raises(SettingsError, match=r"loras.0.scale=5 is not valid: it must be from -4.0 to 4.0"):
        model.generate(PROMPT, loras=[{"name": "style", "scale": 5}])
    with pytest.raises(SettingsError, match=f"at most {MAX_LORAS} are applied in one call"):
        model.validate_call(PROMPT, loras=[{"name": "style"}] * (MAX_LORAS + 1))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SettingsError, match=r"loras.0.name='broken' cannot be used: .*broken.safetensors is not a "
                                            "safetensors file"):
        model.generate(PROMPT, loras=[{"name": "broken"}])


def test_a_text_encoder_part_is_refused_naming_the_file(model, folder, config, tiny_dir):
    t5 = json.loads((Path(tiny_dir) / "text_encoder" / "config.json").read_text())
    lora = _random_lora(config, 1)
    d_model = t5["d_model"]
    text = {"encoder.block.0.layer.0.SelfAttention.q": LoraWeights(torch.ones(2, d_model), torch.ones(
        t5["num_heads"] * t5["d_kv"], 2), 2.0)}
    write_lora(folder / "with-te.safetensors", Lora(lora.transformer, text), "kohya")
    with pytest.raises(SettingsError, match=r"with-te.safetensors has a text-encoder \(T5\) part .* every cached prompt "
                                            "embedding wrong"):
        model.generate(PROMPT, loras=[{"name": "with-te"}])


def test_sequential_offload_refuses_loras(tiny, tmp_path, config):
    write_lora(tmp_path / "style.safetensors", _random_lora(config, 1), "kohya")
    unload_all()
    try:
        streamed = PixArtSigmaModel(model_name=tiny, device="cpu", dtype="float32", memory="sequential-offload",
                                    lora_dir=tmp_path, **CALL)
        for call in (streamed.validate_call, streamed.generate):
            with pytest.raises(SettingsError, match="loras cannot be used with memory='sequential-offload'"):
                call(PROMPT, loras=[{"name": "style"}])
        assert streamed.generate(PROMPT)  # without LoRAs it runs
    finally:
        unload_all()


def test_records_carry_each_lora_and_read_back(model, folder, tmp_path):
    image = model.generate(PROMPT, loras=[{"name": "style", "scale": 0.75}, {"name": "other", "scale": -1}])[0]
    digests = [sha256_of(folder / "style.safetensors"), sha256_of(folder / "other.safetensors")]
    expected = [{"name": "style", "scale": 0.75, "sha256": digests[0]},
                {"name": "other", "scale": -1.0, "sha256": digests[1]}]
    path = save_image(image, tmp_path / "made.png")
    assert read_settings(path)["loras"] == expected
    text = image.info[A1111_KEY]
    assert text.splitlines()[0] == f"{PROMPT} <lora:style:0.75> <lora:other:-1>"
    assert f'Lora hashes: "style: {digests[0][:10]}, other: {digests[1][:10]}"' in text
    # read from A1111's text alone (another tool's file): the tags leave the prompt, the short hashes stay
    only_text = Image.new("RGB", (8, 8))
    only_text.info[A1111_KEY] = text
    record = read_settings(only_text)
    assert record["prompt"] == PROMPT
    assert record["loras"] == [{**lora, "sha256": lora["sha256"][:10]} for lora in expected]
    assert "loras" not in read_settings(model.generate(PROMPT)[0])  # none: not recorded


@pytest.mark.parametrize("loras, problem", [
    ([{"name": "../../etc/x", "scale": 1.0, "sha256": "a" * 64}], "must be a plain name"),
    ([{"name": "/abs/x", "scale": 1.0, "sha256": "a" * 64}], "must be a plain name"),
    ([{"name": "x", "scale": 1.0, "sha256": "A" * 64}], "must be a SHA-256"),
    ([{"name": "x", "scale": 99.0, "sha256": "a" * 64}], "loras.0.scale=99.0 is not valid"),
    ([{"name": "x", "scale": 1.0}], "loras.0.sha256 is missing"),
    ([{"name": "x", "scale": 1.0, "sha256": "a" * 64}] * (MAX_LORAS + 1), "at most 8"),
    ("x", "loras='x' is not valid: it must be a list"),
])
def test_a_records_loras_are_checked_like_every_field(loras, problem):
    image = Image.new("RGB", (8, 8))
    image.info[JSON_KEY] = json.dumps({"prompt": "a", "loras": loras})
    with pytest.raises(MetadataError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        read_settings(image)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lora_flags_from_and_its_refusal(tiny, folder, tmp_path, capsys):
    code, out, err = run(capsys, "generate", PROMPT, "--model-name", tiny, "--dtype", "float32", "--seed", 3,
                         "--num-inference-steps", 2, "--lora-dir", folder, "--lora", "style:0.5", "--lora", "other",
                         "-o", tmp_path / "out", "-q")
    assert code == 0, err
    made = Path(out.split("  ")[0])
    assert [(lora["name"], lora["scale"]) for lora in read_settings(made)["loras"]] == [("style", 0.5), ("other", 1.0)]
    # another folder, the files renamed: found by their SHA-256, the same pixels
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "renamed-a.safetensors").write_bytes((folder / "style.safetensors").read_bytes())
    (moved / "renamed-b.safetensors").write_bytes((folder / "other.safetensors").read_bytes())
    code, out, err = run(capsys, "generate", "--from", made, "--lora-dir", moved, "-o", tmp_path / "again", "-q",
                         "--model-name", tiny)
    assert code == 0, err
    again = Path(out.split("  ")[0])
    assert Image.open(again).tobytes() == Image.open(made).tobytes()
    assert [lora["name"] for lora in read_settings(again)["loras"]] == ["renamed-a", "renamed-b"]
    (moved / "renamed-b.safetensors").unlink()
    code, _, err = run(capsys, "generate", "--from", made, "--lora-dir", moved, "-o", tmp_path / "x", "-q",
                       "--model-name", tiny)
    digest = sha256_of(folder / "other.safetensors")
    assert code == 2 and f"does not hold: other (SHA-256 {digest})" in err and "Traceback" not in err
    code, _, err = run(capsys, "generate", PROMPT, "--model-name", tiny, "--lora-dir", folder, "--lora", "style:9",
                       "-o", tmp_path / "x", "-q")
    assert code == 2 and "loras.0.scale=9.0 is not valid: it must be from -4.0 to 4.0" in err


def test_cli_batch_takes_lora_flags(tiny, folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    code, out, err = run(capsys, "batch", prompts, "--model-name", tiny, "--num-inference-steps", 2, "--seed", 1,
                         "--lora-dir", folder, "--lora", "style:0.5", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert read_settings(out.split()[0])["loras"][0]["scale"] == 0.5


def test_cli_lists_the_lora_folder_good_and_broken(tiny, folder, capsys):
    (folder / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    code, out, err = run(capsys, "loras", "--lora-dir", folder, "--model-name", tiny)
    assert code == 0, err
    lines = dict(line.split("  ", 1) for line in out.strip().splitlines())
    assert lines["broken"].startswith("cannot be read: ") and "header is not JSON" in lines["broken"]
    digest = sha256_of(folder / "style.safetensors")[:10]
    assert lines["style"].startswith("kohya  rank 4  ") and f"targets  " in lines["style"] and digest in lines["style"]
    assert lines["other"].startswith("diffusers  rank 4  ")
    assert "3 LoRA(s) in" in err


def test_two_threads_alternating_base_and_lora_calls_get_the_right_pixels(model, folder):
    expected = {None: _bytes(model.generate(PROMPT)),
                "style": _bytes(model.generate(PROMPT, loras=[{"name": "style"}])),
                "other": _bytes(model.generate(PROMPT, loras=[{"name": "other", "scale": 0.5}]))}
    calls = {None: {}, "style": {"loras": [{"name": "style"}]}, "other": {"loras": [{"name": "other", "scale": 0.5}]}}
    wrong, errors = [], []

    def worker(order):
        try:
            for _ in range(4):
                for key in order:
                    if _bytes(model.generate(PROMPT, **calls[key])) != expected[key]:
                        wrong.append(key)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(order,)) for order in ([None, "style"], ["other", None])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong
