"""Datasets, transforms and collate on the synthetic set; transforms against hand computations and PIL."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minidiffprompt.data.datasets import (DetectionDataset, MaskDataset, RefExpDataset, clip_normalize, collate,
                                          glip_normalize, load_image, load_records, make_loader, rasterize_mask,
                                          scale_box)
from minidiffprompt.data.synthetic import ensure_synthetic
from minidiffprompt.data.text import load_tokenizer, positive_map


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), seed=1, images=30, size=128, log=lambda *a: None)


def test_refexp_items(root):
    ds = RefExpDataset(root, "train", image_size=96, mask_size=64)
    records = load_records(root, "train")
    assert len(ds) == sum(len(r["sentences"]) for r in records) > 0
    item = ds[3]
    r = records[ds.items[3][0]]
    assert item["image"].shape == (3, 96, 96) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 64, 64) and 0 <= item["mask"].min() and item["mask"].max() == 1
    x, y, w, h = r["bbox"]
    s = 96 / 128
    assert item["box"].tolist() == pytest.approx([x * s, y * s, (x + w) * s, (y + h) * s])  # x2 = x + w
    assert item["box_orig"].tolist() == pytest.approx([x, y, x + w, y + h])
    assert item["size"] == (128, 128) and item["index"] == 3 and item["ref_id"] == r["ref_id"]
    assert item["caption"] == r["sentences"][ds.items[3][1]]["sent"]
    # the mask lies inside the box: its support's bounding box equals the box up to the resize blur
    ys, xs = torch.nonzero(item["mask"][0] > 0.5, as_tuple=True)
    m = 64 / 128
    assert xs.min().item() == pytest.approx(x * m, abs=1.5) and xs.max().item() == pytest.approx((x + w) * m, abs=1.5)
    assert ys.min().item() == pytest.approx(y * m, abs=1.5) and ys.max().item() == pytest.approx((y + h) * m, abs=1.5)
    assert "mask" not in RefExpDataset(root, "val", image_size=96)[0]
    # positive tokens: the marked tokens spell the head phrase
    tok = load_tokenizer(root / "vocab.txt")
    row = positive_map(tok, item["caption"], item["spans"], 32)
    ids = tok(item["caption"]).input_ids
    (b, e), = item["spans"]
    assert tok.decode([ids[i] for i in torch.nonzero(row).flatten()]) == item["caption"][b:e]


def test_mask_and_detection_datasets(root):
    masks = MaskDataset(root, "train", mask_size=32)
    assert len(masks) == len(load_records(root, "train")) and masks[0]["mask"].shape == (1, 32, 32)
    det = DetectionDataset(root, image_size=64)
    assert det.caption == "circle. oval. heart. square. triangle. star. diamond. cross."
    item = det[0]
    assert item["boxes"].shape == (len(item["categories"]), 4) and len(item["categories"]) >= 3
    for (b, e), name in zip(item["spans"], item["categories"]):
        assert item["caption"][b:e] == name
    only = DetectionDataset(root, image_size=64, categories=["star", "circle"])
    assert only.caption == "star. circle." and set(only[0]["categories"]) <= {"star", "circle"}


def test_rasterize_mask_hand_values():
    square = [[2, 2, 5, 2, 5, 5, 2, 5]]  # pixels 2..5 filled at full size (PIL fills the outline too)
    m = rasterize_mask(square, 8, 8, 8)
    ref = torch.zeros(1, 8, 8)
    ref[0, 2:6, 2:6] = 1
    assert torch.equal(m, ref)
    small = rasterize_mask(square, 8, 8, 4)  # bilinear down-size: soft values, same as PIL on the 'L' image
    im = Image.new("L", (8, 8))
    ImageDraw.Draw(im).polygon([(2, 2), (5, 2), (5, 5), (2, 5)], fill=255, outline=255)
    expected = np.asarray(im.resize((4, 4), Image.BILINEAR), dtype=np.float32) / 255
    assert torch.allclose(small[0], torch.from_numpy(expected))
    assert rasterize_mask([], 8, 8, 4).sum() == 0


def test_image_transforms(tmp_path):
    arr = (np.arange(20 * 40 * 3) % 251).astype(np.uint8).reshape(20, 40, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", 16)  # 40×20 → 16×16, aspect ratio not kept
    ref = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    assert img.shape == (3, 16, 16) and torch.allclose(img, torch.from_numpy(ref).permute(2, 0, 1))
    px = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)  # RGB
    out = glip_normalize(px).flatten().tolist()  # BGR, ×255, GLIP's PIXEL_MEAN / PIXEL_STD
    assert out == pytest.approx([(0 - 103.53) / 57.375, (127.5 - 116.28) / 57.12, (255 - 123.675) / 58.395])
    assert clip_normalize(px).flatten().tolist() == [1.0, 0.0, -1.0]
    assert scale_box([10, 20, 30, 10], 40, 20, 16).tolist() == pytest.approx([4, 16, 16, 24])


def test_collate_and_loader(root):
    ds = RefExpDataset(root, "train", image_size=48, mask_size=16)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, 48, 48) and batch["mask"].shape == (3, 1, 16, 16)
    assert batch["box"].shape == (3, 4) and isinstance(batch["caption"], list) and len(batch["spans"]) == 3
    assert batch["size"] == [(128, 128)] * 3
    items = [DetectionDataset(root, 48)[i] for i in range(6)]
    items = [next(x for x in items if len(x["boxes"]) == 3), next(x for x in items if len(x["boxes"]) != 3)]
    det = collate(items)
    assert isinstance(det["boxes"], list) and [len(b) for b in det["boxes"]] == [len(x["boxes"]) for x in items]
    assert det["image"].shape == (2, 3, 48, 48)  # ragged box counts stay a list, images stack
    a = [b["index"] for b in make_loader(ds, 4, shuffle=True, seed=0)][0]
    b = [b["index"] for b in make_loader(ds, 4, shuffle=True, seed=0)][0]
    assert a == b and len(a) == 4


def test_plot_samples(root):
    import matplotlib
    matplotlib.use("Agg")
    from minidiffprompt.utils.figures import mark_spans, plot_samples
    assert mark_spans("the small red circle", [[4, 20]]) == "the [small red circle]"
    fig = plot_samples(RefExpDataset(root, "val", 64, 32), n=4, cols=2)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert len(titles) == 4 and all("[" in t for t in titles)
    fig2 = plot_samples(DetectionDataset(root, 64), n=2)
    assert len([a for a in fig2.axes if a.get_title()]) == 2
