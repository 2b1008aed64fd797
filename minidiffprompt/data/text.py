"""Caption text: the authors' caption cleaning, the span → token `positive_map` of GLIP, tokenizer loading.

    tok = load_tokenizer("data/synthref/processed/vocab.txt")      # or "bert-base-uncased" from the HF cache
    positive_map(tok, "the small red circle", [[4, 20]], 32)     # 1 at the tokens of "small red circle"
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .refcoco import SPECIAL_TOKENS  # the vocabulary writer defines the BERT order: [PAD] = 0

_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """The authors' `pre_caption` (Kelvin-ywc/diff-prompt `DiT-main/utils/data/datasets/datasets.py`): lower-case,
    each of .!"()*#:;~ → space, collapse whitespace, strip, keep at most `max_words` words. Used for the condition
    encoder's captions."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).strip()
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def load_tokenizer(path_or_vocab: str | Path):
    """A BERT WordPiece tokenizer from a `vocab.txt` file, a local tokenizer folder, or a name in the HF cache.

    Never downloads. Note: in transformers 5 `BertTokenizerFast(vocab_file=...)` silently ignores the file,
    so a vocab file is read here and passed as `vocab=` (the dict).
    """
    from transformers import AutoTokenizer, BertTokenizer   # late: heavy; only loading a tokenizer needs it

    p = Path(path_or_vocab)
    if p.is_file():
        vocab = {}
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            vocab.setdefault(line, i)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{p}: not a BERT vocabulary, special tokens {missing} are missing; "
                             "expected [PAD], [UNK], [CLS], [SEP], [MASK] at the top (data_prep.py writes one)")
        return BertTokenizer(vocab=vocab, do_lower_case=True)
    if p.is_dir() and not (p / "tokenizer.json").exists() and (p / "vocab.txt").exists():
        return load_tokenizer(p / "vocab.txt")
    try:
        return AutoTokenizer.from_pretrained(str(path_or_vocab), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise FileNotFoundError(
            f"tokenizer {str(path_or_vocab)!r} not found locally (no download is attempted): give a vocab.txt, "
            f"a tokenizer folder, or a model name already in the Hugging Face cache ({type(e).__name__}: {e})"
        ) from None


def positive_map(tokenizer, caption: str, spans, max_len: int) -> torch.Tensor:
    """(max_len,) binary row: 1 at the tokens covered by the character spans [beg, end).

    As GLIP's `create_positive_map` (`maskrcnn_benchmark/data/datasets/modulated_coco.py`), which normalises the
    row to sum 1; GLIP's training collate (`data/collate_batch.py`) turns it back into 0/1.

    b = char_to_token(beg), retried at beg+1, beg+2; e = char_to_token(end-1), retried at end-2, end-3; a span
    whose ends cannot be found is skipped; tokens b..e inclusive are marked; several spans are OR-ed. Token
    indices count [CLS] at 0, exactly as in the model's input; tokens beyond `max_len` are dropped.
    """
    enc = tokenizer(caption)
    row = torch.zeros(max_len)
    for beg, end in spans:
        b = _first_token(enc, (beg, beg + 1, beg + 2), len(caption))
        e = _first_token(enc, (end - 1, end - 2, end - 3), len(caption))
        if b is None or e is None or e < b:
            continue
        row[b:min(e, max_len - 1) + 1] = 1.0
    return row


def _first_token(enc, positions, n):
    for pos in positions:
        if 0 <= pos < n:
            tok = enc.char_to_token(pos)
            if tok is not None:
                return tok
    return None
