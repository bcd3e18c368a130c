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
# # 08a · Denoisers: one interface for every model, and the schedules it walks
#
# A trained diffusion network predicts *something* about the clean image from a noisy one (the
# noise ε, a velocity v, the image itself, a flow velocity); a **sampler** turns those predictions
# into an image by walking from pure noise down to noise level 0. Nothing in the package can do that
# yet. We build the samplers *before* any network is trained (chapter 09), so that we can test them
# where the right answer is known. Chapter 08 takes two sittings. This one, 08a, wraps every
# parametrisation into one **denoiser** $D(x, \sigma) \approx x_0$ (§1), gives the **schedules** and
# one object for a model's parametrisation (§2), and two denoisers whose answers are known (§3).
# It exports `tinydit.denoisers`. Chapter 08b builds thirteen **samplers** on this interface, from
# Euler to DPM-Solver++ and UniPC, and checks them against diffusers and k-diffusion.

# %%
# | default_exp denoisers
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from tinydit import dit, schedules
from tinydit.validation import expect_error  # the chapters' way to show an expected error


torch.set_num_threads(1)  # this chapter's tensors are tiny: one thread beats two contending for them



# %% [markdown]
# ## 1. One interface: the denoiser
#
# Karras et al. (2022, "Elucidating the design space…") write every diffusion model the same way:
# a noisy sample is $x = x_0 + \sigma n$ with $n \sim \mathcal N(0, I)$, and the model is a
# **denoiser** $D(x, \sigma) \approx \mathbb E[x_0 \mid x]$. Then the score is
# $\nabla_x \log p_\sigma(x) = (D(x,\sigma) - x)/\sigma^2$ (Tweedie), and the noise can be removed by
# following the **probability-flow ODE**
#
# $$\frac{dx}{d\sigma} = \frac{x - D(x, \sigma)}{\sigma}$$
#
# from $\sigma_\max$ down to $0$. A sampler needs nothing else, so each way of training a network
# becomes one small wrapper (chapter 04 gave us $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$ and
# $x = x_t / \sqrt{\bar\alpha_t}$):
#
# | trained as | used by | network input | predicts | $D(x, \sigma)$ |
# |---|---|---|---|---|
# | DDPM, ε | SD 1.x, SDXL, DiT, PixArt | $x/\sqrt{\sigma^2+1}$, $t(\sigma)$ | $\varepsilon$ | $x - \sigma\hat\varepsilon$ |
# | DDPM, v | SD 2.x-v | same | $v = \bar\alpha^{1/2}\varepsilon - (1-\bar\alpha)^{1/2} x_0$ | $\dfrac{x}{\sigma^2+1} - \dfrac{\sigma\,\hat v}{\sqrt{\sigma^2+1}}$ |
# | DDPM, $x_0$ | | same | $x_0$ | $\hat x_0$ |
# | rectified flow | SD3, Flux | $x$, $1000\,\sigma$ | $v = \varepsilon - x_0$ | $x - \sigma\hat v$ |
#
# A discrete model was trained at integer $t$ only; $t(\sigma)$ interpolates linearly in
# $\log\sigma$ between neighbouring trained steps (k-diffusion's `DiscreteSchedule`), or rounds to
# the nearest (`quantize=True`). DiT and PixArt predict a variance as well (`learn_sigma`): extra
# channels that a sampler in σ space does not use.
#
# **Flow models use σ = t directly.** With $x = (1-t)x_0 + t\varepsilon$, the network's velocity is
# $\mathbb E[\varepsilon - x_0 \mid x] = (x - D)/t$, which is the same ODE with $\sigma = t$. So every
# *deterministic* sampler runs a flow model unchanged (Euler reproduces SD3's scheduler exactly);
# only samplers that add noise must know that the signal shrinks as $1 - \sigma$ (§3.2).
#
# The idea, for an ε-model, in a few lines:

# %%
def lesson_eps_denoiser(net, alphas_cumprod):
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().numpy()  # (T,), increasing in t

    def D(x, sigma):  # x (B, C, H, W), sigma (B,)
        t = torch.from_numpy(np.interp(sigma.log().numpy(), log_sigmas, np.arange(len(log_sigmas)))).float()  # (B,)
        s = sigma[:, None, None, None]  # (B, 1, 1, 1)
        eps = net(x / (s**2 + 1) ** 0.5, t)[:, : x.shape[1]]  # (B, C, H, W): drop the variance channels
        return x - s * eps

    return D


def tiny_dit(learn_sigma=True, seed=0):
    """A random 2-block DiT. DiT starts as the identity (adaLN-Zero): random weights everywhere make
    its output depend on x and t, so that wrappers and samplers have something to get wrong."""
    torch.manual_seed(seed)
    net = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                num_heads=2, num_classes=4, learn_sigma=learn_sigma))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net.eval().requires_grad_(False)


net = tiny_dit()
ac_sd = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))  # (1000,): SD 1.x's schedule
x_tiny, sigma_tiny = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 7.0])
lesson_D = lesson_eps_denoiser(net, ac_sd)
assert lesson_D(x_tiny, sigma_tiny).shape == (2, 4, 8, 8)

# %% [markdown]
# The production wrappers add the v / $x_0$ / flow parametrisations, quantisation, `learn_sigma`
# taken from the model's config, conditioning passed through (`**cond`), and schedules (§2).
# They use chapter 04's `sigma_to_t` rather than a second copy of it.

# %%
# | export denoisers
"""Denoisers: every model as D(x, sigma, **cond) -> x0 (Karras et al. 2022), the interface of
tinydit's samplers: DDPM epsilon / v / x0 models, rectified-flow velocity models (SD3, Flux), their
sampling schedules, and two denoisers whose answers are known (Gaussian data, a finite dataset)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from tqdm.auto import trange

from tinydit.flow import flow_sigmas
from tinydit.schedules import (
    DEFAULT_BETA_RANGES,
    SCHEDULE_ALIASES,
    SCHEDULES,
    alphas_cumprod,
    discrete_sigmas,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from tinydit.validation import check_choice, check_float, check_int, check_tensor


PREDICTIONS = ("epsilon", "v_prediction", "sample")
DISCRETE_SCHEDULES = ("karras", "exponential", "linspace", "leading", "trailing")


def _column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma, a scalar or (B,), as (B, 1, ..., 1) in x's dtype and device."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))

# %%
# | export denoisers
def _learn_sigma(model, learn_sigma: bool | None) -> bool:
    """learn_sigma as given, or read from the model's config (DiT, PixArt); False if it has none."""
    if learn_sigma is None:
        return bool(getattr(getattr(model, "config", None), "learn_sigma", False))
    return bool(learn_sigma)

# %%
# | export denoisers
def _prediction(out: torch.Tensor, x: torch.Tensor, learn_sigma: bool) -> torch.Tensor:
    """The prediction channels of a network output; learn_sigma models append as many variance channels."""
    if learn_sigma and out.shape[1] != 2 * x.shape[1]:
        raise ValueError(f"model: learn_sigma=True expects {2 * x.shape[1]} output channels (prediction + "
                         f"variance), got {out.shape[1]}")
    return out[:, : x.shape[1]] if learn_sigma else out

# %%
# | export denoisers
def _check_table(alphas_cumprod) -> torch.Tensor:
    """A (T,) alpha_bar table in [0, 1] -> float64, CPU; zero terminal SNR's 0 becomes 2^-24 (diffusers)."""
    ac = check_tensor("alphas_cumprod", alphas_cumprod, ndim=1, floating=True, finite=True)
    if len(ac) < 2 or bool(((ac < 0) | (ac > 1)).any()):
        raise ValueError(f"alphas_cumprod: expected T >= 2 values in [0, 1], got {ac.tolist()[:8]} ({len(ac)} values)")
    return ac.detach().double().cpu().clamp(min=2.0**-24)

# %%
# | export denoisers
class DiscreteDenoiser(nn.Module):
    """A network trained on a discrete DDPM schedule as a denoiser D(x, sigma, **cond) -> x0.
    `model(x / sqrt(sigma^2 + 1), t(sigma), **cond)` predicts `prediction` ("epsilon", "v_prediction",
    "sample"); t(sigma) interpolates in log sigma (`quantize=True`: the nearest trained step);
    `learn_sigma` (default: the model's config) drops the variance channels."""

    def __init__(self, model, alphas_cumprod: torch.Tensor, prediction: str = "epsilon",
                 quantize: bool = False, learn_sigma: bool | None = None):
        super().__init__()
        self.model, self.alphas_cumprod = model, _check_table(alphas_cumprod)  # (T,) float64, CPU
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.quantize, self.learn_sigma = bool(quantize), _learn_sigma(model, learn_sigma)
        table = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,)
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep(s) of noise level(s) `sigma`, on sigma's device."""
        t = sigma_to_t(sigma.detach().cpu(), self.alphas_cumprod)  # chapter 04: log-sigma interpolation
        return (t.round() if self.quantize else t).to(sigma.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = _column(sigma, x)  # (B, 1, 1, 1)
        t = self.sigma_to_t(torch.as_tensor(sigma, device=x.device))  # (B,)
        out = _prediction(self.model(x / (s**2 + 1) ** 0.5, t, **cond), x, self.learn_sigma)  # (B, C, H, W)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "v_prediction":
            return x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out
        return out

    def get_sigmas(self, n: int, schedule: str = "karras", rho: float = 7.0, steps_offset: int = 0) -> torch.Tensor:
        """n+1 noise levels ending in 0: "karras" (rho), "exponential" (both between the table's ends),
        or the timestep spacings "linspace", "leading", "trailing" of diffusers (chapter 04)."""
        check_choice("schedule", schedule, DISCRETE_SCHEDULES)
        if schedule == "karras":
            return karras_sigmas(n, self.sigma_min, self.sigma_max, rho)
        if schedule == "exponential":
            return exponential_sigmas(n, self.sigma_min, self.sigma_max)
        return discrete_sigmas(self.alphas_cumprod.float(), n, spacing=schedule, steps_offset=steps_offset)[0]

# %%
# | export denoisers
class FlowDenoiser(nn.Module):
    """A rectified-flow model (SD3, Flux) as a denoiser: x = (1 - sigma) x0 + sigma noise, sigma = t;
    `model(x, time_scale * sigma, **cond)` predicts v = noise - x0, so D = x - sigma v."""

    def __init__(self, model, time_scale: float = 1000.0, learn_sigma: bool | None = None):
        super().__init__()
        self.model, self.learn_sigma = model, _learn_sigma(model, learn_sigma)
        self.time_scale = check_float("time_scale", time_scale, minimum=0, min_inclusive=False)
        self.sigma_min, self.sigma_max = 0.0, 1.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        s = _column(sigma, x)  # (B, 1, 1, 1)
        t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device) * self.time_scale  # (B,)
        return x - s * _prediction(self.model(x, t, **cond), x, self.learn_sigma)

    def get_sigmas(self, n: int, shift: float = 1.0, mu: float | None = None,
                   num_train_timesteps: int = 1000) -> torch.Tensor:
        """n+1 flow times from 1 to 0, shifted as SD3 (`shift`) or Flux (`mu`, see `flux_mu`)."""
        return flow_sigmas(n, shift=shift, num_train_timesteps=num_train_timesteps, mu=mu)

# %% [markdown]
# The two agree, and a network that knows the answer checks every parametrisation: given $x_0$
# and $\varepsilon$, an "oracle" returns the exact target its parametrisation asks for, and every
# wrapper must give back $x_0$ itself.

# %%
D_tiny = DiscreteDenoiser(net, ac_sd)
torch.testing.assert_close(D_tiny(x_tiny, sigma_tiny), lesson_D(x_tiny, sigma_tiny), rtol=1e-5, atol=1e-5)
x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
s = sigma_tiny[:, None, None, None]
a, s_vp = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5  # the same noise level in variance-preserving form
for pred, target in {"epsilon": eps, "v_prediction": a * eps - s_vp * x0, "sample": x0}.items():
    oracle = lambda x_in, t, target=target: torch.cat([target, torch.randn_like(target)], 1)  # + variance channels
    torch.testing.assert_close(DiscreteDenoiser(oracle, ac_sd, pred, learn_sigma=True)(x0 + s * eps, sigma_tiny), x0)
t_flow = torch.tensor([0.2, 0.9])
flow_x = (1 - t_flow[:, None, None, None]) * x0 + t_flow[:, None, None, None] * eps
torch.testing.assert_close(FlowDenoiser(lambda x, t: eps - x0)(flow_x, t_flow), x0)
print("model timesteps for sigma = 0.3, 7:", D_tiny.sigma_to_t(sigma_tiny).tolist(),
      "quantized:", DiscreteDenoiser(net, ac_sd, quantize=True).sigma_to_t(sigma_tiny).tolist())

# %% [markdown]
# ## 2. Sigma schedules: where the steps go
#
# A sampler takes a descending list of $n+1$ noise levels ending in $0$. Chapter 04 built most of
# them: Karras et al.'s $\rho$-schedule (`karras_sigmas`, uniform in $\sigma^{1/\rho}$), diffusers'
# `linspace` / `leading` / `trailing` timestep spacings (`discrete_sigmas`), and the flow schedule
# with SD3's shift (`flow_sigmas`). Two more: the **exponential** schedule, uniform in $\log\sigma$
# (every step the same length $h$ for the exponential integrators of §3.4), and Flux's
# **resolution-dependent** shift $\mu$, linear in the number of image tokens (more tokens, more time
# at high noise).

# %%
# | export denoisers
def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n noise levels evenly spaced in log sigma from sigma_max to sigma_min, then 0 -> float32 (n+1,)."""
    n = check_int("n", n, minimum=1)
    lo = check_float("sigma_min", sigma_min, minimum=0, min_inclusive=False)
    hi = check_float("sigma_max", sigma_max, minimum=lo, min_inclusive=False)
    sigmas = torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp()  # (n,)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (n+1,)

# %%
# | export denoisers
def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's shift mu for an image of `image_seq_len` tokens, linear from base_shift at base_seq_len
    to max_shift at max_seq_len (shift = e^mu); pass it to `FlowDenoiser.get_sigmas(n, mu=...)`."""
    n = check_int("image_seq_len", image_seq_len, minimum=1)
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (n - base_seq_len)

# %%
n_steps = 10
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name in DISCRETE_SCHEDULES:
    sig = D_tiny.get_sigmas(n_steps, name)
    assert len(sig) == n_steps + 1 and sig[-1] == 0 and bool((sig[:-1].diff() < 0).all())
    ax1.plot(sig[:-1].log().numpy(), "o-", ms=3, label=name)
ax1.set(title=f"SD 1.x table, {n_steps} steps", xlabel="step", ylabel=r"$\log\sigma$")
flow = FlowDenoiser(net)
for label, sig in {"shift 1": flow.get_sigmas(n_steps), "SD3: shift 3": flow.get_sigmas(n_steps, 3.0),
                   f"Flux 64² tokens: μ = {flux_mu(4096):.2f}": flow.get_sigmas(n_steps, mu=flux_mu(4096))}.items():
    ax2.plot(sig.numpy(), "o-", ms=3, label=label)
ax2.set(title="rectified flow", xlabel="step", ylabel=r"$\sigma = t$")
ax1.legend(fontsize=8), ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 2.1 One object for a model's parametrisation
#
# Three things must agree for a model to be sampled right: what the network was *trained* to predict
# (the target and the noised input), how a sampler *asks* it ($D(x, \sigma)$), and how the files on
# disk *describe* it (diffusers' `scheduler_config.json`). k-diffusion keeps the first two in one
# wrapper; we keep all three in one dataclass, `Parametrisation`, so that training (chapter 09),
# the pipeline (chapter 13) and a saved folder can never disagree. Its methods are the three views:
# `noised` (training), `denoiser` + `sigmas` (sampling), `from_scheduler_config` / `scheduler_config`
# (files). Which of diffusers' scheduler classes a folder names also says which sampler to run.

# %%
# | export denoisers
# diffusers scheduler class <-> our sampler; the parity tests of §4 pair them
SCHEDULER_SAMPLERS = {
    "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral", "HeunDiscreteScheduler": "heun",
    "DDIMScheduler": "ddim", "UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler",
}
SAMPLER_SCHEDULERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
                      "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
                      "heun": "HeunDiscreteScheduler", "ddim": "DDIMScheduler", "unipc": "UniPCMultistepScheduler"}
MULTISTEP_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
# the names of chapter 08b's samplers (its registry `SAMPLERS` is checked to hold exactly these)
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
                 "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "lms", "euler_ancestral_rf", "unipc")
FLOW_SAMPLERS = ("euler_ancestral_rf",)  # their noise step assumes x = (1 - sigma) x0 + sigma n: flow models only
TARGETS = (*PREDICTIONS, "flow")
BETA_SCHEDULES = SCHEDULES + tuple(SCHEDULE_ALIASES)


def _check_noised_inputs(x0, noise, u, normal) -> None:
    """x0 finite floats (B, C, H, W), noise of the same shape, u in [0, 1] and normal both (B,)."""
    check_tensor("x0", x0, ndim=4, floating=True, finite=True)
    check_tensor("noise", noise, floating=True)
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    for name, draws in (("u", u), ("normal", normal)):
        check_tensor(name, draws, floating=True)
        if tuple(draws.shape) != (len(x0),):
            raise ValueError(f"{name}: expected one draw per sample, shape ({len(x0)},), got {tuple(draws.shape)}")
    if not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError(f"u: expected uniform draws in [0, 1], got values from {float(u.min())} to {float(u.max())}")

# %%
# | export denoisers
def scheduler_sampler(d: dict) -> str:
    """The sampler that runs like the diffusers scheduler a scheduler_config.json names."""
    name = d.get("_class_name") if isinstance(d, dict) else None
    if name not in SCHEDULER_SAMPLERS:
        raise ValueError(f"scheduler: {name!r} has no tinydit counterpart; supported: {sorted(SCHEDULER_SAMPLERS)}")
    sde = name == "DPMSolverMultistepScheduler" and "sde" in d.get("algorithm_type", "dpmsolver++")
    return "dpmpp_2m_sde" if sde else SCHEDULER_SAMPLERS[name]

# %%
# | export denoisers
@dataclass
class Parametrisation:
    """What a network predicts from a noised latent and on which noise schedule: the training target,
    the sampling denoiser and the diffusers scheduler config, in one object."""

    prediction: str = "v_prediction"  # "epsilon", "v_prediction", "sample" (DDPM betas) or "flow" (rectified flow)
    beta_schedule: str = "linear"  # training betas (DiT, PixArt and the book model: linear)
    beta_start: float | None = None  # None: the schedule's own range (linear 1e-4 .. 0.02)
    beta_end: float | None = None
    num_train_timesteps: int = 1000  # T: the model's time input runs over [0, T)
    zero_terminal_snr: bool = False  # betas rescaled to SNR 0 at t = T (Lin et al. 2023)
    shift: float = 1.0  # flow models: SD3's time shift of the sampling schedule
    quantize: bool = True  # call the model at integer timesteps, as diffusers' discrete schedulers do
    sigma_schedule: str = "karras"  # "karras", "exponential", or diffusers' "linspace" / "leading" / "trailing"
    steps_offset: int = 0  # diffusers' steps_offset (SD 1.x: 1), for "leading" spacing
    scheduler: str = "DPMSolverMultistepScheduler"  # the diffusers class read: multistep ones space "linspace" their own way

    def __post_init__(self):
        check_choice("prediction", self.prediction, TARGETS)
        key = SCHEDULE_ALIASES.get(self.beta_schedule, check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES))
        if key != "cosine":  # a linear-type schedule: its range, defaults filled in (the cosine one has none)
            lo, hi = DEFAULT_BETA_RANGES[key]
            self.beta_start = lo if self.beta_start is None else check_float("beta_start", self.beta_start)
            self.beta_end = hi if self.beta_end is None else check_float("beta_end", self.beta_end)
        check_choice("sigma_schedule", self.sigma_schedule, DISCRETE_SCHEDULES)
        check_int("num_train_timesteps", self.num_train_timesteps, minimum=2)
        check_float("shift", self.shift, minimum=0, min_inclusive=False)
        check_int("steps_offset", self.steps_offset, minimum=0)
        for name in ("zero_terminal_snr", "quantize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")

        self.__dict__.pop("alphas_cumprod", None)  # re-validated after a field changed: recompute the table

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 alpha_bar of the training betas (flow models: unused)."""
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        return alphas_cumprod(rescale_zero_terminal_snr(betas) if self.zero_terminal_snr else betas).double()

# %%
# | export denoisers
@add_to_class(Parametrisation)
def noised(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, normal: torch.Tensor):
    """Training: (x_t, model time, target) for clean x0 (B, C, H, W), noise like x0, and per-sample
    draws u ~ U(0, 1) (the DDPM step) and normal ~ N(0, 1) (flow's logit-normal time), both (B,)."""
    _check_noised_inputs(x0, noise, u, normal)
    if self.prediction == "flow":
        t = torch.sigmoid(normal).to(x0.dtype)  # (B,) logit-normal (Esser et al. 2024)
        tb = t[:, None, None, None]
        return (1 - tb) * x0 + tb * noise, t * self.num_train_timesteps, noise - x0
    T = self.num_train_timesteps
    step = (u * T).long().clamp(max=T - 1)  # (B,) uniform over the T trained steps
    ab = self.alphas_cumprod[step.cpu()].to(x0)  # (B,)
    a, s = ab.sqrt()[:, None, None, None], (1 - ab).sqrt()[:, None, None, None]
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[self.prediction]
    return a * x0 + s * noise, step, target  # q(x_t | x0); v = a eps - s x0

# %%
# | export denoisers
@add_to_class(Parametrisation)
def denoiser(self, model: nn.Module) -> nn.Module:
    """Sampling: D(x, sigma, **cond) -> x0 around the network."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected the network, an nn.Module, got {type(model).__name__}")
    if self.prediction == "flow":
        return FlowDenoiser(model, time_scale=self.num_train_timesteps)
    return DiscreteDenoiser(model, self.alphas_cumprod, prediction=self.prediction, quantize=self.quantize)

# %%
# | export denoisers
@add_to_class(Parametrisation)
def sigmas(self, denoiser: nn.Module, steps: int) -> torch.Tensor:
    """`steps` + 1 noise levels of `denoiser` (this object's), from the first down to 0."""
    steps = check_int("steps", steps, minimum=1)
    if self.prediction == "flow":
        return denoiser.get_sigmas(steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)
    if self.sigma_schedule == "linspace" and self.scheduler in MULTISTEP_SCHEDULERS:
        # DPM-Solver / UniPC space n + 1 points over [0, T - 1] and drop the last (t = 0), unlike Euler's n points
        t = torch.linspace(0, self.num_train_timesteps - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
        table = ((1 - denoiser.alphas_cumprod) / denoiser.alphas_cumprod).sqrt()  # (T,) sigma of each step
        return torch.cat([table[t.long()].float(), torch.zeros(1)])  # (steps + 1,)
    return denoiser.get_sigmas(steps, schedule=self.sigma_schedule, steps_offset=self.steps_offset)

# %%
# | export denoisers
@add_to_class(Parametrisation)
@classmethod
def from_scheduler_config(cls, d: dict) -> Parametrisation:
    """Files: our reading of a diffusers scheduler_config.json (`scheduler_sampler` gives its sampler)."""
    name, T = scheduler_sampler(d) and d["_class_name"], d.get("num_train_timesteps", 1000)
    if name.startswith("FlowMatch"):
        return cls(prediction="flow", shift=check_float("shift", d.get("shift", 1.0)), num_train_timesteps=T,
                   scheduler=name)
    if d.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise ValueError(f"scheduler: prediction_type {d['prediction_type']!r} is not one of {PREDICTIONS}")
    betas = d.get("beta_schedule", "linear")
    cosine = SCHEDULE_ALIASES.get(betas, betas) == "cosine"  # no range: diffusers' beta_start/end are ignored
    schedule = ("karras" if d.get("use_karras_sigmas") else "exponential" if d.get("use_exponential_sigmas")
                else d.get("timestep_spacing", "linspace"))
    return cls(prediction=d.get("prediction_type", "epsilon"), beta_schedule=betas,
               beta_start=None if cosine else d.get("beta_start", 0.0001),
               beta_end=None if cosine else d.get("beta_end", 0.02), num_train_timesteps=T,
               zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)), sigma_schedule=schedule,
               steps_offset=d.get("steps_offset", 0), scheduler=name)

# %%
# | export denoisers
@add_to_class(Parametrisation)
def scheduler_config(self, sampler: str = "dpmpp_2m") -> dict:
    """Files: the diffusers scheduler config that samples like this with `sampler`."""
    T = self.num_train_timesteps
    if self.prediction == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T, "shift": self.shift}
    check_choice("sampler", sampler, SAMPLER_NAMES)  # one without a diffusers class keeps the one read
    name = SAMPLER_SCHEDULERS.get(sampler, self.scheduler)
    d = {"_class_name": name, "num_train_timesteps": T, "beta_schedule": self.beta_schedule,
         "beta_start": self.beta_start or 0.0001, "beta_end": self.beta_end or 0.02,  # cosine: diffusers ignores them
         "prediction_type": self.prediction,
         "rescale_betas_zero_snr": self.zero_terminal_snr, "steps_offset": self.steps_offset}
    if self.sigma_schedule in ("karras", "exponential"):
        d[f"use_{self.sigma_schedule}_sigmas"] = True
    else:
        d["timestep_spacing"] = self.sigma_schedule
    if name == "DPMSolverMultistepScheduler":
        d.update(solver_order=2, algorithm_type="sde-dpmsolver++" if sampler == "dpmpp_2m_sde" else "dpmsolver++")
    return d

# %%
class Oracle(torch.nn.Module):  # a "network" that returns the training target it was shown
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, t):
        return self.target

x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
for p in TARGETS:
    kind = "FlowMatchEulerDiscreteScheduler" if p == "flow" else "DPMSolverMultistepScheduler"  # the class a config names
    par = Parametrisation(prediction=p, scheduler=kind)
    assert Parametrisation.from_scheduler_config(par.scheduler_config()) == par, p  # files, both ways
    x_t, t, target = par.noised(x0, noise, u=torch.tensor([0.3, 0.9]), normal=torch.tensor([-1.0, 1.0]))  # training
    if p == "flow":
        x, sigma = x_t, t / par.num_train_timesteps  # sigma = t
    else:
        ab = par.alphas_cumprod[t]  # (2,)
        sigma = ((1 - ab) / ab).sqrt().float()  # the same noise levels in Karras' variance-exploding space
        x = x_t * (sigma**2 + 1).sqrt()[:, None, None, None]
    assert torch.allclose(par.denoiser(Oracle(target))(x, sigma), x0, atol=1e-4), p  # sampling gives x0 back
Parametrisation().scheduler_config()

# %% [markdown]
# A sampler checks what it is given once, before its loop: a schedule (any strictly descending list
# of noise levels, ending at 0 for a clean sample or above it for a partly denoised one, as ComfyUI's
# `SplitSigmas` hands out) and a start. Both checks live here, beside the schedules, so every
# sampler of 08b refuses the same inputs with the same words.

# %%
# | export denoisers
def check_sigmas(sigmas) -> list[float]:
    """A strictly decreasing 1-D float tensor of n+1 >= 2 finite noise levels >= 0 -> floats. Ending
    above 0 returns the partly denoised sample, so one schedule can be split across two samplers."""
    check_tensor("sigmas", sigmas, ndim=1, floating=True, finite=True)
    if len(sigmas) < 2:
        raise ValueError(f"sigmas: expected n+1 >= 2 noise levels (n >= 1 steps; 0 steps would return the "
                         f"noise itself), got {len(sigmas)}")
    s = sigmas.tolist()  # one device sync; the loops compute their coefficients in Python floats
    if s[-1] < 0:
        raise ValueError(f"sigmas: expected noise levels >= 0, got a last value of {s[-1]}")
    for i in range(len(s) - 1):
        if not s[i] > s[i + 1]:
            raise ValueError(f"sigmas: expected strictly decreasing values, got sigmas[{i}] = {s[i]} <= "
                             f"sigmas[{i + 1}] = {s[i + 1]}")
    return s

# %%
# | export denoisers
def check_sampler_start(x, generator, extra_args, model=None, callback=None) -> None:
    """A sampler's start: a finite float batch (B, ...), a CPU generator or None, a dict of model
    arguments, a callable model and a callable (or no) callback."""
    if model is not None and not callable(model):
        raise TypeError(f"model: expected a denoiser D(x, sigma, **cond) -> x0, got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable (it receives each step's dict) or None, got {type(callback).__name__}")
    check_tensor("x", x, floating=True, finite=True)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a batch (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU generator (noise is drawn on the CPU, then moved, so that a "
                         f"seed gives the same image on every device), got one on {generator.device}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args: expected a dict of keyword arguments for the model, got {type(extra_args).__name__}")

# %%
assert check_sigmas(torch.tensor([3.0, 1.0, 0.0])) == [3.0, 1.0, 0.0]  # Python floats, for the loops
bad_runs = {
    r"sigmas: expected strictly decreasing values, got sigmas\[1\] = 1.0 <= sigmas\[2\] = 2.0": torch.tensor([3.0, 1.0, 2.0, 0.0]),
    r"sigmas: expected strictly decreasing values, got sigmas\[0\] = 1.0 <= sigmas\[1\] = 1.0": torch.tensor([1.0, 1.0, 0.0]),
    r"sigmas: expected noise levels >= 0, got a last value of -1.0": torch.tensor([2.0, 1.0, -1.0]),
    r"sigmas: expected n\+1 >= 2 noise levels .* got 1": torch.tensor([0.0]),
    r"sigmas: expected finite values, got 1 NaN": torch.tensor([float("nan"), 1.0, 0.0]),
}
for pattern, bad_sigmas in bad_runs.items():
    expect_error(lambda bad=bad_sigmas: check_sigmas(bad), pattern)

# %% [markdown]
# Every sampler of 08b also shares one loop scaffold, `SamplerRun`: inputs checked **once** at the
# start (never inside the denoiser), a tqdm bar (`disable=True` hides it), the denoiser call with a
# NaN guard that names the step, the `callback` (`{x, i, sigma, sigma_hat, denoised}` every step), and
# noise drawn from the `generator` **on the CPU** and then moved, so one seed gives one image on every
# device; and Karras et al.'s "churn" (raise σ a little with fresh noise first). The samplers then
# hold only their update rule.

# %%
# | export denoisers
def check_noise_options(eta, s_noise, max_eta: float | None = None) -> None:
    check_float("eta", eta, minimum=0, maximum=max_eta)
    check_float("s_noise", s_noise, minimum=0)

# %%
# | export denoisers
def check_churn_options(s_churn, s_tmin, s_tmax, s_noise) -> None:
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        check_float(name, value, minimum=0)
    if not (s_tmax == math.inf or check_float("s_tmax", s_tmax) >= s_tmin):
        raise ValueError(f"s_tmax: expected a number >= s_tmin = {s_tmin} (or inf), got {s_tmax}")

# %%
# | export denoisers
class SamplerRun:
    """Every sampler loop's parts: inputs checked once, progress bar, denoiser call (NaN guard: one sum,
    which any NaN or inf makes non-finite; callback), noise from the generator on the CPU, churn."""

    def __init__(self, model, x, sigmas, extra_args, callback, disable, generator):
        check_sampler_start(x, generator, extra_args, model, callback)
        self.s = check_sigmas(sigmas)  # Python floats
        self.model, self.sigmas, self.callback, self.disable = model, sigmas, callback, disable
        self.extra, self.generator, self.ones = extra_args or {}, generator, x.new_ones([x.shape[0]])

    def steps(self):
        """(i, sigma_i, sigma_{i+1}) for every step, under a progress bar."""
        return ((i, self.s[i], self.s[i + 1]) for i in trange(len(self.s) - 1, disable=self.disable))

    def denoise(self, x, sigma: float, i: int, report: bool = False) -> torch.Tensor:
        denoised = self.model(x, sigma * self.ones, **self.extra)  # (B, ...)
        if not isinstance(denoised, torch.Tensor):  # a tuple, a numpy array, a model output object
            raise TypeError(f"model: expected the denoiser to return a tensor like x, got {type(denoised).__name__}")
        if denoised.shape != x.shape:
            raise ValueError(f"model: expected a denoised sample of shape {tuple(x.shape)}, got {tuple(denoised.shape)}")
        if not bool(torch.isfinite(denoised.sum(dtype=torch.float64 if denoised.dtype == torch.float64 else torch.float32))):
            raise ValueError(f"model: the denoiser returned NaN or inf at step {i + 1} of {len(self.s) - 1} "
                             f"(sigma = {sigma:.4g})")
        if report:
            self.report(x, i, sigma, denoised)
        return denoised

    def report(self, x, i: int, sigma_hat: float, denoised) -> None:
        if self.callback is not None:
            self.callback({"x": x, "i": i, "sigma": self.sigmas[i], "sigma_hat": self.sigmas.new_tensor(sigma_hat),
                           "denoised": denoised})

    def noise(self, x) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)  # drawn on the CPU

    def churn(self, x, i, s_churn, s_tmin, s_tmax, s_noise) -> tuple[torch.Tensor, float]:
        """Raise sigma_i to sigma_hat = (1 + gamma) sigma_i with fresh noise (gamma = 0: no draw)."""
        sigma = self.s[i]
        gamma = min(s_churn / (len(self.s) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if gamma == 0:
            return x, sigma
        sigma_hat = sigma * (1 + gamma)
        return x + self.noise(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat

# %% [markdown]
# 08b's samplers are looked up by name in a `SamplerRegistry`: a dict whose unknown names are both a
# `KeyError` (it is a dict) and a `ValueError` (like every other bad argument here), listing the known names.

# %%
# | export denoisers
class UnknownSamplerError(KeyError, ValueError):
    """An unknown sampler name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])

# %%
# | export denoisers
class SamplerRegistry(dict):
    """name -> sampler function."""

    def __missing__(self, name):
        raise UnknownSamplerError(f"sampler: unknown name {name!r}; expected one of {', '.join(sorted(self))}")

# %% [markdown]
# ## 3. Two denoisers whose answers are known
#
# A sampler test needs a denoiser whose answer is known exactly. For Gaussian data
# $x_0 \sim \mathcal N(\mu, s^2 I)$ both the denoiser and the probability-flow ODE's solution are
# closed-form: $D(x, \sigma) = \mu + \frac{s^2}{s^2+\sigma^2}(x - \mu)$ and
# $x(\sigma) = \mu + (x(\sigma_\max) - \mu)\sqrt{s^2+\sigma^2}/\sqrt{s^2+\sigma_\max^2}$
# (chapter 08b measures each sampler's order of accuracy on it).

# %%
# | export denoisers
class GaussianDenoiser(nn.Module):
    """The exact denoiser of data x0 ~ N(mean, std^2 I): D = mean + std^2 / (std^2 + sigma^2) (x - mean);
    `ode_solution` solves its probability-flow ODE exactly. A sampler test whose answer is known."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.mean, self.std = check_float("mean", mean), check_float("std", std, minimum=0, min_inclusive=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std**2 / (self.std**2 + _column(sigma, x) ** 2) * (x - self.mean)

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma: float) -> torch.Tensor:
        """x(sigma) on the ODE trajectory through x_start at sigma_start."""
        return self.mean + (x_start - self.mean) * math.sqrt((self.std**2 + sigma**2) / (self.std**2 + sigma_start**2))


# %%
g = GaussianDenoiser(mean=0.3, std=1.0)
x_big = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
torch.testing.assert_close(g(x_big, torch.tensor(80.0)), 0.3 + (x_big - 0.3) / (1 + 80.0**2))  # the formula
assert torch.allclose(g.ode_solution(x_big, 80.0, 80.0), x_big)  # the ODE starts where it is started

# %% [markdown]
# Train a denoiser to perfection on $N$ latents $y_1, \dots, y_N$ and it becomes the posterior mean
# of $x = y_i + \sigma n$ with $i$ uniform:
#
# $$D(x, \sigma) = \sum_i w_i(x, \sigma)\, y_i, \qquad w = \operatorname{softmax}_i\!\Big(-\frac{\lVert x - y_i\rVert^2}{2\sigma^2}\Big).$$
#
# At large σ it is the dataset's mean; at small σ it snaps to the nearest training latent: a perfect
# model of a finite training set can only *memorise* (chapter 08b watches every sampler land on a
# training image).

# %%
# | export denoisers
class IdealDenoiser(nn.Module):
    """The exact denoiser of a finite dataset (N, ...): the posterior mean of x = y_i + sigma n with i
    uniform, D(x, sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i. Samplers land on the y_i."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        check_tensor("data", data, floating=True, finite=True)
        if data.ndim < 2 or len(data) == 0:
            raise ValueError(f"data: expected a non-empty batch (N, ...) of examples, got shape {tuple(data.shape)}")
        self.register_buffer("data", data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        flat, ys = x.flatten(1), self.data.flatten(1).to(x.dtype)  # (B, F), (N, F)
        d2 = torch.cdist(flat, ys, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (B, N)
        w = torch.softmax(-d2 / (2 * _column(sigma, flat) ** 2), dim=1)  # (B, N)
        return (w @ ys).reshape(x.shape)


# %%
y = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # five "training latents"
ideal_small = IdealDenoiser(y)
far, near = ideal_small(torch.zeros(1, 4, 8, 8), torch.tensor([1e4])), ideal_small(y[2:3] + 1e-3, torch.tensor([1e-2]))
torch.testing.assert_close(far[0], y.mean(0), atol=1e-4, rtol=0)  # large sigma: the mean
torch.testing.assert_close(near[0], y[2], atol=1e-5, rtol=0)  # small sigma: the nearest training latent

# %% [markdown]
# ## Summary
#
# * **Denoisers** (`tinydit.denoisers`): `DiscreteDenoiser` turns an ε-, v- or $x_0$-prediction
#   network on a DDPM schedule into $D(x, \sigma)$ (log-σ timestep interpolation or `quantize`,
#   `learn_sigma` channels dropped); `FlowDenoiser` does it for rectified-flow velocity models with
#   σ = t. Both give schedules: Karras, exponential, `linspace` / `leading` / `trailing`, and the
#   flow schedule with SD3's shift or Flux's `flux_mu`. `Parametrisation` holds a model's whole
#   parametrisation: training target, denoiser and diffusers' scheduler config, both ways.
# * `GaussianDenoiser` and `IdealDenoiser` are denoisers whose answers are known.
#
# ## Exercises
#
# 1. Show that a `FlowDenoiser`'s $D$ gives back the rectified-flow velocity $\hat v = (x - D)/\sigma$.
#    Why can every deterministic sampler run a flow model unchanged, with σ = t?
# 2. `IdealDenoiser` at σ = 1: how many training latents carry more than 1 % of the weight, for the
#    five random latents above and for 64 book-VAE latents? What does that say about where samplers
#    decide which image they draw?
