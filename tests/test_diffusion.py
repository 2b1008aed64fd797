"""Diffusion: schedules against the reference tables in fixtures/, q / posterior against independent formulas and
diffusers, the loss terms against torch.distributions, DDIM against diffusers' DDIMScheduler, the keep-policy."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiffprompt.diffusion import (GaussianDiffusion, authors_keep_policy, ddim_timesteps,
                                      discretized_gaussian_log_likelihood, get_betas)

# diffusion_schedules.tsv: β and ᾱ for t = 0..99, linear (training) and cosine (stage-3 sampler), T = 100;
# ddim25_cos_steps.tsv: the 25 cosine DDIM steps of stage 3 and which loop outputs become prompt layers
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _table(name):
    return np.genfromtxt(FIXTURES / name, delimiter="\t", skip_header=1, dtype=str)


def test_schedules_match_the_reference_table():
    tab = _table("diffusion_schedules.tsv").astype(np.float64)        # t, β lin, ᾱ lin, β cos, ᾱ cos
    lin = GaussianDiffusion(get_betas("linear", 100))
    cos = GaussianDiffusion(get_betas("squaredcos_cap_v2", 100))
    assert np.array_equal(tab[:, 0], np.arange(100))
    np.testing.assert_allclose(lin.betas, tab[:, 1], rtol=1e-6)
    np.testing.assert_allclose(lin.alphas_cumprod, tab[:, 2], rtol=1e-6)
    np.testing.assert_allclose(cos.betas, tab[:, 3], rtol=1e-6)
    np.testing.assert_allclose(cos.alphas_cumprod, tab[:, 4], rtol=1e-6)
    assert lin.betas[0] == 0.001 and math.isclose(lin.betas[-1], 0.2)


def test_ddim25_steps_and_kept_outputs_match_the_reference_table():
    tab = _table("ddim25_cos_steps.tsv")          # k, i, τ, ᾱ_i, ᾱ_prev, output τ, prompt layer
    cos = GaussianDiffusion(get_betas("squaredcos_cap_v2", 100))
    timesteps = ddim_timesteps(100, 25)
    assert timesteps == list(range(0, 100, 4))
    for row in tab:
        k, i, tau = int(row[0]), int(row[1]), int(row[2])
        assert i == 24 - k and timesteps[i] == tau
        np.testing.assert_allclose(cos.alphas_cumprod[tau], float(row[3]), rtol=1e-6)
        abar_prev = cos.alphas_cumprod[timesteps[i - 1]] if i > 0 else 1.0
        np.testing.assert_allclose(abar_prev, float(row[4]), rtol=1e-6)
    layers = {int(r[6]): int(r[0]) for r in tab if r[6] != "-"}      # prompt layer ℓ → loop output k
    assert authors_keep_policy(25, 12) == [layers[l] for l in range(12)] == [24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2]
    assert authors_keep_policy(25, 9) == [24, 22, 20, 18, 16, 14, 12, 10, 8]
    assert authors_keep_policy(25, 13)[-1] == 0
    with pytest.raises(ValueError, match="depth 14"):
        authors_keep_policy(25, 14)                 # the authors' list silently capped at 12; here it is an error
    with pytest.raises(ValueError, match="exactly 30"):
        ddim_timesteps(100, 30)


def test_q_sample_and_posterior_against_independent_formulas():
    d = GaussianDiffusion(get_betas("linear", 100))
    g = torch.Generator().manual_seed(0)
    x0, xt, eps = (torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 50, 99])
    ab = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    # q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for j, tj in enumerate(t.tolist()):
        if tj == 0:
            assert torch.allclose(mean[j], x0[j]) and var[j].item() == 0     # ᾱ_{-1} = 1: x_{-1} = x_0
            assert math.isclose(logvar[j].item(), math.log(d.posterior_variance[1]))   # clipped log β̃_0
            continue
        a_t, ab_prev = 1 - d.betas[tj], d.alphas_cumprod[tj - 1]
        precision = a_t / d.betas[tj] + 1 / (1 - ab_prev)
        ref = (math.sqrt(a_t) / d.betas[tj] * xt[j] + math.sqrt(ab_prev) / (1 - ab_prev) * x0[j]) / precision
        assert torch.allclose(mean[j], ref)
        assert math.isclose(var[j].item(), 1 / precision, rel_tol=1e-10)


def test_q_sample_matches_diffusers_add_noise():
    diffusers = pytest.importorskip("diffusers")
    betas = get_betas("linear", 100)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, trained_betas=betas)
    d = GaussianDiffusion(betas)
    x0, eps, t = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8), torch.tensor([0, 10, 42, 77, 99])
    assert torch.allclose(d.q_sample(x0, t, eps), sched.add_noise(x0, eps, t), atol=1e-5)


def test_loss_terms_and_stop_gradient():
    d = GaussianDiffusion(get_betas("linear", 100))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) * 0.5
    noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, 5, 80])
    losses = d.training_losses(lambda x, tt: out, x0, t, noise)
    xt = d.q_sample(x0, t, noise)
    assert torch.allclose(losses["mse"], ((noise - out[:, :4]) ** 2).mean((1, 2, 3)))
    # t > 0: KL between Gaussians (torch.distributions, nats) → bits, averaged over dimensions
    pm = d.p_mean_variance(out.detach(), xt, t)
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, xt, t)
    for j in (1, 2):
        q = torch.distributions.Normal(true_mean[j], (0.5 * true_logvar[j]).exp().expand_as(true_mean[j]))
        p = torch.distributions.Normal(pm["mean"][j], (0.5 * pm["log_variance"][j]).exp())
        ref = torch.distributions.kl_divergence(q, p).mean() / math.log(2)
        assert torch.allclose(losses["vb"][j], ref)
    # learned range, IDDPM eq. 15: v = 1 gives β_t, v = -1 gives the clipped β̃_t
    ones = torch.ones(3, 4, 4, 4, dtype=torch.float64)
    lv = d.p_mean_variance(torch.cat([ones, ones], 1), xt, t)["log_variance"]
    assert torch.allclose(lv[:, 0, 0, 0], torch.from_numpy(np.log(d.betas[t.numpy()])))
    lv = d.p_mean_variance(torch.cat([ones, -ones], 1), xt, t)["log_variance"]
    assert torch.allclose(lv[:, 0, 0, 0], torch.from_numpy(d.posterior_log_variance_clipped[t.numpy()]))
    # the VB term's gradient reaches only the variance channels (mean detached)
    losses["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :4]) == 0 and torch.count_nonzero(out.grad[:, 4:]) > 0


def test_x0_weighted_loss_is_the_x0_error_where_noise_dominates():
    d = GaussianDiffusion(get_betas("linear", 100))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(4, 8, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 30, 45, 90])           # 1/SNR = (1-ᾱ)/ᾱ: ≈0.01, 1.7, 7.3, ≈7e3
    plain = d.training_losses(lambda x, tt: out, x0, t, noise)
    assert torch.equal(plain["loss"], plain["mse"] + plain["vb"])              # cap 1: the authors' loss
    weighted = d.training_losses(lambda x, tt: out, x0, t, noise, x0_weight_cap=20.0)
    assert torch.equal(weighted["mse"], plain["mse"]) and torch.equal(weighted["vb"], plain["vb"])
    x0_err = ((d.predict_x0_from_eps(d.q_sample(x0, t, noise), t, out[:, :4]) - x0) ** 2).mean((1, 2, 3))
    w = weighted["loss"] - weighted["vb"]
    assert torch.allclose(w[0], plain["mse"][0])                                # signal dominates: weight 1
    assert torch.allclose(w[1:3], x0_err[1:3])                                  # 1 < 1/SNR < cap: the x̂_0 error
    assert torch.allclose(w[3], 20 * plain["mse"][3])                           # capped


def test_discretized_likelihood_is_a_distribution_over_bins():
    # 256 bins of width 2/255 on [-1, 1] (edges open-ended): their probabilities sum to 1
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.0, 0.5)):
        lp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert math.isclose(lp.exp().sum().item(), 1.0, rel_tol=2e-3)


def _eps_model(diffusion):
    """A fixed nonlinear ε-model that keeps samples O(1): √(1-ᾱ_t)·x (the ideal ε for x_0 ~ N(0, I)) + a wiggle."""
    abar = torch.from_numpy(diffusion.alphas_cumprod).float()
    def model_fn(x, t):
        a = abar[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x + 0.1 * torch.tanh(2 * x) * torch.cos(t.view(-1, 1, 1, 1) / 7.0)
        return torch.cat([eps, torch.zeros_like(eps)], 1)       # the variance channels are ignored by DDIM
    return model_fn


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_ddim_trajectory_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    betas = get_betas(schedule, 100)
    d = GaussianDiffusion(betas)
    sched = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas, timestep_spacing="leading",
                                    steps_offset=0, set_alpha_to_one=True, prediction_type="epsilon",
                                    clip_sample=False)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == list(range(96, -1, -4))
    model_fn = _eps_model(d)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample, outputs = d.ddim_sample(model_fn, z.shape, noise=z.clone(), num_steps=25, eta=0.0, keep="all")
    x, ref = z.clone(), []
    for t in sched.timesteps:
        eps = model_fn(x, torch.full((3,), int(t)))[:, :4]
        x = sched.step(eps, t, x, eta=0.0).prev_sample
        ref.append(x)
    ours = outputs[::-1]                                   # "all" is cleanest first; diffusers' order is loop order
    assert len(ours) == 25 and torch.equal(ours[-1], sample)
    max_diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    assert max_diff <= 1e-5, max_diff
    # the authors' keep-policy picks loop outputs 24, 22, ... : the same tensors, cleanest first
    _, kept = d.ddim_sample(model_fn, z.shape, noise=z.clone(), keep=9)
    assert len(kept) == 9 and all(torch.equal(kept[l], ours[24 - 2 * l]) for l in range(9))
    with pytest.raises(ValueError, match="depth 14"):
        d.ddim_sample(model_fn, z.shape, noise=z.clone(), keep=14)


def test_ddim_eta_one_adds_noise_and_eta_zero_is_deterministic():
    d = GaussianDiffusion(get_betas("linear", 100))
    model_fn, z = _eps_model(d), torch.randn(2, 4, 4, 4)
    a, _ = d.ddim_sample(model_fn, z.shape, noise=z.clone())
    b, _ = d.ddim_sample(model_fn, z.shape, noise=z.clone())
    c, _ = d.ddim_sample(model_fn, z.shape, noise=z.clone(), eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_v_prediction_is_epsilon_prediction_rewritten():
    """v = √ᾱ·ε - √(1-ᾱ)·x_0: a v-model that states the same ε̂ samples the same DDIM path, its loss is ε-MSE / ᾱ,
    and diffusers' DDIM with prediction_type="v_prediction" (where installed) agrees step by step."""
    betas = get_betas("linear", 100)
    d_eps, d_v = GaussianDiffusion(betas), GaussianDiffusion(betas, prediction="v")
    eps_fn = _eps_model(d_eps)
    a = torch.from_numpy(d_eps.sqrt_alphas_cumprod).float()
    s = torch.from_numpy(d_eps.sqrt_one_minus_alphas_cumprod).float()

    def v_fn(x, t):
        eps = eps_fn(x, t)[:, :4]
        at, st = a[t].view(-1, 1, 1, 1), s[t].view(-1, 1, 1, 1)
        v = at * eps - st * (x - st * eps) / at                       # x̂_0 = (x_t - √(1-ᾱ)·ε̂) / √ᾱ
        return torch.cat([v, torch.zeros_like(v)], 1)

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, _ = d_eps.ddim_sample(eps_fn, z.shape, noise=z.clone())
    got, _ = d_v.ddim_sample(v_fn, z.shape, noise=z.clone())
    assert (got - ref).abs().max() < 1e-4
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    out, t = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 40, 99])
    mse = d_v.training_losses(lambda x, tt: out, x0, t, noise)["mse"]
    eps_hat = d_v.eps_from_output(out[:, :4], d_v.q_sample(x0, t, noise), t)
    assert torch.allclose(mse, ((noise - eps_hat) ** 2).mean((1, 2, 3)) / torch.from_numpy(d_v.alphas_cumprod[t.numpy()]))
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(betas, prediction="x0")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=100, trained_betas=betas, timestep_spacing="leading",
                                    steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction",
                                    clip_sample=False)
    sched.set_timesteps(25)
    x = z.clone()
    for step in sched.timesteps:
        x = sched.step(v_fn(x, torch.full((3,), int(step)))[:, :4], step, x, eta=0.0).prev_sample
    assert (got - x).abs().max() < 1e-4
