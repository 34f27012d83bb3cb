"""Train the bundled demo model (`model_name="demo"`) from scratch on the shapes world.

The same classes as the released PixArt-Sigma checkpoint: PixArtTransformer2DModel (ada_norm_single),
a small T5EncoderModel with a word-level T5 tokenizer, AutoencoderKL, and the DPM-Solver++ scheduler
configuration PixArt-Sigma ships (linear betas 0.0001-0.02, 1000 steps, epsilon prediction).

Three stages, each deterministic from --seed (same files for the same torch version, --threads and CPU kind):
1. vae: the latent of a 64x64 picture is fixed, not learned: 4x4 average-pooled RGB in [-1, 1] plus the
   pooled signed distance to the shapes' outline (16x16x4; see shape_field). The encoder learns to
   produce it; the decoder learns to draw the sharp picture back from it, with noise added to its input
   so that it also cleans up imperfect generated latents.
   Then the checker reads pictures decoded from exact latents: the ceiling for the whole model.
2. text encoder: a small T5 learns to read the captions (which colour is the shape's, which the
   background's), as the release's T5 had learned language before PixArt used it; then it is frozen.
   A random T5 barely mixes its tokens, so to the transformer a caption was a bag of words and the two
   colours of "a red circle on a blue background" could not be told apart.
3. transformer: noise prediction as PixArt trains, with the frozen T5's embeddings through
   cross-attention, ~10% of captions dropped to the empty prompt (so classifier-free guidance works),
   min-SNR loss weighting and an EMA of the weights. In bf16 autocast and compiled with torch.compile
   (a C++ compiler must be installed; --no-compile otherwise): 1.6 times the fp32 speed on this CPU.
Scenes are rendered on the fly; the held-out colour-shape pairs and wordings never appear in any stage.

About 71 minutes on a 2-core CPU with the defaults (VAE 7, text encoder 2, transformer 62). Prints
progress and loss; writes a diffusers pipeline directory (model_index.json + five parts, safetensors,
half precision: ~5 MB) to --output.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
POOL = 4  # the VAE's scale factor: 64x64 pictures, 16x16 latents
CAPTION_DROP = 0.1
CAPTION_TOKENS = 24  # the transformer stage pads every caption to this many tokens (the longest has 20)
MIN_SNR_GAMMA = 5.0
EMA_SETTINGS = {"decay": 0.999, "use_ema_warmup": True, "power": 0.75}
TEXT_LR = 2e-3  # the text encoder's peak learning rate
FIELD_REACH = 8.0  # pixels: how far from a shape's outline its field still changes
SHAPE_THRESHOLD = 0.3  # colour distance from the background (RGB in [-1, 1]) that counts as shape; the
# closest palette pair (orange, yellow) is 0.64 apart, so edges move by well under a pixel
VAE_TWO_SHAPES = 0.2  # the VAE sees more two-shape pictures than the transformer: more edges to learn


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def render_batch(rng: np.random.Generator, count: int, two_shapes: float = 0.1) -> tuple[torch.Tensor, list[str]]:
    """`count` random training pictures as a (count, 3, 64, 64) tensor in [-1, 1], with captions."""
    scenes = [demo_world.training_scene(rng, two_shapes) for _ in range(count)]
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
        vocab_size=vocab_size, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
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
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, scaling_factor "
        f"{scaling_factor}, {args.vae_steps} steps of {args.vae_batch_size}")
    started, losses = time.time(), []
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, 1e-3, 50)
        images, _ = render_batch(rng, args.vae_batch_size, VAE_TWO_SHAPES)
        target = fixed_latent(images).to(args.device)  # from the CPU pictures: the field is drawn there
        images = images.to(args.device)
        posterior = vae.encode(images).latent_dist
        # The encoder's posterior: mean on the fixed latent, a small fixed spread (std ~0.02).
        encoder_loss = F.mse_loss(posterior.mean, target) + 0.01 * F.mse_loss(posterior.logvar, torch.full_like(posterior.logvar, -8.0))
        # Random numbers come from the CPU generator on every device, so the data stream is the same.
        noise = (torch.rand(len(images), 1, 1, 1) * 0.1 * torch.randn(target.shape)).to(args.device)
        decoded = vae.decode(target + noise).sample
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
    return demo_world.score(scenes, [Image.fromarray(picture) for picture in decoded])


ATTRIBUTE_VALUES = (("colour", demo_world.FOREGROUND_COLOURS), ("shape", demo_world.SHAPES),
                    ("size", tuple(demo_world.SIZES)), ("position", tuple(demo_world.POSITIONS)))
# What a caption says, as one class per slot: the background, then each of (up to) two shapes' attributes.
# Every slot has one more class than values, for "not said".
SLOT_CLASSES = [len(demo_world.BACKGROUND_COLOURS) + 1] + [len(values) + 1 for _, values in ATTRIBUTE_VALUES] * 2


def caption_targets(scene: demo_world.Scene) -> list[int]:
    said = scene.named
    targets = [demo_world.BACKGROUND_COLOURS.index(scene.background) if "background" in said
               else len(demo_world.BACKGROUND_COLOURS)]
    for slot in range(2):
        item = scene.shapes[slot] if slot < len(scene.shapes) else None
        for attribute, values in ATTRIBUTE_VALUES:
            said_value = getattr(item, attribute) if item is not None and attribute in said else None
            targets.append(values.index(said_value) if said_value is not None else len(values))
    return targets


class CaptionProbe(torch.nn.Module):
    """Reads what a caption says from the text encoder's token states, the way the transformer will:
    one learned query per slot attends over the tokens (keys), then a linear head classifies the state
    it gathered. The colour word must thus carry its role (shape's or background's) in its key and its
    identity in its state, which composes for colour-shape pairs never seen together."""

    def __init__(self, width: int):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(SLOT_CLASSES), width) / math.sqrt(width))
        self.keys = torch.nn.Linear(width, width)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, classes) for classes in SLOT_CLASSES)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        scores = torch.einsum("sd,btd->bst", self.queries, self.keys(states)) / math.sqrt(states.shape[-1])
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        gathered = scores.softmax(-1) @ states
        return [head(gathered[:, k]) for k, head in enumerate(self.heads)]


def read_captions(text_encoder, tokenizer, probe, captions: list[str], device) -> list[torch.Tensor]:
    tokens = tokenizer(captions, padding="longest", return_tensors="pt").to(device)
    states = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return probe(states, tokens.attention_mask)


def train_text_encoder(args, tokenizer) -> T5EncoderModel:
    """Teach the small T5 to read the captions before it is frozen, as PixArt's T5 had learned language.

    Objective: from the encoder's token states, a probe (CaptionProbe) must tell what the caption says:
    the background colour and each shape's colour, shape, size and position, or that it is not said.
    Bag-of-words features cannot (swap the two colours of "a red circle on a blue background"), so the
    encoder learns which colour word belongs to the shape and which to the background. Only training
    captions are used; the held-out pairs and wordings are read at the end (logged), never trained on.
    """
    rng = np.random.default_rng([args.seed, 3])
    torch.manual_seed(args.seed + 3)
    text_encoder = build_text_encoder(len(tokenizer)).to(args.device)
    probe = CaptionProbe(text_encoder.config.d_model).to(args.device)
    parameters = list(text_encoder.parameters()) + list(probe.parameters())
    text_encoder.train()
    optimizer = torch.optim.AdamW(parameters, lr=TEXT_LR, weight_decay=0.01)
    log(f"text encoder: {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters, "
        f"{args.text_steps} steps of 256 captions")
    started, losses = time.time(), []
    for step in range(args.text_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.text_steps, TEXT_LR, 50)
        scenes = [demo_world.training_scene(rng) for _ in range(256)]
        captions = [demo_world.caption(scene, rng) for scene in scenes]
        for index in np.nonzero(rng.random(len(scenes)) < CAPTION_DROP)[0]:
            scenes[index] = dataclasses.replace(scenes[index], named=frozenset())
            captions[index] = ""
        targets = torch.tensor([caption_targets(scene) for scene in scenes], device=args.device)
        logits = read_captions(text_encoder, tokenizer, probe, captions, args.device)
        loss = sum(F.cross_entropy(slot, targets[:, k]) for k, slot in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            report("text step", step, args.text_steps, losses, started)
    text_encoder.eval()
    with torch.no_grad():
        prompts = demo_world.evaluation_prompts(200, seed=args.seed + 7)
        targets = torch.tensor([caption_targets(scene) for _, scene in prompts], device=args.device)
        logits = read_captions(text_encoder, tokenizer, probe, [text for text, _ in prompts], args.device)
        right = torch.stack([slot.argmax(-1) == targets[:, k] for k, slot in enumerate(logits)])
    slots = ", ".join(f"{name} {rate:.0%}" for name, rate in zip(
        ("background", "colour", "shape", "size", "position"), right[:5].float().mean(1).tolist()))
    log(f"text encoder reads 200 held-out captions: {right.all(0).float().mean().item():.0%} fully right ({slots})")
    return text_encoder.requires_grad_(False).eval()


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


def transformer_batch(rng, batch_size: int, text_encoder, tokenizer, scale: float, device) -> tuple:
    """One training batch for the transformer: scaled latents, caption embeddings and their mask."""
    images, captions = render_batch(rng, batch_size)
    captions = ["" if rng.random() < CAPTION_DROP else text for text in captions]
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
    log(f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M parameters, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M, {args.steps} steps of {args.batch_size}"
        f" ({args.precision}{', compiled' if args.compile else ''})")
    started, losses = time.time(), []
    for step in range(args.steps):
        for group in training.optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, 200)
        batch = transformer_batch(rng, args.batch_size, text_encoder, tokenizer, vae.config.scaling_factor, args.device)
        losses.append(training.step(*batch).item())
        if (step + 1) % 100 == 0:
            report("step", step, args.steps, losses, started)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            ema.store(parameters)
            ema.copy_to(parameters)
            save_pipeline(args.output, transformer, text_encoder, vae)
            ema.restore(parameters)
            log(f"saved the EMA weights of step {step + 1} to {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=TARGET, help="pipeline directory to write (default: the bundled demo)")
    parser.add_argument("--steps", type=int, default=22000, help="transformer training steps")
    # For the earlier patch-4 model, 20,000 steps of 32 beat 11,000 of 64 in the same time (held-out shape
    # 63% against 53%) and 28,000 of 16 (59%): batch 32 was the best of the three.
    parser.add_argument("--batch-size", type=int, default=32, help="pictures per transformer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the transformer")
    parser.add_argument("--text-steps", type=int, default=1500, help="text encoder pre-training steps")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=1000, help="write the pipeline every N steps")
    parser.add_argument("--vae", type=Path, help="skip stage 1: the vae/ folder of an earlier run with the same --seed")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="transformer stage: bf16 autocast (default; fast where the CPU has AVX-512 bf16 or on a "
                             "GPU) or plain fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the transformer for training (needs a C++ compiler on the CPU; about a "
                             "minute to compile)")
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
    if args.vae:
        # Stage 1 is deterministic and stage 2 reads only the VAE's config, so this gives the same files
        # (from_config, not from_pretrained, which would write the folder's path into the saved config).
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(args.vae))
        vae.load_state_dict(load_file(Path(args.vae) / "diffusion_pytorch_model.safetensors"))
        vae = vae.to(args.device)
        log(f"vae: taken from {args.vae}")
    else:
        vae = train_vae(args)
    for parameter in vae.parameters():
        parameter.requires_grad_(False)
    scores = vae_round_trip(vae, seed=args.seed + 5, device=args.device)
    log("vae round trip, the checker on 300 decoded pictures: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))
    tokenizer = tiny_tokenizer(demo_world.VOCABULARY)
    text_encoder = train_text_encoder(args, tokenizer)  # then frozen, as PixArt trains with its T5
    train_transformer(args, vae, text_encoder, tokenizer)
    size = sum(p.stat().st_size for p in args.output.rglob("*.safetensors"))
    log(f"done in {(time.time() - started) / 60:.1f} min: {args.output} ({size / 1e6:.1f} MB of safetensors)")


if __name__ == "__main__":
    main()
