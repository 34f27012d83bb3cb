"""Compare transformer recipes for the demo model on one GPU, each at the same CPU cost.

Several variants train side by side in one process, each as one CUDA graph on its own stream, so
their tiny kernels overlap (about 100 steps a second each for 4 variants on an H200). A variant's
`steps` are chosen so that it would take as long on the 2-core CPU as the recipe it is compared with
(measure a step there first, as the trainer runs it: benchmarks/demo_training.py). Then each is
scored on the held-out prompts with the batched diffusers pipeline at the defaults (20 steps,
guidance 4.5, one CPU generator per prompt with seed k: the same noise, and within one level the
same pixels, as tools/evaluate_demo_model.py). The sweep trains in fp32; the trainer, in bf16.

The VAE, tokenizer and text encoder are the bundled demo's (frozen, as in the trainer's stage 3);
pictures come from a cache of rendered batches shared by all variants (step s uses batch s mod N).
Writes results.json, grids.png (the first 16 pictures of each variant, a row each) and the best
variant's transformer to --out. The README's "What moved shape" gives two rounds of results.

    python tools/sweep_demo_recipes.py --variants '[{"name": "p2w128", "patch": 2, "width": 128,
        "layers": 6, "lr": 1e-3, "steps": 18000}, ...]'        # also "seed" (default 0)
"""
import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).parent))
import train_demo_model as trainer  # noqa: E402
from pixart_sigma import demo_world as world  # noqa: E402
from pixart_sigma.testing import PIXART_SCHEDULER_CONFIG, tiny_tokenizer  # noqa: E402

START = time.time()
DEMO = trainer.TARGET
BATCH = 32  # pictures per step, as the trainer
MAX_TOKENS = 32  # captions are padded to this, then cut to the longest: static shapes for the graphs


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {message}", flush=True)


# ---- data -------------------------------------------------------------------------------------------
_tokenizer = None


def _start_worker():
    global _tokenizer
    torch.set_num_threads(1)
    _tokenizer = tiny_tokenizer(world.VOCABULARY)


def make_batch(index: int):
    """Batch `index` of the cache: latents (scaled later), token ids and masks; 10% of captions empty."""
    rng = np.random.default_rng([7, index])
    images, captions = trainer.transformer_pictures(rng, BATCH)
    latents = trainer.fixed_latent(images).numpy().astype(np.float32)
    tokens = _tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="np")
    assert tokens["attention_mask"].sum(1).max() < MAX_TOKENS
    return latents, tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int8)


def build_cache(count: int, workers: int):
    with mp.get_context("fork").Pool(workers, initializer=_start_worker) as pool:
        parts = pool.map(make_batch, range(count), chunksize=8)
    lat = torch.from_numpy(np.stack([p[0] for p in parts]))
    ids = torch.from_numpy(np.stack([p[1] for p in parts])).long()
    mask = torch.from_numpy(np.stack([p[2] for p in parts])).long()
    return lat, ids, mask


# ---- variants ---------------------------------------------------------------------------------------
class Variant:
    """One recipe: its transformer, AdamW, EMA and static input buffers; on cuda one captured graph
    does a whole step (noising, forward, min-SNR loss, backward, clipping, AdamW), as the trainer does."""

    def __init__(self, spec: dict, device: torch.device, tables, seed: int = 0):
        self.spec = spec
        self.name, self.steps, self.peak = spec["name"], spec["steps"], spec["lr"]
        self.device = device
        torch.manual_seed(seed + 2)
        self.model = trainer.build_transformer(spec["patch"], spec["width"], spec["layers"]).to(device)
        self.params = list(self.model.parameters())
        self.ema = EMAModel(self.params, foreach=True, **trainer.EMA_SETTINGS)
        self.sqrt_ab, self.sqrt_1mab, self.snr_w = tables  # per timestep, on the device: nothing on the host
        cuda = device.type == "cuda"
        self.lr = torch.tensor(0.0, device=device) if cuda else 0.0  # a tensor, so the graph reads each step's
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.01, foreach=True, capturable=cuda)
        self.gen = torch.Generator(device=device).manual_seed(seed + 100)
        self.stream = torch.cuda.Stream() if cuda else None
        self.graph = None
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)
        self.losses = []
        self.done = False

    def set_inputs(self, lat, emb, mask):
        self.lat, self.emb, self.mask = lat.clone(), emb.clone(), mask.clone()
        self.noise = torch.zeros_like(self.lat)
        self.t = torch.zeros(len(lat), dtype=torch.long, device=self.device)

    def body(self):
        a = self.sqrt_ab[self.t][:, None, None, None]
        b = self.sqrt_1mab[self.t][:, None, None, None]
        noisy = a * self.lat + b * self.noise
        pred = self.model(noisy, encoder_hidden_states=self.emb, encoder_attention_mask=self.mask,
                          timestep=self.t, return_dict=False)[0][:, :4]
        per = ((pred - self.noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * self.snr_w[self.t]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return loss.detach()

    def capture(self):
        s = self.stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.lr.fill_(0.0)
            for _ in range(3):
                self.noise.normal_(generator=self.gen)
                self.t.random_(0, 1000, generator=self.gen)
                self.opt.zero_grad(set_to_none=True)
                self.body()
            # forget the warm-up: zero Adam's moments and step counts (lr was 0, weights unchanged)
            for state in self.opt.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        torch.cuda.current_stream().wait_stream(s)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=s):
            self.static_loss = self.body()

    def train_step(self, lat, emb, mask):
        lr = trainer.cosine_lr(self.step, self.steps, self.peak, 200)
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            self.lat.copy_(lat, non_blocking=True)
            self.emb.copy_(emb, non_blocking=True)
            self.mask.copy_(mask, non_blocking=True)
            self.noise.normal_(generator=self.gen)
            self.t.random_(0, 1000, generator=self.gen)
            if self.graph is not None:
                self.lr.fill_(lr)
                self.graph.replay()
                self.loss_sum += self.static_loss
            else:
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                self.loss_sum += self.body()
            self.ema.step(self.params)
        self.step += 1
        if self.step % 2000 == 0 or self.step == self.steps:
            self.losses.append((self.step, float(self.loss_sum) / 2000))
            self.loss_sum.zero_()
        if self.step >= self.steps:
            self.done = True


# ---- evaluation -------------------------------------------------------------------------------------
def evaluate(variant: Variant, parts: dict, count: int, device: torch.device):
    """The EMA weights' scores on the first `count` held-out prompts, and their pictures."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    variant.ema.copy_to(variant.params)
    model = variant.model.eval()
    pipe = PixArtSigmaPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                               transformer=model, scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    prompts = world.evaluation_prompts(count)
    scenes = [s for _, s in prompts]
    images = []
    for first in range(0, count, 120):
        chunk = prompts[first:first + 120]
        gens = [torch.Generator("cpu").manual_seed(first + k) for k in range(len(chunk))]
        images += pipe(prompt=[p for p, _ in chunk], num_inference_steps=20, guidance_scale=4.5, height=64, width=64,
                       generator=gens, use_resolution_binning=False, clean_caption=False).images
    result = {k: round(v, 4) for k, v in world.score(scenes, images).items()}
    for shape, share in world.shape_score_per_shape(scenes, images).items():
        result[f"shape_{shape}"] = round(share, 4)
    first48 = world.score(scenes[:48], images[:48])
    result["shape_first48"] = round(first48["shape"], 4)
    return result, images


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", required=True, help="JSON list of specs")
    ap.add_argument("--cache", type=int, default=16000)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=400, help="seconds from start when training stops")
    ap.add_argument("--eval", type=int, default=360)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sweep"))
    args = ap.parse_args()
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    specs = json.loads(Path(args.variants).read_text()) if args.variants.endswith(".json") else json.loads(args.variants)

    lat, ids, mask = build_cache(args.cache, args.workers)
    log(f"cache: {tuple(lat.shape)} latents, token ids {tuple(ids.shape)}")
    device = torch.device(args.device)
    from diffusers import DDPMScheduler, PixArtSigmaPipeline
    demo = PixArtSigmaPipeline.from_pretrained(DEMO, torch_dtype=torch.float32)
    parts = {"tokenizer": demo.tokenizer, "text_encoder": demo.text_encoder.to(device), "vae": demo.vae.to(device)}
    scale = demo.vae.config.scaling_factor
    length = int(mask.sum(-1).max())
    ids, mask = ids[..., :length], mask[..., :length]
    lat = (lat * scale).to(device)
    mask = mask.to(device)
    embs = []
    with torch.no_grad():
        flat_ids, flat_mask = ids.reshape(-1, length).to(device), mask.reshape(-1, length)
        for first in range(0, len(flat_ids), 16384):
            embs.append(parts["text_encoder"](flat_ids[first:first + 16384], attention_mask=flat_mask[first:first + 16384])[0])
    emb = torch.cat(embs).reshape(*ids.shape, -1)
    log(f"embeddings {tuple(emb.shape)}; {length} tokens at most")

    ns = DDPMScheduler.from_config(PIXART_SCHEDULER_CONFIG)
    ab = ns.alphas_cumprod
    tables = tuple(table.to(device) for table in (ab.sqrt(), (1 - ab).sqrt(), trainer.snr_weights(ns, torch.arange(1000))))
    variants = []
    for spec in specs:
        v = Variant(spec, device, tables, seed=spec.get("seed", 0))
        v.set_inputs(lat[0], emb[0], mask[0])
        if device.type == "cuda":
            try:
                v.capture()
            except Exception:
                traceback.print_exc()
                log(f"{v.name}: capture failed, eager")
                v.graph = None
                v.opt = torch.optim.AdamW(v.params, lr=0.0, weight_decay=0.01, foreach=True)
        variants.append(v)
        log(f"{v.name}: {sum(p.numel() for p in v.params) / 1e6:.2f} M, {v.steps} steps, graph={v.graph is not None}")
    torch.cuda.synchronize() if device.type == "cuda" else None
    started = time.time()
    step = 0
    while not all(v.done for v in variants):
        n = step % len(lat)
        for v in variants:
            if not v.done:
                v.train_step(lat[n], emb[n], mask[n])
        step += 1
        if step % 1000 == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = step / (time.time() - started)
            if step % 5000 == 0:
                log(f"round {step}: {rate:.0f} rounds/s; active {[v.name for v in variants if not v.done]}")
            if time.time() - START > args.deadline:
                log("deadline: stopping the rest")
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    log(f"training done in {time.time() - started:.0f}s")
    results, grids = {}, []
    for v in variants:
        try:
            scores, images = evaluate(v, parts, args.eval, device)
        except Exception:
            traceback.print_exc()
            continue
        scores.update(steps_done=v.step, steps=v.steps, losses=v.losses[-3:], spec=v.spec)
        results[v.name] = scores
        grids.append(images[:16])
        log(f"{v.name}: {json.dumps({k: scores[k] for k in ('background', 'colour', 'shape', 'shape_triangle', 'size', 'position', 'steps_done') if k in scores})}")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    from PIL import Image
    grid = Image.new("RGB", (16 * 64, len(grids) * 64))
    for row, images in enumerate(grids):
        for k, image in enumerate(images):
            grid.paste(image, (64 * k, 64 * row))
    grid.save(out / "grids.png")
    best = max(results, key=lambda name: results[name]["shape"] + 0.5 * results[name]["colour"])
    from safetensors.torch import save_file
    model = next(v for v in variants if v.name == best).model
    save_file({k: t.detach().half().cpu().contiguous() for k, t in model.state_dict().items()},
              str(out / "best-transformer.safetensors"), metadata={"variant": best})
    (out / "best-config.json").write_text(json.dumps(dict(model.config)))
    log(f"saved {best}")
    log("all done")


if __name__ == "__main__":
    main()
