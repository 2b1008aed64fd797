"""Synthetic RefCOCO: coloured shapes on textured backgrounds, written in the raw RefCOCO (UNC) layout.

    python data_prep.py synthetic --out data/synthref          # or, from Python:
    root = ensure_synthetic("data/synthref")                   # → data/synthref/processed (the data root)

Written files (the layout of the `refer` toolkit + COCO + MDETR, so `refcoco.convert_refcoco` reads them exactly
as it reads the real data):

    DIR/refcoco/refs(unc).p                         refer records: ref_id, ann_id, image_id, category_id, split,
                                                    sentences [{sent_id, raw, sent, tokens}], sent_ids, file_name
    DIR/refcoco/instances.json                      COCO images / annotations (polygon segmentation, xywh bbox)
    DIR/train2014/COCO_train2014_%012d.jpg          the images
    DIR/mdetr_annotations/finetune_refcoco_{split}.json   one entry per expression, tokens_positive = char spans
    DIR/processed/                                  the converted split files (see refcoco.py)

Scenes: 3-6 mostly non-overlapping objects, shape × colour × size. Every expression is checked to single out
its object among all objects of the scene: by attributes ("the big green star"), by an extreme position
("the leftmost triangle") or by a relation to another uniquely described object ("the small red circle left
of the blue square"). The positive span (MDETR's tokens_positive) is the referred object's noun phrase: its
attribute words and shape noun ("small red circle"); position words and the landmark are outside it.
Each annotation also lists the object's attribute words ("attributes": [size, colour], as Visual Genome's
attribute annotations do), which only the detection pre-training reads. Splits are by image, like UNC: train 70 %,
val 10 %, testA 10 %, testB 10 %. As RefCOCO's testA refers only to people and testB only to other objects, testA
refers only to round shapes (circle, oval, heart) and testB only to angular ones; train and val refer to both.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils.files import write_text
from .refcoco import MARKER, PENDING, DataError, convert_refcoco, is_complete, read_json

# COCO-like category ids; group "round" plays the role of RefCOCO's people (testA), "angular" the rest (testB)
CATEGORIES = [(1, "circle", "round"), (2, "oval", "round"), (3, "heart", "round"), (4, "square", "angular"),
              (5, "triangle", "angular"), (6, "star", "angular"), (7, "diamond", "angular"), (8, "cross", "angular")]
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (235, 205, 35),
           "purple": (135, 60, 185), "orange": (245, 135, 25)}
SIZES = {"small": (0.13, 0.17), "big": (0.24, 0.30)}   # object extent as a fraction of the image side
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("testA", 0.1), ("testB", 0.1))
RELATIONS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
             "above": ("above",), "below": ("below", "under")}
EXTREMES = {"left": ("leftmost", "on the left"), "right": ("rightmost", "on the right"),
            "above": ("top", "at the top"), "below": ("bottom", "at the bottom")}
MARGIN = 3.0  # px: spatial statements must hold (and fail for the others) by at least this much
MIN_SIZE = 32  # px: below it a scene no longer fits its 3 shapes apart, and small shapes shrink to a few pixels

_GROUP = {name: group for _, name, group in CATEGORIES}
_CAT_ID = {name: cid for cid, name, _ in CATEGORIES}


# ----------------------------------------------------------------------------------------------------------------
# Shapes: polygons in a unit frame [-1, 1]², y down


def _unit_polygon(shape: str) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    if shape == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "oval":
        return np.stack([np.cos(t), 0.6 * np.sin(t)], 1)
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = np.stack([x, y], 1)
        return (p - (p.max(0) + p.min(0)) / 2) / (np.abs(p).max() * 1.0)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.85
    if shape == "triangle":
        return np.array([[0, -1], [1, 0.8], [-1, 0.8]], float)
    if shape == "star":
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "diamond":
        return np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]], float)
    if shape == "cross":
        a, b = 1.0, 0.34
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]], float)
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-saturation texture: smooth noise + one of stripes / checks / speckle. (size, size, 3) float."""
    base = rng.uniform(110, 200) + rng.uniform(-18, 18, size=3)
    grid = rng.normal(0, 1, (6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
    img = base + 16 * smooth[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:    # stripes at a random angle
        ang, period = rng.uniform(0, math.pi), rng.uniform(6, 16)
        img = img + 10 * np.sin(2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)[..., None]
    elif kind == 1:  # checks
        cell = int(rng.integers(8, 20))
        img = img + 9 * (((xx // cell + yy // cell) % 2) * 2 - 1)[..., None]
    img = img + rng.normal(0, 6, (size, size, 1))  # speckle (grey, so colours stay readable)
    return np.clip(img, 0, 255)


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def scene_objects(seed: int, index: int, size: int, split: str) -> list[dict]:
    """The objects of image `index` (shape, colour, size, points, box, cx, cy), in annotation order."""
    return _make_objects(np.random.default_rng([seed, index]), size, {"testA": "round", "testB": "angular"}.get(split))


def _make_objects(rng: np.random.Generator, size: int, need_group: str | None) -> list[dict]:
    """3-6 objects; shapes and colours drawn from small per-scene pools so that distractors share attributes."""
    n = int(rng.integers(3, 7))
    names = [c[1] for c in CATEGORIES]
    shapes = list(rng.choice(names, size=int(rng.integers(2, 4)), replace=False))
    colours = list(rng.choice(list(COLOURS), size=int(rng.integers(2, 4)), replace=False))
    if need_group is not None:  # testA/testB scenes: at least two objects of the referred group
        group = [s for s in names if _GROUP[s] == need_group]
        shapes[0] = str(rng.choice(group))
    objs, boxes = [], []
    for k in range(n * 6):  # rejection sampling of positions, a few tries per object
        if len(objs) == n:
            break
        shape = shapes[0] if (need_group and len(objs) < 2) else str(rng.choice(shapes))
        sz = "big" if rng.random() < 0.4 else "small"
        extent = rng.uniform(*SIZES[sz]) * size
        poly = _unit_polygon(shape)
        ang = rng.uniform(-0.2, 0.2) if shape not in ("circle", "heart") else 0.0
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        poly = poly @ rot.T
        poly = poly / np.abs(poly).max() * extent / 2  # longest half-extent = extent / 2
        lo, hi = poly.min(0), poly.max(0)
        cx = rng.uniform(2 - lo[0], size - 2 - hi[0])
        cy = rng.uniform(2 - lo[1], size - 2 - hi[1])
        pts = poly + [cx, cy]
        box = (*pts.min(0), *pts.max(0))
        if any(box[0] < b[2] + 3 and b[0] < box[2] + 3 and box[1] < b[3] + 3 and b[1] < box[3] + 3 for b in boxes):
            continue
        boxes.append(box)
        objs.append({"shape": shape, "colour": str(rng.choice(colours)), "size": sz, "points": pts,
                     "box": box, "cx": (box[0] + box[2]) / 2, "cy": (box[1] + box[3]) / 2})
    return objs


def _render(rng: np.random.Generator, size: int, objs: list[dict]) -> Image.Image:
    """Background + anti-aliased shapes (drawn at 2× and box-filtered down)."""
    bg = Image.fromarray(_background(rng, size).astype(np.uint8)).convert("RGBA")
    layer = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for o in objs:
        rgb = np.clip(np.array(COLOURS[o["colour"]]) + rng.integers(-12, 13, 3), 0, 255)
        edge = tuple(int(c) for c in rgb * 0.6) + (255,)
        draw.polygon([tuple(p) for p in (o["points"] * 2).tolist()], fill=tuple(int(c) for c in rgb) + (255,),
                     outline=edge, width=2)
    layer = layer.convert("RGBa").resize((size, size), Image.BOX).convert("RGBA")
    return Image.alpha_composite(bg, layer).convert("RGB")


# ----------------------------------------------------------------------------------------------------------------
# Referring expressions, each verified to single out its object


def _np_options(o: dict) -> list[tuple[str, ...]]:
    """Noun phrases for an object, fewest modifiers first: (shape,), (colour, shape), (size, shape), all three."""
    return [(o["shape"],), (o["colour"], o["shape"]), (o["size"], o["shape"]), (o["size"], o["colour"], o["shape"])]


def _matches(np_: tuple[str, ...], o: dict) -> bool:
    return all(w in (o["shape"], o["colour"], o["size"]) for w in np_)


def _side(a: dict, b: dict, rel: str) -> float:
    """How far a lies beyond b in direction rel (> 0: a is entirely on that side of b, in px)."""
    if rel == "left":
        return b["box"][0] - a["box"][2]
    if rel == "right":
        return a["box"][0] - b["box"][2]
    if rel == "above":
        return b["box"][1] - a["box"][3]
    return a["box"][1] - b["box"][3]


def _coord(o: dict, rel: str) -> float:
    return {"left": -o["cx"], "right": o["cx"], "above": -o["cy"], "below": o["cy"]}[rel]


def _candidates(t: dict, objs: list[dict]) -> list[tuple[str, str, str]]:
    """All verified expressions for target t: (kind, sentence, head phrase)."""
    out = []
    unique = [p for p in _np_options(t) if [o for o in objs if _matches(p, o)] == [t]]
    for p in unique[:2]:  # attributes alone
        out.append(("attr", "the " + " ".join(p), " ".join(p)))
    for p in _np_options(t)[:3]:  # extreme position among the objects the phrase matches
        group = [o for o in objs if _matches(p, o)]
        if len(group) < 2:
            continue
        for rel, (adj, post) in EXTREMES.items():
            others = [_coord(o, rel) for o in group if o is not t]
            if _coord(t, rel) > max(others) + 3 * MARGIN:  # clearly the extreme one, not by a hair
                head = " ".join(p)
                if len(p) == 1 or rel in ("left", "right"):  # "the top big triangle" reads badly
                    out.append(("extreme", f"the {adj} {head}", head))
                if len(group) == 2 or rel in ("above", "below"):  # "at the top" = topmost; "on the left" of 2
                    out.append(("extreme", f"the {head} {post}", head))
    for lm in objs:  # relation to a landmark that is itself described uniquely by attributes
        if lm is t:
            continue
        lm_np = next((p for p in _np_options(lm) if [o for o in objs if _matches(p, o)] == [lm]), None)
        if lm_np is None:
            continue
        for p in _np_options(t)[:3]:
            group = [o for o in objs if _matches(p, o) and o is not lm]
            if len(group) < 2 and len(p) > 1:  # a bare shape noun may take a relation even when unique
                continue
            for rel, words in RELATIONS.items():
                if _side(t, lm, rel) < MARGIN:
                    continue
                # every other candidate must fail even the loosest reading (its centre beyond the landmark's)
                if any(_coord(o, rel) > _coord(lm, rel) - MARGIN for o in group if o is not t):
                    continue
                head = " ".join(p)
                for w in words:
                    out.append(("relation", f"the {head} {w} the {' '.join(lm_np)}", head))
    return out


def expression_kind(sentence: str) -> str:
    """Which of the generator's three grammars wrote `sentence`: "relation" (to a landmark: "... left of the
    blue square", "... above the ..."), "extreme" ("the leftmost star", "the oval at the top") or "attribute"."""
    words = f" {sentence.lower()} "
    if any(f" {w} the " in words for w in ("of", "above", "below", "under")):
        return "relation"
    if any(f" {w} " in words for w in ("leftmost", "rightmost", "top", "bottom", "left", "right")):
        return "extreme"
    return "attribute"


def _pick_expressions(rng: np.random.Generator, cands: list) -> list[tuple[str, str]]:
    """2-3 distinct expressions: one of each available kind (attr / extreme / relation) first, then any."""
    if not cands:
        return []
    want = int(rng.integers(2, 4))
    order = rng.permutation(len(cands))
    chosen, kinds = [], set()
    for i in order:  # one of each kind first
        kind, sent, head = cands[i]
        if kind not in kinds and sent not in [c[0] for c in chosen]:
            chosen.append((sent, head))
            kinds.add(kind)
    for i in order:
        kind, sent, head = cands[i]
        if sent not in [c[0] for c in chosen]:
            chosen.append((sent, head))
    return chosen[:want]


# ----------------------------------------------------------------------------------------------------------------
# Writing the raw RefCOCO layout


def _split_of_images(n: int, seed: int) -> list[str]:
    counts = [round(n * f) for _, f in SPLIT_FRACTIONS[1:]]
    names = ["val", "testA", "testB"]
    order = np.random.default_rng([seed, 7]).permutation(n)
    split = ["train"] * n
    start = 0
    for name, c in zip(names, counts):
        for i in order[start:start + c]:
            split[i] = name
        start += c
    return split


def check_settings(images: int, size: int) -> None:
    """A one-line error for settings the generator cannot make a set with, before anything is written."""
    if images < 1:
        raise DataError(f"--images {images}: the synthetic set needs at least 1 image (the default is 1200)")
    if size < MIN_SIZE:
        raise DataError(f"--size {size}: images must be at least {MIN_SIZE} px a side for a scene's 3-6 shapes to "
                        "fit apart (the default is 128)")


def image_name(i: int) -> str:
    """The file name of the set's image i: COCO's train2014 pattern, image ids from 100000."""
    return f"COCO_train2014_{100000 + i:012d}.jpg"


def generate(out: str | Path, seed: int = 0, images: int = 1200, size: int = 128) -> dict:
    """Write the raw layout into `out`, overwriting the files of a previous set by name; returns counts.
    Deterministic for (seed, images, size)."""
    check_settings(images, size)
    out = Path(out)
    (out / "refcoco").mkdir(parents=True, exist_ok=True)
    img_dir = out / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "mdetr_annotations").mkdir(parents=True, exist_ok=True)
    splits = _split_of_images(images, seed)
    coco_images, annotations, refs = [], [], []
    mdetr = {s: {"images": [], "annotations": []} for s, _ in SPLIT_FRACTIONS}
    sent_id = 0
    for i in range(images):
        rng = np.random.default_rng([seed, i])  # scene_objects() replays the first draws of this generator
        split = splits[i]
        group = {"testA": "round", "testB": "angular"}.get(split)
        objs = _make_objects(rng, size, group)
        image_id, file_name = 100000 + i, image_name(i)
        _render(rng, size, objs).save(img_dir / file_name, quality=92)
        coco_images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                            "license": 0, "coco_url": "", "flickr_url": "", "date_captured": ""})
        for k, o in enumerate(objs):
            x0, y0, x1, y1 = (round(float(v), 2) for v in o["box"])
            o["ann_id"] = image_id * 10 + k
            o["ann"] = {"id": o["ann_id"], "image_id": image_id, "category_id": _CAT_ID[o["shape"]],
                                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "iscrowd": 0,
                                "area": round(float(_area(o["points"])), 2),
                                "segmentation": [[round(float(v), 2) for v in o["points"].reshape(-1)]],
                                "attributes": [o["size"], o["colour"]]}
            annotations.append(o["ann"])
        # referred objects: 2-4 per image with at least two verified expressions (only the group's in testA/B)
        eligible = [(o, c) for o in objs if group in (None, _GROUP[o["shape"]])
                    for c in [_candidates(o, objs)] if len({s for _, s, _ in c}) >= 2]
        n_ref = min(len(eligible), int(rng.integers(2, 5)))
        chosen = sorted(rng.choice(len(eligible), size=n_ref, replace=False).tolist()) if n_ref else []
        for j in chosen:
            o, cands = eligible[j]
            sentences = []
            for sent, head in _pick_expressions(rng, cands):
                raw = sent[0].upper() + sent[1:] if rng.random() < 0.3 else sent
                beg = sent.index(head)
                sentences.append({"sent_id": sent_id, "raw": raw, "sent": sent, "tokens": sent.split()})
                mid = len(mdetr[split]["images"])
                mdetr[split]["images"].append({
                    "id": mid, "file_name": file_name, "height": size, "width": size, "caption": sent,
                    "dataset_name": "refcoco", "original_img_id": image_id, "sentence_id": len(sentences) - 1,
                    "tokens_negative": [[0, len(sent)]]})
                ann = o["ann"]
                mdetr[split]["annotations"].append({
                    "id": mid, "image_id": mid, "category_id": ann["category_id"], "bbox": ann["bbox"],
                    "area": ann["area"], "iscrowd": 0, "original_id": o["ann_id"],
                    "tokens_positive": [[beg, beg + len(head)]]})
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": o["ann_id"], "image_id": image_id,
                         "category_id": _CAT_ID[o["shape"]], "split": split,
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "file_name": f"COCO_train2014_{image_id:012d}_{len(refs)}.jpg"})
    categories = [{"id": cid, "name": name, "supercategory": grp} for cid, name, grp in CATEGORIES]
    _write_json(out / "refcoco" / "instances.json",
                {"images": coco_images, "annotations": annotations, "categories": categories})
    with open(out / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    for split, d in mdetr.items():
        _write_json(out / "mdetr_annotations" / f"finetune_refcoco_{split}.json", {**d, "categories": categories})
    return {"images": images, "objects": len(annotations), "refs": len(refs), "sentences": sent_id}


def _area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj))


def ensure_synthetic(dir: str | Path = "data/synthref", seed: int = 0, images: int = 1200, size: int = 128,
                     force: bool = False, log=print) -> Path:
    """Return `dir/processed` (the data root), generating and converting the synthetic set first if missing.

    `dir/synthetic.json` records the settings that made the set. An existing set made with the same settings is
    reused; one made with others is an error naming them (pass force=True, `--force`, to regenerate it). A
    folder holding other files than a synthetic set is never overwritten, and a user's file inside the set's
    folders is never removed: the generator and the conversion replace only their own files.
    """
    check_settings(images, size)
    dir = Path(dir)
    processed, record = dir / "processed", dir / "synthetic.json"
    settings = {"seed": seed, "images": images, "size": size}
    made = read_json(record) if record.exists() else None
    if is_complete(processed) and not force:
        if made is not None and made != settings:
            diff = ", ".join(f"{k} {made.get(k)} (asked {v})" for k, v in settings.items() if made.get(k) != v)
            raise DataError(f"{dir} holds a synthetic set made with other settings: {diff}; pass --force to "
                            "regenerate it, or choose another --out")
        return processed
    ours = {"refcoco", "train2014", "mdetr_annotations", "processed", "synthetic.json"}
    foreign = sorted(p.name for p in dir.iterdir() if p.name not in ours) if dir.is_dir() else []
    if made is None and foreign:
        raise DataError(f"{dir} holds other files ({', '.join(foreign[:5])}); the synthetic set goes into a new or "
                        "empty folder, or one it made before")
    # No record and no marker until the new set is converted: a run killed while regenerating is redone, not reused
    # (the marker becomes the conversion's partial one, which lets it write there again)
    record.unlink(missing_ok=True)
    if (processed / MARKER).exists():
        (processed / MARKER).replace(processed / PENDING)
    for i in range(images, made.get("images", 0) if isinstance(made, dict) else 0):   # a larger set's extra images
        (dir / "train2014" / image_name(i)).unlink(missing_ok=True)
    counts = generate(dir, seed=seed, images=images, size=size)
    log(f"synthetic RefCOCO: {counts['images']} images, {counts['objects']} objects, {counts['refs']} refs, "
        f"{counts['sentences']} expressions → {dir}")
    convert_refcoco(dir / "refcoco", dir / "train2014", processed, mdetr_dir=dir / "mdetr_annotations", log=log)
    write_text(record, json.dumps(settings) + "\n")
    return processed


def extra_scenes(root: str | Path, images: int, log=print) -> Path:
    """The data root of a second synthetic set of `images` scenes (seed 1: none of them is a scene of the seed-0 set),
    made on first use beside the set whose data root is `root` (`data/synthref/processed` →
    `data/synthref-extra{images}/processed`): more train scenes for a stage that needs more than the set's train
    split, whose val and test splits stay the seed-0 set's."""
    root = Path(root)
    if not (root.parent / "synthetic.json").exists():
        raise ValueError(f"extra_scenes: {root} is not a synthetic set made by `data_prep.py synthetic`; extra scenes "
                         "exist only for synthetic data (set --extra_scenes 0)")
    made = json.loads((root.parent / "synthetic.json").read_text())
    return ensure_synthetic(root.parent.with_name(f"{root.parent.name}-extra{images}"), seed=made["seed"] + 1,
                            images=images, size=made["size"], log=log)
