"""A run folder's parts, assembled for stage 3 and its evaluation: the frozen GLIP (RUN/glip, `--glip_weights` or a
shipped one), the frozen stage-1/2 generator parts, the prompt module of each method, and a finished stage-3 run
loaded back. `train_prompts` (training) and `evaluate` both build on these.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .conditions import build_condition_encoder
from .config import METHODS, Preset, PromptConfig
from .diffusion import GaussianDiffusion, get_betas
from .dit import dit_arch, load_dit
from .glip.model import load_glip_checkpoint
from .glip.swin import block_grids
from .prompting import DiffPromptGenerator, LearnablePrompts, freeze
from .utils.checkpoint import CheckpointMismatch, check_state, fingerprint, load_strict, read_state_dict
from .utils.files import read_json
from .utils.shipped import resolve_weights
from .vae import load_mask_vae


def method_dir(out: Path, cfg: PromptConfig) -> Path:
    return Path(out) / "prompts" / (cfg.method + (f"-{cfg.tag}" if cfg.tag else ""))


def run_config(preset: Preset, cfg: PromptConfig, data=None, out=None) -> dict:
    """What a finished run must match to be reused: the stage-3 settings, the input sizes, for Diff-Prompt the
    generator's configuration, and (given `data` and `out`) the data and the weights of the frozen parts."""
    config = {"prompt": dataclasses.asdict(cfg), "image_size": preset.data.image_size,
              "mask_size": preset.data.mask_size, "preset": preset.name}
    generated = cfg.method == "diffprompt" and cfg.generated and not cfg.oracle_masks
    if cfg.method == "diffprompt" and cfg.generated:
        config["dit"] = dataclasses.asdict(preset.dit)          # as stage 2 records it (train_dit.run_config)
    if data is not None:
        config["data"] = fingerprint(data)
        config["upstream"] = {
            "glip": fingerprint(stage_path(cfg, out, "glip")),
            **({"vae": fingerprint(stage_path(cfg, out, "vae")),
                "dit": fingerprint(stage_path(cfg, out, "dit"))} if generated else {})}
    return json.loads(json.dumps(config))


PARTS = {"glip": "GLIP checkpoint", "vae": "Mask-VAE", "dit": "DiT"}


def stage_path(cfg: PromptConfig, out: Path, stage: str) -> Path:
    """Where a frozen part ("glip", "vae" or "dit") comes from: `--<stage>_weights` (tiny: the shipped ones,
    "shipped:NAME"; paper: the official files), or with "" the run folder's own RUN/<stage>."""
    given = getattr(cfg, f"{stage}_weights")
    path = resolve_weights(given) if given else Path(out) / stage
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {PARTS[stage]} found. Train it first (python -m minidiffprompt "
                                f"train-{stage} --out {out}) or pass --{stage}_weights PATH.")
    return path


def stage_metrics(cfg: PromptConfig, out: Path, stage: str) -> dict:
    """A frozen part's recorded metrics.json ({} for a checkpoint file such as the official ones)."""
    path = stage_path(cfg, out, stage) / "metrics.json"
    return read_json(path) if path.exists() else {}


def load_glip(preset: Preset, out: Path):
    """The base detector: --glip_weights (tiny: the shipped one; paper: the official checkpoint), else RUN/glip."""
    return load_glip_checkpoint(stage_path(preset.prompt, out, "glip"), preset.glip)


def load_generator_parts(preset: Preset, out: Path):
    """Frozen stage-1/2 models for Diff-Prompt: Mask-VAE, DiT, the sampling diffusion, the condition encoder."""
    cfg = preset.prompt
    vae_path, dit_path = stage_path(cfg, out, "vae"), stage_path(cfg, out, "dit")
    vae = load_mask_vae(vae_path)
    d = preset.dit
    dit = load_dit(dit_path, **dit_arch(d))
    check_latents(vae, dit, preset.data.mask_size, vae_path)
    recorded = dit_path / "config.json"      # a `train-dit` folder records its recipe; the authors' files do not
    trained = (read_json(recorded).get("train", {}).get("dit", {}).get("prediction", "eps")
               if recorded.exists() else None)
    if trained and trained != d.prediction:
        raise SystemExit(f"{dit_path}: this DiT was trained with {trained}-prediction but the preset samples with "
                         f"{d.prediction}-prediction; pass --prediction {trained}")
    # "train": sample with the schedule the DiT was trained on; "squaredcos_cap_v2": the authors' stage-3 sampler,
    # although their DiT-main/train.py trained the DiT on the default linear schedule (a train/sample mismatch)
    schedule = d.noise_schedule if cfg.sampling_schedule == "train" else cfg.sampling_schedule
    diffusion = GaussianDiffusion(get_betas(schedule, d.diffusion_steps), d.prediction)
    condition = build_condition_encoder(d)
    return vae, dit, diffusion, condition


def check_latents(vae, dit, mask_size: int, source) -> None:
    """The Mask-VAE must turn mask_size² masks into latents of the DiT's shape (a paper-size Mask-VAE given to the
    tiny preset does not): a ValueError naming both shapes."""
    latents = (vae.config["latent_channels"], vae.latent_side(mask_size))
    if latents != (dit.in_channels, dit.input_size):
        raise ValueError(f"{source}: this Mask-VAE turns {mask_size}² masks into {latents[0]}×{latents[1]}² "
                         f"latents, but the DiT works on {dit.in_channels}×{dit.input_size}²; give the Mask-VAE of "
                         "this preset (--vae_weights), or the --mask_size / --input_size the two were made for "
                         f"(--input_size {latents[1]} fits this Mask-VAE)")


def build_prompter(preset: Preset, out: Path, cfg: PromptConfig | None = None):
    """The trainable prompt module of `cfg.method` (None for `full` and `zeroshot`)."""
    cfg = cfg or preset.prompt
    g = preset.glip
    if cfg.method == "diffprompt":
        sampled = cfg.generated and not cfg.oracle_masks
        parts = load_generator_parts(preset, out) if sampled else (None, None, None, None)
        grids = block_grids(preset.data.image_size, g.patch_size, g.depths, g.window_size)
        return DiffPromptGenerator(*parts, cfg, vision_dim=g.embed_dim, text_dim=g.text_hidden,
                                   mask_size=preset.data.mask_size, guidance=preset.dit.guidance,
                                   windows=[(h, w, g.window_size, shift) for h, w, shift in grids])
    if cfg.method == "vpt":
        return LearnablePrompts(cfg.depth, cfg.length, vision_dim=g.embed_dim)
    if cfg.method == "textprompt":
        return LearnablePrompts(cfg.depth, cfg.length, text_dim=g.text_hidden)
    if cfg.method in ("full", "zeroshot"):
        return None
    raise ValueError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")


def check_base(preset: Preset, out: Path, folder: Path, saved: dict) -> None:
    """A finished stage-3 run is evaluated on the GLIP it was trained on: its config.json records that GLIP's
    fingerprint, and a run tuned on one base scores near zero on another without a word. Otherwise an error."""
    trained_on = saved.get("config", {}).get("upstream", {}).get("glip")
    if trained_on is None or saved["prompt"].get("method") == "full":     # full fine-tuning saved the whole GLIP
        return
    if json.loads(json.dumps(fingerprint(stage_path(preset.prompt, out, "glip")))) != trained_on:
        then = saved["prompt"].get("glip_weights") or "the run folder's glip/"
        now = preset.prompt.glip_weights or "the run folder's glip/"
        raise CheckpointMismatch(f"{folder} was trained on another GLIP (--glip_weights {then!r} then, {now!r} now); "
                                 "evaluate it with the GLIP it was trained on, or train it again")


def load_trained(preset: Preset, out: Path, folder: Path):
    """(glip, prompter) of a finished stage-3 run folder, for evaluation, on the GLIP it was trained on."""
    saved = read_json(folder / "config.json")
    check_base(preset, out, folder, saved)
    cfg = PromptConfig(**saved["prompt"])
    glip = load_glip(preset, out)
    prompter = build_prompter(preset, out, cfg)
    weights = folder / "model.safetensors"
    if cfg.method != "zeroshot":
        load_trainable_state(glip, prompter, read_state_dict(weights), source=str(weights))
    return freeze(glip), (prompter.eval() if prompter is not None else None)


def trainable_parameters(glip, prompter) -> list:
    return [p for p in (glip if prompter is None else prompter).parameters() if p.requires_grad]


def trainable_state(glip, prompter) -> dict:
    return glip.state_dict() if prompter is None else prompter.trainable_state_dict()


def load_trainable_state(glip, prompter, state: dict, source: str = "checkpoint") -> None:
    """Strictly: every trainable key, with its shape and kind of dtype, and nothing else."""
    if prompter is None:
        load_strict(glip, state, source=source)
    else:
        check_state(prompter.trainable_state_dict(), state, source, f"the {type(prompter).__name__} being trained")
        prompter.load_state_dict(state, strict=False)   # the frozen parts come from their own stage folders
