"""Figures of dataset samples: image, ground-truth box, mask outline, caption with its positive span marked."""
from __future__ import annotations

import textwrap

import numpy as np
import torch
import torch.nn.functional as F


def mark_spans(caption: str, spans) -> str:
    """'the small red circle', [[4, 20]] → 'the [small red circle]'."""
    out, last = "", 0
    for b, e in sorted(spans):
        if b < last:
            continue
        out += caption[last:b] + "[" + caption[b:e] + "]"
        last = e
    return out + caption[last:]


def plot_samples(dataset, n: int = 6, ax=None, seed: int = 0, cols: int = 3):
    """Plot n random items of a RefExpDataset (box, mask, caption) or DetectionDataset (boxes, categories).

    ax: an array of at least n matplotlib axes, or None to make a new figure. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    if ax is None:
        rows = (len(idx) + cols - 1) // cols
        fig, ax = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    axes = np.asarray(ax).reshape(-1)
    fig = axes[0].figure
    for a, i in zip(axes, idx):
        item = dataset[i]
        img = item["image"].permute(1, 2, 0).numpy()  # (S, S, 3)
        a.imshow(img)
        size = img.shape[0]
        if "mask" in item:  # the mask, resized to the image frame, as a white outline (keeps colours readable)
            m = F.interpolate(item["mask"][None], size=(size, size), mode="bilinear")[0, 0].numpy()
            a.contour(m, levels=[0.5], colors="white", linewidths=1.2)
        boxes = item["box"][None] if "box" in item else item["boxes"]
        names = item.get("categories", [None] * len(boxes))
        for (x0, y0, x1, y1), name in zip(boxes.tolist(), names):
            a.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
            if name:
                a.text(x0, y0, name, color="black", fontsize=6, backgroundcolor="lime", va="bottom")
        title = mark_spans(item["caption"], item["spans"]) if "box" in item else f"{len(boxes)} objects"
        a.set_title("\n".join(textwrap.wrap(title, 32)), fontsize=8)
        a.set_axis_off()
    for a in axes[len(idx):]:
        a.set_axis_off()
    fig.tight_layout()
    return fig
