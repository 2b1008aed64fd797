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
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import evaluate  # evaluate.evaluate_split looked up at call time: the tests wrap it
from .utils.checkpoint import load_training, match_run, save_training, save_weights, stored_run
from .utils.files import write_json
from .config import Preset
from .data.datasets import RefExpDataset, collate
from .utils.distributed import (all_reduce_mean, all_reduce_sum, barrier, cleanup, distributed_loader,
                                init_distributed, is_main, rank, set_epoch, world_size, wrap_ddp)
from .pipeline import build_prompter, load_glip, method_dir, run_config, trainable_parameters
from .pipeline import load_trainable_state, trainable_state
from .prompting import freeze
from .glip.atss import inclusive_boxes
from .utils.runtime import autocast, check_finite, loader_kwargs, progress, seed_everything

# ----------------------------------------------------------------------------------------------------------------
# One training step


def grounding_targets(batch: dict) -> list[dict]:
    """GLIP targets: the referred box and its phrase spans, one box per expression, in GLIP's training convention
    (x2 = x + w − 1 in original pixels, clamped, each axis scaled by its own factor: `glip.atss.inclusive_boxes`)."""
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
    cfg = preset.prompt
    cfg.check(preset.glip)
    device = init_distributed(getattr(preset, "device", "auto"))   # one process per GPU under torchrun
    folder = method_dir(out, cfg)
    config = run_config(preset, cfg, data, out)
    if resume and (run := stored_run(folder, ("config.json", "metrics.json"))) is not None:
        match_run(run[0].get("config", {}), config, folder)
        return run[1]
    if cfg.val_items:      # the val split the learning curve reads must be there before any training
        evaluate.split_dataset(data, "val", preset, max_items=1)
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
    history, step_losses, val_curve, start_epoch, t0 = [], [], [], 0, time.time()

    def validate() -> float:
        """R@1 on the first `val_items` val expressions, then back to training mode."""
        r1 = evaluate.evaluate_split(glip, prompter, data, "val", preset, device, max_items=cfg.val_items)["R@1"]
        if prompter is not None:
            prompter.train()
        if cfg.method == "full":
            glip.train()
        return r1

    if params:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        trained = wrap_ddp(prompter if prompter is not None else glip, device,
                           find_unused_parameters=prompter is None)   # `full`: GLIP's cls_logits gets no gradient
        state = load_training(folder / "checkpoint.pt") if resume else None
        if state is not None:    # a checkpoint of other settings is a RunMismatch, never silently restarted
            match_run(state["config"], config, folder / "checkpoint.pt")
            load_trainable_state(glip, prompter, state["weights"], source=str(folder / "checkpoint.pt"))
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, history, step_losses = state["epoch"], state["history"], state["step_losses"]
            val_curve = state.get("val_curve", [])
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
            bar = progress(loader, desc=f"{folder.name} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                           total=min(len(loader), cfg.max_steps * accum) if cfg.max_steps else None)
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
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                # a diverged run stops before NaN weights reach the next forward pass
                check_finite(norm, "train-prompts", len(step_losses) + 1, cfg.lr, "the gradient norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(all_reduce_mean(accumulated / len(group)).item())
                epoch_steps += 1
                if cfg.val_every and cfg.val_items and len(step_losses) % cfg.val_every == 0:
                    val_curve.append({"step": len(step_losses), "val_R@1": validate()})
                bar.set_postfix(loss=f"{running / count:.3f}")
                if cfg.max_steps and epoch_steps >= cfg.max_steps:
                    break  # a step budget per epoch (the tiny preset's CPU budget)
            record = {"epoch": epoch + 1, "loss": all_reduce_mean(running / max(count, 1)).item()}
            if cfg.val_items:      # the curve's last point, when it was taken at this very step
                last = val_curve[-1] if val_curve else {}
                record["val_R@1"] = last["val_R@1"] if last.get("step") == len(step_losses) else validate()
            history.append(record)
            if is_main():                          # rank 0 logs and writes; the others wait at the barrier
                print(f"[{folder.name}] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f}"
                      + (f" val R@1 {record['val_R@1']:.1f}" if "val_R@1" in record else ""), flush=True)
                save_training(folder / "checkpoint.pt", weights=trainable_state(glip, prompter),
                              optimizer=optimizer.state_dict(), epoch=epoch + 1, history=history, config=config,
                              step_losses=step_losses, val_curve=val_curve, rng=torch.get_rng_state())
            barrier()
        if is_main():
            save_weights(trainable_state(glip, prompter), folder / "model.safetensors")

    metrics = {"method": cfg.method, "trainable_parameters": n_trainable, "epochs": len(history),
               "history": history, "step_losses": step_losses, "val_curve": val_curve,
               "final_loss": history[-1]["loss"] if history else None,
               "train_seconds": round(time.time() - t0, 1)}
    if is_main():
        write_json(folder / "config.json", {"config": config, "prompt": dataclasses.asdict(cfg)})
        write_json(folder / "metrics.json", metrics)
    barrier()
    cleanup()
    return metrics
