"""Text encoder: PromptedBert against plain HF BertModel and against a hand-written prompted BERT; tokenizer padding,
model building and checkpoint keys (bert.py)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from minidiffprompt.glip.bert import PromptedBert, build_bert, build_tokenizer, drop_legacy_bert_keys, tokenize
from minidiffprompt.utils.checkpoint import keys_from_tsv, load_strict
from minidiffprompt.config import GLIPConfig

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "blue", "circle", "square", "left", "right",
         "big", "small", "on", ".", "##s", "tri", "##angle"]


KEYS = Path(__file__).resolve().parent / "fixtures" / "glip_a_tiny_o365.tsv"   # key, shape of the official GLIP-T(A)


def small_bert(attn: str | None = None) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64)
    if attn:
        config._attn_implementation = attn
    return BertModel(config, add_pooling_layer=False).eval()


def batch(T=12):
    """Two captions of 7 and 4 real tokens, padded to T."""
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[0, :7] = torch.tensor([2, 5, 6, 8, 14, 10, 3])
    ids[1, :4] = torch.tensor([2, 9, 11, 3])
    return ids, (ids != 0).long()


def naive_prompted_bert(bert: BertModel, ids, mask, prompts):
    """BERT written out by hand: embeddings, then per layer [prompts; tokens] -> attention over real keys -> FFN."""
    e = bert.embeddings
    T = ids.shape[1]
    h = e.word_embeddings.weight[ids] + e.position_embeddings.weight[:T] + e.token_type_embeddings.weight[0]
    h = e.LayerNorm(h)
    for i, layer in enumerate(bert.encoder.layer):
        p = prompts[i] if i < len(prompts) else None
        P = 0 if p is None else p.shape[1]
        x = h if p is None else torch.cat([p, h], 1)
        keys = torch.cat([torch.ones(x.shape[0], P, dtype=torch.bool), mask.bool()], 1)  # prompts always attended
        a = layer.attention.self
        nh, d = a.num_attention_heads, a.attention_head_size
        split = lambda t: t.view(x.shape[0], -1, nh, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        logits = (q @ k.transpose(-1, -2)) / d ** 0.5
        logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
        ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        o = layer.attention.output
        x = o.LayerNorm(o.dense(ctx) + x)
        x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        h = x[:, P:]
    return h


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_without_prompts_equals_plain_bertmodel(attn):
    bert = small_bert(attn)
    ids, mask = batch()
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    model = PromptedBert(bert)
    with torch.no_grad():
        for prompts in (None, [], [None, None]):
            torch.testing.assert_close(model(ids, mask, prompts), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompts_match_hand_written_bert(attn):
    bert = small_bert(attn)
    ids, mask = batch()
    torch.manual_seed(1)
    prompts = [torch.randn(2, 3, 32), None, torch.randn(2, 2, 32)]  # layers 0 and 2 prompted, layer 1 not
    with torch.no_grad():
        got = PromptedBert(bert)(ids, mask, prompts)
        want = naive_prompted_bert(bert, ids, mask, prompts)
        plain = PromptedBert(bert)(ids, mask)
    assert got.shape == (2, 12, 32)  # prompt outputs dropped
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain)[mask.bool()].abs().amax(-1).min() > 1e-3  # every real token attends to the prompts


def test_padding_to_longest_equals_padding_to_max_and_prompts_get_gradients():
    bert = small_bert()
    model = PromptedBert(bert)
    ids, mask = batch(T=12)
    prompts = [torch.randn(2, 4, 32, requires_grad=True) for _ in range(2)]
    long = model(ids, mask, prompts)
    short = model(ids[:, :7], mask[:, :7], prompts)
    real = mask[:, :7].bool()
    torch.testing.assert_close(short[real], long[:, :7][real], rtol=1e-5, atol=1e-5)
    long[mask.bool()].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
    with pytest.raises(ValueError, match="only 3 layers"):
        model(ids, mask, [None] * 4)
    with pytest.raises(ValueError, match="textual_prompts"):
        model(ids, mask, [torch.randn(2, 4, 16)])


def test_tiny_bert_and_tokenizer_from_vocab(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    cfg = GLIPConfig.tiny()
    cfg.text_vocab = str(vocab)
    bert = build_bert(cfg).eval()
    assert (bert.config.vocab_size, bert.config.hidden_size, len(bert.encoder.layer)) == (len(WORDS), 64, 4)
    assert bert.pooler is None
    tok = build_tokenizer(cfg)
    captions = ["The red circle on the left", "big triangles"]
    ids, mask = tokenize(tok, captions, cfg.max_query_len)
    assert ids.shape == mask.shape == (2, cfg.max_query_len)
    assert ids[0, :8].tolist() == [2, 5, 6, 8, 14, 5, 10, 3]  # [CLS] the red circle on the left [SEP]
    assert ids[1, :6].tolist() == [2, 12, 17, 18, 16, 3]      # [CLS] big tri ##angle ##s [SEP]
    assert mask.sum(1).tolist() == [8, 6] and ids[0, 8:].eq(0).all()
    ids2, mask2 = tokenize(tok, captions, cfg.max_query_len, pad_to_longest=True)
    assert ids2.shape == (2, 8) and torch.equal(ids2, ids[:, :8])
    model = PromptedBert(bert)
    prompts = [torch.randn(2, 8, 64)] * 2
    with torch.no_grad():
        a, b = model(ids, mask, prompts), model(ids2, mask2, prompts)
    torch.testing.assert_close(b[mask2.bool()], a[:, :8][mask2.bool()], rtol=1e-5, atol=1e-5)
    cfg.text_vocab = ""
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_bert(cfg)


@pytest.mark.filterwarnings("ignore:bert-base-uncased config not found")
def test_paper_bert_size_and_checkpoint_keys():
    bert = build_bert(GLIPConfig())  # bert-base-uncased config (or the identical BertConfig() default)
    assert sum(p.numel() for p in bert.parameters()) == 108_891_648  # the official language_backbone
    prefix = "language_backbone.body.model."
    manifest = {k[len(prefix):]: v for k, v in keys_from_tsv(KEYS).items()
                if k.startswith(prefix)}
    assert {k: tuple(v.shape) for k, v in PromptedBert(bert).model.state_dict().items()} == manifest
    # an older checkpoint's extras (position_ids, pooler) are dropped, then the rest loads strictly
    sd = {prefix + k: v for k, v in bert.state_dict().items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(512)[None]
    sd[prefix + "pooler.dense.weight"] = torch.zeros(768, 768)
    sd[prefix + "pooler.dense.bias"] = torch.zeros(768)
    sd, dropped = drop_legacy_bert_keys(sd)
    assert len(dropped) == 3
    load_strict(bert, {k[len(prefix):]: v for k, v in sd.items()})
