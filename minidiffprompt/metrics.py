"""Referring-expression metrics: R@1, R@5 and UB (upper bound: any kept box is a hit), as tables.

A prediction is a list of boxes sorted by score, best first (GLIP keeps at most 100). A hit is IoU >= 0.5 with
the ground-truth box, both xyxy in the same frame, continuous coordinates (GT x2 = x + w, as GLIP's evaluator).
The authors' evaluator, GLIP's `RefExpEvaluator.summarize` (maskrcnn_benchmark/data/datasets/refexp.py), counts
GIoU >= 0.5 instead: `use_giou=True` reproduces it.
An image with no detection is a miss.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import box_iou as _box_iou
from torchvision.ops import generalized_box_iou

from .utils.files import write_json, write_text

METRICS = ("R@1", "R@5", "UB")


def xywh_to_xyxy(boxes) -> torch.Tensor:
    """COCO [x, y, w, h] → [x1, y1, x2, y2] with x2 = x + w (continuous, no -1)."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def box_iou(a, b) -> torch.Tensor:
    """(N, M) IoU of xyxy boxes (torchvision.ops)."""
    return _box_iou(torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4),
                    torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))


def box_giou(a, b) -> torch.Tensor:
    """(N, M) generalised IoU of xyxy boxes (torchvision.ops), in [-1, 1]."""
    return generalized_box_iou(torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4),
                               torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))


def _hits(pred_boxes_list, gt_boxes, k, thr, use_giou, scores_list=None) -> torch.Tensor:
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    if len(pred_boxes_list) != len(gt):
        raise ValueError(f"{len(pred_boxes_list)} predictions for {len(gt)} ground-truth boxes; expected one each")
    hits = torch.zeros(len(gt), dtype=torch.bool)
    for i, boxes in enumerate(pred_boxes_list):
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if scores_list is not None:  # stable sort: ties keep the given order
            order = torch.sort(torch.as_tensor(scores_list[i]).reshape(-1), descending=True, stable=True).indices
            boxes = boxes[order]
        if k is not None and k > 0:
            boxes = boxes[:k]
        if len(boxes) == 0:
            continue  # no detection = miss
        overlap = (box_giou if use_giou else box_iou)(boxes, gt[i:i + 1])
        hits[i] = bool((overlap >= thr).any())
    return hits


def recall_at_k(pred_boxes_list, gt_boxes, k: int | None = 1, thr: float = 0.5, use_giou: bool = False,
                scores_list=None) -> float:
    """Fraction of samples whose top-k boxes contain a hit; k = None or -1 means all kept boxes (UB).

    pred_boxes_list: per sample a (K_i, 4) xyxy tensor sorted best first (or pass `scores_list` to sort);
    gt_boxes: (N, 4) xyxy in the same frame.
    """
    hits = _hits(pred_boxes_list, gt_boxes, k, thr, use_giou, scores_list)
    return hits.float().mean().item() if len(hits) else 0.0


def evaluate_boxes(pred_boxes_list, gt_boxes, thr: float = 0.5, use_giou: bool = False,
                   scores_list=None) -> dict:
    """{"R@1", "R@5", "UB"} in percent, plus "n" (number of samples)."""
    out = {name: 100.0 * recall_at_k(pred_boxes_list, gt_boxes, k, thr, use_giou, scores_list)
           for name, k in zip(METRICS, (1, 5, None))}
    out["n"] = len(pred_boxes_list)
    return out


def results_table_markdown(results: dict, metrics=METRICS, digits: int = 2) -> str:
    """Markdown table. `results` is {row: {split: {metric: value}}} (one column per split × metric) or
    {row: {metric: value}} (one column per metric)."""
    rows = list(results)
    if not rows:
        return ""
    nested = isinstance(next(iter(results[rows[0]].values())), dict)
    if nested:
        splits = list(dict.fromkeys(s for r in rows for s in results[r]))
        cols = [(s, m) for s in splits for m in metrics]
        header = ["method"] + [f"{s} {m}" for s, m in cols]
    else:
        cols = [(None, m) for m in metrics]
        header = ["method"] + list(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r]
        for s, m in cols:
            v = (results[r].get(s, {}) if s is not None else results[r]).get(m)
            cells.append("–" if v is None else f"{v:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path, name: str = "results") -> tuple[Path, Path]:
    """Write `name.json` and `name.md` (the Markdown table) into out_dir; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    write_json(js, results)
    write_text(md, results_table_markdown(results))
    return js, md
