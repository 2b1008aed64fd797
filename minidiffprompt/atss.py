"""ATSS anchor assignment and GLIP's grounding losses (spec/GLIP_T_A.md §11–§12).

Adaptive Training Sample Selection (Zhang et al., 2020): per ground-truth box take the 9 anchors per level whose
centres are closest to the box centre, set the IoU threshold to mean + std of their IoUs, and keep candidates
above it whose centre lies inside the box. The losses are the token sigmoid focal loss on the region–token
logits, a centerness-weighted GIoU loss on the decoded boxes, and BCE on the centerness logit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from .head import BoxCoder


def box_iou_inclusive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU with maskrcnn's pixel-inclusive areas ((x2−x1+1)(y2−y1+1)), as ATSS computes it (spec §11)."""
    one = a.new_tensor([0, 0, 1, 1])
    return box_iou(a + one, b + one)   # widening x2, y2 by one pixel turns continuous areas into inclusive ones


def atss_assign(anchors: torch.Tensor, num_per_level: list[int], gt: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Index of the assigned GT per anchor, −1 for negatives. anchors (A, 4), gt (G, 4) xyxy (spec §11)."""
    A, G = anchors.shape[0], gt.shape[0]
    if G == 0:
        return torch.full((A,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou_inclusive(anchors, gt)                                   # (A, G)
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2                           # (A, 2)
    g_ctr = (gt[:, :2] + gt[:, 2:]) / 2                                     # (G, 2)
    dist = torch.cdist(a_ctr, g_ctr)                                        # (A, G)
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
    """1 − GIoU per box pair with continuous areas, as GLIP's ATSS loss computes it (spec §12.2)."""
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
    """sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) of the anchor centre inside its GT (spec §12.3)."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gt[:, 0], gt[:, 2] - cx], 1)
    tb = torch.stack([cy - gt[:, 1], gt[:, 3] - cy], 1)
    return torch.sqrt(lr.amin(1) / lr.amax(1) * tb.amin(1) / tb.amax(1))


def grounding_losses(out: dict, anchors: list[torch.Tensor], gt_boxes: list[torch.Tensor],
                     gt_tokens: list[torch.Tensor], text_mask: torch.Tensor, box_coder: BoxCoder,
                     topk: int = 9, reg_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> dict:
    """GLIP's training losses for one process (spec §12, number of GPUs = 1).

    out: head outputs (`logits` (B, A, T), `deltas` (B, A, 4), `centerness` (B, A)); anchors: per level (A_l, 4);
    gt_boxes[b]: (G, 4) xyxy; gt_tokens[b]: (G, T) binary positive map of each box; text_mask: (B, T) real tokens.
    """
    num_per_level = [a.shape[0] for a in anchors]
    all_anchors = torch.cat(anchors)                                        # (A, 4)
    B, A, T = out["logits"].shape
    token_t, reg_t, pos = [], [], []
    for b in range(B):
        idx = atss_assign(all_anchors, num_per_level, gt_boxes[b].to(all_anchors), topk)
        p = idx >= 0
        t = torch.zeros(A, T, device=all_anchors.device)
        # negatives: all-zero token target (the original puts a 1 in the last slot, which the text mask then
        # removes whenever that slot is padding: identical, without the 256-token assumption of bug G5)
        t[p] = gt_tokens[b].to(t)[idx[p]]
        token_t.append(t)
        reg_t.append(gt_boxes[b].to(all_anchors)[idx.clamp(min=0)])
        pos.append(p)
    token_t, gt_matched, pos = torch.stack(token_t), torch.stack(reg_t), torch.stack(pos)  # (B,A,T) (B,A,4) (B,A)
    n_pos = max(float(pos.sum()), 1.0)
    # 1. token sigmoid focal loss over every anchor and every real token (padding removed)
    valid = text_mask.bool()[:, None, :].expand(B, A, T)
    logits = out["logits"].float()
    loss_token = sigmoid_focal_loss(logits[valid], token_t[valid], alpha, gamma, reduction="sum") / n_pos
    # 2./3. regression and centerness on the positives
    anc = all_anchors[None].expand(B, A, 4)[pos]                            # (P, 4)
    deltas, ctr_logit = out["deltas"][pos].float(), out["centerness"][pos].float()
    if pos.any():
        target = box_coder.decode(box_coder.encode(gt_matched[pos], anc), anc)   # the GT, as the original decodes it
        ctr_t = centerness_target(anc, target)
        loss_reg = (giou_loss(box_coder.decode(deltas, anc), target) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-12)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logit, ctr_t, reduction="sum") / n_pos
    else:
        loss_reg, loss_ctr = deltas.sum(), ctr_logit.sum()
    return {"loss_token": loss_token, "loss_reg": loss_reg * reg_weight, "loss_centerness": loss_ctr}
