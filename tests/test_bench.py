"""The benchmark's fast paths compute what the straightforward versions compute (so its speed-up ratios compare
equal work), and the benchmark runs end to end on the tiny preset.

Tolerances: everything is float32 with outputs of order 1. Fast and straightforward paths differ only in the
order of floating-point sums (fused attention kernels, per-batch convolution algorithms), which moves results by
a few ulps times √(reduction length): ~1e-6. 1e-5 leaves room for that and is still 10⁴ times smaller than
what a real mistake does (a missing scale, a bias at the wrong end, a prompt paired with the wrong image: O(0.1)).
"""
import dataclasses
import json

import pytest
import torch
from transformers import BertConfig, BertModel

from minidiffprompt import bench
from minidiffprompt.__main__ import main as cli
from minidiffprompt.glip.bert import PromptedBert
from minidiffprompt.config import GLIPConfig, get_preset
from minidiffprompt.dit import DiT
from minidiffprompt.glip.model import GLIP
from minidiffprompt.glip.swin import SwinTransformer
from minidiffprompt.vae import MaskVAE

TOL = 1e-5


# agreement, not speed, is tested here: one thread (conftest.py) keeps these small models off the other CPU users
pytestmark = pytest.mark.usefixtures("one_thread")


def test_explicit_dit_attention_matches_sdpa():
    torch.manual_seed(0)
    dit = bench.randomize_adaln(DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, cond_dim=64)).eval()
    explicit = bench.with_explicit_attention(dit)
    assert all(type(b.attn) is bench.ExplicitDiTAttention for b in explicit.blocks)
    assert all(type(b.attn) is not bench.ExplicitDiTAttention for b in dit.blocks)   # the original is untouched
    x, t, f = torch.randn(3, 4, 8, 8), torch.tensor([0, 50, 99]), torch.randn(3, 64)
    with torch.no_grad():
        fast, slow = dit(x, t, f, f), explicit(x, t, f, f)
    assert fast.abs().max() > 0.1                      # adaLN randomised: the attention really contributes
    torch.testing.assert_close(fast, slow, rtol=0, atol=TOL)
    # with word tokens in the sequence, the padding mask too
    dit = bench.randomize_adaln(DiT(input_size=8, hidden_size=64, depth=2, num_heads=4, cond_dim=64,
                                    image_channels=3, caption_tokens=5)).eval()
    words = torch.randn(3, 5, 64)
    words[0, 2:], words[1, 4:] = 0, 0
    img = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        fast, slow = dit(x, t, img, words), bench.with_explicit_attention(dit)(x, t, img, words)
    torch.testing.assert_close(fast, slow, rtol=0, atol=TOL)


def test_explicit_window_attention_matches_sdpa_with_prompts():
    torch.manual_seed(0)
    # 32² input, patch 4 -> 8×8 tokens, window 4: shifted blocks with the -100 mask, then a padded 4×4 stage
    swin = SwinTransformer(embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path_rate=0.0).eval()
    explicit = bench.with_explicit_attention(swin)
    x = torch.randn(2, 3, 32, 32)
    prompts = [torch.randn(2, 4, 32) for _ in range(3)]    # blocks 0-2, the third one at width 64 (viewed)
    with torch.no_grad():
        fast, slow = swin(x, prompts), explicit(x, prompts)
        unprompted = swin(x)
    assert (fast[0] - unprompted[0]).abs().max() > 1e-3    # the prompts change the output (100x TOL)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_bert_sdpa_matches_eager_with_prompts_and_padding():
    torch.manual_seed(0)
    bert = PromptedBert(BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=96),
                                  add_pooling_layer=False)).eval()
    ids = torch.randint(5, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0                                        # padding in the second caption
    prompts = [torch.randn(2, 3, 48), None, torch.randn(2, 3, 48)]
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            bert.model.set_attn_implementation(impl)
            outs[impl] = bert(ids, mask, prompts)
    torch.testing.assert_close(outs["sdpa"][mask.bool()], outs["eager"][mask.bool()], rtol=0, atol=TOL)


def _tiny_glip(tmp_path):
    cfg = dataclasses.replace(GLIPConfig.tiny(), text_vocab=str(bench.word_vocab(tmp_path / "vocab.txt")),
                              max_query_len=32, inference_th=0.0)
    torch.manual_seed(0)
    glip = GLIP(cfg).eval()
    for p in glip.parameters():
        p.requires_grad_(False)
    return glip


def test_pad_to_longest_changes_nothing(tmp_path):
    """GLIP over the batch's longest caption (9 tokens) gives the detections and losses of the 32-token padding."""
    glip = _tiny_glip(tmp_path)
    short = bench.LongestPaddingGLIP.of(glip)
    images = torch.rand(2, 3, 96, 96)
    captions = ["left zebra", "man in red shirt on the left"]
    spans = [[[0, 4]], [[0, 3]]]
    with torch.no_grad():
        a, b = short(images, captions, spans=spans), glip(images, captions, spans=spans)
        assert short._width == 9 and len(a[0]["scores"]) == 100
        for x, y in zip(a, b):
            torch.testing.assert_close(x["scores"], y["scores"], rtol=0, atol=TOL)
            torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=1e-3)   # pixels, up to 96
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "spans": [s]} for s in spans]
        la, lb = short(images, captions, targets=targets), glip(images, captions, targets=targets)
    for k in lb:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=TOL)


def test_batched_vae_decode_matches_a_loop():
    torch.manual_seed(0)
    vae = MaskVAE().eval()                                 # the authors' architecture
    latents = torch.randn(3, 2, 4, 8, 8)                   # (D, B, C, h, w) -> 64² masks
    with torch.no_grad():
        fast, slow = bench.decode_batched(vae, latents), bench.decode_in_a_loop(vae, latents)
    assert fast.shape == (3, 2, 1, 64, 64)
    torch.testing.assert_close(fast, slow, rtol=0, atol=TOL)


def test_bench_runs_on_the_tiny_preset(tmp_path, monkeypatch, capsys):
    preset = get_preset("tiny")
    preset.device = "cpu"
    monkeypatch.setattr("minidiffprompt.__main__.get_preset", lambda name: preset)
    result = cli(["bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out.json")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "out.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]    # the file --out names, nothing else
    stored = json.loads((tmp_path / "out.json").read_text())
    assert stored["stages"].keys() == {"vae_train_step", "dit_train_step", "ddim_prompts_per_image", "glip_forward",
                                       "stage3_train_step", "eval_per_image"}
    for stage in stored["stages"].values():
        assert stage["seconds_per_item"] > 0 and stage["items_per_second"] > 0 and stage["peak_memory_mb"] > 0
    measured = {k: v for k, v in stored["fast_paths"].items() if "skipped" not in v}
    assert {"sdpa_dit_forward", "sdpa_swin_window_attention_prompts", "sdpa_bert_256_tokens", "batched_vae_decode",
            "text_pad_to_longest_glip_forward", "dataloader_workers"} <= measured.keys()
    for name, entry in measured.items():
        assert entry["speedup"] > 0
        assert entry.get("max_abs_diff", 0.0) < 1e-4, name
    assert stored["fast_paths"]["text_pad_to_longest_glip_forward"]["bert_real_token_max_abs_diff"] < TOL
    assert result["batch"] == 2 and stored["options"]["stage3 cached DDIM latents"]["speedup"] > 1
    # the directory form of --out writes bench.json inside it
    assert bench.main.__doc__ and "out/bench.json" in bench.main.__doc__
