"""Presets: one dataclass per stage, the paper's values as defaults, a CPU-sized `tiny()` beside each.

    from minidiffprompt.config import get_preset
    preset = get_preset("tiny")          # or "paper"
    preset.vae.lr                        # every value of every stage in one place

The CLI overrides any field of the stage it runs: `python -m minidiffprompt train-vae --preset tiny --epochs 3`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DataConfig:
    """Where the processed RefCOCO-format split files live and how images/masks are sized (224: the authors'
    GLIP/configs/finetune/dif_prompt/refcoco/train_v3.yaml, MIN/MAX_SIZE 224 with FIX_RES)."""
    root: str = "data/refcoco/processed"  # output of `data_prep.py refcoco`
    image_size: int = 224                 # GLIP input, FIX_RES: square, aspect ratio not kept
    mask_size: int = 224                  # Mask-VAE input
    num_workers: int = 4

    @classmethod
    def tiny(cls) -> "DataConfig":
        return cls(root="data/synthref/processed", image_size=96, mask_size=64, num_workers=0)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: Mask-VAE (the authors' unique_vae/models/mask_vanilla_vae_v2.py and unique_vae/configs/mask_vae_v2.yaml)


@dataclass
class VAEConfig:
    """Mask-VAE architecture (diffusers AutoencoderKL layout) and the authors' training recipe."""
    block_out_channels: tuple = (4, 8, 16, 16)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 2
    lr: float = 5e-3
    lr_gamma: float = 0.95      # ExponentialLR, stepped once per epoch
    batch_size: int = 64
    epochs: int = 200
    kl_weight: float = 3.7732e-4
    seed: int = 1265
    cache_masks: bool = False   # rasterise every mask once and keep them in memory (small data sets)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        # 64² masks → 16×16 latents (three blocks, two downsamplings). The synthetic objects cover ~2 % of a mask
        # (RefCOCO's ~15 %), so the per-pixel MSE is small and the authors' KL weight would let the prior win:
        # posterior σ near 1, means squeezed together. 1e-5 keeps the latents informative.
        return cls(block_out_channels=(4, 8, 16), kl_weight=1e-5, lr_gamma=0.8, batch_size=16, epochs=5,
                   cache_masks=True)


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: DiT prompt generator + diffusion (the authors' DiT-main/models.py `DiT_My_2` and DiT-main/train.py)


@dataclass
class DiTConfig:
    """DiT-My/2, its condition encoder and the diffusion/training recipe."""
    input_size: int = 28           # latent side = mask_size // 8
    patch_size: int = 2
    hidden_size: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    condition: str = "clip"        # "clip" (ViT-B/32 via transformers), "tiny_clip" (shipped), "tiny" (hand-built) or
                                   # "glip" (a trained tiny GLIP's frozen Swin; conditions.BackboneConditionEncoder)
    clip_path: str = "openai/clip-vit-base-patch32"  # that encoder's weights: local folder or HF-cache name, never
                                                     # downloaded; "shipped:NAME" for the shipped tiny ones
    cond_dim: int = 512
    image_map: bool = False        # tiny option: the image as a map beside x_t instead of a global feature
    caption_tokens: int = 0        # tiny option: the caption as up to that many word tokens in the DiT's sequence
    diffusion_steps: int = 100
    noise_schedule: str = "linear"  # training schedule: DiT-main/train.py keeps create_diffusion's default
    prediction: str = "eps"        # what the DiT outputs: "eps" (the authors') or "v" (diffusion.py)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 100
    ema_decay: float = 0.9999
    cache_latents: bool = False    # encode masks (posterior mean, σ) and condition features once per run
    extra_scenes: int = 0          # tiny option: also train on the train split of a second synthetic set of that many
                                   # images (seed 1, made beside the data root on first use; synthetic data only)
    posterior_sample: bool = True  # x_0 ~ q(z | mask) as the authors; False: x_0 = its mean (noisy tiny VAEs)
    x0_weight_cap: float = 1.0     # ε-MSE weight clamp((1-ᾱ)/ᾱ, 1, cap): 1 = the authors' loss (diffusion.py)
    cond_dropout: float = 0.0      # share of training samples whose features are zeroed (the null condition)
    guidance: float = 1.0          # classifier-free guidance scale when sampling; ≠ 1 needs cond_dropout > 0
    ddim_steps: int = 25           # generation check after training (training schedule, η = 0)
    eval_items: int = 1000         # val pairs in that check (0 = all)
    seed: int = 0

    @classmethod
    def tiny(cls) -> "DiTConfig":
        # v-prediction: at the noisiest steps the DiT states the mask itself (diffusion.py), which doubled the IoU of
        # its samples over ε-prediction at this budget. With it the hand-built condition (the RGB image as a map, hashed
        # words) gives better masks, and a caption that counts more, than the shipped CLIP-like towers
        # (`--condition tiny_clip`, train_clip.py; notebooks/STUDIES.md). Patch 2 (64 tokens, each over
        # 12×12 pixels, about one small object) at width 64 costs what patch 4 at width 128 did and doubled the IoU;
        # the words as tokens in the sequence (caption_tokens) raised it again and made the caption count. 80 epochs
        # (7,520 steps): the IoU still climbed from 20 (0.31) over 40 (0.38) to 80 (0.45). What it could not learn from
        # the denoising loss alone is to tell a small star from a small square: its image encoder is now the frozen
        # tiny GLIP's Swin (`condition glip`, its C3 map; mask IoU 0.31 → 0.44 at 1,880 steps), as the paper's is a
        # pretrained CLIP, and it trains on 8,400 more synthetic scenes (`extra_scenes`, 48,218 pairs instead of 6,060)
        # at depth 6. The IoU check scores the first 300 val pairs, the expressions the tiny evaluation scores
        return cls(input_size=16, patch_size=2, hidden_size=64, depth=6, num_heads=4, condition="glip",
                   clip_path="shipped:tiny_glip", cond_dim=64, caption_tokens=16,
                   image_map=True, batch_size=64, epochs=20, lr=3e-3, ema_decay=0.99, cache_latents=True,
                   extra_scenes=8400, posterior_sample=False, prediction="v", eval_items=300)


# ----------------------------------------------------------------------------------------------------------------
# The tiny GLIP's small BERT: masked-language-model pre-training (train_bert.py)


@dataclass
class TextPretrainConfig:
    """MLM pre-training of the small BERT (tiny preset only; the paper's GLIP brings bert-base-uncased's weights)."""
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    mask_prob: float = 0.15
    seed: int = 0


@dataclass
class ClipPretrainConfig:
    """Contrastive training of the tiny CLIP-like condition encoder (train_clip.py; the paper uses CLIP ViT-B/32)."""
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# GLIP-T(A) (GLIP, Li et al. 2022; microsoft/GLIP configs/pretrain/glip_A_Swin_T_O365.yaml)


@dataclass
class GLIPConfig:
    """GLIP-T(A): Swin-T + FPN + DyHead + ATSS grounding head + BERT; values of GLIP's glip_A_Swin_T_O365.yaml
    over its maskrcnn_benchmark/config/defaults.py."""
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    drop_path_rate: float = 0.2
    fpn_channels: int = 256
    fpn_drop_block: float = 0.3    # FPN DropBlock prob in training mode (GLIP's MODEL.FPN.DROP_PROB; off when frozen)
    dyhead_blocks: int = 6
    gn_groups: int = 16
    anchor_strides: tuple = (8, 16, 32, 64, 128)
    anchor_scale: float = 8.0      # anchor side = scale * stride
    text_model: str = "bert-base-uncased"  # local folder or HF-cache name (tokenizer + config)
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_vocab: str = ""           # vocab.txt of the small BERT built when text_model is "" (tiny: the data root's)
    text_weights: str = ""         # pre-training starts the language backbone from a `train-bert` folder
    init_weights: str = ""         # pre-training continues a trained GLIP (a train-glip folder, shipped:tiny_glip)
    swin_ape: int = 0              # Swin's absolute position table, its side in patches (0 = off, as GLIP-T(A))
    swin_sincos: float = 0.0       # scale of a fixed 2-D sine-cosine position table at every Swin stage (0 = off)
    fpn_sincos: float = 0.0        # the same on every FPN level, cells counted in P3 cells (0 = off)
    head_sincos: float = 0.0       # the same on the region features the head scores (the DyHead output; 0 = off)
    max_query_len: int = 256
    num_cls_logits: int = 80       # unused head, kept so the O365 checkpoint loads strictly
    atss_topk: int = 9
    inference_th: float = 0.05
    pre_nms_top_n: int = 1000
    nms_th: float = 0.6
    nms_rule: str = "glip"         # "glip": +1-pixel IoU of GLIP's GPU ml_nms; "torchvision": its CPU branch
    detections_per_img: int = 100
    # tiny pre-training on the synthetic detection split (stand-in for O365)
    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 16
    epochs: int = 1
    warmup_steps: int = 20
    grad_clip: float = 1.0         # full-model L2 norm (SOLVER.CLIP_GRADIENTS of glip_A_Swin_T_O365.yaml)
    head_lr_mult: float = 1.0      # lr factor of the head's predictors (box deltas ×(10,10,5,5), logit scale)
    token_lr_mult: float = -1.0    # lr factor of the head's token side (projection, bias_lang); < 0: head_lr_mult
    text_lr_mult: float = 1.0      # lr factor of the language backbone; 0 freezes it
    shuffle_prompt: bool = True    # class names in a random order per sample (no name tied to a position)
    phrase_prompts: float = 0.0    # share of attribute-phrase prompts ("small red circle. star.") in pre-training
    attribute_phrases: float = 0.0  # share of those phrases naming attributes only ("green": every green object)
    position_phrases: float = 0.0  # share of those phrases naming the object's half of the image ("left star")
    flip_augment: bool = False     # random left-right / top-bottom flips in pre-training
    holdout_fraction: float = 0.1  # detection images kept out of pre-training for the detection R@1
    eval_max_items: int = 0        # zero-shot referring evaluation: expressions per split (0 = all)
    seed: int = 0

    @classmethod
    def tiny(cls) -> "GLIPConfig":
        # The stand-in for GLIP-T(A)'s Objects365 pre-training, run once and shipped (minidiffprompt/pretrained/
        # tiny_glip, with the exact command in its metrics.json). Its language backbone is the MLM-pretrained small
        # BERT (train_bert.py), kept frozen: fine-tuned, as GLIP fine-tunes bert-base, the detector learned faster but
        # its colour words merged (notebooks/STUDIES.md, "Colour"). Half of the prompts are phrases, half of those
        # naming attributes only ("green"), and images are flipped. Position: at 96 px the zero-padded maps carry
        # almost none, and pre-training erased what Swin's learned table (`swin_ape`) gave; a fixed sine-cosine code at every Swin stage
        # (`swin_sincos`, where the visual prompts join) and on the region features the head scores (`head_sincos`)
        # give every patch and region its place (position probe R² −0.15 → 0.80; notebooks/STUDIES.md). The shipped
        # GLIP: this recipe without the two codes, continued 30 epochs with `--phrase_prompts 0.75 --lr 5e-4`, then
        # twice 30 epochs more with the codes on (its metrics.json holds every command).
        return cls(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0,
                   fpn_channels=32, fpn_drop_block=0.0, dyhead_blocks=1, anchor_scale=2.0, text_model="",
                   text_hidden=64, text_layers=4, text_heads=2, max_query_len=32, lr=2e-3, head_lr_mult=10.0,
                   text_weights="shipped:tiny_bert", text_lr_mult=0.0, swin_ape=24, swin_sincos=1.0, head_sincos=0.5,
                   phrase_prompts=0.5, attribute_phrases=0.5, flip_augment=True, batch_size=16, epochs=240)


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: prompt tuning (the authors' GLIP/configs/finetune/dif_prompt/refcoco/train_v3.yaml and
# GLIP/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py)


METHODS = ("diffprompt", "vpt", "textprompt", "full", "zeroshot")


@dataclass
class PromptConfig:
    """Diff-Prompt tuning (and the baselines run in the same harness)."""
    method: str = "diffprompt"     # diffprompt | vpt | textprompt | full | zeroshot
    depth: int = 9
    length: int = 8
    visual: bool = True
    textual: bool = True
    generated: bool = True         # the L/2 mask-specific tokens
    oracle_masks: bool = False     # diagnostic: the ground-truth mask at every depth instead of DDIM samples
    global_tokens: bool = True     # the L/2 learnable global tokens
    prompt_layout: str = "shared"  # "shared": one set of visual tokens for every Swin window (the paper); "windows":
                                   # each window's generated tokens from the part of the mask under it (not the paper)
    ddim_steps: int = 25
    eta: float = 0.0
    sampling_schedule: str = "train"  # "train" (correct) or "squaredcos_cap_v2" (the authors' stage-3 sampler)
    clip_input: str = "train"      # "train": RGB in [-1,1] as the DiT saw; "glip": GLIP's tensor (the authors)
    lr: float = 1e-4
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    epochs: int = 5
    batch_size: int = 64           # effective batch
    micro_batch: int = 16          # per step; gradient accumulation makes up the rest
    amp: bool = True               # bf16 autocast on GPU
    seed: int = 0
    max_steps: int = 0             # optimiser steps per epoch at most (0 = the whole train split)
    val_items: int = 0             # per-epoch val R@1 on the first N val items (0 = no per-epoch check)
    val_every: int = 0             # also every N optimiser steps (the learning curve `val_curve`; 0 = off)
    tag: str = ""                  # run folder prompts/<method>[-<tag>], e.g. for ablations
    glip_weights: str = ""         # "" = RUN/glip; tiny: the shipped GLIP; paper: the official glip_a_tiny_o365.pth
    vae_weights: str = ""          # "" = RUN/vae; tiny: the shipped Mask-VAE; paper: the released Mask-VAE folder
    dit_weights: str = ""          # "" = RUN/dit; tiny: the shipped DiT; paper: the released DiT checkpoint

    def check(self, glip: "GLIPConfig") -> None:
        """Refuse settings the prompted GLIP cannot serve, before any work: a ValueError naming the fix."""
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.tag):
            raise ValueError(f"--tag {self.tag!r}: a plain name (letters, digits, '.', '_', '-'), as it names the "
                             "run folder prompts/<method>-<tag> inside --out")
        if self.method in ("full", "zeroshot"):
            return
        visual = self.method == "vpt" or (self.method == "diffprompt" and self.visual)
        textual = self.method == "textprompt" or (self.method == "diffprompt" and self.textual)
        limit = min([sum(glip.depths)] * visual + [glip.text_layers] * textual or [0])
        if not 1 <= self.depth <= limit:
            where = " and ".join([f"{sum(glip.depths)} Swin blocks"] * visual
                                 + [f"{glip.text_layers} BERT layers"] * textual)
            raise ValueError(f"--depth {self.depth}: the prompts go into one layer each, so depth must be 1..{limit} "
                             f"({where})")
        if self.prompt_layout not in ("shared", "windows"):
            raise ValueError(f"--prompt_layout {self.prompt_layout!r}: choose shared (the paper's) or windows")
        if self.method == "diffprompt" and (self.length < 2 or self.length % 2):
            raise ValueError(f"--length {self.length}: Diff-Prompt splits each layer's tokens into L/2 generated and "
                             "L/2 global ones, so length must be even and at least 2")
        if self.length < 1:
            raise ValueError(f"--length {self.length}: give at least one prompt token per layer")

    @classmethod
    def tiny(cls) -> "PromptConfig":
        # CPU budget: a fixed number of steps; 10 DDIM steps (stride 10) still keep 4 latents (layers 0-3). The frozen
        # parts are the shipped ones, as the paper's stage 3 starts from released GLIP, Mask-VAE and DiT weights
        return cls(depth=4, length=8, ddim_steps=10, epochs=1, max_steps=60, batch_size=16, micro_batch=16, lr=3e-3,
                   glip_weights="shipped:tiny_glip", vae_weights="shipped:tiny_vae", dit_weights="shipped:tiny_dit")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (GLIP's maskrcnn_benchmark/data/datasets/refexp.py, `RefExpEvaluator`)


@dataclass
class EvalConfig:
    """R@1 / R@5 / UB on the RefCOCO test splits."""
    splits: tuple = ("val", "testA", "testB")
    iou_threshold: float = 0.5
    use_giou: bool = False         # the authors' evaluator counted GIoU >= 0.5
    batch_size: int = 16
    seed: int = 0                  # DDIM noise is seeded per sample from this: evaluation is reproducible
    max_items: int = 0             # 0 = whole split

    @classmethod
    def tiny(cls) -> "EvalConfig":
        return cls(batch_size=32, max_items=300)   # the first 300 expressions of each split


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Preset:
    """All stages' settings under one name."""
    name: str
    device: str = "auto"           # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    glip: GLIPConfig = field(default_factory=GLIPConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bert: TextPretrainConfig = field(default_factory=TextPretrainConfig)
    clip: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)


def get_preset(name: str) -> Preset:
    if name == "paper":
        return Preset("paper")
    if name == "tiny":
        return Preset("tiny", "auto", DataConfig.tiny(), VAEConfig.tiny(), DiTConfig.tiny(), GLIPConfig.tiny(),
                      PromptConfig.tiny(), EvalConfig.tiny())
    raise ValueError(f"unknown preset {name!r}: choose 'tiny' or 'paper'")


def _coerce(value: str, current):
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(current, tuple):
        parts = [p for p in value.replace(",", " ").split() if p]
        kind = type(current[0]) if current else str
        return tuple(kind(p) for p in parts)
    if current is None:
        return value
    return type(current)(value)


# the range every numeric option must lie in, checked when the command line sets it (defaults are in range):
# at least 1, at least 0, or a share of a whole; every float must also be finite
AT_LEAST_ONE = {"image_size", "mask_size", "layers_per_block", "latent_channels", "norm_num_groups", "batch_size",
                "epochs", "input_size", "patch_size", "hidden_size", "num_heads", "cond_dim",
                "diffusion_steps", "ddim_steps", "eval_items", "steps", "embed_dim", "window_size", "fpn_channels",
                "dyhead_blocks", "gn_groups", "text_hidden", "text_layers", "text_heads", "max_query_len",
                "num_cls_logits", "atss_topk", "pre_nms_top_n", "detections_per_img", "length", "micro_batch"}
AT_LEAST_ZERO = {"num_workers", "caption_tokens", "extra_scenes", "swin_ape", "warmup_steps", "eval_max_items",
                 "max_steps", "val_items", "val_every", "max_items", "lr_gamma", "kl_weight", "weight_decay",
                 "grad_clip", "head_lr_mult", "token_lr_mult", "text_lr_mult", "swin_sincos", "fpn_sincos",
                 "head_sincos", "anchor_scale", "mlp_ratio", "guidance", "eta"}
SHARES = {"ema_decay", "cond_dropout", "mask_prob", "drop_path_rate", "fpn_drop_block", "phrase_prompts",
          "attribute_phrases", "position_phrases", "holdout_fraction", "inference_th", "nms_th", "iou_threshold"}


def check_value(name: str, value) -> None:
    """A ValueError naming the allowed range when a command-line value cannot be meant (0 epochs, a NaN loss
    weight, an IoU threshold of 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if name in ("lr", "iou_threshold") and value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    if name in AT_LEAST_ONE and value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    if name in AT_LEAST_ZERO and value < 0:
        raise ValueError(f"must be at least 0, got {value}")
    if name in SHARES and not 0 <= value <= 1:
        raise ValueError(f"must lie in [0, 1], got {value}")


def apply_overrides(configs: list, overrides: dict[str, str]) -> None:
    """Set `--key value` pairs on the first of `configs` that has the field; unknown keys and values out of their
    option's range are an error."""
    for key, value in overrides.items():
        name = key.replace("-", "_")
        target = next((c for c in configs if name in {f.name for f in dataclasses.fields(c)}), None)
        if target is None:
            known = sorted({f.name for c in configs for f in dataclasses.fields(c)})
            raise SystemExit(f"unknown option --{key}; this command takes: " + ", ".join("--" + k for k in known))
        try:
            value = _coerce(value, getattr(target, name))
            check_value(name, value)
            setattr(target, name, value)
        except ValueError as e:
            raise SystemExit(f"--{key}: {e}") from None


def to_dict(preset: Preset) -> dict:
    return dataclasses.asdict(preset)
