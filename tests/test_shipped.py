"""The pretrained parts shipped inside the package: hashes checked at load, strict loads, size, and the shipped
GLIP's recorded detection R@1 re-measured."""
import json
import shutil

import pytest
import torch

from minidiffprompt.utils.checkpoint import CheckpointMismatch
from minidiffprompt.pretrain.shipped import ROOT, resolve_weights, shipped, verify

NAMES = sorted(p.name for p in ROOT.iterdir() if p.is_dir())


def test_the_package_ships_its_stand_ins_within_20_mb():
    assert {"tiny_bert", "tiny_glip"} <= set(NAMES)
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"{total / 2**20:.1f} MB shipped"


@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_folder_matches_its_hashes_and_records_its_command(name):
    folder = shipped(name)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["command"].startswith("python -m minidiffprompt ") and metrics["train_time_s"] > 0
    assert resolve_weights(f"shipped:{name}") == folder


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_an_altered_shipped_file_is_refused_by_name(tmp_path, damage):
    folder = tmp_path / "tiny_bert"
    shutil.copytree(ROOT / "tiny_bert", folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
    with pytest.raises(CheckpointMismatch, match="model.safetensors"):
        verify(folder)


def test_shipped_weights_load_strictly():
    from transformers import BertModel
    from minidiffprompt.glip.bert import build_bert
    from minidiffprompt.config import get_preset
    from minidiffprompt.glip.model import load_glip_checkpoint
    from minidiffprompt.glip.bert import load_text_weights
    cfg = get_preset("tiny").glip
    bert: BertModel = build_bert(cfg, ROOT / "tiny_bert" / "vocab.txt")
    load_text_weights(bert, shipped("tiny_bert"))                     # load_strict inside
    glip = load_glip_checkpoint(shipped("tiny_glip"))                  # load_strict inside
    assert glip.cfg.swin_ape == cfg.swin_ape and not glip.cfg.text_model
    if "tiny_clip" in NAMES:
        from minidiffprompt.pretrain.train_clip import load_tiny_clip
        load_tiny_clip(shipped("tiny_clip"))


def test_shipped_glip_reaches_its_recorded_detection_recall(tmp_path):
    """Re-measure the held-out detection R@1 on the default synthetic set (the one it was evaluated on)."""
    from minidiffprompt.config import get_preset
    from minidiffprompt.glip.model import load_glip_checkpoint
    from minidiffprompt.data.synthetic import ensure_synthetic
    from minidiffprompt.pretrain.train_glip import detection_recall, holdout_indices, load_detection
    torch.set_num_threads(1)
    preset = get_preset("tiny")
    data = ensure_synthetic(tmp_path / "synthref", log=lambda *a: None)   # seed 0, 1200 images: the default set
    images, targets, categories, _ = load_detection(data, preset.data.image_size)
    _, hold = holdout_indices(len(images), preset.glip.holdout_fraction)
    folder = shipped("tiny_glip")
    recorded = json.loads((folder / "metrics.json").read_text())
    got = detection_recall(load_glip_checkpoint(folder).eval(), images[hold], [targets[i] for i in hold],
                           categories, torch.device("cpu"))
    assert got["n"] == recorded["detection_queries"]
    assert abs(got["R@1"] - recorded["detection_R@1"]) <= 100.0 / got["n"] + 1e-6   # one query at most
