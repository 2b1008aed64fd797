"""Feature pyramid P3-P7 on top of the Swin stages C3-C5 (GLIP's `maskrcnn_benchmark/modeling/backbone/fpn.py`).

    fpn = FPN((192, 384, 768), 256)
    p3, p4, p5, p6, p7 = fpn([c2, c3, c4, c5])   # 28², 14², 7², 4², 2² at a 224 input; 256 channels each

Names follow maskrcnn-benchmark (`fpn_inner2..4`, `fpn_layer2..4`, `top_blocks.p6/p7`) so `backbone.fpn.*` of the
official checkpoint loads strictly. The Swin's first output (C2, stride 4) is not used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .swin import position_code


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """Conv with bias, kaiming_uniform(a=1) weights and zero bias (maskrcnn-benchmark's conv_with_kaiming_uniform)."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class DropBlock2D(nn.Module):
    """Zero random size x size blocks, rescale the rest; training mode only (GLIP's `layers/dropblock.py`).

    GLIP's defaults turn it on (`MODEL.FPN.DROP_BLOCK = True`, prob 0.3, size 3 in `config/defaults.py`), so its
    FPN drops blocks whenever it is in training mode; Diff-Prompt keeps the FPN in eval mode, so the frozen model
    never runs it. `drop_prob=0` turns it off.
    """

    def __init__(self, drop_prob: float = 0.3, block_size: int = 3):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size ** 2
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < gamma).to(x.dtype)  # (B, 1, H, W)
        dropped = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped[..., :x.shape[-2], :x.shape[-1]]  # crop (only matters for an even block size)
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class LastLevelP6P7(nn.Module):
    """P6 = 3x3/2 conv on P5; P7 = 3x3/2 conv on ReLU(P6)."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = _conv(channels, channels, 3, stride=2)
        self.p7 = _conv(channels, channels, 3, stride=2)

    def forward(self, p5):
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Lateral 1x1 + top-down nearest upsampling + 3x3 output convs, then P6/P7 (no norm, no activation)."""

    def __init__(self, in_channels_list=(192, 384, 768), out_channels: int = 256, drop_block_prob: float = 0.3,
                 drop_block_size: int = 3, sincos: float = 0.0):
        super().__init__()
        self.sincos = sincos
        # levels are numbered like the checkpoint: fpn_inner2 takes C3 (the Swin stage i=1), ..., fpn_inner4 C5
        self.levels = list(range(2, 2 + len(in_channels_list)))
        for level, cin in zip(self.levels, in_channels_list):
            setattr(self, f"fpn_inner{level}", _conv(cin, out_channels, 1))
            setattr(self, f"fpn_layer{level}", _conv(out_channels, out_channels, 3))
        self.top_blocks = LastLevelP6P7(out_channels)
        self.drop_block = DropBlock2D(drop_block_prob, drop_block_size)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: the backbone outputs (the last len(in_channels_list) are used) -> [P3, P4, P5, P6, P7]."""
        feats = features[-len(self.levels):]
        inner = getattr(self, f"fpn_inner{self.levels[-1]}")(feats[-1])        # L5
        results = [getattr(self, f"fpn_layer{self.levels[-1]}")(inner)]         # P5
        for level, feat in zip(self.levels[-2::-1], feats[-2::-1]):
            lateral = getattr(self, f"fpn_inner{level}")(feat)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")  # L4, then L3
            # DropBlock acts on what the output conv sees, not on the top-down path
            results.insert(0, getattr(self, f"fpn_layer{level}")(self.drop_block(inner)))
        results += self.top_blocks(results[-1])
        return position_code(results, self.sincos)   # a fixed code of where each cell lies (0: off, as GLIP-T(A))
