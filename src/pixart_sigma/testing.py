"""Tiny PixArt-Sigma checkpoints with the real architecture, for tests (and the demo trainer's tokenizer).

They use the same classes as the release (PixArtTransformer2DModel with ada_norm_single,
T5EncoderModel, AutoencoderKL, DPM-Solver++ configured as PixArt-Sigma ships it), saved in
diffusers format as safetensors, so they load through exactly the code real checkpoints use.
Random weights draw noise; they exist to test wiring, not to make pictures.
"""

from __future__ import annotations

from pathlib import Path

# Words of the tiny tokenizer; anything else is spelled with single letters.
TINY_WORDS = (
    "a an the of on in at with and small large big tiny red green blue yellow orange purple white black "
    "grey gray pink brown circle square triangle star background top bottom left right centre center "
    "cat dog fox photo painting of snow sky tree house"
).split()

# PixArt-Sigma's released scheduler configuration (DPM-Solver++ multistep, linear betas).
PIXART_SCHEDULER_CONFIG = dict(
    algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
    dynamic_thresholding_ratio=0.995, euler_at_final=False, lower_order_final=True,
    num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0, solver_order=2,
    solver_type="midpoint", steps_offset=0, thresholding=False, timestep_spacing="linspace",
    use_karras_sigmas=False, use_lu_lambdas=False, variance_type=None,
)


def tiny_tokenizer(words=TINY_WORDS):
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    vocab += [("▁" + word, -1.0 - i * 0.001) for i, word in enumerate(words)]
    vocab += [(char, -10.0) for char in letters] + [("▁" + char, -9.0) for char in letters]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    assert tokenizer("a red circle").input_ids != tokenizer("a blue square").input_ids
    return tokenizer


def tiny_transformer(sample_size: int = 8, num_layers: int = 2, heads: int = 2, head_dim: int = 8,
                     caption_channels: int = 32):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_channels=caption_channels, cross_attention_dim=heads * head_dim,
        in_channels=4, out_channels=8, norm_type="ada_norm_single", use_additional_conditions=False,
    )


def tiny_components(seed: int = 0, sample_size: int = 8) -> dict:
    """All five pipeline parts, deterministic from `seed`. The VAE scales by 8 like the SDXL VAE."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = tiny_transformer(sample_size=sample_size)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=8, layers_per_block=1, sample_size=sample_size * 8, scaling_factor=0.13025,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    ))
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_pipeline(directory, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a full tiny pipeline (model_index.json + five parts, safetensors) to `directory`."""
    from diffusers import PixArtSigmaPipeline

    pipeline = PixArtSigmaPipeline(**tiny_components(seed, sample_size))
    pipeline.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def save_tiny_transformer(directory, seed: int = 1, sample_size: int = 8) -> Path:
    """Write a transformer-only checkpoint (`directory/transformer/`), like the 512 and 2K releases."""
    import torch

    torch.manual_seed(seed)
    tiny_transformer(sample_size=sample_size).save_pretrained(Path(directory) / "transformer", safe_serialization=True)
    return Path(directory)
