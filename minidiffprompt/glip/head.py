"""GLIP's grounding head: DyHead tower, box/centerness/region-token predictions, anchors, box coder, decoding.

    feats P3..P7 ──DyHead×N──► D3..D7 ──► deltas (scaled per level), centerness logit,
                                       └─► S = D·τᵀ / e^{log_scale} + b_t        (region–token logits)
    text features e ──L2 norm──► τ = proj(ê / 2),  b_t = ê·bias_lang + bias0

Everything follows GLIP's `maskrcnn_benchmark/modeling/rpn/`: `vldyhead.py` (`VLDyHead`, `BoxCoder`),
`anchor_generator.py` and `inference.py` (`ATSSPostProcessor`); parameter names follow the official checkpoint
(`rpn.head.*`, `rpn.anchor_generator.cell_anchors.*`). The ATSS assignment and the losses live in atss.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchvision.ops import nms

from .dyhead import DyConv
from .swin import position_code

# ----------------------------------------------------------------------------------------------------------------
# Anchors and the box coder


class BufferList(nn.Module):
    """A list of persistent buffers named 0, 1, ... (the checkpoint's `cell_anchors.{l}`)."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __len__(self):
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())


def cell_anchor(stride: int, scale: float) -> torch.Tensor:
    """Square anchor of side scale·stride centred on the base window [0, 0, s−1, s−1] (as `generate_anchors`)."""
    c = (stride - 1) / 2.0
    half = (scale * stride - 1) / 2.0
    return torch.tensor([[c - half, c - half, c + half, c + half]], dtype=torch.float32)  # (1, 4)


class AnchorGenerator(nn.Module):
    """One square anchor per location and level; `anchor_scale` 8 gives GLIP's sizes 64..1024 (anchor_generator.py)."""

    def __init__(self, strides=(8, 16, 32, 64, 128), scale: float = 8.0):
        super().__init__()
        self.strides = tuple(strides)
        self.cell_anchors = BufferList([cell_anchor(s, scale) for s in self.strides])

    def forward(self, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Anchors per level, (H_l·W_l, 4) in row-major order (y outer, x inner)."""
        out = []
        for (h, w), s, base in zip(sizes, self.strides, self.cell_anchors):
            ys, xs = torch.meshgrid(torch.arange(h, device=base.device) * s,
                                    torch.arange(w, device=base.device) * s, indexing="ij")
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 4).to(base.dtype)   # (H·W, 4)
            out.append(shifts + base)
        return out


class BoxCoder:
    """Pixel-inclusive anchor-relative box coding with weights (10, 10, 5, 5).

    GLIP's `BoxCoder` (`modeling/rpn/vldyhead.py`) hard-codes these weights and ignores the configured ones.
    """

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), clip: float = math.log(1000.0 / 16)):
        self.weights, self.clip = weights, clip

    @staticmethod
    def _centre_size(boxes):
        w = boxes[:, 2] - boxes[:, 0] + 1
        h = boxes[:, 3] - boxes[:, 1] + 1
        return (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, w, h

    def encode(self, gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        gx, gy, gw, gh = self._centre_size(gt)
        ax, ay, aw, ah = self._centre_size(anchors)
        return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                            ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=1)  # (N, 4)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        ax, ay, aw, ah = self._centre_size(anchors)
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.clip)
        dh = (deltas[:, 3] / wh).clamp(max=self.clip)
        cx, cy = dx * aw + ax, dy * ah + ay
        w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
        return torch.stack([cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, cy + (h - 1) / 2], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The head


class Scale(nn.Module):
    """A learnable scalar multiplier (`scales.{l}.scale`), one per pyramid level."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x):
        return x * self.scale


class GroundingHead(nn.Module):
    """`rpn.head`: DyHead tower + box, centerness and dot-product region–token predictions (GLIP's `VLDyHead`)."""

    def __init__(self, channels: int = 256, text_hidden: int = 768, num_blocks: int = 6, gn_groups: int = 16,
                 num_cls_logits: int = 80, num_levels: int = 5, prior_prob: float = 0.01, sincos: float = 0.0):
        super().__init__()
        self.sincos = sincos   # tiny option: a position code on the region features (`tower`); 0 in GLIP-T(A)
        self.dyhead_tower = nn.ModuleList([DyConv(channels, gn_groups) for _ in range(num_blocks)])
        self.cls_logits = nn.Conv2d(channels, num_cls_logits, 1)  # unused by GLIP: kept so checkpoints load
        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        self.dot_product_projection_text = nn.Linear(text_hidden, channels)
        bias_value = -math.log((1 - prior_prob) / prior_prob)             # −4.59512: σ = prior at the start
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(text_hidden))
        self.bias0 = nn.Parameter(torch.full((1,), bias_value))
        for m in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)

    def token_side(self, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ê = e/‖e‖ (padding rows stay 0), τ = proj(ê/2) (…, C), b_t = ê·bias_lang + bias0 (…,): what the head
        dots with the regions, and each token's bias."""
        e = F.normalize(embedded, p=2, dim=-1)
        return self.dot_product_projection_text(e / 2.0), (e * self.bias_lang).sum(-1) + self.bias0

    def tower(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """P3..P7 → the region features D3..D7 that every prediction reads: the DyHead blocks, then (`sincos` > 0, a
        tiny-preset option) a fixed sine-cosine code of each cell's place, so that a word can score where a region
        is, as DETR adds one to its detection features."""
        for block in self.dyhead_tower:
            feats = block(feats)
        return position_code(feats, self.sincos)

    def forward(self, feats: list[torch.Tensor], embedded: torch.Tensor) -> dict:
        """feats: P3..P7 (B, C, H_l, W_l); embedded: masked text features (B, T, D).

        Returns levels concatenated in GLIP's order (`permute_and_flatten`: level, then y, then x):
        `logits` (B, A, T), `deltas` (B, A, 4), `centerness` (B, A), and `sizes` [(H_l, W_l)].
        """
        feats = self.tower(feats)
        tau, bias_t = self.token_side(embedded)                             # (B, T, C), (B, T)
        logits, deltas, ctr = [], [], []
        for l, g in enumerate(feats):
            deltas.append(rearrange(self.scales[l](self.bbox_pred(g)), "b k h w -> b (h w) k"))
            ctr.append(rearrange(self.centerness(g), "b 1 h w -> b (h w)"))
            v = rearrange(g, "b c h w -> b (h w) c")                        # region features, no projection
            s = v @ tau.transpose(1, 2) / self.log_scale.exp() + bias_t[:, None, :]   # (B, H·W, T)
            logits.append(s.clamp(-50000.0, 50000.0))
        return {"logits": torch.cat(logits, 1), "deltas": torch.cat(deltas, 1), "centerness": torch.cat(ctr, 1),
                "sizes": [tuple(g.shape[-2:]) for g in feats]}


# ----------------------------------------------------------------------------------------------------------------
# Inference (GLIP's `ATSSPostProcessor`, `modeling/rpn/inference.py`)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, rule: str = "glip") -> torch.Tensor:
    """Indices kept by non-maximum suppression, best first.

    rule "glip": the overlap GLIP computes on a GPU (`maskrcnn_benchmark/csrc/cuda/ml_nms.cu`, `devIoU`), with
    pixel-inclusive widths and heights, x2 − x1 + 1. Widening every box by one pixel at x2 and y2 turns
    torchvision's continuous IoU into exactly that. GLIP's `ml_nms` suppresses only within a label; a referring
    prompt scores every box with one phrase, so all boxes share one label here. rule "torchvision": the
    continuous overlap of GLIP's CPU branch (`structures/boxlist_ops.py`, `boxlist_ml_nms`).
    """
    if rule not in ("glip", "torchvision"):
        raise ValueError(f"nms_rule must be 'glip' or 'torchvision', got {rule!r}")
    if rule == "glip":
        boxes = boxes + boxes.new_tensor([0, 0, 1, 1])
    return nms(boxes, scores, threshold)


@torch.no_grad()
def decode_detections(out: dict, anchors: list[torch.Tensor], token_masks: torch.Tensor, image_size: tuple[int, int],
                      box_coder: BoxCoder, score_th: float = 0.05, pre_nms_top_n: int = 1000,
                      nms_th: float = 0.6, max_dets: int = 100, nms_rule: str = "glip") -> list[dict]:
    """Ranked boxes per image from the head outputs.

    token_masks: (B, T) bool, the phrase tokens whose mean probability scores a box. Per level: mean token
    probability > score_th, at most pre_nms_top_n by probability×centerness, decode, clip to the (H, W) image
    [0, W−1]×[0, H−1]; then NMS over all levels (`nms_rule`, see `box_nms`), score = sqrt(prob × centerness),
    sorted descending, and the detection cap as GLIP's post-processor applies it (`modeling/rpn/inference.py`,
    `select_over_all_levels`): with more than max_dets boxes left, keep every box scoring at least the max_dets-th
    best score, so boxes tied at the cap all stay.
    """
    probs = out["logits"].float().sigmoid()                                 # (B, A, T)
    w = token_masks.to(probs.dtype)
    phrase = (probs * w[:, None, :]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1)   # (B, A) mean over phrase
    ctr = out["centerness"].float().sigmoid()
    counts = [a.shape[0] for a in anchors]
    results = []
    for b in range(probs.shape[0]):
        boxes, scores, start = [], [], 0
        for n, anc in zip(counts, anchors):
            p, c, d = phrase[b, start:start + n], ctr[b, start:start + n], out["deltas"][b, start:start + n]
            start += n
            keep = torch.nonzero(p > score_th).squeeze(1)                   # threshold before centerness
            prod = p[keep] * c[keep]
            k = min(pre_nms_top_n, keep.numel())
            prod, order = prod.topk(k)
            keep = keep[order]
            bx = box_coder.decode(d[keep].float(), anc[keep])
            h, w = image_size
            bx = torch.stack([bx[:, 0].clamp(0, w - 1), bx[:, 1].clamp(0, h - 1),
                              bx[:, 2].clamp(0, w - 1), bx[:, 3].clamp(0, h - 1)], dim=1)
            boxes.append(bx)
            scores.append(prod.sqrt())
        boxes, scores = torch.cat(boxes), torch.cat(scores)
        keep = box_nms(boxes, scores, nms_th, nms_rule)                     # sorted by score
        if keep.numel() > max_dets > 0:
            keep = keep[scores[keep] >= scores[keep[max_dets - 1]]]         # ties at the cap stay
        results.append({"boxes": boxes[keep], "scores": scores[keep]})
    return results
