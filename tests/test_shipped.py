"""The pretrained parts shipped inside the package: hashes checked at load, strict loads, size, and the shipped
GLIP's recorded detection R@1 and the shipped DiT's recorded mask IoU re-measured."""
import json
import shutil

import pytest
import torch

from minidiffprompt.utils.checkpoint import CheckpointMismatch
from minidiffprompt.utils.shipped import ROOT, resolve_weights, shipped, verify

NAMES = sorted(p.name for p in ROOT.iterdir() if p.is_dir())


def test_the_package_ships_its_stand_ins_within_20_mb():
    assert {"tiny_bert", "tiny_glip", "tiny_vae", "tiny_dit"} <= set(NAMES)
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
    from minidiffprompt.dit import dit_arch, load_dit
    from minidiffprompt.vae import load_mask_vae
    load_mask_vae(shipped("tiny_vae"))                                 # strict, architecture from its config.json
    load_dit(shipped("tiny_dit"), **dit_arch(get_preset("tiny").dit))  # strict
    if "tiny_clip" in NAMES:
        from minidiffprompt.conditions import load_tiny_clip
        load_tiny_clip(shipped("tiny_clip"))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    """The default synthetic set (seed 0, 1200 images): the one the shipped parts were trained and scored on."""
    from minidiffprompt.data.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("synthref"), log=lambda *a: None)


def test_shipped_glip_reaches_its_recorded_detection_recall(default_set, one_thread):
    """Re-measure the held-out detection R@1 on the default synthetic set (the one it was evaluated on), on one
    thread as it was measured (conftest.py restores the thread count for the tests after this one)."""
    from minidiffprompt.config import get_preset
    from minidiffprompt.glip.model import load_glip_checkpoint
    from minidiffprompt.pretrain.train_glip import detection_recall, holdout_indices, load_detection
    preset = get_preset("tiny")
    images, targets, categories, _ = load_detection(default_set, preset.data.image_size)
    _, hold = holdout_indices(len(images), preset.glip.holdout_fraction)
    folder = shipped("tiny_glip")
    recorded = json.loads((folder / "metrics.json").read_text())
    got = detection_recall(load_glip_checkpoint(folder).eval(), images[hold], [targets[i] for i in hold],
                           categories, torch.device("cpu"))
    assert got["n"] == recorded["detection_queries"]
    assert abs(got["R@1"] - recorded["detection_R@1"]) <= 100.0 / got["n"] + 1e-6   # one query at most


def test_shipped_dit_reaches_its_recorded_mask_iou(default_set):
    """DDIM from the evaluation's fixed noise on the val pairs it was scored on: the conditioned mask IoU recorded at
    shipping comes back (notebook 02 re-measures the shuffled ones too). Float rounding on another machine may move a
    trajectory a little; 0.01 is three of the 300 masks changing completely."""
    from minidiffprompt import train_dit
    from minidiffprompt.config import get_preset
    from minidiffprompt.pipeline import load_generator_parts
    preset = get_preset("tiny")
    vae, dit, diffusion, encoder = load_generator_parts(preset, "unused")   # the shipped tiny_vae and tiny_dit
    recorded = json.loads((shipped("tiny_dit") / "metrics.json").read_text())
    val = train_dit.encode_split(default_set, "val", preset, vae, encoder, "cpu", max_items=recorded["val_items"])
    z, _ = train_dit.generate_latents(dit, diffusion, val["image_features"], val["text_features"],
                                      preset.dit.ddim_steps, train_dit.EVAL_SEED)
    with torch.no_grad():
        got = train_dit.mask_iou(vae.decode(z), val["mask"]).mean().item()
    assert abs(got - recorded["val_iou"]) <= 0.01, (got, recorded["val_iou"])
