"""ATSS anchor assignment and GLIP's grounding losses (`ATSSLossComputation`, GLIP's `modeling/rpn/loss.py`).

Adaptive Training Sample Selection (Zhang et al., 2020): per ground-truth box take the 9 anchors per level whose
centres are closest to the box centre, set the IoU threshold to mean + std of their IoUs, and keep candidates
above it whose centre lies inside the box. The losses are the token sigmoid focal loss on the region–token
logits, a centerness-weighted GIoU loss on the decoded boxes, and BCE on the centerness logit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from ..utils.distributed import all_reduce_sum, world_size
from .head import BoxCoder


def box_iou_inclusive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU with maskrcnn's pixel-inclusive areas ((x2−x1+1)(y2−y1+1)), as ATSS computes it (`boxlist_iou`)."""
    one = a.new_tensor([0, 0, 1, 1])
    return box_iou(a + one, b + one)   # widening x2, y2 by one pixel turns continuous areas into inclusive ones


def atss_assign(anchors: torch.Tensor, num_per_level: list[int], gt: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Index of the assigned GT per anchor, −1 for negatives. anchors (A, 4), gt (G, 4) xyxy (`prepare_targets`)."""
    A, G = anchors.shape[0], gt.shape[0]
    if G == 0:
        return torch.full((A,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou_inclusive(anchors, gt)                                   # (A, G)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2                           # (A, 2)
    g_ctr = (gt[:, :2] + gt[:, 2:]) / 2                                     # (G, 2)
    # the exact distance of GLIP's ATSSLossComputation.prepare_targets (`modeling/rpn/loss.py`); torch.cdist switches
    # to a matrix-product formula for large inputs, which flips nearly tied 9th/10th candidates
    dist = (a_ctr[:, None] - g_ctr[None]).pow(2).sum(-1).sqrt()             # (A, G)
    # 1. candidates: the top-k closest anchor centres on every level
    cands, start = [], 0
    for n in num_per_level:
        k = min(topk, n)
        cands.append(dist[start:start + n].topk(k, dim=0, largest=False).indices + start)   # (k, G)
        start += n
    cands = torch.cat(cands)                                                # (K, G)
    cand_iou = ious.gather(0, cands)                                        # (K, G)
    # 2. adaptive threshold: mean + std (unbiased) of the candidates' IoUs
    thresh = cand_iou.mean(0) + cand_iou.std(0)                             # (G,)
    is_pos = cand_iou >= thresh[None]
    # 3. the candidate's centre must lie inside the GT, with a margin of 0.01
    cx, cy = a_ctr[cands, 0], a_ctr[cands, 1]                               # (K, G)
    inside = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy]).amin(0) > 0.01
    is_pos &= inside
    # 4. an anchor positive for several GTs takes the one with the largest IoU
    masked = torch.full_like(ious, -float("inf"))                           # (A, G)
    g_idx = torch.arange(G, device=gt.device).expand_as(cands)
    masked[cands[is_pos], g_idx[is_pos]] = ious[cands[is_pos], g_idx[is_pos]]
    best, idx = masked.max(dim=1)
    idx[best == -float("inf")] = -1
    return idx


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − GIoU per box pair with continuous areas, as GLIP's ATSS loss computes it (`GIoULoss`)."""
    px1, py1 = pred[:, 0], pred[:, 1]
    px2, py2 = torch.maximum(px1, pred[:, 2]), torch.maximum(py1, pred[:, 3])
    tx1, ty1, tx2, ty2 = target.unbind(1)
    p_area = (px2 - px1) * (py2 - py1)
    t_area = (tx2 - tx1) * (ty2 - ty1)
    iw = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
    ih = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    inter = iw * ih
    enclose = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) * (torch.maximum(py2, ty2) - torch.minimum(py1, ty1)) + 1e-7
    union = p_area + t_area - inter + 1e-7
    return 1 - (inter / union - (enclose - union) / enclose)


def centerness_target(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) of the anchor centre in its GT (`compute_centerness_targets`)."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gt[:, 0], gt[:, 2] - cx], 1)
    tb = torch.stack([cy - gt[:, 1], gt[:, 3] - cy], 1)
    return torch.sqrt(lr.amin(1) / lr.amax(1) * tb.amin(1) / tb.amax(1))


def atss_targets(anchors: list[torch.Tensor], gt_boxes: list[torch.Tensor], box_coder: BoxCoder, topk: int = 9):
    """Per image: the matched GT index per anchor (−1 for negatives) and, at the positives, the anchors and their
    GT boxes as the original sees them (encoded against the anchor, then decoded)."""
    num_per_level = [a.shape[0] for a in anchors]
    all_anchors = torch.cat(anchors)                                        # (A, 4)
    for g in gt_boxes:
        g = g.to(all_anchors)
        idx = atss_assign(all_anchors, num_per_level, g, topk)
        anc = all_anchors[idx >= 0]
        yield idx, anc, box_coder.decode(box_coder.encode(g[idx[idx >= 0]], anc), anc)


def loss_normalizers(anchors: list[torch.Tensor], gt_boxes: list[torch.Tensor], box_coder: BoxCoder,
                     topk: int = 9) -> torch.Tensor:
    """(2,) float64: the number of ATSS positives and the sum of their centerness targets over a batch, the two
    denominators of GLIP's losses. Neither depends on the network's outputs, so a trainer can count a whole
    effective batch (every micro-batch, every process) before the first forward pass."""
    total = torch.zeros(2, dtype=torch.float64)
    for idx, anc, target in atss_targets(anchors, gt_boxes, box_coder, topk):
        total += torch.tensor([float((idx >= 0).sum()), float(centerness_target(anc, target).sum())],
                              dtype=torch.float64)
    return total


def grounding_losses(out: dict, anchors: list[torch.Tensor], gt_boxes: list[torch.Tensor],
                     gt_tokens: list[torch.Tensor], text_mask: torch.Tensor, box_coder: BoxCoder,
                     topk: int = 9, reg_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0,
                     normalizers: torch.Tensor | None = None) -> dict:
    """GLIP's training losses (`modeling/rpn/loss.py`, `ATSSLossComputation.__call__`).

    out: head outputs (`logits` (B, A, T), `deltas` (B, A, 4), `centerness` (B, A)); anchors: per level (A_l, 4);
    gt_boxes[b]: (G, 4) xyxy; gt_tokens[b]: (G, T) binary positive map of each box; text_mask: (B, T) real tokens.

    The token and centerness losses are sums divided by the number of positives, the box loss a centerness-weighted
    sum divided by the sum of the centerness targets. GLIP sums both counts over all GPUs and divides them by the
    GPU count; DDP's gradient average then makes every term the whole batch's sum over the whole batch's count.
    Without `normalizers` this process's counts are summed over processes in the same way (the official code).
    `normalizers` (positives, centerness sum), counted over an effective batch and divided by its number of
    forward passes, replace them: gradient accumulation counts a step's micro-batches this way
    (`train_prompts.step_normalizers`).
    """
    B, A, T = out["logits"].shape
    device = out["logits"].device
    token_t, reg_t, ctr_t, pos = [], [], [], []
    for b, (idx, anc, target) in enumerate(atss_targets(anchors, gt_boxes, box_coder, topk)):
        p = idx >= 0
        t = torch.zeros(A, T, device=device)
        # negatives: all-zero token target (the original puts a 1 in the last slot, which the text mask then
        # removes whenever that slot is padding: identical, without assuming 256 token slots)
        t[p] = gt_tokens[b].to(t)[idx[p]]
        token_t.append(t), reg_t.append(target), ctr_t.append(centerness_target(anc, target)), pos.append(p)
    token_t, pos, target, ctr_t = torch.stack(token_t), torch.stack(pos), torch.cat(reg_t), torch.cat(ctr_t)
    if normalizers is None:
        local = torch.tensor([float(pos.sum()), float(ctr_t.sum())], dtype=torch.float64)
        normalizers = all_reduce_sum(local) / world_size()
    n_pos, ctr_sum = max(float(normalizers[0]), 1.0), max(float(normalizers[1]), 1e-12)
    # 1. token sigmoid focal loss over every anchor and every real token (padding removed)
    valid = text_mask.bool()[:, None, :].expand(B, A, T)
    logits = out["logits"].float()
    loss_token = sigmoid_focal_loss(logits[valid], token_t[valid], alpha, gamma, reduction="sum") / n_pos
    # 2./3. regression and centerness on the positives
    anc = torch.cat(anchors)[None].expand(B, A, 4)[pos]                     # (P, 4)
    deltas, ctr_logit = out["deltas"][pos].float(), out["centerness"][pos].float()
    if pos.any():
        loss_reg = (giou_loss(box_coder.decode(deltas, anc), target) * ctr_t).sum() / ctr_sum
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logit, ctr_t, reduction="sum") / n_pos
    else:
        loss_reg, loss_ctr = deltas.sum(), ctr_logit.sum()
    return {"loss_token": loss_token, "loss_reg": loss_reg * reg_weight, "loss_centerness": loss_ctr}


def inclusive_boxes(boxes: torch.Tensor, pixel: tuple[float, float], size: int) -> torch.Tensor:
    """Continuous xyxy boxes in the S×S frame (x2 = x + w) → the boxes GLIP trains on.

    GLIP's dataset (`maskrcnn_benchmark/data/datasets/modulated_coco.py`) makes x2 = x + w − 1, y2 = y + h − 1 in
    the original image, clamps every coordinate to [0, W − 1] × [0, H − 1] (`BoxList.clip_to_image`), then scales
    each axis by its own factor (`BoxList.resize`). With one original pixel `pixel` = (S/W, S/H) wide and high in
    the S frame that is x2 − S/W, y2 − S/H, clamped to [0, S − S/W] × [0, S − S/H]. (GLIP also drops boxes left
    empty by the clamp; the data preparation already refuses boxes under one pixel.)
    """
    px, py = pixel
    hi = boxes.new_tensor([size - px, size - py, size - px, size - py])
    return torch.minimum((boxes - boxes.new_tensor([0, 0, px, py])).clamp(min=0), hi)
