"""GLIP's text encoder: a transformers `BertModel` run layer by layer, with Diff-Prompt's deep textual prompts.

BERT as GLIP uses it: `BertEncoder` in GLIP's `maskrcnn_benchmark/modeling/language_backbone/bert_model.py`
(bert-base-uncased without pooler, last hidden state). Prompts as the authors' copy of transformers' `BertEncoder`
(Kelvin-ywc/diff-prompt `GLIP/maskrcnn_benchmark/modeling/language_backbone/bert/modeling_bert.py`).

    bert = build_bert(cfg)                       # paper: bert-base-uncased config; tiny: small BERT on vocab.txt
    tokenizer = build_tokenizer(cfg)
    ids, mask = tokenize(tokenizer, captions, cfg.max_query_len)     # (B, 256) each, padded to 256
    text = PromptedBert(bert)(ids, mask, textual_prompts=[t0, ..., t8])   # (B, 256, H); t_i: (B, P, H)

The prompts of layer i are prepended to that layer's input (no position/type embedding), are attended by every
token and attend to every real token and to each other; their outputs are dropped after the layer.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from ..data.text import load_tokenizer
from ..utils.checkpoint import load_strict, read_state_dict


class PromptedBert(nn.Module):
    """BertModel (no pooler) whose first layers take prompt tokens; returns the last hidden state (B, T, H)."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.model = bert  # inside GLIP this makes the keys `language_backbone.body.model.*` (`BertEncoder.model`)

    @property
    def num_layers(self) -> int:
        return len(self.model.encoder.layer)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, textual_prompts=None) -> torch.Tensor:
        """input_ids, attention_mask (B, T); textual_prompts[i] (B, P, H) or None for layer i -> (B, T, H)."""
        if textual_prompts is not None and len(textual_prompts) > self.num_layers:
            raise ValueError(f"{len(textual_prompts)} textual prompts given, but BERT has only {self.num_layers} "
                             "layers (one prompt per layer at most)")
        h = self.model.embeddings(input_ids=input_ids)  # (B, T, H): word + position 0..T-1 + type 0, LN
        # additive key mask (B, 1, 1, T): 0 for real tokens, the dtype's minimum for padding, as recent transformers
        # (the older ones GLIP was trained with used -10000: the same after softmax); it suits eager and sdpa attention
        key_mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for i, layer in enumerate(self.model.encoder.layer):
            p = textual_prompts[i] if textual_prompts is not None and i < len(textual_prompts) else None
            if p is None:
                h = _hidden(layer(h, key_mask))
                continue
            if p.ndim != 3 or p.shape[0] != h.shape[0] or p.shape[2] != h.shape[2]:
                raise ValueError(f"textual_prompts[{i}]: expected (B={h.shape[0]}, P, {h.shape[2]}), "
                                 f"got {tuple(p.shape)}")
            P = p.shape[1]
            x = torch.cat([p.to(h.dtype), h], dim=1)     # (B, P+T, H): prompts first, as in the authors' code
            m = F.pad(key_mask, (P, 0))                  # prompts are keys that everyone attends to
            h = _hidden(layer(x, m))[:, P:]              # drop the prompt outputs -> (B, T, H)
        return h


def _hidden(out):
    """BertLayer returns a tensor in transformers 5 and a tuple before."""
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------------------------
# Building the model and the tokenizer


def _vocab_path(cfg, vocab_file) -> Path:
    path = vocab_file or getattr(cfg, "text_vocab", "")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"small BERT (text_model='') needs a WordPiece vocab.txt, got {str(path)!r}. Pass vocab_file= or set "
            "GLIPConfig.text_vocab to the data root's vocab.txt (written by `data_prep.py synthetic`).")
    return Path(path)


def build_bert(cfg, vocab_file=None, pretrained: bool = False) -> BertModel:
    """BertModel(add_pooling_layer=False): bert-base-uncased sized when cfg.text_model is set, else a small BERT.

    paper: the config is read from a local folder or the HF cache (never downloaded); if "bert-base-uncased" is
    not available locally, transformers' default BertConfig() (the same architecture) is used. The weights come
    from the GLIP checkpoint; `pretrained=True` loads the local bert-base-uncased weights instead.
    tiny (cfg.text_model == ""): hidden/layers/heads from cfg, FFN 4*hidden, vocabulary from vocab.txt.
    """
    if cfg.text_model:
        try:
            if pretrained:
                return BertModel.from_pretrained(cfg.text_model, add_pooling_layer=False, local_files_only=True)
            config = BertConfig.from_pretrained(cfg.text_model, local_files_only=True)
        except OSError:
            if pretrained or cfg.text_model != "bert-base-uncased":
                raise FileNotFoundError(
                    f"BERT {cfg.text_model!r} is not in a local folder or the Hugging Face cache. Download it once "
                    f"(`huggingface-cli download {cfg.text_model}`) or set GLIPConfig.text_model to its folder.")
            warnings.warn("bert-base-uncased config not found locally; using BertConfig() (same architecture)")
            config = BertConfig()
    else:
        vocab_size = sum(1 for _ in _vocab_path(cfg, vocab_file).open(encoding="utf-8"))
        config = BertConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                            num_attention_heads=cfg.text_heads, intermediate_size=4 * cfg.text_hidden)
    if config.hidden_size != cfg.text_hidden:
        raise ValueError(f"BERT {cfg.text_model!r} has hidden size {config.hidden_size}, but GLIPConfig.text_hidden "
                         f"is {cfg.text_hidden}; make them agree")
    return BertModel(config, add_pooling_layer=False)


def build_tokenizer(cfg, vocab_file=None):
    """The uncased WordPiece tokenizer matching `build_bert(cfg, vocab_file)` (never downloads)."""
    return load_tokenizer(cfg.text_model if cfg.text_model else _vocab_path(cfg, vocab_file))


def tokenize(tokenizer, captions: list[str], max_len: int = 256, pad_to_longest: bool = False, device=None):
    """[CLS] tokens [SEP], truncated at max_len and padded with [PAD] to max_len (GLIP's PAD_MAX).

    pad_to_longest=True pads only to the longest caption of the batch: real tokens get the same features
    (padding is masked out), but a positive map built for max_len columns must then be cut to the same width.
    Returns (input_ids, attention_mask), each (B, T) int64.
    """
    enc = tokenizer(list(captions), padding="longest" if pad_to_longest else "max_length", truncation=True,
                    max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def drop_legacy_bert_keys(state_dict: dict, prefix: str = "language_backbone.body.model.") -> tuple[dict, list]:
    """Remove what a transformers-5 BertModel(add_pooling_layer=False) does not hold, should a checkpoint have it.

    `embeddings.position_ids` is a non-persistent buffer now (it is rebuilt as arange(512)); `pooler.*` belongs to
    a pooler GLIP never builds. Returns (new state dict, dropped keys).
    """
    dropped = [k for k in state_dict if k.startswith(prefix)
               and (k[len(prefix):] == "embeddings.position_ids" or k[len(prefix):].startswith("pooler."))]
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


def load_text_weights(bert, folder) -> None:
    """Load a `train-bert` folder's weights into a BertModel (the GLIP's `language_backbone.body.model`)."""
    state, _ = drop_legacy_bert_keys(read_state_dict(Path(folder) / "model.safetensors"), prefix="")
    load_strict(bert, state, source=str(Path(folder) / "model.safetensors"))
