"""The assembled GLIP (glip.py): the official key manifest loads strictly into the paper-size model
with `reconcile_glip_state_dict`, the parameter count, a tiny model's training/inference paths, prompts receiving
gradients through the frozen model, run-folder round trip, and (slow) a paper-size forward + backward."""
import dataclasses
import json
import resource
import time
import warnings
from pathlib import Path

import pytest
import torch

from minidiffprompt.utils.checkpoint import CheckpointMismatch, keys_from_tsv, save_weights
from minidiffprompt.config import GLIPConfig
from minidiffprompt.glip.model import GLIP, count_parameters, load_glip_checkpoint
from minidiffprompt.data.text import load_tokenizer

KEYS = Path(__file__).parent / "fixtures" / "glip_a_tiny_o365.tsv"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue", "circle", "square", "left", "of",
         "big", "small", "on", ".", "star", "##s"]


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bert-base-uncased config not cached: BertConfig() is the same shape
        return GLIP(GLIPConfig())


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def tiny_cfg(vocab) -> GLIPConfig:
    return dataclasses.replace(GLIPConfig.tiny(), text_vocab=str(vocab), fpn_channels=32, dyhead_blocks=1,
                               embed_dim=16, num_heads=(1, 1, 2, 2), text_hidden=32, text_layers=2, text_heads=2)


# ---------------------------------------------------------------------------------------------------------------
# paper size: keys and parameter count


def test_official_key_manifest_loads_strictly(paper_model, tmp_path):
    """A file shaped like glip_a_tiny_o365.pth ({"model": ...}, `module.` prefix, position_ids, pooler, 80-ch
    cls_logits) loads strictly."""
    shapes = keys_from_tsv(KEYS)
    assert len(shapes) == 541
    own = paper_model.state_dict()
    assert set(own) == set(shapes) and all(tuple(own[k].shape) == s for k, s in shapes.items())
    # stride-0 views keep the file tiny while every tensor has its full shape
    state = {"module." + k: torch.zeros(1, dtype=own[k].dtype).expand(s) for k, s in shapes.items()}
    state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    state["module.language_backbone.body.model.pooler.dense.weight"] = torch.zeros(1).expand(768, 768)
    state["module.language_backbone.body.model.pooler.dense.bias"] = torch.zeros(768)
    path = tmp_path / "glip_a_tiny_o365.pth"
    torch.save({"model": state, "iteration": 0}, path)
    model = load_glip_checkpoint(path)
    assert model.rpn.head.cls_logits.weight.shape == (80, 256, 1, 1)
    assert model.rpn.head.bias0.item() == 0.0  # values came from the file


def test_paper_parameter_count(paper_model):
    assert count_parameters(paper_model) == 151_430_526                       # the official GLIP-T(A), 80 cls_logits
    assert count_parameters(paper_model.backbone) == 30_815_738
    assert count_parameters(paper_model.language_backbone) == 108_891_648
    assert count_parameters(paper_model.rpn) == 11_723_140


# ---------------------------------------------------------------------------------------------------------------
# tiny model: both paths, frozen mode, prompts, run folder


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 96, generator=g)
    captions = ["red circle. blue square.", "the big star left of the small circle"]
    targets = [{"boxes": torch.tensor([[10.0, 10, 40, 40], [50, 50, 80, 90]]), "spans": [[[0, 10]], [[12, 23]]]},
               {"boxes": torch.tensor([[20.0, 30, 60, 70]]), "spans": [[[4, 12]]]}]
    return images, captions, targets


def test_tiny_training_and_inference_paths(vocab):
    torch.manual_seed(0)
    model = GLIP(tiny_cfg(vocab))
    images, captions, targets = _batch()
    losses = model.train()(images, captions, targets=targets)
    assert set(losses) == {"loss_token", "loss_reg", "loss_centerness"}
    sum(losses.values()).backward()
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(images, captions, spans=[[[0, 10]], None])
    for d in dets:
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) == len(d["scores"]) <= 100
        assert (d["scores"][:-1] >= d["scores"][1:]).all()                 # ranked
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 95).all()       # clipped to the image


def test_frozen_parts_stay_in_eval_and_prompts_get_gradients(vocab):
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab)
    model = GLIP(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    assert model.train() is model
    assert not model.backbone.body.training and not model.language_backbone.training
    assert not model.rpn.head.training and not model.backbone.fpn.training
    images, captions, targets = _batch()
    visual = [torch.randn(2, 8, cfg.embed_dim, requires_grad=True) for _ in range(4)]
    textual = [torch.randn(2, 8, cfg.text_hidden, requires_grad=True) for _ in range(2)]
    losses = model(images, captions, targets=targets, visual_prompts=visual, textual_prompts=textual)
    sum(losses.values()).backward()
    for p in visual + textual:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # deterministic: the frozen model runs as at inference (no dropout, DropPath, DropBlock)
    again = model(images, captions, targets=targets, visual_prompts=visual, textual_prompts=textual)
    torch.testing.assert_close(sum(again.values()), sum(losses.values()))


def test_run_folder_round_trip(vocab, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab)
    model = GLIP(cfg).eval()
    folder = tmp_path / "glip"
    save_weights(model.state_dict(), folder / "model.safetensors")
    (folder / "vocab.txt").write_text(vocab.read_text())
    (folder / "config.json").write_text(json.dumps({"glip": dataclasses.asdict(dataclasses.replace(cfg, text_vocab=""))}))
    loaded = load_glip_checkpoint(folder).eval()
    images, captions, _ = _batch()
    with torch.no_grad():
        a, b = model(images, captions), loaded(images, captions)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["boxes"], y["boxes"])
        torch.testing.assert_close(x["scores"], y["scores"])
    # a truncated file fails, naming the missing key
    state = model.state_dict()
    del state["rpn.head.bbox_pred.weight"]
    save_weights(state, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match="rpn.head.bbox_pred.weight"):
        load_glip_checkpoint(folder)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_size_forward_backward_with_prompts(paper_model, vocab):
    """224×224, batch 2, prompts of depth 9 and length 8 into the frozen paper-size GLIP (Diff-Prompt's values)."""
    model = paper_model
    model.tokenizer = load_tokenizer(vocab)  # bert-base-uncased's vocabulary is not needed for the compute path
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    captions = ["the red circle on the left", "big blue square"]
    targets = [{"boxes": torch.tensor([[20.0, 30, 120, 150]]), "spans": [[[4, 14]]]},
               {"boxes": torch.tensor([[100.0, 60, 200, 220]]), "spans": [[[0, 15]]]}]
    visual = [torch.randn(2, 8, 96, requires_grad=True) for _ in range(9)]
    textual = [torch.randn(2, 8, 768, requires_grad=True) for _ in range(9)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    losses = model(images, captions, targets=targets, visual_prompts=visual, textual_prompts=textual)
    t1 = time.time()
    sum(losses.values()).backward()
    t2 = time.time()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npaper-size GLIP, 224², batch 2, prompts depth 9 × 8: forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s, "
          f"peak RSS {rss1 / 1024:.0f} MiB (was {rss0 / 1024:.0f} MiB before the step)")
    assert all(torch.isfinite(v) for v in losses.values())
    for p in visual + textual:
        assert p.grad is not None and p.grad.abs().sum() > 0
