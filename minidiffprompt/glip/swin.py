"""Swin Transformer (v1) backbone of GLIP-T(A), with Diff-Prompt's visual prompt slots.

Follows the detection Swin of GLIP (microsoft/GLIP `maskrcnn_benchmark/modeling/backbone/swint.py`; Swin paper,
Liu et al. 2021, §3) and the prompt slots of the authors' copy of that file (Kelvin-ywc/diff-prompt
`GLIP/maskrcnn_benchmark/modeling/backbone/swint.py`, `SwinTransformerBlock.forward`, `WindowAttention.forward`),
without that copy's two prompt bugs (see `SwinBlock.forward` and `WindowAttention.attention_bias`).

    swin = SwinTransformer()                      # Swin-T: 96, (2,2,6,2), (3,6,12,24), window 7
    c2, c3, c4, c5 = swin(images)                 # (B,96,56,56) (B,192,28,28) (B,384,14,14) (B,768,7,7) at 224
    feats = swin(images, visual_prompts=[p0, ..., p8])   # p_g: (B, P, 96) joins every window of block g

Parameter and buffer names follow the detection Swin of maskrcnn-benchmark, so `backbone.body.*` of the
official GLIP checkpoint loads strictly (key manifest: `tests/fixtures/glip_a_tiny_o365.tsv`).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..dit import get_1d_sincos_pos_embed_from_grid

# ----------------------------------------------------------------------------------------------------------------
# Windows: partition, merge, shift mask


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B*nW, ws*ws, C); windows batch-major, then row, then column (GLIP's order)."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=ws, ww=ws)


def window_merge(windows: torch.Tensor, ws: int, Hp: int, Wp: int) -> torch.Tensor:
    """(B*nW, ws*ws, C) -> (B, Hp, Wp, C), the inverse of `window_partition`."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=Hp // ws, nw=Wp // ws, wh=ws)


def shift_window_mask(Hp: int, Wp: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """Additive mask (nW, N, N) of a shifted block: 0 within a region, -100 across (GLIP's `BasicLayer.forward`)."""
    labels = torch.zeros(Hp, Wp, device=device)
    cuts = lambda n: ((0, n - ws), (n - ws, n - shift), (n - shift, n))  # noqa: E731
    region = 0
    for r0, r1 in cuts(Hp):
        for c0, c1 in cuts(Wp):
            labels[r0:r1, c0:c1] = region
            region += 1
    windows = window_partition(labels[None, :, :, None], ws)[..., 0]  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]            # (nW, N, N)
    return torch.zeros_like(different, dtype=torch.float).masked_fill(different, -100.0)


def block_grids(image_size: int, patch_size: int, depths, window_size: int) -> list[tuple[int, int, int]]:
    """(H, W, shift) of every block in order: the token grid it attends over and its window shift."""
    side, grids = -(-image_size // patch_size), []
    for depth in depths:
        grids += [(side, side, 0 if j % 2 == 0 else window_size // 2) for j in range(depth)]
        side = (side + 1) // 2
    return grids


def window_crops(masks: torch.Tensor, H: int, W: int, ws: int, shift: int, size: int) -> torch.Tensor:
    """masks (N, 1, M, M) over the whole image → (N, nW, 1, size, size): the part of each mask under each window of
    a block on an H×W token grid, in the block's window order (the grid padded to whole windows and rolled by
    −shift, as `SwinBlock.forward` does with its tokens), resized to `size` (a multiple of ws)."""
    k = size // ws                                                    # crop pixels per token
    x = F.interpolate(masks, size=(H * k, W * k), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, (-W) % ws * k, 0, (-H) % ws * k))
    if shift:
        x = torch.roll(x, shifts=(-shift * k, -shift * k), dims=(2, 3))
    return rearrange(x, "n c (nh h) (nw w) -> n (nh nw) c h w", h=ws * k, w=ws * k)


def relative_position_index(ws: int) -> torch.Tensor:
    """(N, N) int64: table row of token pair p=(r1,c1), q=(r2,c2) is (r1-r2+ws-1)(2ws-1) + (c1-c2+ws-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)                                             # (2, N, N)
    return rel[0] * (2 * ws - 1) + rel[1]


# ----------------------------------------------------------------------------------------------------------------
# Layers


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class DropPath(nn.Module):
    """Stochastic depth as a module (identity in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv to embed_dim, then LayerNorm on the tokens (GLIP's `PatchEmbed`)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        H, W = x.shape[-2:]
        ps = self.patch_size
        x = F.pad(x, (0, (-W) % ps, 0, (-H) % ps))  # zero pad right/bottom to a multiple of the patch
        x = self.proj(x)                            # (B, C, H/ps, W/ps)
        H, W = x.shape[-2:]
        return self.norm(rearrange(x, "b c h w -> b (h w) c")), H, W


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in the order (even,even), (odd,even), (even,odd), (odd,odd) -> LN -> 4C->2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H: int, W: int):
        return self.reduction(self.norm(merge_2x2(x, H, W)))


def merge_2x2(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 4C), zero-padding odd sides, channels [x0, x1, x2, x3] (as GLIP)."""
    x = rearrange(x, "b (h w) c -> b h w c", h=H, w=W)
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    # channel block (q, p) holds x[:, p::2, q::2]: x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2], x3=[1::2,1::2]
    # (timm/mmdet unfold in another order and would need the reduction weight permuted)
    return rearrange(x, "b (h p) (w q) c -> b (h w) (q p c)", p=2, q=2)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with relative position bias and optional prompt tokens."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))  # persistent
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def attention_bias(self, num_prompts: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Additive term (nW or 1, heads, N+P, N+P): relative bias (+ shift mask), zeros on the prompt rows/cols."""
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = rearrange(bias, "(n m) h -> h n m", n=N)[None]  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)        # (nW, heads, N, N)
        # the prompts sit AFTER the N window tokens, so their zero rows/cols go at the end. The authors' copy inserts
        # them at the front: window token i >= P then gets the bias and mask of token i-P, tokens 0..P-1 get none,
        # and the prompts get those of the last P window tokens (shifted-window masking is broken where prompted).
        return F.pad(bias, (0, num_prompts, 0, num_prompts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None):
        """x (B*nW, N, C) windows, mask (nW, N, N) or None, prompts (B*nW, P, C) paired with the windows."""
        N = x.shape[1]
        P = 0 if prompts is None else prompts.shape[1]
        if P:
            x = torch.cat([x, prompts.to(x.dtype)], dim=1)  # (B*nW, N+P, C): prompts attend and are attended
        bias = self.attention_bias(P, mask)                 # (nW or 1, heads, N+P, N+P)
        nW = bias.shape[0]
        q, k, v = rearrange(self.qkv(x), "(b w) n (three h d) -> three b (w h) n d", three=3, w=nW,
                            h=self.num_heads)               # each (B, nW*heads, N+P, d)
        bias = rearrange(bias, "w h n m -> (w h) n m").to(q.dtype)  # broadcast over the batch
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = rearrange(out, "b (w h) n d -> (b w) n (h d)", w=nW)
        return self.proj(out[:, :N])                        # prompt outputs are dropped; each block gets fresh ones


class SwinBlock(nn.Module):
    """x + DropPath(W-MSA/SW-MSA(LN(x))), then x + DropPath(MLP(LN(x))) (GLIP's `SwinTransformerBlock`)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H*W, C); prompts (B, P, C) of each image, (B, nW, P, C) of each window, or None."""
        B, _, C = x.shape
        ws, s = self.window_size, self.shift
        y = rearrange(self.norm1(x), "b (h w) c -> b h w c", h=H, w=W)
        y = F.pad(y, (0, 0, 0, (-W) % ws, 0, (-H) % ws))  # pad AFTER norm1, as GLIP does
        Hp, Wp = y.shape[1:3]
        mask = None
        if s > 0:  # kept even when the map is a single window, as in GLIP (the classification Swin drops it)
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            mask = shift_window_mask(Hp, Wp, ws, s, device=x.device)
        windows = window_partition(y, ws)  # (B*nW, N, C)
        if prompts is not None and prompts.ndim == 3:
            # windows are batch-major, so window k belongs to image k // nW. The authors' copy tiles the prompts with
            # repeat(nW, 1, 1), which gives window k the prompt of image k mod B: right only for a batch of one.
            prompts = repeat(prompts, "b p c -> (b w) p c", w=windows.shape[0] // B)
        elif prompts is not None:       # one set per window (PromptConfig.prompt_layout "windows"), in window order
            if prompts.shape[1] != windows.shape[0] // B:
                raise ValueError(f"per-window prompts for {prompts.shape[1]} windows, but the block has "
                                 f"{windows.shape[0] // B}")
            prompts = rearrange(prompts, "b w p c -> (b w) p c")
        y = window_merge(self.attn(windows, mask, prompts), ws, Hp, Wp)  # (B, Hp, Wp, C)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = rearrange(y[:, :H, :W], "b h w c -> b (h w) c")
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """`depth` blocks alternating shift 0 / window//2, then an optional PatchMerging (`downsample`)."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop_paths, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio, drop_paths[j])
            for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None


# ----------------------------------------------------------------------------------------------------------------
# Backbone


@functools.lru_cache(maxsize=32)
def sincos_table(dim: int, H: int, W: int, scale: float = 1.0) -> torch.Tensor:
    """(H·W, dim) 2-D sine-cosine position table in row-major token order: half the channels code the column, half
    the row, each as [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/4)) and p the cell index × `scale`
    (MAE's and DiT's `get_2d_sincos_pos_embed`, dit.py, extended to H ≠ W and coarser grids). Cached: the same
    few grids come back at every forward pass; callers add it, never write into it."""
    rows, cols = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    rows, cols = rows * scale, cols * scale
    return torch.from_numpy(np.concatenate([get_1d_sincos_pos_embed_from_grid(dim // 2, cols),
                                            get_1d_sincos_pos_embed_from_grid(dim // 2, rows)], 1)).float()


def position_code(maps: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """maps + scale × a sine-cosine table of where each cell lies, counted in cells of the finest map: the position
    code of a feature pyramid (as DETR codes the position of its detection features). Not part of GLIP-T(A)."""
    if not scale:
        return maps
    H0 = maps[0].shape[-2]
    return [m + scale * rearrange(sincos_table(m.shape[1], *m.shape[-2:], scale=H0 / m.shape[-2]).to(m),
                                  "(h w) c -> c h w", h=m.shape[-2]) for m in maps]


class SwinTransformer(nn.Module):
    """Swin v1 returning the four stage outputs [C2, C3, C4, C5] as (B, C, H, W) maps (GLIP's `SwinTransformer`)."""

    def __init__(self, patch_size: int = 4, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, out_norms: bool = True,
                 ape_grid: int = 0, sincos: float = 0.0):
        super().__init__()
        # a fixed 2-D sine-cosine table × `sincos` added to the tokens at the input of every stage (the position code
        # of MAE and DiT; not part of GLIP-T(A)): unlike a randomly initialised learned table, it holds each coordinate
        # in a few smooth channels that a linear read-out decodes, and every stage's blocks, where visual prompts
        # join, see it afresh
        self.sincos = sincos
        self.embed_dim, self.depths = embed_dim, tuple(depths)
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        # Swin's `ape` option (ablated in the Swin paper, Table 4; `absolute_pos_embed` of GLIP's swint.py): a learned
        # position table on a ape_grid² patch grid, resized bicubically to the input's grid and added to the patch
        # tokens. Windows alone see only relative positions; this tells every token where in the image it is.
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, ape_grid, ape_grid)) if ape_grid else None
        if ape_grid:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # 0.2*g/11 for global block g
        begin = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList([
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                      dpr[begin[i]:begin[i] + depths[i]], downsample=i < len(depths) - 1)
            for i in range(len(depths))])
        # stage output norms; norm0 is an Identity, as GLIP makes it for a backbone arch ending in RETINANET
        for i, c in enumerate(self.num_features):
            setattr(self, f"norm{i}", nn.LayerNorm(c) if out_norms and i > 0 else nn.Identity())
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def _prompt_for(self, visual_prompts, g: int, C: int, B: int):
        """The prompt of global block g viewed at width C: (B, [nW,] P*embed/C, C) (the authors' plain `view`), or
        None."""
        if visual_prompts is None or g >= len(visual_prompts) or visual_prompts[g] is None:
            return None
        p = visual_prompts[g]
        if p.ndim not in (3, 4) or p.shape[0] != B:
            raise ValueError(f"visual_prompts[{g}]: expected (B={B}, [windows,] P, {self.embed_dim}), got "
                             f"{tuple(p.shape)}")
        if p.shape[-1] == C:
            return p
        if p.shape[-1] != self.embed_dim or (p.shape[-2] * p.shape[-1]) % C:
            raise ValueError(f"visual_prompts[{g}] has shape {tuple(p.shape)}: block {g} has width {C}; give "
                             f"(B, P, {self.embed_dim}) prompts with P*{self.embed_dim} divisible by {C}, "
                             f"or (B, P, {C}) prompts")
        # token j at width C = concat of base tokens j*k .. j*k+k-1 (a plain view of the (B, P, embed) tensor)
        return rearrange(p, "... (n k) c -> ... n (k c)", k=C // self.embed_dim)

    def forward(self, x: torch.Tensor, visual_prompts=None, stages: int | None = None) -> list[torch.Tensor]:
        """x (B, 3, H, W) normalised images; visual_prompts[g] (B, P, embed_dim) or None for global block g;
        `stages`: run only the first that many stages (their outputs)."""
        if visual_prompts is not None and len(visual_prompts) > self.num_blocks:
            raise ValueError(f"{len(visual_prompts)} visual prompts given, but the Swin has only "
                             f"{self.num_blocks} blocks (one prompt per block at most)")
        B = x.shape[0]
        x, H, W = self.patch_embed(x)  # (B, H*W, C)
        H0 = H
        if self.absolute_pos_embed is not None:
            pos = F.interpolate(self.absolute_pos_embed, size=(H, W), mode="bicubic", align_corners=False)
            x = x + rearrange(pos, "1 c h w -> 1 (h w) c")
        outs, g, layers = [], 0, self.layers[:stages]
        for i, stage in enumerate(layers):
            C = self.num_features[i]
            if self.sincos:  # at every stage's input, cells counted in patch-embedding cells
                x = x + self.sincos * sincos_table(C, H, W, scale=H0 / H).to(x)
            for block in stage.blocks:
                x = block(x, H, W, self._prompt_for(visual_prompts, g, C, B))
                g += 1
            out = getattr(self, f"norm{i}")(x)
            outs.append(rearrange(out, "b (h w) c -> b c h w", h=H, w=W))
            if stage.downsample is not None and i + 1 < len(layers):      # not after the last stage asked for
                x = stage.downsample(x, H, W)
                H, W = (H + 1) // 2, (W + 1) // 2
        return outs
