"""GLIP's training path against a short, explicit re-implementation of the official formulas.

Every function prefixed `official_` follows one function of microsoft/GLIP line by line (the file and function are
named in its docstring); none of them calls the project's code. The model under test runs `GLIP.forward` with
targets on hand-made boxes: two images of non-square original sizes, nested boxes, a box reaching past the image
border, a thin box, and phrases whose spans overlap. The last test changes one official convention at a time in
the reference (the +1 pixel, the mean + std threshold, the centre-inside check, focal α/γ, the normalisers) and
checks that the comparison would then fail, so that these tests pin every one of them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minidiffprompt.glip.atss import atss_targets, centerness_target, grounding_losses, loss_normalizers
from minidiffprompt.config import get_preset
from minidiffprompt.data.datasets import scale_box
from minidiffprompt.glip.model import GLIP
from minidiffprompt.utils.shipped import shipped
from minidiffprompt.glip.atss import inclusive_boxes

S = 96
INF = 100000000   # the official code's -INF marker for "no GT"

# (original width, height), caption, per box: COCO xywh in original pixels and the character spans of its phrase
IMAGES = [
    ((640, 480), "small red circle. big red circle. star",
     [((100, 60, 300, 260), [[0, 16]]),            # "small red circle"
      ((160, 120, 120, 110), [[10, 16], [23, 33]]),  # nested in the first: "circle" + "red circle" (overlap)
      ((560, 300, 120, 150), [[34, 38]]),          # reaches past the right border (x + w = 680 > 640)
      ((20, 400, 400, 24), [[18, 33]])]),          # thin: candidates whose centres fall outside it
    ((300, 500), "blue square. square",
     [((30, 40, 200, 300), [[0, 11]]),
      ((150, 350, 100, 120), [[5, 11], [13, 19]])]),
]


# ----------------------------------------------------------------------------------------------------------------
# the official formulas


def official_target_boxes(xywh, width, height, size, one=1.0):
    """`data/datasets/modulated_coco.py` (ModulatedDataset.__getitem__ → ConvertCocoPolysToMask): BoxList(xywh)
    .convert("xyxy") makes x2 = x + w − 1 (`structures/bounding_box.py`, TO_REMOVE = 1); `clip_to_image` clamps
    x to [0, W − 1], y to [0, H − 1]; `BoxList.resize` to the S×S input scales x by S/W and y by S/H."""
    out = []
    for x, y, w, h in xywh:
        x1, y1, x2, y2 = x, y, x + w - one, y + h - one
        x1, x2 = (min(max(v, 0), width - one) for v in (x1, x2))
        y1, y2 = (min(max(v, 0), height - one) for v in (y1, y2))
        out.append([x1 * size / width, y1 * size / height, x2 * size / width, y2 * size / height])
    return torch.tensor(out, dtype=torch.float32)


def official_iou(a, b, one=1.0):
    """`structures/boxlist_ops.py`, boxlist_iou: areas and overlaps with TO_REMOVE = 1 pixel."""
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None] - inter)


def official_encode(gt, anchors, one=1.0, weights=(10.0, 10.0, 5.0, 5.0)):
    """`modeling/box_coder.py`, BoxCoder.encode (TO_REMOVE = 1, centre = x1 + ½ width)."""
    ew, eh = anchors[:, 2] - anchors[:, 0] + one, anchors[:, 3] - anchors[:, 1] + one
    ex, ey = anchors[:, 0] + 0.5 * ew, anchors[:, 1] + 0.5 * eh
    gw, gh = gt[:, 2] - gt[:, 0] + one, gt[:, 3] - gt[:, 1] + one
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    wx, wy, ww, wh = weights
    return torch.stack([wx * (gx - ex) / ew, wy * (gy - ey) / eh, ww * torch.log(gw / ew), wh * torch.log(gh / eh)], 1)


def official_decode(codes, anchors, one=1.0, weights=(10.0, 10.0, 5.0, 5.0)):
    """`modeling/box_coder.py`, BoxCoder.decode (dw, dh clamped at log(1000/16); x2 = centre + ½ width − 1)."""
    w, h = anchors[:, 2] - anchors[:, 0] + one, anchors[:, 3] - anchors[:, 1] + one
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    wx, wy, ww, wh = weights
    dx, dy = codes[:, 0] / wx, codes[:, 1] / wy
    dw, dh = (codes[:, 2] / ww).clamp(max=math.log(1000.0 / 16)), (codes[:, 3] / wh).clamp(max=math.log(1000.0 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, torch.exp(dw) * w, torch.exp(dh) * h
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - one, py + 0.5 * ph - one], 1)


def official_prepare_targets(anchors_per_level, gt, topk=9, one=1.0, std=True, inside=True):
    """`modeling/rpn/loss.py`, ATSSLossComputation.prepare_targets for one image: (matched GT per anchor, −1 for
    background; the encoded regression target per anchor)."""
    anchors = torch.cat(anchors_per_level)
    num_gt = len(gt)
    ious = official_iou(anchors, gt, one)
    gt_points = torch.stack([(gt[:, 2] + gt[:, 0]) / 2.0, (gt[:, 3] + gt[:, 1]) / 2.0], 1)
    acx, acy = (anchors[:, 2] + anchors[:, 0]) / 2.0, (anchors[:, 3] + anchors[:, 1]) / 2.0
    distances = (torch.stack([acx, acy], 1)[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()
    candidate_idxs, start = [], 0
    for level in anchors_per_level:                           # topk = ATSS.TOPK × 1 anchor per location
        end = start + len(level)
        k = min(topk, len(level))
        candidate_idxs.append(distances[start:end].topk(k, dim=0, largest=False).indices + start)
        start = end
    candidate_idxs = torch.cat(candidate_idxs, 0)
    candidate_ious = ious[candidate_idxs, torch.arange(num_gt)]
    thresh = candidate_ious.mean(0) + (candidate_ious.std(0) if std else 0)
    is_pos = candidate_ious >= thresh[None, :]
    n = len(anchors)
    flat = (candidate_idxs + torch.arange(num_gt) * n).view(-1)
    ecx, ecy = acx.view(1, -1).expand(num_gt, n).reshape(-1), acy.view(1, -1).expand(num_gt, n).reshape(-1)
    l_ = ecx[flat].view(-1, num_gt) - gt[:, 0]
    t_ = ecy[flat].view(-1, num_gt) - gt[:, 1]
    r_ = gt[:, 2] - ecx[flat].view(-1, num_gt)
    b_ = gt[:, 3] - ecy[flat].view(-1, num_gt)
    if inside:
        is_pos = is_pos & (torch.stack([l_, t_, r_, b_], 1).min(1).values > 0.01)
    ious_inf = torch.full_like(ious, -INF).t().contiguous().view(-1)
    index = flat[is_pos.view(-1)]
    ious_inf[index] = ious.t().contiguous().view(-1)[index]
    values, indexes = ious_inf.view(num_gt, -1).t().max(1)
    indexes[values == -INF] = -1
    return indexes, official_encode(gt[indexes.clamp(min=0)], anchors, one)


def official_centerness(reg_targets, anchors, one=1.0):
    """`modeling/rpn/loss.py`, ATSSLossComputation.compute_centerness_targets."""
    gts = official_decode(reg_targets, anchors, one)
    cx, cy = (anchors[:, 2] + anchors[:, 0]) / 2, (anchors[:, 3] + anchors[:, 1]) / 2
    lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], 1)
    tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], 1)
    return torch.sqrt(lr.min(-1).values / lr.max(-1).values * (tb.min(-1).values / tb.max(-1).values))


def official_giou_loss(pred, target, anchors, weight, one=1.0):
    """`modeling/rpn/loss.py`, ATSSLossComputation.GIoULoss (continuous areas, 1e-7 guards, weighted sum)."""
    p, t = official_decode(pred, anchors, one), official_decode(target, anchors, one)
    px1, py1 = p[:, 0], p[:, 1]
    px2, py2 = torch.max(px1, p[:, 2]), torch.max(py1, p[:, 3])
    tx1, ty1, tx2, ty2 = t.unbind(1)
    x1, y1, x2, y2 = torch.max(px1, tx1), torch.max(py1, ty1), torch.min(px2, tx2), torch.min(py2, ty2)
    inter = torch.where((y2 > y1) & (x2 > x1), (x2 - x1) * (y2 - y1), torch.zeros_like(x1))
    enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) - torch.min(py1, ty1)) + 1e-7
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-7
    return ((1 - (inter / union - (enclosing - union) / enclosing)) * weight).sum()


def official_token_focal(logits, targets, text_mask, alpha=0.25, gamma=2.0):
    """`layers/sigmoid_focal_loss.py`, token_sigmoid_binary_focal_loss, summed (TokenSigmoidFocalLoss)."""
    m = (text_mask > 0).unsqueeze(1).repeat(1, logits.size(1), 1)
    x, y = torch.masked_select(logits, m), torch.masked_select(targets, m)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    return ((alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma).sum()


def official_losses(out, anchors_per_level, gts, positive_maps, text_mask, one=1.0, std=True, inside=True,
                    alpha=0.25, gamma=2.0, normalise=True):
    """`modeling/rpn/loss.py`, ATSSLossComputation.__call__ on one GPU (reduce_sum is the identity): the token loss
    and the centerness BCE over max(#positives, 1), the GIoU loss over the centerness sum, × REG_LOSS_WEIGHT 2."""
    anchors = torch.cat(anchors_per_level)
    B, A, T = out["logits"].shape
    token_labels, reg, idx = [], [], []
    for b in range(B):
        i, r = official_prepare_targets(anchors_per_level, gts[b], one=one, std=std, inside=inside)
        t = positive_maps[b][i.clamp(min=0)].clone()
        unmatched = torch.zeros(T)
        unmatched[-1] = 1                                     # the "no object" slot, removed below by the text mask
        t[i < 0] = unmatched
        token_labels.append(t), reg.append(r), idx.append(i)
    pos = torch.stack(idx) >= 0
    num_pos = max(float(pos.sum()), 1.0) if normalise else float(B)
    token_loss = official_token_focal(out["logits"], torch.stack(token_labels), text_mask, alpha, gamma) / num_pos
    anc = anchors[None].expand(B, A, 4)[pos]
    reg_t = torch.stack(reg)[pos]
    ctr_t = official_centerness(reg_t, anc, one)
    ctr_sum = float(ctr_t.sum()) if normalise else float(B)
    reg_loss = official_giou_loss(out["deltas"][pos], reg_t, anc, ctr_t, one) / ctr_sum
    ctr_loss = F.binary_cross_entropy_with_logits(out["centerness"][pos], ctr_t, reduction="sum") / num_pos
    return {"idx": torch.stack(idx), "reg_targets": reg_t, "centerness_targets": ctr_t,
            "loss_token": token_loss, "loss_reg": reg_loss * 2.0, "loss_centerness": ctr_loss}


# ----------------------------------------------------------------------------------------------------------------
# the model under test


def forward_with_targets() -> dict:
    """A randomly initialised tiny GLIP's forward with targets, its head outputs and its inputs."""
    torch.manual_seed(0)
    glip = GLIP(get_preset("tiny").glip, vocab_file=shipped("tiny_glip") / "vocab.txt").eval()   # dropout off
    with torch.no_grad():                  # spread the untrained box and centerness outputs
        glip.rpn.head.bbox_pred.weight.normal_(0, 0.05)
        glip.rpn.head.centerness.weight.normal_(0, 0.05)
    images = torch.rand(len(IMAGES), 3, S, S, generator=torch.Generator().manual_seed(1))
    captions = [c for _, c, _ in IMAGES]
    targets = [{"boxes": inclusive_boxes(torch.stack([scale_box(b, w, h, S) for b, _ in boxes]), (S / w, S / h), S),
                "spans": [sp for _, sp in boxes]} for (w, h), _, boxes in IMAGES]
    captured = {}
    hook = glip.rpn.head.register_forward_hook(lambda m, i, o: captured.update(o))
    losses = glip(images, captions, targets=targets)
    hook.remove()
    out = {k: captured[k].detach().float() for k in ("logits", "deltas", "centerness")}
    anchors = glip.rpn.anchor_generator(captured["sizes"])
    gts = [official_target_boxes([b for b, _ in boxes], w, h, S) for (w, h), _, boxes in IMAGES]
    maps = [torch.stack([glip.token_map(c, sp) for _, sp in boxes]).float()
            for c, (_, _, boxes) in zip(captions, IMAGES)]
    _, text_mask = glip.encode_text(captions)
    return dict(glip=glip, losses={k: v.detach() for k, v in losses.items()}, out=out, anchors=anchors,
                targets=targets, gts=gts, maps=maps, text_mask=text_mask)


@pytest.fixture(scope="module")
def run():
    return forward_with_targets()


def test_target_boxes_follow_the_official_dataset(run):
    for t, g in zip(run["targets"], run["gts"]):
        torch.testing.assert_close(t["boxes"], g, rtol=0, atol=1e-5)
    # the box past the right border is clamped to the last pixel column, x2 = (W − 1)·S/W
    assert run["gts"][0][2, 2].item() == pytest.approx(639 * S / 640)
    # y2 = (y + h − 1)·S/H on the 640×480 image: S/H, not S/W, is taken off
    assert run["gts"][0][0, 3].item() == pytest.approx((60 + 260 - 1) * S / 480)


def test_atss_positives_and_targets_match_the_official_code(run):
    ref = official_losses(run["out"], run["anchors"], run["gts"], run["maps"], run["text_mask"])
    anchors = torch.cat(run["anchors"])
    ctr = []
    for b, (idx, anc, target) in enumerate(atss_targets(run["anchors"], run["gts"], run["glip"].box_coder)):
        assert torch.equal(idx, ref["idx"][b])                 # the same positives, matched to the same GT
        assert (idx >= 0).sum() > len(run["gts"][b])          # several positives per box on average
        ctr.append((anc, target))
    anc, target = torch.cat([a for a, _ in ctr]), torch.cat([t for _, t in ctr])
    torch.testing.assert_close(target, official_decode(ref["reg_targets"], anc), rtol=0, atol=1e-4)
    torch.testing.assert_close(official_encode(target, anc), ref["reg_targets"], rtol=0, atol=1e-4)
    torch.testing.assert_close(centerness_target(anc, target), ref["centerness_targets"], rtol=1e-5, atol=1e-6)
    assert set(ref["idx"][0].tolist()) >= {0, 1, 2, 3, -1}    # every hand-made box got positives
    assert anchors.shape[0] == ref["idx"].shape[1]


def test_every_loss_term_matches_the_official_code(run):
    ref = official_losses(run["out"], run["anchors"], run["gts"], run["maps"], run["text_mask"])
    for k in ("loss_token", "loss_reg", "loss_centerness"):
        assert run["losses"][k].item() == pytest.approx(float(ref[k]), rel=1e-5), k
    n = loss_normalizers(run["anchors"], run["gts"], run["glip"].box_coder)
    assert n[0].item() == (ref["idx"] >= 0).sum().item()
    assert n[1].item() == pytest.approx(ref["centerness_targets"].sum().item(), rel=1e-6)


@pytest.mark.parametrize("change", [dict(one=0.0), dict(std=False), dict(inside=False), dict(alpha=0.5),
                                    dict(gamma=0.0), dict(normalise=False)],
                         ids=["no +1 pixel", "mean threshold", "no inside check", "alpha", "gamma", "normalisers"])
def test_each_official_convention_is_pinned(run, change):
    """The reference with one convention changed disagrees with the model beyond the tolerances used above."""
    gts = [official_target_boxes([b for b, _ in boxes], w, h, S, one=change.get("one", 1.0))
           for (w, h), _, boxes in IMAGES]
    ref = official_losses(run["out"], run["anchors"], gts, run["maps"], run["text_mask"], **change)
    differs = [abs(run["losses"][k].item() - float(ref[k])) > 1e-4 * abs(float(ref[k]))
               for k in ("loss_token", "loss_reg", "loss_centerness")]
    positives_differ = [not torch.equal(i, r) for i, r in zip(
        (idx for idx, _, _ in atss_targets(run["anchors"], run["gts"], run["glip"].box_coder)), ref["idx"])]
    assert any(differs) or any(positives_differ)


def test_grounding_losses_take_the_effective_batchs_normalisers(run):
    """Splitting a batch into forward passes with the whole batch's normalisers (÷ passes) and averaging the
    passes gives the whole batch's losses: what gradient accumulation and the GPUs' all-reduce rely on."""
    glip, out, anchors = run["glip"], run["out"], run["anchors"]
    tokens = run["maps"]
    whole = grounding_losses(out, anchors, run["gts"], tokens, run["text_mask"], glip.box_coder)
    norm = loss_normalizers(anchors, run["gts"], glip.box_coder) / 2
    parts = [grounding_losses({k: v[b:b + 1] for k, v in out.items()}, anchors, run["gts"][b:b + 1], tokens[b:b + 1],
                              run["text_mask"][b:b + 1], glip.box_coder, normalizers=norm) for b in range(2)]
    for k in whole:
        assert ((parts[0][k] + parts[1][k]) / 2).item() == pytest.approx(whole[k].item(), rel=1e-5), k
    # each pass on its own counts (the old per-micro-batch rule) does not
    alone = [grounding_losses({k: v[b:b + 1] for k, v in out.items()}, anchors, run["gts"][b:b + 1], tokens[b:b + 1],
                              run["text_mask"][b:b + 1], glip.box_coder) for b in range(2)]
    assert any(abs((alone[0][k] + alone[1][k]).item() / 2 - whole[k].item()) > 1e-3 * whole[k].item() for k in whole)
