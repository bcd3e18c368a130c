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
# # 04a · Noise schedules: how fast the picture disappears
#
# A diffusion model learns to undo a fixed *forward process* that mixes data with Gaussian noise.
# How much noise sits at each time $t$ is the **noise schedule**: it decides which noise levels the
# model practises on, and which ones a sampler can reach. Real models use two families:
#
# * **Variance-preserving diffusion** (DDPM, Ho et al. 2020; SD 1.x/2.x, SDXL, DiT, PixArt):
#   $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\varepsilon$ for integer
#   $t \in \{0, \dots, T-1\}$, $\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)$: β schedules, the noise level
#   $\sigma$ of Karras et al. (2022) our samplers run in, zero terminal SNR, timestep spacings.
# * **Flow matching / rectified flow** (SD3, Flux; Esser et al. 2024): $x_t = (1-t)\,x_0 + t\,\varepsilon$
#   for $t \in [0, 1]$, with SD3's timestep shift and logit-normal training times: chapter 04b.
#
# Each idea first appears as a short teaching version on tiny tensors, then as the exported
# production version, checked against it. This sitting exports `tinydit.schedules`; 04b adds flow
# matching (`tinydit.flow`) and then *looks*: pictures noised by every schedule, $\bar\alpha_t$ and
# log-SNR curves, a slider over $t$, and an animation of the forward process.

# %%
# | default_exp schedules

# %%
import os


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from tinydit.validation import expect_error  # the chapters' way to show an expected error


# %% [markdown]
# ## β schedules and $\bar\alpha_t$
#
# DDPM adds a little noise per step, $q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},
# \beta_t I)$; composing the steps gives the closed form above with $\bar\alpha_t =
# \prod_{s=0}^{t}(1-\beta_s)$.
#
# | name | $\beta_t$ | used by |
# |---|---|---|
# | `linear` | linear from $10^{-4}$ to $0.02$ | DDPM, DiT, PixArt-α/Σ (IDDPM's linear schedule) |
# | `scaled_linear` | $\big(\sqrt{\beta_0} + \tfrac{t}{T-1}(\sqrt{\beta_{T-1}} - \sqrt{\beta_0})\big)^2$, $0.00085 \to 0.012$ | SD 1.x/2.x, SDXL |
# | `cosine` | $\min\!\big(1 - \bar\alpha(\tfrac{t+1}{T}) / \bar\alpha(\tfrac{t}{T}),\ 0.999\big)$, $\bar\alpha(u) = \cos^2\!\big(\tfrac{u + s}{1+s}\tfrac{\pi}{2}\big)$, $s = 0.008$ | improved DDPM (Nichol & Dhariwal 2021) |
#
# The three schedules and the running product, in a few lines:

# %%
def simple_betas(name, T):
    if name == "linear":
        return torch.linspace(1e-4, 0.02, T)  # (T,)
    if name == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, T) ** 2  # (T,): linear in sqrt(beta)
    ab = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # cosine alpha_bar(u), u in [0, 1]
    return torch.tensor([min(1 - ab((i + 1) / T) / ab(i / T), 0.999) for i in range(T)])  # (T,)


def simple_alphas_cumprod(betas):
    return torch.cumprod(1 - betas, dim=0)  # (T,)


for name in ("linear", "scaled_linear", "cosine"):
    b10 = simple_betas(name, 10)  # (10,)
    assert b10.shape == simple_alphas_cumprod(b10).shape == (10,)
    print(f"{name:>13}: alpha_bar over 10 steps = {simple_alphas_cumprod(b10).numpy().round(3)}")

# %% [markdown]
# The production version adds diffusers' name for the cosine schedule and custom β ranges, refuses
# what would silently produce nonsense (an unknown name, $\beta \notin [0, 1]$, NaN), and computes in
# float32 exactly as diffusers does, so tensors match bit for bit.

# %%
# | export
"""Noise schedules and the forward process of variance-preserving diffusion models.

Beta schedules (Ho et al. 2020, DDPM; Nichol & Dhariwal 2021, cosine; the scaled-linear schedule of
Stable Diffusion), zero-terminal-SNR rescaling (Lin et al. 2024), timestep spacings, the discrete-t
<-> sigma conversion and Karras sigmas (Karras et al. 2022), SNR and min-SNR-gamma weights (Hang et
al. 2023). Rectified flow (SD3, Flux) is `tinydit.flow`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tinydit.validation import (
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_memory,
    check_tensor,
)


SCHEDULES = ("linear", "scaled_linear", "cosine")
SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}  # diffusers' name for the cosine schedule
DEFAULT_BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
COSINE_S = 0.008  # Nichol & Dhariwal's offset, keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # cap of the cosine schedule near t = T


def _check_betas(betas, minimum_length: int = 1) -> torch.Tensor:
    """A 1-D floating tensor of at least `minimum_length` finite betas in [0, 1]."""
    check_tensor("betas", betas, ndim=1, floating=True, finite=True)
    if len(betas) < minimum_length:
        raise ValueError(f"betas: expected at least {minimum_length} values (T,), got {len(betas)}")
    if len(betas) and bool(((betas < 0) | (betas > 1)).any()):
        raise ValueError(f"betas: expected values in [0, 1], got values from {float(betas.min())} "
                         f"to {float(betas.max())}")
    return betas

# %%
# | export
def _beta_range(name: str, beta_start, beta_end) -> tuple[float, float] | None:
    """(beta_start, beta_end) of a linear-type schedule, defaults filled in, 0 < start <= end < 1;
    None for the cosine schedule, which has no range (both must be None)."""
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"beta_start, beta_end: the cosine schedule has no beta range, got "
                             f"beta_start={beta_start!r}, beta_end={beta_end!r}; expected None")
        return None
    b0, b1 = DEFAULT_BETA_RANGES[name]
    b0 = b0 if beta_start is None else check_float("beta_start", beta_start)
    b1 = b1 if beta_end is None else check_float("beta_end", beta_end)
    if not 0 < b0 <= b1 < 1:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got "
                         f"beta_start={b0!r}, beta_end={b1!r}")
    return b0, b1

# %%
# | export
def cosine_alpha_bar(u, s: float = COSINE_S):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), u in [0, 1]."""
    if isinstance(u, torch.Tensor):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

# %%
# | export
def make_betas(name: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """The beta schedule `name` over `num_train_timesteps` steps -> float32 (T,).

    `"linear"` (Ho et al. 2020; DiT, PixArt; default 1e-4 -> 0.02), `"scaled_linear"` (Stable
    Diffusion: linear in sqrt(beta); default 0.00085 -> 0.012) or `"cosine"` (Nichol & Dhariwal 2021,
    betas capped at 0.999; alias `"squaredcos_cap_v2"`). Matches diffusers' `DDPMScheduler.betas`.
    """
    check_choice("name", name, SCHEDULES + tuple(SCHEDULE_ALIASES))
    key = SCHEDULE_ALIASES.get(name, name)
    T = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
    check_memory("num_train_timesteps", 8 * T)
    beta_range = _beta_range(key, beta_start, beta_end)
    if beta_range is None:
        betas = [min(1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), MAX_BETA) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)  # (T,)
    b0, b1 = beta_range
    if key == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float32)  # (T,)
    return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2  # (T,)

# %%
# | export
def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4) -> (T,)."""
    _check_betas(betas)
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)

# %% [markdown]
# The two agree (bit for bit, at 10 steps and at the usual 1000); unknown names list the valid ones.

# %%
for name in SCHEDULES:
    for T in (10, 1000):
        torch.testing.assert_close(make_betas(name, T), simple_betas(name, T), rtol=0, atol=0)
        torch.testing.assert_close(alphas_cumprod(make_betas(name, T)), simple_alphas_cumprod(simple_betas(name, T)))
schedules = {name: alphas_cumprod(make_betas(name)) for name in SCHEDULES}  # name -> (1000,)
for name, ac in schedules.items():
    print(f"{name:>13}: alpha_bar_0 = {ac[0]:.5f}, alpha_bar_499 = {ac[499]:.4f}, alpha_bar_999 = {ac[-1]:.2e}")
expect_error(lambda: make_betas("quadratic"), r"^name: expected one of 'linear', 'scaled_linear', 'cosine'")
expect_error(lambda: alphas_cumprod(torch.tensor([0.1, float("nan")])), r"^betas: expected finite values, got 1 NaN")

# %% [markdown]
# ## The forward process $q(x_t \mid x_0)$
#
# Because the Gaussians compose, we never simulate the chain step by step: one draw of
# $\varepsilon \sim \mathcal N(0, I)$ gives $x_t$ for any $t$ directly. For a batch, each sample
# gets its own $t$:

# %%
def simple_add_noise(x0, t, ac, eps):  # x0 (B, ...), integer t (B,), ac (T,)
    ab = ac[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, ..., 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # (B, ...)


x_tiny = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
eps_tiny = torch.randn(x_tiny.shape, generator=torch.Generator().manual_seed(1))  # (3, 2, 4, 4)
t_tiny = torch.tensor([0, 500, 999])  # (3,)
assert simple_add_noise(x_tiny, t_tiny, schedules["linear"], eps_tiny).shape == (3, 2, 4, 4)

# %% [markdown]
# The production `add_noise` draws the noise from a `generator` (on its device, the CPU by default,
# so a seed gives the same picture everywhere) unless `noise` is given, returns `(x_t, noise)` (the
# training target), accepts a scalar $t$, and refuses timesteps outside $[0, T)$: `ac[1000]` would
# raise an opaque `IndexError`, and `ac[-1]` would silently mean "the last step".

# %%
# | export
def check_timesteps(t, num_train_timesteps: int) -> torch.Tensor:
    """Validate integer timestep indices in [0, T); returns them as a long tensor (B,) or ()."""
    T = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t: expected integer timestep indices in [0, {T}), got a "
                         f"{t.dtype} tensor (use t_to_sigma for fractional times)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"t: expected timesteps in [0, {T}), got values from {int(t.min())} to {int(t.max())}")
    return t.long()

# %%
# | export
def noise_like(x0: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """`noise` checked against x0's shape, or fresh N(0, I) noise like x0 drawn from `generator`."""
    if noise is not None:
        check_tensor("noise", noise, floating=True, finite=True)
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return noise
    device = generator.device if generator is not None else x0.device
    return torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)

# %%
# | export
def per_sample_column(v: torch.Tensor, x0: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or one value per sample (B,) as a (B, 1, ..., 1) column that broadcasts over x0."""
    if v.ndim == 0:
        v = v.expand(x0.shape[0])
    if v.shape != (x0.shape[0],):
        raise ValueError(f"{name}: expected a scalar or one value per sample ({x0.shape[0]},), got {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)

# %%
# | export
def add_noise(x0: torch.Tensor, t, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4).

    `x0` (B, ...), integer `t` (B,) or scalar in [0, T); returns `(x_t, noise)`.
    """
    check_tensor("x0", x0, floating=True, finite=True)
    check_tensor("alphas_cumprod", alphas_cumprod, ndim=1, floating=True)
    t = check_timesteps(t, len(alphas_cumprod))
    ab = per_sample_column(alphas_cumprod.to(x0.device)[t.to(x0.device)], x0, "t").to(x0.dtype)  # (B, 1, ..., 1)
    noise = noise_like(x0, noise, generator)  # (B, ...)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, noise

# %%
xt, noise_used = add_noise(x_tiny, t_tiny, schedules["linear"], noise=eps_tiny)
torch.testing.assert_close(xt, simple_add_noise(x_tiny, t_tiny, schedules["linear"], eps_tiny))
assert noise_used is eps_tiny
ac_lin = schedules["linear"]
expect_error(lambda: add_noise(x_tiny, torch.tensor([0, 1, 1000]), ac_lin), r"^t: expected timesteps in \[0, 1000\)")
expect_error(lambda: add_noise(x_tiny, torch.tensor([-1, 0, 3]), ac_lin), r"^t: .*got values from -1")
expect_error(lambda: add_noise(x_tiny, torch.tensor([0.5, 1.0, 2.0]), ac_lin), r"^t: expected integer .*float32")

# %% [markdown]
# Checked statistically: with unit-variance data, $x_t$ keeps unit variance (variance preserving),
# its correlation with $x_0$ is $\sqrt{\bar\alpha_t}$, and the same generator seed gives the same draw.

# %%
xv = torch.randn(4096, 16, generator=torch.Generator().manual_seed(2))  # (4096, 16) unit-variance data
for t in (0, 250, 700, 999):
    xt, _ = add_noise(xv, torch.full((4096,), t), schedules["cosine"], generator=torch.Generator().manual_seed(3))
    c, target = float((xt * xv).mean() / xv.pow(2).mean()), float(schedules["cosine"][t].sqrt())
    print(f"t={t:>3}: var {xt.var():.3f}, corr {c:.3f}, sqrt(alpha_bar) {target:.3f}")
    # 65536 draws: standard errors about 0.006 (variance) and 0.004 (correlation); measured within 0.009 and 0.001
    assert abs(float(xt.var()) - 1) < 0.05 and abs(c - target) < 0.02
draws = [add_noise(x_tiny, t_tiny, ac_lin, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])

# %% [markdown]
# ## Signal-to-noise ratio, and σ
#
# The *signal-to-noise ratio* of $x_t$ is $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$.
# Dividing $x_t$ by $\sqrt{\bar\alpha_t}$ gives $x_0 + \sigma_t\,\varepsilon$ with
#
# $$\sigma_t = \sqrt{\frac{1 - \bar\alpha_t}{\bar\alpha_t}} = \mathrm{SNR}(t)^{-1/2}, \qquad
#   \bar\alpha_t = \frac{1}{1 + \sigma_t^2}, \qquad \log\mathrm{SNR} = -2\log\sigma .$$
#
# This is the noise level of Karras et al. (2022): a variance-*exploding* view of the same process.
# Our samplers (chapter 08) all run in $\sigma$, so a model trained on discrete $t$ is wrapped by
# converting $\sigma \leftrightarrow t$: fractional $t$ interpolates $\sigma$ linearly between
# integer steps, and $\sigma \to t$ interpolates in $\log\sigma$ (as k-diffusion and diffusers do).
# Since $\sigma_t$ grows with $t$, `np.interp` does the second in one line:

# %%
def simple_t_to_sigma(t, sig):  # fractional t (N,), sig (T,)
    lo = t.floor().long().clamp(max=len(sig) - 2)  # (N,)
    w = t - lo  # (N,)
    return (1 - w) * sig[lo] + w * sig[lo + 1]  # (N,)


def simple_sigma_to_t(sigma, sig):  # sigma (N,), sig (T,) increasing
    return torch.from_numpy(np.interp(sigma.log().numpy(), sig.log().numpy(), np.arange(len(sig))))  # (N,)


ac5 = simple_alphas_cumprod(simple_betas("linear", 5))  # (5,)
sig5 = ((1 - ac5) / ac5).sqrt()  # (5,): sigma_t
t_frac = torch.tensor([0.0, 1.5, 3.25, 4.0], dtype=torch.float64)  # (4,)
assert simple_t_to_sigma(t_frac, sig5.double()).shape == (4,) and simple_sigma_to_t(sig5[1:3], sig5).shape == (2,)
print("sigma, 5-step linear schedule:", sig5.numpy().round(4))

# %% [markdown]
# The production versions compute in float64, refuse NaN, refuse times outside $[0, T-1]$ (they
# would extrapolate), and clamp noise levels outside the table to its ends.

# %%
# | export
def _check_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """A 1-D floating table alpha_bar_t (T,), T >= 2, of finite values in [0, 1]."""
    ac = check_tensor("alphas_cumprod", alphas_cumprod, ndim=1, floating=True, finite=True)
    if len(ac) < 2:
        raise ValueError(f"alphas_cumprod: expected at least 2 values (T,), got {len(ac)}")
    if bool(((ac < 0) | (ac > 1)).any()):
        raise ValueError(f"alphas_cumprod: expected values in [0, 1], got values from {float(ac.min())} "
                         f"to {float(ac.max())}")
    return ac

# %%
# | export
def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar), the Karras et al. (2022) noise level of x_t / sqrt(alpha_bar)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

# %%
# | export
def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of `sigmas_from_alphas_cumprod`."""
    return 1 / (1 + sigmas**2)

# %%
# | export
def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Kingma et al. 2021)."""
    return alphas_cumprod / (1 - alphas_cumprod)

# %%
# | export
def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log(alpha_bar) - log(1 - alpha_bar) = -2 log sigma."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)

# %%
# | export
def t_to_sigma(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) t in [0, T-1], interpolated linearly between integer steps."""
    table = sigmas_from_alphas_cumprod(_check_alphas_cumprod(alphas_cumprod)).double()  # (T,)
    t = check_finite("t", torch.as_tensor(t, dtype=torch.float64))
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > len(table) - 1):
        raise ValueError(f"t: expected times in [0, {len(table) - 1}], got values from "
                         f"{float(t.min())} to {float(t.max())}")
    lo = t.floor().long().clamp(max=len(table) - 2)
    w = t - lo
    return ((1 - w) * table[lo] + w * table[lo + 1]).float()

# %%
# | export
def sigma_to_t(sigma, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of noise level `sigma`, interpolating in log sigma (k-diffusion's
    `DiscreteSchedule.sigma_to_t`; diffusers' `_sigma_to_t`). Clamped to [0, T-1]."""
    log_sigmas = sigmas_from_alphas_cumprod(_check_alphas_cumprod(alphas_cumprod)).double().log()  # (T,)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma.numel() and bool((sigma.isnan() | (sigma < 0)).any()):
        raise ValueError(f"sigma: expected noise levels >= 0, got {sigma.flatten()[:8].tolist()}")
    log_sigma = sigma.clamp(min=1e-10).log().reshape(-1)  # (N,)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, N)
    low = (dists >= 0).long().cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)  # (N,)
    lo_v, hi_v = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo_v - log_sigma) / (lo_v - hi_v)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape).float()

# %%
ac_sd = schedules["scaled_linear"]
sig_table = sigmas_from_alphas_cumprod(ac_sd)  # (1000,)
t_frac = torch.tensor([0.0, 3.25, 500.5, 998.9])
torch.testing.assert_close(sig_table, ((1 - ac_sd) / ac_sd).sqrt())
torch.testing.assert_close(t_to_sigma(t_frac, ac_sd), simple_t_to_sigma(t_frac.double(), sig_table.double()).float())
torch.testing.assert_close(sigma_to_t(sig_table[[3, 400, 998]] * 1.01, ac_sd),
                           simple_sigma_to_t(sig_table[[3, 400, 998]].double() * 1.01, sig_table.double()).float())
torch.testing.assert_close(alphas_cumprod_from_sigmas(sig_table), ac_sd)
torch.testing.assert_close(snr(ac_sd), sig_table**-2)
torch.testing.assert_close(log_snr(ac_sd), -2 * sig_table.log())
round_trip = float((sigma_to_t(t_to_sigma(t_frac, ac_sd), ac_sd) - t_frac).abs().max())
print(f"t -> sigma -> t: max error {round_trip:.2e} steps (linear vs log interpolation)")
assert round_trip < 0.05  # measured 1.1e-02 steps: the two interpolations differ inside a step
expect_error(lambda: t_to_sigma(torch.tensor([float("nan")]), ac_sd), r"^t: expected finite values, got 1 NaN")
expect_error(lambda: t_to_sigma(1000.0, ac_sd), r"^t: expected times in \[0, 999\], got .*1000.0")
expect_error(lambda: sigma_to_t(torch.tensor([1.0, float("nan")]), ac_sd), r"^sigma: expected noise levels >= 0")

# %% [markdown]
# ## Zero terminal SNR (Lin et al. 2024)
#
# None of the three schedules reaches pure noise: at $t = T-1$ the SD schedule keeps
# $\sqrt{\bar\alpha} \approx 0.068$ of the image. Training never sees pure noise, yet sampling starts
# from it, so SD famously cannot make very dark or very bright pictures (the leaked low frequencies
# pin the mean brightness). Lin et al.'s Algorithm 1 shifts and rescales $\sqrt{\bar\alpha_t}$ so
# that it ends at exactly $0$ while $\sqrt{\bar\alpha_0}$ is unchanged:
#
# $$\sqrt{\bar\alpha_t}' = \big(\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_{T-1}}\big)\,
#   \frac{\sqrt{\bar\alpha_0}}{\sqrt{\bar\alpha_0} - \sqrt{\bar\alpha_{T-1}}} .$$
#
# At $t = T-1$ the SNR is $0$ and $\sigma = \infty$; like diffusers we replace $\bar\alpha_{T-1} = 0$
# by $2^{-24}$ where a finite $\sigma$ is needed. Such a model must predict $v$, not $\varepsilon$
# (at pure noise, $\varepsilon$ carries no information about the image). The algorithm, then the
# betas back from the new $\bar\alpha$:

# %%
def simple_zero_snr(betas):
    sab = torch.cumprod(1 - betas, dim=0).sqrt()  # (T,)
    sab = (sab - sab[-1]) * sab[0] / (sab[0] - sab[-1])  # (T,): ends at 0, starts where it did
    ab = sab**2  # (T,)
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])  # (T,): undo the cumulative product


assert simple_zero_snr(simple_betas("scaled_linear", 6)).shape == (6,)

# %% [markdown]
# The production version needs at least two steps that lose signal: with one β (or all later β's
# zero) the first and last $\bar\alpha$ coincide and the formula divides zero by zero.

# %%
# | export
def _check_rescalable(betas) -> torch.Tensor:
    """Betas whose alpha_bar falls from t = 0 to t = T-1, so zero-terminal-SNR rescaling is defined."""
    _check_betas(betas, minimum_length=2)
    ab = alphas_cumprod(betas)  # (T,)
    if not bool(ab[-1] < ab[0]):
        raise ValueError(f"betas: expected a schedule that loses signal (alpha_bar_(T-1) < alpha_bar_0), got "
                         f"alpha_bar_0 = {float(ab[0])} and alpha_bar_(T-1) = {float(ab[-1])}")
    return betas

# %%
# | export
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that alpha_bar_{T-1} = 0 (zero terminal SNR), keeping alpha_bar_0
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_ab = alphas_cumprod(_check_rescalable(betas)).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # (T,)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # (T,): undo the cumulative product
    return 1 - alphas

# %%
zsnr = alphas_cumprod(rescale_zero_terminal_snr(make_betas("scaled_linear")))  # (1000,)
torch.testing.assert_close(rescale_zero_terminal_snr(make_betas("scaled_linear")), simple_zero_snr(simple_betas("scaled_linear", 1000)))
print(f"scaled_linear: sqrt(alpha_bar) at T-1 = {ac_sd[-1].sqrt():.4f}; after rescaling: {zsnr[-1].sqrt():.1e}; "
      f"alpha_bar_0 {ac_sd[0]:.6f} -> {zsnr[0]:.6f}")
assert zsnr[-1] == 0 and ac_sd[-1].sqrt() > 0.06  # measured 0.0683 before rescaling
torch.testing.assert_close(zsnr[0], ac_sd[0])
expect_error(lambda: rescale_zero_terminal_snr(torch.tensor([0.02])), r"^betas: expected at least 2 values")
expect_error(lambda: rescale_zero_terminal_snr(torch.tensor([0.1, 0.0, 0.0])), r"^betas: expected a schedule that loses")

# %% [markdown]
# ## Timestep spacings and Karras sigmas
#
# A sampler takes $n \ll T$ steps. Which $t$'s? Lin et al. (Table 2) list three *spacings*:
#
# * `linspace`: $n$ evenly spaced, possibly fractional $t$ from $T-1$ down to $0$;
# * `leading`: $t = k \lfloor T/n \rfloor$ (+ an offset), $k = n-1, \dots, 0$ (SD 1.x: the first step
#   is at $t = 981$, not $999$, so it never starts from the noisiest level);
# * `trailing`: $t = \mathrm{round}(T - k\,T/n) - 1$, $k = 0, \dots, n-1$, which starts at $T-1$
#   (Lin et al.'s recommendation).
#
# Karras et al. (2022, eq. 5) instead space the *noise levels* so that steps are dense at low noise:
#
# $$\sigma_i = \Big(\sigma_{\max}^{1/\rho} + \tfrac{i}{n-1}\big(\sigma_{\min}^{1/\rho} -
#   \sigma_{\max}^{1/\rho}\big)\Big)^{\rho}, \quad i = 0, \dots, n-1, \qquad \sigma_n = 0,\ \rho = 7 .$$
#
# Every sampler in this book takes such a descending `sigmas` tensor of $n+1$ values ending in $0$.

# %%
def simple_spacing(n, T, spacing):
    if spacing == "linspace":
        return torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)  # (n,): T-1 ... 0 (n = 1 gives 0)
    if spacing == "leading":
        return torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)  # (n,)
    return (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1  # (n,): trailing


def simple_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # (n,)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho  # (n,)
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (n+1,)


for spacing in ("linspace", "leading", "trailing"):
    print(f"{spacing:>9}: {simple_spacing(5, 1000, spacing).tolist()}")
assert simple_karras(5, 0.03, 14.6).shape == (6,)

# %% [markdown]
# In production, `leading` adds `steps_offset` (SD 1.x uses 1), which must not push the first
# timestep past $T-1$; `discrete_sigmas` combines the pieces as diffusers' Euler scheduler does
# (σ of the spaced timesteps, optionally re-spaced à la Karras and mapped back to fractional $t$).

# %%
# | export
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _check_steps_offset(steps_offset, n: int, T: int) -> int:
    """A steps_offset >= 0 that keeps the first `leading` timestep, (n-1) * (T // n) + offset, below T."""
    offset = check_int("steps_offset", steps_offset, minimum=0)
    room = T - 1 - (n - 1) * (T // n)
    if offset > room:
        raise ValueError(f"steps_offset: expected at most {room} for {n} leading steps of num_train_timesteps={T} "
                         f"(the first timestep would be {T - 1 - room + offset} >= {T}), got {offset}")
    return offset

# %%
# | export
def timestep_spacing(num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                     steps_offset: int = 0) -> torch.Tensor:
    """The n sampling timesteps (descending, float32) for a spacing of Lin et al. (2024), Table 2:
    `"linspace"`, `"leading"` (plus `steps_offset`) or `"trailing"`. As diffusers' Euler scheduler."""
    n = check_int("num_inference_steps", num_inference_steps, minimum=1)
    T = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
    if n > T:
        raise ValueError(f"num_inference_steps: expected at most num_train_timesteps={T}, got {n}")
    check_choice("spacing", spacing, TIMESTEP_SPACINGS)
    steps_offset = _check_steps_offset(steps_offset, n, T)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    return torch.from_numpy(np.ascontiguousarray(ts))  # (n,)

# %%
# | export
def _check_sigma_range(sigma_min, sigma_max, rho) -> tuple[float, float, float]:
    """Finite 0 < sigma_min < sigma_max and a finite rho > 0."""
    sigma_min = check_float("sigma_min", sigma_min, minimum=0, min_inclusive=False)
    sigma_max = check_float("sigma_max", sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got "
                         f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    return sigma_min, sigma_max, check_float("rho", rho, minimum=0, min_inclusive=False)

# %%
# | export
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n noise levels from sigma_max down to sigma_min, evenly spaced
    in sigma^(1/rho), then a final 0 -> float32 (n+1,)."""
    n = check_int("n", n, minimum=1)
    check_memory("n", 8 * n)
    sigma_min, sigma_max, rho = _check_sigma_range(sigma_min, sigma_max, rho)
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho  # (n,)
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n+1,)

# %%
# | export
def discrete_sigmas(alphas_cumprod: torch.Tensor, num_inference_steps: int, spacing: str = "linspace",
                    karras: bool = False, steps_offset: int = 0, rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling noise levels of a discrete-time model -> (sigmas (n+1,) ending in 0, timesteps (n,)).

    Timesteps follow `spacing`; their sigmas are interpolated from the training table. With
    `karras=True` the sigmas are re-spaced by `karras_sigmas` between the end points and the
    timesteps recomputed by `sigma_to_t`. A zero alpha_bar (zero terminal SNR) becomes 2^-24.
    Matches diffusers' `EulerDiscreteScheduler.set_timesteps`.
    """
    ac = _check_alphas_cumprod(alphas_cumprod)
    ac = torch.where(ac > 0, ac, torch.full_like(ac, 2.0**-24))  # (T,)
    ts = timestep_spacing(num_inference_steps, len(ac), spacing, steps_offset)  # (n,)
    sigmas = t_to_sigma(ts, ac).numpy()  # (n,)
    if karras:
        sigmas = karras_sigmas(len(ts), float(sigmas[-1]), float(sigmas[0]), rho)[:-1].double().numpy()
        ts = sigma_to_t(torch.from_numpy(sigmas), ac)  # (n,)
    out = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n+1,)
    return out, ts.float()

# %%
for spacing in TIMESTEP_SPACINGS:
    for n in (1, 7, 10, 50):
        torch.testing.assert_close(timestep_spacing(n, 1000, spacing), simple_spacing(n, 1000, spacing).float())
for n, smin, smax, rho in [(1, 0.1, 10.0, 7.0), (10, 0.0292, 14.61, 7.0), (12, 0.03, 157.0, 3.0)]:
    torch.testing.assert_close(karras_sigmas(n, smin, smax, rho), simple_karras(n, smin, smax, rho).float())
print("SD 1.x, 50 leading steps + offset 1, first timesteps:", timestep_spacing(50, spacing="leading", steps_offset=1)[:3].tolist())
expect_error(lambda: karras_sigmas(10, 0.03, 14.6, rho=float("nan")), r"^rho: expected a finite number, got nan")
expect_error(lambda: karras_sigmas(10, 0.03, float("inf")), r"^sigma_max: expected a finite number, got inf")
expect_error(lambda: karras_sigmas(5, 10.0, 0.1), r"^sigma_min, sigma_max: expected 0 < sigma_min < sigma_max")
expect_error(lambda: timestep_spacing(10, spacing="uniform"), r"^spacing: expected one of 'linspace', 'leading'")
expect_error(lambda: timestep_spacing(10, spacing="leading", steps_offset=100), r"^steps_offset: expected at most 99")

# %% [markdown]
# The σ each spacing visits on the SD schedule, and Karras's re-spacing, which crowds the steps at
# low noise (left); Karras steps mapped back to fractional timesteps on the σ(t) curve (right).

# %%
n_steps = 10
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for spacing in TIMESTEP_SPACINGS:
    s, ts = discrete_sigmas(ac_sd, n_steps, spacing)
    print(f"{spacing:>9}: t = {ts.round().int().tolist()}")
    axes[0].plot(s[:-1], "o-", label=spacing)
s_k, ts_k = discrete_sigmas(ac_sd, n_steps, karras=True)
axes[0].plot(s_k[:-1], "s--", label="Karras (ρ=7)")
axes[0].set(yscale="log", title=f"σ at each of {n_steps} sampling steps (scaled_linear)", xlabel="step")
axes[0].legend()
axes[1].plot(sig_table, label="σ_t")
axes[1].plot(ts_k, s_k[:-1], "s", label="Karras steps, mapped back to t")
axes[1].set(yscale="log", title="σ(t) and σ → t", xlabel="t")
axes[1].legend()
plt.show()
print("Karras sigmas:", [round(v, 3) for v in s_k.tolist()])
assert len(s_k) == n_steps + 1 and s_k[-1] == 0 and torch.all(s_k[:-1].diff() < 0)
torch.testing.assert_close(t_to_sigma(ts_k, ac_sd), s_k[:-1], rtol=5e-3, atol=0)  # measured 5e-4: log- vs linear interp.

# %% [markdown]
# ### The linear schedule destroys a 32×32 image too early (Nichol & Dhariwal, §3.2)
#
# The fraction of timesteps at which the noisy image keeps less than 10 % correlation with the clean
# one ($\sqrt{\bar\alpha}$ for unit-variance data; measured on real pictures). Nichol & Dhariwal found
# that the last 20 % of the linear schedule could be skipped with little harm: it is nearly pure noise.

# %%
from tinydit.data import ShapesDataset


ds = ShapesDataset(64, seed=0)
n_imgs = 16 if FAST else 64
xs = torch.stack([ds[i][0] for i in range(n_imgs)])  # (n, 3, 32, 32)
xs = (xs - xs.mean(dim=(1, 2, 3), keepdim=True)) / xs.std(dim=(1, 2, 3), keepdim=True)  # unit variance per image
t_grid = torch.arange(0, 1000, 10 if FAST else 2)
g = torch.Generator().manual_seed(1)


def corr_with_x0(xt):  # (n, 3, 32, 32) -> mean correlation with xs
    xt = xt.flatten(1)  # (n, 3072)
    return float(torch.cosine_similarity(xt - xt.mean(1, keepdim=True), xs.flatten(1)).mean())


fig, ax = plt.subplots(figsize=(7, 4))
dead = {}
for name in SCHEDULES:
    ac = schedules[name]
    corr = torch.tensor([corr_with_x0(add_noise(xs, t, ac, generator=g)[0]) for t in t_grid])  # (len(t_grid),)
    dead[name] = float((corr < 0.1).float().mean())
    ax.plot(t_grid, corr, label=f"{name}: {dead[name]:.0%} of steps below 0.1")
    ax.plot(t_grid, ac[t_grid].sqrt(), "k:", lw=0.8)
ax.axhline(0.1, color="gray", lw=0.5)
ax.set(title="correlation of x_t with x_0 (dotted: √ᾱ)", xlabel="t")
ax.legend(fontsize=8)
plt.show()
print({k: f"{v:.1%}" for k, v in dead.items()})
assert dead["linear"] > 0.25  # measured 32 % (FAST) / 33 % (book size): below 10 % from t = 680 / 672 on
assert dead["cosine"] < dead["linear"] - 0.15  # measured 6 % / 6.4 % for cosine: a gap of 26 points

# %% [markdown]
# ## Min-SNR-γ loss weights (Hang et al. 2023)
#
# The plain $\varepsilon$-prediction loss weights the implied $x_0$ error by $\mathrm{SNR}(t)$, so
# almost-clean timesteps dominate. Hang et al. clip that weight at $\gamma = 5$; relative to each
# prediction target (chapter 09 trains with these):
# $$w_\varepsilon = \frac{\min(\mathrm{SNR}, \gamma)}{\mathrm{SNR}}, \qquad
#   w_v = \frac{\min(\mathrm{SNR}, \gamma)}{\mathrm{SNR} + 1}, \qquad w_{x_0} = \min(\mathrm{SNR}, \gamma).$$

# %%
# | export
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def min_snr_weights(snr_values: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for a loss on the `prediction_type` target:
    min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v_prediction), or min(SNR, gamma) (sample)."""
    gamma = check_float("gamma", gamma, minimum=0, min_inclusive=False)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return clipped

# %%
snr_sd = snr(ac_sd)
fig, ax = plt.subplots(figsize=(7, 3.5))
for p in PREDICTION_TYPES:
    ax.plot(min_snr_weights(snr_sd, 5.0, p), label=p)
ax.set(yscale="log", xlabel="t", title="min-SNR-5 weights (scaled_linear)")
ax.legend()
plt.show()
w_eps = min_snr_weights(snr_sd, 5.0)
assert torch.all(w_eps <= 1) and torch.all(w_eps[snr_sd < 5] == 1)
torch.testing.assert_close(w_eps, torch.minimum(snr_sd, torch.tensor(5.0)) / snr_sd)

# %% [markdown]
# ## Summary
#
# - **Built** (`tinydit.schedules`): `make_betas` (`linear`: DDPM, DiT, PixArt; `scaled_linear`:
#   SD 1.x/2.x, SDXL; `cosine`), `alphas_cumprod`, `add_noise`, σ / SNR conversions with
#   `t_to_sigma` / `sigma_to_t`, `rescale_zero_terminal_snr`, `timestep_spacing`, `karras_sigmas`,
#   `discrete_sigmas` and `min_snr_weights` (the flow helpers: 04b). Timesteps outside $[0, T)$, a
#   `steps_offset` past the schedule, NaN / infinite times and parameters, and a one-step schedule
#   given to zero-SNR rescaling are refused with the argument's name.
# - **Measured here**: every teaching version agrees with its production version (bit for bit for
#   the β schedules); SD keeps $\sqrt{\bar\alpha_{T-1}} = 0.068$ of the image, zero-SNR rescaling
#   makes it exactly 0 with $\bar\alpha_0$ unchanged; on 32×32 pictures the linear schedule spends
#   32 % of its steps below 10 % correlation with the image, the cosine schedule 6 %; $x_t$ keeps unit variance and correlation $\sqrt{\bar\alpha_t}$.
# - **Tested** (`tests/test_schedules.py`) against diffusers to $10^{-6}$ (relative for σ):
#   `DDPMScheduler`, `EulerDiscreteScheduler` (spacings, Karras, zero SNR),
#   `compute_snr` and min-SNR.
#
# Next, 04b: flow matching, and every schedule side by side; chapter 05 builds the DiT that learns to undo this process.
#
# ## Exercises
#
# 1. Find the $t$ at which each β schedule's SNR crosses 1 ($\bar\alpha_t = 1/2$). What fraction
#    of the process lies on the noisy side for `linear`, `scaled_linear` and `cosine`?
# 2. With `discrete_sigmas`, compare the first σ of 50 `leading` steps (offset 1) with the
#    schedule's largest σ. How much noise is the SD sampler's starting point missing, and what does
#    `trailing` change?
# 3. Apply `rescale_zero_terminal_snr` to the `cosine` schedule. Why does it change the schedule far
#    less than it changes `scaled_linear`?
# 4. Write $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0$ for a batch from
#    `add_noise` and check numerically that $x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v$.
#    Why is this still defined at zero terminal SNR when $\varepsilon$-prediction is not?
