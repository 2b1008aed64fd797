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
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checkpoint import finished_run, fingerprint, write_run
from ..config import Preset
from ..utils.runtime import command_line, progress, seed_everything
from ..data.text import clean_caption, load_tokenizer


@dataclasses.dataclass
class TinyCLIPConfig:
    vocab_size: int = 125
    dim: int = 128            # joint embedding width (a DiT reading it needs cond_dim = hidden_size = dim)
    map_size: int = 16        # the DiT's latent grid
    map_channels: int = 8
    width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_len: int = 32


class TinyCLIP(nn.Module):
    def __init__(self, cfg: TinyCLIPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.image = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, 2, 1), nn.GELU(), nn.Conv2d(w // 2, w, 3, 2, 1), nn.GELU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU())
        self.to_map = nn.Conv2d(w, cfg.map_channels, 1)
        self.image_proj = nn.Linear(2 * w, cfg.dim)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positions = nn.Parameter(torch.randn(cfg.max_len, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.text_heads, 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(w, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global embedding (B, dim), map (B, map_channels, s, s)) of RGB images in [0, 1]."""
        s = self.cfg.map_size
        x = F.interpolate(images01, size=(4 * s, 4 * s), mode="bilinear", align_corners=False, antialias=True)
        h = self.image(x * 2 - 1)                                               # (B, w, s, s)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.image_proj(pooled), self.to_map(h)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, dim) from token ids and attention mask (B, T)."""
        h = self.token_embedding(ids) + self.positions[: ids.shape[1]]
        h = self.text(h, src_key_padding_mask=~mask.bool())
        m = mask[..., None].to(h.dtype)
        return self.text_proj((h * m).sum(1) / m.sum(1).clamp(min=1))

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric InfoNCE: the i-th image and i-th text are the positive pair."""
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * self.logit_scale.exp().clamp(max=100)
        labels = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def tokenize(tok, captions: list[str], max_len: int):
    enc = tok([clean_caption(c) for c in captions], padding="longest", truncation=True, max_length=max_len,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def load_tiny_clip(folder: Path) -> tuple[TinyCLIP, object]:
    """(model, tokenizer) of a `train-clip` folder, loaded strictly, in eval mode."""
    from ..utils.checkpoint import load_strict, read_state_dict
    folder = Path(folder)
    cfg = TinyCLIPConfig(**json.loads((folder / "config.json").read_text())["arch"])
    model = TinyCLIP(cfg)
    load_strict(model, read_state_dict(folder / "model.safetensors"), source=str(folder / "model.safetensors"))
    return model.eval().requires_grad_(False), load_tokenizer(folder / "vocab.txt")


def _pairs(data: Path, split: str, image_size: int):
    """(images (N, 3, S, S) of the split's distinct images, per image its expressions)."""
    from ..data.datasets import load_image, load_records
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
