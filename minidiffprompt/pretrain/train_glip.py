"""Tiny GLIP pre-training on the synthetic detection split, then zero-shot evaluation of the frozen detector.

    python -m minidiffprompt train-glip --preset tiny                  # → runs/tiny/glip/ (240 epochs), then
    python -m minidiffprompt train-glip --preset tiny --init_weights runs/tiny/glip --phrase_prompts 0.75 \
        --lr 5e-4 --epochs 30 --out runs/tiny-cont                     # → runs/tiny-cont/glip/: the shipped recipe
    python -m minidiffprompt train-glip --preset tiny --text_weights runs/tiny/bert    # from your own train-bert

The stand-in for GLIP-T(A)'s Objects365 pre-training, run once and shipped (minidiffprompt/pretrained/tiny_glip):
every train image is paired with a prompt and all its boxes, and the whole detector trains with GLIP's own
grounding loss (GLIP paper §3.1; `atss.grounding_losses`). A prompt is either the class prompt ("star. circle. ...",
all categories, in a random order per sample so that no name is tied to a token position) or, with probability
`phrase_prompts`, a list of attribute phrases with negatives ("small red circle. star. blue square.", the
stand-in for GLIP's grounding data; `phrase_prompt`), some of whose phrases name the half of the image the
object is in (`position_phrases`: "left star"). Images are flipped at random (`flip_augment`). The language
backbone starts from `text_weights` (the MLM-pretrained small BERT of train_bert.py) and trains at
`text_lr_mult` × lr (0 freezes it). A few detection images are held out.
Afterwards the model is frozen and evaluated zero-shot:
  detection  R@1 when the prompt names a category that occurs exactly once in a held-out image;
  referring  R@1 / R@5 / UB on the synthetic RefCOCO splits (caption = the expression, score = mean probability
             of its noun-phrase tokens, `head.decode_detections`), which stage 3 then improves with prompts.
Output: RUN/glip/{checkpoint.pt (resumable), model.safetensors, config.json, vocab.txt, metrics.json}.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from ..utils.checkpoint import (RunMismatch, finished_run, fingerprint, load_training, match_run, restore_training,
                                save_training, write_run)
from ..config import Preset
from ..data.datasets import DetectionDataset, RefExpDataset, collate
from ..utils.distributed import all_reduce_mean, barrier, cleanup, init_distributed, is_main, rank, world_size, wrap_ddp
from ..glip.atss import inclusive_boxes
from ..glip.bert import load_text_weights
from ..glip.model import GLIP, count_parameters, load_glip_checkpoint
from ..metrics import evaluate_boxes, recall_at_k
from ..utils.runtime import command_line, progress, seed_everything
from ..utils.shipped import resolve_weights


def class_prompt(names: list[str]) -> tuple[str, dict]:
    """"a. b. c." and the character span of each name in it (GLIP's detection prompt)."""
    caption, spans = "", {}
    for name in names:
        spans[name] = [len(caption), len(caption) + len(name)]
        caption += name + ". "
    return caption.rstrip(), spans


def load_detection(data: Path, image_size: int):
    """All detection images in memory: (images (N,3,S,S), per image (boxes (G,4), category names, attribute word
    lists), category names, per image the width and height of one original pixel in the S frame)."""
    ds = DetectionDataset(data, image_size)
    items = [ds[i] for i in progress(range(len(ds)), desc="load detection images", leave=False)]
    images = torch.stack([it["image"] for it in items])
    pixels = [(image_size / im["width"], image_size / im["height"]) for im in ds.images]
    targets = [(inclusive_boxes(it["boxes"], px, image_size), it["categories"], it["attributes"])
               for it, px in zip(items, pixels)]
    return images, targets, ds.categories, pixels


def holdout_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of the detection images: the last `fraction` (at least one) is held out."""
    n_hold = max(1, int(n * fraction))
    return list(range(n - n_hold)), list(range(n - n_hold, n))


MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def halves(box, size: int) -> list[str]:
    """The position words true of a box: the half of the image its centre lies in, across and down."""
    cx, cy = (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2
    return ["left" if cx < size / 2 else "right", "top" if cy < size / 2 else "bottom"]


def phrase_prompt(cats: list[str], attrs: list[list[str]], categories: list[str], rng: random.Random,
                  attribute_sets: list[tuple], max_phrases: int = 7, attribute_only: float = 0.0,
                  where: list[list[str]] | None = None, position: float = 0.0,
                  max_words: int = 30) -> tuple[str, list[list]]:
    """A grounding prompt of noun phrases ("small red circle. star. blue square.") and, per box, the spans of the
    phrases that describe it (every word of the phrase is the box's category or one of its attributes).

    The stand-in for GLIP's grounding pre-training data (phrases with attributes, GLIP paper §3): one phrase per
    object, its attribute words a random subset of the object's, and negative phrases that describe no object of the
    image, in a random order. A share `attribute_only` of the phrases keep their attribute words alone ("green"),
    which then describe every object that has them: each attribute word learns its own visual meaning, not only as
    part of one shape's phrase. A share `position` of the phrases also name the half of the image the object is in
    ("left star", "bottom small circle"; `where` lists each object's true words, `halves`), as grounding data
    names places ("the man on the left"), and the same phrase with the opposite word ("right star") joins the
    negatives when it fits no object: the region features must then say where they are. The prompt keeps at most
    `max_words` words and full stops, the positive phrases first. Without attribute annotations (real COCO) the
    phrases are the category names.
    """
    where = where or [[] for _ in cats]
    described = list(zip(cats, attrs, where))

    def describe(c, a, w):
        words = [x for x in a if rng.random() < 0.6]
        if words and attribute_only and rng.random() < attribute_only:
            return " ".join(words)                # "green": every green object, whatever its shape
        if w and position and rng.random() < position:
            words = [rng.choice(w)] + words       # "left small star": every small star in the left half
        return " ".join(words + [c])
    fits = lambda phrase, c, a, w: set(phrase.split()) <= {c, *a, *w}             # noqa: E731
    phrases = [describe(c, a, w) for c, a, w in described]
    mirrored = [" ".join([MIRROR[p.split()[0]]] + p.split()[1:]) for p in phrases if p.split()[0] in MIRROR]
    phrases += [p for p in mirrored if not any(fits(p, *d) for d in described)]
    for _ in range(40):                       # negatives: phrases that fit no object of the image
        if len(set(phrases)) >= max_phrases:
            break
        phrase = describe(rng.choice(categories), rng.choice(attribute_sets), list(MIRROR) if position else [])
        if not any(fits(phrase, *d) for d in described):
            phrases.append(phrase)
    kept, words = [], 0
    for p in dict.fromkeys(phrases):
        words += len(p.split()) + 1
        if len(kept) == max_phrases or words > max_words:
            break
        kept.append(p)
    rng.shuffle(kept)
    caption, spans = class_prompt(kept)
    return caption, [[spans[p] for p in kept if fits(p, *d)] for d in described]


def make_targets(targets, categories, rng: random.Random, shuffle: bool = True, phrases: float = 0.0,
                 attribute_only: float = 0.0, position: float = 0.0, size: int = 0):
    """A prompt per image and the GLIP targets pointing at each box's words: with probability `phrases` a phrase
    prompt (`phrase_prompt`; a share `position` of its phrases name the box's half of the `size`-px image), else
    the class prompt with every category name (in a random order)."""
    attribute_sets = sorted({tuple(a) for _, _, attrs in targets for a in attrs if a})
    captions, out = [], []
    for boxes, cats, attrs in targets:
        if attribute_sets and rng.random() < phrases:
            where = [halves(b, size) for b in boxes] if position else None
            caption, box_spans = phrase_prompt(cats, attrs, list(categories), rng, attribute_sets,
                                               attribute_only=attribute_only, where=where, position=position)
        else:
            names = list(categories)
            if shuffle:
                rng.shuffle(names)
            caption, spans = class_prompt(names)
            box_spans = [[spans[c]] for c in cats]
        captions.append(caption)
        out.append({"boxes": boxes, "spans": box_spans})
    return captions, out


def random_flips(images: torch.Tensor, boxes: list[torch.Tensor], pixels: list[tuple[float, float]],
                 rng: random.Random):
    """Flip each image left-right and/or top-bottom (probability ½ each) with its inclusive boxes: a pixel at x goes
    to S − pixel width − x (and y to S − pixel height − y)."""
    S = images.shape[-1]
    images, out = images.clone(), []
    for b, (bx, (px, py)) in enumerate(zip(boxes, pixels)):
        bx = bx.clone()
        if rng.random() < 0.5:
            images[b] = images[b].flip(-1)
            bx[:, [0, 2]] = S - px - bx[:, [2, 0]]
        if rng.random() < 0.5:
            images[b] = images[b].flip(-2)
            bx[:, [1, 3]] = S - py - bx[:, [3, 1]]
        out.append(bx)
    return images, out


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot evaluation


@torch.no_grad()
def query_recall(model: GLIP, images: torch.Tensor, queries, device, batch_size: int = 64) -> tuple[float, int]:
    """The top box of each query (image index, caption, phrase spans, true box), in batches; → (R@1 in percent at
    IoU ≥ 0.5, number of queries)."""
    model.eval()
    preds = []
    for k in range(0, len(queries), batch_size):
        q = queries[k:k + batch_size]
        dets = model(images[[i for i, *_ in q]].to(device), [c for _, c, _, _ in q], spans=[s for _, _, s, _ in q])
        preds += [d["boxes"].cpu() for d in dets]
    return 100.0 * recall_at_k(preds, torch.stack([g for *_, g in queries]), k=1), len(queries)


def detection_recall(model: GLIP, images: torch.Tensor, targets, categories, device, batch_size: int = 64) -> dict:
    """R@1 (IoU ≥ 0.5) when the prompt names a category that occurs exactly once in the image."""
    caption, spans = class_prompt(list(categories))
    queries = [(i, caption, [spans[c]], boxes[j]) for i, (boxes, cats, _) in enumerate(targets)
               for j, c in enumerate(cats) if cats.count(c) == 1]
    if not queries:
        return {"R@1": 0.0, "n": 0}
    r1, n = query_recall(model, images, queries, device, batch_size)
    return {"R@1": r1, "n": n}


@torch.no_grad()
def referring_zero_shot(model: GLIP, data: Path, image_size: int, device, splits=("val", "testA", "testB"),
                        batch_size: int = 64, max_items: int = 0) -> dict:
    """R@1 / R@5 / UB in percent per referring split (boxes in the S×S frame, IoU ≥ 0.5)."""
    model.eval()
    results = {}
    for split in splits:
        ds = RefExpDataset(data, split, image_size)
        n = len(ds) if not max_items else min(max_items, len(ds))
        preds, gts = [], []
        for k in range(0, n, batch_size):
            batch = collate([ds[i] for i in range(k, min(k + batch_size, n))])
            dets = model(batch["image"].to(device), batch["caption"], spans=batch["spans"])
            preds += [d["boxes"].cpu() for d in dets]
            gts.append(batch["box"])
        results[split] = evaluate_boxes(preds, torch.cat(gts))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Training


def _run_config(preset: Preset, data: Path) -> dict:
    cfg = dataclasses.asdict(preset.glip)
    cfg["text_vocab"] = ""  # the run folder carries its own vocab.txt
    text = resolve_weights(preset.glip.text_weights) if preset.glip.text_weights else None
    config = {"glip": cfg, "image_size": preset.data.image_size, "data": fingerprint(data),
              "upstream": {"text": fingerprint(text) if text else None}}
    if preset.glip.init_weights:     # a continued GLIP: the weights it starts from are upstream too
        config["upstream"]["init"] = fingerprint(resolve_weights(preset.glip.init_weights))
    return json.loads(json.dumps(config))  # tuples → lists: compares equal to the stored config.json


def param_groups(model: GLIP, cfg) -> list[dict]:
    """AdamW groups of GLIP pre-training: the tower at `lr`; the head's predictors at `head_lr_mult` × lr; the
    head's token side (the projection of the words and `bias_lang`) at `token_lr_mult` × lr (< 0: with the
    predictors); the language backbone at `text_lr_mult` × lr, left out when 0 (frozen)."""
    # the predictors on top of the tower (boxes, centerness, logit scale, biases) start tiny and must reach large
    # outputs (deltas are ×(10,10,5,5)): in a short run from scratch they get a larger step
    head = {n: p for n, p in model.named_parameters()
            if n.startswith("rpn.head.") and not n.startswith(("rpn.head.dyhead_tower", "rpn.head.cls_logits"))}
    is_token = {n: cfg.token_lr_mult >= 0 and n.startswith(("rpn.head.dot_product_projection_text",
                                                             "rpn.head.bias_lang")) for n in head}
    token = [p for n, p in head.items() if is_token[n]]
    pred = [p for n, p in head.items() if not is_token[n]]
    text = list(model.language_backbone.parameters())
    taken = {id(p) for p in pred + token + text}
    groups = [{"params": [p for p in model.parameters() if id(p) not in taken], "lr": cfg.lr},
              {"params": pred, "lr": cfg.lr * cfg.head_lr_mult}]
    if token:
        groups.append({"params": token, "lr": cfg.lr * cfg.token_lr_mult})
    if cfg.text_lr_mult > 0:
        groups.append({"params": text, "lr": cfg.lr * cfg.text_lr_mult})
    return groups


def main(preset: Preset, data: Path, out: Path, resume: bool = True) -> dict:
    cfg, data, folder = preset.glip, Path(data), Path(out) / "glip"
    config = _run_config(preset, data)
    if resume and (done := finished_run(folder, config)) is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    device = init_distributed(getattr(preset, "device", "auto"))   # one process per GPU under torchrun
    seed_everything(cfg.seed)                                         # the same initial weights on every rank
    S = preset.data.image_size
    text = resolve_weights(cfg.text_weights) if cfg.text_weights else None   # an MLM-pretrained small BERT
    vocab = text / "vocab.txt" if text else data / "vocab.txt"
    model = GLIP(dataclasses.replace(cfg, text_vocab="", text_weights="", init_weights=""), vocab_file=vocab)
    if cfg.init_weights:         # continue a trained GLIP: the same architecture and vocabulary, loaded strictly
        init = resolve_weights(cfg.init_weights)
        if (init / "vocab.txt").read_text() != vocab.read_text():
            raise RunMismatch(f"{init}: its vocab.txt differs from {vocab}; continue it with its own text weights")
        model.load_state_dict(load_glip_checkpoint(init, cfg).state_dict())
    elif text:
        load_text_weights(model.language_backbone.body.model, text)
    model.to(device)

    images, targets, categories, pixels = load_detection(data, S)
    if cfg.phrase_prompts and not any(a for t in targets for a in t[2]) and is_main():
        print(f"train-glip: {data / 'detection.json'} lists no attribute words, so every prompt is a class prompt "
              "(phrase_prompts needs the attributes that `data_prep.py synthetic` writes; regenerate an older set)")
    train_idx, hold_idx = holdout_indices(len(images), cfg.holdout_fraction)   # held-out detection images
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    if world_size() > 1:   # a ragged last batch could leave a rank without images: drop it
        steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.text_lr_mult == 0:
        model.language_backbone.requires_grad_(False)   # frozen: GLIP.train() keeps it in eval mode
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, max(total // 5, 1))
    # linear warm-up, then cosine decay to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total))))
    start, history, elapsed = 0, [], 0.0
    state = load_training(folder / "checkpoint.pt") if resume else None
    if state is not None:        # a checkpoint of other settings is a RunMismatch, never silently restarted
        match_run(state["config"], config, folder / "checkpoint.pt")
        restore_training(state, None, folder / "checkpoint.pt", model=model, opt=opt, sched=sched)
        start, history, elapsed = state["epoch"], state["history"], state["elapsed"]
    ddp = wrap_ddp(model, device, find_unused_parameters=True)   # rpn.head.cls_logits never gets a gradient
    rng = random.Random(cfg.seed)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        model.train()
        rng.seed(cfg.seed * 1000 + epoch)  # the epoch's order and prompts do not depend on resuming
        order = train_idx[:]
        rng.shuffle(order)
        sums, bar = {}, progress(range(steps_per_epoch), desc=f"glip epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            # the whole global batch's flips and prompts (the same rng draws on every rank), then this rank's share;
            # position words must describe the flipped image, so then the flips come first (without them the
            # prompts do, the order the shipped GLIP was trained in)
            batch, raw, px = images[idx], [targets[i] for i in idx], [pixels[i] for i in idx]
            flip_first = cfg.flip_augment and cfg.position_phrases > 0
            if flip_first:
                batch, boxes = random_flips(batch, [t[0] for t in raw], px, rng)
                raw = [(b, *t[1:]) for b, t in zip(boxes, raw)]
            captions, tg = make_targets(raw, categories, rng, cfg.shuffle_prompt, cfg.phrase_prompts,
                                        cfg.attribute_phrases, cfg.position_phrases, S)
            if cfg.flip_augment and not flip_first:
                batch, boxes = random_flips(batch, [t["boxes"] for t in tg], px, rng)
                tg = [{**t, "boxes": b} for t, b in zip(tg, boxes)]
            share = slice(rank(), None, world_size())
            batch, captions, tg = batch[share], captions[share], tg[share]
            tg = [{"boxes": t["boxes"].to(device), "spans": t["spans"]} for t in tg]
            losses = ddp(batch.to(device), captions, targets=tg)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + all_reduce_mean(v).item()   # the mean over the ranks
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elapsed += time.time() - t0
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}, "time_s": elapsed}
        history.append(record)
        if is_main():                              # rank 0 logs and writes; the others wait at the barrier
            print(f"glip epoch {epoch + 1}/{cfg.epochs}: " + " ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                                       if k.startswith("loss")) + f" ({elapsed:.0f} s)")
            save_training(folder / "checkpoint.pt", model=model.state_dict(), opt=opt.state_dict(),
                          sched=sched.state_dict(), epoch=epoch + 1, history=history, elapsed=elapsed, config=config)
        barrier()

    # zero-shot evaluation of the frozen model
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.time()
    det = detection_recall(model, images[hold_idx], [targets[i] for i in hold_idx], categories, device)
    ref = referring_zero_shot(model, data, S, device, max_items=cfg.eval_max_items)
    metrics = {"detection_R@1": det["R@1"], "detection_queries": det["n"], "zero_shot": ref,
               "train_time_s": round(elapsed, 1), "eval_time_s": round(time.time() - t0, 1),
               "command": command_line(),
               "parameters": count_parameters(model), "history": history}
    if is_main():                                  # every rank evaluated (same numbers); rank 0 writes
        print(f"glip: detection R@1 {det['R@1']:.1f} ({det['n']} held-out queries); zero-shot referring R@1 "
              + ", ".join(f"{s} {r['R@1']:.1f}" for s, r in ref.items()))
        write_run(folder, model.state_dict(), config, metrics, vocab)
    barrier()
    cleanup()
    return metrics
