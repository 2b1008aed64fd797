"""train-dit end to end on a 30-image synthetic set: needs stage 1, writes resumable checkpoints and EMA
weights that load strictly, reuses a finished run, and the generation evaluation pairs conditions correctly."""
import json

import pytest
import torch

from minidiffprompt import train_dit
from minidiffprompt.utils.checkpoint import save_weights
from minidiffprompt.config import get_preset
from minidiffprompt.diffusion import GaussianDiffusion, get_betas
from minidiffprompt.dit import dit_arch, load_dit
from minidiffprompt.train_vae import build_vae
from minidiffprompt.vae import diffusers_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from minidiffprompt.data.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), seed=1, images=30, size=128, log=lambda *a: None)


def _preset(epochs=2):
    p = get_preset("tiny")
    p.dit.hidden_size = p.dit.cond_dim = 32
    p.dit.condition = "tiny"             # the hand-built encoder takes any width; the shipped tiny CLIP gives 128
    p.dit.depth, p.dit.num_heads, p.dit.batch_size, p.dit.epochs = 1, 2, 16, epochs
    p.dit.eval_items, p.dit.ddim_steps = 8, 5
    p.dit.extra_scenes = 0               # the 8,400 extra synthetic scenes are the tiny recipe's, not the plumbing's
    return p


def _stage1(out):
    torch.manual_seed(0)
    vae = build_vae(get_preset("tiny").vae)   # untrained stand-in: this test is about the plumbing, not the quality
    save_weights(vae.state_dict(), out / "vae" / "model.safetensors")
    (out / "vae" / "config.json").write_text(json.dumps(diffusers_config(vae)))


def test_needs_stage1(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="train-vae"):
        train_dit.main(_preset(), data, tmp_path / "run")


@pytest.mark.slow
def test_train_resume_and_reuse(tmp_path, data, monkeypatch):
    monkeypatch.setenv("MDP_QUIET", "1")
    out = tmp_path / "run"
    _stage1(out)
    m1 = train_dit.main(_preset(epochs=1), data, out)
    state = torch.load(out / "dit" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and {"model", "ema", "opt"} <= set(state)
    m2 = train_dit.main(_preset(epochs=2), data, out)           # resumes after epoch 1
    assert m2["epochs"] == 2 and m2["history"][0] == m1["history"][0]
    assert set(m2) >= {"val_iou", "val_iou_shuffled", "val_iou_caption_shuffled", "val_iou_first_step",
                       "train_seconds", "parameters"}
    assert train_dit.main(_preset(epochs=2), data, out) == m2  # finished: stored metrics, no training
    arch = dit_arch(_preset().dit)
    ema = load_dit(out / "dit" / "model.safetensors", **arch)    # EMA weights, strict
    raw = load_dit(out / "dit" / "checkpoint.pt", which="model", **arch)
    saved_ema = torch.load(out / "dit" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(v, saved_ema[k]) for k, v in ema.state_dict().items())
    assert any(not torch.equal(v, saved_ema[k]) for k, v in raw.state_dict().items())
    # a run of 2 epochs straight gives the same weights, bit for bit, as 1 epoch + a resumed 2nd
    straight = tmp_path / "straight"
    _stage1(straight)
    train_dit.main(_preset(epochs=2), data, straight)
    resumed = torch.load(out / "dit" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, resumed[k])
               for k, v in torch.load(straight / "dit" / "checkpoint.pt", weights_only=True)["model"].items())


def test_evaluate_generation_shuffles_conditions():
    """A fake 'DiT' whose ε̂ pushes x̂_0 to the latent stored in its image feature: conditioned generation
    reproduces the masks (IoU 1), shuffled generation gives other items' masks."""
    n, d = 6, 4 * 2 * 2
    diffusion = GaussianDiffusion(get_betas("linear", 100))
    targets = torch.zeros(n, 4, 2, 2)
    masks = torch.zeros(n, 1, 2, 2)
    for i in range(n):                      # item i's mask: one distinct pixel lit
        masks[i, 0].view(-1)[i % 4] = 1.0
        targets[i, 0].view(-1)[i % 4] = 1.0
    targets[:, 1, 0, 0] = torch.arange(n).float()   # tells items with the same pixel apart

    class Fake(torch.nn.Module):
        in_channels, input_size = 4, 2

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, img, txt):
            abar = torch.from_numpy(diffusion.alphas_cumprod).float()[t].view(-1, 1, 1, 1)
            x0 = img.view(-1, 4, 2, 2)
            return torch.cat([(x - abar.sqrt() * x0) / (1 - abar).sqrt(), torch.zeros_like(x)], 1)

    class FakeVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z):
            return z[:, :1]

    encoded = {"image_features": targets.view(n, d), "text_features": torch.zeros(n, d), "mask": masks}
    r = train_dit.evaluate_generation(Fake(), FakeVAE(), diffusion, encoded, num_steps=10)
    assert r["iou"] == pytest.approx(1.0) and r["items"] == n
    assert r["iou_shuffled"] < 0.5
    assert r["iou_caption_shuffled"] == pytest.approx(1.0)   # the fake reads only the image feature
    assert r["iou_first_step"] == pytest.approx(1.0)         # x̂_0 read at the timestep ε̂ was made for


def test_condition_dropout_zeroes_whole_samples():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(400, 3, 4, 4) + 5, torch.randn(400, 8) + 5
    assert train_dit.drop_conditions(img, txt, 0.0, g) == (img, txt)
    d_img, d_txt = train_dit.drop_conditions(img, txt, 0.25, g)
    dropped = d_txt.abs().sum(1) == 0
    assert torch.equal(dropped, d_img.flatten(1).abs().sum(1) == 0)   # image and caption dropped together
    assert 0.15 < dropped.float().mean() < 0.35
    assert torch.equal(d_img[~dropped], img[~dropped]) and torch.equal(d_txt[~dropped], txt[~dropped])


def test_guidance_needs_condition_dropout(tmp_path):
    p = _preset()
    p.dit.guidance = 3.0
    with pytest.raises(SystemExit, match="cond_dropout"):
        train_dit.main(p, tmp_path, tmp_path / "run")


def test_extra_scenes_come_from_a_second_seed_beside_the_data(tmp_path):
    """extra_scenes: a synthetic set of the next seed, made once beside the data root; another kind of data root is
    refused with the fix."""
    from minidiffprompt.data.synthetic import ensure_synthetic, extra_scenes
    root = ensure_synthetic(tmp_path / "synthref", seed=3, images=12, size=64, log=lambda *a: None)
    extra = extra_scenes(root, 10, log=lambda *a: None)
    assert extra == tmp_path / "synthref-extra10" / "processed"
    assert json.loads((extra.parent / "synthetic.json").read_text()) == {"seed": 4, "images": 10, "size": 64}
    assert extra_scenes(root, 10, log=lambda *a: pytest.fail("made again")) == extra
    with pytest.raises(ValueError, match="synthetic"):
        extra_scenes(tmp_path / "elsewhere" / "processed", 10)
