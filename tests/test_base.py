"""The tiny preset's pretrained base: MLM pre-training of the small BERT, phrase prompts for GLIP pre-training,
Swin's absolute position option, the expression kinds, the linear position probe, and the `eval-base` command."""
import json
import random
from pathlib import Path

import pytest
import torch

from minidiffprompt.pretrain.base_eval import linear_probe_r2
from minidiffprompt.config import get_preset
from minidiffprompt.glip.swin import SwinTransformer
from minidiffprompt.data.synthetic import _candidates, expression_kind, scene_objects
from minidiffprompt.pretrain.train_bert import mask_tokens
from minidiffprompt.pretrain.train_glip import MIRROR, halves, make_targets, phrase_prompt


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from minidiffprompt.data.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), seed=1, images=30, size=128, log=lambda *a: None)


def test_expression_kind_matches_the_generator():
    """The kind read off a sentence is the grammar that wrote it, for every candidate of 40 scenes."""
    seen = set()
    for i in range(40):
        objs = scene_objects(5, i, 128, "train")
        for t in objs:
            for kind, sentence, _ in _candidates(t, objs):
                assert expression_kind(sentence) == {"attr": "attribute"}.get(kind, kind), sentence
                seen.add(kind)
    assert seen == {"attr", "extreme", "relation"}


def test_phrase_prompt_spans_describe_their_boxes():
    rng = random.Random(0)
    cats, attrs = ["star", "circle", "star"], [["small", "red"], ["big", "red"], ["big", "blue"]]
    pool = [("small", "green"), ("big", "red"), ("small", "red"), ("big", "blue")]
    for _ in range(50):
        caption, spans = phrase_prompt(cats, attrs, ["star", "circle", "square"], rng, pool)
        phrases = [p for p in caption.rstrip(".").split(". ")]
        assert len(spans) == 3
        for c, a, box_spans in zip(cats, attrs, spans):
            assert box_spans, "every box is named by at least its own phrase"
            for b, e in box_spans:
                assert set(caption[b:e].split()) <= {c, *a}
        described = {caption[b:e] for s in spans for b, e in s}
        for p in phrases:   # the others are negatives: no object has all their words
            if p not in described:
                assert not any(set(p.split()) <= {c, *a} for c, a in zip(cats, attrs)), p


def test_position_phrases_name_the_half_each_box_is_in():
    """"left star" is a positive of the stars whose centre is in the left half and of no other box; the mirror
    "top circle" joins the negatives beside "bottom circle" when no circle is at the top; no prompt outgrows its
    word budget (words and full stops)."""
    rng = random.Random(0)
    boxes = torch.tensor([[2.0, 2, 12, 12], [40, 50, 50, 60], [10, 40, 20, 50]])   # S = 64: TL, BR, BL
    cats, attrs = ["star", "star", "circle"], [["small", "red"], ["small", "red"], ["big", "blue"]]
    where = [halves(b, 64) for b in boxes]
    assert where == [["left", "top"], ["right", "bottom"], ["left", "bottom"]]
    pool = [("small", "red"), ("big", "blue"), ("big", "green")]
    named, mirrors = set(), 0
    for _ in range(200):
        caption, spans = phrase_prompt(cats, attrs, ["star", "circle", "square"], rng, pool, where=where,
                                       position=0.5)
        phrases = caption.rstrip(".").split(". ")
        assert sum(len(p.split()) + 1 for p in phrases) <= 30
        for c, a, w, box_spans in zip(cats, attrs, where, spans):
            for b, e in box_spans:
                assert set(caption[b:e].split()) <= {c, *a, *w}
        for p in phrases:
            fit = [set(p.split()) <= {c, *a, *w} for c, a, w in zip(cats, attrs, where)]
            assert fit == [any(caption[b:e] == p for b, e in s) for s in spans], (p, caption)
            named |= set(p.split()) & set(MIRROR)
        if "bottom circle" in phrases:                 # its mirror fits nothing: always a negative beside it
            assert "top circle" in phrases
            mirrors += 1
    assert named == set(MIRROR) and mirrors > 0


def test_make_targets_without_attributes_falls_back_to_class_prompts():
    rng = random.Random(0)
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    captions, targets = make_targets([(boxes, ["star"], [[]])], ["circle", "star"], rng, phrases=1.0)
    assert set(captions[0].rstrip(".").split(". ")) == {"circle", "star"}
    b, e = targets[0]["spans"][0][0]
    assert captions[0][b:e] == "star"


def test_bert_masking_follows_the_80_10_10_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (400, 50))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, special, mask_id=4, vocab_size=100, g=g)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 49 / 50) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.03
    assert 0.08 < kept.sum() / chosen.sum() < 0.13          # 10 % unchanged + random draws that hit the same id
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_linear_probe_r2_recovers_a_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    owner = torch.arange(400).repeat_interleave(5)
    x = torch.randn(len(owner), 16, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * 0.3 + x[:, 3] * 0.1, -x[:, 5] * 0.2], 1)
    assert linear_probe_r2(x, y + 1e-3 * torch.randn(y.shape, generator=g, dtype=torch.float64), owner) > 0.99
    assert linear_probe_r2(x, torch.rand(y.shape, generator=g, dtype=torch.float64), owner) < 0.05


def test_swin_absolute_position_option():
    """Off (GLIP-T(A)): no extra parameter, and a token's output does not depend on where its window is. On: the
    table is added to the patch tokens, resized to any input grid."""
    torch.manual_seed(0)
    off = SwinTransformer(4, 16, (2, 2), (1, 2), window_size=4, drop_path_rate=0.0).eval()
    assert not any("absolute_pos_embed" in k for k in off.state_dict())
    on = SwinTransformer(4, 16, (2, 2), (1, 2), window_size=4, drop_path_rate=0.0, ape_grid=8).eval()
    on.load_state_dict({**off.state_dict(), "absolute_pos_embed": on.absolute_pos_embed.detach() * 0}, strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(on(x)[0], off(x)[0], atol=1e-6)          # a zero table is no table
    with torch.no_grad():
        on.absolute_pos_embed.normal_()
    assert not torch.allclose(on(x)[0], off(x)[0], atol=1e-3)
    assert on(torch.randn(1, 3, 48, 48))[0].shape == (1, 16, 12, 12)  # another grid: the table is resized


def test_train_bert_recipe_runs_and_loads_into_glip(data, tmp_path):
    from minidiffprompt.pretrain import train_bert
    from minidiffprompt.glip.bert import load_text_weights
    from minidiffprompt.glip.model import GLIP
    preset = get_preset("tiny")
    preset.bert.steps, preset.bert.batch_size = 20, 16
    metrics = train_bert.main(preset, data, tmp_path)
    assert metrics["steps"] == 20 and 0 <= metrics["val_masked_accuracy"] <= 100
    folder = tmp_path / "bert"
    glip = GLIP(preset.glip, vocab_file=folder / "vocab.txt")
    before = glip.language_backbone.body.model.embeddings.word_embeddings.weight.clone()
    load_text_weights(glip.language_backbone.body.model, folder)
    assert not torch.equal(before, glip.language_backbone.body.model.embeddings.word_embeddings.weight)
    assert train_bert.main(preset, data, tmp_path) == metrics          # a finished run is reused


def test_train_glip_recipe_runs_with_phrase_prompts_and_pretrained_text(data, tmp_path):
    """The shipped GLIP's recipe (MLM BERT, phrase prompts, Swin position table), then its continuation with
    position phrases, for a few steps each."""
    from minidiffprompt.pretrain import train_bert, train_glip
    preset = get_preset("tiny")
    preset.bert.steps, preset.bert.batch_size = 5, 8
    train_bert.main(preset, data, tmp_path)
    g = preset.glip
    g.epochs, g.eval_max_items, g.text_weights = 1, 4, str(tmp_path / "bert")
    g.phrase_prompts, g.swin_ape = 0.5, 24
    metrics = train_glip.main(preset, data, tmp_path)
    assert metrics["history"][0]["loss_token"] > 0 and "command" in metrics
    assert (tmp_path / "glip" / "vocab.txt").read_text() == (tmp_path / "bert" / "vocab.txt").read_text()
    # its second step continues that GLIP with position phrases; at lr 0 the continued weights are the loaded ones
    from minidiffprompt.glip.model import load_glip_checkpoint
    g.init_weights, g.position_phrases, g.lr = str(tmp_path / "glip"), 0.75, 0.0
    train_glip.main(preset, data, tmp_path / "continued")
    before = load_glip_checkpoint(tmp_path / "glip").state_dict()
    after = load_glip_checkpoint(tmp_path / "continued" / "glip").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("token_lr_mult", [-1.0, 1.0])
def test_glip_pretraining_gives_the_heads_token_side_its_own_step(token_lr_mult):
    """Every trainable parameter in exactly one group; the word projection and bias_lang at token_lr_mult x lr,
    or with the head's predictors when token_lr_mult < 0; the frozen language backbone in none."""
    import dataclasses
    from minidiffprompt.glip.model import GLIP
    from minidiffprompt.utils.shipped import shipped
    from minidiffprompt.pretrain.train_glip import param_groups
    g = dataclasses.replace(get_preset("tiny").glip, text_weights="", text_lr_mult=0.0, token_lr_mult=token_lr_mult)
    model = GLIP(g, vocab_file=shipped("tiny_glip") / "vocab.txt")
    model.language_backbone.requires_grad_(False)
    groups = param_groups(model, g)
    lr_of = {id(p): grp["lr"] for grp in groups for p in grp["params"]}
    assert sum(len(grp["params"]) for grp in groups) == len(lr_of)               # no parameter twice
    names = dict(model.named_parameters())
    assert {n for n, p in names.items() if id(p) in lr_of} == \
        {n for n in names if not n.startswith("language_backbone.")}
    token = g.lr * (token_lr_mult if token_lr_mult >= 0 else g.head_lr_mult)
    assert lr_of[id(names["rpn.head.dot_product_projection_text.weight"])] == token
    assert lr_of[id(names["rpn.head.bias_lang"])] == token
    assert lr_of[id(names["rpn.head.bbox_pred.weight"])] == g.lr * g.head_lr_mult
    assert lr_of[id(names["backbone.body.patch_embed.proj.weight"])] == g.lr


def test_eval_base_writes_the_issue_format(data, tmp_path):
    from minidiffprompt.pretrain import train_glip
    from minidiffprompt.__main__ import main
    preset = get_preset("tiny")
    preset.glip.epochs, preset.glip.eval_max_items = 1, 2
    train_glip.main(preset, data, tmp_path)
    out = tmp_path / "base.json"
    main(["eval-base", "--preset", "tiny", "--data", str(data), "--glip_weights", str(tmp_path / "glip"),
          "--out", str(out), "--probe", "--holdout_fraction", "0.5"])
    result = json.loads(out.read_text())
    assert set(result["referring_R@1"]) <= {"attribute", "extreme", "relation", "all"}
    assert "all" in result["referring_R@1"] and 0 <= result["detection_R@1"] <= 100
    assert result["referring_expressions"]["all"] == sum(v for k, v in result["referring_expressions"].items()
                                                         if k != "all")
    assert -1 < result["position_R2"]["R2"] <= 1
    assert result["position_words"]["n"] > 0 and 0 <= result["position_words"]["R@1"] <= 100
    levels = result["position_R2"]["by_level"]
    assert set(levels) <= {"P3", "P4", "P5", "P6", "P7"} and abs(sum(v["share"] for v in levels.values()) - 1) < 0.01
    assert all(v["R2"] is None or -10 < v["R2"] <= 1 for v in levels.values())
    probe = result["colour_probe"]
    assert set(probe["accuracy"]) == {"pixels", "swin_C3", "fpn_P3", "dyhead_P3"} and probe["colours"] >= 2
    assert all(0 <= v <= 100 for v in probe["accuracy"].values())
    assert -1 <= result["colour_words"]["head"] <= 1 and result["colour_words"]["colours"] == probe["names"]


def test_colour_words_compares_the_colour_token_and_nothing_else():
    """Two captions that differ only in the colour word: one colour twice gives cosine 1, two colours less (it
    would be 1 too if the measure read any other token of the template)."""
    from minidiffprompt.pretrain.base_eval import colour_words
    from minidiffprompt.pipeline import load_glip
    model = load_glip(get_preset("tiny"), Path("unused"))
    assert colour_words(model, ["red", "red"])["bert"] == pytest.approx(1.0, abs=1e-3)
    assert colour_words(model, ["red", "green"])["bert"] < 0.999


def test_the_colour_probe_reads_colour_from_pixels_and_not_from_a_blind_network():
    """Objects whose only difference is their colour: the pixels tell it perfectly; a network whose features are
    constant cannot (chance level)."""
    from minidiffprompt.pretrain.base_eval import colour_probe
    g = torch.Generator().manual_seed(0)
    palette = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 1.0)}
    images, boxes, colours = torch.full((40, 3, 32, 32), 0.5), [], []
    for i in range(40):
        names = [list(palette)[int(v)] for v in torch.randint(0, 3, (2,), generator=g)]
        bx = torch.tensor([[2.0, 2.0, 14.0, 14.0], [18.0, 18.0, 30.0, 30.0]])
        for (x1, y1, x2, y2), n in zip(bx.int().tolist(), names):
            images[i, :, y1:y2, x1:x2] = torch.tensor(palette[n])[:, None, None]
        boxes.append(bx), colours.append(names)

    class Blind(torch.nn.Module):          # every feature map constant: nothing about the image survives
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.body = lambda x: [torch.ones(len(x), 4, 8, 8)] * 4
            self.backbone.fpn = lambda c: [torch.ones(len(c[0]), 4, 4, 4)] * 5
            self.rpn = torch.nn.Module()
            self.rpn.head = torch.nn.Module()
            self.rpn.head.tower = lambda feats: feats
    acc = colour_probe(Blind(), images, boxes, colours)["accuracy"]
    assert acc["pixels"] == 100.0 and acc["fpn_P3"] < 60 and acc["dyhead_P3"] < 60


def test_random_flips_move_boxes_with_the_pixels():
    from minidiffprompt.glip.atss import inclusive_boxes
    from minidiffprompt.pretrain.train_glip import random_flips
    S, px = 32, 0.5                                        # an original image of 64 px shown at 32
    img = torch.zeros(1, 3, S, S)
    img[0, :, 4:10, 20:30] = 1.0                           # rows 4..9, columns 20..29
    box = inclusive_boxes(torch.tensor([[20.0, 4.0, 30.0, 10.0]]), (px, px), S)
    seen = set()
    for seed in range(12):
        out, boxes = random_flips(img, [box], [(px, px)], random.Random(seed))
        x1, y1, x2, y2 = boxes[0][0].tolist()
        on = out[0, 0].nonzero()
        assert (on[:, 1].min(), on[:, 0].min()) == (round(x1), round(y1))          # continuous x1 = first pixel
        assert (on[:, 1].max() + 1 - px, on[:, 0].max() + 1 - px) == (x2, y2)      # inclusive x2 = last − pixel
        seen.add((x1, y1))
    assert len(seen) == 4                                   # all four flip combinations occurred
