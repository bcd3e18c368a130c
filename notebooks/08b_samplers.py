# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # 08b · Samplers: from noise to a picture, one signature for every model
#
# Chapter 08a wrapped every model into one denoiser $D(x, \sigma) \approx x_0$ and gave its
# schedules. This sitting walks from pure noise down to σ = 0 with it: (§3) thirteen **samplers**, from
# Euler to DPM-Solver++ and UniPC; (§4) **parity** with diffusers (and, in the tests, k-diffusion);
# (§5) their **measured order of accuracy**; (§6) the **ideal denoiser of a finite dataset**, with a
# widget; (§7) bad input. It exports `tinydit.samplers` (the samplers, `SAMPLERS`).

# %%
# | default_exp samplers
# %%
import inspect
import math
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from tinydit import data, dit, schedules, vae
from tinydit.denoisers import DiscreteDenoiser, FlowDenoiser, GaussianDenoiser, IdealDenoiser
from tinydit.validation import expect_error  # the chapters' way to show an expected error


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers
torch.set_num_threads(1)  # this chapter's tensors are tiny: one thread beats two contending for them

# %% [markdown]
# Chapter 08a's tiny random DiT, its ε-denoiser on SD 1.x's schedule, and the lesson version of that
# denoiser: the samplers below run on them.

# %%
def tiny_dit(learn_sigma=True, seed=0):
    """A random 2-block DiT with every weight random (adaLN-Zero would start it as the identity)."""
    torch.manual_seed(seed)
    net = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                num_heads=2, num_classes=4, learn_sigma=learn_sigma))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net.eval().requires_grad_(False)


net = tiny_dit()
ac_sd = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))  # (1000,): SD 1.x's schedule
D_tiny = DiscreteDenoiser(net, ac_sd)
flow = FlowDenoiser(net)
lesson_D = D_tiny  # the lesson version equals it (08a, §1)

# %% [markdown]
# ## 3. Samplers
#
# ### 3.1 Euler: the ODE, one slope per step
#
# Start from $x = \sigma_0 n$ (pure noise: at $\sigma_\max \approx 14.6$ for SD, $80$ for Karras'
# defaults, the data is invisible) and step down the list. Euler takes the slope where it stands:

# %%
def lesson_euler(D, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - D(x, sigmas[i] * torch.ones(len(x)))) / sigmas[i]  # dx/dsigma, (B, C, H, W)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x

# %% [markdown]
# The production samplers run in 08a's loop scaffold, `SamplerRun` (inputs checked once, progress bar,
# NaN guard, callback, noise from a CPU generator), so each holds only its update rule. The signature
# is k-diffusion's, so samplers written for it read the same here. Euler also takes Karras et al.'s
# "churn" (`s_churn`): raise σ a little with fresh noise first.

# %%
# | export
"""Samplers: integrate from noise to data with a denoiser D(x, sigma, **cond) -> x0 (Karras et al. 2022).

Every sampler has k-diffusion's signature `sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None, ..., generator=None)`: `x` is the start (noise * sigmas[0]), `sigmas` descends strictly
(to 0 for a clean sample; ending above 0 returns the partly denoised one, so a schedule can be split
across two samplers, as ComfyUI's SplitSigmas does), `model` is a denoiser (`tinydit.denoisers`). Noise is drawn from `generator` on the CPU, then moved,
so a seed gives the same image on any device. `SAMPLERS` maps names to the functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tinydit.denoisers import SamplerRegistry, SamplerRun, check_churn_options, check_noise_options
from tinydit.validation import check_choice, check_int


# %%
# | export
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, generator=None):
    """Euler steps on dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Algorithm 2; churn optional)."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_churn_options(s_churn, s_tmin, s_tmax, s_noise)
    for i, _, sigma_next in run.steps():
        x, sigma_hat = run.churn(x, i, s_churn, s_tmin, s_tmax, s_noise)
        x = x + (x - run.denoise(x, sigma_hat, i, report=True)) / sigma_hat * (sigma_next - sigma_hat)
    return x

# %% [markdown]
# Production and lesson agree on the tiny DiT (10 Karras steps); the callback sees every step.

# %%
sig10 = D_tiny.get_sigmas(10)
x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig10[0]  # (B, C, H, W)
seen = []
out = sample_euler(D_tiny, x_start, sig10, callback=lambda info: seen.append(sorted(info)))
torch.testing.assert_close(out, lesson_euler(lesson_D, x_start, sig10), rtol=1e-4, atol=1e-4)
assert len(seen) == 10 and seen[0] == ["denoised", "i", "sigma", "sigma_hat", "x"]

# %% [markdown]
# ### 3.2 Ancestral samplers: fresh noise every step (and DDIM, and rectified flow)
#
# An **ancestral** step goes deterministically down to $\sigma_\downarrow < \sigma_{i+1}$, then adds
# fresh noise $\sigma_\uparrow n$ so that the total noise is back to $\sigma_{i+1}$:
# $\sigma_\downarrow^2 + \sigma_\uparrow^2 = \sigma_{i+1}^2$, with
# $\sigma_\uparrow = \eta\,\sigma_{i+1}\sqrt{(\sigma_i^2 - \sigma_{i+1}^2)/\sigma_i^2}$
# ($\eta = 1$: the DDPM posterior's noise; $\eta = 0$: none). The image keeps being re-drawn, which
# forgets early mistakes but never converges to one ODE solution.
#
# **DDIM is this step.** Song et al.'s update (eq. 12) in variance-preserving form is
# $x_{\text{prev}} = \sqrt{\bar\alpha_{\text{prev}}}\,\hat x_0 + \sqrt{1-\bar\alpha_{\text{prev}}-s^2}\,\hat\varepsilon + s\,z$
# with $s^2 = \eta^2 \frac{1-\bar\alpha_{\text{prev}}}{1-\bar\alpha}\big(1 - \frac{\bar\alpha}{\bar\alpha_{\text{prev}}}\big)$.
# Divide by $\sqrt{\bar\alpha_{\text{prev}}}$ and substitute $\bar\alpha = 1/(1+\sigma^2)$: $s^2/\bar\alpha_{\text{prev}}$
# is exactly $\sigma_\uparrow^2$ above, and the rest is an Euler step to $\sigma_\downarrow$. So
# `sample_ddim` is `sample_euler_ancestral` with $\eta = 0$ by default (then it is plain Euler).
#
# **Rectified flow** needs its own ancestral step: there $x = (1-\sigma)x_0 + \sigma n$, so after the
# Euler step to $\sigma_\downarrow$ the signal must be scaled back up by
# $(1-\sigma_{i+1})/(1-\sigma_\downarrow)$ before noise is added, with
# $\sigma_\downarrow = \sigma_{i+1}\big(1 + (\sigma_{i+1}/\sigma_i - 1)\eta\big)$ (the choice of ComfyUI's
# `euler_ancestral_RF`); the noise then tops the variance up to exactly $\sigma_{i+1}^2$.

# %%
# | export
def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up), sigma_down^2 + sigma_up^2 = sigma_next^2: eta = 1, DDPM's noise; 0, none."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up

# %%
# | export
@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           generator=None):
    """Ancestral sampling: an Euler step down to sigma_down, then sigma_up of fresh noise."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (down - sigma)
        if up > 0:
            x = x + run.noise(x) * s_noise * up
    return x

# %%
# | export
@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0, generator=None):
    """DDIM (Song et al. 2021) in sigma space: its eta-step is `sample_euler_ancestral`'s (chapter 08)."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, generator)

# %%
# | export
@torch.no_grad()
def sample_euler_ancestral_rf(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              generator=None):
    """Ancestral Euler for rectified flow: Euler to sigma_down, signal scaled back to 1 - sigma_next,
    noise up to sigma_next (as ComfyUI's euler_ancestral_RF)."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise, max_eta=1.0)
    if run.s[0] > 1:
        raise ValueError(f"sigmas: expected flow times <= 1 for a rectified-flow sampler, got sigmas[0] = {run.s[0]}")
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        x = x + (x - denoised) / sigma * (down - sigma)  # (1 - down) x0 + down noise
        if sigma_next > 0 and eta > 0:
            scale = (1 - sigma_next) / (1 - down)
            x = scale * x + run.noise(x) * s_noise * max(sigma_next**2 - (scale * down) ** 2, 0.0) ** 0.5
    return x

# %% [markdown]
# Two checks. DDIM written as in the paper (variance-preserving, integer timesteps, the same noise)
# equals `sample_ddim` on the tiny DiT, at $\eta = 0$ and $\eta = 1$. A seed reproduces the noise,
# and a deterministic sampler does not consume the generator at all. And the rectified-flow step
# adds the right amount of noise: on Gaussian data $x_0 \sim \mathcal N(\mu, s^2)$, whose flow
# denoiser is known exactly, its samples spread like deterministic Euler's (both carry the same
# first-order discretisation bias), while the VE ancestral step, misused on a flow model, adds far
# too much noise.

# %%
def lesson_ddim(net_eps, x, timesteps, ac, eta, generator):  # x: unit-variance noise, timesteps descending
    for i, t in enumerate(timesteps):
        ab, ab_prev = ac[t], (ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0))
        eps_hat = net_eps(x, torch.full((len(x),), float(t)))
        x0_hat = (x - (1 - ab) ** 0.5 * eps_hat) / ab**0.5
        std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0_hat + (1 - ab_prev - std**2) ** 0.5 * eps_hat
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator)
    return x


ts = schedules.timestep_spacing(10, spacing="trailing").long()  # 999, 899, ..., 99
sig_ddim = torch.cat([schedules.sigmas_from_alphas_cumprod(ac_sd)[ts], torch.zeros(1)])  # (11,)
Dq = DiscreteDenoiser(net, ac_sd, quantize=True)  # integer timesteps, as DDIM's
for eta in (0.0, 1.0):
    ref = lesson_ddim(lambda x, t: net(x, t)[:, :4], x_start / (1 + sig_ddim[0] ** 2) ** 0.5, ts, ac_sd, eta,
                      torch.Generator().manual_seed(1))
    ours = sample_ddim(Dq, x_start, sig_ddim, eta=eta, generator=torch.Generator().manual_seed(1), disable=True)
    print(f"DDIM eta={eta}: max |paper form - sample_ddim| = {(ours - ref).abs().max():.1e}")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # measured about 1e-6 (float32)

g = torch.Generator().manual_seed(4)
state = g.get_state()
first = sample_euler_ancestral(D_tiny, x_start, sig10, generator=g, disable=True)  # draws 9 noises from g
again = sample_euler_ancestral(D_tiny, x_start, sig10, generator=torch.Generator().manual_seed(4), disable=True)
assert torch.equal(first, again)
sample_euler(D_tiny, x_start, sig10, generator=g.set_state(state), disable=True)  # deterministic: no draws
assert torch.equal(g.get_state(), state)  # a seed means the same image, and Euler leaves it untouched

mu_g, s_g = 0.5, 0.6  # flow denoiser of N(mu, s^2) data: x = (1 - t) x0 + t n  =>  E[x0 | x] in closed form
flow_D = lambda x, t: mu_g + (1 - t[:, None]) * s_g**2 / ((1 - t[:, None]) ** 2 * s_g**2 + t[:, None] ** 2) * (
    x - (1 - t[:, None]) * mu_g)
noise, sig_rf = torch.randn(4096, 1, generator=torch.Generator().manual_seed(2)), flow.get_sigmas(100)
stds = {name: SAMPLER(flow_D, noise, sig_rf, generator=torch.Generator().manual_seed(3), disable=True).std().item()
        for name, SAMPLER in {"euler (no noise)": sample_euler, "euler_ancestral_rf": sample_euler_ancestral_rf,
                              "euler_ancestral (VE step, misused)": sample_euler_ancestral}.items()}
print(f"data std {s_g}; 100 steps:", {k: round(v, 3) for k, v in stds.items()})
# measured 0.588, 0.574, 0.843: RF ancestral shares Euler's discretisation bias; the VE step adds too much noise
assert abs(stds["euler_ancestral_rf"] - stds["euler (no noise)"]) < 0.02
assert stds["euler_ancestral (VE step, misused)"] - s_g > 0.1

# %% [markdown]
# ### 3.3 Second order: Heun and DPM-2
#
# Euler's error per step is $O(h^2)$, so $O(h)$ overall. **Heun** (Karras et al.'s Algorithm 2)
# takes the Euler step, evaluates the slope again where it lands, and redoes the step with the mean
# of the two slopes. **DPM-2** (k-diffusion, after DPM-Solver-2) takes the second slope at the
# midpoint in $\log\sigma$, $\sqrt{\sigma_i\sigma_{i+1}}$. Both cost two denoiser calls per step,
# except the last one (to $\sigma = 0$, where the slope is undefined: Euler); both take the churn,
# and DPM-2 also comes in an ancestral version.

# %%
def lesson_heun(D, x, sigmas):  # Karras et al. 2022, Algorithm 2 without churn
    for i in range(len(sigmas) - 1):
        s, s_next, ones = sigmas[i], sigmas[i + 1], torch.ones(len(x))
        d = (x - D(x, s * ones)) / s
        x_euler = x + (s_next - s) * d
        if s_next > 0:  # second slope at the end of the Euler step
            d = (d + (x_euler - D(x_euler, s_next * ones)) / s_next) / 2
        x = x + (s_next - s) * d
    return x

# %%
# | export
@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, generator=None):
    """Heun (Karras et al. 2022, Algorithm 2): Euler, then the step redone with the mean of both slopes."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_churn_options(s_churn, s_tmin, s_tmax, s_noise)
    for i, _, sigma_next in run.steps():
        x, sigma_hat = run.churn(x, i, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - run.denoise(x, sigma_hat, i, report=True)) / sigma_hat
        x_2 = x + d * (sigma_next - sigma_hat)
        if sigma_next == 0:
            x = x_2
        else:
            d_2 = (x_2 - run.denoise(x_2, sigma_next, i)) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma_hat)
    return x

# %%
# | export
def _dpm2_step(run: SamplerRun, x, denoised, sigma: float, target: float, i: int) -> torch.Tensor:
    """x from sigma to target with the slope at the log-midpoint sqrt(sigma * target) (DPM-Solver-2)."""
    d = (x - denoised) / sigma
    if target == 0:
        return x + d * (target - sigma)
    mid = (sigma * target) ** 0.5
    x_2 = x + d * (mid - sigma)
    return x + (x_2 - run.denoise(x_2, mid, i)) / mid * (target - sigma)

# %%
# | export
@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, generator=None):
    """k-diffusion's DPM-2: each step takes the slope at the midpoint in log sigma."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_churn_options(s_churn, s_tmin, s_tmax, s_noise)
    for i, _, sigma_next in run.steps():
        x, sigma_hat = run.churn(x, i, s_churn, s_tmin, s_tmax, s_noise)
        x = _dpm2_step(run, x, run.denoise(x, sigma_hat, i, report=True), sigma_hat, sigma_next, i)
    return x

# %%
# | export
@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           generator=None):
    """DPM-2 down to sigma_down, then sigma_up of fresh noise."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise)
    for i, sigma, sigma_next in run.steps():
        down, up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm2_step(run, x, run.denoise(x, sigma, i, report=True), sigma, down, i)
        if up > 0:
            x = x + run.noise(x) * s_noise * up
    return x

# %%
torch.testing.assert_close(sample_heun(D_tiny, x_start, sig10, disable=True), lesson_heun(D_tiny, x_start, sig10),
                           rtol=1e-4, atol=1e-4)

# %% [markdown]
# ### 3.4 Exponential integrators: DPM-Solver++
#
# In $\lambda = -\log\sigma$ the ODE becomes $dx/d\lambda = D - x$: a linear part we can integrate
# exactly, plus $D$. Over a step of length $h = \lambda_{i+1} - \lambda_i$,
#
# $$x_{i+1} = e^{-h}x_i + \int_0^h e^{-(h-u)}\,D(\lambda_i + u)\,du .$$
#
# Freezing $D$ gives $x_{i+1} = \tfrac{\sigma_{i+1}}{\sigma_i}x_i + (1 - e^{-h})D$: exactly Euler (and
# DDIM). Lu et al.'s **DPM-Solver++** (2022) approximates $D$ better: **2S** evaluates it once more
# at the midpoint $\lambda_i + h/2$; **2M** extrapolates it linearly from the previous step's $D$,
# for no extra call. Their **SDE** forms follow the reverse SDE instead: with $\eta = 1$ the linear
# part decays twice as fast, $e^{-2h}$, and fresh noise $\sigma_{i+1}\sqrt{1-e^{-2h}}\,n$ enters.
# The weights of $D$'s Taylor terms $D^{(k)}h^k/k!$ are the integrals
# $\int_0^h e^{-(1+\eta)(h-u)}(1+\eta)\,u^k/k!\,du$ (the φ functions).
#
# **3M** adds the quadratic term from three steps. Its weight is the exact integral (for $\eta = 1$,
# $\frac{1-e^{-2h}}{4h^2} - \frac{1}{2h} + \frac12$, per unit of $h^2 D''$). diffusers'
# `sde-dpmsolver++` with `solver_order=3` weights it with $\frac{1-e^{-2h}-2h}{(2h)^2} - \frac12$, exactly
# $1$ less: a typo we do not copy. But there is a second, shared slip: k-diffusion, diffusers and
# the DPM-Solver reference code all feed that weight the second divided difference
# $(d_{1,0} - d_{1,1})/(r_0 + r_1) \approx h^2D''/2$, half the Taylor term, so their "3M" has the
# local error of a second-order method. We double it (`kdiffusion_compat=True` restores theirs);
# §5 measures both orders.

# %%
# | export
@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              generator=None):
    """DPM-Solver++(2S) (Lu et al. 2022), D again at the lambda-midpoint, plus ancestral noise (eta)."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise)
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = x + (x - denoised) / sigma * (down - sigma)
        else:
            h = math.log(sigma / down)
            mid = sigma * math.exp(-h / 2)
            x_2 = mid / sigma * x - math.expm1(-h / 2) * denoised
            x = down / sigma * x - math.expm1(-h) * run.denoise(x_2, mid, i)
        if up > 0:
            x = x + run.noise(x) * s_noise * up
    return x

# %%
# | export
@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022): D extrapolated linearly in lambda from the last step."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    old = h_last = None
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        d = denoised if old is None else denoised + (denoised - old) * (h / (2 * h_last))
        x = sigma_next / sigma * x - math.expm1(-h) * d
        old, h_last = denoised, h
    return x

# %%
# | export
@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint", generator=None):
    """DPM-Solver++(2M) SDE (eta = 0: 2M); `solver_type` "midpoint" or "heun" weights the difference term."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    old = h_last = None
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        c = -math.expm1(-h * (1 + eta))  # the weight of D: 1 - e^{-(1 + eta) h}
        x = sigma_next / sigma * math.exp(-eta * h) * x + c * denoised
        if old is not None:
            w = c / 2 if solver_type == "midpoint" else 1 - c / (h * (1 + eta))
            x = x + w * (h / h_last) * (denoised - old)
        if eta > 0:
            x = x + run.noise(x) * sigma_next * (-math.expm1(-2 * eta * h)) ** 0.5 * s_noise
        old, h_last = denoised, h
    return x

# %%
# | export
@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        generator=None, kdiffusion_compat=False):
    """DPM-Solver++(3M) SDE (eta = 0: the ODE): D extrapolated quadratically in lambda, exact phi weights,
    second difference 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 D''. `kdiffusion_compat=True` halves it as
    k-diffusion and diffusers do (a second-order method then, as chapter 08 measures)."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    check_noise_options(eta, s_noise)
    ds, hs = [], []  # the last two denoised samples and step lengths, newest last
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i, report=True)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        he = h * (1 + eta)
        phi_2 = math.expm1(-he) / he + 1  # the weight of h D'
        phi_3 = phi_2 / he - 0.5  # minus the weight of h^2 D''
        x = math.exp(-he) * x - math.expm1(-he) * denoised
        if len(ds) == 2:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (denoised - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # ~ h D'
            d2 = (d1_0 - d1_1) / (r0 + r1) * (1 if kdiffusion_compat else 2)  # ~ h^2 D''
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(ds) == 1:
            x = x + phi_2 * (denoised - ds[-1]) * (h / hs[-1])
        if eta > 0:
            x = x + run.noise(x) * sigma_next * (-math.expm1(-2 * eta * h)) ** 0.5 * s_noise
        ds, hs = (ds + [denoised])[-2:], (hs + [h])[-2:]
    return x

# %% [markdown]
# The lesson version of 2M is the paper's Algorithm 2, written in the variance-preserving
# variables $\alpha_\sigma = 1/\sqrt{1+\sigma^2}$ and $\alpha_\sigma\sigma$ that diffusers uses. It
# matches our σ-space form once the start is scaled by $\alpha_{\sigma_0}$:

# %%
def lesson_dpmpp_2m_vp(D, x_vp, sigmas):
    alpha = lambda s: 1 / (1 + s**2) ** 0.5
    old = h_last = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = D(x_vp / alpha(s), torch.full((len(x_vp),), s))  # the denoiser sees x = x_vp / alpha
        if s_next == 0:
            return x0
        h = math.log(s / s_next)  # lambda = log(alpha / (alpha sigma)) = -log sigma
        dd = x0 if old is None else (1 + h / (2 * h_last)) * x0 - h / (2 * h_last) * old
        x_vp = (alpha(s_next) * s_next) / (alpha(s) * s) * x_vp - alpha(s_next) * math.expm1(-h) * dd
        old, h_last = x0, h


ref = lesson_dpmpp_2m_vp(D_tiny, x_start / (1 + sig10[0] ** 2) ** 0.5, sig10)
torch.testing.assert_close(sample_dpmpp_2m(D_tiny, x_start, sig10, disable=True), ref, rtol=1e-4, atol=1e-4)

# %% [markdown]
# And the 3M weights, one step at a time: with a denoiser that is exactly quadratic in $\lambda$ (and
# ignores $x$), each step from the third on is exact for our 3M and off for k-diffusion's.

# %%
nodes, weights = np.polynomial.legendre.leggauss(20)  # Gauss-Legendre: exact for this smooth integrand
integral = lambda f, a, b: (b - a) / 2 * float(np.sum(weights * f((b - a) / 2 * nodes + (a + b) / 2)))
quadratic = lambda lam: 0.2 + 0.7 * lam - 0.1 * lam**2  # D as a function of lambda = -log sigma
quad_D = lambda x, s: quadratic(-s.log())[:, None] * torch.ones_like(x)
sig_q = schedules.karras_sigmas(8, 0.05, 20.0).double()
for compat in (False, True):
    xs = []
    sample_dpmpp_3m_sde(quad_D, torch.zeros(1, 1, dtype=torch.float64), sig_q, eta=0.0, kdiffusion_compat=compat,
                        callback=lambda info, xs=xs: xs.append(info["x"].item()), disable=True)
    errors = []
    for i in range(2, len(xs) - 1):  # steps 3, 4, ...: x_{i+1} = e^{-h} x_i + int e^{-(lam_{i+1} - lam)} D dlam
        l0, l1 = -math.log(sig_q[i]), -math.log(sig_q[i + 1])
        exact = math.exp(l0 - l1) * xs[i] + integral(lambda lam, l1=l1: np.exp(lam - l1) * quadratic(lam), l0, l1)
        errors.append(abs(xs[i + 1] - exact))
    print(f"kdiffusion_compat={compat}: largest one-step error {max(errors):.1e}")
    assert (max(errors) < 1e-10) != compat  # measured 4e-16 (ours) and 2e-2 (k-diffusion's)

# %% [markdown]
# ### 3.5 Linear multistep and UniPC
#
# **LMS** is Adams–Bashforth in σ: fit the polynomial through the last `order` slopes $d_i$ (as a
# function of σ), integrate it exactly over the step. k-diffusion integrates numerically with
# SciPy; the basis polynomials have degree < 4, so `numpy.poly1d` integrates them exactly.
#
# **UniPC** (Zhao et al. 2023) is our modern low-NFE solver: a multistep *predictor* (UniP, the 2M
# idea in general order $p$) and a *corrector* (UniC) that, once the next denoised sample is known,
# redoes the last step with it included. That call was needed anyway for the next step, so the
# order rises from $p$ to $p+1$ for free. We use the "bh2" variant with data prediction, like
# diffusers' `UniPCMultistepScheduler`: the weights $\rho$ solve a small linear system in the ratios
# $r_k$ of past step lengths (for $p = 2$ the predictor is exactly DPM-Solver++(2M)).

# %%
# | export
def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Weights of the slopes at sigmas[i], sigmas[i-1], ...: integrals of their Lagrange basis polynomials."""
    nodes, weights = [sigmas[i - j] for j in range(order)], []
    for j, node in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1 :]
        basis = (np.poly1d(others, r=True) / np.prod([node - o for o in others])).integ()  # 1 at node, 0 at others
        weights.append(float(basis(sigmas[i + 1]) - basis(sigmas[i])))
    return weights

# %%
# | export
@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, generator=None):
    """Linear multistep in sigma (k-diffusion's LMS); the order ramps up over the first steps."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    order, slopes = check_int("order", order, minimum=1, maximum=6), []
    for i, sigma, _ in run.steps():
        slopes = (slopes + [(x - run.denoise(x, sigma, i, report=True)) / sigma])[-order:]
        x = x + sum(w * d for w, d in zip(lms_coefficients(run.s, i, len(slopes)), reversed(slopes)))
    return x

# %%
# | export
def _unipc_rhos(rks: list[float], h: float, corrector: bool) -> list[float]:
    """UniPC-bh2 weights of the divided differences at step ratios `rks` (the last is 1): R rho = b,
    R[k][j] = rks[j]^k, b from the phi functions of -h (the predictor drops the last row and column)."""
    if len(rks) == (1 if corrector else 2):
        return [0.5]
    hh, b, factorial = -h, [], 1
    g = math.expm1(hh) / hh - 1
    for k in range(1, len(rks) + 1):
        b.append(g * factorial / math.expm1(hh))
        factorial *= k + 1
        g = g / hh - 1 / factorial
    R = np.array([[r**k for r in rks] for k in range(len(rks))])
    return np.linalg.solve(R, b).tolist() if corrector else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()

# %%
# | export
def _unipc_step(x, sigma: float, sigma_next: float, hist: list, new=None) -> torch.Tensor:
    """UniP (new=None) or UniC (new = the denoised sample at sigma_next) from sigma to sigma_next;
    hist: [(lambda, denoised)], oldest first, the last at sigma."""
    lam0, m0 = hist[-1]
    if sigma_next == 0:
        return m0
    h = math.log(sigma / sigma_next)
    rks = [(lam - lam0) / h for lam, _ in hist[:-1]] + [1.0]
    diffs = [(m - m0) / r for (_, m), r in zip(hist[:-1], rks)] + ([new - m0] if new is not None else [])
    rhos = _unipc_rhos(rks, h, corrector=new is not None) if diffs else []
    return sigma_next / sigma * x - math.expm1(-h) * (m0 + sum(r * d for r, d in zip(rhos, diffs)))

# %%
# | export
@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, generator=None):
    """UniPC (Zhao et al. 2023), bh2, data prediction: predictor UniP-p, then corrector UniC-p with the
    next denoised sample (order p+1, one call per step), as diffusers' UniPCMultistepScheduler."""
    run = SamplerRun(model, x, sigmas, extra_args, callback, disable, generator)
    order, n = check_int("order", order, minimum=1, maximum=3), len(run.s) - 1
    hist, x_prev, p = [], None, 0
    for i, sigma, sigma_next in run.steps():
        denoised = run.denoise(x, sigma, i)
        if x_prev is not None:  # UniC: redo the last step with the denoised sample it led to
            x = _unipc_step(x_prev, run.s[i - 1], sigma, hist[-p:], new=denoised)
        run.report(x, i, sigma, denoised)
        hist = (hist + [(-math.log(sigma), denoised)])[-order:]
        x_prev, p = x, min(order, n - i, len(hist))  # lower orders on the first and last steps
        x = _unipc_step(x, sigma, sigma_next, hist[-p:])
    return x

# %% [markdown]
# The LMS weights equal the Lagrange basis integrated numerically (what k-diffusion does with SciPy):

# %%
sig_l = sig10.double().tolist()
lagrange = [sig_l[5 - k] for k in range(4)]  # the 4 noise levels behind step 5
for j, w in enumerate(lms_coefficients(sig_l, 5, 4)):
    basis = lambda t, j=j: np.prod([(t - o) / (lagrange[j] - o) for k, o in enumerate(lagrange) if k != j], axis=0)
    assert abs(w - integral(basis, sig_l[5], sig_l[6])) < 1e-10

# %% [markdown]
# ### 3.6 The registry
#
# The pipeline and the CLI pick samplers by name, from a `SamplerRegistry` (08a): an unknown name is a
# `KeyError` and a `ValueError` that lists the known ones.

# %%
# | export
SAMPLERS = SamplerRegistry(
    euler=sample_euler, euler_ancestral=sample_euler_ancestral, heun=sample_heun, dpm_2=sample_dpm_2,
    dpm_2_ancestral=sample_dpm_2_ancestral, dpmpp_2s_ancestral=sample_dpmpp_2s_ancestral, dpmpp_2m=sample_dpmpp_2m,
    dpmpp_2m_sde=sample_dpmpp_2m_sde, dpmpp_3m_sde=sample_dpmpp_3m_sde, ddim=sample_ddim, lms=sample_lms,
    euler_ancestral_rf=sample_euler_ancestral_rf, unipc=sample_unipc,
)


def get_sampler(name: str):
    """The sampler function called `name` (see `SAMPLERS`)."""
    return SAMPLERS[name]

# %%
from tinydit.denoisers import SAMPLER_NAMES


assert tuple(SAMPLERS) == SAMPLER_NAMES  # the names 08a's Parametrisation accepts

# %%
# | export
DEFAULT_SAMPLER = "dpmpp_2m"  # second-order multistep: one model call per step, the book model's default
DEFAULT_STEPS = 20  # model evaluations per image (chapter 13's benchmark: Euler needs 6 for the same adherence)

# %% [markdown]
# ## 4. Parity with diffusers' schedulers
#
# diffusers splits a sampler into a scheduler whose `step()` the pipeline calls after each network
# call. On the tiny DiT (plus $x_\text{in}$, so that samples end at a latent-like scale) each of our
# samplers gives the scheduler's result once we match what differs by convention:
#
# * **Where the network is called.** diffusers calls it at the scheduler's integer timesteps
#   (`trailing` spacing here); `quantize=True` does the same. (At fractional $t$, diffusers'
#   `linspace` interpolates σ *linearly* in $t$ where k-diffusion and we interpolate in $\log\sigma$;
#   the two agree at integer $t$.)
# * **The start.** DPM-Solver, DDIM and UniPC work in the variance-preserving space
#   $x/\sqrt{1+\sigma^2}$ from unit-variance noise: our start $\sigma_\max n$ is theirs scaled by
#   $\sigma_\max/\sqrt{1+\sigma_\max^2}$. At $\sigma = 0$ the two spaces coincide.
# * **Noise.** Both draw from the same CPU generator in the same order; diffusers'
#   `EulerAncestralDiscreteScheduler` (and the SDE and DDIM steps) draw on the last step too, and
#   multiply that draw by $0$, which keeps the earlier draws aligned.
# * **Variants.** DDIM without `clip_sample`; DPM-Solver's third order with `solver_type="heun"`
#   (k-diffusion's warm-up step) and 20 steps (below 15, diffusers also lowers the second-to-last
#   step's order).
#
# `tests/test_samplers.py` asserts this table, and k-diffusion's formulas for every sampler it has.
# k-diffusion is not a dependency (its package pulls torchvision, which would replace the CPU torch
# wheel): the tests write its formulas out independently, from the papers, and compare with its own
# `sampling.py` only when a copy is at hand (`TINYDIT_KDIFFUSION_WHEEL`).

# %%
from diffusers import DPMSolverMultistepScheduler


def run_diffusers(sched, net_out, x, n):
    sched.set_timesteps(n)
    for t in sched.timesteps:
        x = sched.step(net_out(sched.scale_model_input(x, t), t.expand(len(x))), t, x).prev_sample
    return x


n_par = 20  # >= 15 (diffusers lowers the order near the end below 15)
sig_tr = Dq.get_sigmas(n_par, "trailing")  # (21,)
x_ve = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * sig_tr[0]
# The random DiT plus x_in (the right noise prediction for data at 0): samples end at a latent-like
# scale (|x| ~ 2, not ~40), so that 1e-5 is a meaningful tolerance in float32.
eps_net = lambda x, t: net(x, t) + torch.cat([x, torch.zeros_like(x)], 1)  # (B, 8, H, W), learn_sigma layout
sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    timestep_spacing="trailing", final_sigmas_type="zero")
ref = run_diffusers(sched, lambda x, t: eps_net(x, t)[:, :4], x_ve / (1 + sig_tr[0] ** 2) ** 0.5, n_par)
ours = sample_dpmpp_2m(DiscreteDenoiser(eps_net, ac_sd, quantize=True, learn_sigma=True), x_ve, sig_tr, disable=True)
print(f"DPMSolverMultistepScheduler (dpmsolver++, 2) vs sample_dpmpp_2m: max |difference| {(ours - ref).abs().max():.1e}")
assert (ours - ref).abs().max() <= 1e-5  # measured 6.0e-7

# %% [markdown]
# The same comparison for every pair, in float32 on the tiny DiT with 20 trailing steps
# (`tests/test_samplers.py` asserts each to $10^{-5}$):
#
# | reference (diffusers) | sampler | max error |
# |---|---|---|
# | `EulerDiscreteScheduler` (ε and v) | `sample_euler` | 0 |
# | `EulerAncestralDiscreteScheduler` | `sample_euler_ancestral` | 3.0e-7 |
# | `HeunDiscreteScheduler` | `sample_heun` | 0 |
# | `DPMSolverMultistepScheduler` dpmsolver++, 2, midpoint | `sample_dpmpp_2m` | 6.0e-7 |
# | `DPMSolverMultistepScheduler` sde-dpmsolver++, 2 | `sample_dpmpp_2m_sde` | 7.2e-7 |
# | `DPMSolverMultistepScheduler` dpmsolver++, 3, heun | `sample_dpmpp_3m_sde(eta=0, kdiffusion_compat=True)` | 9.5e-7 |
# | `DDIMScheduler` η = 0 and η = 1 | `sample_ddim` | 6.0e-7 |
# | `UniPCMultistepScheduler` bh2, order 2 / 3 | `sample_unipc` | 7.2e-7 / 8.3e-7 |
# | `FlowMatchEulerDiscreteScheduler` shift 3 / Flux μ | `sample_euler` + `FlowDenoiser` | 2.4e-7 / 1.2e-7 |

# %% [markdown]
# ## 5. Measured order of accuracy
#
# For Gaussian data $x_0 \sim \mathcal N(\mu, s^2 I)$ both the denoiser and the ODE's solution are
# known exactly: $D(x, \sigma) = \mu + \frac{s^2}{s^2+\sigma^2}(x - \mu)$ and
# $x(\sigma) = \mu + (x(\sigma_\max) - \mu)\sqrt{s^2+\sigma^2}/\sqrt{s^2+\sigma_\max^2}$. So we can run every
# deterministic sampler with more and more steps (Karras schedule, $\sigma$ from 80 to 0.002) and
# watch its error fall. A method of order $p$ has error $\propto \mathrm{NFE}^{-p}$: a straight line
# of slope $-p$ on log–log axes. We measure the error at $\sigma_\min$, just before the final jump
# to $\sigma = 0$: that jump is the same denoising call for all samplers, not an ODE step.
# (Ancestral and SDE samplers do not follow one ODE solution; they are excluded, or run with
# $\eta = 0$.)

# %%
gauss = GaussianDenoiser(mean=0.3, std=1.0)
x_T = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
ODE_RUNS = {"euler": {}, "heun": {}, "dpm_2": {}, "lms": {}, "dpmpp_2s_ancestral": {"eta": 0.0},
            "dpmpp_2m": {}, "dpmpp_3m_sde": {"eta": 0.0}, "dpmpp_3m_sde (k-diffusion)": {"eta": 0.0, "kdiffusion_compat": True},
            "unipc": {}, "unipc (order 3)": {"order": 3}}
STEPS = [8, 12, 16, 24, 32, 48, 64, 96, 128]  # 90 runs on 8 x 64 numbers: well under a second


def ode_error(name, options, n):
    """(NFE, max error at sigma_min) of sampler `name` with n Karras steps on the Gaussian problem."""
    sig = schedules.karras_sigmas(n, 0.002, 80.0).double()
    calls, last = [0], {}
    counted = lambda x, s: (calls.__setitem__(0, calls[0] + 1), gauss(x, s))[1]
    SAMPLERS[name.split(" ")[0]](counted, x_T, sig, callback=last.update, disable=True, **options)
    exact = gauss.ode_solution(x_T, float(sig[0]), float(sig[-2]))
    return calls[0], (last["x"] - exact).abs().max().item()  # last["x"]: the state at sigma_min


t0 = time.time()
orders = {}
fig, ax = plt.subplots(figsize=(7.5, 4.6))
for name, options in ODE_RUNS.items():
    nfe, err = map(np.array, zip(*[ode_error(name, options, n) for n in STEPS]))
    orders[name] = -np.polyfit(np.log(nfe[-4:]), np.log(err[-4:]), 1)[0]  # slope over the 4 largest NFE
    ax.loglog(nfe, err, "o-", ms=3, label=f"{name}: {orders[name]:.2f}")
ax.set(xlabel="denoiser calls (NFE)", ylabel=r"max error at $\sigma_{min}$", title="error vs NFE (legend: fitted order)")
ax.legend(fontsize=7)
plt.show()
print(f"{len(ODE_RUNS) * len(STEPS)} runs in {time.time() - t0:.1f} s;", {k: round(v, 2) for k, v in orders.items()})

# %% [markdown]
# The slopes are the textbook orders: Euler 1; Heun, DPM-2, DPM++ 2S and 2M 2; UniPC with $p = 2$
# reaches 3 through its corrector ($p = 3$: 4); LMS tends to 4. DPM++ 3M with the doubled second
# difference is third order; k-diffusion's (and diffusers') version is not: its slope is below 2
# and its error curve wobbles, the signature of a wrong higher-order term.

# %%
expected = {"euler": 1, "heun": 2, "dpm_2": 2, "dpmpp_2s_ancestral": 2, "dpmpp_2m": 2, "dpmpp_3m_sde": 3,
            "unipc": 3, "unipc (order 3)": 4}
for name, p in expected.items():  # measured within 0.1 of p (0.18 for 2M); margin 0.3 for other platforms
    assert abs(orders[name] - p) < 0.3, (name, orders[name])
assert orders["lms"] > 3.4 and orders["dpmpp_3m_sde (k-diffusion)"] < 2.2  # measured 3.74 and 1.68

# %% [markdown]
# ## 6. The ideal denoiser of a finite dataset
#
# Chapter 08a's `IdealDenoiser` is the perfect model of a finite training set: it can only
# *memorise*, so every sampler run on it must land on a training image. A clear test, and a way to
# watch what samplers do. We take the book VAE's latents of the shapes dataset (chapters 01–02).

# %%
n_data = 64 if FAST else 512
book_vae = vae.load_book_vae()
ds = data.ShapesDataset(n_data)
with torch.no_grad():
    latents = book_vae.to_latent(torch.stack([ds[i][0] for i in range(n_data)]))  # (N, 4, 8, 8)
decode = lambda z: book_vae.from_latent(z).clamp(-1, 1)  # (B, 3, 32, 32)
ideal = IdealDenoiser(latents)
sig_ideal = schedules.karras_sigmas(12, 0.01, 80.0)
seeds = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * sig_ideal[0]  # six starts
shown = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
finals = {name: SAMPLERS[name](ideal, seeds, sig_ideal, generator=torch.Generator().manual_seed(8), disable=True)
          for name in shown}
for name, z in finals.items():
    dist, idx = torch.cdist(z.flatten(1), latents.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(1)
    print(f"{name:16s} lands on training latents {idx.tolist()}, at distance <= {dist.max():.1e}")
    assert float(dist.max()) < 1e-3  # measured < 1e-6, nearest-neighbour spacing ~5: the last step snaps
with torch.no_grad():
    grid = data.image_grid(decode(torch.cat(list(finals.values()))), cols=6, scale=2)
print("rows:", ", ".join(shown), "(12 steps, the same six starts)")
grid

# %% [markdown]
# **Trajectories.** The callback records each step's prediction $\hat x_0 = D(x_i, \sigma_i)$. Below,
# projected onto the two main directions of the training latents: Euler's predictions move smoothly
# from the dataset's mean to one training point; the ancestral sampler's fresh noise makes the
# prediction hop between candidates before it settles, often on a different image. Then the
# decoded predictions of one start, step by step.

# %%
_, _, V = torch.pca_lowrank(latents.flatten(1), q=2)  # (F, 2): top-2 principal directions
proj = lambda z: ((z.flatten(1) - latents.flatten(1).mean(0)) @ V).numpy()  # (B, 2)
paths = {}
for name in ("euler", "euler_ancestral"):
    steps = []
    SAMPLERS[name](ideal, seeds[:3], sig_ideal, callback=lambda info, steps=steps: steps.append(info["denoised"]),
                   generator=torch.Generator().manual_seed(8), disable=True)
    paths[name] = torch.stack(steps)  # (steps, 3, 4, 8, 8)
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
for ax, (name, path) in zip(axes, paths.items()):
    ax.scatter(*proj(latents).T, s=8, c="lightgray", label="training latents")
    for k in range(path.shape[1]):
        ax.plot(*proj(path[:, k]).T, "o-", ms=3, label=f"start {k}")
    ax.set(title=f"{name}: x0 predictions per step", xlabel="PC 1", ylabel="PC 2")
axes[0].legend(fontsize=7)
plt.show()
with torch.no_grad():
    rows = decode(torch.cat([paths["euler"][:, 0], paths["euler_ancestral"][:, 0]]))  # (2 * steps, 3, 32, 32)
print("x0 prediction at each step for start 0; top: euler, bottom: euler_ancestral")
data.image_grid(rows, cols=len(sig_ideal) - 1, scale=2)

# %% [markdown]
# **Try it.** Pick a sampler, the number of steps and η (for the samplers that have one): the grid
# shows eight starts. Few steps with a deterministic sampler give blends of training images (the
# prediction has not snapped yet); ancestral samplers pick *different* training images as η grows.

# %%
import ipywidgets as widgets


widget_starts = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(9))


def sample_grid(sampler="euler_ancestral", steps=8, eta=1.0):
    fn, sig = SAMPLERS[sampler], schedules.karras_sigmas(steps, 0.01, 80.0)
    options = {"eta": eta} if "eta" in inspect.signature(fn).parameters else {}
    z = fn(ideal, widget_starts * sig[0], sig, generator=torch.Generator().manual_seed(0), disable=True, **options)
    with torch.no_grad():
        return data.image_grid(decode(z), cols=8, scale=3)


names = [n for n in SAMPLERS if n != "euler_ancestral_rf"]  # the RF sampler needs a flow model (sigma <= 1)
widgets.interact(sample_grid, sampler=widgets.Dropdown(options=names, value="euler_ancestral"),
                 steps=widgets.IntSlider(value=8, min=1, max=40), eta=widgets.FloatSlider(value=1.0, min=0, max=1, step=0.1))

# %% [markdown]
# ### Splitting a schedule
#
# A schedule that ends above 0 returns the partly denoised sample (08a), so ComfyUI's `SplitSigmas`
# can hand the high-noise steps to one sampler and the rest to another. For one-step methods the two
# halves are exactly the whole run (ancestral ones continue with the same generator); multistep ones
# (DPM++ 2M/3M, LMS, UniPC) restart their history at the split, as in k-diffusion.

# %%
k = 4
for name in ("euler", "heun", "dpm_2", "euler_ancestral", "dpmpp_2s_ancestral"):
    g = torch.Generator().manual_seed(0)
    whole = SAMPLERS[name](gauss, x_T, sig10.double(), disable=True, generator=torch.Generator().manual_seed(0))
    half = SAMPLERS[name](gauss, x_T, sig10[: k + 1].double(), disable=True, generator=g)  # stops at sigma_k > 0
    both = SAMPLERS[name](gauss, half, sig10[k:].double(), disable=True, generator=g)
    assert torch.equal(both, whole), name  # bit for bit
print(f"split at sigma_{k} = {float(sig10[k]):.3f}: five one-step samplers give the whole run, bit for bit")

# %% [markdown]
# ## 7. Bad input: every sampler checks its inputs once, before the first denoiser call

# %%
expect_error(lambda: sample_dpmpp_2m(gauss, torch.zeros(1, 3), torch.tensor([3.0, 1.0, 2.0, 0.0])),
             r"sigmas: expected strictly decreasing values, got sigmas\[1\] = 1.0")  # 08a's check_sigmas
nan_late = lambda x, s: gauss(x, s) * (float("nan") if s[0] <= sig10[3] else 1.0)  # NaN from the 4th step on
expect_error(lambda: sample_euler(nan_late, x_T[:1], sig10.double(), disable=True), r"NaN or inf at step 4 of 10")
expect_error(lambda: get_sampler("dpmpp_2m_karras"), r"unknown name 'dpmpp_2m_karras'; expected one of ddim, dpm_2", KeyError)
expect_error(lambda: sample_euler_ancestral(gauss, x_T[:1], sig10, eta=-1), r"^eta: expected a number >= 0")
expect_error(lambda: sample_euler(gauss, x_T[:1].long(), sig10), r"^x: expected a floating-point tensor", TypeError)

# %% [markdown]
# ## Summary
#
# * **Samplers** (`tinydit.samplers`, `SAMPLERS`): 13 samplers with k-diffusion's signature; inputs
#   checked once; tqdm bars; a NaN guard naming the step; every noise draw from the CPU generator.
# * **Parity.** With the same σ's and noise, every sampler k-diffusion has matches its formulas
#   (and its own `sampling.py` where available) to $10^{-14}$ in float64, and every diffusers
#   scheduler of §4's table to $10^{-6}$ in float32.
# * **The ideal denoiser** of 64 book-VAE latents: every sampler lands on a training latent (to
#   $10^{-6}$); ancestral noise makes the prediction hop between candidates on the way.
# * **Benchmark** (`python benchmarks/samplers.py`): to reach $W_2 \le 0.02$ on Gaussian data,
#   DPM++ 2M, LMS and UniPC need 20–24 denoiser calls, Euler 80; the loop costs 0.09–0.47 ms per call
#   (0.84–3.0× diffusers' `step()`), nothing next to a real network's call.
#
# ## Exercises
#
# 1. Show that `sample_euler` on a `FlowDenoiser` is exactly the rectified-flow Euler step
#    $x \leftarrow x + (\sigma_{i+1} - \sigma_i)\,\hat v$. Which samplers of this chapter would be wrong
#    on a flow model, and why is DPM++ 2M not among them?
# 2. The DPM++ 3M fix doubles the second divided difference. Derive the factor: write $D(\lambda)$ as
#    a parabola through three points and compare its second derivative with `d2`.
