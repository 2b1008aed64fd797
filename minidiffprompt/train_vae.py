"""Stage 1 training: fit the Mask-VAE to the masks of the referred objects (the authors' `unique_vae/run.py`).

    python -m minidiffprompt train-vae --preset tiny                  # synthetic set, about a minute on a CPU
    python -m minidiffprompt train-vae --preset paper --data data/refcoco/processed
    python -m minidiffprompt train-vae --preset tiny --epochs 6       # continues a finished 3-epoch run

The authors' recipe (Kelvin-ywc/diff-prompt, `unique_vae/configs/mask_vae_v2.yaml`, `experiment.py`,
`dataset.py`): one sample per referred object, masks resized bilinearly to M×M in [0, 1], loss = pixel MSE +
w_KL · KL with the KL summed over latent channels and averaged over batch and positions (w_KL = 3.7732e-4),
Adam lr 5e-3, ExponentialLR γ = 0.95 per epoch, batch 64, 200 epochs. Validation reports their val_loss (KL
weight 1.0, not the training weight: `VAEXperiment.validation_step` passes M_N = 1.0, and their checkpoints are
selected by it) plus what the later stages care about: the reconstruction MSE and the IoU of the reconstructed
mask thresholded at 0.5.

Writes `OUT/vae/`: `checkpoint.pt` after every epoch (resumable), then `model.safetensors`, `config.json`
(diffusers-style architecture + the training config) and `metrics.json`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .utils.checkpoint import (fingerprint, load_training, match_run, restore_training, save_training, save_weights,
                               stored_run)
from .utils.files import write_json
from .config import Preset, VAEConfig
from .data.datasets import MaskDataset
from .utils.distributed import (all_reduce_mean, barrier, cleanup, distributed_loader, init_distributed, is_main, rank,
                                set_epoch, world_size, wrap_ddp)
from .utils.runtime import check_finite, loader_kwargs, progress, seed_everything
from .vae import DiagonalGaussian, MaskVAE, diffusers_config

VAL_SEED = 0   # the posterior samples of the validation pass are drawn from this seed: validation is repeatable


def build_vae(cfg: VAEConfig) -> MaskVAE:
    return MaskVAE(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                   latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups)


def vae_loss(recon, x, posterior: DiagonalGaussian, kl_weight: float):
    """The authors' objective (mask_vanilla_vae_v2.py:66-89): MSE over pixels + w_KL · KL(channels summed)."""
    mse = F.mse_loss(recon, x)
    kl = posterior.kl().mean()                 # (B, h, w) → mean over batch and positions
    return mse + kl_weight * kl, mse, kl


def mask_iou(recon, x, threshold: float = 0.5) -> torch.Tensor:
    """IoU per mask of the thresholded reconstruction against the thresholded target: (B,). Empty ∪ → 1."""
    pred, target = (recon > threshold).flatten(1), (x > threshold).flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def load_mask_tensors(root, split: str, mask_size: int) -> torch.Tensor:
    """All masks of a split as one (N, 1, M, M) tensor, one per referred object (`data.MaskDataset`)."""
    dataset = MaskDataset(root, split, mask_size)
    masks = [dataset[i]["mask"] for i in progress(range(len(dataset)), desc=f"masks {split}", leave=False)]
    if not masks:
        raise SystemExit(f"{root}: the {split!r} split has no objects; run data_prep.py first")
    return torch.stack(masks)                  # (N, 1, M, M)


def mask_loader(root, split: str, mask_size: int, batch_size: int, shuffle: bool, cache: bool, workers: int,
                device, generator=None) -> DataLoader:
    """Batches of (B, 1, M, M) masks; `cache` rasterises every mask once and keeps the tensor in memory."""
    if cache:
        dataset = TensorDataset(load_mask_tensors(root, split, mask_size))
        workers = 0
    else:
        dataset = MaskDataset(root, split, mask_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False,
                      **loader_kwargs(workers, device))


def _masks(batch, device):
    mask = batch[0] if isinstance(batch, (list, tuple)) else batch["mask"]
    return mask.to(device, non_blocking=True)


def train_one_epoch(vae, loader, optimizer, device, kl_weight: float, desc: str = "train") -> dict:
    """One pass over the training masks with the reparameterised sample z = mean + exp(logvar/2)·ε, as the
    authors' `MaskVanillaVAE_V2.forward`."""
    vae.train()
    totals, n = {"loss": 0.0, "mse": 0.0, "kl": 0.0}, 0
    bar = progress(loader, desc=desc, leave=False)
    for step, batch in enumerate(bar, 1):
        x = _masks(batch, device)                       # (B, 1, M, M) in [0, 1]
        recon, posterior = vae(x, sample=True)
        loss, mse, kl = vae_loss(recon, x, posterior, kl_weight)
        check_finite(loss, "train-vae", step, optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("mse", mse), ("kl", kl)):
            totals[key] += value.item() * len(x)
        n += len(x)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.no_grad()
def evaluate(vae, loader, device) -> dict:
    """val_loss as the authors computed it (KL weight 1.0), recon MSE, KL, IoU at 0.5 (sampled z and z = mean)."""
    vae.eval()
    generator = torch.Generator(device=device).manual_seed(VAL_SEED)
    totals, n = {"val_loss": 0.0, "val_mse": 0.0, "val_kl": 0.0, "val_iou": 0.0, "val_iou_mean": 0.0}, 0
    for batch in loader:
        x = _masks(batch, device)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator))   # a posterior sample, as stage 2 encodes its targets
        loss, mse, kl = vae_loss(recon, x, posterior, kl_weight=1.0)
        iou, iou_mean = mask_iou(recon, x).sum(), mask_iou(vae.decode(posterior.mode()), x).sum()
        for key, value in (("val_loss", loss * len(x)), ("val_mse", mse * len(x)), ("val_kl", kl * len(x)),
                           ("val_iou", iou), ("val_iou_mean", iou_mean)):
            totals[key] += value.item()
        n += len(x)
    return {k: v / max(n, 1) for k, v in totals.items()}


def run_config(preset: Preset, data) -> dict:
    """What must match for a stored run to count as this run: the settings and the data (JSON-normalised)."""
    return json.loads(json.dumps({"mask_size": preset.data.mask_size, "vae": dataclasses.asdict(preset.vae),
                                  "data": fingerprint(data)}))


def main(preset: Preset, data, out, resume: bool = True) -> dict:
    """Train (or resume, or reuse) the Mask-VAE of `preset` on `data`; returns the final metrics."""
    cfg, stage = preset.vae, Path(out) / "vae"
    wanted = run_config(preset, data)
    if resume and (run := stored_run(stage)) is not None:
        stored = run[0].get("train", {})
        if match_run(stored, wanted, stage, "vae", stored.get("vae", {}).get("epochs")) == "same":
            return run[1]                                                 # "extend": continue from the checkpoint

    device = init_distributed(getattr(preset, "device", "auto"))   # one process per GPU under torchrun
    generator = seed_everything(cfg.seed)                             # the same initial weights on every rank
    vae = build_vae(cfg).to(device)
    vae.latent_side(preset.data.mask_size)          # a mask size its blocks cannot halve evenly: an error now
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    model = wrap_ddp(vae, device)              # forward/backward through `model` (DDP under torchrun); save `vae`
    start, history, elapsed = 0, [], 0.0

    state = load_training(stage / "checkpoint.pt") if resume else None
    if state is not None:        # same settings, or more epochs than it reached: resume; else RunMismatch
        match_run(state["config"], wanted, stage / "checkpoint.pt", "vae", state["epoch"] - 1)
        restore_training(state, generator, stage / "checkpoint.pt", model=vae, optimizer=optimizer,
                         scheduler=scheduler)
        start, history, elapsed = state["epoch"], state["history"], state["seconds"]
        if is_main():
            print(f"train-vae: resuming {stage / 'checkpoint.pt'} after epoch {start}", flush=True)
    if world_size() > 1:
        torch.manual_seed(cfg.seed + 1000 * rank() + start)   # each rank its own posterior-sampling noise

    workers = preset.data.num_workers
    train = mask_loader(data, "train", preset.data.mask_size, cfg.batch_size, True, cfg.cache_masks, workers,
                        device, generator)
    if world_size() > 1:                                      # each rank loads its share of the global batch
        train = distributed_loader(train.dataset, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                   **loader_kwargs(0 if cfg.cache_masks else workers, device))
    val = mask_loader(data, "val", preset.data.mask_size, cfg.batch_size, False, cfg.cache_masks, workers, device)
    n_params = sum(p.numel() for p in vae.parameters())
    if start == 0 and is_main():
        print(f"train-vae: {n_params:,} parameters, {len(train.dataset)} train / {len(val.dataset)} val masks "
              f"of {preset.data.mask_size}², latents {cfg.latent_channels}×"
              f"{preset.data.mask_size // vae.downsample_factor}², {cfg.epochs} epochs on {device}", flush=True)

    for epoch in range(start, cfg.epochs):
        set_epoch(train, epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train, optimizer, device, cfg.kl_weight, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        stats = {k: all_reduce_mean(v).item() for k, v in stats.items()}      # the mean over the ranks
        scheduler.step()                                   # ExponentialLR: once per epoch
        stats.update(evaluate(vae, val, device), epoch=epoch + 1, lr=lr)
        elapsed += time.perf_counter() - t0
        history.append(stats)
        if is_main():                              # rank 0 logs and writes; the others wait at the barrier
            print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {stats['loss']:.4f}  mse {stats['mse']:.4f}  "
                  f"val_loss {stats['val_loss']:.4f}  val_mse {stats['val_mse']:.4f}  "
                  f"val_iou {stats['val_iou']:.3f}  lr {lr:.2e}  {elapsed:.0f}s", flush=True)
            save_training(stage / "checkpoint.pt", model=vae.state_dict(), optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), shuffle_rng=generator.get_state(),
                          torch_rng=torch.get_rng_state(), epoch=epoch + 1, history=history, seconds=elapsed,
                          config=wanted)
        barrier()

    if not history:
        raise SystemExit(f"train-vae: nothing to train (epochs={cfg.epochs}); set --epochs to at least 1")
    # the last epoch's weights are kept (the authors' release, epoch 157 of 158, was effectively the last one)
    metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")}
    metrics.update(epochs=len(history), parameters=n_params, train_seconds=round(elapsed, 2), history=history)
    if is_main():
        save_weights(vae.state_dict(), stage / "model.safetensors")
        write_json(stage / "metrics.json", metrics)
        write_json(stage / "config.json", {**diffusers_config(vae), "train": wanted})   # last: marks the stage done
    barrier()
    cleanup()
    return metrics
