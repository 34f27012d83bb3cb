"""The bundled demo model draws what it is asked, scored by the shapes-world checker.

The README reports the figures on 120 held-out prompts; here a smaller sample keeps the suite fast. Every picture comes through the public API at the default settings unless noted.
"""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixart_sigma import PixArtSigmaModel
from pixart_sigma import demo_world as world
from pixart_sigma.checkpoints import DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = 48  # held-out prompts: 24 with a held-out colour-shape pair, 24 in a held-out wording
# The bars (colour 90%, shape 80%, background 85%) are not reached yet: on 120 held-out prompts
# the shipped model scores 58%, 16% and 59% (README). These floors sit under what it scores on this
# sample (colour 46%, shape 15%, background 46%, position 100%), so a change that makes it worse fails.
FLOORS = {"background": 0.35, "colour": 0.35, "shape": 0.08, "position": 0.90}


@pytest.fixture(scope="module")
def held_out():
    prompts = world.evaluation_prompts(SAMPLE)
    return [scene for _, scene in prompts], world.generate_images(prompts, device="cpu")


def test_the_checker_reads_the_renderers_pictures():
    rng = np.random.default_rng(5)
    scenes = [world.Scene(s.background, s.shapes) for s in (world.training_scene(rng) for _ in range(600))
              if len(s.shapes) == 1]
    scores = world.score(scenes, [world.render(scene) for scene in scenes])
    assert min(scores.values()) >= 0.98, scores


def test_held_out_prompts_are_never_trained_on():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        scene = world.training_scene(rng)
        assert all((s.colour, s.shape) not in world.HELD_OUT_PAIRS for s in scene.shapes)
        text = world.caption(scene, rng)  # the held-out wordings' marks: "an image with", "with a X background"
        assert not text.startswith("an image with") and not re.search(r"with an? \w+ background", text), text


def test_the_demo_tokenizer_gives_each_prompt_its_own_ids():
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(DEMO_DIR / "tokenizer")
    prompts = [p for p, _ in world.evaluation_prompts(40)]
    assert len({tuple(tokenizer(p).input_ids) for p in prompts}) == len(set(prompts))
    for word in world.VOCABULARY:  # each caption word is one token of its own, then </s>
        assert len(tokenizer(word).input_ids) == 2, word
    assert tokenizer("a red circle").input_ids != tokenizer("a blue circle").input_ids


def test_held_out_prompts_score_at_least_what_the_shipped_model_reaches(held_out):
    scenes, images = held_out
    scores = world.score(scenes, images)
    for attribute, floor in FLOORS.items():
        assert scores[attribute] >= floor, scores


def test_guidance_1_scores_clearly_lower_than_4_5(held_out):
    scenes, images = held_out
    unguided = world.generate_images(world.evaluation_prompts(SAMPLE), device="cpu", guidance_scale=1.0)
    guided, weak = world.score(scenes, images), world.score(scenes, unguided)
    layout = lambda s: (s["shape"] + s["position"]) / 2  # noqa: E731
    assert layout(weak) <= layout(guided) - 0.15, (weak, guided)


def test_same_seed_same_picture_and_a_real_64px_picture():
    prompt = "a red circle on a blue background"  # the README's first command
    first = PixArtSigmaModel(model_name="demo", seed=0).generate(prompt)[0]
    again = PixArtSigmaModel(model_name="demo", seed=0).generate(prompt)[0]
    other = PixArtSigmaModel(model_name="demo", seed=1).generate(prompt)[0]
    assert first.size == (64, 64) and first.tobytes() == again.tobytes() != other.tobytes()
    reading = world.read(first)
    assert (reading.background, reading.colour) == ("blue", "red")


def test_diffusers_loads_the_demo_and_draws_the_same_kind_of_picture():
    import torch
    from diffusers import PixArtSigmaPipeline

    pipeline = PixArtSigmaPipeline.from_pretrained(DEMO_DIR, torch_dtype=torch.float32)
    image = pipeline("a small red circle on a white background", num_inference_steps=20, guidance_scale=4.5,
                     use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert world.read(image).background == "white"


def test_the_demo_checkpoint_is_small_half_precision_safetensors():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15e6
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3


def _train_tiny(output: Path) -> str:
    subprocess.run([sys.executable, str(ROOT / "tools" / "train_demo_model.py"), "--output", str(output),
                    "--steps", "3", "--vae-steps", "2", "--batch-size", "4", "--vae-batch-size", "2",
                    "--save-every", "3"], check=True, capture_output=True, text=True)
    digest = hashlib.sha256()
    for path in sorted(output.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_the_trainer_rebuilds_a_loadable_checkpoint_deterministically(tmp_path):
    first, second = _train_tiny(tmp_path / "a"), _train_tiny(tmp_path / "b")
    assert first == second
    image = PixArtSigmaModel(model_name=str(tmp_path / "a"), seed=0, num_inference_steps=2).generate("a red circle")[0]
    assert image.size == (64, 64)
