"""How strong is the frozen base? Detection, zero-shot referring by expression kind, and where position lives.

    python -m minidiffprompt eval-base --preset tiny --out base.json                   # the shipped tiny GLIP
    python -m minidiffprompt eval-base --preset tiny --glip_weights runs/tiny/glip --out base.json
    python -m minidiffprompt eval-base --preset tiny --probe --out base.json          # + the position probe
    python -m minidiffprompt eval-base --preset paper --glip_weights random --image_size 224 \
        --data data/synthref/processed --out probe.json    # the probe alone, on a randomly initialised GLIP

Writes {"detection_R@1", "referring_R@1": {"attribute", "extreme", "relation", "all"}} in percent:
  detection   held-out detection images (the last `holdout_fraction` of `detection.json`, never trained on): the
              prompt names every category, the query is a category that occurs exactly once, R@1 at IoU ≥ 0.5;
  referring   the whole val split, zero-shot, by expression kind on the synthetic set (`synthetic.expression_kind`;
              on real data every expression is "all").
With --probe, also `position_R2`: how well a linear map recovers a box centre from the region features that
score it (the DyHead output at the box's ATSS positives), on held-out images, over all positives and per pyramid
level. GLIP-T(A) has no vision-language fusion, so a caption can only pick "the leftmost star" if those features
carry where they are; `position_words` is the R@1 of phrases naming a half of the image ("left star") among
objects of the same shape, which the head can only get right if it reads them. On the synthetic set --probe also
measures `colour_probe`: how well each depth of the network (pixels, Swin, FPN, DyHead) still tells the object's
colour, the attribute most attribute-only expressions turn on.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..utils.files import write_json
from ..utils.runtime import pick_device, seed_everything
from ..config import Preset
from ..data.datasets import glip_normalize
from ..glip.atss import atss_assign
from ..glip.model import GLIP
from ..pipeline import load_glip
from ..evaluate import by_kind, expression_kinds, item_hits, predict, split_dataset
from .train_glip import detection_recall, halves, holdout_indices, load_detection, query_recall


def referring_by_kind(model, data: Path, split: str, preset: Preset, device) -> dict:
    """Zero-shot R@1 in percent per expression kind and "all", and the count per kind, through the same
    prediction and scoring as `evaluate` (no prompts)."""
    dataset = split_dataset(data, split, preset)
    hits = item_hits(predict(model, None, dataset, preset, device, desc=f"zero-shot {split}"), preset)
    kinds = expression_kinds(dataset, synthetic=preset.name == "tiny")
    return {**by_kind(hits, kinds), "n": {k: kinds.count(k) for k in sorted(set(kinds))} | {"all": len(kinds)}}


@torch.no_grad()
def region_features(model, images01: torch.Tensor, boxes: list[torch.Tensor], batch_size: int = 16):
    """(features (P, C), box centres (P, 2) in [0, 1], image index (P,), pyramid level (P,): 0 = P3) at every ATSS
    positive of every box.

    The features are what the head dots with the token features (`head.GroundingHead`): the DyHead output, level
    by level, flattened in the head's order; ATSS picks the positives exactly as in training (`atss.atss_assign`).
    """
    model.eval()
    S = images01.shape[-1]
    feats_out, centres, owner, level = [], [], [], []
    for k in range(0, len(images01), batch_size):
        x = images01[k:k + batch_size]
        feats = model.rpn.head.tower(model.backbone.fpn(model.backbone.body(glip_normalize(x))))
        anchors = model.rpn.anchor_generator([tuple(f.shape[-2:]) for f in feats])
        per_level = [a.shape[0] for a in anchors]
        ends = torch.tensor(per_level).cumsum(0)                                    # where each level's anchors end
        all_anchors = torch.cat(anchors)
        flat = torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)          # (b, A, C)
        for j in range(len(x)):
            gt = boxes[k + j].float()
            idx = atss_assign(all_anchors, per_level, gt, model.cfg.atss_topk)
            pos = torch.nonzero(idx >= 0).squeeze(1)
            g = gt[idx[pos]]
            feats_out.append(flat[j, pos])
            centres.append(torch.stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2], 1) / S)
            owner.append(torch.full((len(pos),), k + j))
            level.append(torch.bucketize(pos, ends, right=True))
    return torch.cat(feats_out).double(), torch.cat(centres).double(), torch.cat(owner), torch.cat(level)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, tr: torch.Tensor, ridge: float = 1e-3):
    """Ridge regression of y on x fitted on the rows `tr`: x standardised with those rows' statistics, a bias
    column added, penalty ridge × (number of training rows). Returns (the design matrix of every row, weights)."""
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp(min=1e-8)
    a = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eye = torch.eye(a.shape[1], dtype=x.dtype) * ridge * tr.sum()
    return a, torch.linalg.solve(a[tr].T @ a[tr] + eye, a[tr].T @ y[tr])


def linear_probe_r2(x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor, ridge: float = 1e-3,
                    train_fraction: float = 0.7) -> float:
    """Held-out R² (mean over y's columns) of a ridge regression fitted on the first `train_fraction` of the images
    and scored on the rest. Features are standardised with the training statistics."""
    images = owner.unique()
    if len(images) < 4:
        raise ValueError(f"the position probe needs at least 4 images with boxes, got {len(images)}")
    cut = images[int(len(images) * train_fraction)]
    tr, te = owner < cut, owner >= cut
    a, w = ridge_fit(x, y, tr, ridge)
    resid = ((a[te] @ w - y[te]) ** 2).sum(0)
    total = ((y[te] - y[te].mean(0)) ** 2).sum(0)
    return float((1 - resid / total).mean())


def position_probe(model, images01: torch.Tensor, boxes: list[torch.Tensor]) -> dict:
    """Held-out R² over all positives, and level by level (`by_level`, with each level's share of the positives;
    None where a level has positives in fewer than 4 images): where in the pyramid position survives."""
    x, y, owner, level = region_features(model, images01, boxes)
    by_level = {}
    for lv in range(int(level.max()) + 1):
        on = level == lv
        r2 = linear_probe_r2(x[on], y[on], owner[on]) if len(owner[on].unique()) >= 4 else None
        by_level[f"P{lv + 3}"] = {"R2": r2, "share": round(float(on.double().mean()), 3)}
    return {"R2": linear_probe_r2(x, y, owner), "by_level": by_level, "positives": len(x),
            "images": len(images01)}


@torch.no_grad()
def position_words(model, images01: torch.Tensor, targets, batch_size: int = 64) -> dict:
    """R@1 (IoU ≥ 0.5) of half-image phrases ("left star", "bottom circle"; `train_glip.halves`) on images where the
    named half holds exactly one object of that shape and the other half at least one more: whether the head reads
    position words at all. A head blind to them picks among the shapes by other cues (about one in two)."""
    S = images01.shape[-1]
    queries = []
    for i, (boxes, cats, _) in enumerate(targets):
        where = [halves(b, S) for b in boxes]
        for axis in (0, 1):
            for j, c in enumerate(cats):
                same = [k for k, ck in enumerate(cats) if ck == c]
                if len(same) >= 2 and [k for k in same if where[k][axis] == where[j][axis]] == [j]:
                    phrase = f"{where[j][axis]} {c}"
                    queries.append((i, phrase, [[0, len(phrase)]], boxes[j]))
    if not queries:
        return {"R@1": None, "n": 0}
    r1, n = query_recall(model, images01, queries, next(model.parameters()).device, batch_size)
    return {"R@1": r1, "n": n}


@torch.no_grad()
def colour_probe(model, images01: torch.Tensor, boxes: list[torch.Tensor], colours: list[list[str]],
                 batch_size: int = 16) -> dict:
    """Where the colour of an object is lost: held-out accuracy (percent) of a linear classifier of the object's
    colour word from the features at its box centre, at four depths: the input pixels, the Swin output at stride 8
    (C3), the FPN output P3 and the DyHead output on P3 (what the head dots with the words). Chance is about one
    over the number of colours. Fitted on the first 70 % of the images, scored on the rest."""
    model.eval()
    names = sorted({c for cs in colours for c in cs})
    feats = {"pixels": [], "swin_C3": [], "fpn_P3": [], "dyhead_P3": []}
    labels, owner = [], []
    S = images01.shape[-1]
    for k in range(0, len(images01), batch_size):
        x = images01[k:k + batch_size]
        swin = model.backbone.body(glip_normalize(x))
        fpn = model.backbone.fpn(swin)
        dy = model.rpn.head.tower(fpn)
        maps = {"pixels": x, "swin_C3": swin[1], "fpn_P3": fpn[0], "dyhead_P3": dy[0]}
        for j in range(len(x)):
            b = boxes[k + j].float()
            centre = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1) / S * 2 - 1   # grid in [-1, 1]
            for name, m in maps.items():
                sampled = F.grid_sample(m[j:j + 1].float(), centre[None, :, None], align_corners=False)
                feats[name].append(sampled[0, :, :, 0].T.double())                             # (G, C)
            labels += [names.index(c) for c in colours[k + j]]
            owner += [k + j] * len(b)
    y, owner = torch.tensor(labels), torch.tensor(owner)
    cut = owner.unique()[int(len(owner.unique()) * 0.7)]
    tr, te = owner < cut, owner >= cut
    result = {}
    for name, f in feats.items():
        a, w = ridge_fit(torch.cat(f), F.one_hot(y, len(names)).double(), tr)
        result[name] = round(100 * float(((a[te] @ w).argmax(1) == y[te]).double().mean()), 1)
    return {"accuracy": result, "colours": len(names), "names": names, "objects": len(y)}


@torch.no_grad()
def colour_words(model, colours: list[str], template: str = "the small {} star") -> dict:
    """The text side of colour: how alike the language backbone makes the colour words. Each colour goes into
    `template`; returns the mean cosine similarity over all pairs of colours of the features at the colour word,
    as the language backbone outputs them (`bert`) and as the head dots them with the regions (`head`, its τ):
    near 1 means the head cannot tell "red" from "green" whatever the regions carry."""
    model.eval()
    captions = [template.format(c) for c in colours]
    embedded, _ = model.encode_text(captions)                                   # (K, T, D)
    first = len(model.tokenizer(template.split("{}")[0].strip())["input_ids"]) - 1     # [CLS] + prefix, no [SEP]
    bert = embedded[:, first]                                                   # (K, D), the colour's first piece
    head, _ = model.rpn.head.token_side(bert)                                   # (K, C), the head's τ
    off = ~torch.eye(len(colours), dtype=torch.bool)

    def mean_cos(v):
        v = F.normalize(v, dim=-1)
        return round(float((v @ v.T)[off].mean()), 3)
    return {"bert": mean_cos(bert), "head": mean_cos(head), "colours": colours, "template": template}


def main(preset: Preset, data: Path, out: Path, probe: bool = False) -> dict:
    """Evaluate the base GLIP of `preset` (its --glip_weights, the shipped one by default) and write `out`."""
    t0 = time.time()
    device = pick_device(getattr(preset, "device", "auto"))
    S = preset.data.image_size
    images, targets, categories, _ = load_detection(Path(data), S)
    _, hold = holdout_indices(len(images), preset.glip.holdout_fraction)
    if preset.prompt.glip_weights == "random":     # the architecture alone: only the probe means anything
        seed_everything(preset.glip.seed)
        model = GLIP(preset.glip, vocab_file=Path(data) / "vocab.txt").eval()
        result = {"position_R2": position_probe(model, images[hold], [targets[i][0] for i in hold]),
                  "weights": "random initialisation", "image_size": S, "seconds": round(time.time() - t0, 1)}
        print(f"eval-base: position probe R² {result['position_R2']['R2']:.3f} (random weights, {S} px)")
        write_json(out, result)
        return result
    model = load_glip(preset, Path(out).parent).to(device).eval()
    det = detection_recall(model, images[hold], [targets[i] for i in hold], categories, device)
    ref = referring_by_kind(model, Path(data), "val", preset, device)
    result = {"detection_R@1": det["R@1"], "detection_queries": det["n"],
              "referring_R@1": {k: v for k, v in ref.items() if k != "n"}, "referring_expressions": ref["n"]}
    if probe:
        result["position_R2"] = position_probe(model.cpu(), images[hold], [targets[i][0] for i in hold])
        result["position_words"] = position_words(model, images[hold], [targets[i] for i in hold])
        if all(len(a) == 2 for i in hold for a in targets[i][2]):    # synthetic: [size, colour] per object
            result["colour_probe"] = colour_probe(model, images[hold], [targets[i][0] for i in hold],
                                                  [[a[1] for a in targets[i][2]] for i in hold])
            result["colour_words"] = colour_words(model, result["colour_probe"]["names"])
    result["seconds"] = round(time.time() - t0, 1)
    print(f"eval-base: detection R@1 {det['R@1']:.1f} ({det['n']} held-out queries); zero-shot referring R@1 on val "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["referring_R@1"].items())
          + (f"; position probe R² {result['position_R2']['R2']:.3f} (" + ", ".join(
              f"{k} {v['R2']:.2f} at {100 * v['share']:.0f} % of the positives"
              for k, v in result['position_R2']['by_level'].items() if v['R2'] is not None) + ")"
             + (f"; half-image phrases R@1 {result['position_words']['R@1']:.1f} ({result['position_words']['n']})"
                if result['position_words']['n'] else "")
             if probe else "")
          + (f"; colour probe accuracy (%) {result['colour_probe']['accuracy']}; colour words' mean cosine "
             f"{result['colour_words']['bert']} (language backbone), {result['colour_words']['head']} (head)"
             if "colour_probe" in result else ""))
    write_json(out, result)
    return result
