"""MaskAdapter (the authors' DiT_Prompt): parameter counts and key names of the released layout, the forward pass
against a hand-written reference, token order, ablation flags and initialisation (the authors' DiT_Prompt in
Kelvin-ywc/diff-prompt GLIP/maskrcnn_benchmark/modeling/prompt/prompt.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from minidiffprompt.adapters import MaskAdapter, conv_stack_side

# tests/fixtures/adapters_depth9_len8.tsv, per adapter (dim = 96 for dit2vision, 768 for dit2language)
CONV_SHAPES = {0: (8, 1, 3, 3), 2: (16, 8, 3, 3), 4: (32, 16, 3, 3), 6: (64, 32, 3, 3), 8: (128, 64, 3, 3)}


def manifest(dim, depth=9):
    keys = {}
    for i, shape in CONV_SHAPES.items():
        keys[f"model.{i}.weight"], keys[f"model.{i}.bias"] = shape, (shape[0],)
    keys["model.11.weight"], keys["model.11.bias"] = (4 * dim, 6272), (4 * dim,)
    keys.update({f"global_prompt.{d}.prompt": (4, dim) for d in range(depth)})
    return keys


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_keys_and_parameter_counts_match_the_release():
    vision, language = MaskAdapter(8, 96, 9), MaskAdapter(8, 768, 9)
    for adapter, dim in ((vision, 96), (language, 768)):
        assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == manifest(dim)
    assert n_params(vision) == 2_510_528 and n_params(language) == 19_396_544
    assert n_params(vision) + n_params(language) == 21_907_072
    # the paper's ablations (Diff-Prompt, ICLR 2025): depth 1/3/6/12 at L=8, length 2/4/12/16 at D=9
    for depth, total in ((1, 21_879_424), (3, 21_886_336), (6, 21_896_704), (12, 21_917_440)):
        assert n_params(MaskAdapter(8, 96, depth)) + n_params(MaskAdapter(8, 768, depth)) == total
    for length, total in ((2, 5_624_128), (4, 11_051_776), (12, 32_762_368), (16, 43_617_664)):
        assert n_params(MaskAdapter(length, 96, 9)) + n_params(MaskAdapter(length, 768, 9)) == total


def reference_forward(adapter, mask, depth):
    """The authors' computation written out: five conv+SiLU, flatten, linear, view (B, L/2, dim), cat global."""
    sd = adapter.state_dict()
    x = mask
    for i in (0, 2, 4, 6, 8):
        x = F.silu(F.conv2d(x, sd[f"model.{i}.weight"], sd[f"model.{i}.bias"], stride=2, padding=1))
    x = F.linear(x.reshape(x.shape[0], -1), sd["model.11.weight"], sd["model.11.bias"])
    specific = x.view(x.shape[0], adapter.length // 2, adapter.dim)
    glob = sd[f"global_prompt.{depth}.prompt"].unsqueeze(0).repeat(x.shape[0], 1, 1)
    return torch.cat([specific, glob], dim=1)


@pytest.mark.parametrize("size,dim", [(224, 96), (64, 32)])
def test_forward_matches_reference_and_generated_tokens_come_first(size, dim):
    torch.manual_seed(0)
    adapter = MaskAdapter(8, dim, 4, in_size=size)
    mask = torch.randn(3, 1, size, size)
    out = adapter(mask, 2)
    assert out.shape == (3, 8, dim)
    torch.testing.assert_close(out, reference_forward(adapter, mask, 2))
    torch.testing.assert_close(out[:, 4:], adapter.global_prompt[2].prompt.expand(3, -1, -1))  # global tokens last
    assert not torch.equal(out[0, :4], out[1, :4])                       # the specific ones depend on the mask


def test_forward_all_is_the_per_layer_forward():
    torch.manual_seed(0)
    adapter = MaskAdapter(8, 32, 3, in_size=64)
    masks = torch.randn(3, 2, 1, 64, 64)                                 # (D, B, 1, M, M)
    for d, tokens in enumerate(adapter.forward_all(masks)):
        torch.testing.assert_close(tokens, adapter(masks[d], d))


def test_ablation_flags():
    torch.manual_seed(0)
    mask = torch.randn(2, 1, 64, 64)
    full = MaskAdapter(8, 16, 2, in_size=64)
    no_global = MaskAdapter(8, 16, 2, global_=False, in_size=64)
    no_global.model.load_state_dict(full.model.state_dict())
    torch.testing.assert_close(no_global(mask, 1), full(mask, 1)[:, :4])  # only the L/2 generated tokens
    assert not hasattr(no_global, "global_prompt")
    only_global = MaskAdapter(8, 16, 2, generated=False, in_size=64)
    assert not hasattr(only_global, "model") and only_global.num_tokens == 4
    torch.testing.assert_close(only_global(None, 1, batch_size=2), only_global.global_prompt[1].prompt.expand(2, -1, -1))
    with pytest.raises(ValueError):
        MaskAdapter(8, 16, 2, generated=False, global_=False)
    with pytest.raises(ValueError):
        MaskAdapter(7, 16, 2)
    with pytest.raises(IndexError):
        full(mask, 2)


def test_conv_stack_side_and_global_prompt_init():
    assert [conv_stack_side(s) for s in (224, 64, 96, 100)] == [7, 2, 3, 4]
    assert MaskAdapter(8, 16, 1, in_size=100).model[11].in_features == 128 * 4 * 4
    torch.manual_seed(0)
    glob = torch.cat([p.prompt.flatten() for p in MaskAdapter(8, 768, 9).global_prompt])
    # kaiming_normal_(fan_out) on (L/2, dim): std = sqrt(2 / (L/2)) = 0.707 (27,648 draws: ±1 %)
    assert abs(glob.std().item() - math.sqrt(2 / 4)) < 0.015 and abs(glob.mean().item()) < 0.02
