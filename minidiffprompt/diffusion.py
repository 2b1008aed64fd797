"""Gaussian diffusion for the mask DiT: schedules, forward noising, the training loss, and a DDIM sampler that
keeps intermediate latents (the authors' copies of the ADM code: `DiT-main/diffusion/` for training,
`GLIP/maskrcnn_benchmark/modeling/dit/diffusion/` for stage 3). Read it beside DDPM (Ho et al. 2020), improved
DDPM (Nichol & Dhariwal 2021, "IDDPM") and DDIM (Song et al. 2021); equation numbers refer to those papers.

    diffusion = GaussianDiffusion(get_betas("linear", 100))          # the training process of the mask DiT
    losses = diffusion.training_losses(model_fn, x0, t)              # {"loss", "mse", "vb"} per sample
    x0_hat, kept = diffusion.ddim_sample(model_fn, (B, 4, 28, 28), num_steps=25, keep=9)

`model_fn(x_t, t) -> (B, 2C, H, W)` is the DiT with its condition bound (ε̂ in the first C channels, the
variance interpolation values v in the last C). All schedule arithmetic is float64, cast to the data's dtype
when gathered, as in the ADM code the authors used.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# Noise schedules (β and ᾱ for T = 100 tabulated in tests/fixtures/diffusion_schedules.tsv)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """β_t = min(1 - ᾱ((t+1)/T) / ᾱ(t/T), max_beta): the betas whose cumulative product follows ᾱ(·)."""
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def get_betas(name: str, num_steps: int = 100) -> np.ndarray:
    """β_0..β_{T-1} in float64. 'linear': DDPM's 1e-4..0.02 rescaled to T steps (T=100: 0.001..0.2, the
    training schedule: the default of `create_diffusion` in `DiT-main/diffusion/__init__.py`); 'squaredcos_cap_v2':
    IDDPM eq. 17 cosine ᾱ (the authors' stage-3 sampler, `GLIP/maskrcnn_benchmark/modeling/detector/
    generalized_vl_rcnn.py`)."""
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'squaredcos_cap_v2'")


def ddim_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """ADM's space_timesteps(T, 'ddimN'): the smallest stride giving exactly N steps, timesteps {0, s, 2s, ...}.
    T=100, N=25 → stride 4, [0, 4, ..., 96] (the authors' stage-3 'ddim25')."""
    for stride in range(1, num_train_steps):
        if len(range(0, num_train_steps, stride)) == num_steps:
            return list(range(0, num_train_steps, stride))
    if num_steps == num_train_steps:
        return list(range(num_train_steps))
    raise ValueError(f"cannot space {num_train_steps} diffusion steps into exactly {num_steps} DDIM steps with a "
                     f"constant stride (ADM 'ddim{num_steps}'); pick N such that some stride s has "
                     f"len(range(0, {num_train_steps}, s)) == N, e.g. 25, 50, 100")


def authors_keep_policy(num_steps: int, depth: int) -> list[int]:
    """Which DDIM loop outputs become prompts: one per prompt depth, every other step counted from the cleanest,
    cleanest first, as `ddim_sample_loop` in the authors' `GLIP/maskrcnn_benchmark/modeling/dit/diffusion/
    gaussian_diffusion.py`. For 25 steps: [24, 22, 20, ...][:depth]; output k is the latent after step k+1,
    so output N-1 is x̂₀: prompt layer 0 gets the cleanest latent, deeper layers noisier ones. Their code
    indexes with the fixed 12-entry list [24, 22, ..., 2], so a depth above 12 is silently capped at 12;
    here a depth with no matching output is an error instead."""
    available = list(range(num_steps - 1, -1, -2))
    if depth < 0 or depth > len(available):
        raise ValueError(f"prompt depth {depth} needs {depth} latents taken every other DDIM step, but {num_steps} "
                         f"steps give only {len(available)}; use depth <= {len(available)} or more DDIM steps")
    return available[:depth]


def _gather(arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arr[t] as a (B, 1, 1, ...) tensor broadcastable against x (float64 → x.dtype)."""
    out = torch.from_numpy(arr).to(x.device)[t.to(x.device).long()].to(x.dtype)
    return out.reshape(-1, *([1] * (x.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of a Gaussian discretised into 8-bit bins on [-1, 1] (DDPM §3.3, ADM code). Inherited from
    pixel-space diffusion; the raw VAE latents here are neither 8-bit data nor confined to [-1, 1], so the
    t = 0 term means little. It is kept for fidelity to the authors' `_vb_terms_bpd`."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """DDPM forward process q, ε- (or v-) prediction with learned-range variance, MSE + VB loss, and DDIM sampling.

    `prediction` names what the model's first C channels estimate: "eps", the noise ε (DDPM, ADM, DiT and the
    authors), or "v" = √ᾱ_t·ε - √(1-ᾱ_t)·x_0 (Salimans & Ho 2022, "Progressive distillation", §4). Near t = T,
    where x_t is almost pure noise, v ≈ -x_0: the model states the mask outright instead of a tiny correction to
    ε̂ ≈ x_t that 1/√ᾱ_t then magnifies. Everything downstream (VB term, DDIM) works on ε̂ = √ᾱ_t·v̂ + √(1-ᾱ_t)·x_t."""

    def __init__(self, betas: np.ndarray, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction={prediction!r}: use 'eps' or 'v'")
        self.prediction = prediction
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be a 1-D array in (0, 1]"
        self.betas = betas                                              # β_t
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas                                            # α_t
        self.alphas_cumprod = np.cumprod(alphas)                        # ᾱ_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])   # ᾱ_{t-1}, ᾱ_{-1} = 1
        assert self.alphas_cumprod_prev.shape == (T,)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t): DDPM eq. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)   # β̃_t
        # β̃_0 = 0, so its log is replaced by log β̃_1 (IDDPM / ADM "clipped")
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---- forward process --------------------------------------------------------------------------------------

    def q_sample(self, x0, t, noise=None):
        """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε (DDPM eq. 4)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        """μ̃_t(x_t, x_0) = coef1·x_0 + coef2·x_t, β̃_t, log β̃_t (clipped): DDPM eq. 7."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt), _gather(self.posterior_log_variance_clipped, t, xt)

    # ---- reverse process --------------------------------------------------------------------------------------

    def predict_x0_from_eps(self, xt, t, eps):
        """x̂_0 = √(1/ᾱ_t)·x_t - √(1/ᾱ_t - 1)·ε̂ (DDPM eq. 4 solved for x_0; DDIM eq. 9)."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def eps_from_output(self, out, xt, t):
        """ε̂ from the model's first C channels: as is for ε-prediction; √ᾱ_t·v̂ + √(1-ᾱ_t)·x_t for v-prediction."""
        if self.prediction == "eps":
            return out
        return _gather(self.sqrt_alphas_cumprod, t, xt) * out + _gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt

    def p_mean_variance(self, model_output, xt, t):
        """p_θ(x_{t-1}|x_t) from the 2C-channel model output: ε̂ → x̂_0 → mean μ̃_t(x_t, x̂_0); variance from v by
        IDDPM eq. 15, log σ² = v'·log β_t + (1-v')·log β̃_t with v' = (v+1)/2 (learned range)."""
        C = xt.shape[1]
        eps, v = self.eps_from_output(model_output[:, :C], xt, t), model_output[:, C:]
        min_log = _gather(self.posterior_log_variance_clipped, t, xt)
        max_log = _gather(np.log(self.betas), t, xt)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0_hat = self.predict_x0_from_eps(xt, t, eps)          # no clipping: latents are not bounded
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, xt, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": x0_hat, "eps": eps}

    # ---- training loss (ADM `GaussianDiffusion.training_losses`, as in `DiT-main/train.py`) ----------------------

    def vb_terms_bpd(self, model_output, x0, xt, t):
        """L_vb per sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) for t > 0 (IDDPM eq. 5),
        the discretised decoder NLL -log p_θ(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(xt.device) == 0, nll, kl)

    def training_losses(self, model_fn, x0, t, noise=None, x0_weight_cap: float = 1.0) -> dict:
        """loss = w_t·‖ε - ε̂‖² (mean over C, H, W; DDPM eq. 14) + L_vb with ε̂ detached, so L_vb trains only the
        variance channels (IDDPM §3.1, L_hybrid with λ = 1 as the authors ran it; MSE, not RESCALED_MSE).

        w_t = clamp((1-ᾱ_t)/ᾱ_t, 1, x0_weight_cap); the default cap 1 gives the authors' w_t = 1. Since
        x_0 - x̂_0 = √((1-ᾱ_t)/ᾱ_t)·(ε̂ - ε), w_t·ε-MSE is the x̂_0 error wherever noise outweighs signal
        (1/SNR > 1), up to the cap. There plain ε-MSE hardly cares where x̂_0 puts the object, so a model can
        ignore its condition; the weight makes those steps count (`mse` stays the unweighted ε-MSE).
        With v-prediction the MSE is ‖v - v̂‖² = ‖ε - ε̂‖²/ᾱ_t (the weight 1/ᾱ_t comes with the target) and
        L_vb sees ε̂ from v̂."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, t)                                           # (B, 2C, H, W)
        C = x0.shape[1]
        assert out.shape[1] == 2 * C, f"model must output 2·{C} channels (ε̂ and v), got {out.shape[1]}"
        pred, v = out[:, :C], out[:, C:]
        target = noise
        if self.prediction == "v":
            target = _gather(self.sqrt_alphas_cumprod, t, x0) * noise - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        vb = self.vb_terms_bpd(torch.cat([pred.detach(), v], dim=1), x0, xt, t)   # stop-gradient on the mean
        mse = _mean_flat((target - pred) ** 2)
        weight = 1.0
        if x0_weight_cap != 1.0:
            weight = _gather(np.clip(1 / self.alphas_cumprod - 1, 1.0, x0_weight_cap), t, mse)
        return {"loss": weight * mse + vb, "mse": mse, "vb": vb}

    # ---- DDIM sampling (ADM `ddim_sample_loop`, as the authors' stage 3 calls it) --------------------------------

    @torch.no_grad()
    def ddim_sample(self, model_fn, shape, noise=None, num_steps: int = 25, eta: float = 0.0,
                    keep: int | Sequence[int] | str | None = None, generator: torch.Generator | None = None,
                    device=None):
        """DDIM (Song et al. 2021) over the respaced timesteps {0, s, ..., (N-1)s}, no clipping of x̂_0.

        Starts from `noise` (or N(0, I)) taken as x at the largest kept timestep, like ADM. Loop output k
        (k = 0..N-1) is the latent after step k+1; output N-1 is x̂_0, the final sample.
        `keep` chooses which outputs are returned, in the order given:
          int D      → `authors_keep_policy(N, D)`: D latents, every other step, cleanest first (authors' stage 3);
          sequence   → these loop-output indices; "all" → every output, cleanest first; None → none.
        Returns (sample, kept_latents: list of (B, C, H, W) tensors).
        """
        timesteps = ddim_timesteps(self.num_timesteps, num_steps)
        if keep is None:
            keep_idx = []
        elif isinstance(keep, str):
            if keep != "all":
                raise ValueError(f"keep={keep!r}: use an int depth, a list of loop-output indices, 'all' or None")
            keep_idx = list(range(num_steps - 1, -1, -1))
        elif isinstance(keep, int):
            keep_idx = authors_keep_policy(num_steps, keep)
        else:
            keep_idx = [int(k) for k in keep]
            bad = [k for k in keep_idx if not 0 <= k < num_steps]
            if bad:
                raise ValueError(f"keep indices {bad} out of range: {num_steps} DDIM steps give outputs 0..{num_steps - 1}")
        device = device if device is not None else (noise.device if noise is not None else "cpu")
        x = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        abar = self.alphas_cumprod[timesteps]                                # ᾱ at the kept timesteps
        abar_prev = np.append(1.0, abar[:-1])                                # ᾱ_prev, 1 before the first
        outputs = []
        for i in reversed(range(num_steps)):
            t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)   # original τ = s·i
            a_t = torch.tensor(abar[i], dtype=torch.float64).to(x.dtype)
            a_prev = torch.tensor(abar_prev[i], dtype=torch.float64).to(x.dtype)
            # 1. ε̂_θ(x_τ, τ): only the first C channels; DDIM does not use the learned variance
            eps = self.eps_from_output(model_fn(x, t)[:, : x.shape[1]], x, t)
            # 2. predict x_0 (DDIM eq. 12, first term): x̂_0 = (x_τ - √(1-ᾱ_τ)·ε̂) / √ᾱ_τ
            x0_hat = torch.sqrt(1 / a_t) * x - torch.sqrt(1 / a_t - 1) * eps
            # 3. re-derive ε from x̂_0 (equals ε̂; ADM does this after optional clipping)
            eps = (torch.sqrt(1 / a_t) * x - x0_hat) / torch.sqrt(1 / a_t - 1)
            # 4. σ_τ(η) (DDIM eq. 16): η = 0 deterministic DDIM, η = 1 DDPM-like
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
            # 5. x_prev = √ᾱ_prev·x̂_0 + √(1-ᾱ_prev-σ²)·ε̂ + σ·z (DDIM eq. 12)
            x = torch.sqrt(a_prev) * x0_hat + torch.sqrt(1 - a_prev - sigma ** 2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            outputs.append(x)
        return x, [outputs[k] for k in keep_idx]
