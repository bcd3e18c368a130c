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
# # 04 · Noise schedules: how fast the picture disappears
#
# A diffusion model learns to undo a fixed *forward process* that mixes data with Gaussian noise.
# How much noise sits at each time $t$ is the **noise schedule**, and it matters as much as the
# network: it decides which noise levels the model practises on, and which ones a sampler can reach.
# This chapter builds the schedules real models use, in two families:
#
# * **Variance-preserving diffusion** (DDPM, Ho et al. 2020; SD 1.x/2.x, SDXL, DiT, PixArt):
#   $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\varepsilon$ for integer
#   $t \in \{0, \dots, T-1\}$, with $\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)$. We build the
#   `linear`, `scaled_linear` and `cosine` $\beta$ schedules, zero-terminal-SNR rescaling (Lin et
#   al. 2024), the inference timestep spacings, and the conversion to the noise level
#   $\sigma$ of Karras et al. (2022), in which all our samplers will run.
# * **Flow matching / rectified flow** (SD3, Flux; Esser et al. 2024): $x_t = (1-t)\,x_0 + t\,\varepsilon$
#   for $t \in [0, 1]$, with SD3's timestep shift and logit-normal training times.
#
# Then we *look*: the same pictures at increasing noise under every schedule, curves of
# $\bar\alpha_t$ and log-SNR, a slider over $t$, and an animation of the forward process.

# %%
# | default_exp schedules

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %% [markdown]
# ## β schedules and $\bar\alpha_t$
#
# DDPM adds a little noise per step, $q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},
# \beta_t I)$; composing the steps gives the closed form above with $\bar\alpha_t =
# \prod_{s=0}^{t}(1-\beta_s)$.
#
# | name | $\beta_t$ | used by |
# |---|---|---|
# | `linear` | linear from $10^{-4}$ to $0.02$ | DDPM, DiT |
# | `scaled_linear` | $\big(\sqrt{\beta_0} + \tfrac{t}{T-1}(\sqrt{\beta_{T-1}} - \sqrt{\beta_0})\big)^2$, $0.00085 \to 0.012$ | SD 1.x/2.x, SDXL, PixArt |
# | `cosine` | $\min\!\big(1 - \bar\alpha(\tfrac{t+1}{T}) / \bar\alpha(\tfrac{t}{T}),\ 0.999\big)$, $\bar\alpha(u) = \cos^2\!\big(\tfrac{u + s}{1+s}\tfrac{\pi}{2}\big)$, $s = 0.008$ | improved DDPM (Nichol & Dhariwal 2021) |
#
# We compute in float32 exactly as diffusers does, so tensors match bit for bit where possible.

# %%
# | export
"""Noise schedules and the forward process of diffusion and flow-matching models.

Beta schedules (Ho et al. 2020, DDPM; Nichol & Dhariwal 2021, cosine; the scaled-linear schedule of
Stable Diffusion), zero-terminal-SNR rescaling (Lin et al. 2024), timestep spacings, the discrete-t
<-> sigma conversion and Karras sigmas (Karras et al. 2022), rectified flow with the SD3 timestep
shift and logit-normal sampling (Esser et al. 2024), SNR and min-SNR-gamma weights (Hang et al. 2023).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")
SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}  # diffusers' name for the cosine schedule
DEFAULT_BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
COSINE_S = 0.008  # Nichol & Dhariwal's offset, keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # cap of the cosine schedule near t = T


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def cosine_alpha_bar(u, s: float = COSINE_S):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), u in [0, 1]."""
    if isinstance(u, torch.Tensor):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def make_betas(name: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """The beta schedule `name` over `num_train_timesteps` steps -> float32 (T,).

    `"linear"` (Ho et al. 2020; default 1e-4 -> 0.02), `"scaled_linear"` (Stable Diffusion: linear in
    sqrt(beta); default 0.00085 -> 0.012) or `"cosine"` (Nichol & Dhariwal 2021, betas capped at
    0.999; alias `"squaredcos_cap_v2"`). Matches diffusers' `DDPMScheduler.betas`.
    """
    key = SCHEDULE_ALIASES.get(name, name)
    if key not in SCHEDULES:
        valid = ", ".join(repr(n) for n in SCHEDULES + tuple(SCHEDULE_ALIASES))
        raise ValueError(f"name: unknown schedule {name!r}; expected one of {valid}")
    T = _check_count("num_train_timesteps", num_train_timesteps, 2)
    if key == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"beta_start, beta_end: the cosine schedule has no beta range, got "
                             f"beta_start={beta_start!r}, beta_end={beta_end!r}; expected None")
        betas = [min(1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), MAX_BETA) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)  # (T,)
    b0, b1 = DEFAULT_BETA_RANGES[key]
    b0 = b0 if beta_start is None else beta_start
    b1 = b1 if beta_end is None else beta_end
    if not 0 < b0 <= b1 < 1:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got "
                         f"beta_start={b0!r}, beta_end={b1!r}")
    if key == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float32)  # (T,)
    return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2  # (T,)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4) -> (T,)."""
    if betas.ndim != 1 or len(betas) < 1:
        raise ValueError(f"betas: expected a 1-D tensor (T,), got shape {tuple(betas.shape)}")
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)

# %%
import matplotlib.pyplot as plt
import torch

schedules = {name: alphas_cumprod(make_betas(name)) for name in SCHEDULES}  # name -> (1000,)
for name, ac in schedules.items():
    print(f"{name:>13}: alpha_bar_0 = {ac[0]:.5f}, alpha_bar_499 = {ac[499]:.4f}, alpha_bar_999 = {ac[-1]:.2e}")

# %% [markdown]
# ### Claims, checked
# Each schedule matches its formula (recomputed here in float64), the cosine schedule is capped,
# $\bar\alpha$ is the running product, and unknown names list the valid ones.

# %%
import numpy as np

T = 1000
tt = np.arange(T)
lin64 = 1e-4 + tt / (T - 1) * (0.02 - 1e-4)
sl64 = (0.00085**0.5 + tt / (T - 1) * (0.012**0.5 - 0.00085**0.5)) ** 2
f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
cos64 = np.minimum(1 - f((tt + 1) / T) / f(tt / T), 0.999)
for name, ref in (("linear", lin64), ("scaled_linear", sl64), ("cosine", cos64)):
    err = np.abs(make_betas(name).double().numpy() - ref).max()
    print(f"{name:>13}: max |beta - formula| = {err:.1e}")
    assert err < 1e-7
assert make_betas("cosine").max() == torch.tensor(0.999)
assert torch.allclose(schedules["linear"], torch.tensor(np.cumprod(1 - lin64)).float(), atol=1e-6)
try:
    make_betas("quadratic")
except ValueError as e:
    print("ValueError:", e)
    assert "'linear'" in str(e) and "'cosine'" in str(e)

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
# converting $\sigma \leftrightarrow t$; fractional $t$ interpolates $\sigma$ linearly between
# integer steps, and $\sigma \to t$ interpolates in $\log\sigma$ (as k-diffusion and diffusers do).

# %%
# | export
def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar), the Karras et al. (2022) noise level of x_t / sqrt(alpha_bar)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of `sigmas_from_alphas_cumprod`."""
    return 1 / (1 + sigmas**2)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Kingma et al. 2021)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log(alpha_bar) - log(1 - alpha_bar) = -2 log sigma."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def check_timesteps(t, num_train_timesteps: int) -> torch.Tensor:
    """Validate integer timestep indices in [0, T); returns them as a long tensor (B,) or ()."""
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t: expected integer timestep indices in [0, {num_train_timesteps}), got a "
                         f"{t.dtype} tensor (use t_to_sigma for fractional times)")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise ValueError(f"t: expected timesteps in [0, {num_train_timesteps}), got values from "
                         f"{int(t.min())} to {int(t.max())}")
    return t.long()


def t_to_sigma(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) t in [0, T-1], interpolated linearly between integer steps."""
    table = sigmas_from_alphas_cumprod(alphas_cumprod).double()  # (T,)
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > len(table) - 1):
        raise ValueError(f"t: expected times in [0, {len(table) - 1}], got values from "
                         f"{float(t.min())} to {float(t.max())}")
    lo = t.floor().long().clamp(max=len(table) - 2)
    w = t - lo
    return ((1 - w) * table[lo] + w * table[lo + 1]).float()


def sigma_to_t(sigma, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of noise level `sigma`, interpolating in log sigma (k-diffusion's
    `DiscreteSchedule.sigma_to_t`; diffusers' `_sigma_to_t`). Clamped to [0, T-1]."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).double().log()  # (T,)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    log_sigma = sigma.clamp(min=1e-10).log().reshape(-1)  # (N,)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, N)
    low = (dists >= 0).long().cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)  # (N,)
    lo_v, hi_v = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo_v - log_sigma) / (lo_v - hi_v)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape).float()

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
# (at pure noise, $\varepsilon$ carries no information about the image).

# %%
# | export
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that alpha_bar_{T-1} = 0 (zero terminal SNR), keeping alpha_bar_0
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_ab = alphas_cumprod(betas).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # (T,)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # (T,): undo the cumulative product
    return 1 - alphas

# %%
zsnr = alphas_cumprod(rescale_zero_terminal_snr(make_betas("scaled_linear")))  # (1000,)
print(f"scaled_linear: sqrt(alpha_bar) at T-1 = {schedules['scaled_linear'][-1].sqrt():.4f}; "
      f"after rescaling: {zsnr[-1].sqrt():.1e}; alpha_bar_0 {schedules['scaled_linear'][0]:.6f} -> {zsnr[0]:.6f}")
assert schedules["scaled_linear"][-1].sqrt() > 0.06 and zsnr[-1] < 1e-10
assert torch.isclose(zsnr[0], schedules["scaled_linear"][0], atol=1e-7)
ratio = (zsnr.sqrt()[:-1] - 0) / (schedules["scaled_linear"].sqrt()[:-1] - schedules["scaled_linear"][-1].sqrt())
assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # the affine map of the formula

# %% [markdown]
# ## Timestep spacings and Karras sigmas
#
# A sampler takes $n \ll T$ steps. Which $t$'s? Lin et al. (Table 2) list three *spacings*:
#
# * `linspace`: $n$ evenly spaced, possibly fractional $t$ from $T-1$ down to $0$;
# * `leading`: $t = k \lfloor T/n \rfloor$ (+ an offset), $k = n-1, \dots, 0$ (SD 1.x: the first step
#   is at $t \approx 980$, not $999$, so it never starts from the noisiest level);
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
# | export
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def timestep_spacing(num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                     steps_offset: int = 0) -> torch.Tensor:
    """The n sampling timesteps (descending, float32) for a spacing of Lin et al. (2024), Table 2:
    `"linspace"`, `"leading"` (plus `steps_offset`) or `"trailing"`. As diffusers' Euler scheduler."""
    n = _check_count("num_inference_steps", num_inference_steps)
    T = _check_count("num_train_timesteps", num_train_timesteps, 2)
    if n > T:
        raise ValueError(f"num_inference_steps: expected at most num_train_timesteps={T}, got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    else:
        raise ValueError(f"spacing: unknown timestep spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    return torch.from_numpy(np.ascontiguousarray(ts))  # (n,)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n noise levels from sigma_max down to sigma_min, evenly spaced
    in sigma^(1/rho), then a final 0 -> float32 (n+1,)."""
    n = _check_count("n", n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got "
                         f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if rho <= 0:
        raise ValueError(f"rho: expected a positive number, got {rho!r}")
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho  # (n,)
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n+1,)


def discrete_sigmas(alphas_cumprod: torch.Tensor, num_inference_steps: int, spacing: str = "linspace",
                    karras: bool = False, steps_offset: int = 0, rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling noise levels of a discrete-time model -> (sigmas (n+1,) ending in 0, timesteps (n,)).

    Timesteps follow `spacing`; their sigmas are interpolated from the training table. With
    `karras=True` the sigmas are re-spaced by `karras_sigmas` between the end points and the
    timesteps recomputed by `sigma_to_t`. A zero alpha_bar (zero terminal SNR) becomes 2^-24.
    Matches diffusers' `EulerDiscreteScheduler.set_timesteps`.
    """
    ac = torch.where(alphas_cumprod > 0, alphas_cumprod, torch.full_like(alphas_cumprod, 2.0**-24))  # (T,)
    ts = timestep_spacing(num_inference_steps, len(ac), spacing, steps_offset)  # (n,)
    sigmas = t_to_sigma(ts, ac).numpy()  # (n,)
    if karras:
        sigmas = karras_sigmas(len(ts), float(sigmas[-1]), float(sigmas[0]), rho)[:-1].double().numpy()
        ts = sigma_to_t(torch.from_numpy(sigmas), ac)  # (n,)
    out = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # (n+1,)
    return out, ts.float()

# %%
ac_sd = schedules["scaled_linear"]
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
sig_table = sigmas_from_alphas_cumprod(ac_sd)
axes[1].plot(sig_table, label="σ_t")
axes[1].plot(ts_k, s_k[:-1], "s", label="Karras steps, mapped back to t")
axes[1].set(yscale="log", title="σ(t) and σ → t", xlabel="t")
axes[1].legend()
plt.show()
print("Karras sigmas:", [round(v, 3) for v in s_k.tolist()])

# %% [markdown]
# ### Claims, checked
# $\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}$ and its inverse; $\mathrm{SNR} = \sigma^{-2}$;
# $\sigma \to t \to \sigma$ round-trips; the spacings start where the text says; Karras sigmas
# follow eq. 5 (computed here independently), have $n+1$ values ending in $0$; bad input fails.

# %%
assert torch.allclose(sig_table, ((1 - ac_sd) / ac_sd).sqrt())
assert torch.allclose(alphas_cumprod_from_sigmas(sig_table), ac_sd, atol=1e-6)
assert torch.allclose(snr(ac_sd), sig_table**-2, rtol=1e-5)
assert torch.allclose(log_snr(ac_sd), -2 * sig_table.log(), atol=1e-4)
t_frac = torch.tensor([0.0, 3.25, 500.5, 998.9])
assert torch.allclose(sigma_to_t(t_to_sigma(t_frac, ac_sd), ac_sd), t_frac, atol=2e-2)
assert torch.allclose(t_to_sigma(torch.arange(1000), ac_sd), sig_table)
assert timestep_spacing(10, spacing="leading")[0] == 900 and timestep_spacing(10, spacing="trailing")[0] == 999
smin, smax = 0.03, 14.6
ks = karras_sigmas(n_steps, smin, smax)
eq5 = [(smax ** (1 / 7) + i / (n_steps - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7 for i in range(n_steps)]
assert len(ks) == n_steps + 1 and ks[-1] == 0 and torch.allclose(ks[:-1], torch.tensor(eq5), rtol=1e-6)
assert torch.all(ks[:-1].diff() < 0)
for bad in (lambda: karras_sigmas(0, 0.1, 10), lambda: karras_sigmas(5, 10, 0.1),
            lambda: check_timesteps(torch.tensor([1000]), 1000), lambda: check_timesteps(torch.tensor([2.5]), 1000),
            lambda: timestep_spacing(10, spacing="uniform")):
    try:
        bad()
    except ValueError as e:
        print("ValueError:", e)
    else:
        raise AssertionError("should have raised")

# %% [markdown]
# ## Flow matching: a straight line from data to noise
#
# Rectified flow (Liu et al. 2022; Esser et al. 2024 for SD3; Flux) drops the β's altogether:
#
# $$x_t = (1 - t)\,x_0 + t\,\varepsilon, \qquad t \in [0, 1],$$
#
# and the network predicts the velocity $v = \varepsilon - x_0$. Its SNR is $\big((1-t)/t\big)^2$
# and, dividing by $1 - t$, its Karras noise level is $\sigma = t / (1-t)$, so the same samplers
# apply.
#
# Two refinements from SD3:
#
# * **Timestep shift.** Larger images need more noise to destroy the same structure (neighbouring
#   pixels are redundant). SD3 shifts every time by
#   $t' = \dfrac{s\,t}{1 + (s-1)\,t}$ ($s = 3$ for SD3 at 1024 px), spending more steps at high noise;
#   Flux chooses the shift from the image size, $t' = e^{\mu} / (e^{\mu} + 1/t - 1)$.
# * **Logit-normal training times.** Instead of $t \sim U(0,1)$, draw $t = \mathrm{sigmoid}(m + s\,n)$,
#   $n \sim \mathcal N(0, 1)$, which concentrates training on the middle times where the velocity is
#   hardest to predict ($m = 0, s = 1$ in SD3).

# %%
# | export
def shift_sigmas(t, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): t' = shift * t / (1 + (shift - 1) * t)."""
    if shift <= 0:
        raise ValueError(f"shift: expected a positive number, got {shift!r}")
    t = torch.as_tensor(t)
    return shift * t / (1 + (shift - 1) * t)


def time_shift_exponential(t, mu: float) -> torch.Tensor:
    """Flux's resolution-dependent shift: t' = e^mu / (e^mu + (1/t - 1)) (shift = e^mu)."""
    t = torch.as_tensor(t)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flow_sigmas(num_inference_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                mu: float | None = None) -> torch.Tensor:
    """Sampling times of a rectified-flow model (SD3 / Flux) -> float32 (n+1,), from 1 down to 0.

    n times evenly spaced between 1 and the (shifted) smallest training time 1/T, then shifted by
    `shift` (SD3) or, if `mu` is given, by Flux's exponential shift. Matches diffusers'
    `FlowMatchEulerDiscreteScheduler.set_timesteps` (which shifts the lower end point twice).
    """
    n = _check_count("num_inference_steps", num_inference_steps)
    T = _check_count("num_train_timesteps", num_train_timesteps, 2)
    if mu is None:
        t_min = float(shift_sigmas(torch.tensor(1.0 / T, dtype=torch.float32), shift))
    else:
        t_min = float(torch.tensor(1.0 / T, dtype=torch.float32))
    ts = np.linspace(T * 1.0, t_min * T, n) / T  # (n,)
    ts = shift_sigmas(torch.from_numpy(ts), shift) if mu is None else time_shift_exponential(torch.from_numpy(ts), mu)
    return torch.cat([ts.float(), torch.zeros(1)])  # (n+1,)


def flow_snr(t: torch.Tensor) -> torch.Tensor:
    """SNR of x_t = (1 - t) x0 + t eps: ((1 - t) / t)^2."""
    return ((1 - t) / t) ** 2


def flow_to_karras_sigma(t: torch.Tensor) -> torch.Tensor:
    """Karras noise level of a flow time: x_t / (1 - t) = x0 + t / (1 - t) eps, so sigma = t / (1 - t)."""
    return t / (1 - t)


def logit_normal_timesteps(n: int, mean: float = 0.0, std: float = 1.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times t = sigmoid(mean + std * N(0, 1)) (Esser et al. 2024, section 3.1) -> (n,)."""
    n = _check_count("n", n)
    if std <= 0:
        raise ValueError(f"std: expected a positive number, got {std!r}")
    device = generator.device if generator is not None else "cpu"
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))  # (n,)

# %% [markdown]
# ## The forward process, for both families
#
# `add_noise` draws $q(x_t \mid x_0)$ for integer timesteps of a β schedule and `flow_add_noise` for
# flow times. Both take a `generator` (or an explicit `noise`) and return `(x_t, noise)`, since the
# training loop needs the noise as its target. The noise is drawn on the generator's device (the CPU
# by default), so a seed gives the same picture on every machine.

# %%
# | export
def _draw_noise(x0: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if noise is not None:
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return noise
    device = generator.device if generator is not None else x0.device
    return torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)


def _per_sample(v: torch.Tensor, x0: torch.Tensor, name: str) -> torch.Tensor:
    if v.ndim == 0:
        v = v.expand(x0.shape[0])
    if v.shape != (x0.shape[0],):
        raise ValueError(f"{name}: expected a scalar or one value per sample ({x0.shape[0]},), got {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)


def add_noise(x0: torch.Tensor, t, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4).

    `x0` (B, ...), integer `t` (B,) or scalar in [0, T); returns `(x_t, noise)`.
    """
    t = check_timesteps(t, len(alphas_cumprod))
    ab = _per_sample(alphas_cumprod.to(x0.device)[t.to(x0.device)], x0, "t").to(x0.dtype)  # (B, 1, ..., 1)
    noise = _draw_noise(x0, noise, generator)  # (B, ...)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, noise


def flow_add_noise(x0: torch.Tensor, t, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow forward process x_t = (1 - t) x0 + t eps (Esser et al. 2024), t in [0, 1].

    `x0` (B, ...), `t` (B,) or scalar; returns `(x_t, noise)`. The velocity target is `noise - x0`.
    """
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(f"t: expected flow times in [0, 1], got values from {float(t.min())} to {float(t.max())}")
    tb = _per_sample(t, x0, "t")  # (B, 1, ..., 1)
    noise = _draw_noise(x0, noise, generator)  # (B, ...)
    return (1 - tb) * x0 + tb * noise, noise

# %% [markdown]
# ## Looking at it: the same pictures, noised by every schedule
#
# Each row is one schedule, each column a fraction $u$ of the way through the process
# ($t = u\,(T-1)$ for the β schedules, $t = u$ for flow), all with the **same** noise. The linear
# schedule (row 1) has wiped out the 32×32 shapes before the middle of the process; the cosine
# schedule keeps them visible much longer.

# %%
from tinydit.data import ShapesDataset, image_grid

ds = ShapesDataset(64, seed=0)
x0 = torch.stack([ds[i][0] for i in (0, 3, 5, 9)])  # (4, 3, 32, 32)
fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
gen = torch.Generator().manual_seed(0)
eps = torch.randn(x0.shape, generator=gen)  # (4, 3, 32, 32): shared by every cell


def noised(x, family, u, noise):
    if family == "flow":
        return flow_add_noise(x, torch.tensor(u), noise=noise)[0]
    ac = alphas_cumprod(make_betas(family))
    return add_noise(x, torch.tensor(round(u * 999)), ac, noise=noise)[0]


families = ["linear", "cosine", "scaled_linear", "flow"]
tiles, labels = [], []
for fam in families:
    for u in fractions:
        tiles.append(noised(x0[:1], fam, u, eps[:1])[0])
        labels.append(f"{fam} u={u}")
image_grid(torch.stack(tiles), labels, cols=len(fractions), scale=3, font_px=9)

# %% [markdown]
# ### Book-VAE latents, noised and decoded
#
# Our DiT will not see pixels but the 4×8×8 latents of chapter 02's VAE. Noise the latents and
# decode each noisy latent back to an image: latents are smaller and denser than pixels, so their
# structure goes even sooner.

# %%
from tinydit import vae

book_vae = vae.load_book_vae().eval()
with torch.no_grad():
    z0 = book_vae.to_latent(x0[:1])  # (1, C, 8, 8)
    z_eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    tiles = [book_vae.from_latent(noised(z0, fam, u, z_eps))[0] for fam in families for u in fractions]
print("latent shape:", tuple(z0.shape))
display_grid = image_grid(torch.stack(tiles).clamp(-1, 1), [f"{f} u={u}" for f in families for u in fractions],
                          cols=len(fractions), scale=3, font_px=9)
assert z0.shape[-1] < x0.shape[-1] and len(tiles) == len(families) * len(fractions)
from IPython.display import display

display(display_grid)

# %% [markdown]
# ## $\bar\alpha_t$ and log-SNR for every schedule
#
# On a common time axis $u = t/(T-1)$ (flow: $u = t$). Right: log-SNR $= \log\bar\alpha -
# \log(1-\bar\alpha)$; for flow $2\log\frac{1-t}{t}$, shown with SD3's shift $s = 3$ too. The cosine
# schedule's log-SNR is nearly a straight line over the middle of the process: it spends its steps
# evenly across noise levels, which is Nichol & Dhariwal's design goal.

# %%
u = torch.linspace(0, 1, 1000)
u_open = u.clamp(1e-4, 1 - 1e-4)
curves = {name: (ac, log_snr(ac)) for name, ac in schedules.items()}
curves["zero-SNR scaled_linear"] = (zsnr, log_snr(zsnr.clamp(min=2.0**-24)))
for label, tt_flow in (("flow", u_open), ("flow, shift 3", shift_sigmas(u_open, 3.0))):
    ab_flow = (1 - tt_flow) ** 2 / ((1 - tt_flow) ** 2 + tt_flow**2)  # alpha_bar of the same SNR
    curves[label] = (ab_flow, flow_snr(tt_flow).log())
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for label, (ab, ls) in curves.items():
    axes[0].plot(u, ab, label=label)
    axes[1].plot(u, ls, label=label)
axes[0].set(title="ᾱ (signal variance)", xlabel="u = t / (T-1)")
axes[1].set(title="log-SNR", xlabel="u", ylim=(-20, 12))
axes[1].axhline(0, color="gray", lw=0.5)
axes[0].legend(fontsize=8)
plt.show()
lsnr_cos = log_snr(schedules["cosine"])
lin_fit = np.polyfit(np.arange(100, 900), lsnr_cos[100:900].numpy(), 1)
resid = np.abs(np.polyval(lin_fit, np.arange(100, 900)) - lsnr_cos[100:900].numpy()).max()
print(f"cosine log-SNR between t=100 and 900: straight line within {resid:.2f} nats "
      f"(range {float(lsnr_cos[100] - lsnr_cos[899]):.1f})")
assert resid < 0.1 * float(lsnr_cos[100] - lsnr_cos[899])
assert torch.allclose(curves["flow"][1], 2 * torch.log((1 - u_open) / u_open), atol=1e-4)

# %% [markdown]
# ### The linear schedule destroys a 32×32 image too early (Nichol & Dhariwal, §3.2)
#
# How much of the process is spent on near-noise? We measure, for each schedule, the fraction of
# timesteps at which the noisy image keeps less than 10 % correlation with the clean one
# (correlation $= \sqrt{\bar\alpha}$ for unit-variance data; measured here on real pictures).
# Nichol & Dhariwal observed that the last 20 % of the linear schedule could be skipped with little
# harm, because those steps see essentially pure noise.

# %%
n_imgs = 16 if FAST else 64
xs = torch.stack([ds[i][0] for i in range(n_imgs)])  # (n, 3, 32, 32)
xs = (xs - xs.mean(dim=(1, 2, 3), keepdim=True)) / xs.std(dim=(1, 2, 3), keepdim=True)  # unit variance per image
t_grid = torch.arange(0, 1000, 10 if FAST else 2)
g = torch.Generator().manual_seed(1)
fig, ax = plt.subplots(figsize=(7, 4))
dead = {}
for name in SCHEDULES:
    ac = schedules[name]
    corr = []
    for t in t_grid:
        xt, _ = add_noise(xs, t, ac, generator=g)  # (n, 3, 32, 32)
        corr.append(float(torch.nn.functional.cosine_similarity(
            xt.flatten(1) - xt.flatten(1).mean(1, keepdim=True), xs.flatten(1), dim=1).mean()))
    corr = torch.tensor(corr)
    dead[name] = float((corr < 0.1).float().mean())
    ax.plot(t_grid, corr, label=f"{name}: {dead[name]:.0%} of steps below 0.1")
    ax.plot(t_grid, ac[t_grid].sqrt(), "k:", lw=0.8)
ax.axhline(0.1, color="gray", lw=0.5)
ax.set(title="correlation of x_t with x_0 (dotted: √ᾱ)", xlabel="t")
ax.legend(fontsize=8)
plt.show()
print({k: f"{v:.0%}" for k, v in dead.items()})
assert dead["linear"] > 0.25 and dead["cosine"] < dead["linear"] - 0.15

# %% [markdown]
# ### The training-time distributions of flow models
# Logit-normal samples (SD3) against uniform ones, and what the shift does to them.

# %%
n_draw = 20_000 if FAST else 200_000
t_ln = logit_normal_timesteps(n_draw, generator=torch.Generator().manual_seed(0))  # (n,)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist(t_ln.numpy(), bins=60, density=True, alpha=0.6, label="logit-normal(0, 1)")
ax.hist(shift_sigmas(t_ln, 3.0).numpy(), bins=60, density=True, alpha=0.6, label="… shifted, s = 3")
grid = torch.linspace(0.005, 0.995, 199)
pdf = torch.exp(-torch.logit(grid) ** 2 / 2) / (math.sqrt(2 * math.pi) * grid * (1 - grid))
ax.plot(grid, pdf, "k", lw=1, label="density 1/(√(2π) t(1−t)) · exp(−logit(t)²/2)")
ax.legend(fontsize=8)
ax.set(xlabel="t")
plt.show()
print(f"median {t_ln.median():.3f}, mean {t_ln.mean():.3f}; shifted median {shift_sigmas(t_ln, 3.0).median():.3f}")
assert abs(float(torch.logit(t_ln).mean())) < 0.05 and abs(float(torch.logit(t_ln).std()) - 1) < 0.05
assert abs(float(shift_sigmas(t_ln, 3.0).median()) - 0.75) < 0.02  # shift maps 1/2 to s/(1+s)
fs = flow_sigmas(28, shift=3.0)
print("SD3 sampling times, 28 steps, shift 3:", [round(v, 3) for v in fs[:5].tolist()], "...", fs[-3:].tolist())
assert len(fs) == 29 and fs[0] == 1 and fs[-1] == 0

# %% [markdown]
# ## Min-SNR-γ loss weights (Hang et al. 2023)
#
# The plain $\varepsilon$-prediction loss weights the implied $x_0$ error by $\mathrm{SNR}(t)$, so
# almost-clean timesteps dominate and conflict with the rest. Hang et al. clip the weight at $\gamma$
# (5 works well): relative to each prediction target the weight is
#
# $$w_\varepsilon = \frac{\min(\mathrm{SNR}, \gamma)}{\mathrm{SNR}}, \qquad
#   w_v = \frac{\min(\mathrm{SNR}, \gamma)}{\mathrm{SNR} + 1}, \qquad w_{x_0} = \min(\mathrm{SNR}, \gamma).$$
#
# Chapter 07 uses these in training.

# %%
# | export
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def min_snr_weights(snr_values: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for a loss on the `prediction_type` target:
    min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v_prediction), or min(SNR, gamma) (sample)."""
    if gamma <= 0:
        raise ValueError(f"gamma: expected a positive number, got {gamma!r}")
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type: unknown {prediction_type!r}; expected one of {PREDICTION_TYPES}")

# %%
snr_sd = snr(ac_sd)
fig, ax = plt.subplots(figsize=(7, 3.5))
for p in PREDICTION_TYPES:
    ax.plot(min_snr_weights(snr_sd, 5.0, p), label=p)
ax.set(yscale="log", xlabel="t", title="min-SNR-5 weights (scaled_linear)")
ax.legend()
plt.show()
w_eps = min_snr_weights(snr_sd, 5.0)
assert torch.all(w_eps <= 1) and torch.allclose(w_eps[snr_sd < 5], torch.ones(int((snr_sd < 5).sum())))
assert torch.allclose(w_eps, torch.minimum(snr_sd, torch.tensor(5.0)) / snr_sd)

# %% [markdown]
# ## Try it: a slider over $t$
#
# Move $t$ and pick a schedule: the widget shows $x_t$, the noise that was added, and the SNR. (In a
# static page the widget does not move; run the notebook in JupyterLab.)

# %%
import ipywidgets as W
from IPython.display import display


def show_xt(t=300, schedule="cosine", image=0):
    x = x0[image : image + 1]  # (1, 3, 32, 32)
    e = eps[image : image + 1]
    if schedule == "flow":
        tf = torch.tensor(t / 999)
        xt, _ = flow_add_noise(x, tf, noise=e)
        s = float(flow_snr(tf.clamp(min=1e-6)))
    else:
        ac = schedules[schedule]
        xt, _ = add_noise(x, torch.tensor(t), ac, noise=e)
        s = float(snr(ac[t]))
    print(f"{schedule}, t = {t}: SNR = {s:.3g}, log-SNR = {math.log(max(s, 1e-30)):.2f}")
    display(image_grid(torch.cat([x, xt, e.clamp(-1, 1)]), ["x_0", f"x_t (t={t})", "noise ε"], cols=3, scale=5))


display(W.interactive(show_xt, t=W.IntSlider(300, 0, 999, step=1),
                      schedule=W.Dropdown(options=[*SCHEDULES, "flow"], value="cosine"),
                      image=W.IntSlider(0, 0, len(x0) - 1)))

# %% [markdown]
# ## The forward process as an animation
#
# One GIF of four pictures sliding from data to noise under the cosine schedule, saved with Pillow
# to a temporary folder (generated pictures are never committed) and shown inline.

# %%
import tempfile
from pathlib import Path

from IPython.display import Image as IPImage

n_frames = 12 if FAST else 40
frame_ts = torch.linspace(0, 999, n_frames).round().long()
frames = []
for t in frame_ts:
    xt, _ = add_noise(x0, t, schedules["cosine"], noise=eps)  # (4, 3, 32, 32)
    frames.append(image_grid(xt, cols=4, scale=3))
frames += [frames[-1]] * 3  # linger on pure noise
gif_path = Path(tempfile.mkdtemp()) / "forward_process.gif"
frames[0].save(gif_path, save_all=True, append_images=frames[1:], duration=120, loop=0)
print(gif_path, f"{gif_path.stat().st_size / 1024:.0f} KiB, {len(frames)} frames")
assert gif_path.stat().st_size > 0
IPImage(filename=str(gif_path))

# %% [markdown]
# ### The forward process, checked statistically
# With unit-variance data $x_t$ keeps unit variance (variance preserving) for the β schedules, its
# correlation with $x_0$ is $\sqrt{\bar\alpha_t}$, and the same generator seed gives the same draw.

# %%
xv = torch.randn(4096, 16, generator=torch.Generator().manual_seed(2))  # (4096, 16) unit-variance data
for t in (0, 250, 700, 999):
    xt, e = add_noise(xv, torch.full((4096,), t), schedules["cosine"], generator=torch.Generator().manual_seed(3))
    c = float((xt * xv).mean() / xv.pow(2).mean())
    print(f"t={t:>3}: var {xt.var():.3f}, corr {c:.3f}, sqrt(alpha_bar) {schedules['cosine'][t].sqrt():.3f}")
    assert abs(float(xt.var()) - 1) < 0.05 and abs(c - float(schedules["cosine"][t].sqrt())) < 0.02
a1, _ = add_noise(x0, torch.tensor([5, 50, 500, 999]), schedules["linear"], generator=torch.Generator().manual_seed(7))
a2, _ = add_noise(x0, torch.tensor([5, 50, 500, 999]), schedules["linear"], generator=torch.Generator().manual_seed(7))
assert torch.equal(a1, a2)
f1, fe = flow_add_noise(x0, torch.tensor([0.0, 0.25, 0.5, 1.0]), generator=torch.Generator().manual_seed(7))
assert torch.allclose(f1[0], x0[0]) and torch.allclose(f1[3], fe[3])

# %% [markdown]
# ## What we built, and what it was compared against
#
# `tinydit.schedules` holds `make_betas`, `alphas_cumprod`, `rescale_zero_terminal_snr`, the
# σ / SNR conversions, `t_to_sigma` / `sigma_to_t`, `timestep_spacing`, `karras_sigmas`,
# `discrete_sigmas`, the flow-matching helpers (`flow_add_noise`, `shift_sigmas`,
# `time_shift_exponential`, `flow_sigmas`, `logit_normal_timesteps`), `add_noise` and
# `min_snr_weights`. `tests/test_schedules.py` checks them against diffusers, to $10^{-6}$
# (relative for σ, whose values reach the hundreds):
#
# | ours | reference |
# |---|---|
# | `make_betas`, `alphas_cumprod` (all three schedules, custom ranges) | `DDPMScheduler.betas`, `.alphas_cumprod` |
# | `rescale_zero_terminal_snr` | `DDPMScheduler(rescale_betas_zero_snr=True)` |
# | `discrete_sigmas` (linspace / leading / trailing, Karras, zero-SNR) | `EulerDiscreteScheduler.set_timesteps` sigmas and timesteps |
# | `karras_sigmas` | `EulerDiscreteScheduler._convert_to_karras` |
# | `flow_sigmas` (shift 1 and 3; Flux `mu`) | `FlowMatchEulerDiscreteScheduler.set_timesteps` sigmas |
# | `add_noise`, `flow_add_noise` | `DDPMScheduler.add_noise`, `FlowMatchEulerDiscreteScheduler.scale_noise` |
# | `snr`, `min_snr_weights` | `diffusers.training_utils.compute_snr` and the min-SNR weighting of diffusers' training scripts |
#
# Next, chapter 05 builds the DiT that learns to undo this process.
