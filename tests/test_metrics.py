"""Box overlaps and R@1 / R@5 / UB against hand-computed values and naive loops."""
import json

import pytest
import torch

from minidiffprompt.metrics import (box_giou, box_iou, evaluate_boxes, recall_at_k, results_table_markdown,
                                    write_results, xywh_to_xyxy)


def _naive_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_xywh_to_xyxy_is_continuous():
    assert xywh_to_xyxy([10, 20, 30, 40]).tolist() == [[10, 20, 40, 60]]  # x2 = x + w, no -1


def test_overlaps_hand_values():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]).item() == pytest.approx(1 / 3)
    assert box_giou([0, 0, 10, 10], [20, 0, 30, 10]).item() == pytest.approx(-1 / 3)  # 0 - (300-200)/300


def test_overlaps_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 30], 1)
    iou, giou = box_iou(boxes, boxes[:7]), box_giou(boxes, boxes[:7])
    for i in range(20):
        for j in range(7):
            ref_iou, ref_giou = _naive_iou(boxes[i].tolist(), boxes[j].tolist())
            assert iou[i, j].item() == pytest.approx(ref_iou, abs=1e-5)
            assert giou[i, j].item() == pytest.approx(ref_giou, abs=1e-5)


def test_recall_ranks_ties_and_empty_predictions():
    gt = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float32)
    miss, hit = [50, 50, 60, 60], [0, 0, 10, 9]
    preds = [torch.tensor([hit, miss]), torch.tensor([miss] * 4 + [hit]), torch.zeros(0, 4)]
    assert recall_at_k(preds, gt, k=1) == pytest.approx(1 / 3)
    assert recall_at_k(preds, gt, k=5) == pytest.approx(2 / 3)   # hit at rank 5 counts for R@5
    assert recall_at_k(preds[1:2], gt[:1], k=4) == 0.0           # ... but not for R@4
    assert recall_at_k(preds, gt, k=None) == pytest.approx(2 / 3)  # UB; no detection is a miss
    # ties: a stable sort keeps the given order, so the miss listed first is the top-1
    tied = [torch.tensor([miss, hit])]
    assert recall_at_k(tied, gt[:1], k=1, scores_list=[torch.tensor([0.5, 0.5])]) == 0.0
    assert recall_at_k(tied, gt[:1], k=1, scores_list=[torch.tensor([0.4, 0.5])]) == 1.0


def test_giou_hit_rule_is_stricter():
    gt, pred = [1.8, 1.8, 11.8, 11.8], [0.0, 0.0, 10.0, 10.0]
    iou, giou = _naive_iou(pred, gt)
    assert iou >= 0.5 > giou  # 0.506 vs 0.460
    preds, gts = [torch.tensor([pred])], torch.tensor([gt])
    assert recall_at_k(preds, gts, 1, 0.5, use_giou=False) == 1.0
    assert recall_at_k(preds, gts, 1, 0.5, use_giou=True) == 0.0


def test_evaluate_boxes_percent_and_tables(tmp_path):
    gt = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float32)
    preds = [torch.tensor([[0, 0, 10, 10]]), torch.tensor([[30, 30, 40, 40], [0, 0, 10, 10]])]
    r = evaluate_boxes(preds, gt)
    assert r == {"R@1": 50.0, "R@5": 100.0, "UB": 100.0, "n": 2}
    with pytest.raises(ValueError, match="predictions"):
        evaluate_boxes(preds[:1], gt)
    results = {"zeroshot": {"val": r, "testA": {"R@1": 1.0, "R@5": 2.0, "UB": 3.0}}}
    md = results_table_markdown(results)
    assert md.splitlines()[0] == "| method | val R@1 | val R@5 | val UB | testA R@1 | testA R@5 | testA UB |"
    assert md.splitlines()[2] == "| zeroshot | 50.00 | 100.00 | 100.00 | 1.00 | 2.00 | 3.00 |"
    assert results_table_markdown({"a": {"R@1": 1.5}}).splitlines()[2] == "| a | 1.50 | – | – |"
    js, mdp = write_results(results, tmp_path)
    assert json.loads(js.read_text()) == results and mdp.read_text() == md
