"""RefCOCO (UNC) conversion: `refs(unc).p` + `instances.json` (+ MDETR spans) → compact per-split files.

    python data_prep.py refcoco --refer-dir refer/data/refcoco --coco-images coco/train2014 \
        --mdetr-dir mdetr_annotations --out data/refcoco/processed

Output (the "data root"): `{train,val,testA,testB}.json` = {"meta", "records"}, one record per referred object
    {ref_id, ann_id, image_id, image, width, height, category_id, category, bbox (xywh, original pixels),
     polygons [[x1, y1, ...], ...], sentences [{"sent", "spans": [[beg, end), ...]}]}
plus `detection.json` (every object of the train images with its category and, where the annotation lists them, its
attribute words, for detection pre-training) and `vocab.txt` (a BERT
WordPiece vocabulary covering all captions and category names).

Positive spans: with `--mdetr-dir`, each expression takes the `tokens_positive` of the MDETR entry with the same
image, caption and box (the root noun phrase, found with spaCy by `get_root_and_nouns` in ashkamath/mdetr
scripts/fine-tuning/refexp_coco_format.py). Without MDETR files, or for an expression MDETR lacks, **the whole
expression is the positive span** [0, len(sent)).

Bad records (malformed refs, unknown annotation, category or image, missing or unreadable image file, degenerate
box, crowd/RLE segmentation, no usable polygon, a polygon wholly outside its image, no sentence) are dropped and
counted; if more than `max_bad_fraction` of the refs are bad the conversion stops before writing anything.

Output: each file is replaced atomically in place (a reader sees the old file or the new, never half of one), and
`made_by.json`, listing the files written, is removed first and written last: a folder is a complete data root
only while it holds that marker (`is_complete`). Files in `--out` that the conversion did not write (a training
run, notes) are never touched.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import unicodedata
from collections import Counter
from pathlib import Path

from PIL import Image

from ..utils import files

SPLITS = ("train", "val", "testA", "testB")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT order: [PAD] = 0
FORMAT_VERSION = 1
OUTPUTS = (*(f"{s}.json" for s in SPLITS), "detection.json", "vocab.txt", "summary.json")   # what it writes
MARKER = "made_by.json"   # written last into every data root this package writes: what made it, and its files
PENDING = MARKER + ".partial"   # the marker-to-be while the files are written: marks a killed run's folder as ours


class DataError(RuntimeError):
    """The input data cannot be converted (wrong format, too many bad records)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading: a pickle that may only hold plain containers and scalars


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every class: lists, dicts, tuples, str, bytes, numbers, bool, None only."""
    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: refs(unc).p must hold only plain lists/dicts/strings/numbers")


def read_json(path: Path):
    """A JSON input file, or a DataError naming it and where it breaks."""
    return files.read_json(path, DataError, "is the file complete?")


def load_refs(path: str | Path) -> list:
    """Read `refs(unc).p` (Python 2 or 3 pickle) with the restricted unpickler."""
    data = Path(path).read_bytes()
    try:
        try:
            refs = _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
        except UnicodeDecodeError:  # Python 2 byte strings that are not UTF-8
            refs = _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:   # empty or cut short
        raise DataError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e}); download the refer "
                        "toolkit's refs(unc).p again") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of ref dicts (the refer toolkit's format), got {type(refs).__name__}")
    return refs


# ----------------------------------------------------------------------------------------------------------------
# Validation of single items


def _polygons(segmentation, width, height) -> list[list[float]] | str:
    """Usable polygons, or the reason there are none ('rle_segmentation', 'empty_polygons', 'polygon_outside_image'
    when every polygon lies wholly outside the image: its mask would be empty)."""
    if isinstance(segmentation, dict):
        return "rle_segmentation"
    if not isinstance(segmentation, list):
        return "empty_polygons"
    polys = []
    for p in segmentation:
        if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in p):
            polys.append([float(v) for v in p])
    if not polys:
        return "empty_polygons"
    inside = [p for p in polys if min(max(p[0::2]), width) > max(min(p[0::2]), 0)
              and min(max(p[1::2]), height) > max(min(p[1::2]), 0)]
    return inside or "polygon_outside_image"


def _box(bbox, width: int, height: int) -> list[float] | None:
    """The xywh box clipped to the image, or None if it is degenerate (< 1 px wide/high, or outside)."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def _check_image(path: Path, width: int, height: int, mode: str) -> str:
    """'ok', 'missing_image' or 'corrupt_image' (unreadable, or not of the size instances.json states)."""
    if mode == "none":
        return "ok"
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify() if mode == "open" else im.load()
    except Exception:  # noqa: BLE001 - any decoder error means the file is unusable
        return "corrupt_image"
    return "ok" if size == (width, height) else "corrupt_image"


def check_coco(d, path: Path, keys=("images", "annotations", "categories")):
    """`d`, read from the COCO-format file `path`, if it has the structure the conversion reads; else a DataError
    naming the file and the first problem (instead of a traceback, or a silently empty conversion)."""
    if not isinstance(d, dict):
        problem = f"the top level is a {type(d).__name__}, not an object"
    else:
        problem = next((f'"{k}" is missing' if k not in d else f'"{k}" is {json.dumps(d[k])[:40]}, not a list'
                        for k in keys if not isinstance(d.get(k), list)), None)
        if problem is None and "categories" in keys:
            problem = next((f'categories[{i}] needs an integer "id" and a string "name", got {json.dumps(c)[:80]}'
                            for i, c in enumerate(d["categories"]) if not (isinstance(c, dict) and type(
                                c.get("id")) is int and isinstance(c.get("name"), str))), None)
    if problem:
        shape = ", ".join(f'"{k}": [...]' for k in keys)
        raise DataError(f"{path}: {problem}; expected COCO's format {{{shape}}}; is it the right file?")
    return d


def _mdetr_index(mdetr_dir: Path | None) -> dict:
    """(original image id, caption) → list of (bbox, tokens_positive), from finetune_refcoco_{split}.json."""
    index = {}
    if mdetr_dir is None:
        return index
    paths = [Path(mdetr_dir) / f"finetune_refcoco_{split}.json" for split in SPLITS]
    if not any(p.is_file() for p in paths):   # a misspelt folder would silently fall back to whole expressions
        raise DataError(f"--mdetr-dir {mdetr_dir} " + ("holds no finetune_refcoco_*.json" if Path(mdetr_dir).is_dir()
                        else "is not a folder") + f"; give the folder with MDETR's {', '.join(p.name for p in paths)}"
                        " (or leave --mdetr-dir out: each whole expression becomes the positive span)")
    for path in paths:
        if not path.exists():
            continue
        d = check_coco(read_json(path), path, keys=("images", "annotations"))
        anns = {a.get("image_id"): a for a in d["annotations"] if isinstance(a, dict)}
        for im in d["images"]:
            a = anns.get(im.get("id")) if isinstance(im, dict) else None
            if a is None or "tokens_positive" not in a:
                continue
            key = (im.get("original_img_id"), str(im.get("caption", "")).strip().lower())
            index.setdefault(key, []).append((a.get("bbox"), a["tokens_positive"]))
    return index


def _spans(sent: str, image_id: int, bbox, index: dict) -> tuple[list[list[int]], bool]:
    for box, spans in index.get((image_id, sent.strip().lower()), []):
        if box is not None and max(abs(a - b) for a, b in zip(box, bbox)) <= 1.0 and spans and all(
                0 <= s[0] < s[1] <= len(sent) for s in spans):
            return [[int(s[0]), int(s[1])] for s in spans], True
    return [[0, len(sent)]], False


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary (BERT WordPiece format)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def basic_words(text: str) -> list[str]:
    """BERT's basic tokenisation: lower-case, strip accents, split on whitespace and punctuation."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    words = []
    for w in text.split():
        cur = ""
        for ch in w:
            if _is_punct(ch):
                words += [cur, ch] if cur else [ch]
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
    return words


def build_vocab(texts) -> list[str]:
    """Special tokens, then every word (most frequent first), then every character alone and as '##c', so that
    any word made of seen characters tokenises without [UNK]."""
    counts = Counter(w for t in texts for w in basic_words(t))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-()") | {c for w in counts for c in w})
    vocab = list(SPECIAL_TOKENS) + sorted(counts, key=lambda w: (-counts[w], w))
    seen = set(vocab)
    vocab += [c for c in chars if c not in seen] + ["##" + c for c in chars]
    return vocab


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def is_complete(root: str | Path) -> bool:
    """A finished conversion: the marker (written last) and every output file."""
    root = Path(root)
    return all((root / f).is_file() for f in (MARKER, *OUTPUTS))


def _image_ref(path: Path, out: Path) -> str:
    """Image path relative to the data root's parent when it lies below it, else absolute."""
    path, base = path.resolve(), out.resolve().parent
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def convert_refcoco(refer_dir, coco_images, out, mdetr_dir=None, max_bad_fraction: float = 0.01,
                    check_images: str = "full", log=print) -> dict:
    """Convert; returns {"splits": {split: {"refs", "sentences"}}, "bad": {reason: count}, ...}.

    check_images: "full" (decode every image, the default: a truncated JPEG fails here, not mid-training; it added
    0.5 s to the 1,200 synthetic images, about 5 ms per COCO image), "open" (header check) or "none".
    """
    refer_dir, coco_images, out = Path(refer_dir), Path(coco_images), Path(out)
    if not 0 <= max_bad_fraction <= 1:   # also false for nan, which would let every ref be bad
        raise DataError(f"--max-bad-fraction {max_bad_fraction}: must be a fraction in [0, 1], e.g. 0.01 to allow "
                        "1 % of the refs to be bad")
    for f in ("refs(unc).p", "instances.json"):
        if not (refer_dir / f).exists():
            raise DataError(f"{refer_dir / f} not found: --refer-dir must hold the refer toolkit's refs(unc).p "
                            "and instances.json (e.g. refer/data/refcoco)")
    check_output(out, [refer_dir, coco_images, mdetr_dir])
    mdetr = _mdetr_index(Path(mdetr_dir) if mdetr_dir else None)
    refs = load_refs(refer_dir / "refs(unc).p")
    if not refs:
        raise DataError(f"{refer_dir / 'refs(unc).p'}: holds no refs (an empty list); use the refer toolkit's "
                        "refs(unc).p of RefCOCO")
    inst = check_coco(read_json(refer_dir / "instances.json"), refer_dir / "instances.json")
    images = {im["id"]: im for im in inst["images"] if isinstance(im, dict) and "id" in im}
    anns = {a["id"]: a for a in inst["annotations"] if isinstance(a, dict) and "id" in a}
    cats = {c["id"]: c["name"] for c in inst["categories"]}

    image_status: dict[int, str] = {}
    bad, records = Counter(), {s: [] for s in SPLITS}
    n_sent = Counter()
    for ref in refs:
        reason, rec = _convert_one(ref, images, anns, cats, coco_images, out, check_images, image_status, mdetr,
                                   n_sent)
        if reason:
            bad[reason] += 1
        else:
            records[ref["split"]].append(rec)
    total = len(refs)
    n_bad = sum(bad.values())
    summary = {"refs_in": total, "bad": dict(bad), "bad_fraction": n_bad / max(total, 1),
               "spans": {"mdetr": n_sent["mdetr"], "whole_expression": n_sent["whole"]},
               "sentences_dropped": n_sent["dropped"],
               "splits": {s: {"refs": len(r), "sentences": sum(len(x["sentences"]) for x in r)}
                          for s, r in records.items()}}
    if n_bad:
        log(f"dropped {n_bad} of {total} refs: " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items())))
    if n_bad / total > max_bad_fraction:
        raise DataError(f"{refer_dir}: {n_bad} of {total} refs are bad ({dict(bad)}), more than the allowed "
                        f"{max_bad_fraction:.1%}; check --coco-images (the train2014 folder) and the refer files, "
                        "or raise --max-bad-fraction")

    # detection split: every usable object of the train images
    train_images = sorted({r["image_id"] for r in records["train"]})
    cat_names = [cats[k] for k in sorted(cats)]
    det_images = []
    by_image: dict[int, list] = {}
    for a in anns.values():
        by_image.setdefault(a.get("image_id"), []).append(a)
    for iid in train_images:
        im = images[iid]
        objects = []
        for a in sorted(by_image.get(iid, []), key=lambda a: a["id"]):
            box = _box(a.get("bbox"), im["width"], im["height"])
            polys = _polygons(a.get("segmentation"), im["width"], im["height"])
            if a.get("iscrowd") or box is None or isinstance(polys, str) or not _known(a.get("category_id"), cats):
                continue
            attributes = [w for w in a.get("attributes", []) if isinstance(w, str)]   # synthetic set only
            objects.append({"bbox": box, "category": cats[a["category_id"]], "attributes": attributes,
                            "polygons": polys})
        det_images.append({"image": _image_ref(coco_images / im["file_name"], out), "width": im["width"],
                           "height": im["height"], "objects": objects})

    texts = [s["sent"] for r in records.values() for x in r for s in x["sentences"]] + cat_names
    meta = {"format": FORMAT_VERSION, "source": str(refer_dir.name), "span_source": "mdetr" if mdetr else "whole"}
    _write_outputs(out, {
        **{f"{s}.json": {"meta": {**meta, "split": s, **summary["splits"][s]}, "records": records[s]}
           for s in SPLITS},
        "detection.json": {"categories": cat_names, "images": det_images},
        "vocab.txt": "\n".join(build_vocab(texts)) + "\n",
        "summary.json": summary,
    }, made_by={"command": "convert_refcoco", "refer_dir": str(refer_dir), "coco_images": str(coco_images),
                "mdetr_dir": str(mdetr_dir) if mdetr_dir else None, "format": FORMAT_VERSION})
    for s in SPLITS:
        log(f"{s:>6}: {summary['splits'][s]['refs']:6d} refs {summary['splits'][s]['sentences']:7d} expressions")
    log(f"positive spans: {n_sent['mdetr']} from MDETR, {n_sent['whole']} whole expression → {out}")
    return summary


def _known(category_id, cats: dict) -> bool:
    """An integer id of instances.json's categories (a string "1" is not COCO's format: a bad record)."""
    return type(category_id) is int and category_id in cats


def _convert_one(ref, images, anns, cats, coco_images, out, check_images, image_status, mdetr, n_sent):
    """(reason, None) for a bad ref, (None, record) for a good one."""
    try:
        ref_id, ann_id, image_id, split = int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"]), ref["split"]
        sentences = ref["sentences"]
        assert isinstance(sentences, list)
    except (KeyError, TypeError, ValueError, AssertionError):
        return "malformed", None
    if split not in SPLITS:
        return "malformed", None
    ann, im = anns.get(ann_id), images.get(image_id)
    if ann is None or ann.get("image_id") != image_id:
        return "unknown_annotation", None
    category_id = ann.get("category_id")
    if not _known(category_id, cats):
        return "unknown_category", None
    if im is None or not isinstance(im.get("file_name"), str):
        return "unknown_image", None
    path = coco_images / im["file_name"]
    if image_id not in image_status:
        image_status[image_id] = _check_image(path, im.get("width"), im.get("height"), check_images)
    if image_status[image_id] != "ok":
        return image_status[image_id], None
    if ann.get("iscrowd"):
        return "rle_segmentation", None
    polys = _polygons(ann.get("segmentation"), im["width"], im["height"])
    if isinstance(polys, str):
        return polys, None
    box = _box(ann.get("bbox"), im["width"], im["height"])
    if box is None:
        return "degenerate_box", None
    sents = []
    for s in sentences:
        text = s.get("sent") or s.get("raw") if isinstance(s, dict) else None
        if not isinstance(text, str) or not text.strip():
            n_sent["dropped"] += 1
            continue
        spans, found = _spans(text, image_id, ann.get("bbox"), mdetr)
        n_sent["mdetr" if found else "whole"] += 1
        sents.append({"sent": text, "spans": spans})
    if not sents:
        return "no_sentence", None
    return None, {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "image": _image_ref(path, out),
                  "width": int(im["width"]), "height": int(im["height"]), "category_id": category_id,
                  "category": cats[category_id], "bbox": box, "polygons": polys,
                  "sentences": sents}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(out: Path, inputs: list) -> None:
    """Refuse an output folder that could destroy data: one that is, contains or lies inside an input folder, or an
    existing non-empty folder that this package did not write (neither `made_by.json` nor, from a conversion killed
    midway, `made_by.json.partial`)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            raise DataError(f"--out {out} is, contains or lies inside the input folder {given}; converting there "
                            "could overwrite the inputs. Choose a separate folder, e.g. --out data/refcoco_processed")
    if target.is_file():
        raise DataError(f"--out {out} is a file; give a folder")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in (MARKER, PENDING)):
        raise DataError(f"--out {out} already holds files that data_prep did not write (no {MARKER}); it only "
                        "replaces its own output. Choose a new or empty folder, or remove this one yourself")


def _write_outputs(out: Path, outputs: dict, made_by: dict) -> None:
    """Replace each output file atomically in place; no other file in `out` is touched. The marker goes first (as
    `made_by.json.partial`, which keeps the folder ours for a re-run) and comes back last, so a run killed midway
    leaves a folder that `is_complete` rejects. Temporary files a killed run left (their process is gone) go."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*outputs, MARKER, PENDING):    # temp names of files.replace_atomically: .NAME.PID-HEX.tmp
        for left in out.glob(f".{name}.*.tmp"):
            pid = left.name[len(name) + 2:].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                left.unlink(missing_ok=True)
    files.write_text(out / PENDING, json.dumps({**made_by, "files": sorted(outputs)}, ensure_ascii=False))
    (out / MARKER).unlink(missing_ok=True)
    for name, content in outputs.items():
        files.write_text(out / name, content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    os.replace(out / PENDING, out / MARKER)
