"""Masked-language-model pre-training of the tiny preset's small BERT, the way bert-base was made.

    python -m minidiffprompt train-bert --preset tiny                  # → runs/tiny/bert/

GLIP-T(A)'s language backbone is bert-base-uncased, pre-trained with masked language modelling (BERT paper,
Devlin et al. 2019, §3.1) before GLIP ever saw it. The tiny GLIP's BERT (hidden 64, 4 layers) gets the same
start: masked language modelling on the synthetic train split's expressions and on the detection pre-training's
phrase prompts (`train_glip.phrase_prompt`, built from the train images' objects). Of every sequence 15 % of the
tokens are chosen; of those 80 % become [MASK], 10 % a random token, 10 % stay; the loss is the cross-entropy of
the chosen tokens (BERT §3.1, "Task #1"). The held-out score is the masked-token accuracy on the val expressions.
Output: RUN/bert/{model.safetensors (BertModel keys, no pooler), config.json, vocab.txt, metrics.json}; GLIP
pre-training reads it through `--text_weights`.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from ..utils.checkpoint import finished_run, fingerprint, write_run
from ..config import Preset
from ..data.datasets import DetectionDataset, load_records
from ..utils.runtime import command_line, progress, seed_everything
from ..data.text import load_tokenizer
from .train_glip import make_targets


def corpus(data: Path, rng: random.Random, prompts_per_image: int = 4) -> list[str]:
    """The train expressions and `prompts_per_image` phrase prompts per detection image (train images only)."""
    texts = [s["sent"] for r in load_records(data, "train") for s in r["sentences"]]
    det = DetectionDataset(data, image_size=1)
    targets = [(None, [o["category"] for o in im["objects"]], [o.get("attributes", []) for o in im["objects"]])
               for im in det.images]
    for _ in range(prompts_per_image):
        texts += make_targets(targets, det.categories, rng, phrases=1.0)[0]
    return texts


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, g: torch.Generator,
                p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (inputs, labels) with labels −100 where no prediction is asked. `special` (B, T) marks
    [CLS]/[SEP]/[PAD], which are never chosen."""
    chosen = (torch.rand(ids.shape, generator=g) < p) & ~special
    labels = ids.masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=g)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(0, vocab_size, ids.shape, generator=g)[swap]
    return inputs, labels


def bert_config(preset: Preset, vocab_size: int) -> BertConfig:
    """The small BERT of the tiny GLIP (`bert.build_bert` builds the same one)."""
    g = preset.glip
    return BertConfig(vocab_size=vocab_size, hidden_size=g.text_hidden, num_hidden_layers=g.text_layers,
                      num_attention_heads=g.text_heads, intermediate_size=4 * g.text_hidden)


@torch.no_grad()
def masked_accuracy(model, tok, texts: list[str], max_len: int, seed: int = 0) -> dict:
    """Masked-token accuracy and loss on `texts` with a fixed masking draw."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    loss_sum = 0.0
    for k in range(0, len(texts), 256):
        enc = tok(texts[k:k + 256], padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
        inputs, labels = mask_tokens(enc["input_ids"], special, tok.mask_token_id, len(tok), g)
        logits = model(input_ids=inputs, attention_mask=enc["attention_mask"]).logits
        chosen = labels != -100
        correct += int((logits.argmax(-1)[chosen] == labels[chosen]).sum())
        total += int(chosen.sum())
        loss_sum += float(F.cross_entropy(logits[chosen], labels[chosen], reduction="sum"))
    model.train()
    return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1), "tokens": total}


def main(preset: Preset, data: Path, out: Path, resume: bool = True) -> dict:
    cfg, data, folder = preset.bert, Path(data), Path(out) / "bert"
    arch = {k: getattr(preset.glip, k) for k in ("text_hidden", "text_layers", "text_heads", "max_query_len")}
    config = {"bert": dataclasses.asdict(cfg), "arch": arch, "data": fingerprint(data)}
    if resume and (done := finished_run(folder, config)) is not None:
        return done
    t_start = time.time()
    seed_everything(cfg.seed)
    vocab = data / "vocab.txt"
    tok = load_tokenizer(vocab)
    rng = random.Random(cfg.seed)
    texts = corpus(data, rng)
    val = [s["sent"] for r in load_records(data, "val") for s in r["sentences"]]
    model = BertForMaskedLM(bert_config(preset, len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(   # linear warm-up, then linear decay, as BERT (§A.2)
        opt, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    g = torch.Generator().manual_seed(cfg.seed)
    special_ids = torch.tensor(tok.all_special_ids)
    history, bar = [], progress(range(cfg.steps), desc="bert mlm", leave=False)
    for step in bar:
        batch = [texts[i] for i in torch.randint(len(texts), (cfg.batch_size,), generator=g).tolist()]
        enc = tok(batch, padding="longest", truncation=True, max_length=preset.glip.max_query_len,
                  return_tensors="pt")
        special = torch.isin(enc["input_ids"], special_ids)
        inputs, labels = mask_tokens(enc["input_ids"], special, tok.mask_token_id, len(tok), g, cfg.mask_prob)
        loss = model(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            history.append({"step": step + 1, "loss": loss.item(), **{
                f"val_{k}": v for k, v in masked_accuracy(model, tok, val, preset.glip.max_query_len).items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{history[-1]['val_accuracy']:.1f}")
    final = masked_accuracy(model, tok, val, preset.glip.max_query_len)
    metrics = {"val_masked_accuracy": final["accuracy"], "val_masked_loss": final["loss"],
               "val_masked_tokens": final["tokens"], "corpus_texts": len(texts), "steps": cfg.steps,
               "train_time_s": round(time.time() - t_start, 1), "command": command_line(), "history": history}
    print(f"bert: masked-token accuracy on val expressions {final['accuracy']:.1f} % "
          f"({final['tokens']} tokens), {metrics['train_time_s']:.0f} s")
    write_run(folder, model.bert.state_dict(), config, metrics, vocab)
    return metrics


if __name__ == "__main__":   # pragma: no cover
    raise SystemExit("run it as: python -m minidiffprompt train-bert --preset tiny")
