"""Mask-VAE: equal to diffusers' AutoencoderKL on the same weights, loads every release format strictly, trains."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minidiffprompt import train_vae
from minidiffprompt.utils.checkpoint import CheckpointMismatch, RunMismatch, keys_from_tsv, load_strict, save_weights
from minidiffprompt.config import get_preset
from minidiffprompt.vae import DiagonalGaussian, MaskVAE, diffusers_config, load_mask_vae

# the authors' AutoencoderKL (`MaskVanillaVAE_V2` in Kelvin-ywc/diff-prompt `unique_vae/models/mask_vanilla_vae_v2.py`)
AUTHORS_CONFIG = dict(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 8, 16, 16), layers_per_block=2,
                      latent_channels=4, norm_num_groups=2, sample_size=256)


def vae_keys() -> Path:
    return Path(__file__).resolve().parent / "fixtures" / "mask_vae.tsv"   # the authors' 248 AutoencoderKL keys, shapes


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-default weights everywhere (GroupNorm affine and biases included), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def drawn_masks(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) ellipses / rectangles / triangles, drawn large and resized bilinearly like real masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        W, H = (int(v) for v in rng.integers(96, 200, 2))
        im = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(im)
        w, h = rng.uniform(0.15, 0.6) * W, rng.uniform(0.15, 0.6) * H
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=255)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=255)
        else:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=255)
        out.append(torch.from_numpy(np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255)[None])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# Architecture: against diffusers, and against the key manifest


@pytest.mark.parametrize("direction", ["diffusers_to_ours", "ours_to_diffusers"])
def test_matches_diffusers_autoencoderkl(direction):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref, ours = diffusers.AutoencoderKL(**AUTHORS_CONFIG).eval(), MaskVAE().eval()
    if direction == "diffusers_to_ours":
        load_strict(ours, ref.state_dict(), source="diffusers AutoencoderKL")
    else:
        ref.load_state_dict(randomize(ours, seed=1, std=0.1).state_dict(), strict=True)
    x = drawn_masks(2, size=128)                                   # (2, 1, 128, 128) → latents (2, 4, 16, 16)
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ref_post, post = ref.encode(x).latent_dist, ours.encode(x)
        ref_out, out = ref.decode(z).sample, ours.decode(z)
        # the same generator gives the same posterior sample
        ref_z = ref_post.sample(torch.Generator().manual_seed(3))
        our_z = post.sample(torch.Generator().manual_seed(3))
    for name, a, b in [("mean", ref_post.mean, post.mean), ("logvar", ref_post.logvar, post.logvar),
                       ("decode", ref_out, out), ("sample", ref_z, our_z)]:
        assert a.shape == b.shape, name
        rel = ((a - b).abs().max() / a.abs().max()).item()
        assert rel <= 1e-5, f"{name}: max difference {rel:.2e} of the output scale"
    # diffusers' KL sums over positions too; ours keeps positions for the authors' mean over them
    torch.testing.assert_close(post.kl().sum((1, 2)), ref_post.kl(), rtol=1e-5, atol=1e-4)


def test_matches_diffusers_in_float64():
    """In float64 round-off vanishes: the two computations agree to ~1e-14, so they are the same function."""
    diffusers = pytest.importorskip("diffusers")
    ref = randomize(diffusers.AutoencoderKL(**AUTHORS_CONFIG), seed=5).double().eval()
    ours = load_strict(MaskVAE().double().eval(), ref.state_dict())
    x, z = drawn_masks(1, size=64).double(), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref_post, post = ref.encode(x).latent_dist, ours.encode(x)
        pairs = [(ref_post.mean, post.mean), (ref_post.logvar, post.logvar), (ref.decode(z).sample, ours.decode(z))]
    for a, b in pairs:
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10


def test_released_key_manifest_loads_strictly():
    shapes = keys_from_tsv(vae_keys())
    vae = MaskVAE()
    assert len(shapes) == 248 and list(shapes) == list(vae.state_dict())
    load_strict(vae, {k: torch.zeros(s) for k, s in shapes.items()}, source="keys/mask_vae.tsv")
    assert sum(p.numel() for p in vae.parameters()) == 85_529
    counts = {part: sum(p.numel() for n, p in vae.named_parameters() if n.startswith(part))
              for part in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    assert counts == {"encoder": 35_372, "decoder": 50_065, "quant_conv": 72, "post_quant_conv": 20}


@pytest.mark.parametrize("size", [224, 64])
def test_shapes_and_downsample_factor(size):
    vae = MaskVAE()
    assert vae.downsample_factor == 8
    with torch.no_grad():
        post = vae.encode(torch.zeros(1, 1, size, size))
        assert post.mean.shape == post.logvar.shape == (1, 4, size // 8, size // 8)
        assert vae.decode(post.sample()).shape == (1, 1, size, size)


def test_posterior_clamp_and_kl_by_hand():
    mean = torch.tensor([1.0, 0.0, 2.0, -1.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, 50.0, -40.0, 1.0]).view(1, 4, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert post.logvar.flatten().tolist() == [0.0, 20.0, -30.0, 1.0]        # clamped to [-30, 20]
    lv = torch.tensor([0.0, 20.0, -30.0, 1.0])
    by_hand = 0.5 * sum(m ** 2 + np.exp(l) - 1 - l for m, l in zip([1.0, 0.0, 2.0, -1.0], lv.tolist()))
    assert post.kl().shape == (1, 1, 1)
    assert post.kl().item() == pytest.approx(by_hand, rel=1e-6)
    assert torch.equal(post.mode(), mean)


def test_loss_and_iou_by_hand():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, :2, :2] = 1                      # 4 pixels
    recon = torch.zeros(2, 1, 4, 4)
    recon[0, 0, :2, :] = 0.9                 # 8 pixels, 4 of them right → IoU 0.5; sample 1: both empty → 1
    post = DiagonalGaussian(torch.zeros(2, 8, 2, 2))
    post.mean = post.mean + 1.0              # KL per position = 0.5 · Σ_c 1 = 2
    loss, mse, kl = train_vae.vae_loss(recon, x, post, kl_weight=0.1)
    expected_mse = ((recon - x) ** 2).mean()
    assert mse.item() == pytest.approx(expected_mse.item()) and kl.item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(expected_mse.item() + 0.2)
    assert train_vae.mask_iou(recon, x).tolist() == pytest.approx([0.5, 1.0])


# ----------------------------------------------------------------------------------------------------------------
# Loading: every format of the release, and errors that name keys


def test_load_formats(tmp_path):
    vae = randomize(MaskVAE(), seed=2, std=0.1).eval()
    state = vae.state_dict()
    x = drawn_masks(1)

    folder = tmp_path / "diffusers_folder"                 # config.json + diffusion_pytorch_model.safetensors
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(vae)))
    save_weights(state, folder / "diffusion_pytorch_model.safetensors")
    bin_folder = tmp_path / "bin_folder"                   # the .bin variant of the folder
    bin_folder.mkdir()
    torch.save(state, bin_folder / "diffusion_pytorch_model.bin")
    bare = save_weights(state, tmp_path / "mask_vae.safetensors")
    lightning = tmp_path / "epoch=157-step=13113.ckpt"     # MaskVanillaVAE_V2 keeps the AutoencoderKL as self.vae
    torch.save({"epoch": 157, "global_step": 13113,
                "state_dict": {"model.vae." + k: v for k, v in state.items()}}, lightning)

    for path in (folder, bin_folder, bare, lightning):
        loaded = load_mask_vae(path)
        for k, v in state.items():
            assert torch.equal(loaded.state_dict()[k], v), f"{path.name}: {k}"
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x).mean, vae.encode(x).mean)


def test_folder_config_sets_the_architecture(tmp_path):
    small = MaskVAE(block_out_channels=(4, 8, 8), layers_per_block=1)
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(small)))
    save_weights(small.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_mask_vae(tmp_path)
    assert loaded.config["block_out_channels"] == (4, 8, 8) and loaded.downsample_factor == 4
    bad = {**diffusers_config(small), "down_block_types": ["CrossAttnDownBlock2D"] * 3}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="down_block_types"):
        load_mask_vae(tmp_path)


def test_diffusers_save_pretrained_folder_loads(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref = randomize(diffusers.AutoencoderKL(**AUTHORS_CONFIG), seed=4).eval()
    ref.save_pretrained(tmp_path / "mask_vae")
    ours = load_mask_vae(tmp_path / "mask_vae")
    x = drawn_masks(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, rtol=1e-5, atol=1e-5)


def test_wrong_files_name_the_keys(tmp_path):
    state = MaskVAE().state_dict()
    wrong = dict(state)
    del wrong["decoder.conv_out.weight"]
    wrong["decoder.conv_out.weight_typo"] = state["decoder.conv_out.weight"]
    wrong["quant_conv.weight"] = torch.zeros(4, 8, 1, 1)
    save_weights(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointMismatch) as err:
        load_mask_vae(tmp_path / "wrong.safetensors")
    message = str(err.value)
    assert "wrong.safetensors" in message
    assert "missing keys (1): decoder.conv_out.weight" in message
    assert "unexpected keys (1): decoder.conv_out.weight_typo" in message
    assert "quant_conv.weight: checkpoint (4, 8, 1, 1) vs model (8, 8, 1, 1)" in message

    # a Lightning checkpoint of some other model: nothing under model.vae.
    torch.save({"state_dict": {"model.encoder.weight": torch.zeros(3)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys \(1\): model.encoder.weight"):
        load_mask_vae(tmp_path / "other.ckpt")

    # a download cut short
    good = save_weights(state, tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointMismatch, match="truncated"):
        load_mask_vae(tmp_path / "truncated.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Training


def test_loss_falls_on_drawn_masks():
    torch.manual_seed(0)
    vae = MaskVAE()
    masks = drawn_masks(64, size=32)                        # 32² keeps the test fast; latents (4, 4, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(masks), batch_size=16, shuffle=True)
    cfg = get_preset("tiny").vae
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    before = train_vae.evaluate(vae, loader, "cpu")
    losses = [train_vae.train_one_epoch(vae, loader, optimizer, "cpu", cfg.kl_weight)["loss"] for _ in range(6)]
    after = train_vae.evaluate(vae, loader, "cpu")
    assert losses[-1] < 0.8 * losses[0] and losses[-1] == min(losses), losses
    assert after["val_mse"] < 0.7 * before["val_mse"] and after["val_iou"] > before["val_iou"], (before, after)


def test_main_writes_the_run_resumes_and_reuses(tmp_path, monkeypatch):
    masks = {"train": drawn_masks(32, size=32), "val": drawn_masks(8, size=32, seed=1)}
    monkeypatch.setattr(train_vae, "load_mask_tensors", lambda root, split, size: masks[split])
    preset = get_preset("tiny")
    preset.data.mask_size, preset.vae.epochs, preset.vae.batch_size = 32, 2, 16
    metrics = train_vae.main(preset, tmp_path / "data", tmp_path / "run")
    stage = tmp_path / "run" / "vae"
    assert {p.name for p in stage.iterdir()} >= {"checkpoint.pt", "model.safetensors", "config.json", "metrics.json"}
    assert metrics["epochs"] == 2 and metrics["parameters"] == 57_369 and len(metrics["history"]) == 2  # 3 blocks
    assert 0.0 <= metrics["val_iou"] <= 1.0 and metrics["val_mse"] > 0
    vae = load_mask_vae(stage)                                  # the run folder is a loadable Mask-VAE folder
    assert vae.downsample_factor == 4                           # tiny: 64² masks → 16×16 latents

    calls = []
    real_epoch = train_vae.train_one_epoch
    monkeypatch.setattr(train_vae, "train_one_epoch", lambda *a, **k: calls.append(1) or real_epoch(*a, **k))
    assert train_vae.main(preset, tmp_path / "data", tmp_path / "run") == metrics and not calls  # stored result
    preset.vae.epochs = 3                                       # more epochs: continue from checkpoint.pt
    longer = train_vae.main(preset, tmp_path / "data", tmp_path / "run")
    assert len(calls) == 1 and longer["epochs"] == 3 and longer["history"][:2] == metrics["history"]
    preset.vae.epochs = 2                                       # fewer epochs: never shortened unasked
    with pytest.raises(RunMismatch, match="vae.epochs: 3 there, 2 now"):
        train_vae.main(preset, tmp_path / "data", tmp_path / "run")
    preset.vae.epochs, preset.vae.lr = 3, 1e-3                  # another recipe: an error naming it ...
    with pytest.raises(RunMismatch, match="vae.lr: 0.005 there, 0.001 now.*--no-resume"):
        train_vae.main(preset, tmp_path / "data", tmp_path / "run")
    assert len(calls) == 1                                      # nothing was trained or overwritten
    fresh = train_vae.main(preset, tmp_path / "data", tmp_path / "run", resume=False)   # ... unless --no-resume
    assert len(calls) == 4 and fresh["epochs"] == 3


def test_masks_of_the_synthetic_set(tmp_path):
    from minidiffprompt.data.synthetic import ensure_synthetic
    root = ensure_synthetic(tmp_path / "synth", seed=1, images=30, size=128, log=lambda *a: None)
    masks = train_vae.load_mask_tensors(root, "val", 64)
    assert masks.ndim == 4 and masks.shape[1:] == (1, 64, 64) and len(masks) > 0
    assert 0.0 <= masks.min() and masks.max() <= 1.0 and (masks > 0.5).any()
