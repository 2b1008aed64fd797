"""Stage 3: prompt tuning of a frozen GLIP: Diff-Prompt and the baselines in one harness.

    python -m minidiffprompt train-prompts --preset tiny                       # Diff-Prompt, depth 4, length 8
    python -m minidiffprompt train-prompts --preset tiny --method vpt          # VPT-deep baseline
    python -m minidiffprompt train-prompts --preset paper --data data/refcoco/processed \\
        --glip_weights glip_a_tiny_o365.pth --vae_weights mask_vae --dit_weights 0094200.pt

Methods (--method): `diffprompt` (Diff-Prompt, ICLR 2025; `prompting.DiffPromptGenerator`), `vpt` (learnable
visual prompts per Swin block), `textprompt` (learnable textual prompts per BERT layer), `full` (all GLIP
parameters train, no prompts; the upper reference) and `zeroshot` (nothing trains). With prompts, only the prompt
module trains: GLIP, DiT, VAE and the condition encoder are frozen, in eval mode, requires_grad False (as the
authors' `GeneralizedVLRCNN.train()`, which also keeps Swin DropPath, FPN DropBlock and BERT dropout off). The
loss is GLIP's own grounding loss (token focal + GIoU + centerness: `ATSSLossComputation` in GLIP's
maskrcnn_benchmark/modeling/rpn/loss.py; `atss.grounding_losses` here) on the referred box; AdamW with weight
decay 0.05, gradient clipping at 1.0, constant lr (the authors' GLIP/tools/finetune.py sets the scheduler to None,
so no warm-up or decay), bf16 autocast on GPU, gradient accumulation up to the effective batch. Output:
RUN/prompts/<method>[-<tag>]/.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .checkpoint import load_strict, load_training, read_state_dict, save_training, save_weights, write_json
from .config import Preset, PromptConfig
from .distributed import (all_reduce_mean, all_reduce_sum, barrier, cleanup, distributed_loader, init_distributed,
                          is_main, rank, set_epoch, world_size, wrap_ddp)
from . import train_dit
from .prompting import DiffPromptGenerator, LearnablePrompts, freeze
from .train_glip import inclusive_boxes
from .runtime import autocast, loader_kwargs, progress, seed_everything

METHODS = ("diffprompt", "vpt", "textprompt", "full", "zeroshot")


def method_dir(out: Path, cfg: PromptConfig) -> Path:
    return Path(out) / "prompts" / (cfg.method + (f"-{cfg.tag}" if cfg.tag else ""))


def run_config(preset: Preset, cfg: PromptConfig) -> dict:
    """What a finished run must match to be reused: the stage-3 settings, the input sizes and, for Diff-Prompt, the
    generator's configuration."""
    config = {"prompt": dataclasses.asdict(cfg), "image_size": preset.data.image_size,
              "mask_size": preset.data.mask_size, "preset": preset.name}
    if cfg.method == "diffprompt" and cfg.generated:
        config["dit"] = train_dit.run_config(preset)["dit"]   # the one stage 2 itself records
    return config


# ----------------------------------------------------------------------------------------------------------------
# Building the frozen parts and the prompt modules


def _stage_path(given: str, out: Path, stage: str, what: str) -> Path:
    from .shipped import resolve_weights
    path = resolve_weights(given) if given else Path(out) / stage     # "shipped:NAME": a part the package ships
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {what} found. Train it first (python -m minidiffprompt "
                                f"train-{stage} --out {out}) or pass --{stage}_weights PATH.")
    return path


def load_glip(preset: Preset, out: Path):
    """The base detector: --glip_weights (tiny: the shipped one; paper: the official checkpoint), else RUN/glip."""
    from .glip import load_glip_checkpoint
    path = _stage_path(preset.prompt.glip_weights, out, "glip", "GLIP checkpoint")
    return load_glip_checkpoint(path, preset.glip)


def load_glip_metrics(preset: Preset, out: Path) -> dict:
    """The base GLIP's recorded metrics.json ({} for a checkpoint file such as the official one)."""
    path = _stage_path(preset.prompt.glip_weights, out, "glip", "GLIP checkpoint") / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_generator_parts(preset: Preset, out: Path):
    """Frozen stage-1/2 models for Diff-Prompt: Mask-VAE, DiT, the sampling diffusion, the condition encoder."""
    from .conditions import build_condition_encoder
    from .diffusion import GaussianDiffusion, get_betas
    from .dit import dit_arch, load_dit
    from .vae import load_mask_vae
    cfg = preset.prompt
    vae = load_mask_vae(_stage_path(cfg.vae_weights, out, "vae", "Mask-VAE"))
    dit_path = _stage_path(cfg.dit_weights, out, "dit", "DiT")
    d = preset.dit
    dit = load_dit(dit_path, **dit_arch(d))
    # "train": sample with the schedule the DiT was trained on; "squaredcos_cap_v2": the authors' stage-3 sampler,
    # although their DiT-main/train.py trained the DiT on the default linear schedule (a train/sample mismatch)
    schedule = d.noise_schedule if cfg.sampling_schedule == "train" else cfg.sampling_schedule
    diffusion = GaussianDiffusion(get_betas(schedule, d.diffusion_steps))
    condition = build_condition_encoder(d)
    return vae, dit, diffusion, condition


def build_prompter(preset: Preset, out: Path, cfg: PromptConfig | None = None):
    """The trainable prompt module of `cfg.method` (None for `full` and `zeroshot`)."""
    cfg = cfg or preset.prompt
    g = preset.glip
    if cfg.method == "diffprompt":
        sampled = cfg.generated and not cfg.oracle_masks
        parts = load_generator_parts(preset, out) if sampled else (None, None, None, None)
        return DiffPromptGenerator(*parts, cfg, vision_dim=g.embed_dim, text_dim=g.text_hidden,
                                   mask_size=preset.data.mask_size, guidance=preset.dit.guidance)
    if cfg.method == "vpt":
        return LearnablePrompts(cfg.depth, cfg.length, vision_dim=g.embed_dim)
    if cfg.method == "textprompt":
        return LearnablePrompts(cfg.depth, cfg.length, text_dim=g.text_hidden)
    if cfg.method in ("full", "zeroshot"):
        return None
    raise ValueError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")


def load_trained(preset: Preset, out: Path, folder: Path):
    """(glip, prompter) of a finished stage-3 run folder, for evaluation."""
    saved = json.loads((folder / "config.json").read_text())
    cfg = PromptConfig(**saved["prompt"])
    glip = load_glip(preset, out)
    prompter = build_prompter(preset, out, cfg)
    weights = folder / "model.safetensors"
    if cfg.method == "full":
        load_strict(glip, read_state_dict(weights), source=str(weights))
    elif prompter is not None:
        state = read_state_dict(weights)
        prompter.load_state_dict(state, strict=False)   # frozen parts come from their own stage folders
        missing = set(prompter.trainable_state_dict()) - set(state)
        if missing:
            raise RuntimeError(f"{weights}: missing prompt keys {sorted(missing)[:8]}; was it written by a run "
                               f"with different --depth/--length/flags than {folder / 'config.json'}?")
    return freeze(glip), (prompter.eval() if prompter is not None else None)


def trainable_parameters(glip, prompter) -> list:
    return [p for p in (glip if prompter is None else prompter).parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# One training step


def grounding_targets(batch: dict) -> list[dict]:
    """GLIP targets: the referred box and its phrase spans, one box per expression, in GLIP's training convention
    (x2 = x + w − 1 in original pixels, clamped, each axis scaled by its own factor: `train_glip.inclusive_boxes`)."""
    size = batch["image"].shape[-1]
    return [{"boxes": inclusive_boxes(box[None], (size / float(wh[0]), size / float(wh[1])), size), "spans": [spans]}
            for box, spans, wh in zip(batch["box"], batch["spans"], batch["size"])]


def chunks(iterable, n: int):
    """Lists of n consecutive items (the last one shorter)."""
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def step_normalizers(glip, batches: list[dict], accum: int) -> torch.Tensor:
    """The loss denominators of one optimizer step, as GLIP counts its whole batch over all GPUs: the ATSS positives
    and the centerness-target sum of every micro batch on every process, divided by processes × accum (the forward
    passes of a full step). With each micro batch's loss divided by accum and DDP's average over processes, the
    step's gradient is then that of the whole batch's sums over the whole batch's counts, for any split into micro
    batches and processes; a short last step keeps the same per-item weight."""
    size = batches[0]["image"].shape[-1]
    local = glip.loss_normalizers([t for b in batches for t in grounding_targets(b)], size, size)
    return all_reduce_sum(local) / (world_size() * accum)


def prompt_loss(glip, prompter, batch: dict, device, normalizers=None) -> tuple[torch.Tensor, dict]:
    """Generate prompts (Diff-Prompt: fresh DDIM noise every call) and return GLIP's summed grounding loss
    (`normalizers`: the step's loss denominators, `step_normalizers`)."""
    images = batch["image"].to(device)
    captions = batch["caption"]
    # the batch holds masks only for the oracle diagnostic (PromptConfig.oracle_masks)
    visual, textual = prompter(images, captions, true_masks=batch.get("mask")) if prompter is not None \
        else (None, None)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in grounding_targets(batch)]
    losses = glip(images, captions, targets=targets, visual_prompts=visual, textual_prompts=textual,
                  normalizers=normalizers)
    return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}


# ----------------------------------------------------------------------------------------------------------------


def main(preset: Preset, data: Path, out: Path, resume: bool = True) -> dict:
    from .data import RefExpDataset, collate
    from .evaluate import evaluate_split
    cfg = preset.prompt
    if cfg.method not in METHODS:
        raise SystemExit(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    device = init_distributed(getattr(preset, "device", "auto"))   # one process per GPU under torchrun
    folder = method_dir(out, cfg)
    config = run_config(preset, cfg)
    if resume and (folder / "metrics.json").exists() and (folder / "config.json").exists():
        if json.loads((folder / "config.json").read_text()).get("config") == config:
            return json.loads((folder / "metrics.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    glip = freeze(load_glip(preset, out)).to(device)
    prompter = build_prompter(preset, out)
    if cfg.method == "full":
        for p in glip.parameters():
            p.requires_grad_(True)
        glip.train()
    if prompter is not None:
        prompter.to(device).train()
    params = trainable_parameters(glip, prompter) if cfg.method != "zeroshot" else []
    n_trainable = sum(p.numel() for p in params)
    history, step_losses, start_epoch, t0 = [], [], 0, time.time()

    if params:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        trained = wrap_ddp(prompter if prompter is not None else glip, device,
                           find_unused_parameters=prompter is None)   # `full`: GLIP's cls_logits gets no gradient
        state = load_training(folder / "checkpoint.pt") if resume else None
        if state is not None and state.get("config") == config:
            _load_trainable(glip, prompter, state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, step_losses = state["epoch"], state["history"], state["step_losses"]
            torch.set_rng_state(state["rng"])
        if world_size() > 1:
            torch.manual_seed(cfg.seed + 1000 * rank() + start_epoch)   # fresh DDIM noise differs per rank
        dataset = RefExpDataset(data, "train", preset.data.image_size,
                                mask_size=preset.data.mask_size if cfg.oracle_masks else None)
        micro = min(cfg.micro_batch, cfg.batch_size)
        accum = max(1, cfg.batch_size // (micro * world_size()))   # micro batches are per process
        loader = DataLoader(dataset, batch_size=micro, shuffle=True, collate_fn=collate, drop_last=False,
                            generator=torch.Generator().manual_seed(cfg.seed),
                            **loader_kwargs(preset.data.num_workers, device))
        if world_size() > 1:                      # each rank loads `micro` items of every global micro batch
            loader = distributed_loader(dataset, micro * world_size(), shuffle=True, seed=cfg.seed,
                                        collate_fn=collate, **loader_kwargs(preset.data.num_workers, device))
        for epoch in range(start_epoch, cfg.epochs):
            if world_size() > 1:
                set_epoch(loader, epoch)
            else:
                loader.generator.manual_seed(cfg.seed + epoch)  # the same order whether resumed or not
            running, count, epoch_steps = 0.0, 0, 0
            bar = progress(loader, desc=f"{folder.name} epoch {epoch + 1}/{cfg.epochs}", leave=False)
            optimizer.zero_grad(set_to_none=True)
            for group in chunks(bar, accum):          # the micro batches of one optimizer step
                normalizers = step_normalizers(glip, group, accum)
                accumulated = 0.0
                for batch in group:
                    with autocast(device, cfg.amp):
                        # the DDP wrapper (under torchrun) stands where the trainable module goes
                        loss, parts = prompt_loss(glip if prompter is not None else trained,
                                                  trained if prompter is not None else None, batch, device,
                                                  normalizers)
                    (loss / accum).backward()
                    value = float(loss.detach())
                    running, count, accumulated = running + value, count + 1, accumulated + value
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(all_reduce_mean(accumulated / len(group)).item())
                epoch_steps += 1
                bar.set_postfix(loss=f"{running / count:.3f}")
                if cfg.max_steps and epoch_steps >= cfg.max_steps:
                    break  # a step budget per epoch (the tiny preset's CPU budget)
            record = {"epoch": epoch + 1, "loss": all_reduce_mean(running / max(count, 1)).item()}
            if cfg.val_items:
                record["val_R@1"] = evaluate_split(glip, prompter, data, "val", preset, device,
                                                   max_items=cfg.val_items)["R@1"]
                if prompter is not None:
                    prompter.train()
                if cfg.method == "full":
                    glip.train()
            history.append(record)
            if is_main():                          # rank 0 logs and writes; the others wait at the barrier
                print(f"[{folder.name}] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f}"
                      + (f" val R@1 {record['val_R@1']:.1f}" if "val_R@1" in record else ""), flush=True)
                save_training(folder / "checkpoint.pt", weights=_trainable_state(glip, prompter),
                              optimizer=optimizer.state_dict(), epoch=epoch + 1, history=history, config=config,
                              step_losses=step_losses,
                              rng=torch.get_rng_state())
            barrier()
        if is_main():
            save_weights(_trainable_state(glip, prompter), folder / "model.safetensors")

    metrics = {"method": cfg.method, "trainable_parameters": n_trainable, "epochs": len(history),
               "history": history, "step_losses": step_losses,
               "final_loss": history[-1]["loss"] if history else None,
               "train_seconds": round(time.time() - t0, 1)}
    if is_main():
        write_json(folder / "config.json", {"config": config, "prompt": dataclasses.asdict(cfg)})
        write_json(folder / "metrics.json", metrics)
    barrier()
    cleanup()
    return metrics


def _trainable_state(glip, prompter) -> dict:
    return glip.state_dict() if prompter is None else prompter.trainable_state_dict()


def _load_trainable(glip, prompter, state: dict) -> None:
    if prompter is None:
        glip.load_state_dict(state)
    else:
        prompter.load_state_dict(state, strict=False)
