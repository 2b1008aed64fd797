"""Datasets and transforms shared by every stage, reading the processed split files of `data_prep.py`.

    ds = RefExpDataset("data/synthref/processed", "train", image_size=96, mask_size=64)
    batch = collate([ds[0], ds[1]])          # image (2,3,96,96), mask (2,1,64,64), box (2,4), lists for the rest

Images are resized to S×S ignoring the aspect ratio, as GLIP does with FIX_RES (`Resize(restrict=True)` in GLIP's
maskrcnn_benchmark/data/transforms/transforms.py); boxes are scaled per axis. Masks are rasterised from the
polygons at the original size and resized bilinearly, so borders are soft, exactly like the authors' mask loader
(`SegmentMaskData` in Kelvin-ywc/diff-prompt unique_vae/dataset.py: 0/255 'L' image, Resize, ToTensor).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from ..utils.runtime import loader_kwargs
from .refcoco import DataError, read_json

GLIP_MEAN_BGR = (103.530, 116.280, 123.675)  # INPUT.PIXEL_MEAN/STD of GLIP's glip_A_Swin_T_O365.yaml, 0-255
GLIP_STD_BGR = (57.375, 57.120, 58.395)
RECORD_KEYS = {"image", "width", "height", "bbox", "polygons", "sentences", "ref_id", "image_id"}  # what items read


# ----------------------------------------------------------------------------------------------------------------
# Files and transforms


def load_records(root: str | Path, split: str) -> list[dict]:
    """Records of `root/{split}.json`; each record's "image" is made an absolute path."""
    root = Path(root)
    path = root / f"{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python data_prep.py synthetic --out DIR` (data root "
                                f"DIR/processed) or `python data_prep.py refcoco ... --out {root}` first")
    d = read_json(path)
    records = d.get("records") if isinstance(d, dict) else None
    if not isinstance(records, list):
        raise DataError(f"{path}: not a split file of data_prep.py (a dict whose \"records\" is a list); convert "
                        "the data again with `python data_prep.py`")
    if not records:
        raise DataError(f"{path}: the {split} split holds no records; convert the data again, or leave the split "
                        "out (evaluate: --splits; train-prompts: --val_items 0)")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and RECORD_KEYS <= r.keys() and isinstance(r["image"], str)
                and isinstance(r["sentences"], list) and isinstance(r["bbox"], list) and len(r["bbox"]) == 4):
            raise DataError(f"{path}: record {i} is not a record of data_prep.py (fields {sorted(RECORD_KEYS)}); "
                            "convert the data again with `python data_prep.py`")
        r["image"] = str(resolve_image(root, r["image"]))
    return records


def resolve_image(root: str | Path, image: str) -> Path:
    """Image paths in the split files are relative to the data root's parent (or absolute)."""
    p = Path(image)
    return p if p.is_absolute() else Path(root).resolve().parent / p


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) RGB in [0, 1], PIL bilinear resize ignoring the aspect ratio (GLIP's FIX_RES `Resize`). An
    unreadable, cut-short or absurdly large image (PIL's decompression-bomb limit) is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
                    # 16-bit grey: scale to 8 bits (converting directly would clip nearly every pixel to white)
                    im = Image.fromarray((np.asarray(im, dtype=np.float32) * (255 / 65535)).round().astype(np.uint8))
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: cannot use this image ({e}); replace the file, or convert the data again with "
                        "`python data_prep.py ... --check-images full`, which drops unreadable images") from None
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def rasterize_mask(polygons, width: int, height: int, size: int) -> torch.Tensor:
    """(1, size, size) in [0, 1]: polygons filled at the original size ('L', 0/255), bilinear resize, /255."""
    im = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(im)
    for p in polygons:
        draw.polygon([(p[i], p[i + 1]) for i in range(0, len(p) - 1, 2)], fill=255, outline=255)
    im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


def glip_normalize(images01: torch.Tensor) -> torch.Tensor:
    """RGB [0,1] (B,3,H,W) → GLIP's input: BGR ×255, minus mean, over std (GLIP's `Normalize`, format bgr255)."""
    bgr = images01.flip(-3) * 255.0
    mean = bgr.new_tensor(GLIP_MEAN_BGR).view(3, 1, 1)
    std = bgr.new_tensor(GLIP_STD_BGR).view(3, 1, 1)
    return (bgr - mean) / std


def clip_normalize(images01: torch.Tensor) -> torch.Tensor:
    """RGB [0,1] → [-1,1], what the DiT's condition encoder saw in training (the authors' Normalize(0.5, 0.5) in
    DiT-main/utils/data/transforms/transforms.py, instead of CLIP's own preprocessing)."""
    return images01 * 2.0 - 1.0


def scale_box(bbox_xywh, width: int, height: int, size: int) -> torch.Tensor:
    """COCO xywh (original pixels) → (4,) xyxy in the size×size frame, x2 = x + w, continuous coordinates.

    GLIP mixes conventions: training targets use x2 = x + w - 1 (`ConvertCocoPolysToMask` in GLIP's
    maskrcnn_benchmark/data/datasets/modulated_coco.py), its RefCOCO evaluator x2 = x + w (`RefExpEvaluator` in
    .../datasets/refexp.py). This box serves evaluation as it is; `glip.atss.inclusive_boxes` turns it into the
    training convention."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    sx, sy = size / float(width), size / float(height)
    return torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class MaskDataset(Dataset):
    """One item per referred object: its mask (stage 1, the Mask-VAE)."""

    def __init__(self, root, split: str, mask_size: int):
        self.records, self.mask_size = load_records(root, split), mask_size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return {"mask": rasterize_mask(r["polygons"], r["width"], r["height"], self.mask_size), "index": i}


class RefExpDataset(Dataset):
    """One item per (referred object, expression): image, caption, spans, box and optionally the mask."""

    def __init__(self, root, split: str, image_size: int, mask_size: int | None = None):
        self.records = load_records(root, split)
        self.image_size, self.mask_size = image_size, mask_size
        self.items = [(ri, si) for ri, r in enumerate(self.records) for si in range(len(r["sentences"]))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ri, si = self.items[i]
        r, s = self.records[ri], self.records[ri]["sentences"][si]
        x, y, w, h = r["bbox"]
        item = {
            "image": load_image(r["image"], self.image_size),
            "caption": s["sent"],
            "spans": [list(sp) for sp in s["spans"]],
            "box": scale_box(r["bbox"], r["width"], r["height"], self.image_size),
            "box_orig": torch.tensor([x, y, x + w, y + h], dtype=torch.float32),
            "size": (r["width"], r["height"]),
            "ref_id": r["ref_id"], "image_id": r["image_id"], "index": i,
        }
        if self.mask_size:
            item["mask"] = rasterize_mask(r["polygons"], r["width"], r["height"], self.mask_size)
        return item


class DetectionDataset(Dataset):
    """One item per image of `detection.json`: all boxes, a caption listing every category, spans per box."""

    def __init__(self, root, image_size: int, categories: list[str] | None = None):
        root = Path(root)
        d = read_json(root / "detection.json")
        if not (isinstance(d, dict) and isinstance(d.get("categories"), list) and isinstance(d.get("images"), list)):
            raise DataError(f"{root / 'detection.json'}: not a detection file of data_prep.py (a dict with lists "
                            "\"categories\" and \"images\"); convert the data again with `python data_prep.py`")
        self.root, self.image_size = root, image_size
        self.categories = list(categories) if categories is not None else d["categories"]
        self.images = d["images"]
        # "circle. square. ..." in a fixed order (GLIP's ". " separated class prompt); each name's character span
        self.caption, self.name_spans, pos = "", {}, 0
        for name in self.categories:
            self.name_spans[name] = [pos, pos + len(name)]
            self.caption += name + ". "
            pos = len(self.caption)
        self.caption = self.caption.rstrip()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        objs = [o for o in im["objects"] if o["category"] in self.name_spans]
        boxes = [scale_box(o["bbox"], im["width"], im["height"], self.image_size) for o in objs]
        return {
            "image": load_image(resolve_image(self.root, im["image"]), self.image_size),
            "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
            "categories": [o["category"] for o in objs],
            "attributes": [o.get("attributes", []) for o in objs],
            "caption": self.caption,
            "spans": [list(self.name_spans[o["category"]]) for o in objs],
            "index": i,
        }


# ----------------------------------------------------------------------------------------------------------------
# Batching


def collate(batch: list[dict]) -> dict:
    """Stack tensors that share a shape across the batch; keep lists for everything else."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def make_loader(dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, device="cpu",
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """DataLoader with `collate`, a seeded shuffle, pinned memory on GPU and persistent workers."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None,
                      **loader_kwargs(num_workers, torch.device(device)))
