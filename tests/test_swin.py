"""Swin-T and FPN: window attention with prompts against a naive per-window loop, prompt/image pairing,
patch-merging order, parameter counts, checkpoint keys and output shapes (swin.py, fpn.py)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidiffprompt.utils.checkpoint import keys_from_tsv
from minidiffprompt.glip.fpn import FPN, DropBlock2D
from minidiffprompt.glip.swin import (PatchMerging, SwinBlock, SwinTransformer, merge_2x2, relative_position_index,
                                      shift_window_mask)


KEYS = Path(__file__).resolve().parent / "fixtures" / "glip_a_tiny_o365.tsv"   # key, shape of the official GLIP-T(A)


# ----------------------------------------------------------------------------------------------------------------
# reference: one Swin block computed window by window, token by token, head by head


def naive_block(block: SwinBlock, x, H, W, prompts=None):
    """Swin block with a Python loop over images, windows and heads; prompts appended to each window's tokens."""
    B, _, C = x.shape
    ws, s, attn = block.window_size, block.shift, block.attn
    heads = attn.num_heads
    d = C // heads
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    y = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    y[:, :H, :W] = block.norm1(x).reshape(B, H, W, C)  # zero padding after norm1
    region = lambda i, n: 0 if i < n - ws else (1 if i < n - s else 2)  # noqa: E731  label on the rolled map
    out = torch.zeros_like(y)
    N = ws * ws
    for b in range(B):
        for wr in range(Hp // ws):
            for wc in range(Wp // ws):
                cells = [(wr * ws + r, wc * ws + c) for r in range(ws) for c in range(ws)]  # rolled-map coordinates
                src = [((i + s) % Hp, (j + s) % Wp) for i, j in cells]                      # roll by -s
                tokens = torch.stack([y[b, i, j] for i, j in src])
                if prompts is not None:                   # prompts of THIS image (window), after the window tokens
                    tokens = torch.cat([tokens, prompts[b] if prompts.ndim == 3 else prompts[b, wr * (Wp // ws) + wc]])
                n = tokens.shape[0]
                qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias
                q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
                heads_out = []
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    logits = (q[:, sl] * d ** -0.5) @ k[:, sl].T
                    extra = torch.zeros(n, n, dtype=x.dtype)
                    for p in range(N):
                        for t in range(N):
                            (r1, c1), (r2, c2) = divmod(p, ws), divmod(t, ws)
                            extra[p, t] = attn.relative_position_bias_table[
                                (r1 - r2 + ws - 1) * (2 * ws - 1) + (c1 - c2 + ws - 1), h]
                            if s > 0:
                                lp = (region(cells[p][0], Hp), region(cells[p][1], Wp))
                                lt = (region(cells[t][0], Hp), region(cells[t][1], Wp))
                                extra[p, t] += 0.0 if lp == lt else -100.0
                    heads_out.append(torch.softmax(logits + extra, dim=-1) @ v[:, sl])
                o = attn.proj(torch.cat(heads_out, dim=1))[:N]  # drop the prompt rows
                for t, (i, j) in enumerate(src):
                    out[b, i, j] = o[t]                         # back to the un-rolled position
    x = x + out[:, :H, :W].reshape(B, H * W, C)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("size,shift,num_prompts", [(8, 0, 0), (8, 2, 0), (6, 0, 3), (6, 2, 3), (8, 2, 4)])
def test_block_matches_naive_window_loop(size, shift, num_prompts):
    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shift=shift).double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # make the bias matter
    x = torch.randn(2, size * size, 16, dtype=torch.double)
    prompts = torch.randn(2, num_prompts, 16, dtype=torch.double) if num_prompts else None
    with torch.no_grad():
        got = block(x, size, size, prompts)
        want = naive_block(block, x, size, size, prompts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size,shift", [(8, 0), (8, 2), (6, 2)])
def test_per_window_prompts_match_the_naive_window_loop(size, shift):
    """prompt_layout "windows": window k of image b attends to prompts[b, k], windows in the block's (rolled) order."""
    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shift=shift).double().eval()
    x = torch.randn(2, size * size, 16, dtype=torch.double)
    n_windows = (-(-size // 4)) ** 2
    prompts = torch.randn(2, n_windows, 3, 16, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(block(x, size, size, prompts), naive_block(block, x, size, size, prompts),
                                   rtol=1e-10, atol=1e-10)
        same = prompts[:, :1].expand_as(prompts)      # one set repeated over the windows = the shared layout
        torch.testing.assert_close(block(x, size, size, same), block(x, size, size, same[:, 0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="windows"):
        block(x, size, size, prompts[:, :1].expand(2, n_windows + 1, 3, 16))


@pytest.mark.parametrize("shift", [0, 2])
def test_window_crops_give_each_window_the_mask_under_it(shift):
    """A mask covering one token lands in the crop of the window that holds that token after the block's roll."""
    from minidiffprompt.glip.swin import block_grids, window_crops
    H = W = 6
    ws, k = 4, 8                                    # crops of 32 px: 8 px per token
    Hp = Wp = 8
    for i, j in [(0, 0), (1, 4), (5, 5), (3, 2)]:
        mask = torch.zeros(1, 1, H, W)
        mask[0, 0, i, j] = 1.0
        crops = window_crops(F.interpolate(mask, size=(60, 60), mode="nearest"), H, W, ws, shift, ws * k)
        assert crops.shape == (1, (Hp // ws) * (Wp // ws), 1, ws * k, ws * k)
        r, c = (i - shift) % Hp, (j - shift) % Wp      # where the roll by -shift puts the token
        window = (r // ws) * (Wp // ws) + c // ws
        mass = crops.sum(dim=(2, 3, 4))[0]
        assert mass.argmax() == window and mass[window] > 0.95 * mass.sum()
        inside = crops[0, window, 0, (r % ws) * k:(r % ws + 1) * k, (c % ws) * k:(c % ws + 1) * k]
        assert inside.sum() > 0.9 * mass[window]
    assert block_grids(224, 4, (2, 2, 6, 2), 7)[:4] == [(56, 56, 0), (56, 56, 3), (28, 28, 0), (28, 28, 3)]
    assert block_grids(96, 4, (2, 2, 2, 2), 4)[-1] == (3, 3, 2)


def test_prompts_land_only_in_their_own_image():
    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shift=2).eval()
    x = torch.randn(3, 64, 16)
    prompts = torch.randn(3, 4, 16)
    other = prompts.clone()
    other[1] += 1.0
    with torch.no_grad():
        a, b = block(x, 8, 8, prompts), block(x, 8, 8, other)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert (a[1] - b[1]).abs().min() > 0  # every token of image 1 sees its prompts
    # and through the whole backbone (prompts viewed at wider stages)
    swin = SwinTransformer(4, 32, (2, 2, 2, 2), (1, 2, 4, 8), 4, drop_path_rate=0.0).eval()
    images = torch.randn(3, 3, 64, 64)
    vp = [torch.randn(3, 8, 32) for _ in range(6)]
    vp2 = [p.clone() for p in vp]
    vp2[5][1] += 1.0  # a stage-2 block: 8 tokens of 32 -> 2 tokens of 128
    with torch.no_grad():
        a, b = swin(images, vp), swin(images, vp2)
    for fa, fb in zip(a, b):
        assert torch.equal(fa[0], fb[0]) and torch.equal(fa[2], fb[2])
    assert not torch.equal(a[2][1], b[2][1])


def test_prompt_is_a_plain_view_at_wider_stages():
    swin = SwinTransformer(4, 32, (2, 2, 2, 2), (1, 2, 4, 8), 4)
    p = torch.randn(2, 8, 32)
    for C in (32, 64, 128, 256):
        assert torch.equal(swin._prompt_for([p], 0, C, 2), p.view(2, 8 * 32 // C, C))
    with pytest.raises(ValueError, match="visual_prompts"):
        swin._prompt_for([torch.randn(2, 3, 32)], 0, 128, 2)  # 3*32 not divisible by 128
    with pytest.raises(ValueError, match="only 8 blocks"):
        swin(torch.randn(1, 3, 32, 32), [None] * 9)


def test_patch_merging_order_on_a_hand_made_tensor():
    # 2x2 map, one channel, value = 10*row + col
    x = torch.tensor([[0.0, 1.0], [10.0, 11.0]]).view(1, 4, 1)
    assert merge_2x2(x, 2, 2).flatten().tolist() == [0.0, 10.0, 1.0, 11.0]  # (e,e), (o,e), (e,o), (o,o)
    # the module against GLIP's PatchMerging.forward (cat of x0..x3), with odd sides zero-padded
    torch.manual_seed(0)
    pm = PatchMerging(3)
    H, W = 5, 6
    x = torch.randn(2, H * W, 3)
    m = F.pad(x.view(2, H, W, 3), (0, 0, 0, 0, 0, 1))
    cat = torch.cat([m[:, 0::2, 0::2], m[:, 1::2, 0::2], m[:, 0::2, 1::2], m[:, 1::2, 1::2]], -1).view(2, -1, 12)
    torch.testing.assert_close(pm(x, H, W), pm.reduction(pm.norm(cat)))
    assert pm.reduction.bias is None


def test_relative_position_index_and_shift_mask():
    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and idx.dtype == torch.int64
    assert idx[0, 48] == (0 - 6 + 6) * 13 + (0 - 6 + 6) and idx[48, 0] == 168 and idx[24, 24] == 84
    # as in GLIP's detection Swin, a 7x7 map with window 7 still gets a shift mask (3 row x 3 column regions)
    m = shift_window_mask(7, 7, 7, 3)
    assert m.shape == (1, 49, 49) and set(m.unique().tolist()) == {-100.0, 0.0}
    assert m[0, 0, 4] == -100 and m[0, 0, 3] == 0 and m[0, 4, 48] == -100 and m[0, 48, 40] == 0


# ----------------------------------------------------------------------------------------------------------------
# paper-size Swin-T + FPN


def test_swin_t_fpn_parameter_counts_and_checkpoint_keys():
    swin, fpn = SwinTransformer(), FPN((192, 384, 768), 256)
    assert sum(p.numel() for p in swin.parameters()) == 27_520_506  # the official GLIP-T(A)'s backbone.body
    assert sum(p.numel() for p in fpn.parameters()) == 3_295_232
    manifest = {k: v for k, v in keys_from_tsv(KEYS).items()
                if k.startswith("backbone.")}
    ours = {f"backbone.body.{k}": tuple(v.shape) for k, v in swin.state_dict().items()}
    ours |= {f"backbone.fpn.{k}": tuple(v.shape) for k, v in fpn.state_dict().items()}
    assert ours == manifest


def test_swin_t_fpn_shapes_at_224_with_prompts():
    torch.manual_seed(0)
    swin, fpn = SwinTransformer().eval().requires_grad_(False), FPN().eval().requires_grad_(False)  # frozen
    images = torch.randn(1, 3, 224, 224)
    prompts = [torch.randn(1, 8, 96, requires_grad=True) for _ in range(9)]  # depth 9, length 8: the authors' values
    feats = swin(images, prompts)
    assert [tuple(f.shape[1:]) for f in feats] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    levels = fpn(feats)
    assert [tuple(p.shape[1:]) for p in levels] == [(256, 28, 28), (256, 14, 14), (256, 7, 7), (256, 4, 4),
                                                    (256, 2, 2)]
    sum(p.sum() for p in levels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)


def test_fpn_against_functional_computation_and_dropblock():
    torch.manual_seed(0)
    fpn = FPN((8, 16, 32), 8).eval()
    c = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]
    conv = lambda m, x: F.conv2d(x, m.weight, m.bias, stride=m.stride, padding=m.padding)  # noqa: E731
    l5 = conv(fpn.fpn_inner4, c[3])
    l4 = conv(fpn.fpn_inner3, c[2]) + l5.repeat_interleave(2, -1).repeat_interleave(2, -2)
    l3 = conv(fpn.fpn_inner2, c[1]) + l4.repeat_interleave(2, -1).repeat_interleave(2, -2)
    p5 = conv(fpn.fpn_layer4, l5)
    p6 = conv(fpn.top_blocks.p6, p5)  # P6 from P5, P7 from ReLU(P6)
    want = [conv(fpn.fpn_layer2, l3), conv(fpn.fpn_layer3, l4), p5, p6, conv(fpn.top_blocks.p7, p6.relu())]
    for got, ref in zip(fpn(c), want):
        torch.testing.assert_close(got, ref)
    # DropBlock: identity in eval; in training zeros 3x3 blocks and keeps the total mass
    db = DropBlock2D(0.3, 3)
    x = torch.ones(2, 4, 12, 12)
    assert torch.equal(db.eval()(x), x)
    y = db.train()(x)
    assert (y == 0).any() and torch.isclose(y.sum(), torch.tensor(x.numel(), dtype=y.dtype))


def test_sincos_position_tables_add_a_fixed_code_and_no_parameters():
    """The table is DiT's 2-D sine-cosine table (dit.get_2d_sincos_pos_embed) on a square grid; on the FPN it is
    added to every level, counted in P3 cells; neither option adds a parameter, so weights trained without load."""
    from einops import rearrange
    from minidiffprompt.dit import get_2d_sincos_pos_embed
    from minidiffprompt.glip.swin import sincos_table
    torch.testing.assert_close(sincos_table(32, 6, 6), torch.from_numpy(get_2d_sincos_pos_embed(32, 6)).float())
    torch.manual_seed(0)
    plain, coded = FPN((8, 16, 32), 8).eval(), FPN((8, 16, 32), 8, sincos=0.5).eval()
    coded.load_state_dict(plain.state_dict())
    c = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2)]
    for level, (a, b) in enumerate(zip(plain(c), coded(c))):
        h, w = a.shape[-2:]
        table = rearrange(sincos_table(8, h, w, scale=2 ** level), "(h w) c -> c h w", h=h)
        torch.testing.assert_close(b - a, 0.5 * table.expand_as(a))
    swin = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4, sincos=1.0)
    assert swin.state_dict().keys() == SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                                       window_size=4).state_dict().keys()

