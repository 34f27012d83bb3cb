"""Exact reuse of the text's work across the steps of a call: the same pixels with fewer transformer FLOPs.

PixArt's transformer turns the prompt embeddings into the same things at every step: the caption projection
(two linears on every token) and, in each block, the cross-attention's keys and values (`attn2.to_k/to_v` on
every token; up to 300 tokens, and twice that under guidance). Within one denoising call the embeddings never
change, so `session(transformer, embeds)` computes them at the first step and hands the same tensors to the
later ones. Outside a session the transformer runs exactly as diffusers' (the processor below is diffusers'
AttnProcessor2_0 with the key and value looked up first), so a cached call's pixels are bit for bit the
uncached call's (tests/test_text_cache.py).

diffusers 0.42 ships a text K/V cache hook (hooks/text_kv_cache.py), but only for NucleusMoE's blocks; PixArt's
BasicTransformerBlock needs this one. Not used under torch.compile (a Python-side cache would break its graph).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

INSTALLED = "_pixart_sigma_text_cache"  # on a transformer: its TextCache


@dataclass
class _Call:
    """One call's cached text work: the embeddings it was made from, the projection, each attention's K/V."""

    source: torch.Tensor
    projected: Optional[torch.Tensor] = None
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hits: int = 0  # steps that reused the projection (tests and benchmarks count them)


class TextCache:
    """Installed once on a transformer: its caption projection and cross-attention processors look here."""

    def __init__(self, transformer):
        self.call: Optional[_Call] = None
        projection = transformer.caption_projection
        if projection is not None:
            original = projection.forward

            def forward(caption: torch.Tensor) -> torch.Tensor:
                call = self.call
                if call is None or caption is not call.source:
                    return original(caption)
                if call.projected is None:
                    call.projected = original(caption)
                else:
                    call.hits += 1
                return call.projected

            projection.forward = forward  # an instance attribute: module names and weights stay as they are
        from diffusers.models.attention_processor import AttnProcessor2_0

        for block in transformer.transformer_blocks:
            # Only where diffusers' default runs: a processor someone chose (xformers, a custom one) is kept.
            if getattr(block, "attn2", None) is not None and type(block.attn2.processor) is AttnProcessor2_0:
                block.attn2.set_processor(CachedCrossAttention(self))


def install(transformer) -> TextCache:
    """The transformer's TextCache, installed at the first use."""
    cache = transformer.__dict__.get(INSTALLED)
    if cache is None:
        cache = TextCache(transformer)
        transformer.__dict__[INSTALLED] = cache
    return cache


@contextlib.contextmanager
def session(transformer, embeds: torch.Tensor) -> Iterator[_Call]:
    """While open, the transformer called with exactly these `embeds` (the same tensor object) computes the text
    side once. One session at a time per transformer (the engine's device turn makes it so)."""
    cache = install(transformer)
    call = _Call(embeds)
    cache.call = call
    try:
        yield call
    finally:
        cache.call = None


def _same_tensor(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """`a` is `b` or a view of all of it (the transformer reshapes the projection with .view each step)."""
    return (b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device)


class CachedCrossAttention:
    """diffusers' AttnProcessor2_0 for cross-attention, with the keys and values of a session's text reused."""

    def __init__(self, cache: TextCache):
        self.cache = cache

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = self._key_value(attn, hidden_states, encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _key_value(self, attn, hidden_states: torch.Tensor,
                   encoder_hidden_states: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        call = self.cache.call
        # The blocks read the projection of the session's embeddings (or the embeddings, with no projection).
        cached = call is not None and _same_tensor(encoder_hidden_states, call.projected if call.projected is not None
                                                   else call.source)
        if cached and id(attn) in call.keys_values:
            return call.keys_values[id(attn)]
        key_value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if cached:
            call.keys_values[id(attn)] = key_value
        return key_value


__all__ = ["install", "session", "TextCache", "CachedCrossAttention"]
