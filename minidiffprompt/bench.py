"""Benchmark: throughput, time per item and peak memory of every stage, and each fast path against the
straightforward computation it replaces, measured in the same run on random weights at the preset's sizes.

    python -m minidiffprompt bench --preset paper                  # GPU if there is one, else CPU (about 3 min)
    python -m minidiffprompt bench --preset paper --device cpu --out bench_cpu.json
    MDP_BENCH_BATCH=8 MDP_BENCH_COMPILE=1 python -m minidiffprompt bench --preset paper --device cuda

Stages: Mask-VAE training step, DiT training step, DDIM prompt generation per image (25 steps, kept latents
decoded, adapters), GLIP forward, stage-3 training step, evaluation per image. Nothing is downloaded: BERT comes
from `BertConfig()`, CLIP ViT-B/32 from `CLIPConfig()`, both with random weights (speed does not depend on them).

Memory: on CUDA `torch.cuda.max_memory_allocated` (everything the process holds on the GPU, weights included);
on CPU the peak resident set size of the process sampled every 2 ms during the stage, and its growth over the
stage's start (`memory_increase_mb`: activations, gradients, optimizer state created in the stage).
On CPU the DDIM loop is timed over `MDP_BENCH_DDIM_STEPS` steps (default 2) and scaled to 25: every step is one
identical DiT forward. The JSON marks such figures `"extrapolated": true`; `MDP_BENCH_FULL=1` runs all 25.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import dit as dit_module
from .glip import swin as swin_module
from .conditions import CLIPConditionEncoder, ConditionEncoder, build_condition_encoder
from .config import Preset
from .diffusion import GaussianDiffusion, get_betas
from .data.datasets import RefExpDataset, collate, glip_normalize, load_image, rasterize_mask
from .data.text import load_tokenizer
from .dit import dit_from_config
from .glip.model import GLIP
from .glip.bert import tokenize
from .utils.files import write_json
from .prompting import DiffPromptGenerator, freeze, seeded_noise
from .utils.runtime import autocast, pick_device
from .train_dit import update_ema
from .train_prompts import grounding_targets, prompt_loss
from .train_vae import vae_loss
from .vae import MaskVAE

# RefCOCO-length expressions (3-8 words): what the text encoders really see
CAPTIONS = ["man in red shirt on the left", "left zebra", "woman holding an umbrella", "blue car behind the bus",
            "the smaller elephant", "guy in white far right", "bowl of broccoli near the front", "middle giraffe"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak (ru_maxrss, kB on Linux, bytes on macOS) is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the CPU resident set sampled by a thread every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.base, self._stop = device, 0, 0, threading.Event()

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.peak_mb, self.increase_mb = self.peak / 2**20, (self.peak - self.base) / 2**20


@dataclasses.dataclass
class Bench:
    """What a run measures on and how long it may take."""
    device: torch.device
    batch: int = 2
    reps: int = 3                  # timed calls per measurement (the median is reported)
    heavy_s: float = 3.0           # a first call slower than this is the measurement itself (no more repeats)
    ddim_steps: int = 25           # DDIM steps actually run; fewer on CPU, scaled to 25
    compile: bool = False
    path: Path | None = None       # the JSON, rewritten after every measurement so a crash keeps what was measured
    results: dict = dataclasses.field(default_factory=lambda: {"stages": {}, "fast_paths": {}, "options": {}})

    def save(self):
        if self.path is not None:
            write_json(self.path, self.results)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, fn):
        """(seconds, output) of one synchronised call."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def measure(self, fn, items: int, warm: bool = False):
        """(stats, last output) of fn(): a warm-up call (unless `warm`), then `reps` timed calls, the median
        reported; a call slower than `heavy_s` ends the timing (a cold first call is then the measurement)."""
        with PeakMemory(self.device) as mem:
            times, cold = [], False
            if not warm:
                t, out = self.call(fn)
                if t >= self.heavy_s:
                    times, cold = [t], True
            while not cold and len(times) < self.reps:
                t, out = self.call(fn)
                times.append(t)
                if t >= self.heavy_s:
                    break
        s = statistics.median(times)
        return {"items": items, "seconds_per_call": round(s, 5), "seconds_per_item": round(s / items, 5),
                "items_per_second": round(items / s, 3), "peak_memory_mb": round(mem.peak_mb, 1),
                "memory_increase_mb": round(mem.increase_mb, 1), "timed_calls": len(times),
                "includes_first_call": cold}, out

    def stage(self, name: str, fn, items: int, **extra) -> dict:
        stats, _ = self.measure(fn, items)
        stats.update(extra)
        self.results["stages"][name] = stats
        self.save()
        print(f"{name:28s} {stats['seconds_per_item'] * 1e3:10.1f} ms/item {stats['items_per_second']:9.2f} items/s "
              f"peak {stats['peak_memory_mb']:8.0f} MB (+{stats['memory_increase_mb']:.0f})", flush=True)
        return stats

    def composite(self, name: str, parts: dict, items: int, measured: list, note: str) -> dict:
        """A stage timed in parts (seconds per call each), some scaled: their sum, marked extrapolated."""
        total = sum(parts.values())
        st = {"items": items, "seconds_per_call": round(total, 5), "seconds_per_item": round(total / items, 5),
              "items_per_second": round(items / total, 3),
              "peak_memory_mb": max(m["peak_memory_mb"] for m in measured),
              "memory_increase_mb": max(m["memory_increase_mb"] for m in measured),
              "extrapolated": True, "parts_s": {k: round(v, 5) for k, v in parts.items()}, "note": note}
        self.results["stages"][name] = st
        self.save()
        print(f"{name:28s} {st['seconds_per_item'] * 1e3:10.1f} ms/item {st['items_per_second']:9.2f} items/s "
              f"peak {st['peak_memory_mb']:8.0f} MB (+{st['memory_increase_mb']:.0f})  ({note})", flush=True)
        return st

    def compare(self, name: str, fast, slow, items: int, note: str, diff=None, kind: str = "fast path") -> dict:
        """Warm both up, then time `fast` and `slow`; `diff(out_fast, out_slow)` -> max |difference|."""
        self.call(fast), self.call(slow)                 # never compare a cold call with a warm one
        f, out_f = self.measure(fast, items, warm=True)
        s, out_s = self.measure(slow, items, warm=True)
        entry = {"kind": kind, "fast": f, "straightforward": s,
                 "speedup": round(s["seconds_per_call"] / f["seconds_per_call"], 3), "note": note}
        if diff is not None:
            d = float(diff(out_f, out_s))
            entry["max_abs_diff"] = d if math.isfinite(d) else None
        self.results["fast_paths"][name] = entry
        self.save()
        d = entry.get("max_abs_diff")
        agree = "" if diff is None else f"  max|Δ| {d:.1e}" if d is not None else "  max|Δ| not finite"
        print(f"  {name:34s} {f['seconds_per_call'] * 1e3:9.1f} ms vs {s['seconds_per_call'] * 1e3:9.1f} ms  "
              f"speed-up x{entry['speedup']:.2f}{agree}", flush=True)
        return entry

    def skip(self, name: str, why: str):
        self.results["fast_paths"][name] = {"skipped": why}
        self.save()
        print(f"  {name:34s} skipped: {why}", flush=True)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# The straightforward versions the fast paths are measured against


class ExplicitDiTAttention(dit_module.Attention):
    """DiT attention written out: softmax(q kᵀ/√d) v with the (B, h, N, N) score matrix in memory."""

    def forward(self, x, keep=None):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5      # (B, h, N, N)
        if keep is not None:                                        # padding keys (caption tokens) get no weight
            att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
        return self.proj(rearrange(att.softmax(-1) @ v, "b h n d -> b n (h d)"))


class ExplicitWindowAttention(swin_module.WindowAttention):
    """Swin window attention (prompts included) with explicit scores + bias, softmax, then the values."""

    def forward(self, x, mask=None, prompts=None):
        N = x.shape[1]
        P = 0 if prompts is None else prompts.shape[1]
        if P:
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)             # (B*nW, N+P, C)
        bias = self.attention_bias(P, mask)                            # (nW or 1, heads, N+P, N+P)
        nW = bias.shape[0]
        q, k, v = rearrange(self.qkv(x), "(b w) n (three h d) -> three b w h n d", three=3, w=nW, h=self.num_heads)
        att = (q @ k.transpose(-2, -1)) * self.scale + bias.to(q.dtype)   # (B, nW, heads, N+P, N+P)
        out = rearrange(att.softmax(-1) @ v, "b w h n d -> (b w) n (h d)")
        return self.proj(out[:, :N])


def with_explicit_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose DiT / Swin attention modules are the explicit versions (same weights)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is dit_module.Attention:
            new = ExplicitDiTAttention(m.qkv.in_features, m.num_heads)
        elif type(m) is swin_module.WindowAttention:
            ws = int(round(m.relative_position_index.shape[0] ** 0.5))
            new = ExplicitWindowAttention(m.qkv.in_features, ws, m.num_heads)
        else:
            continue
        new.load_state_dict(m.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(m.qkv.weight.device))
    return model


def decode_in_a_loop(vae: MaskVAE, latents: torch.Tensor) -> torch.Tensor:
    """The authors' way: one VAE decode per prompt depth. latents (D, B, C, h, w) -> (D, B, 1, M, M)."""
    return torch.stack([vae.decode(z) for z in latents])


def decode_batched(vae: MaskVAE, latents: torch.Tensor) -> torch.Tensor:
    """What `DiffPromptGenerator.sample_masks` does: all D·B latents in one call."""
    return vae.decode(latents.flatten(0, 1)).unflatten(0, latents.shape[:2])


# ----------------------------------------------------------------------------------------------------------------
# Models with random weights at the preset's sizes


class RandomCLIPEncoder(CLIPConditionEncoder):
    """CLIP ViT-B/32 built from `CLIPConfig()` with random weights and a word-level tokenizer: the real cost."""

    def __init__(self, tokenizer, image_size: int = 224, context_length: int = 77):
        ConditionEncoder.__init__(self)
        # late: transformers' CLIP model code is needed only by this optional real-CLIP row
        from transformers import CLIPConfig, CLIPModel
        self.model = CLIPModel(CLIPConfig()).requires_grad_(False).eval()
        self.tokenizer, self.dim = tokenizer, self.model.config.projection_dim
        self.image_size, self.context_length = image_size, context_length


def randomize_adaln(dit: nn.Module, std: float = 0.02) -> nn.Module:
    """Replace adaLN-Zero's zeros with small random weights: every block then contributes, as after training
    (with the zeros the attention output is multiplied by 0 and fast/straightforward would agree trivially)."""
    for name, p in dit.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            nn.init.normal_(p, std=std)
    return dit


def word_vocab(path: Path) -> Path:
    words = sorted({w for c in CAPTIONS for w in c.split()})
    path.write_text("\n".join(SPECIAL + words) + "\n")
    return path


def build_models(preset: Preset, vocab: Path, device) -> dict:
    tokenizer = load_tokenizer(vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bert-base-uncased config not found locally; using BertConfig()"
        glip = GLIP(preset.glip, vocab_file=None if preset.glip.text_model else vocab)
    glip.tokenizer = tokenizer
    d = preset.dit
    condition = (RandomCLIPEncoder(tokenizer) if d.condition == "clip" else build_condition_encoder(d))
    vae = MaskVAE(block_out_channels=preset.vae.block_out_channels, layers_per_block=preset.vae.layers_per_block,
                  latent_channels=preset.vae.latent_channels, norm_num_groups=preset.vae.norm_num_groups)
    return {"glip": freeze(glip).to(device), "condition": condition.to(device), "vae": vae.to(device),
            "dit": randomize_adaln(dit_from_config(d)).to(device),
            "diffusion": GaussianDiffusion(get_betas(d.noise_schedule, d.diffusion_steps), d.prediction)}


def make_batch(preset: Preset, b: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    S, M = preset.data.image_size, preset.data.mask_size
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    xy = torch.rand(b, 2, generator=g) * S * 0.5
    boxes = torch.cat([xy, xy + S * (0.2 + 0.3 * torch.rand(b, 2, generator=g))], 1)   # (B, 4) xyxy
    masks = (torch.rand(b, 1, M // 8, M // 8, generator=g) > 0.5).float()
    return {"image": torch.rand(b, 3, S, S, generator=g).to(device), "caption": captions,
            "spans": [[[0, len(c)]] for c in captions], "box": boxes.to(device), "size": [(640, 480)] * b,
            "mask": F.interpolate(masks, size=(M, M), mode="bilinear").to(device)}


# ----------------------------------------------------------------------------------------------------------------
# Stages


def bench_vae(bench: Bench, preset: Preset, m: dict, batch: dict):
    vae = copy.deepcopy(m["vae"]).train()
    opt = torch.optim.Adam(vae.parameters(), lr=preset.vae.lr)

    def step(model=vae, x=batch["mask"], opt=opt):
        recon, posterior = model(x, sample=True)
        loss = vae_loss(recon, x, posterior, preset.vae.kl_weight)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    bench.stage("vae_train_step", step, bench.batch)
    vae_cl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    opt_cl = torch.optim.Adam(vae_cl.parameters(), lr=preset.vae.lr)
    x_cl = batch["mask"].contiguous(memory_format=torch.channels_last)
    bench.compare("channels_last_vae_train_step", lambda: step(vae_cl, x_cl, opt_cl), step, bench.batch,
                  "VAE conv/GroupNorm step with NHWC tensors vs NCHW; helps where cuDNN/oneDNN have NHWC kernels")


def bench_dit(bench: Bench, preset: Preset, m: dict, batch: dict):
    dit, diffusion, b = m["dit"], m["diffusion"], bench.batch
    ema = copy.deepcopy(dit).requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=preset.dit.lr, weight_decay=preset.dit.weight_decay)
    x0 = torch.randn(b, 4, preset.dit.input_size, preset.dit.input_size, device=bench.device)

    @torch.no_grad()
    def encode_frozen():  # what `cache_latents` removes from every step
        z = m["vae"].encode(batch["mask"]).sample()
        return z, *m["condition"].encode(batch["image"], batch["caption"])

    _, img, txt = encode_frozen()

    def step():
        dit.train()
        t = torch.randint(0, diffusion.num_timesteps, (b,), device=bench.device)
        loss = diffusion.training_losses(lambda x, tt: dit(x, tt, img, txt), x0, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, dit, preset.dit.ema_decay)
        return loss
    cached = bench.stage("dit_train_step", step, b)
    enc, _ = bench.measure(encode_frozen, b)
    bench.results["options"]["dit.cache_latents"] = {
        "what": "encode every mask (posterior mean, σ) and every image/caption (condition features) once per run; "
                "each step draws x0 = mean + σ·ε afresh. Results unchanged (no augmentation is lost); costs "
                f"{(2 * x0[0].numel() + img[0].numel() + txt[0].numel()) * 4 / 1024:.1f} KB per item in memory",
        "step_with_encoders_s": round(cached["seconds_per_call"] + enc["seconds_per_call"], 5),
        "step_cached_s": cached["seconds_per_call"], "frozen_encoders_s": enc["seconds_per_call"],
        "speedup": round((cached["seconds_per_call"] + enc["seconds_per_call"]) / cached["seconds_per_call"], 3)}
    print(f"  {'dit.cache_latents (option)':34s} speed-up x{bench.results['options']['dit.cache_latents']['speedup']:.2f}")
    del ema, opt
    dit.eval().requires_grad_(False)
    t = torch.full((b,), 50, device=bench.device)
    with torch.no_grad():
        explicit = with_explicit_attention(dit)
        bench.compare("sdpa_dit_forward", lambda: dit(x0, t, img, txt), lambda: explicit(x0, t, img, txt), b,
                      "F.scaled_dot_product_attention vs explicit softmax(q kᵀ/√d) v in all DiT blocks", max_diff)
        if bench.compile:
            compiled = torch.compile(dit)
            bench.compare("torch_compile_dit_forward", lambda: compiled(x0, t, img, txt), lambda: dit(x0, t, img, txt),
                          b, "torch.compile(dit) vs eager (compile time excluded: the warm-up call)", max_diff)
        else:
            bench.skip("torch_compile_dit_forward", "off by default; MDP_BENCH_COMPILE=1 turns it on")
    del explicit
    return img, txt


def bench_generation(bench: Bench, preset: Preset, m: dict, batch: dict, prompter: DiffPromptGenerator):
    """DDIM prompt generation per image: condition features, 25 DDIM steps, decode of the kept latents, adapters."""
    b, cfg, steps = bench.batch, preset.prompt, bench.ddim_steps
    seeds = list(range(b))
    shape = prompter.latent_shape()
    with torch.no_grad():
        if steps == cfg.ddim_steps:
            bench.stage("ddim_prompts_per_image", lambda: prompter(batch["image"], batch["caption"], seeds), b,
                        ddim_steps=steps, extrapolated=False)
        img, txt = m["condition"].encode(batch["image"], batch["caption"])
        noise = seeded_noise(shape, seeds, bench.device)

        def sample(n=steps):
            return m["diffusion"].ddim_sample(lambda x, t: m["dit"](x, t, img, txt), noise.shape, noise,
                                              num_steps=n, eta=cfg.eta)[0]
        enc, _ = bench.measure(lambda: m["condition"].encode(batch["image"], batch["caption"]), b)
        ddim, _ = bench.measure(sample, b)
        latents = torch.randn(cfg.depth, b, *shape, device=bench.device)
        bench.compare("batched_vae_decode", lambda: decode_batched(m["vae"], latents),
                      lambda: decode_in_a_loop(m["vae"], latents), b,
                      f"all {cfg.depth}x{b} kept latents in one VAE decode vs one decode per prompt depth", max_diff)
        dec = bench.results["fast_paths"]["batched_vae_decode"]["fast"]
        masks = decode_batched(m["vae"], latents)
        adapt, _ = bench.measure(lambda: [a.forward_all(masks) for a in (prompter.dit2vision, prompter.dit2language)
                                          if a is not None], b)
    sampling_s = ddim["seconds_per_call"] * cfg.ddim_steps / steps + enc["seconds_per_call"]
    if steps != cfg.ddim_steps:
        bench.composite("ddim_prompts_per_image", {
            "condition_encoder": enc["seconds_per_call"],
            f"ddim_{cfg.ddim_steps}_steps": ddim["seconds_per_call"] * cfg.ddim_steps / steps,
            "vae_decode": dec["seconds_per_call"], "adapters": adapt["seconds_per_call"]}, b, [enc, ddim, dec, adapt],
            f"DiT steps timed over {steps} of {cfg.ddim_steps}, scaled")
    return sampling_s, latents


def bench_glip(bench: Bench, preset: Preset, m: dict, batch: dict):
    glip, b = m["glip"], bench.batch
    caps, spans = batch["caption"], batch["spans"]
    with torch.no_grad():
        bench.stage("glip_forward", lambda: glip(batch["image"], caps, spans=spans), b,
                    text_tokens=preset.glip.max_query_len)
        short = LongestPaddingGLIP.of(glip)
        bench.compare("text_pad_to_longest_glip_forward", lambda: short(batch["image"], caps, spans=spans),
                      lambda: glip(batch["image"], caps, spans=spans), b,
                      f"BERT over the batch's longest caption instead of {preset.glip.max_query_len} tokens; the "
                      "difference is that of the detections' scores (same boxes kept)", _detections_diff)
        ids, mask = tokenize(glip.tokenizer, caps, preset.glip.max_query_len, device=bench.device)
        T = int(mask.sum(1).max())
        bert = glip.language_backbone.body
        entry = bench.results["fast_paths"]["text_pad_to_longest_glip_forward"]
        entry["bert_real_token_max_abs_diff"] = max_diff(bert(ids[:, :T], mask[:, :T]), bert(ids, mask)[:, :T])
        entry["text_tokens"] = {"longest": T, "padded": ids.shape[1]}
        attn = bert.model.config._attn_implementation

        def run_bert(impl):
            bert.model.set_attn_implementation(impl)
            return bert(ids, mask)
        bench.compare("sdpa_bert_256_tokens", lambda: run_bert("sdpa"), lambda: run_bert("eager"), b,
                      f"transformers attn_implementation 'sdpa' vs 'eager', {ids.shape[1]} tokens", max_diff)
        bert.model.set_attn_implementation(attn)
        swin = glip.backbone.body
        explicit = with_explicit_attention(swin)
        x = glip_normalize(batch["image"])
        vp = [torch.randn(b, preset.prompt.length, preset.glip.embed_dim, device=bench.device)
              for _ in range(preset.prompt.depth)]
        bench.compare("sdpa_swin_window_attention_prompts", lambda: swin(x, vp)[-1], lambda: explicit(x, vp)[-1], b,
                      f"Swin backbone with {preset.prompt.length} prompt tokens in the windows of the first "
                      f"{preset.prompt.depth} blocks: SDPA with the bias as attn_mask vs explicit softmax", max_diff)


class LongestPaddingGLIP(GLIP):
    """GLIP whose BERT runs over the batch's longest caption, not max_query_len tokens; token maps cut to match."""

    @classmethod
    def of(cls, glip: GLIP) -> "LongestPaddingGLIP":
        new = copy.copy(glip)       # the same modules and weights, only the text padding differs
        new.__class__ = cls
        return new

    def encode_text(self, captions, textual_prompts=None, device=None):
        ids, mask = tokenize(self.tokenizer, captions, self.cfg.max_query_len, pad_to_longest=True, device=device)
        self._width = ids.shape[1]
        hidden = self.language_backbone.body(ids, mask, textual_prompts)
        return hidden * mask[..., None].to(hidden.dtype), mask     # (B, T_longest, H)

    def token_map(self, caption, spans):
        return super().token_map(caption, spans)[: self._width]


def _detections_diff(a: list[dict], b: list[dict]) -> float:
    """Largest difference between the ranked scores of two detection lists (over the boxes both kept)."""
    n = [min(len(x["scores"]), len(y["scores"])) for x, y in zip(a, b)]
    return max((max_diff(x["scores"][:k], y["scores"][:k]) for x, y, k in zip(a, b, n) if k), default=0.0)


def bench_stage3(bench: Bench, preset: Preset, m: dict, batch: dict, prompter, latents, sampling_s: float):
    """Stage-3 step and evaluation per image; on CPU with the kept latents given and the DDIM time added."""
    glip, b, cfg, device = m["glip"], bench.batch, preset.prompt, bench.device
    full = bench.ddim_steps == cfg.ddim_steps
    params = [p for p in prompter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = grounding_targets(batch)

    def prompts_from(lat):
        with torch.no_grad():
            masks = decode_batched(m["vae"], lat)                   # (D, B, 1, M, M)
        return [a.forward_all(masks) if a is not None else None for a in (prompter.dit2vision, prompter.dit2language)]

    def step(cached: bool):
        glip.train(), prompter.train()
        with autocast(device, cfg.amp):
            if cached:
                visual, textual = prompts_from(latents)
                loss = sum(glip(batch["image"], batch["caption"], targets=targets, visual_prompts=visual,
                                textual_prompts=textual).values())
            else:
                loss = prompt_loss(glip, prompter, batch, device)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return loss

    @torch.no_grad()
    def evaluate(cached: bool):
        glip.eval(), prompter.eval()
        with autocast(device, cfg.amp):
            visual, textual = prompts_from(latents) if cached else prompter(batch["image"], batch["caption"],
                                                                              list(range(b)))
            return glip(batch["image"], batch["caption"], visual_prompts=visual, textual_prompts=textual,
                        spans=batch["spans"])

    for name, fn in (("stage3_train_step", step), ("eval_per_image", evaluate)):
        if full:
            bench.stage(name, lambda: fn(False), b)
        if not full or name == "stage3_train_step":
            rest = bench.measure(lambda: fn(True), b)[0]
            if name == "stage3_train_step":
                cached_s = rest["seconds_per_call"]
        if not full:  # the measured rest of the step plus the DDIM sampling of the batch (generation stage)
            bench.composite(name, {"ddim_sampling": sampling_s, "rest": rest["seconds_per_call"]}, b, [rest],
                            "DDIM sampling time added")
    step_s = bench.results["stages"]["stage3_train_step"]["seconds_per_call"]
    bench.results["options"]["stage3 cached DDIM latents"] = {
        "what": "run the frozen condition encoder + DiT + DDIM once per training item with its fixed seed and store "
                "the kept latents (depth x 4 x h x w per item); each step then only decodes, adapts and runs GLIP. "
                "Changes the method: the authors draw fresh DDIM noise at every forward pass; cached latents give "
                "every epoch the same prompts per item. Evaluation already uses fixed per-item seeds, so caching "
                "there changes nothing.",
        "step_s": step_s, "step_cached_s": cached_s, "speedup": round(step_s / cached_s, 3),
        "kb_per_item": round(cfg.depth * math.prod(prompter.latent_shape()) * 4 / 1024, 1)}
    print(f"  {'stage3 cached DDIM latents (option)':34s} speed-up x{step_s / cached_s:.2f}", flush=True)
    with torch.no_grad():
        masks = decode_batched(m["vae"], latents)
    adapter = prompter.dit2vision or prompter.dit2language
    adapter_cl = copy.deepcopy(adapter).to(memory_format=torch.channels_last)
    masks_cl = masks.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, masks.shape[:2])

    def adapt(a, x):
        out = a.forward_all(x)
        sum(o.float().sum() for o in out).backward()
        return out[0].detach()
    bench.compare("channels_last_adapter_fwd_bwd", lambda: adapt(adapter_cl, masks_cl), lambda: adapt(adapter, masks),
                  b, "Adapter conv stack (forward + backward) on the decoded masks, NHWC vs NCHW", max_diff)


# ----------------------------------------------------------------------------------------------------------------
# Input pipeline


class ImageMaskFiles(Dataset):
    """Items that cost what RefExpDataset's do: decode a 640x480 JPEG, resize, rasterise a polygon mask."""

    def __init__(self, folder: Path, n: int, image_size: int, mask_size: int):
        rng = np.random.default_rng(0)
        self.paths, self.image_size, self.mask_size = [], image_size, mask_size
        for i in range(n):
            small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
            self.paths.append(folder / f"{i:04d}.jpg")
            im.save(self.paths[-1], quality=90)
        self.polygon = [[100.0, 80.0, 400.0, 90.0, 420.0, 380.0, 150.0, 400.0, 90.0, 250.0]]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"image": load_image(self.paths[i], self.image_size),
                "mask": rasterize_mask(self.polygon, 640, 480, self.mask_size)}


def bench_loader(bench: Bench, preset: Preset, data, tmp: Path):
    n, bs = 32, 8
    if data is not None and (Path(data) / "train.json").exists():
        full = RefExpDataset(data, "train", preset.data.image_size, mask_size=preset.data.mask_size)
        dataset, source = torch.utils.data.Subset(full, range(min(n, len(full)))), str(data)
    else:
        dataset, source = ImageMaskFiles(tmp, n, preset.data.image_size, preset.data.mask_size), "generated JPEGs"
    workers = max(1, min(4, (os.cpu_count() or 2)))
    pin = bench.device.type == "cuda"

    def epoch(loader):
        for batch in loader:
            batch["image"].to(bench.device, non_blocking=True), batch["mask"].to(bench.device, non_blocking=True)
        bench.sync()
    fast = DataLoader(dataset, bs, collate_fn=collate, num_workers=workers, pin_memory=pin, persistent_workers=True)
    slow = DataLoader(dataset, bs, collate_fn=collate, num_workers=0)
    entry = bench.compare("dataloader_workers", lambda: epoch(fast), lambda: epoch(slow), len(dataset),
                          f"{workers} worker processes{' + pinned memory' if pin else ''} (persistent, first epoch is "
                          f"the warm-up) vs loading in the main process; {source}, {n} items of image + mask")
    entry["workers"], entry["pin_memory"] = workers, pin
    del fast


def bench_precision(bench: Bench, m: dict, batch: dict, img, txt):
    if bench.device.type != "cuda":
        for name in ("tf32_glip_forward", "bf16_autocast_glip_forward", "bf16_autocast_dit_forward"):
            bench.skip(name, "needs a CUDA GPU (on CPU everything runs in float32)")
        return
    glip, b = m["glip"], bench.batch
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = mm.allow_tf32, cudnn.allow_tf32

    def run(fn, tf32=False, bf16=False):
        mm.allow_tf32 = cudnn.allow_tf32 = tf32
        with torch.no_grad(), autocast(bench.device, bf16):
            return fn()
    g = lambda: glip(batch["image"], batch["caption"], spans=batch["spans"])  # noqa: E731
    x = torch.randn(b, 4, m["dit"].input_size, m["dit"].input_size, device=bench.device)
    t = torch.full((b,), 50, device=bench.device)
    d = lambda: m["dit"](x, t, img, txt)  # noqa: E731
    bench.compare("tf32_glip_forward", lambda: run(g, tf32=True), lambda: run(g), b, "TF32 matmuls/convs vs "
                  "strict fp32", _detections_diff)
    bench.compare("bf16_autocast_glip_forward", lambda: run(g, bf16=True), lambda: run(g), b, "bf16 autocast vs "
                  "strict fp32 (scores differ at bf16 precision, ~1e-2)", _detections_diff)
    bench.compare("bf16_autocast_dit_forward", lambda: run(d, bf16=True), lambda: run(d), b, "bf16 autocast vs "
                  "strict fp32", max_diff)
    mm.allow_tf32, cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def main(preset: Preset, data, out, resume: bool = True, batch: int | None = None, compile: bool | None = None,
         full: bool | None = None) -> dict:
    """Run every measurement, print a table and write the JSON (`out` if it ends in .json, else out/bench.json).

    `resume` is accepted for the CLI's sake: a benchmark always measures afresh. `batch`, `compile`, `full`
    default to MDP_BENCH_BATCH (2 on CPU, 16 on GPU), MDP_BENCH_COMPILE (0), MDP_BENCH_FULL (1 on GPU, 0 on CPU);
    MDP_BENCH_THREADS sets torch's CPU threads, MDP_BENCH_DDIM_STEPS the DDIM steps timed when not full.
    """
    t_start = time.perf_counter()
    if _env_int("MDP_BENCH_THREADS", 0):     # e.g. 1 on a shared machine, where spinning OpenMP threads collide
        torch.set_num_threads(_env_int("MDP_BENCH_THREADS", 0))
    device = pick_device(getattr(preset, "device", "auto"))
    cpu = device.type == "cpu"
    full = bool(_env_int("MDP_BENCH_FULL", 0 if cpu else 1)) if full is None else full
    bench = Bench(device, batch=batch or _env_int("MDP_BENCH_BATCH", 2 if cpu else 16), reps=2 if cpu else 5,
                  heavy_s=6.0 if cpu else 60.0,
                  ddim_steps=preset.prompt.ddim_steps if full else _env_int("MDP_BENCH_DDIM_STEPS", 2),
                  compile=bool(_env_int("MDP_BENCH_COMPILE", 0)) if compile is None else compile)
    out = Path(out) if out is not None else Path("runs") / preset.name
    bench.path = out if out.suffix == ".json" else out / "bench.json"
    torch.manual_seed(0)
    # random weights score below GLIP's 0.05 threshold: with 0 the decoder does a trained model's work
    preset = dataclasses.replace(preset, glip=dataclasses.replace(preset.glip, inference_th=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        m = build_models(preset, word_vocab(Path(tmp) / "vocab.txt"), device)
        batch_ = make_batch(preset, bench.batch, device)
        name = torch.cuda.get_device_name(device) if not cpu else (
            f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()})")
        r = bench.results
        r.update(complete=False, device=name, torch=torch.__version__, preset=preset.name, batch=bench.batch,
                 float32=True,
                 sizes={"image": preset.data.image_size, "mask": preset.data.mask_size,
                        "latent": [4, preset.dit.input_size, preset.dit.input_size],
                        "text_tokens": preset.glip.max_query_len, "prompt_depth": preset.prompt.depth,
                        "prompt_length": preset.prompt.length, "ddim_steps": preset.prompt.ddim_steps},
                 parameters={k: sum(p.numel() for p in v.parameters()) for k, v in m.items()
                             if isinstance(v, nn.Module)},
                 memory=("torch.cuda.max_memory_allocated during the stage (weights and optimizer state included)"
                         if not cpu else "peak resident set size of the process sampled every 2 ms during the "
                         "stage; memory_increase_mb = that peak minus the size at the stage's start"),
                 timing="median of timed calls after a warm-up call; for a stage whose first call takes more than "
                        f"{bench.heavy_s:.0f} s that call is the measurement (includes_first_call); fast paths and "
                        "their straightforward versions are both warmed up, then timed")
        print(f"bench: preset {preset.name}, batch {bench.batch}, {name}, torch {torch.__version__}", flush=True)
        bench_vae(bench, preset, m, batch_)
        img, txt = bench_dit(bench, preset, m, batch_)
        prompter = DiffPromptGenerator(m["vae"], m["dit"], m["diffusion"], m["condition"], preset.prompt,
                                       vision_dim=preset.glip.embed_dim, text_dim=preset.glip.text_hidden,
                                       mask_size=preset.data.mask_size, guidance=preset.dit.guidance).to(device)
        sampling_s, latents = bench_generation(bench, preset, m, batch_, prompter)
        bench_glip(bench, preset, m, batch_)
        bench_stage3(bench, preset, m, batch_, prompter, latents, sampling_s)
        bench_loader(bench, preset, data, Path(tmp))
        bench_precision(bench, m, batch_, img, txt)
    r.update(complete=True, total_seconds=round(time.perf_counter() - t_start, 1))
    bench.save()
    print(f"bench: {r['total_seconds']:.0f} s in all")
    print(bench.path)
    return r
