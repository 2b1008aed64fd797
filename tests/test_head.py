"""Grounding head pieces (head.py, atss.py): anchors, box coder, ATSS against a plain-Python reference and
hand-made boxes, the losses against their formulas, and inference decoding on a crafted case."""
import math
import statistics

import pytest
import torch
from torchvision.ops import generalized_box_iou

from minidiffprompt.glip.atss import atss_assign, box_iou_inclusive, centerness_target, giou_loss, grounding_losses
from minidiffprompt.glip.head import AnchorGenerator, BoxCoder, GroundingHead, decode_detections

# ---------------------------------------------------------------------------------------------------------------
# anchors and box coder


def test_cell_anchors_match_glips():
    """The cell anchors GLIP's `generate_anchors` makes for strides 8..128 and sizes 64..1024."""
    gen = AnchorGenerator((8, 16, 32, 64, 128), 8.0)
    expected = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143], [-224, -224, 287, 287],
                [-448, -448, 575, 575]]
    for buf, e in zip(gen.cell_anchors, expected):
        assert buf.tolist() == [e]
    assert list(dict(gen.named_buffers())) == [f"cell_anchors.{i}" for i in range(5)]
    a = gen([(28, 28), (14, 14), (7, 7), (4, 4), (2, 2)])
    assert [len(x) for x in a] == [784, 196, 49, 16, 4]
    # row-major: index 1 is one step right, index 28 one step down
    assert a[0][1].tolist() == [-20, -28, 43, 35] and a[0][28].tolist() == [-28, -20, 35, 43]


def test_box_coder_hand_values_and_round_trip():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 9.0, 9.0]])          # w = h = 10, centre 4.5
    gt = torch.tensor([[0.0, 0.0, 19.0, 19.0]])             # w = h = 20, centre 9.5
    d = coder.encode(gt, anchor)
    torch.testing.assert_close(d, torch.tensor([[5.0, 5.0, 5 * math.log(2), 5 * math.log(2)]]))
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(50, 2, generator=g) * 50
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(50, 2, generator=g) * 40], 1)
    boxes = torch.rand(50, 2, generator=g) * 50
    boxes = torch.cat([boxes, boxes + 3 + torch.rand(50, 2, generator=g) * 60], 1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-4, rtol=0)
    # dw is clamped at log(1000/16): a huge delta cannot blow the box up
    big = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)
    assert big[0, 2] - big[0, 0] + 1 == pytest.approx(10 * 1000 / 16, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ATSS


def naive_atss(anchors, per_level, gt, topk):
    """GLIP's ATSS (`ATSSLossComputation.prepare_targets`) with Python lists: candidates, mean+std threshold,
    centre inside, largest IoU wins."""
    A = len(anchors)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        inter = iw * ih
        area = lambda x: (x[2] - x[0] + 1) * (x[3] - x[1] + 1)  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    best = [(-1.0, -1)] * A
    for j, g in enumerate(gt):
        gx, gy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
        cands, start = [], 0
        for n in per_level:
            d = [(math.hypot((anchors[i][0] + anchors[i][2]) / 2 - gx, (anchors[i][1] + anchors[i][3]) / 2 - gy), i)
                 for i in range(start, start + n)]
            cands += [i for _, i in sorted(d)[:min(topk, n)]]
            start += n
        ious = [iou(anchors[i], g) for i in cands]
        thr = statistics.mean(ious) + statistics.stdev(ious)
        for i, v in zip(cands, ious):
            cx, cy = (anchors[i][0] + anchors[i][2]) / 2, (anchors[i][1] + anchors[i][3]) / 2
            inside = min(cx - g[0], cy - g[1], g[2] - cx, g[3] - cy) > 0.01
            if v >= thr and inside and v > best[i][0]:
                best[i] = (v, j)
    return [j for _, j in best]


def test_atss_matches_plain_python_reference():
    gen = AnchorGenerator((8, 16, 32), 2.0)
    anchors = gen([(8, 8), (4, 4), (2, 2)])
    per_level = [len(a) for a in anchors]
    anchors = torch.cat(anchors).double()
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        xy = torch.rand(4, 2, generator=g, dtype=torch.float64) * 40
        gt = torch.cat([xy, xy + 6 + torch.rand(4, 2, generator=g, dtype=torch.float64) * 30], 1)
        ours = atss_assign(anchors, per_level, gt, topk=5)
        ref = naive_atss(anchors.tolist(), per_level, gt.tolist(), 5)
        assert ours.tolist() == ref
        assert (ours >= 0).any()


def test_atss_hand_made_boxes():
    # one level, stride 8, 16-px anchors on a 4×4 grid: anchor (row r, col c) = [8c−4, 8r−4, 8c+11, 8r+11]
    anchors = AnchorGenerator((8,), 2.0)([(4, 4)])[0]
    a5 = anchors[5].tolist()                                    # row 1, col 1: [4, 4, 19, 19]
    assert a5 == [4, 4, 19, 19]
    # GT A equals anchor 5, GT B anchor 15 (bottom-right corner); topk 9
    gt = torch.tensor([[4.0, 4.0, 19.0, 19.0], [20.0, 20.0, 35.0, 35.0]])
    idx = atss_assign(anchors, [16], gt, topk=9)
    assert idx[5] == 0 and idx[15] == 1                         # exact matches are positive for their GT
    assert (idx >= 0).sum() == 2                                # neighbours (IoU ≤ 0.39) fall below mean+std
    # the positive's centre must be inside: a GT whose centre region holds no anchor centre gets nothing
    thin = torch.tensor([[0.0, 0.0, 31.0, 1.0]])                # 2-px strip at the top, anchor centres at y ≥ 3.5
    assert (atss_assign(anchors, [16], thin, topk=9) < 0).all()
    assert (atss_assign(anchors, [16], torch.zeros(0, 4), topk=9) < 0).all()
    # inclusive IoU: identical boxes → 1, touching pixel rows overlap by one pixel
    assert box_iou_inclusive(gt[:1], gt[:1]).item() == pytest.approx(1.0)
    assert box_iou_inclusive(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[9.0, 0, 18, 9]])).item() == \
        pytest.approx(10 / 190)


# ---------------------------------------------------------------------------------------------------------------
# losses


def test_giou_and_centerness_formulas():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20, 2, generator=g) * 20
    a = torch.cat([a, a + 1 + torch.rand(20, 2, generator=g) * 20], 1)
    b = torch.rand(20, 2, generator=g) * 20
    b = torch.cat([b, b + 1 + torch.rand(20, 2, generator=g) * 20], 1)
    torch.testing.assert_close(giou_loss(a, b), 1 - generalized_box_iou(a, b).diagonal(), atol=1e-5, rtol=0)
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])             # centre (5, 5)
    c = centerness_target(anchor, torch.tensor([[0.0, 0.0, 20.0, 10.0]]))   # l=5 r=15 t=5 b=5
    assert c.item() == pytest.approx(math.sqrt(5 / 15))


def test_grounding_losses_on_a_crafted_case():
    coder = BoxCoder()
    anchors = [AnchorGenerator((8,), 2.0)([(4, 4)])[0]]
    gt = torch.tensor([[4.0, 4.0, 19.0, 19.0]])
    pos = atss_assign(anchors[0], [16], gt, 9) >= 0
    assert pos.sum() == 1
    T = 6
    logits = torch.randn(1, 16, T, generator=torch.Generator().manual_seed(0))
    deltas = torch.zeros(1, 16, 4)
    deltas[0, pos] = coder.encode(gt, anchors[0][pos])           # perfect regression
    ctr_t = centerness_target(anchors[0][pos], gt)
    ctr = torch.full((1, 16), 0.3)
    tokens = torch.tensor([[0.0, 1, 1, 0, 0, 0]])               # the GT's phrase = tokens 1, 2
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])              # tokens 4, 5 are padding
    out = {"logits": logits, "deltas": deltas, "centerness": ctr}
    losses = grounding_losses(out, anchors, [gt], [tokens], text_mask, coder)
    # token focal loss by hand: targets are the phrase row for the positive, zeros elsewhere; padding removed
    y = torch.zeros(1, 16, T)
    y[0, pos] = tokens
    p = logits.sigmoid()
    ce = -(y * p.log() + (1 - y) * (1 - p).log())
    p_t = p * y + (1 - p) * (1 - y)
    focal = (0.25 * y + 0.75 * (1 - y)) * (1 - p_t) ** 2 * ce
    assert losses["loss_token"].item() == pytest.approx(focal[..., :4].sum().item() / 1, rel=1e-5)
    assert losses["loss_reg"].item() == pytest.approx(0.0, abs=1e-5)
    q = torch.sigmoid(torch.tensor(0.3))
    bce = -(ctr_t * q.log() + (1 - ctr_t) * (1 - q).log()).sum()
    assert losses["loss_centerness"].item() == pytest.approx(bce.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# inference


def test_decode_detections_crafted_case():
    anchors = [torch.tensor([[0.0, 0, 9, 9], [1, 0, 10, 9], [20, 20, 29, 29], [40, 40, 49, 49]])]
    # token probabilities: the phrase is tokens {1, 2}; token 3 is not part of it and must not count
    probs = torch.tensor([[0.01, 0.9, 0.7, 0.99],      # mean 0.8
                          [0.01, 0.5, 0.7, 0.99],      # mean 0.6
                          [0.01, 0.04, 0.04, 0.99],    # mean 0.04 < 0.05: dropped before centerness
                          [0.01, 0.3, 0.3, 0.99]])     # mean 0.3
    ctr = torch.tensor([0.5, 0.9, 0.99, 0.3])
    out = {"logits": torch.logit(probs)[None], "centerness": torch.logit(ctr)[None], "deltas": torch.zeros(1, 4, 4)}
    phrase = torch.tensor([[False, True, True, False]])
    dets = decode_detections(out, anchors, phrase, (45, 45), BoxCoder())[0]
    # anchor 1 (score sqrt(.6·.9)) suppresses anchor 0 (sqrt(.8·.5), IoU 0.82 > 0.6); anchor 3 clipped to 44
    torch.testing.assert_close(dets["scores"], torch.tensor([math.sqrt(0.54), math.sqrt(0.09)]))
    torch.testing.assert_close(dets["boxes"], torch.tensor([[1.0, 0, 10, 9], [40, 40, 44, 44]]))
    # with every token as the phrase the ranking changes (token 3 has probability 0.99 everywhere)
    allt = decode_detections(out, anchors, torch.ones(1, 4, dtype=torch.bool), (45, 45), BoxCoder())[0]
    assert len(allt["boxes"]) == 3


def test_head_shapes_and_init():
    head = GroundingHead(channels=32, text_hidden=16, num_blocks=1, gn_groups=8, num_cls_logits=5)
    feats = [torch.randn(2, 32, s, s) for s in (8, 4, 2, 1, 1)]
    text = torch.randn(2, 7, 16)
    text[:, 5:] = 0                                              # padding rows
    out = head(feats, text)
    A = 64 + 16 + 4 + 1 + 1
    assert out["logits"].shape == (2, A, 7) and out["deltas"].shape == (2, A, 4) and out["centerness"].shape == (2, A)
    assert head.bias0.item() == pytest.approx(math.log(0.01 / 0.99))   # σ(bias0) = prior 0.01
    # padding rows (ê = 0) give the same logit whatever their position
    torch.testing.assert_close(out["logits"][:, :, 5], out["logits"][:, :, 6])
    # logits are the region features times the projected tokens, scaled by exp(-log_scale): check the scale
    with torch.no_grad():
        head.log_scale.fill_(math.log(2.0))
    out2 = head(feats, text)
    bias_t = (torch.nn.functional.normalize(text, dim=-1) * head.bias_lang).sum(-1) + head.bias0
    torch.testing.assert_close(out2["logits"] - bias_t[:, None], (out["logits"] - bias_t[:, None]) / 2)


def _greedy_nms_inclusive(boxes, scores, threshold):
    """GLIP's GPU NMS (`csrc/cuda/ml_nms.cu`): boxes by descending score, each suppressing the later ones whose
    devIoU, with widths and heights x2 − x1 + 1, exceeds the threshold."""
    def dev_iou(a, b):
        w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0.0)
        h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0.0)
        inter = w * h
        sa, sb = (a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        return inter / (sa + sb - inter)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep, removed = [], set()
    for n, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        removed.update(j for j in order[n + 1:] if dev_iou(boxes[i], boxes[j]) > threshold)
    return keep


def test_nms_follows_glips_gpu_rule():
    from minidiffprompt.glip.head import box_nms
    # two 10×10-pixel boxes two pixels apart: IoU 0.636 continuous, 0.667 with inclusive pixels
    a = torch.tensor([[0.0, 0, 9, 9], [2, 0, 11, 9]])
    s = torch.tensor([0.9, 0.8])
    assert box_nms(a, s, 0.65, "glip").tolist() == [0]
    assert box_nms(a, s, 0.65, "torchvision").tolist() == [0, 1]
    # boxes sharing only an edge overlap by one pixel row under the GPU rule
    touching = torch.tensor([[0.0, 0, 9, 9], [0, 9, 9, 18]])
    assert box_nms(touching, s, 0.05, "glip").tolist() == [0]
    assert box_nms(touching, s, 0.05, "torchvision").tolist() == [0, 1]
    # random clusters of small boxes: the same kept list as an explicit re-implementation of the kernel
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 2 + torch.rand(300, 2, generator=g) * 10], 1)
    scores = torch.rand(300, generator=g)
    keep = box_nms(boxes, scores, 0.6, "glip").tolist()
    assert keep == _greedy_nms_inclusive(boxes.tolist(), scores.tolist(), 0.6)
    assert keep != box_nms(boxes, scores, 0.6, "torchvision").tolist()      # the two rules do differ here
    with pytest.raises(ValueError, match="nms_rule"):
        box_nms(boxes, scores, 0.6, "cuda")


def test_detection_cap_keeps_ties():
    """GLIP's post-processor keeps every box scoring at least the cap-th best score (`kthvalue`)."""
    anchors = [torch.tensor([[0.0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9], [60, 0, 69, 9]])]
    probs = torch.tensor([0.9, 0.6, 0.6, 0.3])[:, None]
    out = {"logits": torch.logit(probs)[None], "centerness": torch.full((1, 4), 3.0),
           "deltas": torch.zeros(1, 4, 4)}
    mask = torch.ones(1, 1, dtype=torch.bool)
    tied = decode_detections(out, anchors, mask, (80, 80), BoxCoder(), max_dets=2)[0]
    assert len(tied["scores"]) == 3                             # the two boxes tied at rank 2 both stay
    assert len(decode_detections(out, anchors, mask, (80, 80), BoxCoder(), max_dets=3)[0]["scores"]) == 3
    assert len(decode_detections(out, anchors, mask, (80, 80), BoxCoder(), max_dets=1)[0]["scores"]) == 1
