"""Train the bundled demo model (`model_name="demo"`) from scratch on the shapes world.

The same classes as the released PixArt-Sigma checkpoint: PixArtTransformer2DModel (ada_norm_single),
a small T5EncoderModel with a word-level T5 tokenizer, AutoencoderKL, and the DPM-Solver++ scheduler
configuration PixArt-Sigma ships (linear betas 0.0001-0.02, 1000 steps, epsilon prediction).

Three stages, each deterministic from --seed (same files for the same torch version, --threads and CPU kind):
1. vae: the latent of a 64x64 picture is fixed, not learned: 4x4 average-pooled RGB in [-1, 1] plus the
   pooled signed distance to the shapes' outline (16x16x4; see shape_field). The encoder learns to
   produce it; the decoder learns to draw the sharp picture back from it, with noise added to its input
   so that it also cleans up imperfect generated latents. In bf16 autocast, 2,400 steps: a shorter run
   rounds small triangles (600 steps drew 68% of them back as triangles).
   Then the checker reads pictures decoded from exact latents: the ceiling for the whole model.
2. text encoder: a small 3-layer T5 learns to read the captions, as the release's T5 had learned
   language before PixArt used it; then it is frozen. At every token it learns to output a fixed code
   for what that word means in its caption (CaptionCodes): filler, the background's colour, or the whole
   shape the word belongs to (colour, shape, size and position). The same shape then looks the same to
   the transformer in any wording, and a held-out colour-shape pair is the sum of two known parts.
3. transformer: noise prediction as PixArt trains, with the frozen T5's embeddings through
   cross-attention, ~10% of captions dropped to the empty prompt (so classifier-free guidance works),
   min-SNR loss weighting and an EMA of the weights; a quarter of the pictures show two shapes, and
   triangles come up 40% of the time. In bf16 autocast and compiled with torch.compile (a C++ compiler
   must be installed; --no-compile otherwise): 1.6 times the fp32 speed on this CPU.
Scenes are rendered on the fly; the held-out colour-shape pairs and wordings never appear in any stage,
nor do the reserved words (demo_world.RESERVED_WORDS), which only the tokenizer knows.

A run keeps its finished stages and the transformer's progress (weights, optimizer, EMA, random streams)
in --state every --save-every steps: started again with the same settings after a kill, a
--stop-after or the end of a session, it goes on from there and writes the same files as a run that
never stopped. Prints progress and loss; writes a diffusers pipeline directory (model_index.json + five
parts, safetensors, half precision: ~5 MB) to --output. About 75 minutes on a 2-core CPU with the defaults (VAE 15,
text encoder 5, transformer 55).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import distance_transform_edt
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, PixArtSigmaPipeline,
                       PixArtTransformer2DModel)
from diffusers.training_utils import EMAModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import T5Config, T5EncoderModel

from pixart_sigma import demo_world
from pixart_sigma.testing import PIXART_SCHEDULER_CONFIG, tiny_tokenizer

TARGET = Path(__file__).resolve().parents[1] / "src" / "pixart_sigma" / "checkpoints_data" / "demo"
DEFAULT_STATE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixart-sigma" / "demo-training"
POOL = 4  # the VAE's scale factor: 64x64 pictures, 16x16 latents
CAPTION_DROP = 0.1
CAPTION_TOKENS = 24  # the transformer stage pads every caption to this many tokens (the longest has 20)
MIN_SNR_GAMMA = 5.0
EMA_SETTINGS = {"decay": 0.999, "use_ema_warmup": True, "power": 0.75}
TEXT_LR = 2e-3  # the text encoder's peak learning rate
TEXT_TWO_SHAPES = 0.3  # the text encoder reads more two-shape captions than the transformer draws
FIELD_REACH = 8.0  # pixels: how far from a shape's outline its field still changes
SHAPE_THRESHOLD = 0.3  # colour distance from the background (RGB in [-1, 1]) that counts as shape; the
# closest palette pair (orange, yellow) is 0.64 apart, so edges move by well under a pixel
VAE_TWO_SHAPES = 0.2  # the VAE sees more two-shape pictures than the single-shape prompts need: more edges
TRANSFORMER_TWO_SHAPES = 0.25  # two small shapes side by side: the scenes image editing is proven on
TRANSFORMER_SHAPE_ODDS = (0.3, 0.3, 0.4)  # circle, square, triangle: the thin apex and corners need more


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def render_batch(rng: np.random.Generator, count: int, two_shapes: float = 0.1,
                 shape_odds=None) -> tuple[torch.Tensor, list[str]]:
    """`count` random training pictures as a (count, 3, 64, 64) tensor in [-1, 1], with captions."""
    scenes = [demo_world.training_scene(rng, two_shapes, shape_odds) for _ in range(count)]
    captions = [demo_world.caption(scene, rng) for scene in scenes]
    return rendered(scenes), captions


def rendered(scenes) -> torch.Tensor:
    """The scenes' pictures as a (count, 3, 64, 64) tensor in [-1, 1]."""
    pixels = np.stack([np.asarray(demo_world.render(scene)) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def fixed_latent(images: torch.Tensor) -> torch.Tensor:
    """The latent a picture is encoded to: pooled RGB plus the pooled shape field (see shape_field).
    `images` must be on the CPU, where scipy draws the field; callers move the small latent."""
    return F.avg_pool2d(torch.cat([images, shape_field(images)], dim=1), POOL)


def shape_field(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's signed distance to the shapes' outline (inside +, outside -), in units of FIELD_REACH
    pixels and clipped to [-1, 1]: a (count, 1, 64, 64) tensor. Pooled RGB alone keeps a shape only in
    the coverage of the blocks its edge crosses; the field spreads the outline over a band FIELD_REACH
    pixels wide on both sides, so circle, square and triangle differ over many latent pixels (easier to
    learn) and the outline stays exact where the field crosses zero (a triangle keeps its corners).
    `images` must be on the CPU."""
    pixels = images.detach().float()
    corners = torch.stack([pixels[:, :, 0, 0], pixels[:, :, 0, -1], pixels[:, :, -1, 0], pixels[:, :, -1, -1]], -1)
    background = corners.median(-1).values[:, :, None, None]  # shapes never reach the corners
    masks = ((pixels - background).norm(dim=1) > SHAPE_THRESHOLD).numpy()
    fields = [np.where(mask, distance_transform_edt(mask) - 0.5, 0.5 - distance_transform_edt(~mask))
              if mask.any() else np.full(mask.shape, -FIELD_REACH) for mask in masks]
    return torch.from_numpy(np.clip(np.stack(fields)[:, None] / FIELD_REACH, -1, 1)).float()


def build_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 64],
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=demo_world.SIZE, scaling_factor=scaling_factor,
    )


def build_text_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    ))


def build_transformer(patch_size: int = 2, width: int = 128, layers: int = 6) -> PixArtTransformer2DModel:
    # Patch 2 on a 16x16 latent: 64 tokens of width 128, six layers (1.8 M parameters). Against the
    # earlier patch 4 (16 tokens of width 192, eight layers, 5.1 M), an fp32 step costs 1.2 times as much
    # on the CPU, and each token draws a 2x2 latent block (8x8 pixels) instead of 4x4: sharper shapes in
    # the same time (GPU sweep at equal CPU cost: shape 79-85% against 65%; see the README).
    return PixArtTransformer2DModel(
        sample_size=demo_world.SIZE // POOL, patch_size=patch_size, in_channels=4, out_channels=8,
        num_layers=layers, num_attention_heads=width // 32, attention_head_dim=32, cross_attention_dim=width,
        caption_channels=64,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )


def report(label: str, step: int, total: int, losses: list, started: float) -> None:
    """One progress line: mean loss since the last line, speed, time left."""
    speed = (time.time() - started) / (step + 1)
    log(f"{label} {step + 1}/{total} loss {sum(losses) / len(losses):.4f} ({speed:.2f} s/step, "
        f"{speed * (total - step - 1) / 60:.1f} min left)")
    losses.clear()


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(args) -> AutoencoderKL:
    rng = np.random.default_rng([args.seed, 1])
    torch.manual_seed(args.seed + 1)
    latents = fixed_latent(render_batch(np.random.default_rng([args.seed, 0]), 4096, VAE_TWO_SHAPES)[0])
    scaling_factor = round(1.0 / latents.std().item(), 4)
    vae = build_vae(scaling_factor).to(args.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    # bf16 autocast as the transformer stage (weights, optimizer and loss in fp32): twice the steps.
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, scaling_factor "
        f"{scaling_factor}, {args.vae_steps} steps of {args.vae_batch_size}")
    started, losses = time.time(), []
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, 1e-3, 50)
        images, _ = render_batch(rng, args.vae_batch_size, VAE_TWO_SHAPES)
        target = fixed_latent(images).to(args.device)  # from the CPU pictures: the field is drawn there
        images = images.to(args.device)
        # Random numbers come from the CPU generator on every device, so the data stream is the same.
        noise = (torch.rand(len(images), 1, 1, 1) * 0.1 * torch.randn(target.shape)).to(args.device)
        with autocast:
            posterior = vae.encode(images).latent_dist
            decoded = vae.decode(target + noise).sample.float()
        # The encoder's posterior: mean on the fixed latent, a small fixed spread (std ~0.02).
        encoder_loss = (F.mse_loss(posterior.mean.float(), target)
                        + 0.01 * F.mse_loss(posterior.logvar.float(), torch.full_like(target, -8.0)))
        decoder_loss = F.mse_loss(decoded, images) + F.l1_loss(decoded, images)
        loss = encoder_loss + decoder_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            report("vae step", step, args.vae_steps, losses, started)
    return vae.eval()


def vae_round_trip(vae: AutoencoderKL, count: int = 300, seed: int = 5, device: str = "cpu") -> dict:
    """The checker's scores on rendered pictures decoded from their exact latents: the decoder's
    ceiling on what the whole model can score."""
    scenes = demo_world.rendered_scenes(count, seed=seed)
    with torch.no_grad():
        decoded = vae.decode(fixed_latent(rendered(scenes)).to(device, vae.dtype)).sample.float()
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(picture) for picture in decoded]
    return demo_world.score(scenes, images) | {"per_shape": demo_world.shape_score_per_shape(scenes, images)}


ATTRIBUTE_VALUES = (("colour", demo_world.FOREGROUND_COLOURS), ("shape", demo_world.SHAPES),
                    ("size", tuple(demo_world.SIZES)), ("position", tuple(demo_world.POSITIONS)))
ROLES = ("filler", "background", "shape")
SHAPE_WORDS = set(demo_world.SHAPES) | {"shape"}
POSITION_OF_WORD = {phrase.split()[-1]: position for position, phrases in demo_world.POSITION_WORDS.items()
                    for phrase in phrases}
COLOUR_OF_WORD = {word: colour for colour, words in demo_world.COLOUR_WORDS.items() for word in words}
SIZE_OF_WORD = {word: size for size, words in demo_world.SIZE_WORDS.items() for word in words}


class CaptionCodes:
    """What each token of a caption means, as a fixed vector the text encoder learns to output there.

    A token is filler ("a", "with", "and", "</s>"), part of the background phrase ("blue", "background")
    or part of a shape's phrase ("small", "red", "circle", "left"). A shape's tokens all carry the whole
    shape as the caption says it: its colour, shape, size and position, each a value or "not said". A
    token's code is the sum of fixed random vectors, one for its role and one per value, scaled to unit
    RMS: the same shape gets the same code in any wording and any order, so the transformer meets the
    held-out wordings' shapes as it met the training ones, and a colour-shape pair never seen together
    is the sum of two parts it knows.
    """

    def __init__(self, width: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        table = lambda count: torch.randn(count, width, generator=generator)  # noqa: E731
        self.roles = table(len(ROLES))
        self.background = table(len(demo_world.BACKGROUND_COLOURS) + 1)  # the last: not said
        self.attributes = [table(len(values) + 1) for _, values in ATTRIBUTE_VALUES]

    def labels(self, scene: demo_world.Scene, words: list[str]) -> list[tuple]:
        """Each word's (role, value indices): the background's colour, or the shape's four attributes."""
        said = scene.named
        labels, seen = [], 0
        for k, word in enumerate(words):
            following = words[k + 1] if k + 1 < len(words) else ""
            if word == "background" or (word in COLOUR_OF_WORD and following == "background"):
                colour = scene.background if "background" in said else None
                index = demo_world.BACKGROUND_COLOURS.index(colour) if colour else len(demo_world.BACKGROUND_COLOURS)
                labels.append(("background", index))
                continue
            if word in SHAPE_WORDS:
                seen += 1
            # Size and colour words come before their shape's word, the position after it.
            if word in POSITION_OF_WORD or word in SHAPE_WORDS:
                owner = seen - 1
            elif word in SIZE_OF_WORD or word in COLOUR_OF_WORD:
                owner = seen
            else:
                labels.append(("filler",))
                continue
            item = scene.shapes[owner] if 0 <= owner < len(scene.shapes) else None
            if item is None:
                raise ValueError(f"cannot tell whose word {word!r} is in {' '.join(words)!r}")
            labels.append(("shape",) + tuple(
                values.index(getattr(item, attribute)) if attribute in said else len(values)
                for attribute, values in ATTRIBUTE_VALUES))
        return labels

    def code(self, label: tuple) -> torch.Tensor:
        vector = self.roles[ROLES.index(label[0])].clone()
        if label[0] == "background":
            vector += self.background[label[1]]
        elif label[0] == "shape":
            for table, index in zip(self.attributes, label[1:]):
                vector += table[index]
        return vector / vector.pow(2).mean().sqrt()

    def targets(self, scenes, captions, length: int) -> torch.Tensor:
        """(count, length, width) codes for the captions' tokens, padded to `length` as `encode` pads them.
        Each word is one token (the demo tokenizer's vocabulary is the captions' words), then </s>."""
        out = torch.zeros(len(captions), length, self.roles.shape[1])
        for row, (scene, text) in enumerate(zip(scenes, captions)):
            labels = self.labels(scene, caption_words(text)) + [("filler",)]  # </s>
            for column, label in enumerate(labels[:length]):
                out[row, column] = self.code(label)
        return out


def caption_words(text: str) -> list[str]:
    """A caption's words as the demo tokenizer splits them into tokens (a comma is a token of its own)."""
    return text.replace(",", " ,").split()


def caption_batch(rng, count: int) -> tuple[list, list[str]]:
    """Training scenes and their captions, ~CAPTION_DROP of them dropped to the empty caption (nothing said)."""
    scenes = [demo_world.training_scene(rng, TEXT_TWO_SHAPES) for _ in range(count)]
    captions = [demo_world.caption(scene, rng) for scene in scenes]
    for index in np.nonzero(rng.random(len(scenes)) < CAPTION_DROP)[0]:
        scenes[index] = dataclasses.replace(scenes[index], named=frozenset())
        captions[index] = ""
    return scenes, captions


def encode(text_encoder, tokenizer, captions: list[str], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(captions, padding="max_length", max_length=length, return_tensors="pt").to(device)
    return text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0], tokens.attention_mask


def text_loss(states, mask, targets) -> torch.Tensor:
    mask = mask.unsqueeze(-1).float()
    return (((states - targets) ** 2) * mask).sum() / (mask.sum() * states.shape[-1])


def train_text_encoder(args, tokenizer) -> T5EncoderModel:
    """Teach the small T5 to read the captions before it is frozen, as PixArt's T5 had learned language.

    Objective: at every token, output the code of what that token means in its caption (CaptionCodes):
    which colour word is the background's and which a shape's, and which size, colour and position words
    go with which shape word. Only training captions are used; the held-out pairs and wordings are read
    at the end (logged), never trained on.
    """
    rng = np.random.default_rng([args.seed, 3])
    torch.manual_seed(args.seed + 3)
    text_encoder = build_text_encoder(len(tokenizer)).to(args.device)
    codes = CaptionCodes(text_encoder.config.d_model, args.seed + 4)
    text_encoder.train()
    optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=TEXT_LR, weight_decay=0.01)
    log(f"text encoder: {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters, "
        f"{args.text_steps} steps of 256 captions")
    started, losses = time.time(), []
    for step in range(args.text_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.text_steps, TEXT_LR, 50)
        scenes, captions = caption_batch(rng, 256)
        states, mask = encode(text_encoder, tokenizer, captions, CAPTION_TOKENS, args.device)
        loss = text_loss(states, mask, codes.targets(scenes, captions, CAPTION_TOKENS).to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            report("text step", step, args.text_steps, losses, started)
    text_encoder.eval()
    held_out = demo_world.evaluation_prompts(400, seed=args.seed + 7)
    for label, prompts in (("held-out pairs", held_out[0::2]), ("held-out wordings", held_out[1::2]),
                           ("training", demo_world.evaluation_prompts(200, seed=args.seed + 7, held_out=False)),
                           ("two-shape", demo_world.two_shape_prompts(200, seed=args.seed + 7))):
        log(f"text encoder on 200 {label} captions: {read_back(text_encoder, tokenizer, codes, prompts, args.device)}")
    return text_encoder.requires_grad_(False).eval()


def read_back(text_encoder, tokenizer, codes: CaptionCodes, prompts, device) -> str:
    """The code error, and how often each token's nearest code is its own (tokens of shapes: per
    attribute of the nearest shape code)."""
    scenes, captions = [scene for _, scene in prompts], [text for text, _ in prompts]
    with torch.no_grad():
        states, mask = encode(text_encoder, tokenizer, captions, CAPTION_TOKENS, device)
    targets = codes.targets(scenes, captions, CAPTION_TOKENS)
    states = states.float().cpu()
    error = text_loss(states, mask.cpu(), targets).item()
    labels = [("filler",)] + [("background", k) for k in range(len(demo_world.BACKGROUND_COLOURS) + 1)]
    labels += [("shape",) + combination for combination in itertools.product(
        *(range(len(values) + 1) for _, values in ATTRIBUTE_VALUES))]
    every_code = torch.stack([codes.code(label) for label in labels])
    right = {name: [] for name in ("role", "background") + tuple(name for name, _ in ATTRIBUTE_VALUES)}
    for row, (scene, text) in enumerate(zip(scenes, captions)):
        for column, label in enumerate(codes.labels(scene, caption_words(text))):
            nearest = labels[int(((every_code - states[row, column]) ** 2).sum(-1).argmin())]
            right["role"].append(nearest[0] == label[0])
            if label[0] == "background":
                right["background"].append(nearest == label)
            elif label[0] == "shape":
                for k, (name, _) in enumerate(ATTRIBUTE_VALUES):
                    right[name].append(nearest[0] == "shape" and nearest[k + 1] == label[k + 1])
    return f"code error {error:.4f}; " + ", ".join(f"{name} {np.mean(v):.1%}" for name, v in right.items() if v)


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def save_pipeline(output: Path, transformer, text_encoder, vae) -> None:
    # Half-precision copies: the live modules keep training (or stay frozen) in full precision.
    half = {name: copy.deepcopy(module).to(torch.float16)
            for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae))}
    # A fresh tokenizer: the training one remembers its last padding call and would save it.
    pipeline = PixArtSigmaPipeline(tokenizer=tiny_tokenizer(demo_world.VOCABULARY),
                                   scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG), **half)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)


def transformer_pictures(rng, count: int) -> tuple[torch.Tensor, list[str]]:
    """The transformer stage's pictures and captions, CAPTION_DROP of them dropped to the empty prompt."""
    images, captions = render_batch(rng, count, TRANSFORMER_TWO_SHAPES, TRANSFORMER_SHAPE_ODDS)
    return images, ["" if rng.random() < CAPTION_DROP else text for text in captions]


def transformer_batch(rng, batch_size: int, text_encoder, tokenizer, scale: float, device) -> tuple:
    """One training batch for the transformer: scaled latents, caption embeddings and their mask."""
    images, captions = transformer_pictures(rng, batch_size)
    latents = fixed_latent(images).to(device) * scale  # the pictures themselves stay on the CPU
    # One length for every batch (captions have at most 20 tokens), so the compiled graph sees one
    # shape; padding is masked out, as is the pipeline's padding to 300 tokens.
    tokens = tokenizer(captions, padding="max_length", max_length=CAPTION_TOKENS, return_tensors="pt").to(device)
    with torch.no_grad():
        embeddings = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return latents, embeddings, tokens.attention_mask


def training_forward(transformer, device, precision: str = "bf16", compile: bool = True):
    """The transformer's noise prediction for training, as a function of (noisy latents, embeddings, mask,
    timesteps), in fp32. bf16 autocast (matmuls and attention in bf16; weights, optimizer, EMA and loss stay
    fp32) plus torch.compile make a step 1.6x faster on this CPU, whose AVX-512 bf16 matmuls run 3x fp32's
    (benchmarks/demo_training.py): more steps in the same time."""
    device_type = torch.device(device).type
    if device_type == "cpu" and precision == "bf16":
        # The CPU's fused bf16 attention backward is slow (half the step); written out as matmuls and a
        # softmax it is fast, and compile fuses it. Only training uses it: the processor is not saved.
        transformer.set_attn_processor(AttnProcessor())
    # dynamic=False: one fixed shape; a recompile for dynamic shapes made every later step slower.
    compiled = torch.compile(transformer, dynamic=False) if compile else transformer
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward(noisy, embeddings, mask, timesteps):
        with autocast:
            prediction = compiled(noisy, encoder_hidden_states=embeddings, encoder_attention_mask=mask,
                                  timestep=timesteps, return_dict=False)[0]
        return prediction[:, :noisy.shape[1]].float()  # the learned-sigma half is unused by the samplers

    return forward


def diffusion_loss(forward, noise_scheduler, latents, embeddings, mask) -> torch.Tensor:
    """Noise prediction at random timesteps, min-SNR weighted, as PixArt trains."""
    device = latents.device
    noise = torch.randn(latents.shape).to(device)  # from the CPU generator on every device: same data stream
    timesteps = torch.randint(0, 1000, (len(latents),))
    weights = snr_weights(noise_scheduler, timesteps).to(device)
    timesteps = timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    per_image = ((forward(noisy, embeddings, mask, timesteps) - noise) ** 2).mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


class TransformerTraining:
    """The transformer stage: the model, AdamW, the EMA of its weights, the shipped sampler's noise schedule
    and the training forward; `step` is one training step on a batch (the trainer's and the benchmark's)."""

    def __init__(self, device, lr: float, precision: str = "bf16", compile: bool = True):
        self.transformer = build_transformer().to(device)
        self.parameters = list(self.transformer.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=0.01)
        self.ema = EMAModel(self.parameters, **EMA_SETTINGS)
        self.noise_scheduler = DDPMScheduler.from_config(PIXART_SCHEDULER_CONFIG)
        self.forward = training_forward(self.transformer, device, precision, compile)

    def step(self, latents, embeddings, mask) -> torch.Tensor:
        """Backpropagate the loss, clip, AdamW, EMA; returns the loss."""
        loss = diffusion_loss(self.forward, self.noise_scheduler, latents, embeddings, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.ema.step(self.parameters)
        return loss


def train_transformer(args, vae: AutoencoderKL, text_encoder: T5EncoderModel, tokenizer) -> None:
    rng = np.random.default_rng([args.seed, 2])
    torch.manual_seed(args.seed + 2)
    training = TransformerTraining(args.device, args.lr, args.precision, args.compile)
    transformer, parameters, ema = training.transformer, training.parameters, training.ema
    first = resume_transformer(args.state / TRANSFORMER_STATE, training, rng)
    log(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M parameters, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M, {args.steps} steps of {args.batch_size}"
        f" ({args.precision}{', compiled' if args.compile else ''})"
        + (f", resumed after step {first}" if first else ""))
    started, losses = time.time(), []
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(first, last):
        for group in training.optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 200)
        batch = transformer_batch(rng, args.batch_size, text_encoder, tokenizer, vae.config.scaling_factor, args.device)
        losses.append(training.step(*batch).item())
        if (step + 1) % 100 == 0:
            report("step", step - first, args.steps - first, losses, started)
        if (step + 1) % args.save_every == 0 or step + 1 == last:
            save_transformer_state(args.state / TRANSFORMER_STATE, training, rng, step + 1)
            ema.store(parameters)
            ema.copy_to(parameters)
            save_pipeline(args.output, transformer, text_encoder, vae)
            ema.restore(parameters)
            log(f"saved the EMA weights of step {step + 1} to {args.output} (and the training state to {args.state})")
    if first >= last:  # nothing left to train: write what the state holds
        ema.copy_to(parameters)
        save_pipeline(args.output, transformer, text_encoder, vae)
        log(f"the state had trained {first} steps already: wrote its EMA weights to {args.output}")


TRANSFORMER_STATE = "transformer-training.pt"


def save_transformer_state(path: Path, training: TransformerTraining, rng: np.random.Generator, step: int) -> None:
    """Everything the next steps depend on: weights, AdamW, EMA, both random streams and the step."""
    state = {"step": step, "transformer": training.transformer.state_dict(),
             "optimizer": training.optimizer.state_dict(), "ema": training.ema.state_dict(),
             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    staging = path.with_name(path.name + ".partial")
    torch.save(state, staging)
    staging.replace(path)  # a kill while saving leaves the previous state whole


def resume_transformer(path: Path, training: TransformerTraining, rng: np.random.Generator) -> int:
    """Load the saved state into `training` and `rng`; the step to go on from (0: none saved)."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    training.transformer.load_state_dict(state["transformer"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.ema.load_state_dict(state["ema"])
    training.ema.to(next(training.transformer.parameters()).device)  # loaded on the CPU
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def open_state(args) -> None:
    """The state folder keeps each finished stage and the transformer's progress, so a stopped run (a
    kill, --stop-after, the end of a session) goes on where it stopped when started again with the same
    settings. A folder holding another recipe's run is left alone unless --fresh says to discard it."""
    recipe = {k: str(v) for k, v in sorted(vars(args).items())
              if k not in ("output", "state", "stop_after", "save_every", "fresh")}
    # The code is part of the recipe: a changed constant (layers, data mix) must not reuse old stages.
    recipe["code"] = hashlib.sha256(Path(__file__).read_bytes() + Path(demo_world.__file__).read_bytes()).hexdigest()[:16]
    recipe_file = args.state / "recipe.json"
    if args.fresh:
        shutil.rmtree(args.state, ignore_errors=True)
    elif recipe_file.exists() and (held := json.loads(recipe_file.read_text())) != recipe:
        differences = ", ".join(f"{k}: {held.get(k)} there, {recipe.get(k)} here"
                                for k in sorted(set(held) | set(recipe)) if held.get(k) != recipe.get(k))
        raise SystemExit(f"error: --state {args.state} holds a run with other settings ({differences}); "
                         "give another --state, or --fresh to discard that run")
    args.state.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(json.dumps(recipe, indent=1))


def stage(args, name: str, build, train) -> torch.nn.Module:
    """A finished stage's module from the state folder (read by `build`), else train it and keep it there."""
    folder = args.state / name
    if (folder / "done").exists():
        log(f"{name}: taken from {folder}")
        return build(folder)
    module = train()
    shutil.rmtree(folder, ignore_errors=True)
    module.save_pretrained(folder)
    (folder / "done").touch()
    return module


def load_vae(folder: Path) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
    vae.load_state_dict(load_file(Path(folder) / "diffusion_pytorch_model.safetensors"))
    return vae.float().eval()


def load_text_encoder(folder: Path) -> T5EncoderModel:
    text_encoder = T5EncoderModel(T5Config.from_pretrained(folder))
    # The token embedding is stored once (`shared`), and tied to the encoder's.
    missing, unexpected = text_encoder.load_state_dict(load_file(Path(folder) / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    text_encoder.tie_weights()
    return text_encoder.float().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=TARGET, help="pipeline directory to write (default: the bundled demo)")
    parser.add_argument("--steps", type=int, default=24000, help="transformer training steps")
    # For the earlier patch-4 model, 20,000 steps of 32 beat 11,000 of 64 in the same time (held-out shape
    # 63% against 53%) and 28,000 of 16 (59%): batch 32 was the best of the three.
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per transformer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the transformer")
    parser.add_argument("--text-steps", type=int, default=1500, help="text encoder pre-training steps")
    parser.add_argument("--vae-steps", type=int, default=2400)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=1000, help="write the pipeline every N steps")
    parser.add_argument("--vae", type=Path, help="skip stage 1: the vae/ folder of an earlier run with the same --seed")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="transformer stage: bf16 autocast (default; fast where the CPU has AVX-512 bf16 or on a "
                             "GPU) or plain fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the transformer for training (needs a C++ compiler on the CPU; about a "
                             "minute to compile)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help="folder for finished stages and the transformer's progress: the same command started "
                             "again goes on from there (default: %(default)s)")
    parser.add_argument("--stop-after", type=int, help="stop after this transformer step; the same command goes on")
    parser.add_argument("--fresh", action="store_true", help="discard what --state holds and start from the beginning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (much faster; other rounding, so other files)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Denormals flush to zero on the main thread. It did not change the speed, but the shipped checkpoint
    # was trained with it, so it stays: the same files again.
    torch.set_flush_denormal(True)
    diffusers.utils.logging.set_verbosity_error()  # saving half-precision copies warns on every save
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed for deterministic CUDA matmuls
    torch.use_deterministic_algorithms(True)
    started = time.time()
    open_state(args)
    if args.vae:
        # Stage 1 is deterministic and stage 2 reads only the VAE's config, so this gives the same files
        # (from_config, not from_pretrained, which would write the folder's path into the saved config).
        vae = load_vae(args.vae).to(args.device)
        log(f"vae: taken from {args.vae}")
    else:
        vae = stage(args, "vae", load_vae, lambda: train_vae(args)).to(args.device)
    for parameter in vae.parameters():
        parameter.requires_grad_(False)
    scores = vae_round_trip(vae, seed=args.seed + 5, device=args.device)
    per_shape = scores.pop("per_shape")
    log("vae round trip, the checker on 300 decoded pictures: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items())
        + "; shape per shape: " + ", ".join(f"{k} {v:.0%}" for k, v in per_shape.items()))
    tokenizer = tiny_tokenizer(demo_world.VOCABULARY)
    # Then frozen, as PixArt trains with its T5.
    text_encoder = stage(args, "text_encoder", load_text_encoder,
                         lambda: train_text_encoder(args, tokenizer)).to(args.device).requires_grad_(False).eval()
    train_transformer(args, vae, text_encoder, tokenizer)
    if args.stop_after is not None and args.stop_after < args.steps:
        log(f"stopped after step {args.stop_after}: the same command goes on from there")
        return
    size = sum(p.stat().st_size for p in args.output.rglob("*.safetensors"))
    log(f"done in {(time.time() - started) / 60:.1f} min: {args.output} ({size / 1e6:.1f} MB of safetensors)")


if __name__ == "__main__":
    main()
