"""DiT: key manifest and parameter count of DiT-My/2, strict loading of both checkpoint kinds, and each piece
against a naive reference (positions, timestep embedding, attention, a whole block)."""
import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidiffprompt.utils.checkpoint import CheckpointMismatch, keys_from_tsv, save_weights
from minidiffprompt.dit import DiT, DiT_My_2, TimestepEmbedder, guided, load_dit

KEYS = Path(__file__).resolve().parent / "fixtures" / "mask_dit.tsv"     # the authors' DiT-My/2 keys and shapes

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, cond_dim=32)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def paper_dit():
    return DiT_My_2()


def test_paper_parameter_count(paper_dit):
    total = sum(p.numel() for p in paper_dit.parameters())
    trainable = sum(p.numel() for p in paper_dit.parameters() if p.requires_grad)
    assert total == 77_158_944                    # the authors' DiT-My/2, including the stored pos_embed
    assert trainable == 77_058_592
    assert paper_dit.pos_embed.numel() == 100_352 and not paper_dit.pos_embed.requires_grad


def test_state_dict_from_key_manifest_loads_strictly(paper_dit):
    shapes = keys_from_tsv(KEYS)
    assert len(shapes) == 131
    sd = paper_dit.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    fake = {k: torch.full(s, 0.5) for k, s in shapes.items()}
    paper_dit.load_state_dict(fake, strict=True)
    assert torch.all(paper_dit.blocks[11].attn.qkv.weight == 0.5)


def test_pos_embed_mae_layout():
    # DiT's get_2d_sincos_pos_embed (MAE layout): channels [0, D/2) encode the column, [D/2, D) the row;
    # each half [sin, cos]
    m = DiT(**{**TINY, "hidden_size": 16, "cond_dim": 16})
    pe, g, D = m.pos_embed[0], 4, 16
    for idx in range(g * g):
        row, col = divmod(idx, g)
        for half, pos in ((0, col), (1, row)):
            for k in range(D // 4):
                w = 1.0 / 10000 ** (k / (D // 4))
                assert math.isclose(pe[idx, half * D // 2 + k].item(), math.sin(pos * w), abs_tol=1e-6)
                assert math.isclose(pe[idx, half * D // 2 + D // 4 + k].item(), math.cos(pos * w), abs_tol=1e-6)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0, 7, 99])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    f = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    assert torch.allclose(emb[:, :128], torch.cos(t[:, None] * f), atol=1e-5)
    assert torch.allclose(emb[:, 128:], torch.sin(t[:, None] * f), atol=1e-5)


def test_attention_matches_naive_softmax():
    m = _randomize(DiT(**TINY))
    attn, x = m.blocks[0].attn, torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v        # (B, h, N, d)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_forward_matches_reference_computation():
    """The whole forward written out with plain torch ops (no einops): patch embedding + positions, timestep
    embedding, condition, adaLN-Zero blocks, final layer, unpatchify."""
    m = _randomize(DiT(**TINY)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 60])
    img, txt = torch.randn(2, 32), torch.randn(2, 32)
    sd = m.state_dict()
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=2).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    f = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    temb = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], 1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = torch.cat([img + temb, txt + temb], 1)
    ln = lambda z: F.layer_norm(z, (32,), eps=1e-6)   # noqa: E731
    for i in range(2):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        s1, sc1, g1, s2, sc2, g2 = mod.split(32, 1)
        a = ln(h) * (1 + sc1[:, None]) + s1[:, None]
        qkv = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(2, 16, 3, 4, 8)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        o = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 16, 32)
        h = h + g1[:, None] * F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        a = ln(h) * (1 + sc2[:, None]) + s2[:, None]
        a = F.gelu(F.linear(a, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        h = h + g2[:, None] * F.linear(a, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod.split(32, 1)
    h = F.linear(ln(h) * (1 + scale[:, None]) + shift[:, None], sd["final_layer.linear.weight"],
                 sd["final_layer.linear.bias"])                                 # (B, 16, 2·2·8)
    ref = h.reshape(2, 4, 4, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 8, 8)   # (h w p q c) → c (h p)(w q)
    out = m(x, t, img, txt)
    assert out.shape == (2, 8, 8, 8)
    assert torch.allclose(out, ref, atol=1e-5)


def test_adaln_zero_init_outputs_zero():
    m = DiT(**TINY)
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 32), torch.randn(2, 32))
    assert torch.count_nonzero(out) == 0


def test_image_map_condition_is_local():
    """image_channels: the map enters beside x_t, so with attention switched off in every block (gates 0),
    changing the image under one patch changes the output of that patch only."""
    torch.manual_seed(0)
    m = _randomize(DiT(**TINY, image_channels=3))
    assert m.x_embedder.proj.weight.shape[1] == 4 + 3
    with torch.no_grad():
        for block in m.blocks:                                       # no token mixing: attention gate = 0
            block.adaLN_modulation[-1].weight[64:96] = 0
            block.adaLN_modulation[-1].bias[64:96] = 0
    x, t, txt = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 32)
    img = torch.randn(2, 3, 8, 8)
    changed = img.clone()
    changed[:, :, 0:2, 2:4] += 1.0                                   # the patch in row 0, column 1
    diff = (m(x, t, changed, txt) - m(x, t, img, txt)).abs().sum(1)  # (B, 8, 8)
    assert diff[:, 0:2, 2:4].min() > 0
    diff[:, 0:2, 2:4] = 0
    assert diff.max() == 0


def test_caption_tokens_join_the_sequence_and_padding_is_ignored():
    """caption_tokens: the words enter as tokens beside the patches. All-zero rows are padding (more of them
    change nothing), the word order matters, and guidance's null condition (zero features) works on them."""
    torch.manual_seed(0)
    m = _randomize(DiT(**TINY, image_channels=3, caption_tokens=6)).eval()
    x, t, img = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 3, 8, 8)
    words = torch.zeros(2, 6, 32)
    words[0, :3], words[1, :2] = torch.randn(3, 32), torch.randn(2, 32)
    with torch.no_grad():
        out = m(x, t, img, words)
        assert out.shape == (2, 8, 8, 8)
        torch.testing.assert_close(m(x, t, img, words[:, :3]), out, atol=1e-5, rtol=0)   # padding dropped
        alone = m(x[1:], t[1:], img[1:], words[1:, :2])           # sample 1 without the column padded only for it
        torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=0)                      # padding masked
        swapped = words.clone()
        swapped[0, [0, 1]] = words[0, [1, 0]]
        diff = (m(x, t, img, swapped) - out).abs().flatten(1).amax(1)
        assert diff[0] > 1e-3 and diff[1] == 0                       # order matters, per sample
        null = m(x, t, torch.zeros_like(img), torch.zeros_like(words))
        assert torch.allclose(guided(m, img, words, 2.0)(x, t)[:, :4], null[:, :4] + 2 * (out - null)[:, :4],
                              atol=1e-5)


@pytest.mark.parametrize("image_channels", [0, 3])
def test_classifier_free_guidance(image_channels):
    """guided(): scale 1 is the plain DiT; scale s gives ε̂_∅ + s·(ε̂_c − ε̂_∅) from one batched call, with
    zero features as ∅ and the conditional variance channels."""
    m = _randomize(DiT(**TINY, image_channels=image_channels)).eval()
    x, t, txt = torch.randn(3, 4, 8, 8), torch.tensor([0, 40, 99]), torch.randn(3, 32)
    img = torch.randn(3, 3, 8, 8) if image_channels else torch.randn(3, 32)
    with torch.no_grad():
        cond, null = m(x, t, img, txt), m(x, t, torch.zeros_like(img), torch.zeros_like(txt))
        assert torch.equal(guided(m, img, txt)(x, t), cond)
        out = guided(m, img, txt, 3.0)(x, t)
    assert (cond - null)[:, :4].abs().max() > 0.1                    # the condition matters to this DiT
    assert torch.allclose(out[:, :4], null[:, :4] + 3.0 * (cond[:, :4] - null[:, :4]), atol=1e-5)
    assert torch.allclose(out[:, 4:], cond[:, 4:], atol=1e-6)


def test_load_raw_checkpoint_and_hf_export(tmp_path):
    model, ema = _randomize(DiT(**TINY), 1), _randomize(DiT(**TINY), 2)
    raw = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
           "args": argparse.Namespace(model="DiT-My/2", epochs=100)}
    torch.save(raw, tmp_path / "0094200.pt")
    x, t, f = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 32)
    for which, ref in (("model", model), ("ema", ema)):
        loaded = load_dit(tmp_path / "0094200.pt", which=which, **TINY)
        assert torch.equal(loaded(x, t, f, f), ref(x, t, f, f))
    save_weights(ema.state_dict(), tmp_path / "hf" / "model.safetensors")
    torch.save(ema.state_dict(), tmp_path / "pytorch_model.bin")
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", tmp_path / "pytorch_model.bin"):
        assert torch.equal(load_dit(path, **TINY)(x, t, f, f), ema(x, t, f, f))


def test_truncated_checkpoint_names_missing_keys(tmp_path):
    sd = _randomize(DiT(**TINY)).state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    save_weights(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match="blocks.1.mlp.fc2.bias"):
        load_dit(tmp_path / "model.safetensors", **TINY)
    with pytest.raises(CheckpointMismatch, match="mis-shaped"):
        load_dit(tmp_path / "model.safetensors", **{**TINY, "hidden_size": 64, "cond_dim": 64})


def test_a_backbone_map_coarser_than_the_latent_grid_is_resized_onto_it():
    """A backbone's map on its own grid (6×6 here) is resized onto the latent grid (8×8), and every patch sees it."""
    from minidiffprompt.dit import DiT
    torch.manual_seed(0)
    x, t, words = torch.randn(2, 4, 8, 8), torch.tensor([3, 50]), torch.randn(2, 32)
    dit = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, cond_dim=32, image_channels=6)
    torch.nn.init.normal_(dit.final_layer.linear.weight)        # adaLN-Zero starts at a zero output: wake it up
    torch.nn.init.normal_(dit.final_layer.adaLN_modulation[-1].weight)
    image_map = torch.randn(2, 6, 6, 6)
    out = dit(x, t, image_map, words)
    assert out.shape == (2, 8, 8, 8)
    image_map[:, :, 0, 0] += 1.0                                # one map cell moves the patches over that corner
    changed = (dit(x, t, image_map, words) - out).abs().amax(dim=(0, 1))
    assert changed[:2, :2].min() > 0
