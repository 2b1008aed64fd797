"""The real-data conversion path, on the synthetic raw files and on hand-made files with every kind of bad record."""
import json
import os
import pickle

import pytest
from PIL import Image

from minidiffprompt.data.refcoco import DataError, basic_words, convert_refcoco, load_refs
from minidiffprompt.data.synthetic import generate
from minidiffprompt.data.text import load_tokenizer, positive_map

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    counts = generate(d, seed=5, images=30, size=96)
    return d, counts


def test_synthetic_raw_files_convert_cleanly(raw):
    d, counts = raw
    out = d / "processed"
    summary = convert_refcoco(d / "refcoco", d / "train2014", out, mdetr_dir=d / "mdetr_annotations", **quiet)
    assert summary["bad"] == {} and summary["spans"]["whole_expression"] == 0
    assert sum(s["refs"] for s in summary["splits"].values()) == counts["refs"]
    assert sum(s["sentences"] for s in summary["splits"].values()) == counts["sentences"]
    inst = json.loads((d / "refcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    for split in ("train", "val", "testA", "testB"):
        recs = json.loads((out / f"{split}.json").read_text())["records"]
        for r in recs:
            a = anns[r["ann_id"]]
            assert r["bbox"] == pytest.approx(a["bbox"]) and r["polygons"] == a["segmentation"]
            assert r["image"] == f"train2014/COCO_train2014_{r['image_id']:012d}.jpg"  # relative to DIR
            for s in r["sentences"]:
                (b, e), = s["spans"]
                assert s["sent"][b:e].split()[-1] == r["category"]
    det = json.loads((out / "detection.json").read_text())
    assert det["categories"][:2] == ["circle", "oval"]
    n_train_images = len({r["image_id"] for r in json.loads((out / "train.json").read_text())["records"]})
    assert len(det["images"]) == n_train_images and all(im["objects"] for im in det["images"])


def test_without_mdetr_the_whole_expression_is_the_span(raw, tmp_path):
    d, _ = raw
    convert_refcoco(d / "refcoco", d / "train2014", tmp_path / "p", **quiet)
    for r in json.loads((tmp_path / "p" / "val.json").read_text())["records"]:
        for s in r["sentences"]:
            assert s["spans"] == [[0, len(s["sent"])]]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class Plain:
    pass


@pytest.mark.parametrize("payload", [[{"ref_id": 0, "x": Evil()}], [Plain()]])
def test_pickle_with_a_class_is_refused(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_refs(path)
    assert not (tmp_path / "pwned").exists()


def test_plain_pickles_of_any_protocol_load(tmp_path):
    refs = [{"ref_id": 1, "sentences": [{"sent": "la señora"}], "box": (1.5, 2), "ids": {1, 2}}]
    for proto in (0, 2, 5):
        (tmp_path / "r.p").write_bytes(pickle.dumps(refs, protocol=proto))
        assert load_refs(tmp_path / "r.p") == refs
    (tmp_path / "r.p").write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="list of ref dicts"):
        load_refs(tmp_path / "r.p")


def _fixture(tmp_path):
    """Seven refs: two good (one non-ASCII), then one of each defect."""
    refer, imgs = tmp_path / "refer", tmp_path / "images"
    refer.mkdir()
    imgs.mkdir()
    images, anns = [], []
    for i in range(1, 8):
        images.append({"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 40, "height": 30})
        if i != 3:  # image 3 is missing
            Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(imgs / images[-1]["file_name"])
    (imgs / images[3]["file_name"]).write_bytes(b"not a jpeg at all")  # image 4 is corrupt
    square = [[5, 5, 25, 5, 25, 20, 5, 20]]
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 15], "segmentation": square, "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [30, 0, 8, 8], "segmentation": [[30, 0, 38, 0, 38, 8]],
         "iscrowd": 0},
        {"id": 21, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 15], "segmentation": square, "iscrowd": 0},
        {"id": 31, "image_id": 3, "category_id": 1, "bbox": [5, 5, 20, 15], "segmentation": square, "iscrowd": 0},
        {"id": 41, "image_id": 4, "category_id": 1, "bbox": [5, 5, 20, 15], "segmentation": square, "iscrowd": 0},
        {"id": 51, "image_id": 5, "category_id": 1, "bbox": [5, 5, 20, 15], "iscrowd": 1,
         "segmentation": {"counts": [0, 10, 1190], "size": [30, 40]}},                      # crowd RLE
        {"id": 61, "image_id": 6, "category_id": 1, "bbox": [5, 5, 0, 15], "segmentation": square, "iscrowd": 0},
        {"id": 71, "image_id": 7, "category_id": 1, "bbox": [5, 5, 20, 15], "segmentation": [[1, 2, 3]],
         "iscrowd": 0},                                                                     # no usable polygon
    ]
    inst = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "hot dog"}]}
    (refer / "instances.json").write_text(json.dumps(inst))

    def ref(rid, ann, img, split="train", sents=("the thing",)):
        return {"ref_id": rid, "ann_id": ann, "image_id": img, "category_id": 1, "split": split,
                "sentences": [{"sent": s, "raw": s, "tokens": s.split()} for s in sents]}
    refs = [ref(0, 11, 1, sents=("man on the left", "la señora à gauche")),
            ref(1, 21, 2, split="val", sents=("woman",)),
            ref(2, 31, 3), ref(3, 41, 4), ref(4, 51, 5), ref(5, 61, 6), ref(6, 71, 7),
            {"ref_id": 7, "image_id": 1, "split": "train", "sentences": []}]              # malformed: no ann_id
    (refer / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return refer, imgs


def test_bad_records_are_counted_and_fail_loudly(tmp_path):
    refer, imgs = _fixture(tmp_path)
    out = tmp_path / "processed"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    (out / "made_by.json").write_text("{}")                  # a previous conversion's output: may be replaced
    with pytest.raises(DataError, match="6 of 8 refs are bad"):
        convert_refcoco(refer, imgs, out, **quiet)
    assert (out / "old.txt").read_text() == "previous output"  # nothing written on failure
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

    summary = convert_refcoco(refer, imgs, out, max_bad_fraction=1.0, **quiet)
    assert summary["bad"] == {"missing_image": 1, "corrupt_image": 1, "rle_segmentation": 1, "degenerate_box": 1,
                              "empty_polygons": 1, "malformed": 1}
    assert (out / "old.txt").read_text() == "previous output" and (out / "vocab.txt").exists()  # not ours: kept
    train = json.loads((out / "train.json").read_text())
    (rec,) = train["records"]
    assert rec["image"] == "images/COCO_train2014_000000000001.jpg" and rec["category"] == "person"
    assert [s["sent"] for s in rec["sentences"]] == ["man on the left", "la señora à gauche"]
    assert train["meta"]["refs"] == 1 and train["meta"]["sentences"] == 2
    det = json.loads((out / "detection.json").read_text())
    assert det["categories"] == ["person", "hot dog"]
    assert [o["category"] for o in det["images"][0]["objects"]] == ["person", "hot dog"]
    # the vocabulary covers non-ASCII captions (accents stripped as BERT does) and category names
    tok = load_tokenizer(out / "vocab.txt")
    for text in ("la señora à gauche", "hot dog", "person."):
        assert tok.unk_token_id not in tok(text).input_ids
    caption = "la señora à gauche"
    assert positive_map(tok, caption, [[3, 9]], 8).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert basic_words("La Señora, à gauche!") == ["la", "senora", ",", "a", "gauche", "!"]


def test_missing_refer_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="refs\\(unc\\).p not found"):
        convert_refcoco(tmp_path, tmp_path, tmp_path / "out", **quiet)
