"""DyHead: the feature tower of GLIP's grounding head (GLIP's `DyConv`, `maskrcnn_benchmark/modeling/rpn/vldyhead.py`).

One `DyConv` block maps the five FPN levels P3..P7 to five new maps of the same shapes. Per level it applies
the three attentions of the DyHead paper (Dai et al., 2021):
  spatial-aware  modulated deformable 3×3 convs on the level itself, the finer level (stride 2) and the coarser
                 level (then upsampled), all driven by offsets/masks predicted from the level itself;
  scale-aware    one scalar hsig(ReLU(conv(GAP(T)))) per candidate map T, then the mean of the weighted maps;
  task-aware     DyReLU: max of two per-channel affine functions whose coefficients come from GAP of the map.
Module names follow the official checkpoint (`DyConv.{0,1,2}.{conv,bn}`, `offset`, `AttnConv.1`, `relu.fc.*`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchvision.ops import deform_conv2d


def hsigmoid(x: torch.Tensor) -> torch.Tensor:
    """Hard sigmoid min(max(x+3, 0), 6)/6 (the ReLU6 form used by DyHead)."""
    return F.relu6(x + 3.0) / 6.0


def reinterpret_offsets(offset: torch.Tensor, mask: torch.Tensor, out_h: int, out_w: int):
    """View offsets/masks computed on an H×W map as if laid out for a smaller out_h×out_w output.

    Official GLIP feeds the offsets of level l to the conv on the coarser level l+1 (`DyConv.forward` in
    `maskrcnn_benchmark/modeling/rpn/vldyhead.py`); its CUDA kernel (`modulated_deformable_im2col_gpu_kernel`,
    `csrc/cuda/deform_conv_kernel_cuda.cu`) never checks the shapes and reads a *memory prefix* of the buffers.
    The checkpoint was trained with this, so we reproduce it exactly: flatten per image, keep the first 18·h'·w'
    (resp. 9·h'·w') numbers, reshape. This is not a spatial crop; torchvision's `deform_conv2d` rejects the raw
    tensors, hence the explicit view.
    """
    B = offset.shape[0]
    n_off, n_mask = offset.shape[1], mask.shape[1]
    offset = offset.contiguous().reshape(B, -1)[:, :n_off * out_h * out_w]
    mask = mask.contiguous().reshape(B, -1)[:, :n_mask * out_h * out_w]
    return offset.reshape(B, n_off, out_h, out_w), mask.reshape(B, n_mask, out_h, out_w)


class ModulatedDeformConv(nn.Module):
    """Modulated deformable 3×3 conv (DCNv2) named like the checkpoint (GLIP's `layers/deform_conv.py`)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * 9)  # GLIP's reset_parameters: U(±1/sqrt(fan_in)), zero bias
        nn.init.uniform_(self.weight, -bound, bound)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (h + 2 - 3) // self.stride + 1, (w + 2 - 3) // self.stride + 1

    def forward(self, x, offset, mask):
        oh, ow = self.output_size(x.shape[-2], x.shape[-1])
        if offset.shape[-2:] != (oh, ow):  # the coarser level: memory-prefix view
            offset, mask = reinterpret_offsets(offset, mask, oh, ow)
        # GLIP forces this op to fp32 under AMP (`@custom_fwd(cast_inputs=torch.float32)`)
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        # torchvision's kernel crashes the process (segfault) on a NaN offset, as a diverged run produces: sample
        # at offset 0 there and return NaN, so the run stops at its loss check with a message instead
        nan = offset.isnan().any(dim=1, keepdim=True)                        # (B, 1, oh, ow)
        out = deform_conv2d(x.to(dtype), offset.masked_fill(nan, 0.0).to(dtype), self.weight.to(dtype),
                            self.bias.to(dtype), stride=self.stride, padding=1, mask=mask.to(dtype))
        return out.masked_fill(nan, float("nan")).to(x.dtype)


class Conv3x3Norm(nn.Module):
    """Deformable 3×3 conv followed by GroupNorm (`DyConv.{i}.conv`, `DyConv.{i}.bn`)."""

    def __init__(self, channels: int, stride: int, gn_groups: int):
        super().__init__()
        self.conv = ModulatedDeformConv(channels, channels, stride)
        self.bn = nn.GroupNorm(gn_groups, channels, eps=1e-5)

    def forward(self, x, offset, mask):
        return self.bn(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Task-aware attention: y = max(α1·x + β1, α2·x + β2) with coefficients from GAP(x) (GLIP's `DYReLU`)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, 4 * channels))

    def forward(self, x):
        theta = hsigmoid(self.fc(x.mean(dim=(2, 3))))                        # (B, 4C) in [0, 1]
        theta = rearrange(theta, "b (k c) -> k b c 1 1", k=4)
        a1, b1, a2, b2 = theta                                               # order (a1, b1, a2, b2)
        a1 = 2.0 * a1            # (θ − 0.5)·2 + 1: starts near the identity
        a2 = 2.0 * a2 - 1.0      # (θ − 0.5)·2 + 0
        b1, b2 = b1 - 0.5, b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class DyConv(nn.Module):
    """One DyHead block over the whole pyramid; every sub-module is shared across levels (GLIP's `DyConv`)."""

    def __init__(self, channels: int = 256, gn_groups: int = 16):
        super().__init__()
        # DyConv.0: coarser level (stride 1, then upsampled), DyConv.1: same level, DyConv.2: finer level (stride 2)
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, 1, gn_groups), Conv3x3Norm(channels, 1, gn_groups),
                                     Conv3x3Norm(channels, 2, gn_groups)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU(inplace=True))
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)  # 18 offsets (dy, dx per tap) + 9 modulation logits
        # zero init (mmcv's DCNv2 convention): training starts from a plain 3×3 conv with masks σ(0) = 0.5.
        # GLIP keeps PyTorch's default here (`DyConv.init_weights` skips `offset`); it only matters from scratch
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        for m in list(self.DyConv.modules()) + list(self.AttnConv.modules()):
            if isinstance(m, nn.Conv2d):  # GLIP's DyConv.init_weights; the deformable convs (no nn.Conv2d) keep theirs
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for l, x in enumerate(feats):
            om = self.offset(x)                                              # (B, 27, H_l, W_l)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
            # 1. spatial-aware attention: candidates from the same, finer and coarser levels
            cands = [self.DyConv[1](x, offset, mask)]
            if l > 0:
                cands.append(self.DyConv[2](feats[l - 1], offset, mask))     # stride 2 → (B, C, H_l, W_l)
            if l < len(feats) - 1:
                coarse = self.DyConv[0](feats[l + 1], offset, mask)          # (B, C, H_{l+1}, W_{l+1})
                # official GLIP: F.upsample_bilinear = bilinear with align_corners=True, as GLIP-T(A) was trained;
                # the authors' copy switched to F.interpolate's default, nearest (marked FIXME in their vldyhead.py)
                cands.append(F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=True))
            # 2. scale-aware attention: π_T = hsig(ReLU(conv(GAP(T)))), one scalar per image and candidate
            stacked = torch.stack(cands)                                     # (T, B, C, H, W)
            pi = hsigmoid(torch.stack([self.AttnConv(t) for t in cands]))    # (T, B, 1, 1, 1)
            out.append((stacked * pi).mean(dim=0))
        # 3. task-aware attention
        return [self.relu(u) for u in out]
