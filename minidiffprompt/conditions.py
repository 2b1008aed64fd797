"""Condition encoders of the DiT: an image and its caption → one image feature and one text feature, both
`dim` wide (paper preset: the unnormalised 512-d CLIP ViT-B/32 `encode_image` / `encode_text` outputs that the
authors' `DiT-main/train.py` conditions on). Frozen; features computed once per batch under no_grad.

    enc = build_condition_encoder(preset.dit)          # CLIP ViT-B/32 (paper) or the tiny encoder
    img, txt = enc.encode(images01, captions)          # (B, dim), (B, dim); tiny with image_map: (B, 3, s, s)

`images01` are RGB in [0, 1] (the dataset's tensors); captions are raw expressions, cleaned here with the
authors' `pre_caption` (text.clean_caption).
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .data.datasets import glip_normalize
from .data.text import clean_caption, load_tokenizer
from .glip.model import load_glip_checkpoint
from .utils.checkpoint import load_strict, read_state_dict
from .utils.files import read_json
from .utils.shipped import resolve_weights


class ConditionEncoder(nn.Module):
    """Interface: `dim` and `encode(images01, captions) -> (image_features, text_features)`, frozen."""

    dim: int

    @torch.no_grad()
    def encode(self, images01: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True):
        return super().train(False)      # frozen: always in eval mode


# ----------------------------------------------------------------------------------------------------------------
# Paper: OpenAI CLIP ViT-B/32 through transformers


class CLIPConditionEncoder(ConditionEncoder):
    """CLIP ViT-B/32's unnormalised 512-d projected image and text embeddings (`encode_image` / `encode_text`)."""

    def __init__(self, path: str = "openai/clip-vit-base-patch32", dtype: torch.dtype = torch.float32,
                 image_size: int = 224, context_length: int = 77):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer   # late: heavy, and only the paper preset's CLIP needs it
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise FileNotFoundError(
                f"CLIP model {path!r} not found locally (nothing is downloaded at run time). Put a transformers "
                f"CLIP folder there, or fetch it once into the HF cache with `huggingface-cli download {path}`, "
                f"or use the tiny preset (--condition tiny). ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        self.model.requires_grad_(False).eval()
        self.dim = self.model.config.projection_dim
        self.image_size, self.context_length = image_size, context_length

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5.x returns BaseModelOutputWithPooling (projected vector in .pooler_output); 4.x a tensor
        return out if torch.is_tensor(out) else out.pooler_output

    @torch.no_grad()
    def encode(self, images01, captions):
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        # what the authors' DiT saw: bilinear resize to 224² ignoring aspect, then (x - 0.5)/0.5 → [-1, 1];
        # (`DiT-main/utils/data/transforms/transforms.py`; CLIP's `preprocess` is commented out in `train.py`);
        # deliberately not CLIPImageProcessor (its shortest-side resize, centre crop and CLIP mean/std differ)
        x = images01.to(device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixel_values = (x * 2 - 1).to(dtype)
        img = self._pooled(self.model.get_image_features(pixel_values=pixel_values))   # (B, 512)
        tokens = self.tokenizer([clean_caption(c) for c in captions], padding="max_length", truncation=True,
                                max_length=self.context_length, return_tensors="pt")   # clip.tokenize: 77 tokens
        txt = self._pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                        attention_mask=tokens["attention_mask"].to(device)))
        return img.float(), txt.float()


# ----------------------------------------------------------------------------------------------------------------
# Tiny: a frozen, seeded, download-free stand-in


class TinyConditionEncoder(ConditionEncoder):
    """Deterministic frozen features: a colour-opponent grid of the image, hashed position-aware caption words.

    Image: two colour-opponent channels, red−green and blue−yellow (R − G, B − (R + G)/2, as in the retina's
    opponent cells), average-pooled to grid×grid cells. They cancel grey, so a muted background maps near 0 and a
    coloured object stands out in its cells, with its hue. A fixed random orthonormal map takes the 2·grid² values
    to `dim` (lossless whenever 2·grid² ≤ dim). Text: each word is hashed (crc32) into
    one of `buckets` random unit vectors; the feature is Σ_i γ^i·e(w_i) (order-weighted bag: the head phrase
    comes first in a referring expression) plus Σ_i e(w_i) ⊙ s_i with a random ±1 sign vector s_i per position
    (which word stands where), divided by √n. Everything comes from `seed`, so the same words always give the
    same feature and nothing needs a vocabulary or a download.

    With `map_size` > 0 the image feature is instead the image itself, area-resized to map_size² and centred
    ((x − 0.5)·4, RGB): a (B, 3, map_size, map_size) map for a DiT with `image_map` (dit.py), which lets every
    latent patch see what lies under it. With `tokens` the caption feature is instead the sequence of its word
    vectors e(w_i), in order, zero rows padding it to max_words: (B, max_words, dim), for a DiT with
    `caption_tokens` that reads them as tokens of its sequence.
    """

    def __init__(self, dim: int = 128, grid: int = 8, buckets: int = 4096, max_words: int = 16,
                 decay: float = 0.7, seed: int = 0, scale: float = 5.0, map_size: int = 0, tokens: bool = False):
        super().__init__()
        self.scale, self.map_size, self.tokens = scale, map_size, tokens
        g = torch.Generator().manual_seed(seed)
        self.dim, self.grid, self.buckets, self.max_words, self.decay = dim, grid, buckets, max_words, decay
        n_in = 2 * grid * grid
        q, _ = torch.linalg.qr(torch.randn(max(n_in, dim), max(n_in, dim), generator=g, dtype=torch.float64))
        self.register_buffer("image_proj", q[:n_in, :dim].float().contiguous(), persistent=False)    # (2g², dim)
        words = torch.randn(buckets, dim, generator=g)
        self.register_buffer("word_vectors", F.normalize(words, dim=1), persistent=False)           # (V, dim)
        signs = torch.randint(0, 2, (max_words, dim), generator=g).float() * 2 - 1
        self.register_buffer("position_signs", signs, persistent=False)                             # (P, dim)

    def word_ids(self, caption: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", clean_caption(caption))[: self.max_words]
        return [zlib.crc32(w.encode()) % self.buckets for w in words]

    @torch.no_grad()
    def encode(self, images01, captions):
        device = self.image_proj.device
        images01 = images01.to(device, torch.float32)
        if self.map_size:
            img = (F.adaptive_avg_pool2d(images01, self.map_size) - 0.5) * 4     # (B, 3, s, s)
        else:
            r, g, b = images01.unbind(1)
            opponent = torch.stack([r - g, b - (r + g) / 2], dim=1) * 2          # (B, 2, H, W), grey → 0
            cells = F.adaptive_avg_pool2d(opponent, self.grid)                   # (B, 2, g, g)
            img = rearrange(cells, "b c h w -> b (c h w)") @ self.image_proj * self.scale   # (B, dim)
        if self.tokens:       # one vector per word, in order; zero rows pad to max_words (the DiT reads the order)
            txt = torch.zeros(len(captions), self.max_words, self.dim, device=device)
            for b, caption in enumerate(captions):
                ids = self.word_ids(caption)
                txt[b, :len(ids)] = self.word_vectors[torch.tensor(ids, device=device, dtype=torch.long)]
            return img, txt
        txt = torch.zeros(len(captions), self.dim, device=device)
        for b, caption in enumerate(captions):
            ids = self.word_ids(caption)
            if not ids:
                continue
            e = self.word_vectors[torch.tensor(ids, device=device)]              # (n, dim)
            n = len(ids)
            weights = self.decay ** torch.arange(n, device=device, dtype=torch.float32)
            txt[b] = (weights[:, None] * e).sum(0) + (e * self.position_signs[:n]).sum(0) / n ** 0.5
        # vectors CLIP-sized (`scale`; its unnormalised embeddings have norms near 10): the DiT adds them to the
        # timestep embedding (norm ~10), which would otherwise drown a condition of norm ~2
        return img, txt * self.scale


# ----------------------------------------------------------------------------------------------------------------
# Tiny, learned: the CLIP-like towers (trained contrastively by pretrain/train_clip.py)


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
    folder = Path(folder)
    cfg = TinyCLIPConfig(**read_json(folder / "config.json")["arch"])
    model = TinyCLIP(cfg)
    load_strict(model, read_state_dict(folder / "model.safetensors"), source=str(folder / "model.safetensors"))
    return model.eval().requires_grad_(False), load_tokenizer(folder / "vocab.txt")


class LearnedConditionEncoder(ConditionEncoder):
    """The tiny CLIP (`TinyCLIP`, trained contrastively like CLIP): its projected caption embedding, L2-normalised
    and scaled to norm `scale` (CLIP-sized, like the other encoders), and its image embedding, or with `image_map`
    its (B, map_channels, s, s) feature map, layer-normalised per image."""

    def __init__(self, folder, image_map: bool = False, scale: float = 10.0):
        super().__init__()
        self.model, self.tokenizer = load_tiny_clip(resolve_weights(folder))
        self.dim, self.image_map, self.scale = self.model.cfg.dim, image_map, scale

    @torch.no_grad()
    def encode(self, images01, captions):
        device = self.model.logit_scale.device
        img, fmap = self.model.encode_image(images01.to(device, torch.float32))
        ids, mask = tokenize(self.tokenizer, captions, self.model.cfg.max_len)
        txt = F.normalize(self.model.encode_text(ids.to(device), mask.to(device)), dim=-1) * self.scale
        if self.image_map:
            return F.layer_norm(fmap, fmap.shape[1:]), txt
        return F.normalize(img, dim=-1) * self.scale, txt


class BackboneConditionEncoder(TinyConditionEncoder):
    """A frozen detector backbone as the image encoder: the C3 map of a trained tiny GLIP's Swin (its second stage,
    (B, 64, 12, 12) at 96 px), layer-normalised per position, as the image map; the caption as the hand-built
    encoder's word tokens. The tiny stand-in for CLIP's pretrained image tower: a network that already tells a small
    red star from a small red square, which a DiT learning its own stem from the denoising loss did not."""

    def __init__(self, folder, dim: int = 64, max_words: int = 16, stage: int = 1):
        super().__init__(dim=dim, max_words=max_words, tokens=True)
        self.swin = load_glip_checkpoint(resolve_weights(folder)).backbone.body.requires_grad_(False).eval()
        self.stage = stage
        self.map_channels = self.swin.num_features[stage]

    @torch.no_grad()
    def encode(self, images01, captions):
        images01 = images01.to(self.image_proj.device, torch.float32)
        fmap = self.swin(glip_normalize(images01), stages=self.stage + 1)[-1]     # (B, C, h, w)
        _, txt = super().encode(images01, captions)
        return F.layer_norm(fmap.transpose(1, -1), (fmap.shape[1],)).transpose(1, -1), txt


def build_condition_encoder(cfg) -> ConditionEncoder:
    """The encoder named by a `config.DiTConfig` (`condition`: "clip", "tiny" or "tiny_clip"); its `dim` must be
    cond_dim."""
    if cfg.condition == "clip":
        if cfg.image_map:
            raise ValueError("image_map needs a tiny condition encoder (CLIP gives one global image feature)")
        enc = CLIPConditionEncoder(cfg.clip_path)
    elif cfg.condition == "tiny":
        enc = TinyConditionEncoder(dim=cfg.cond_dim, seed=0,
                                   map_size=cfg.input_size if cfg.image_map else 0,
                                   max_words=cfg.caption_tokens or 16, tokens=cfg.caption_tokens > 0)
    elif cfg.condition == "glip":
        enc = BackboneConditionEncoder(cfg.clip_path, dim=cfg.cond_dim, max_words=cfg.caption_tokens or 16)
    elif cfg.condition == "tiny_clip":
        if cfg.caption_tokens:
            raise ValueError("caption_tokens needs the hand-built encoder (--condition tiny); the tiny CLIP gives one "
                             "caption vector: add --caption_tokens 0 --hidden_size 128 --cond_dim 128")
        enc = LearnedConditionEncoder(cfg.clip_path, image_map=cfg.image_map)
    else:
        raise ValueError(f"unknown condition encoder {cfg.condition!r}: use 'clip', 'tiny', 'tiny_clip' or 'glip'")
    if enc.dim != cfg.cond_dim:
        raise ValueError(f"condition encoder {cfg.condition!r} gives {enc.dim}-d features but cond_dim is "
                         f"{cfg.cond_dim}; set --cond_dim {enc.dim} (and --hidden_size {enc.dim})")
    return enc.eval()
