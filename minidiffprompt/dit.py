"""The mask DiT of Diff-Prompt stage 2 ("DiT-My/2"): a diffusion transformer over VAE mask latents,
conditioned on an image feature and a caption feature (the authors' `DiT-main/models.py`, `DiT.forward` and
`DiT_My_2`, in Kelvin-ywc/diff-prompt).

It is facebookresearch/DiT with the class embedder replaced by the condition
    c = concat(image_feature + t_emb, text_feature + t_emb)        # (B, 2·hidden)
that drives every adaLN-Zero modulation. Parameter names follow the authors' code, so their raw training
checkpoint (`model` / `ema` entries) and the HF export load strictly (keys: `tests/fixtures/mask_dit.tsv`):

    dit = load_dit("0094200.pt", which="model")       # what stage 3 of the authors used
    out = dit(x_t, t, image_features, text_features)  # (B, 8, 28, 28): ε̂ (4 channels) + variance values v (4)

`guided(dit, image_features, text_features, s)` binds the condition for the sampler, with classifier-free guidance
when s ≠ 1 (an option; the authors trained no null condition).

The tiny preset's `image_channels=3` (DiTConfig.image_map) is not the authors' design: the image, resized to the
latent grid, is concatenated to x_t instead, and the image half of c is zero. Nor is its `caption_tokens=16`: the
caption's word vectors join the patch tokens in the sequence, and the caption half of c is zero too.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .utils.checkpoint import CheckpointMismatch, load_strict, read_state_dict
from .utils.files import read_json
from .utils.shipped import resolve_weights


def modulate(x, shift, scale):
    """adaLN: LN(x)·(1 + scale) + shift, with one (shift, scale) per sample broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


#################################################################################
#               Embedding Layers for Timesteps and Patches                      #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds integer diffusion timesteps into vectors: 256-d sinusoid → Linear → SiLU → Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """[cos(t·f_k), sin(t·f_k)], f_k = exp(-ln(max_period)·k/(dim/2)); cos first (as DiT's `models.py`)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                                 # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (B, 2·half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of the latent → tokens (a strided conv, timm's PatchEmbed without norm)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)                                # (B, D, H/p, W/p)
        return rearrange(x, "b d h w -> b (h w) d")     # (B, N, D), row-major tokens


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention (timm layout: one `qkv` Linear, `proj` out), via scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, keep=None):
        """keep: optional (B, N) bool, the tokens that may be attended to (False: padding)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        mask = None if keep is None else keep[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)     # softmax(q kᵀ/√d) v, (B, h, N, d)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """Transformer MLP: fc1 → GELU (tanh approximation) → fc2 (timm Mlp, no dropout)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cond_size=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # the condition is 2·hidden wide (image half + text half): 1024 adaLN inputs at hidden 512
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or 2 * hidden_size, 6 * hidden_size))

    def forward(self, x, c, keep=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), keep)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) then a Linear to p·p·out_channels per token."""

    def __init__(self, hidden_size, patch_size, out_channels, cond_size=None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or 2 * hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, conditioned on (image feature, caption feature)."""

    def __init__(self, input_size=28, patch_size=2, in_channels=4, hidden_size=512, depth=12, num_heads=8,
                 mlp_ratio=4.0, learn_sigma=True, cond_dim=512, image_channels=0, caption_tokens=0):
        super().__init__()
        if cond_dim != hidden_size:
            # the features are *added* to the timestep embedding, so they must have its width (512 for CLIP B/32)
            raise ValueError(f"DiT: cond_dim ({cond_dim}) must equal hidden_size ({hidden_size}) because the "
                             "condition features are added to the timestep embedding; change one of them")
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_heads = num_heads
        # 0: the authors' global image feature. > 0 (a tiny-preset option, not the paper's): the image comes as a
        # map of that many channels on the latent grid, concatenated to x_t before the patch embedding
        self.image_channels = image_channels
        # > 0 (a tiny-preset option, not the paper's): the caption comes as up to that many word vectors, which join
        # the patch tokens in one sequence (in-context conditioning, Peebles & Xie 2023, §3.2); all-zero = padding
        self.caption_tokens = caption_tokens
        if caption_tokens:
            self.caption_embedder = nn.Linear(cond_dim, hidden_size)
            pos = get_1d_sincos_pos_embed_from_grid(hidden_size, np.arange(caption_tokens, dtype=np.float64))
            self.register_buffer("caption_pos", torch.from_numpy(pos).float(), persistent=False)   # word order

        self.x_embedder = PatchEmbed(patch_size, in_channels + image_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        num_patches = (input_size // patch_size) ** 2
        # fixed sin-cos positions, stored (a frozen Parameter is part of the state dict, as in DiT `models.py`)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier Linears, fixed sin-cos pos_embed, N(0, 0.02) timestep MLP, adaLN-Zero (DiT `initialize_weights`)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # patch embedding initialised like a Linear over the flattened (c p q) patch
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, the output starts at zero
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(B, N, p·p·C) tokens → (B, C, H, W) image; token (h, w) holds its patch as (p, q, c), as in DiT."""
        g = self.input_size // self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=self.patch_size, q=self.patch_size)

    def forward(self, x, t, image_features, text_features):
        """x: (B, C, H, W) noisy latent x_t, t: (B,) integer timesteps, features: (B, hidden) each; with
        image_channels the image feature is a (B, image_channels, H, W) map instead, with caption_tokens the text
        feature (B, L ≤ caption_tokens, hidden) word vectors."""
        if self.image_channels:                                   # spatial condition: each token sees its image patch
            image_map = image_features.to(x.dtype)
            if image_map.shape[-1] != x.shape[-1]:                # a backbone's map on its own grid
                image_map = F.interpolate(image_map, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, image_map], dim=1)
            image_features = x.new_zeros(len(x), self.pos_embed.shape[-1])   # the adaLN condition keeps the caption
        x = self.x_embedder(x) + self.pos_embed                   # (B, N, D)
        t_emb = self.t_embedder(t)                                # (B, D)
        n, keep = x.shape[1], None
        if self.caption_tokens:                                   # words join the sequence; the adaLN keeps t only
            words = text_features.to(x.dtype)                     # (B, L, D), all-zero rows are padding
            present = words.abs().sum(-1) > 0
            columns = present.any(0).nonzero()                    # the columns some row has a word in
            used = int(columns[-1]) + 1 if len(columns) else 0
            words, present = words[:, :used], present[:, :used]  # drop the columns padded in every row: same output
            keep = torch.cat([torch.ones_like(x[..., 0], dtype=torch.bool), present], dim=1)
            x = torch.cat([x, self.caption_embedder(words) + self.caption_pos[:words.shape[1]]], dim=1)
            text_features = torch.zeros_like(t_emb)
        c = torch.cat([image_features + t_emb, text_features + t_emb], dim=1).to(x.dtype)   # (B, 2D)
        for block in self.blocks:
            x = block(x, c, keep)                                 # (B, N (+L), D)
        x = self.final_layer(x[:, :n], c)                         # (B, N, p·p·out_channels)
        return self.unpatchify(x)                                 # (B, out_channels, H, W)


def guided(dit: DiT, image_features, text_features, guidance: float = 1.0):
    """The sampler's model_fn(x, t): the DiT bound to its condition. With guidance s ≠ 1, classifier-free guidance
    (Ho & Salimans 2022, eq. 6): ε̂ = ε̂(x_t, ∅) + s·(ε̂(x_t, c) - ε̂(x_t, ∅)), ∅ = zero features, the null
    condition that DiTConfig.cond_dropout trains; the variance channels stay the conditional ones. Not in the
    authors' code (their `DiT-main/models.py` has no label embedder and no condition dropout), so their DiT
    samples with s = 1."""
    if guidance == 1.0:
        return lambda x, t: dit(x, t, image_features, text_features)
    null_img, null_txt = torch.zeros_like(image_features), torch.zeros_like(text_features)

    def model_fn(x, t):
        out = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([image_features, null_img]),
                  torch.cat([text_features, null_txt]))                # one batch: conditional, then null
        cond, null = out.chunk(2)
        C = dit.in_channels
        eps = null[:, :C] + guidance * (cond[:, :C] - null[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1)
    return model_fn


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE layout (https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py): first half of the channels
# encodes the column index, second half the row index; each half is [sin(pos·ω), cos(pos·ω)].

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size², embed_dim) float64 table for a square grid, tokens in row-major order."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)      # w goes first: grid[0] = column index, grid[1] = row index
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H·W, D/2), column index
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H·W, D/2), row index
    return np.concatenate([emb_h, emb_w], axis=1)                       # (H·W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """[sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(-k/(D/2)), k = 0..D/2-1."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega                 # (D/2,)
    pos = pos.reshape(-1)                        # (M,)
    out = np.einsum("m,d->md", pos, omega)       # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)   # (M, D)


#################################################################################
#                               DiT Configs and loading                         #
#################################################################################

def DiT_My_2(**kwargs):
    """The authors' DiT-My/2: latent 4×28×28, patch 2, hidden 512, depth 12, 8 heads (77,158,944 parameters)."""
    return DiT(depth=12, hidden_size=512, patch_size=2, num_heads=8, **kwargs)


DiT_models = {"DiT-My/2": DiT_My_2}


def map_channels(cfg) -> int:
    """Channels of the image map a DiT with `image_map` reads: RGB (tiny), the tiny CLIP's feature map or the tiny
    GLIP's Swin C3 map, read from the condition encoder's config.json."""
    if not cfg.image_map:
        return 0
    if cfg.condition == "tiny_clip":
        return read_json(resolve_weights(cfg.clip_path) / "config.json")["arch"]["map_channels"]
    if cfg.condition == "glip":
        glip = read_json(resolve_weights(cfg.clip_path) / "config.json")["glip"]
        return glip["embed_dim"] * 2                                   # the Swin's C3 map
    return 3


def dit_arch(cfg) -> dict:
    """The DiT constructor arguments of a `config.DiTConfig` (paper or tiny preset)."""
    arch = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=4, hidden_size=cfg.hidden_size,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, learn_sigma=cfg.learn_sigma,
                cond_dim=cfg.cond_dim, image_channels=map_channels(cfg), caption_tokens=cfg.caption_tokens)
    return arch


def dit_from_config(cfg) -> DiT:
    return DiT(**dit_arch(cfg))


def _read_raw_training_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True; the authors' file also holds an argparse.Namespace (`args`), which is
    allow-listed for this one call (a plain data container, no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatch(
            f"{path}: could not be read with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Expected the DiT training checkpoint (a dict with 'model', 'ema', 'opt', 'args') or an HF export "
            "(model.safetensors / pytorch_model.bin). The file may be truncated: download it again.") from None


def load_dit(path, which: str = "model", **arch) -> DiT:
    """Build a DiT (DiT-My/2 unless `arch` says otherwise) and load weights strictly from a local path.

    `path`: the raw training checkpoint (`.pt` dict with `model`/`ema`/`opt`/`args`; `which` picks the
    `model` weights, which the authors' stage 3 used, or the `ema` weights, which their HF export holds), or
    the HF export (folder, `.safetensors` or `.bin`; same key names, `which` is ignored). DiT-My/2 has 131 tensors,
    77,158,944 parameters including the frozen `pos_embed`.
    """
    if which not in ("model", "ema"):
        raise ValueError(f"load_dit: which must be 'model' or 'ema', got {which!r}")
    path = Path(path)
    source = str(path)
    if path.is_dir() or path.suffix == ".safetensors":
        state_dict = read_state_dict(path)
    else:
        obj = _read_raw_training_checkpoint(path)
        if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
            state_dict, source = obj[which], f"{path} [{which}]"    # raw training checkpoint
        elif isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
            state_dict = obj                                        # plain state dict (pytorch_model.bin)
        else:
            have = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointMismatch(f"{path}: no {which!r} entry and not a plain state dict (top level: {have}); "
                                     "expected a DiT training checkpoint or an HF export")
    arch = {**dict(depth=12, hidden_size=512, patch_size=2, num_heads=8), **arch}
    model = DiT(**arch)
    return load_strict(model, state_dict, source=source)
