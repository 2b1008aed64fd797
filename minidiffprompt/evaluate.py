"""Referring-expression evaluation: R@1 / R@5 / UB on val, testA, testB for every trained stage-3 method.

    python -m minidiffprompt evaluate --preset tiny --out runs/tiny            # every RUN/prompts/* + zero-shot
    python -m minidiffprompt evaluate --preset tiny --use_giou true            # the authors' hit test: GIoU

For each expression GLIP returns at most 100 boxes sorted by the phrase score (`head.decode_detections`, as GLIP's
`ATSSPostProcessor`); they are rescaled to the original image (W/S, H/S per axis) and compared with the
ground-truth box: R@1 uses the top box, R@5 the top five, UB any kept box; a hit is IoU >= 0.5 (GIoU with
--use_giou true). Diff-Prompt's DDIM noise is drawn per sample from (seed, dataset index), so the same seed gives
the same numbers (the authors' code draws fresh noise on every forward, test time included, so their results vary
between runs unless the RNG is seeded). Each split also gets R@1 by expression kind (`by_kind`: attribute /
extreme / relation on the synthetic set, "all" on real data) and, for every method, its R@1 minus zero-shot's on
the same expressions with the paired standard error (`vs_zeroshot`); Diff-Prompt's also minus every other
method's (`vs_vpt`, `vs_textprompt`, `vs_full`, `vs_oracle`, ...: `vs_<run folder name>`). Output:
RUN/eval/results.{json,md} and RUN/eval/qualitative.png; on data other than the methods were trained on (`--data`),
RUN/eval-NAME/ instead.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_iou

from .utils.checkpoint import fingerprint
from .utils.files import read_json, write_json, write_text
from .config import Preset
from .data.datasets import RefExpDataset, collate
from .data.synthetic import expression_kind
from .metrics import _hits, evaluate_boxes, results_table_markdown, write_results
from .pipeline import load_glip, load_trained, stage_path
from .prompting import freeze
from .utils.runtime import autocast, pick_device, progress

SEED_STRIDE = 1_000_003  # sample seed = eval seed * stride + dataset index: distinct for every (seed, index)


def sample_seeds(indices, seed: int) -> list[int]:
    return [seed * SEED_STRIDE + int(i) for i in indices]


@torch.no_grad()
def predict(glip, prompter, dataset, preset: Preset, device, batch_size: int | None = None,
            desc: str = "") -> list[dict]:
    """GLIP's ranked boxes for every item: [{"boxes": (K,4) S-frame xyxy, "scores": (K,)}] in dataset order."""
    device = torch.device(device)
    # its own generator: iterating a DataLoader draws a seed, which must not come from the global generator that
    # Diff-Prompt's training noise comes from (a val check would change the run it checks)
    loader = DataLoader(dataset, batch_size=batch_size or preset.eval.batch_size, shuffle=False,
                        collate_fn=collate, generator=torch.Generator())
    was_training = [m.training for m in (glip, prompter) if m is not None]
    glip.eval()
    if prompter is not None:
        prompter.eval()
    out = []
    for batch in progress(loader, desc=desc, leave=False):
        images = batch["image"].to(device)
        seeds = sample_seeds(batch["index"], preset.eval.seed)
        with autocast(device, preset.prompt.amp):
            visual, textual = prompter(images, batch["caption"], seeds, true_masks=batch.get("mask")) \
                if prompter is not None else (None, None)
            preds = glip(images, batch["caption"], visual_prompts=visual, textual_prompts=textual,
                         spans=batch["spans"])
        out += [{"boxes": p["boxes"].float().cpu(), "scores": p["scores"].float().cpu(),
                 "gt": torch.as_tensor(gt, dtype=torch.float32), "size": tuple(size)}
                for p, gt, size in zip(preds, batch["box_orig"], batch["size"])]
    for m, mode in zip([m for m in (glip, prompter) if m is not None], was_training):
        m.train(mode)
    return out


def to_original(boxes: torch.Tensor, size, image_size: int) -> torch.Tensor:
    """S-frame xyxy → original pixels, (W/S, H/S) per axis, no ±1 correction (GLIP's `BoxList.resize`)."""
    w, h = size
    return boxes * torch.tensor([w / image_size, h / image_size, w / image_size, h / image_size])


def score_predictions(preds: list[dict], preset: Preset) -> dict:
    """{"R@1", "R@5", "UB", "n"} in percent, in original pixels (predictions carry their GT box and image size)."""
    boxes = [to_original(p["boxes"], p["size"], preset.data.image_size) for p in preds]
    gt = torch.stack([p["gt"] for p in preds]) if preds else torch.zeros(0, 4)
    return evaluate_boxes(boxes, gt, thr=preset.eval.iou_threshold, use_giou=preset.eval.use_giou)


def item_hits(preds: list[dict], preset: Preset) -> torch.Tensor:
    """(N,) float: 1 where the top box is a hit (original pixels), the per-expression R@1."""
    boxes = [to_original(p["boxes"], p["size"], preset.data.image_size) for p in preds]
    gt = torch.stack([p["gt"] for p in preds]) if preds else torch.zeros(0, 4)
    return _hits(boxes, gt, 1, preset.eval.iou_threshold, preset.eval.use_giou).float()


def expression_kinds(dataset, synthetic: bool) -> list[str]:
    """Per item of a (Subset of a) RefExpDataset: its expression kind on the synthetic set, "all" on real data."""
    base, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else \
        (dataset, range(len(dataset)))
    captions = [base.records[base.items[i][0]]["sentences"][base.items[i][1]]["sent"] for i in indices]
    return [expression_kind(c) if synthetic else "all" for c in captions]


def by_kind(hits: torch.Tensor, kinds: list[str]) -> dict:
    """R@1 in percent per expression kind, and "all"."""
    hits = hits.double()
    out = {k: 100.0 * hits[[x == k for x in kinds]].mean().item() for k in dict.fromkeys(kinds) if k != "all"}
    return {**dict(sorted(out.items())), "all": 100.0 * hits.mean().item()}


def agreement(mask_hits: torch.Tensor, base_hits: torch.Tensor, kinds: list[str]) -> dict:
    """Do the DiT's masks know what the base does not? Per expression kind and "all": how often the generated mask
    hits the referred object (`mask_hits`, e.g. mask IoU >= 0.5) overall, where the zero-shot base misses and where
    it hits (`base_hits`, its R@1 hits on the same items), in percent. Independent errors give the same rate in
    both columns; a mask path can only add what the mask gets right where the base is wrong."""
    def rate(x):
        return 100.0 * x.double().mean().item() if len(x) else float("nan")

    out = {}
    for kind in [*sorted(set(kinds) - {"all"}), "all"]:
        sel = torch.tensor([kind == "all" or k == kind for k in kinds])
        m, b = mask_hits[sel].bool(), base_hits[sel].bool()
        out[kind] = {"n": int(sel.sum()), "mask": rate(m), "base": rate(b),
                     "mask_where_base_misses": rate(m[~b]), "mask_where_base_hits": rate(m[b])}
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """R@1 of a minus R@1 of b on the same expressions, with the standard error of that paired difference
    (sd of the per-item differences / √n), both in points."""
    d = (a - b).double() * 100.0
    return {"diff": d.mean().item(), "se": (d.std() / len(d) ** 0.5).item() if len(d) > 1 else float("nan")}


def split_dataset(data: Path, split: str, preset: Preset, max_items: int = 0, masks: bool = False):
    """The split's expressions (the first `max_items`); with `masks`, each item carries its object's true mask."""
    dataset = RefExpDataset(data, split, preset.data.image_size, mask_size=preset.data.mask_size if masks else None)
    if max_items and max_items < len(dataset):
        dataset = Subset(dataset, range(max_items))
    return dataset


def evaluate_split(glip, prompter, data: Path, split: str, preset: Preset, device, max_items: int = 0) -> dict:
    """Metrics of one (GLIP, prompt module) pair on one split."""
    oracle = bool(getattr(getattr(prompter, "cfg", None), "oracle_masks", False))
    dataset = split_dataset(data, split, preset, max_items, masks=oracle)
    return score_predictions(predict(glip, prompter, dataset, preset, device, desc=split), preset)


# ----------------------------------------------------------------------------------------------------------------


def eval_folder(out: Path, data: Path, trained_on: list) -> Path:
    """RUN/eval for the data the run's methods were trained on (their config.json records its fingerprint); for
    other data RUN/eval-NAME, NAME the data folder's, so that an evaluation elsewhere never replaces the run's own
    results. Without trained methods, RUN/eval holds whichever data it was first evaluated on."""
    own = Path(out) / "eval"
    here = json.loads(json.dumps(fingerprint(data)))
    if not trained_on and (own / "zeroshot.json").exists():
        trained_on = [read_json(own / "zeroshot.json").get("stamp", {}).get("data")]
    if not trained_on or here in trained_on:
        return own
    name = (data.parent if data.name == "processed" else data).resolve().name
    other = Path(out) / f"eval-{name}"
    print(f"[evaluate] {data} is not the data the methods in {out} were trained on: results go to {other}",
          flush=True)
    return other


def trained_methods(out: Path) -> list[Path]:
    """Finished stage-3 run folders under RUN/prompts (config.json written at the end of training)."""
    root = Path(out) / "prompts"
    return sorted(p for p in root.glob("*") if (p / "config.json").exists()) if root.exists() else []


# how the report, the figure and the notebooks name each method (and, for the demo's report, their row order)
LABELS = {"zeroshot": "zero-shot GLIP (frozen base)", "vpt": "VPT-deep (visual prompts)",
          "textprompt": "deep text prompts", "full": "full fine-tuning", "diffprompt": "Diff-Prompt",
          "oracle": "Diff-Prompt fed the true mask (oracle)",
          "windows": "Diff-Prompt, tokens per window (not the paper's)",
          "oracle-windows": "Diff-Prompt, tokens per window, fed the true mask (oracle)"}


def label_order(method: str) -> tuple:
    """Tables and figures list the methods of LABELS in its order, any other after them by name."""
    order = list(LABELS)
    return (order.index(method), "") if method in order else (len(order), method)


def qualitative_figure(samples: dict, dataset, indices: list[int], preset: Preset, path: Path,
                       masks: torch.Tensor | None = None) -> Path:
    """A grid: one column per expression `indices[j]`, one row per method with its top box (`samples[method][j]`),
    green where it hits the referred object (IoU ≥ the evaluation threshold), red where it misses; the ground-truth
    box dashed. Given `masks` (n, M, M), a first row shows the DiT's generated mask for each expression in white."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    rows = (["mask"] if masks is not None else []) + list(samples)
    n = len(indices)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.8 * n + 1.6, 1.8 * len(rows) + 0.9), squeeze=False)
    for j in range(n):
        item = dataset[indices[j]]
        S, gt = item["image"].shape[-1], item["box"]
        axes[0, j].set_title("\n".join(textwrap.wrap(item["caption"], 24)), fontsize=8)
        for r, row in enumerate(rows):
            ax = axes[r, j]
            ax.imshow(item["image"].permute(1, 2, 0).numpy(), extent=(0, S, S, 0))
            if row == "mask":       # the DiT's mask, stretched over the image as the adapters see it
                m = masks[j].clamp(0, 1).numpy()
                ax.imshow(np.stack([m] * 3 + [0.6 * m], -1), extent=(0, S, S, 0))
            else:
                boxes = torch.as_tensor(samples[row][j]["boxes"]).reshape(-1, 4)
                if len(boxes):
                    hit = box_iou(boxes[:1].float(), gt[None].float())[0, 0] >= preset.eval.iou_threshold
                    x1, y1, x2, y2 = boxes[0].tolist()
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2,
                                           ec="limegreen" if hit else "red"))
            x1, y1, x2, y2 = gt.tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=1, ec="black"))
            ax.set_xticks([]); ax.set_yticks([])
            if j == 0:
                label = "the DiT's mask" if row == "mask" else LABELS.get(row, row)
                ax.set_ylabel("\n".join(textwrap.wrap(label, 18)), fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, fill=False, ls="--", ec="black", label="ground truth"),
               Rectangle((0, 0), 1, 1, fill=False, lw=2, ec="limegreen", label="top box: a hit"),
               Rectangle((0, 0), 1, 1, fill=False, lw=2, ec="red", label="top box: a miss")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (1.8 * len(rows) + 0.9), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def main(preset: Preset, data: Path, out: Path, resume: bool = True) -> dict:
    """Evaluate zero-shot GLIP and every finished method in RUN/prompts; returns {method: {split: metrics}}."""
    device = pick_device(getattr(preset, "device", "auto"))
    ev = preset.eval
    runs = [("zeroshot", None)] + [(p.name, p) for p in trained_methods(out) if p.name != "zeroshot"]
    configs = {name: read_json(folder / "config.json") for name, folder in runs[1:]}
    eval_dir = eval_folder(out, data, [c["config"].get("data") for c in configs.values()])
    eval_dir.mkdir(parents=True, exist_ok=True)
    settings = {"eval": dataclasses.asdict(ev), "image_size": preset.data.image_size, "amp": preset.prompt.amp,
                "glip": preset.prompt.glip_weights,
                "glip_files": fingerprint(stage_path(preset.prompt, out, "glip")),
                "data": fingerprint(data), "format": 4}
    oracle = any(c["prompt"].get("oracle_masks") for c in configs.values())
    datasets = {s: split_dataset(data, s, preset, ev.max_items, masks=oracle) for s in ev.splits}
    kinds = {s: expression_kinds(d, synthetic=preset.name == "tiny") for s, d in datasets.items()}
    # the figure: the first six expressions of the first split that pick their object by position (synthetic set)
    first = ev.splits[0]
    shown = ([i for i, k in enumerate(kinds[first]) if k in ("extreme", "relation")] or list(range(len(kinds[first]))))[:6]
    results, samples, hits = {}, {}, {}
    for name, folder in runs:
        cache = eval_dir / f"{name}.json"
        stamp = {**settings, "run": configs.get(name),
                 "weights_mtime": (folder / "model.safetensors").stat().st_mtime
                 if folder and (folder / "model.safetensors").exists() else None}
        stamp = json.loads(json.dumps(stamp))      # tuples → lists: compares equal to the stored one
        cached = read_json(cache) if resume and cache.exists() else {}
        if cached.get("stamp") == stamp:
            results[name] = cached["results"]
            hits[name] = {s: torch.tensor(h, dtype=torch.float) for s, h in cached["hits"].items()}
            samples[name] = [{"boxes": torch.tensor(b).reshape(-1, 4)} for b in cached["samples"]]
            continue
        if folder is None:
            glip, prompter = freeze(load_glip(preset, out)), None
        else:
            glip, prompter = load_trained(preset, out, folder)
        glip.to(device)
        if prompter is not None:
            prompter.to(device)
        results[name], hits[name] = {}, {}
        for split, dataset in datasets.items():
            preds = predict(glip, prompter, dataset, preset, device, desc=f"{name} {split}")
            hits[name][split] = item_hits(preds, preset)
            results[name][split] = {**score_predictions(preds, preset),
                                    "by_kind": by_kind(hits[name][split], kinds[split])}
            if split == ev.splits[0]:
                samples[name] = [preds[i] for i in shown]
        print(f"[evaluate] {name}: " + ", ".join(f"{s} R@1 {r['R@1']:.1f}" for s, r in results[name].items()),
              flush=True)
        write_json(cache, {"stamp": stamp, "results": results[name],
                           "hits": {s: h.int().tolist() for s, h in hits[name].items()},
                           "samples": [p["boxes"][:1].tolist() for p in samples[name]]})
    for name in results:          # every method against the frozen base, Diff-Prompt against every method
        for split in results[name]:
            for other in results:
                if other != name and (other == "zeroshot" or name == "diffprompt"):
                    results[name][split][f"vs_{other}"] = paired_difference(hits[name][split], hits[other][split])
    write_results(results, eval_dir)
    kinds_md = results_table_markdown({m: r[first]["by_kind"] for m, r in results.items()},
                                      metrics=tuple(results["zeroshot"][first]["by_kind"]))
    write_text(eval_dir / "results.md", (eval_dir / "results.md").read_text() + f"\n{first} R@1 by expression "
               "kind:\n\n" + kinds_md)
    masks = None
    if "diffprompt" in results:   # the DiT's final sample for each shown expression, with the evaluation's seeds
        _, prompter = load_trained(preset, out, Path(out) / "prompts" / "diffprompt")
        if getattr(prompter, "needs_masks", False):
            prompter.to(device)
            batch = collate([datasets[first][i] for i in shown])
            masks = prompter.sample_masks(batch["image"].to(device), batch["caption"],
                                          sample_seeds(batch["index"], ev.seed))[0, :, 0].float().cpu()
    samples = dict(sorted(samples.items(), key=lambda kv: label_order(kv[0])))
    qualitative_figure(samples, datasets[first], shown, preset, eval_dir / "qualitative.png", masks)
    print(results_table_markdown(results), flush=True)
    return results
