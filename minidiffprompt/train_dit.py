"""Stage 2 training: the DiT learns to denoise mask latents given the image and the caption
(the authors' `DiT-main/train.py` in Kelvin-ywc/diff-prompt).

    python -m minidiffprompt train-vae --preset tiny                 # stage 1 first: its VAE encodes the masks
    python -m minidiffprompt train-dit --preset tiny                 # about two minutes on a laptop CPU
    python -m minidiffprompt train-dit --preset paper --data data/refcoco/processed

The authors' recipe: one sample per (object, expression); x_0 = a posterior sample of the frozen Mask-VAE
(no scaling factor); CLIP image and text features under no_grad; t ~ U{0..99}; loss = ε-MSE + VB (linear
schedule, T = 100); AdamW lr 1e-4 (constant: their cosine LR scheduler steps only once, after the training
loop), weight decay 0; EMA 0.9999; batch 128, 100 epochs.
`cache_latents` encodes every mask (posterior mean and σ) and every condition feature once, then draws a
fresh posterior sample per step, so epochs do not re-read images or re-run the encoders.

Writes `OUT/dit/`: `checkpoint.pt` after every epoch (model, EMA, optimizer: resumable), then
`model.safetensors` (the EMA weights), `config.json` and `metrics.json` (with the generation IoU on val).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .utils.checkpoint import (fingerprint, load_training, match_run, restore_training, save_training, save_weights,
                               stored_run)
from .utils.files import write_json
from .conditions import ConditionEncoder, build_condition_encoder
from .config import DiTConfig, Preset
from .data.datasets import RefExpDataset, collate
from .data.synthetic import expression_kind, extra_scenes
from .diffusion import GaussianDiffusion, ddim_timesteps, get_betas
from .utils.distributed import (all_reduce_mean, barrier, cleanup, distributed_loader, init_distributed, is_main, rank,
                                set_epoch, world_size, wrap_ddp)
from .dit import DiT, dit_arch, dit_from_config, guided, load_dit
from .evaluate import by_kind
from .pipeline import check_latents
from .utils.runtime import check_finite, progress, seed_everything
from .utils.shipped import resolve_weights
from .vae import MaskVAE, load_mask_vae

EVAL_SEED = 0      # DDIM start noise of the generation evaluation: the reported IoU is repeatable


def load_stage1_vae(out, device="cpu") -> MaskVAE:
    """The frozen Mask-VAE of the run folder (`OUT/vae/`), or an error saying how to make it."""
    folder = Path(out) / "vae"
    if not (folder / "model.safetensors").exists() or not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no trained Mask-VAE (model.safetensors + config.json). Stage 2 encodes "
                                f"masks with the stage-1 VAE: run `python -m minidiffprompt train-vae --preset ... "
                                f"--out {out}` first (same --out).")
    return load_mask_vae(folder).to(device).eval().requires_grad_(False)


def load_stage2(out, preset: Preset, device="cpu", which: str = "ema", sampling_schedule: str = "train"):
    """(dit, vae, diffusion, encoder) of a finished run folder, ready to sample; `which` = "ema" (model.safetensors)
    or "model" (the raw weights in checkpoint.pt). `sampling_schedule` "train" samples with the training schedule
    (correct); "squaredcos_cap_v2" reproduces the authors' stage-3 sampler, which uses the cosine schedule on a
    DiT trained with the linear one (`create_diffusion` in `DiT-main/train.py` vs. in
    `GLIP/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`), so at the same t the network expects
    far more noise than the sampler assumes."""
    cfg, folder = preset.dit, Path(out) / "dit"
    arch = dit_arch(cfg)
    if which == "ema":
        dit = load_dit(folder / "model.safetensors", **arch)
    else:
        dit = load_dit(folder / "checkpoint.pt", which="model", **arch)
    dit = dit.to(device).eval().requires_grad_(False)
    vae = load_stage1_vae(out, device)
    schedule = cfg.noise_schedule if sampling_schedule == "train" else sampling_schedule
    diffusion = GaussianDiffusion(get_betas(schedule, cfg.diffusion_steps), cfg.prediction)
    return dit, vae, diffusion, build_condition_encoder(cfg).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Encoding a split: masks → posterior (mean, σ), (image, caption) → condition features


@torch.no_grad()
def encode_split(root, split: str, preset: Preset, vae: MaskVAE, encoder: ConditionEncoder, device,
                 max_items: int = 0) -> dict:
    """Every (object, expression) of a split run once through the frozen encoders:
    {"mean", "std": (N, 4, h, w), "image_features", "text_features": (N, D) or with caption_tokens (N, L, D),
    "mask": (N, 1, M, M), "caption"}."""
    dataset = RefExpDataset(root, split, preset.data.image_size, mask_size=preset.data.mask_size)
    if len(dataset) == 0:
        raise SystemExit(f"{root}: the {split!r} split has no expressions; run data_prep.py first")
    if max_items:
        dataset = torch.utils.data.Subset(dataset, range(min(max_items, len(dataset))))
    # its own generator: iterating a DataLoader draws a seed, which must not come from (and shift) the global RNG
    # that a resumed run has just restored
    loader = DataLoader(dataset, batch_size=128, shuffle=False, collate_fn=collate, generator=torch.Generator())
    parts = {"mean": [], "std": [], "image_features": [], "text_features": [], "mask": [], "caption": []}
    for batch in progress(loader, desc=f"encode {split}", leave=False):
        posterior = vae.encode(batch["mask"].to(device))                     # q(z | mask), no scaling factor
        img, txt = encoder.encode(batch["image"].to(device), batch["caption"])
        for key, value in (("mean", posterior.mean), ("std", posterior.std), ("image_features", img),
                           ("text_features", txt), ("mask", batch["mask"])):
            parts[key].append(value.float().cpu())
        parts["caption"] += list(batch["caption"])
    return {k: (v if k == "caption" else torch.cat(v)) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Generation and its evaluation


def start_noise(dit: DiT, n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """The sampler's x_T for n items (N, C, h, w), drawn from `seed`: every figure of one evaluation starts alike."""
    s = dit.input_size
    return torch.randn(n, dit.in_channels, s, s, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate_latents(dit: DiT, diffusion: GaussianDiffusion, image_features, text_features, num_steps: int = 25,
                     seed: int = EVAL_SEED, batch_size: int = 256, keep=None, guidance: float = 1.0):
    """DDIM samples (N, C, h, w) for the given features (noise from `seed`), plus the kept latents per batch."""
    device = next(dit.parameters()).device
    noise = start_noise(dit, len(image_features), seed)
    samples, kept = [], []
    for i in range(0, len(noise), batch_size):
        img = image_features[i:i + batch_size].to(device)
        txt = text_features[i:i + batch_size].to(device)
        x0, k = diffusion.ddim_sample(guided(dit, img, txt, guidance), None,
                                      noise=noise[i:i + batch_size].to(device), num_steps=num_steps, keep=keep)
        samples.append(x0.cpu())
        kept.append([z.cpu() for z in k])
    kept = [torch.cat([b[j] for b in kept]) for j in range(len(kept[0]))] if kept and kept[0] else []
    return torch.cat(samples), kept


@torch.no_grad()
def first_step_x0(dit: DiT, diffusion: GaussianDiffusion, image_features, text_features, num_steps: int = 25,
                  seed: int = EVAL_SEED, guidance: float = 1.0, batch_size: int = 256) -> torch.Tensor:
    """x̂_0 = (x_τ - √(1-ᾱ_τ)·ε̂) / √ᾱ_τ at the first DDIM timestep τ, from the start noise of `generate_latents`."""
    device = next(dit.parameters()).device
    noise = start_noise(dit, len(image_features), seed)
    t_first = ddim_timesteps(diffusion.num_timesteps, num_steps)[-1]
    out = []
    for i in range(0, len(noise), batch_size):
        x = noise[i:i + batch_size].to(device)
        t = torch.full((len(x),), t_first, device=device, dtype=torch.long)
        pred = guided(dit, image_features[i:i + batch_size].to(device), text_features[i:i + batch_size].to(device),
                      guidance)(x, t)[:, :dit.in_channels]
        eps = diffusion.eps_from_output(pred, x, t)
        out.append(diffusion.predict_x0_from_eps(x, t, eps).cpu())
    return torch.cat(out)


def mask_iou(pred, target, threshold: float = 0.5) -> torch.Tensor:
    """Per-mask IoU of `pred > threshold` against `target > threshold`: (N,). Both empty → 1."""
    p, g = (pred > threshold).flatten(1), (target > threshold).flatten(1)
    inter, union = (p & g).sum(1).float(), (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def evaluate_generation(dit: DiT, vae: MaskVAE, diffusion: GaussianDiffusion, encoded: dict, num_steps: int = 25,
                        seed: int = EVAL_SEED, threshold: float = 0.5, guidance: float = 1.0,
                        kinds: list[str] | None = None) -> dict:
    """Mean IoU of DDIM-generated masks (VAE-decoded, thresholded) against the ground truth, with the right
    conditions, with shuffled ones (each sample gets another sample's image + caption features, same noise) and
    with shuffled captions only (its own image, another sample's caption).
    Shuffled is the floor: what the DiT gets from mask statistics alone, without knowing which object is meant;
    the caption-shuffled figure shows how much of the gain comes from the image alone. `iou_first_step` decodes
    the x̂_0 of the sampler's first step instead (same noise, right conditions): the DiT's one-shot guess of
    the mask from pure noise, before sampling commits to one outcome. `hit50` is the share of items (percent) whose
    conditioned mask overlaps the true one at IoU ≥ 0.5, the mask's own R@1, by expression kind (`kinds`, one per
    item; without them all items count as "all"): what the mask path can tell the detector, next to the base's R@1."""
    n = len(encoded["mask"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    order = torch.empty_like(perm)
    order[perm] = torch.roll(perm, 1)          # one cycle through all items: nobody keeps its own condition
    device = next(vae.parameters()).device

    def iou(z):
        masks = torch.cat([vae.decode(z[i:i + 256].to(device)).cpu() for i in range(0, n, 256)])   # (N, 1, M, M)
        return mask_iou(masks, encoded["mask"], threshold)

    result = {}
    same = torch.arange(n)
    for name, img, txt in (("iou", same, same), ("iou_shuffled", order, order), ("iou_caption_shuffled", same, order)):
        z, _ = generate_latents(dit, diffusion, encoded["image_features"][img], encoded["text_features"][txt],
                                num_steps, seed, guidance=guidance)
        result[name] = iou(z)
    result["hit50"] = by_kind(result["iou"] >= 0.5, kinds or ["all"] * n)
    result = {k: v.mean().item() if torch.is_tensor(v) else v for k, v in result.items()}
    result["iou_first_step"] = iou(first_step_x0(dit, diffusion, encoded["image_features"], encoded["text_features"],
                                                 num_steps, seed, guidance)).mean().item()
    result["items"] = n
    return result


def generation_metrics(dit: DiT, vae: MaskVAE, diffusion: GaussianDiffusion, encoded: dict, cfg: DiTConfig,
                       synthetic: bool = False) -> dict:
    """`evaluate_generation` with the recipe's sampler (DDIM steps, guidance), under the names metrics.json records:
    val_iou, val_iou_shuffled, val_iou_caption_shuffled, val_hit50 (by expression kind on the synthetic set),
    val_iou_first_step, val_items."""
    kinds = [expression_kind(c) for c in encoded["caption"]] if synthetic else None
    gen = evaluate_generation(dit, vae, diffusion, encoded, num_steps=cfg.ddim_steps, guidance=cfg.guidance,
                              kinds=kinds)
    return {f"val_{k}": v for k, v in gen.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training


def run_config(preset: Preset, data=None, out=None) -> dict:
    """What must match for a stored run to count as this run: the settings, the data and the weights it builds on
    (the run's Mask-VAE and the condition encoder's files)."""
    config = {"image_size": preset.data.image_size, "mask_size": preset.data.mask_size,
              "dit": dataclasses.asdict(preset.dit)}
    if data is not None:
        clip = preset.dit.clip_path if preset.dit.condition in ("clip", "tiny_clip", "glip") else ""
        config["data"] = fingerprint(data)
        if preset.dit.extra_scenes:
            config["extra_data"] = fingerprint(extra_scenes(data, preset.dit.extra_scenes, log=lambda *a: None))
        config["upstream"] = {"vae": fingerprint(Path(out) / "vae"),
                              "condition": fingerprint(resolve_weights(clip)) if clip else None}
    return json.loads(json.dumps(config))


def drop_conditions(image_features, text_features, p: float, generator: torch.Generator):
    """Zero both features of a random share p of the samples: the null condition of classifier-free guidance."""
    if not p:
        return image_features, text_features
    keep = (torch.rand(len(text_features), generator=generator) >= p).to(text_features.device)
    return (image_features * keep.view(-1, *[1] * (image_features.dim() - 1)).to(image_features.dtype),
            text_features * keep.view(-1, *[1] * (text_features.dim() - 1)).to(text_features.dtype))


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float):
    """θ_ema ← decay·θ_ema + (1 - decay)·θ after every optimiser step (DiT train.py)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _batches(train: dict | None, data, preset: Preset, vae, encoder, device, generator, epoch: int = 0):
    """Yields (x0, image_features, text_features): from the cache, or encoded on the fly."""
    cfg = preset.dit
    if train is not None:
        ds = TensorDataset(train["mean"], train["std"], train["image_features"], train["text_features"])
        if world_size() > 1:                   # each rank loads its share of the global batch
            loader = distributed_loader(ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                        drop_last=len(ds) > cfg.batch_size)
            set_epoch(loader, epoch)
        else:
            loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                                drop_last=len(ds) > cfg.batch_size)
        for mean, std, img, txt in loader:
            if not cfg.posterior_sample:     # the posterior mean: the tiny VAE's σ is larger than its signal
                yield mean.to(device), img.to(device), txt.to(device)
                continue
            eps = torch.randn(mean.shape, generator=generator)
            yield (mean + std * eps).to(device), img.to(device), txt.to(device)   # x0 ~ q(z | mask), fresh each step
        return
    dataset = RefExpDataset(data, "train", preset.data.image_size, mask_size=preset.data.mask_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=True,
                        collate_fn=collate, num_workers=preset.data.num_workers)
    if world_size() > 1:
        loader = distributed_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                    collate_fn=collate, num_workers=preset.data.num_workers)
        set_epoch(loader, epoch)
    with torch.no_grad():
        for batch in loader:
            posterior = vae.encode(batch["mask"].to(device))
            x0 = posterior.sample() if cfg.posterior_sample else posterior.mode()
            img, txt = encoder.encode(batch["image"].to(device), batch["caption"])
            yield x0, img, txt


def main(preset: Preset, data, out, resume: bool = True) -> dict:
    """Train (or resume, or reuse) the DiT prompt generator of `preset`; returns the final metrics."""
    cfg: DiTConfig = preset.dit
    if not 0 <= cfg.cond_dropout < 1:
        raise SystemExit(f"train-dit: --cond_dropout must be in [0, 1), got {cfg.cond_dropout}")
    if cfg.extra_scenes and not cfg.cache_latents:
        raise SystemExit("train-dit: --extra_scenes needs --cache_latents true (the extra scenes are encoded once)")
    if cfg.guidance != 1 and not cfg.cond_dropout:
        raise SystemExit(f"train-dit: --guidance {cfg.guidance} needs a DiT that learned the null condition; "
                         "set --cond_dropout (e.g. 0.15) or --guidance 1")
    load_stage1_vae(out)                     # fails early, before the data and extra scenes are fingerprinted
    stage = Path(out) / "dit"
    wanted = run_config(preset, data, out)
    if resume and (run := stored_run(stage)) is not None:
        stored = run[0].get("train", {})
        if match_run(stored, wanted, stage, "dit", stored.get("dit", {}).get("epochs")) == "same":
            return run[1]                                                 # "extend": continue from the checkpoint

    device = init_distributed(getattr(preset, "device", "auto"))   # one process per GPU under torchrun
    vae = load_stage1_vae(out, device)
    generator = seed_everything(cfg.seed)
    encoder = build_condition_encoder(cfg).to(device)
    dit = dit_from_config(cfg).to(device)
    check_latents(vae, dit, preset.data.mask_size, Path(out) / "vae")
    ema = copy.deepcopy(dit).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    model = wrap_ddp(dit, device)              # forward/backward through `model`; EMA and files use `dit`
    diffusion = GaussianDiffusion(get_betas(cfg.noise_schedule, cfg.diffusion_steps), cfg.prediction)
    start, history, elapsed, steps = 0, [], 0.0, 0

    state = load_training(stage / "checkpoint.pt") if resume else None
    if state is not None:        # same settings, or more epochs than it reached: resume; else RunMismatch
        match_run(state["config"], wanted, stage / "checkpoint.pt", "dit", state["epoch"] - 1)
        restore_training(state, generator, stage / "checkpoint.pt", model=dit, ema=ema, opt=optimizer)
        start, history, elapsed, steps = state["epoch"], state["history"], state["seconds"], state["steps"]
        if is_main():
            print(f"train-dit: resuming {stage / 'checkpoint.pt'} after epoch {start}")
    if world_size() > 1:   # same initial weights and EMA everywhere, then each rank its own t / ε / x0 noise
        torch.manual_seed(cfg.seed + 1000 * rank() + start)
        generator.manual_seed(cfg.seed + 1000 * rank() + start)

    t0 = time.perf_counter()
    train = encode_split(data, "train", preset, vae, encoder, device) if cfg.cache_latents else None
    if cfg.extra_scenes:          # more train scenes from a second synthetic set (its val and test splits unused)
        more = encode_split(extra_scenes(data, cfg.extra_scenes), "train", preset, vae, encoder, device)
        train = {k: train[k] + more[k] if k == "caption" else torch.cat([train[k], more[k]]) for k in train}
    if train is not None:
        train.pop("mask")         # training reads latents; the masks are only scored on val
    val = encode_split(data, "val", preset, vae, encoder, device, max_items=cfg.eval_items)
    elapsed += time.perf_counter() - t0
    n_params = sum(p.numel() for p in dit.parameters())
    if start == 0 and is_main():
        n_train = len(train["mean"]) if train is not None else "?"
        print(f"train-dit: {n_params:,} parameters, {n_train} train pairs, latents {dit.in_channels}×"
              f"{cfg.input_size}², {cfg.noise_schedule} schedule T={cfg.diffusion_steps}, {cfg.epochs} epochs "
              f"on {device}")

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        dit.train()
        totals, n = {"loss": 0.0, "mse": 0.0, "vb": 0.0}, 0
        bar = progress(_batches(train, data, preset, vae, encoder, device, generator, epoch), leave=False,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for x0, img, txt in bar:
            img, txt = drop_conditions(img, txt, cfg.cond_dropout, generator)
            t = torch.randint(0, diffusion.num_timesteps, (len(x0),), device=device)   # uniform t, as DiT-main/train.py
            losses = diffusion.training_losses(lambda x, tt: model(x, tt, img, txt), x0, t,
                                               x0_weight_cap=cfg.x0_weight_cap)
            loss = losses["loss"].mean()
            check_finite(loss, "train-dit", steps + 1, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_ema(ema, dit, cfg.ema_decay)
            steps += 1
            for key in totals:
                totals[key] += losses[key].detach().sum().item()
            n += len(x0)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        stats = {k: all_reduce_mean(v / max(n, 1)).item() for k, v in totals.items()}   # mean over the ranks
        elapsed += time.perf_counter() - t0
        stats.update(epoch=epoch + 1, steps=steps, seconds=round(elapsed, 2))
        history.append(stats)
        if is_main():                              # rank 0 logs and writes; the others wait at the barrier
            print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {stats['loss']:.4f}  mse {stats['mse']:.4f}  "
                  f"vb {stats['vb']:.4f}  {elapsed:.0f}s")
            save_training(stage / "checkpoint.pt", model=dit.state_dict(), ema=ema.state_dict(),
                          opt=optimizer.state_dict(), shuffle_rng=generator.get_state(),
                          torch_rng=torch.get_rng_state(), epoch=epoch + 1, steps=steps, history=history,
                          seconds=elapsed, config=wanted)
        barrier()

    if not history:
        raise SystemExit(f"train-dit: nothing to train (epochs={cfg.epochs}); set --epochs to at least 1")
    ema.eval()
    gen = generation_metrics(ema, vae, diffusion, val, cfg, synthetic=preset.name == "tiny")
    if is_main():                                  # every rank evaluated (same numbers); rank 0 writes
        print(f"train-dit: {gen['val_hit50']['all']:.1f} % of the val masks hit their object (IoU ≥ 0.5; "
              + ", ".join(f"{k} {v:.1f}" for k, v in gen["val_hit50"].items() if k != "all") + ")")
        print(f"train-dit: val mask IoU of generated masks {gen['val_iou']:.3f} (shuffled conditions "
              f"{gen['val_iou_shuffled']:.3f}, shuffled captions {gen['val_iou_caption_shuffled']:.3f}; the first "
              f"step's x̂_0 {gen['val_iou_first_step']:.3f}; {gen['val_items']} "
              f"items, DDIM {cfg.ddim_steps}" + (f", guidance {cfg.guidance:g})" if cfg.guidance != 1 else ")"))
    metrics = {**gen, "loss": history[-1]["loss"], "epochs": len(history), "steps": steps, "parameters": n_params,
               "train_seconds": round(elapsed, 2), "history": history}
    arch = dit_arch(cfg)
    if is_main():
        save_weights(ema.state_dict(), stage / "model.safetensors")       # EMA weights, like the HF export
        write_json(stage / "metrics.json", metrics)
        write_json(stage / "config.json", {"model_type": "mask_dit", **arch, "train": wanted})   # last: stage done
    barrier()
    cleanup()
    return metrics
