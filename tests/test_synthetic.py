"""The synthetic RefCOCO: deterministic, split like UNC, and every expression singles out its object."""
import json
import pickle
import re

import pytest

from minidiffprompt.data.refcoco import load_refs
from minidiffprompt.data.synthetic import (CATEGORIES, COLOURS, SIZES, _candidates, ensure_synthetic, generate,
                                           scene_objects)
from minidiffprompt.data.text import load_tokenizer

N, SIZE = 60, 96
GROUP = {name: group for _, name, group in CATEGORIES}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    root = ensure_synthetic(d, seed=3, images=N, size=SIZE, log=lambda *a: None)
    return d, root


def _resolve(sent, objs, strict):
    """Independent reading of an expression → the set of objects it can mean.

    strict=True reads relations as "entirely beyond the landmark", strict=False as "centre beyond the landmark's
    centre"; an unambiguous expression must pick the same single object under both readings."""
    def np_match(words):
        return [o for o in objs if all(w in (o["shape"], o["colour"], o["size"]) for w in words.split())]

    def beyond(a, b, rel):
        if strict:
            return {"left": b["box"][0] - a["box"][2], "right": a["box"][0] - b["box"][2],
                    "above": b["box"][1] - a["box"][3], "below": a["box"][1] - b["box"][3]}[rel] > 0
        return {"left": a["cx"] < b["cx"], "right": a["cx"] > b["cx"], "above": a["cy"] < b["cy"],
                "below": a["cy"] > b["cy"]}[rel]

    rel_words = {"left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
                 "above": "above", "below": "below", "under": "below"}
    m = re.fullmatch(r"the (.+?) (to the left of|to the right of|left of|right of|above|below|under) the (.+)", sent)
    if m:
        (lm,) = np_match(m.group(3))  # the landmark must itself be unique
        return [o for o in np_match(m.group(1)) if o is not lm and beyond(o, lm, rel_words[m.group(2)])]
    key = {"left": lambda o: -o["cx"], "right": lambda o: o["cx"], "top": lambda o: -o["cy"],
           "bottom": lambda o: o["cy"]}
    pre = re.fullmatch(r"the (leftmost|rightmost|top|bottom) (.+)", sent)
    post = re.fullmatch(r"the (.+) (?:on|at) the (left|right|top|bottom)", sent)
    if pre or post:
        direction, words = (pre.group(1), pre.group(2)) if pre else (post.group(2), post.group(1))
        direction = {"leftmost": "left", "rightmost": "right"}.get(direction, direction)
        group = np_match(words)
        best = max(key[direction](o) for o in group)
        return [o for o in group if key[direction](o) == best]
    return np_match(sent[len("the "):])


def test_every_expression_is_unambiguous_and_spans_are_head_phrases(synth):
    d, _ = synth
    refs = load_refs(d / "refcoco" / "refs(unc).p")
    inst = json.loads((d / "refcoco" / "instances.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    mdetr = {}
    for split in ("train", "val", "testA", "testB"):
        m = json.loads((d / "mdetr_annotations" / f"finetune_refcoco_{split}.json").read_text())
        anns = {a["image_id"]: a for a in m["annotations"]}
        for im in m["images"]:
            mdetr[(anns[im["id"]]["original_id"], im["caption"])] = anns[im["id"]]["tokens_positive"]
    assert len(refs) > 2 * N * 0.9
    for ref in refs:
        objs = scene_objects(3, ref["image_id"] - 100000, SIZE, ref["split"])
        target = objs[ref["ann_id"] % 10]
        assert cats[ref["category_id"]] == target["shape"]
        assert 2 <= len(ref["sentences"]) <= 3
        for s in ref["sentences"]:
            for strict in (True, False):
                assert _resolve(s["sent"], objs, strict) == [target], s["sent"]
            (b, e), = mdetr[(ref["ann_id"], s["sent"])]
            head = s["sent"][b:e].split()
            assert head[-1] == target["shape"] and set(head[:-1]) <= set(COLOURS) | set(SIZES)
            assert s["tokens"] == s["sent"].split() and s["raw"].lower() == s["sent"]


def test_splits_by_image_and_category_group(synth):
    d, root = synth
    refs = load_refs(d / "refcoco" / "refs(unc).p")
    images = {}
    for r in refs:
        assert images.setdefault(r["image_id"], r["split"]) == r["split"]  # an image lies in one split
    per_split = {s: sum(1 for v in images.values() if v == s) for s in ("train", "val", "testA", "testB")}
    assert per_split["train"] >= 0.6 * N and all(per_split[s] >= 0.07 * N for s in ("val", "testA", "testB"))
    groups = {s: {GROUP[c] for r in refs if r["split"] == s for c in [dict((i, n) for i, n, _ in CATEGORIES)[
        r["category_id"]]]} for s in per_split}
    assert groups["testA"] == {"round"} and groups["testB"] == {"angular"}
    assert groups["train"] == {"round", "angular"}
    # objects are big enough for the 96-px GLIP input and inside the image
    inst = json.loads((d / "refcoco" / "instances.json").read_text())
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        assert max(w, h) >= 0.12 * SIZE and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
    # the vocabulary covers every caption without [UNK]
    tok = load_tokenizer(root / "vocab.txt")
    for r in refs:
        for s in r["sentences"]:
            assert tok.unk_token_id not in tok(s["raw"]).input_ids


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = (generate(tmp_path / n, seed=s, images=6, size=64) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a == b
    for f in ("refcoco/refs(unc).p", "refcoco/instances.json", "train2014/COCO_train2014_000000100003.jpg"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "refcoco/instances.json").read_bytes() != \
        (tmp_path / "c" / "refcoco/instances.json").read_bytes()
    with open(tmp_path / "a" / "refcoco" / "refs(unc).p", "rb") as f:
        assert isinstance(pickle.load(f), list)


def _obj(shape, colour, size, box):
    return {"shape": shape, "colour": colour, "size": size, "box": box,
            "cx": (box[0] + box[2]) / 2, "cy": (box[1] + box[3]) / 2}


def test_candidates_on_a_hand_made_scene():
    small_l = _obj("circle", "red", "small", (0, 40, 10, 50))
    big_r = _obj("circle", "red", "big", (60, 40, 90, 70))
    square = _obj("square", "blue", "small", (30, 40, 40, 50))
    sents = {s for _, s, _ in _candidates(small_l, [small_l, big_r, square])}
    assert {"the small circle", "the leftmost circle", "the circle on the left",
            "the circle left of the square", "the circle to the left of the square"} <= sents
    assert "the circle" not in sents and "the red circle" not in sents  # two red circles
    # a circle straddling the square is neither left nor right of it: no relation to the square is stated
    mid = _obj("circle", "red", "big", (24, 0, 44, 20))  # centre x 34, the square's is 35
    sents = {s for _, s, _ in _candidates(small_l, [small_l, mid, square])}
    assert not any("of the" in s and "square" in s for s in sents)
