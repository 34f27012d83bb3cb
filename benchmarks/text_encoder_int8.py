"""text_encoder_dtype=int8 against bfloat16: T5's resident bytes, encode time and embedding drift.

Two encoders: the demo model's T5 (its own prompts) and a release-size T5-XXL encoder built from its
config with random weights (random token ids as texts). Random weights say nothing about image quality
on the real weights: that row measures memory, time and how far int8 rounding moves the numbers.

    OMP_NUM_THREADS=2 python benchmarks/text_encoder_int8.py [--t5-layers 24] [--prompts 20] [--repeats 3]

Prints a Markdown table. Both formats are measured in the same process: bfloat16 first, then the same
module quantized in place (devices.quantize_int8, what the engine does), so the weights compared are the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pixart_sigma.checkpoints import load_part, locate, resolve_checkpoint
from pixart_sigma.demo_world import evaluation_prompts
from pixart_sigma.devices import module_bytes, quantize_int8
from pixart_sigma.settings import MAX_SEQUENCE_LENGTH

XXL = dict(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu")
XXL_LAYERS = 24
RANDOM_LABEL = "T5-XXL encoder, random weights: not evidence of image quality"


def encode(encoder, batch) -> torch.Tensor:
    ids, mask = batch
    with torch.inference_mode():
        return encoder(ids, attention_mask=mask)[0].float()


def median_seconds(encoder, batch, repeats: int) -> float:
    encode(encoder, batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(encoder, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(encoder, timing_batch, batches, repeats: int) -> dict:
    return {"bytes": module_bytes(encoder), "seconds": median_seconds(encoder, timing_batch, repeats),
            "embeddings": [encode(encoder, batch) for batch in batches]}


def cosines(reference: list[torch.Tensor], other: list[torch.Tensor], batches) -> list[float]:
    """Per text: the cosine of its real tokens' embeddings (padding left out), flattened, to the reference's."""
    values = []
    for ref, out, (_, mask) in zip(reference, other, batches):
        keep = mask[0].bool()
        values.append(torch.nn.functional.cosine_similarity(ref[0][keep].flatten(), out[0][keep].flatten(),
                                                            dim=0).item())
    return values


def demo_inputs(count: int):
    folders = locate(resolve_checkpoint("demo")).folders
    tokenizer = load_part(folders["tokenizer"], "tokenizer", None)
    encoder = load_part(folders["text_encoder"], "text_encoder", torch.bfloat16).eval()

    def tokens(text):  # as the engine pads: to max_sequence_length, with the mask
        out = tokenizer(text, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                        return_tensors="pt")
        return out.input_ids, out.attention_mask

    texts = [prompt for prompt, _ in evaluation_prompts(count, seed=0)]
    long_text = " ".join(texts)  # truncated to the 300 tokens: a full-length prompt for the timing
    return encoder, tokens(long_text), [tokens(text) for text in texts]


def random_xxl_inputs(count: int, layers: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**XXL, num_layers=layers, is_encoder_decoder=False, use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16 directly: 9.5 GB, not 19 in float32 first
    try:
        torch.manual_seed(0)
        encoder = T5EncoderModel(config).eval()
    finally:
        torch.set_default_dtype(default)
    rng = np.random.default_rng(0)

    def tokens(length):  # `length` random ids ending in </s> (id 1), padded to 300 with the mask
        ids = torch.zeros(1, MAX_SEQUENCE_LENGTH, dtype=torch.long)
        mask = torch.zeros(1, MAX_SEQUENCE_LENGTH, dtype=torch.long)
        ids[0, :length - 1] = torch.from_numpy(rng.integers(2, XXL["vocab_size"], length - 1))
        ids[0, length - 1] = 1
        mask[0, :length] = 1
        return ids, mask

    lengths = np.linspace(8, MAX_SEQUENCE_LENGTH, count).astype(int)
    return encoder, tokens(MAX_SEQUENCE_LENGTH), [tokens(int(length)) for length in lengths]


def rows(name: str, encoder, timing_batch, batches, repeats: int) -> list[str]:
    bf16 = measure(encoder, timing_batch, batches, repeats)
    quantize_int8(encoder)  # in place: the bfloat16 Linear weights are freed as each is replaced
    int8 = measure(encoder, timing_batch, batches, repeats)
    similarity = cosines(bf16["embeddings"], int8["embeddings"], batches)
    return [
        f"| {name} | bfloat16 | {bf16['bytes']:,} | 1.00 | {bf16['seconds']:.3f} | 1.00 | 1 | 1 |",
        f"| {name} | int8 | {int8['bytes']:,} | {int8['bytes'] / bf16['bytes']:.2f} | {int8['seconds']:.3f} | "
        f"{int8['seconds'] / bf16['seconds']:.2f} | {statistics.mean(similarity):.5f} | {min(similarity):.5f} |",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-layers", type=int, default=XXL_LAYERS,
                        help=f"blocks of the random T5-XXL encoder (the release has {XXL_LAYERS}; fewer to fit time)")
    parser.add_argument("--prompts", type=int, default=20, help="texts the cosine similarity is taken over")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodes per format (the median is shown)")
    parser.add_argument("--skip-xxl", action="store_true", help="the demo encoder only")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; encode time: one "
          f"{MAX_SEQUENCE_LENGTH}-token prompt, median of {args.repeats}; cosine: int8 to bfloat16 embeddings of "
          f"each text's real tokens, over {args.prompts} texts\n")
    print("| encoder | T5 dtype | resident bytes (params + buffers) | vs bf16 | encode s | vs bf16 "
          "| cosine mean | cosine min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows("demo T5 (demo prompts)", *demo_inputs(args.prompts), args.repeats):
        print(row, flush=True)
    if not args.skip_xxl:
        name = RANDOM_LABEL if args.t5_layers == XXL_LAYERS else (
            f"{RANDOM_LABEL} ({args.t5_layers} of {XXL_LAYERS} layers)")
        for row in rows(name, *random_xxl_inputs(args.prompts, args.t5_layers), args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
