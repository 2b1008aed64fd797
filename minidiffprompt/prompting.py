"""Stage 3 prompt modules: Diff-Prompt's mask-driven generator and the learnable-prompt baselines.

Every prompt module maps a batch (images in [0,1], captions) to `(visual_prompts, textual_prompts)`: two lists
indexed by layer (Swin global block / BERT layer) of (B, L, dim) tensors, or None for a side without prompts.
GLIP consumes them: visual prompt d joins every attention window of Swin block d (`swin.SwinTransformer`),
textual prompt d is prepended to the input of BERT layer d and dropped after it (`bert.PromptedBert`).

Diff-Prompt (ICLR 2025), as `extract_visual_textual_dit_features` in the authors' Kelvin-ywc/diff-prompt
`GLIP/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py` runs it on every forward:
    1. condition: image and caption embeddings from the frozen condition encoder (CLIP ViT-B/32 in the paper)
    2. DDIM from noise with the frozen DiT, keeping one latent per prompt layer (layer 0 = the cleanest)
    3. decode the kept latents with the frozen Mask-VAE in one batched call -> D masks per sample
    4. Adapter^v / Adapter^l (adapters.MaskAdapter) -> L/2 generated + L/2 global tokens per layer
Only step 4 has trainable parameters (21,907,072 at depth 9, length 8).

Baselines with the same interface: VPT-deep (learnable visual prompts per layer, Jia et al. 2022) and a deep
text-prompt baseline (learnable textual prompts per layer, CoOp-style context vectors at every layer).
"""
from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from .adapters import GlobalPrompt, MaskAdapter
from .config import PromptConfig
from .data.datasets import glip_normalize
from .diffusion import authors_keep_policy
from .dit import guided
from .glip.swin import window_crops


def seeded_noise(shape: tuple, seeds: list[int], device) -> torch.Tensor:
    """One N(0, I) draw per sample from its own generator: a sample's noise does not depend on its batch."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)  # (B, *shape)


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad False everywhere and eval mode: in stage 3 everything but the adapters is frozen (the
    authors' `GeneralizedVLRCNN.train()` leaves requires_grad on only for `dit2vision` / `dit2language`)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class DiffPromptGenerator(nn.Module):
    """Frozen condition encoder + DiT + DDIM + Mask-VAE, then trainable adapters: image, caption -> prompts."""

    def __init__(self, vae: nn.Module | None, dit: nn.Module | None, diffusion, condition_encoder,
                 cfg: PromptConfig, vision_dim: int = 96, text_dim: int = 768, mask_size: int = 224,
                 guidance: float = 1.0, windows: list[tuple[int, int, int, int]] | None = None):
        super().__init__()
        if not (cfg.visual or cfg.textual):
            raise ValueError("DiffPromptGenerator: both visual and textual prompts are switched off; "
                             "set --visual true or --textual true (or use --method zeroshot)")
        if not 1 <= cfg.depth <= 12:
            raise ValueError(f"prompt depth must be in 1..12 (one kept DDIM output per layer), got {cfg.depth}")
        self.cfg = cfg
        self.depth = cfg.depth
        kw = dict(generated=cfg.generated, global_=cfg.global_tokens, in_size=mask_size)
        self.dit2vision = MaskAdapter(cfg.length, vision_dim, cfg.depth, **kw) if cfg.visual else None
        self.dit2language = MaskAdapter(cfg.length, text_dim, cfg.depth, **kw) if cfg.textual else None
        # prompt_layout "windows" (not the paper's): Swin block d's windows, (H, W, window size, shift) of its token
        # grid (swin.block_grids), each of which gets the tokens of the part of the mask under it
        self.windows = None
        if cfg.prompt_layout == "windows" and cfg.visual and cfg.generated:
            if windows is None:
                raise ValueError("prompt_layout 'windows' needs the Swin's window grids (windows=...)")
            self.windows = windows
        # without specific tokens nothing is sampled at all; with oracle masks the true mask replaces the samples
        self.needs_masks = cfg.generated and not cfg.oracle_masks
        if self.needs_masks:
            authors_keep_policy(cfg.ddim_steps, cfg.depth)  # fails early when depth needs more DDIM steps
            self.vae = freeze(vae)
            self.dit = freeze(dit)
            self.condition_encoder = freeze(condition_encoder)
            self.diffusion = diffusion
            self.guidance = guidance        # the DiT's classifier-free guidance scale (DiTConfig.guidance)

    # --------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.needs_masks:  # the frozen parts stay in eval mode whatever the caller asks
            self.vae.eval(), self.dit.eval(), self.condition_encoder.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """Only the adapters and global prompts: the keys of tests/fixtures/adapters_depth9_len8.tsv."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("dit2vision.", "dit2language."))}

    def latent_shape(self) -> tuple:
        return (self.dit.in_channels, self.dit.input_size, self.dit.input_size)

    @torch.no_grad()
    def sample_masks(self, images01: torch.Tensor, captions: list[str], seeds: list[int] | None = None):
        """Steps 1-3: DDIM latents kept per layer, decoded together -> masks (D, B, 1, M, M)."""
        b, device = images01.shape[0], images01.device
        # DiT training fed CLIP RGB in [-1, 1] (the authors' DiT-main/utils/data/transforms/transforms.py); their
        # stage 3 feeds CLIP GLIP's BGR-255 mean/std-normalised tensor (neither is CLIP's own normalisation)
        if self.cfg.clip_input == "glip":  # the authors' stage-3 input; encode() maps x -> 2x - 1,
            cond_images = (glip_normalize(images01) + 1) / 2    # so it sees exactly that tensor
        elif self.cfg.clip_input == "train":  # RGB in [-1, 1], what the DiT was trained with
            cond_images = images01
        else:
            raise ValueError(f"clip_input must be 'train' or 'glip', got {self.cfg.clip_input!r}")
        img_feat, txt_feat = self.condition_encoder.encode(cond_images, captions)  # (B, D_c) each
        shape = self.latent_shape()
        if seeds is None:  # training: fresh noise every step, as the authors (who do so at test time too)
            noise = torch.randn((b, *shape), device=device)
        else:              # evaluation: each sample's noise from its own seed -> reproducible results
            noise = seeded_noise(shape, seeds, device)

        model_fn = guided(self.dit, img_feat, txt_feat, self.guidance)
        _, kept = self.diffusion.ddim_sample(model_fn, noise.shape, noise, num_steps=self.cfg.ddim_steps,
                                             eta=self.cfg.eta, keep=self.depth)
        latents = torch.stack(kept)                                  # (D, B, C, h, w), layer 0 = cleanest
        d = latents.shape[0]
        masks = self.vae.decode(latents.flatten(0, 1).float())       # (D*B, 1, M, M), one batched decode
        return masks.unflatten(0, (d, b))                            # (D, B, 1, M, M)

    def forward(self, images01: torch.Tensor, captions: list[str], seeds: list[int] | None = None,
                true_masks: torch.Tensor | None = None):
        """→ (visual, textual) prompts. With `cfg.oracle_masks` (a diagnostic) `true_masks` (B, 1, M, M), the
        referred object's ground-truth mask, stands at every depth: what the mask path can carry at best."""
        b = images01.shape[0]
        masks = self.sample_masks(images01, captions, seeds) if self.needs_masks else None
        if self.cfg.oracle_masks and self.cfg.generated:
            if true_masks is None:
                raise ValueError("oracle_masks: pass the ground-truth masks (true_masks=(B, 1, M, M))")
            masks = true_masks.to(images01.device, images01.dtype).expand(self.depth, *true_masks.shape)
        if self.windows is not None:
            visual = [self.window_prompts(masks[d], d) for d in range(self.depth)]
        else:
            visual = self.dit2vision.forward_all(masks, b) if self.dit2vision is not None else None
        textual = self.dit2language.forward_all(masks, b) if self.dit2language is not None else None
        return visual, textual

    def window_prompts(self, mask: torch.Tensor, d: int) -> torch.Tensor:
        """Layer d's visual prompts, one set per window of Swin block d (B, nW, L, dim): each window's generated
        tokens from the part of `mask` (B, 1, M, M) under it, then the layer's global tokens."""
        H, W, ws, shift = self.windows[d]
        adapter = self.dit2vision
        crops = window_crops(mask, H, W, ws, shift, adapter.in_size)            # (B, nW, 1, M, M)
        b, n = crops.shape[:2]
        tokens = rearrange(adapter.specific(crops.flatten(0, 1)), "(b w) l c -> b w l c", b=b)
        if adapter.global_:
            tokens = torch.cat([tokens, repeat(adapter.global_prompt[d](b), "b l c -> b w l c", w=n)], dim=2)
        return tokens


class LearnablePrompts(nn.Module):
    """The baselines: `length` learnable tokens per layer, the same for every input (VPT-deep / deep text prompts)."""

    def __init__(self, depth: int, length: int, vision_dim: int | None = None, text_dim: int | None = None):
        super().__init__()
        if vision_dim is None and text_dim is None:
            raise ValueError("LearnablePrompts: give vision_dim (VPT), text_dim (text prompts) or both")
        self.depth = depth
        # same initialisation as Diff-Prompt's global tokens, so the comparison isolates the generated tokens
        self.visual = nn.ModuleList(GlobalPrompt(length, vision_dim) for _ in range(depth)) if vision_dim else None
        self.textual = nn.ModuleList(GlobalPrompt(length, text_dim) for _ in range(depth)) if text_dim else None

    def trainable_state_dict(self) -> dict:
        return self.state_dict()

    def forward(self, images01: torch.Tensor, captions: list[str] | None = None, seeds=None, true_masks=None):
        b = images01.shape[0]
        visual = [p(b) for p in self.visual] if self.visual is not None else None
        textual = [p(b) for p in self.textual] if self.textual is not None else None
        return visual, textual


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
