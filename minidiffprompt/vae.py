"""Stage 1: the Mask-VAE, a small AutoencoderKL that turns 1×M×M object masks into 4×(M/8)×(M/8) latents.

Written from scratch in the module layout of diffusers' `AutoencoderKL`, so that the authors' released weights
(a diffusers folder, or their Lightning checkpoint with keys under `model.vae.`) load strictly with the key
names listed in `tests/fixtures/mask_vae.tsv`. The computation is that of the authors' `MaskVanillaVAE_V2`
(Kelvin-ywc/diff-prompt, `unique_vae/models/mask_vanilla_vae_v2.py`), a stock diffusers `AutoencoderKL`:

    mask (B,1,224,224) -> Encoder -> quant_conv -> (mean, logvar) (B,4,28,28) -> z = mean + σ·ε
    z -> post_quant_conv -> Decoder -> (B,1,224,224), unbounded (no output activation)

Later stages use raw posterior samples: no 0.18215 scaling anywhere. The authors' DiT training
(`DiT-main/train.py`) encodes with `latent_dist.sample()` and no scaling factor (the `.mul_(0.18215)` is commented
out), and their stage 3 (`GLIP/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`) decodes without one;
0.18215 is only diffusers' default `scaling_factor`, never measured for this VAE.

    vae = MaskVAE()                            # the authors' configuration, 85,529 parameters
    vae = load_mask_vae("path/to/mask_vae")    # diffusers folder, .safetensors/.bin, or Lightning .ckpt
    z = vae.encode(masks).sample()             # (B, 4, 28, 28)
    recon = vae.decode(z)                      # (B, 1, 224, 224)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .utils.checkpoint import CheckpointMismatch, load_strict, read_state_dict
from .utils.files import read_json

# ----------------------------------------------------------------------------------------------------------------
# Building blocks (diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `Attention` as configured here)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN → SiLU → conv3×3) twice, 1×1 `conv_shortcut` when channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))   # dropout p=0 in the authors' model: omitted
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a stride-2 3×3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))              # (left, right, top, bottom): asymmetric, as diffusers does
        return self.conv(x)                     # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Attention(nn.Module):
    """Single-head self-attention over all positions, with GroupNorm in front and the residual added back."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0 kept for the key `to_out.0`

    def forward(self, x):
        B, C, H, W = x.shape
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")     # (B, HW, C) tokens
        q, k, v = (rearrange(proj(h), "b n c -> b 1 n c") for proj in (self.to_q, self.to_k, self.to_v))
        # softmax(q kᵀ / √C) v with one head of width C (head dim 16 in the authors' model: 16 mid-block channels)
        h = F.scaled_dot_product_attention(q, k, v)                    # (B, 1, HW, C)
        h = self.to_out[0](rearrange(h, "b 1 n c -> b n c"))
        # attention output first: the sum then keeps its (channels-last) strides exactly as diffusers' does, so
        # the convolutions after it pick the same kernels and match diffusers bit for bit
        return rearrange(h, "b (h w) c -> b c h w", h=H, w=W) + x


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """`DownEncoderBlock2D`: a few resnets, then (except for the last block) a Downsample."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """`UpDecoderBlock2D`: a few resnets, then (except for the last block) an Upsample."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Encoder, decoder, posterior


class Encoder(nn.Module):
    """Mask → 2·latent_channels maps (mean and log-variance), downsampled by 2^(len(blocks)-1)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(chans[max(i - 1, 0)], c, layers_per_block, groups, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = group_norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                     # (B, c0, M, M)
        for block in self.down_blocks:
            x = block(x)                        # (B, c_i, M/2^i, M/2^i), the last block keeps the size
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2·latent, M/f, M/f)


class Decoder(nn.Module):
    """Latent → mask logits-free map: mid block, then up blocks with the encoder's channels reversed."""

    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        chans = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, chans[0], 3, padding=1)
        # the decoder has one resnet more per block than the encoder (diffusers' `layers_per_block + 1`)
        self.up_blocks = nn.ModuleList([
            UpBlock(chans[max(i - 1, 0)], c, layers_per_block + 1, groups, upsample=i < len(chans) - 1)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[0], groups)
        self.conv_norm_out = group_norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))     # (B, c_last, M/f, M/f)
        for block in self.up_blocks:
            x = block(x)                        # doubles the size except in the last block
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out, M, M)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), logvar clamped to [-30, 20] as diffusers does."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)   # (B, latent, h, w) each: first half mean, second logvar
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + σ·ε (reparameterised: gradients flow to mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent position, summed over channels only: (B, h, w).

        The authors' loss (`MaskVanillaVAE_V2.loss_function`, `unique_vae/models/mask_vanilla_vae_v2.py`) sums
        over channels only (`dim=1`) and averages this map over batch and positions; diffusers' own `kl()` sums
        over positions too, which is 784× larger at 28×28.
        """
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The model


class MaskVAE(nn.Module):
    """AutoencoderKL for binary masks; the defaults are the authors' configuration (`MaskVanillaVAE_V2.__init__`)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, block_out_channels=(4, 8, 16, 16),
                 layers_per_block: int = 2, latent_channels: int = 4, norm_num_groups: int = 2):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, norm_num_groups=norm_num_groups)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(out_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Mask side / latent side: 8 for four blocks (224 → 28, 64 → 8)."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def latent_side(self, mask_size: int) -> int:
        """The latent side of mask_size² masks; a ValueError when such a mask does not halve evenly in every block."""
        f = self.downsample_factor
        if mask_size % f:
            raise ValueError(f"--mask_size {mask_size}: this Mask-VAE halves a mask {f.bit_length() - 1} times, so the "
                             f"size must be a multiple of {f} (e.g. {max(f, f * round(mask_size / f))})")
        return mask_size // f

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 1, M, M) masks in [0, 1] → posterior over (B, latent, M/f, M/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, h, w) raw (unscaled) latents → (B, 1, h·f, w·f) unbounded mask map."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruct `x` through a posterior sample (training) or the mean; returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


# ----------------------------------------------------------------------------------------------------------------
# Loading the released weights (the diffusers export of `unique_vae/save_vae_ckpt.py`, or the Lightning checkpoint)

ARCH_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups")
LIGHTNING_PREFIX = "model.vae."       # MaskVanillaVAE_V2 stores the AutoencoderKL as `self.vae`


def arch_from_config(config: dict, source="config.json") -> dict:
    """The MaskVAE arguments of a diffusers AutoencoderKL config; options this model does not have are errors."""
    unsupported = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
    for key, block in unsupported.items():
        if any(b != block for b in config.get(key, [block])):
            raise ValueError(f"{source}: {key}={config[key]} is not supported; MaskVAE only has {block}")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if config.get(key, True) is not True:
            raise ValueError(f"{source}: {key}={config[key]} is not supported; MaskVAE always has it")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"{source}: act_fn={config['act_fn']!r} is not supported; MaskVAE uses silu")
    arch = {k: config[k] for k in ARCH_KEYS if k in config}
    if "block_out_channels" in arch:
        arch["block_out_channels"] = tuple(arch["block_out_channels"])
    return arch


def diffusers_config(vae: MaskVAE) -> dict:
    """A config.json that diffusers' AutoencoderKL.from_pretrained also accepts for this model."""
    n = len(vae.config["block_out_channels"])
    return {"_class_name": "AutoencoderKL", **vae.config, "block_out_channels": list(vae.config["block_out_channels"]),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu"}


def load_mask_vae(path, **arch) -> MaskVAE:
    """Build a MaskVAE and load weights strictly from a diffusers folder, a weights file, or a Lightning ckpt.

    A folder's `config.json` sets the architecture (explicit `arch` keywords win); otherwise the authors'
    configuration is used. Mismatched files raise `CheckpointMismatch` naming the offending keys.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        arch = {**arch_from_config(read_json(path / "config.json"), path / "config.json"), **arch}
    state = read_state_dict(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):   # a Lightning checkpoint
        state = state["state_dict"]
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {k[len(LIGHTNING_PREFIX):] if k.startswith(LIGHTNING_PREFIX) else k: v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointMismatch(f"{path}: entries {bad} are not tensors; expected a Mask-VAE state dict")
    vae = MaskVAE(**arch)
    load_strict(vae, {k: v.float() for k, v in state.items()}, source=str(path))
    return vae.eval()
