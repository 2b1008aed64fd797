"""Diff-Prompt's prompt generator and the baselines' prompt modules: trainable parameters (the paper's 21,907,072),
DDIM latents kept per layer and decoded in one batched VAE call, seeded reproducibility, ablation flags."""
from pathlib import Path

import pytest
import torch
from torch import nn

from minidiffprompt.utils.checkpoint import keys_from_tsv
from minidiffprompt.conditions import TinyConditionEncoder
from minidiffprompt.config import GLIPConfig, PromptConfig
from minidiffprompt.diffusion import GaussianDiffusion, get_betas
from minidiffprompt.dit import DiT
from minidiffprompt.prompting import DiffPromptGenerator, LearnablePrompts, count_trainable
from minidiffprompt.vae import MaskVAE

TINY_VAE = dict(block_out_channels=(4, 8, 16, 16), layers_per_block=1, norm_num_groups=2)


def tiny_generator(depth=3, seed=0, **flags):
    torch.manual_seed(seed)
    vae = MaskVAE(**TINY_VAE)
    dit = DiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, cond_dim=32)
    for p in dit.parameters():   # adaLN-Zero starts at ε̂ = 0: perturb so the sampler's path depends on the net
        nn.init.normal_(p, std=0.05)
    cfg = PromptConfig(depth=depth, length=4, ddim_steps=10, **flags)
    gen = DiffPromptGenerator(vae, dit, GaussianDiffusion(get_betas("linear", 100)), TinyConditionEncoder(dim=32),
                              cfg, vision_dim=8, text_dim=16, mask_size=32)
    return gen


def batch(b=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, 32, 32, generator=g), ["the red circle", "the leftmost star", "big blue square"][:b]


def test_paper_size_trainable_parameters_and_keys():
    cfg = PromptConfig()  # depth 9, length 8: the paper
    gen = DiffPromptGenerator(MaskVAE(), DiT(), GaussianDiffusion(get_betas("squaredcos_cap_v2", 100)),
                              TinyConditionEncoder(dim=512), cfg, vision_dim=96, text_dim=768, mask_size=224)
    assert count_trainable(gen) == 21_907_072
    assert sum(p.numel() for p in gen.dit.parameters()) == 77_158_944       # frozen DiT-My/2, pos_embed included
    assert all(not p.requires_grad for m in (gen.vae, gen.dit) for p in m.parameters())
    keys = gen.trainable_state_dict()
    assert set(keys) == {k for k, p in gen.named_parameters() if p.requires_grad}
    assert tuple(keys["dit2vision.model.11.weight"].shape) == (384, 6272)
    assert tuple(keys["dit2language.model.11.weight"].shape) == (3072, 6272)
    assert sorted(k for k in keys if "global_prompt" in k)[0] == "dit2language.global_prompt.0.prompt"
    assert len(keys) == 2 * (12 + 9)                                          # 42 keys in the release manifest
    manifest = keys_from_tsv(Path(__file__).parent / "fixtures" / "adapters_depth9_len8.tsv")
    assert {k: tuple(v.shape) for k, v in keys.items()} == manifest


def test_masks_are_the_kept_ddim_latents_decoded_in_one_call():
    gen = tiny_generator(depth=3).eval()
    images, captions = batch()
    calls = []
    gen.vae.register_forward_hook(lambda *a: None)
    orig = gen.vae.decode
    gen.vae.decode = lambda z: (calls.append(tuple(z.shape)), orig(z))[1]
    masks = gen.sample_masks(images, captions, seeds=[5, 6, 7])
    assert calls == [(3 * 3, 4, 4, 4)] and masks.shape == (3, 3, 1, 32, 32)   # (D·B) latents, one decode
    # reference: the same noise through DDIM, keep outputs 9, 7, 5 (cleanest first), decoded one by one
    noise = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    img, txt = gen.condition_encoder.encode(images, captions)
    final, kept = gen.diffusion.ddim_sample(lambda x, t: gen.dit(x, t, img, txt), noise.shape, noise,
                                            num_steps=10, keep=[9, 7, 5])
    torch.testing.assert_close(kept[0], final)                                # layer 0 gets x̂₀
    for d in range(3):
        torch.testing.assert_close(masks[d], orig(kept[d]), atol=1e-5, rtol=1e-4)


def test_forward_shapes_and_seeded_reproducibility():
    gen = tiny_generator(depth=3).eval()
    images, captions = batch()
    v1, t1 = gen(images, captions, seeds=[1, 2, 3])
    assert len(v1) == len(t1) == 3
    assert v1[0].shape == (3, 4, 8) and t1[2].shape == (3, 4, 16)
    v2, _ = gen(images, captions, seeds=[1, 2, 3])
    torch.testing.assert_close(v1[1], v2[1], rtol=0, atol=0)                  # same seeds: identical prompts
    v_alone, _ = gen(images[1:2], captions[1:2], seeds=[2])
    torch.testing.assert_close(v_alone[1][0], v1[1][1], atol=1e-5, rtol=1e-5) # independent of the batch
    v3, _ = gen(images, captions)                                             # unseeded: fresh noise
    assert not torch.allclose(v3[0][:, :2], v1[0][:, :2])
    torch.testing.assert_close(v3[0][:, 2:], v1[0][:, 2:])                    # the global tokens do not change


def test_ablation_flags_and_frozen_parts_stay_in_eval():
    gen = tiny_generator(depth=2, visual=False)
    assert gen.dit2vision is None
    v, t = gen(*batch(2))
    assert v is None and len(t) == 2
    gen.train()
    assert gen.training and not gen.dit.training and not gen.vae.training and gen.dit2language.training
    no_specific = DiffPromptGenerator(None, None, None, None, PromptConfig(depth=2, length=4, generated=False),
                                      vision_dim=8, text_dim=16, mask_size=32)
    v, t = no_specific(*batch(2))
    assert v[1].shape == (2, 2, 8) and t[0].shape == (2, 2, 16)
    assert count_trainable(no_specific) == 2 * 2 * (8 + 16)
    with pytest.raises(ValueError, match="visual and textual"):
        tiny_generator(visual=False, textual=False)
    with pytest.raises(ValueError, match="1..12"):
        tiny_generator(depth=13)
    with pytest.raises(ValueError, match="DDIM steps"):
        tiny_generator(depth=6)                                               # 10 steps keep at most 5


def test_learnable_prompt_baselines():
    torch.manual_seed(0)
    vpt = LearnablePrompts(depth=3, length=4, vision_dim=8)
    images, captions = batch(2)
    v, t = vpt(images, captions)
    assert t is None and len(v) == 3 and v[2].shape == (2, 4, 8)
    torch.testing.assert_close(v[2][0], v[2][1])                              # input-independent
    assert count_trainable(vpt) == 3 * 4 * 8
    text = LearnablePrompts(depth=2, length=4, text_dim=16)
    v, t = text(images, captions)
    assert v is None and len(t) == 2 and count_trainable(text) == 2 * 4 * 16
    t[0].sum().backward()
    assert text.textual[0].prompt.grad is not None and text.textual[1].prompt.grad is None


def test_condition_encoder_input_train_or_authors_glip_tensor():
    from minidiffprompt.data.datasets import glip_normalize
    seen = []
    for clip_input in ("train", "glip"):
        gen = tiny_generator(depth=1, clip_input=clip_input).eval()
        encode = gen.condition_encoder.encode
        gen.condition_encoder.encode = lambda x, c: (seen.append(x * 2 - 1), encode(x, c))[1]
        gen(*batch(2), seeds=[0, 1])
    images, _ = batch(2)
    torch.testing.assert_close(seen[0], images * 2 - 1)          # what the DiT was trained with: RGB in [-1, 1]
    torch.testing.assert_close(seen[1], glip_normalize(images))  # what the authors' stage 3 fed CLIP: GLIP's tensor


def test_oracle_masks_feed_the_true_mask_at_every_depth():
    """The diagnostic needs no generator: the given mask stands at every depth, and the prompts follow it."""
    cfg = PromptConfig(depth=3, length=4, oracle_masks=True)
    gen = DiffPromptGenerator(None, None, None, None, cfg, vision_dim=8, text_dim=16, mask_size=32).eval()
    assert not gen.needs_masks
    images = torch.rand(2, 3, 32, 32)
    a, b = torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    a[:, :, 2:10, 2:10], b[:, :, 20:30, 20:30] = 1, 1
    with torch.no_grad():
        (va, ta), (vb, tb) = gen(images, ["x", "y"], true_masks=a), gen(images, ["x", "y"], true_masks=b)
    assert len(va) == len(ta) == 3 and va[0].shape == (2, 4, 8) and ta[0].shape == (2, 4, 16)
    assert all(not torch.allclose(x, y) for x, y in zip(va + ta, vb + tb))
    with pytest.raises(ValueError, match="ground-truth masks"):
        gen(images, ["x", "y"])


def test_windows_layout_gives_each_window_the_tokens_of_its_part_of_the_mask():
    """prompt_layout "windows" (not the paper's): per Swin block, one set of visual tokens per window, generated from
    the crop of the mask under that window (swin.window_crops), the global tokens after them; text prompts as before."""
    from minidiffprompt.glip.swin import window_crops
    grids = [(8, 8, 4, 0), (8, 8, 4, 2), (4, 4, 4, 0)]
    cfg = PromptConfig(depth=3, length=4, oracle_masks=True, prompt_layout="windows")
    gen = DiffPromptGenerator(None, None, None, None, cfg, vision_dim=8, text_dim=16, mask_size=32,
                              windows=grids).eval()
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 2:10, 2:10] = 1                       # inside the top-left window of the 8×8 grid
    with torch.no_grad():
        visual, textual = gen(torch.rand(2, 3, 32, 32), ["x", "y"], true_masks=mask)
        shared = DiffPromptGenerator(None, None, None, None, PromptConfig(depth=3, length=4, oracle_masks=True),
                                     vision_dim=8, text_dim=16, mask_size=32)
        shared.load_state_dict(gen.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(textual, shared(torch.rand(2, 3, 32, 32), ["x", "y"],
                                                                        true_masks=mask)[1]))
        assert [tuple(v.shape) for v in visual] == [(2, 4, 4, 8), (2, 4, 4, 8), (2, 1, 4, 8)]
        for d, (H, W, ws, shift) in enumerate(grids):
            crops = window_crops(mask, H, W, ws, shift, 32)
            for w in range(crops.shape[1]):
                torch.testing.assert_close(visual[d][:, w, :2], gen.dit2vision.specific(crops[:, w]))
                torch.testing.assert_close(visual[d][:, w, 2:], gen.dit2vision.global_prompt[d](2))
        empty = gen.dit2vision.specific(torch.zeros(2, 1, 32, 32))
        assert not torch.allclose(visual[0][:, 0, :2], empty)          # the window over the object
        torch.testing.assert_close(visual[0][:, 3, :2], empty)         # a window with no mask under it
    with pytest.raises(ValueError, match="prompt_layout"):
        PromptConfig(depth=4, prompt_layout="tiles").check(GLIPConfig.tiny())
