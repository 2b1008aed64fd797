"""A CLIP-like condition encoder for the tiny DiT, trained contrastively on synthetic (image, expression) pairs.

    python -m minidiffprompt train-clip --preset tiny                  # → runs/tiny/clip/

The paper's DiT reads its condition from CLIP ViT-B/32 (Radford et al. 2021), trained contrastively on image–text
pairs. The tiny stand-in is trained the same way (CLIP §2.3: symmetric cross-entropy over the batch's image–text
similarities, learned temperature) on the train split: each batch holds distinct images, each with one of its
expressions. Two towers:
  image  three 3×3 convolutions (strides 2, 2, 1) on the image resized to 4·map_size, giving a map_size² grid of
         features; a 1×1 convolution makes the `map_channels`-channel map the DiT reads (`image_map`), and the
         mean and max of the grid, projected, the global embedding the contrastive loss sees;
  text   WordPiece tokens (the data's vocab.txt), learned positions, two Transformer layers, mean over real tokens,
         projected.
The held-out score is val retrieval: how often an expression's own image ranks first among 64 val images.
Output: RUN/clip/{model.safetensors, config.json, vocab.txt, metrics.json}.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils.checkpoint import finished_run, fingerprint, write_run
from ..config import Preset
from ..utils.runtime import command_line, progress, seed_everything
from ..conditions import TinyCLIP, TinyCLIPConfig, tokenize
from ..data.datasets import load_image, load_records
from ..data.text import load_tokenizer


def _pairs(data: Path, split: str, image_size: int):
    """(images (N, 3, S, S) of the split's distinct images, per image its expressions)."""
    by_image: dict[str, list[str]] = {}
    for r in load_records(data, split):
        by_image.setdefault(r["image"], []).extend(s["sent"] for s in r["sentences"])
    paths = sorted(by_image)
    images = torch.stack([load_image(p, image_size) for p in progress(paths, desc=f"load {split}", leave=False)])
    return images, [by_image[p] for p in paths]


@torch.no_grad()
def retrieval_accuracy(model, tok, images, texts, group: int = 64, seed: int = 0) -> float:
    """% of expressions whose own image scores highest among `group` images (fixed groups, one draw each)."""
    model.eval()
    rng = random.Random(seed)
    hits = total = 0
    for k in range(0, len(images) - group + 1, group):
        img, _ = model.encode_image(images[k:k + group])
        captions = [rng.choice(texts[k + i]) for i in range(group)]
        txt = model.encode_text(*tokenize(tok, captions, model.cfg.max_len))
        sim = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
        hits += int((sim.argmax(1) == torch.arange(group)).sum())
        total += group
    model.train()
    return 100.0 * hits / max(total, 1)


def main(preset: Preset, data: Path, out: Path, resume: bool = True) -> dict:
    cfg, data, folder = preset.clip, Path(data), Path(out) / "clip"
    vocab = data / "vocab.txt"
    tok = load_tokenizer(vocab)
    arch = TinyCLIPConfig(vocab_size=len(tok), map_size=preset.dit.input_size)
    config = {"clip": dataclasses.asdict(cfg), "arch": dataclasses.asdict(arch), "data": fingerprint(data)}
    if resume and (done := finished_run(folder, config)) is not None:
        return done
    t_start = time.time()
    seed_everything(cfg.seed)
    S = preset.data.image_size
    images, texts = _pairs(data, "train", S)
    val_images, val_texts = _pairs(data, "val", S)
    model = TinyCLIP(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    rng = random.Random(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    history, bar = [], progress(range(cfg.steps), desc="tiny clip", leave=False)
    for step in bar:
        idx = torch.randperm(len(images), generator=g)[: cfg.batch_size].tolist()   # distinct images
        img, _ = model.encode_image(images[idx])
        txt = model.encode_text(*tokenize(tok, [rng.choice(texts[i]) for i in idx], arch.max_len))
        loss = model.loss(img, txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            history.append({"step": step + 1, "loss": loss.item(),
                            "val_retrieval": retrieval_accuracy(model, tok, val_images, val_texts)})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{history[-1]['val_retrieval']:.1f}")
    val = retrieval_accuracy(model, tok, val_images, val_texts)
    metrics = {"val_retrieval_top1_of_64": val, "steps": cfg.steps, "train_time_s": round(time.time() - t_start, 1),
               "command": command_line(), "history": history}
    print(f"clip: val retrieval (expression → its image among 64) {val:.1f} %, {metrics['train_time_s']:.0f} s")
    write_run(folder, model.state_dict(), config, metrics, vocab)
    return metrics
