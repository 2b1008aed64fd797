"""Condition encoders: the CLIP path against transformers' own modules run step by step (a tiny random CLIP
saved to disk, loaded offline), and the tiny encoder's promises (deterministic, keeps layout and word order)."""
import dataclasses
import json

import pytest
import torch

from minidiffprompt.conditions import CLIPConditionEncoder, TinyConditionEncoder, build_condition_encoder
from minidiffprompt.config import DiTConfig
from minidiffprompt.dit import dit_arch


def _byte_chars():
    """GPT-2/CLIP's bytes_to_unicode: one printable character per byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_clip_folder(path):
    """A random CLIP (vision 32², patch 8, width 32; text width 32; projection 16) and a byte-level BPE
    tokenizer with no merges, written the way from_pretrained expects them."""
    transformers = pytest.importorskip("transformers")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(path)
    eot = vocab["<|endoftext|>"]
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=eot,
                         bos_token_id=eot - 1, pad_token_id=eot),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(path)
    return transformers.CLIPModel.from_pretrained(path).eval(), tok


def test_clip_encoder_matches_transformers_step_by_step(tmp_path):
    model, tok = _tiny_clip_folder(tmp_path / "clip")
    enc = CLIPConditionEncoder(str(tmp_path / "clip"), image_size=32)
    assert enc.dim == 16
    images = torch.rand(2, 3, 32, 32)
    captions = ["The small RED circle.", "the square on the left"]
    img, txt = enc.encode(images, captions)
    with torch.no_grad():
        # encode_image: CLS after post-LN, projected, not normalised; the input is RGB in [-1, 1] (the authors'
        # DiT-main transform: Resize, ToTensor, Normalize(0.5, 0.5))
        ref_img = model.visual_projection(model.vision_model(pixel_values=images * 2 - 1).pooler_output)
        ids = tok(["the small red circle", "the square on the left"], padding="max_length", max_length=77,
                  truncation=True, return_tensors="pt")["input_ids"]
        assert ids.shape == (2, 77)
        hidden = model.text_model(input_ids=ids).last_hidden_state               # (B, 77, 32)
        eot = (ids == tok.convert_tokens_to_ids("<|endoftext|>")).int().argmax(1)  # first EOT: clip.tokenize argmax
        ref_txt = model.text_projection(hidden[torch.arange(2), eot])
    assert torch.allclose(img, ref_img, atol=1e-5)
    assert torch.allclose(txt, ref_txt, atol=1e-5)
    # larger images are resized to the encoder's size, not cropped
    big, _ = enc.encode(torch.nn.functional.interpolate(images, size=64, mode="nearest"), captions)
    assert big.shape == (2, 16)


def test_clip_encoder_missing_folder_says_what_to_do(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CLIPConditionEncoder(str(tmp_path / "no-such-clip"))


def test_tiny_encoder_deterministic_and_informative():
    # the global features (no image map, one caption vector); 128-d, so that the 2·8² grid values fit losslessly
    cfg = dataclasses.replace(DiTConfig.tiny(), condition="tiny", image_map=False, caption_tokens=0, cond_dim=128)
    a, b = build_condition_encoder(cfg), build_condition_encoder(cfg)
    images = torch.rand(3, 3, 96, 96)
    caps = ["the red circle left of the blue square", "the blue square left of the red circle", "the red circle"]
    ia, ta = a.encode(images, caps)
    ib, tb = b.encode(images, caps)
    assert ia.shape == ta.shape == (3, cfg.cond_dim)
    assert torch.equal(ia, ib) and torch.equal(ta, tb)                          # seeded, frozen
    assert not torch.allclose(ta[0], ta[1], atol=1e-3)                          # word order matters
    assert torch.allclose(a.encode(images, ["The Red Circle."])[1][0], ta[2])   # cleaned like the authors
    # the image feature is an isometry of the opponent-colour grid: painting a red patch changes it by the grid
    # distance, while grey (any brightness) maps to the same feature as black
    moved = images.clone()
    moved[0, :, :16, :16] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    im, _ = a.encode(moved, caps)

    def cells(x):
        r, g, b = x.unbind(1)
        return torch.nn.functional.adaptive_avg_pool2d(torch.stack([r - g, b - (r + g) / 2], 1) * 2, a.grid).flatten(1)

    assert torch.allclose((im[0] - ia[0]).norm(), a.scale * (cells(moved)[0] - cells(images)[0]).norm(), rtol=1e-4)
    grey = a.encode(torch.full((1, 3, 96, 96), 0.6), caps[:1])[0]
    black = a.encode(torch.zeros(1, 3, 96, 96), caps[:1])[0]
    assert torch.allclose(grey, black, atol=1e-6)
    assert isinstance(a, TinyConditionEncoder) and not any(p.requires_grad for p in a.parameters())


def test_tiny_encoder_image_map():
    """With image_map the image feature is the image on the latent grid (6×6-pixel means here), centred."""
    cfg = dataclasses.replace(DiTConfig.tiny(), condition="tiny", image_map=True)
    enc = build_condition_encoder(cfg)
    images = torch.rand(2, 3, 96, 96)
    img, txt = enc.encode(images, ["the red circle", "the big square"])
    assert img.shape == (2, 3, cfg.input_size, cfg.input_size) and txt.shape == (2, 16, cfg.cond_dim)
    cell = images[1, :, 6:12, 12:18].mean(dim=(1, 2))               # latent cell (row 1, column 2)
    assert torch.allclose(img[1, :, 1, 2], (cell - 0.5) * 4, atol=1e-5)
    with pytest.raises(ValueError, match="tiny condition encoder"):
        build_condition_encoder(dataclasses.replace(cfg, condition="clip"))


def test_tiny_encoder_caption_tokens():
    """caption_tokens: one hashed word vector per word, in order, zero rows as padding."""
    cfg = dataclasses.replace(DiTConfig.tiny(), condition="tiny", caption_tokens=5)
    enc = build_condition_encoder(cfg)
    _, txt = enc.encode(torch.rand(2, 3, 96, 96), ["the red circle", "circle the"])
    assert txt.shape == (2, 5, cfg.cond_dim)
    torch.testing.assert_close(txt[0, :3].norm(dim=1), torch.ones(3))
    assert torch.equal(txt[1, :2], txt[0, [2, 0]]) and not txt[0, 3:].any() and not txt[1, 2:].any()


def test_learned_encoder_recipe_and_its_features(tmp_path):
    """train-clip runs a few steps; the encoder built from its folder gives a layer-normalised map of the DiT's
    grid (image_map) or a global feature, and a caption feature of norm 10 that depends on the words."""
    from minidiffprompt.pretrain import train_clip
    from minidiffprompt.config import get_preset
    from minidiffprompt.dit import dit_arch
    from minidiffprompt.data.synthetic import ensure_synthetic
    data = ensure_synthetic(tmp_path / "synth", seed=1, images=30, log=lambda *a: None)
    preset = get_preset("tiny")
    preset.clip.steps, preset.clip.batch_size = 3, 8
    metrics = train_clip.main(preset, data, tmp_path)
    assert metrics["steps"] == 3 and 0 <= metrics["val_retrieval_top1_of_64"] <= 100
    cfg = dataclasses.replace(preset.dit, condition="tiny_clip", clip_path=str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="caption_tokens 0 --hidden_size 128"):
        build_condition_encoder(cfg)                                 # it gives one caption vector, not tokens
    cfg = dataclasses.replace(cfg, caption_tokens=0, hidden_size=128, cond_dim=128)
    enc = build_condition_encoder(cfg)
    images = torch.rand(2, 3, 96, 96)
    fmap, txt = enc.encode(images, ["the red star", "the leftmost blue circle"])
    assert fmap.shape == (2, 8, cfg.input_size, cfg.input_size) and dit_arch(cfg)["image_channels"] == 8
    torch.testing.assert_close(fmap.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.norm(dim=1), torch.full((2,), 10.0))
    assert not torch.allclose(txt[0], txt[1])
    img, _ = build_condition_encoder(dataclasses.replace(cfg, image_map=False)).encode(images, ["a", "b"])
    assert img.shape == (2, cfg.cond_dim)


def test_backbone_encoder_reads_the_frozen_glip_swin():
    """condition glip: the image map is the C3 map of the given GLIP's Swin, layer-normalised at every position; the
    caption is the hand-built encoder's word tokens; nothing trains."""
    from minidiffprompt.dit import map_channels
    from minidiffprompt.data.datasets import glip_normalize
    from minidiffprompt.glip.model import load_glip_checkpoint
    from minidiffprompt.utils.shipped import resolve_weights
    cfg = dataclasses.replace(DiTConfig.tiny(), condition="glip", clip_path="shipped:tiny_glip", image_map=True)
    enc = build_condition_encoder(cfg)
    images, caps = torch.rand(2, 3, 96, 96), ["the red circle", "the big square"]
    img, txt = enc.encode(images, caps)
    c3 = load_glip_checkpoint(resolve_weights(cfg.clip_path)).backbone.body(glip_normalize(images))[1]
    assert img.shape == (2, map_channels(cfg), 12, 12) == c3.shape
    torch.testing.assert_close(img, torch.nn.functional.layer_norm(c3.transpose(1, -1), (c3.shape[1],)).transpose(1, -1))
    hand = build_condition_encoder(dataclasses.replace(cfg, condition="tiny"))
    assert torch.equal(txt, hand.encode(images, caps)[1])
    assert not any(p.requires_grad for p in enc.parameters())
