"""Adapter^v / Adapter^l: turn a decoded mask into prompt tokens for one layer (Diff-Prompt, ICLR 2025).

The authors call this module `DiT_Prompt` (Kelvin-ywc/diff-prompt, `GLIP/maskrcnn_benchmark/modeling/prompt/prompt.py`)
and build two of them, `dit2vision` (dim = Swin embed_dim, 96) and `dit2language` (dim = BERT hidden, 768). A shared
stack of five 3x3 stride-2 convolutions and one linear layer maps the mask of layer d to L/2 "specific" tokens; a
learnable (L/2, dim) "global" prompt per layer follows them:

    mask (B,1,224,224) -> conv x5 -> (B,128,7,7) -> flatten -> linear -> (B, L/2, dim) ++ global[d] -> (B, L, dim)

Parameter names (`model.{0,2,4,6,8,11}`, `global_prompt.{d}.prompt`) follow the authors' so their weights load
strictly (the key list is tests/fixtures/adapters_depth9_len8.tsv).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def conv_stack_side(in_size: int, num_convs: int = 5) -> int:
    """Spatial side after `num_convs` 3x3 stride-2 pad-1 convolutions: 224 -> 112 -> 56 -> 28 -> 14 -> 7."""
    side = in_size
    for _ in range(num_convs):
        side = (side - 1) // 2 + 1  # floor((side + 2*1 - 3) / 2) + 1
    return side


class GlobalPrompt(nn.Module):
    """The learnable prompt tokens of one layer, shared by all images ('global' in the paper)."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        # the authors: randn then kaiming_normal_(mode='fan_out'); fan_out of an (L/2, dim) matrix is L/2,
        # so std = sqrt(2 / (L/2)), about 0.71 at L = 8 (`VPT_Prompt` in the authors' prompt.py)
        self.prompt = nn.Parameter(nn.init.kaiming_normal_(torch.empty(num_tokens, dim), mode="fan_out"))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)  # (B, L/2, dim)


class MaskAdapter(nn.Module):
    """Mask -> L prompt tokens of width `dim` for layer d: L/2 generated from the mask, then L/2 global ones."""

    def __init__(self, length: int, dim: int, depth: int, generated: bool = True, global_: bool = True,
                 in_size: int = 224, base_channels: int = 8):
        super().__init__()
        if length % 2:
            raise ValueError(f"MaskAdapter: prompt length must be even (L/2 generated + L/2 global), got {length}")
        if not (generated or global_):
            raise ValueError("MaskAdapter: at least one of generated / global_ tokens must be enabled")
        self.length, self.dim, self.depth, self.in_size = length, dim, depth, in_size
        self.generated, self.global_ = generated, global_
        self.half = length // 2
        if generated:
            c = base_channels
            side = conv_stack_side(in_size)
            chans = [1, c, 2 * c, 4 * c, 8 * c, 16 * c]  # 1 -> 8 -> 16 -> 32 -> 64 -> 128
            layers = []
            for cin, cout in zip(chans[:-1], chans[1:]):
                layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.SiLU()]
            # indices 0..9 convs/SiLUs, 10 Flatten, 11 Linear: the authors' nn.Sequential numbering
            layers += [nn.Flatten(), nn.Linear(chans[-1] * side * side, self.half * dim)]
            self.model = nn.Sequential(*layers)
        if global_:
            self.global_prompt = nn.ModuleList(GlobalPrompt(self.half, dim) for _ in range(depth))

    @property
    def num_tokens(self) -> int:
        return self.half * (int(self.generated) + int(self.global_))

    def specific(self, masks: torch.Tensor) -> torch.Tensor:
        """The generated tokens for a batch of masks (N,1,M,M) -> (N, L/2, dim), conv stack shared by all layers."""
        return rearrange(self.model(masks), "n (l d) -> n l d", l=self.half)

    def forward(self, mask: torch.Tensor | None, depth: int, batch_size: int | None = None) -> torch.Tensor:
        """Prompt tokens of layer `depth` (B, L, dim); `mask` (B,1,M,M) may be None when only global tokens are on."""
        if not 0 <= depth < self.depth:
            raise IndexError(f"MaskAdapter: layer {depth} out of range for prompt depth {self.depth}")
        parts = []
        if self.generated:
            parts.append(self.specific(mask))                       # (B, L/2, dim)
            batch_size = mask.shape[0]
        if self.global_:
            if batch_size is None:
                raise ValueError("MaskAdapter: pass batch_size when the generated tokens are off")
            parts.append(self.global_prompt[depth](batch_size))     # (B, L/2, dim)
        return torch.cat(parts, dim=1)                              # (B, L, dim), generated first

    def forward_all(self, masks: torch.Tensor | None, batch_size: int | None = None) -> list[torch.Tensor]:
        """All layers at once: masks (D, B, 1, M, M) -> D tensors (B, L, dim); one conv pass over D*B masks."""
        if self.generated:
            d, b = masks.shape[:2]
            if d != self.depth:
                raise ValueError(f"MaskAdapter: got masks for {d} layers, the adapter has depth {self.depth}")
            spec = rearrange(self.specific(rearrange(masks, "d b c h w -> (d b) c h w")),
                             "(d b) l c -> d b l c", d=d)               # (D, B, L/2, dim)
            batch_size = b
        out = []
        for i in range(self.depth):
            parts = [spec[i]] if self.generated else []
            if self.global_:
                parts.append(self.global_prompt[i](batch_size))
            out.append(torch.cat(parts, dim=1))
        return out
