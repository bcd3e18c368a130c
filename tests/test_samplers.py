"""Samplers and denoisers (chapter 08): parity with k-diffusion's formulas and diffusers' scheduler
classes, the 3M weight, measured orders of accuracy, wrappers and schedules, randomness, bad input.

k-diffusion itself cannot be a dependency (its PyPI package pulls torchvision, which would replace
the CPU torch wheel). Its sampler formulas are therefore written out here independently, from the
papers, in a different form than the package's (variance-preserving variables, numerically integrated
weights), and the samplers are compared with them on the same sigmas and the same noise. When
k-diffusion's own `sampling.py` is at hand (`import k_diffusion` works, or TINYDIT_KDIFFUSION_WHEEL
names a wheel from `pip download k-diffusion --no-deps`, or the test fetches that wheel from PyPI
itself), `test_real_kdiffusion_parity` also compares with its sampling.py directly; only when PyPI is
unreachable is that test skipped.
"""

import inspect
import math
import os
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from tinydit import dit, schedules
from tinydit.denoisers import (
    DiscreteDenoiser,
    FlowDenoiser,
    GaussianDenoiser,
    IdealDenoiser,
    UnknownSamplerError,
    exponential_sigmas,
    flux_mu,
)
from tinydit.samplers import SAMPLERS, get_sampler, sample_dpmpp_3m_sde, sample_euler


AC = schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))  # (1000,): SD 1.x
GL_NODES, GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one thread beats two contending for them (10 s instead of 90 s on a
    busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def integrate(f, a, b):
    """Gauss-Legendre quadrature of a smooth f over [a, b]."""
    return (b - a) / 2 * float(np.sum(GL_WEIGHTS * f((b - a) / 2 * GL_NODES + (a + b) / 2)))


def tiny_net(learn_sigma=True, seed=0, dtype=torch.float64):
    """A random 2-block DiT around eps = x_in (or v = x): D depends on x and t, samples stay O(1)."""
    torch.manual_seed(seed)
    net = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                num_classes=4, learn_sigma=learn_sigma))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    net = net.eval().requires_grad_(False).to(dtype)
    if learn_sigma:
        return lambda x, t: net(x, t) + torch.cat([x, torch.zeros_like(x)], 1)
    return lambda x, t: net(x, t) + x


def start(sigma_max, seed=5, dtype=torch.float64):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * sigma_max


def draws(n, shape, seed, dtype=torch.float64):
    """The noise our samplers draw from torch.Generator().manual_seed(seed), in order."""
    g = torch.Generator().manual_seed(seed)
    return iter([torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)])


# ---------------------------------------------------------------- k-diffusion's formulas, written out
# Every reference takes D(x, sigma) with a Python-float sigma, the sigmas as floats, and an iterator of
# noise. Ancestral noise levels: DDPM posterior (Ho et al. 2020) in sigma form, eta-scaled.

def _up_down(s, s_next, eta):
    if s_next == 0:
        return 0.0, 0.0
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return up, math.sqrt(s_next**2 - up**2)


def ref_euler(D, x, s, noise, s_churn=0.0):  # Karras et al. 2022, Algorithm 2 (Euler)
    for i in range(len(s) - 1):
        gamma = min(s_churn / (len(s) - 1), math.sqrt(2) - 1)
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + next(noise) * math.sqrt(s_hat**2 - s[i] ** 2)
        x = x + (s[i + 1] - s_hat) * (x - D(x, s_hat)) / s_hat
    return x


def ref_heun(D, x, s, noise):  # Karras et al. 2022, Algorithm 2
    for i in range(len(s) - 1):
        d = (x - D(x, s[i])) / s[i]
        x_e = x + (s[i + 1] - s[i]) * d
        x = x_e if s[i + 1] == 0 else x + (s[i + 1] - s[i]) * (d + (x_e - D(x_e, s[i + 1])) / s[i + 1]) / 2
    return x


def _dpm2(D, x, s, target):  # second slope at exp((log s + log target) / 2)
    d = (x - D(x, s)) / s
    if target == 0:
        return x - s * d
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x_mid = x + (mid - s) * d
    return x + (target - s) * (x_mid - D(x_mid, mid)) / mid


def ref_dpm_2(D, x, s, noise):
    for i in range(len(s) - 1):
        x = _dpm2(D, x, s[i], s[i + 1])
    return x


def ref_ancestral(step, eta=1.0):
    def run(D, x, s, noise):
        for i in range(len(s) - 1):
            up, down = _up_down(s[i], s[i + 1], eta)
            x = step(D, x, s[i], down) + (next(noise) * up if s[i + 1] > 0 else 0)
        return x
    return run


def _alpha(s):  # variance-preserving alpha and sigma of the Karras noise level s
    return 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)


def _dpmpp_2s_step(D, x, s, target):  # DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, r = 1/2), VP form
    if target == 0:
        return D(x, s)
    (a_s, v_s), (a_t, v_t) = _alpha(s), _alpha(target)
    lam_s, lam_t = math.log(a_s / v_s), math.log(a_t / v_t)
    lam_m = (lam_s + lam_t) / 2
    s_m = math.exp(-lam_m)
    a_m, v_m = _alpha(s_m)
    x_vp = a_s * x
    u = v_m / v_s * x_vp - a_m * math.expm1(-(lam_m - lam_s)) * D(x, s)
    x_vp = v_t / v_s * x_vp - a_t * math.expm1(-(lam_t - lam_s)) * D(u / a_m, s_m)
    return x_vp / a_t


def ref_dpmpp_2m(D, x, s, noise):  # DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), VP form
    x_vp, old, h_old = _alpha(s[0])[0] * x, None, None
    for i in range(len(s) - 1):
        (a_s, v_s) = _alpha(s[i])
        d0 = D(x_vp / a_s, s[i])
        if s[i + 1] == 0:
            return d0
        a_t, v_t = _alpha(s[i + 1])
        h = math.log(a_t / v_t) - math.log(a_s / v_s)
        dd = d0 if old is None else (1 + h / (2 * h_old)) * d0 - h / (2 * h_old) * old
        x_vp = v_t / v_s * x_vp - a_t * math.expm1(-h) * dd
        old, h_old = d0, h
    return x_vp


def _phi_weights(h, eta, k):
    """int_0^h (1 + eta) e^{-(1 + eta)(h - u)} u^k / k! du: the exact weight of D^(k) (numerical)."""
    c = 1 + eta
    return integrate(lambda u: c * np.exp(-c * (h - u)) * u**k / math.factorial(k), 0.0, h)


def ref_dpmpp_2m_sde(eta, solver_type):
    def run(D, x, s, noise):
        old = h_old = None
        for i in range(len(s) - 1):
            d0 = D(x, s[i])
            if s[i + 1] == 0:
                return d0
            h = math.log(s[i] / s[i + 1])
            w0 = _phi_weights(h, eta, 0)
            x = math.exp(-(1 + eta) * h) * x + w0 * d0
            if old is not None:
                slope = (d0 - old) / h_old  # ~ D'
                w1 = w0 / 2 * h if solver_type == "midpoint" else _phi_weights(h, eta, 1)  # midpoint: k-diffusion's
                x = x + w1 * slope
            if eta > 0:
                x = x + next(noise) * s[i + 1] * math.sqrt(1 - math.exp(-2 * eta * h))
            old, h_old = d0, h
        return x
    return run


def ref_dpmpp_3m_sde(eta, second_difference_scale):
    """D's Taylor terms in lambda with exact (quadrature) weights. k-diffusion's second divided difference
    is half of h^2 D'' (scale 1/2 of the Taylor term); the package's default uses the full term (scale 1)."""
    def run(D, x, s, noise):
        hist = []  # (lambda, D) newest last
        for i in range(len(s) - 1):
            d0 = D(x, s[i])
            if s[i + 1] == 0:
                return d0
            lam, h = -math.log(s[i]), math.log(s[i] / s[i + 1])
            x = math.exp(-(1 + eta) * h) * x + _phi_weights(h, eta, 0) * d0
            if len(hist) >= 1:
                (l1, d1), = hist[-1:]
                first = (d0 - d1) / (lam - l1)  # divided difference ~ D'
                if len(hist) >= 2:
                    l2, d2 = hist[-2]
                    second = (first - (d1 - d2) / (l1 - l2)) / (lam - l2)  # ~ D'' / 2
                    x = x + _phi_weights(h, eta, 1) * (first + second * (lam - l1))  # D'(lambda) of the parabola
                    x = x + _phi_weights(h, eta, 2) * 2 * second * second_difference_scale  # W2 * D''
                else:
                    x = x + _phi_weights(h, eta, 1) * first
            if eta > 0:
                x = x + next(noise) * s[i + 1] * math.sqrt(1 - math.exp(-2 * eta * h))
            hist.append((lam, d0))
        return x
    return run


def ref_lms(order):
    def run(D, x, s, noise):
        slopes = []
        for i in range(len(s) - 1):
            slopes = (slopes + [(x - D(x, s[i])) / s[i]])[-order:]
            nodes = [s[i - j] for j in range(len(slopes))]
            for j, d in enumerate(reversed(slopes)):
                basis = lambda t, j=j, nodes=nodes: np.prod([(t - o) / (nodes[j] - o) for k, o in enumerate(nodes) if k != j],
                                                      axis=0)
                x = x + integrate(basis, s[i], s[i + 1]) * d
        return x
    return run


KDIFFUSION_CASES = {  # name: (our sampler, its options, reference)
    "euler": ("euler", {}, ref_euler),
    "euler churn": ("euler", {"s_churn": 2.0}, lambda D, x, s, n: ref_euler(D, x, s, n, s_churn=2.0)),
    "euler_ancestral": ("euler_ancestral", {}, ref_ancestral(lambda D, x, s, t: x + (t - s) * (x - D(x, s)) / s)),
    "euler_ancestral eta=0.5": ("euler_ancestral", {"eta": 0.5},
                                ref_ancestral(lambda D, x, s, t: x + (t - s) * (x - D(x, s)) / s, 0.5)),
    "heun": ("heun", {}, ref_heun),
    "dpm_2": ("dpm_2", {}, ref_dpm_2),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}, ref_ancestral(_dpm2)),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, ref_ancestral(_dpmpp_2s_step)),
    "dpmpp_2m": ("dpmpp_2m", {}, ref_dpmpp_2m),
    "dpmpp_2m_sde midpoint": ("dpmpp_2m_sde", {}, ref_dpmpp_2m_sde(1.0, "midpoint")),
    "dpmpp_2m_sde heun eta=0.7": ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7}, ref_dpmpp_2m_sde(0.7, "heun")),
    "dpmpp_3m_sde (k-diffusion)": ("dpmpp_3m_sde", {"kdiffusion_compat": True}, ref_dpmpp_3m_sde(1.0, 0.5)),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, ref_dpmpp_3m_sde(1.0, 1.0)),
    "lms": ("lms", {}, ref_lms(4)),
}


@pytest.fixture(scope="module")
def eps_denoiser():
    return DiscreteDenoiser(tiny_net(), AC, learn_sigma=True)  # float64, fractional timesteps


@pytest.mark.parametrize("case", list(KDIFFUSION_CASES))
def test_kdiffusion_formula_parity(case, eps_denoiser):
    name, options, reference = KDIFFUSION_CASES[case]
    sigmas = schedules.karras_sigmas(8, eps_denoiser.sigma_min, eps_denoiser.sigma_max).double()
    x = start(sigmas[0])
    ours = SAMPLERS[name](eps_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), disable=True, **options)
    D = lambda x, s: eps_denoiser(x, torch.full((len(x),), s, dtype=x.dtype))
    ref = reference(D, x, sigmas.tolist(), draws(40, x.shape, 3))
    err = (ours - ref).abs().max().item()
    print(f"k-diffusion formula | {case:28s} | max error {err:.1e}")
    assert err <= 1e-5  # measured <= 1e-13 in float64


def _load_kdiffusion():
    try:
        import k_diffusion.sampling as sampling
        return sampling
    except ImportError:
        pass
    wheel = os.environ.get("TINYDIT_KDIFFUSION_WHEEL") or _download_kdiffusion_wheel()
    if not wheel:
        pytest.skip("k-diffusion's wheel could not be fetched from PyPI (offline?); set TINYDIT_KDIFFUSION_WHEEL "
                    "to a `pip download k-diffusion --no-deps` wheel to compare with its sampling.py")
    utils = types.ModuleType("k_diffusion.utils")  # the two helpers sampling.py uses
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    utils.append_zero = lambda x: torch.cat([x, x.new_zeros([1])])
    package = types.ModuleType("k_diffusion")
    package.__path__, package.utils = [], utils
    stubs = {"k_diffusion": package, "k_diffusion.utils": utils}
    for heavy in ("torchsde", "torchdiffeq"):  # only the Brownian tree and the adaptive solvers use them
        if heavy not in sys.modules:
            stubs[heavy] = types.SimpleNamespace(BrownianTree=None, odeint=None)
    module = types.ModuleType("k_diffusion.sampling")
    module.__package__ = "k_diffusion"
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        with zipfile.ZipFile(wheel) as z:
            exec(compile(z.read("k_diffusion/sampling.py").decode(), "k_diffusion/sampling.py", "exec"), module.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def _download_kdiffusion_wheel() -> str | None:
    """The k-diffusion wheel from PyPI (no dependencies: only its sampling.py is read, never
    installed, so torch is untouched), cached under ~/.cache/tinydit-tests; None when offline."""
    import glob
    import subprocess

    cache = os.path.join(os.path.expanduser("~"), ".cache", "tinydit-tests", "k-diffusion")
    found = sorted(glob.glob(os.path.join(cache, "k_diffusion-*.whl")))
    if not found:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", cache, "k-diffusion"], check=True, timeout=180, capture_output=True)
        except (subprocess.SubprocessError, OSError):
            return None
        found = sorted(glob.glob(os.path.join(cache, "k_diffusion-*.whl")))
    return found[-1] if found else None


REAL_KDIFFUSION = {  # k-diffusion function: (our sampler, options)
    "sample_euler": ("euler", {}), "sample_euler_ancestral": ("euler_ancestral", {}), "sample_heun": ("heun", {}),
    "sample_dpm_2": ("dpm_2", {}), "sample_dpm_2_ancestral": ("dpm_2_ancestral", {}), "sample_lms": ("lms", {}),
    "sample_dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}), "sample_dpmpp_2m": ("dpmpp_2m", {}),
    "sample_dpmpp_2m_sde": ("dpmpp_2m_sde", {}), "sample_dpmpp_3m_sde": ("dpmpp_3m_sde", {"kdiffusion_compat": True}),
}


@pytest.mark.parametrize("kd_name", list(REAL_KDIFFUSION))
def test_real_kdiffusion_parity(kd_name, eps_denoiser):
    sampling = _load_kdiffusion()
    name, options = REAL_KDIFFUSION[kd_name]
    sigmas = schedules.karras_sigmas(8, eps_denoiser.sigma_min, eps_denoiser.sigma_max).double()
    x = start(sigmas[0])
    ours = SAMPLERS[name](eps_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), disable=True, **options)
    fn = getattr(sampling, kd_name)
    extra = {}
    if "noise_sampler" in inspect.signature(fn).parameters:
        noise = draws(40, x.shape, 3)
        extra["noise_sampler"] = lambda sigma, sigma_next: next(noise)
    ref = fn(eps_denoiser, x, sigmas, disable=True, **extra)
    err = (ours - ref).abs().max().item()
    print(f"k-diffusion 0.1.1 sampling.py | {kd_name:26s} | max error {err:.1e}")
    assert err <= 1e-5


# ---------------------------------------------------------------- diffusers' scheduler classes

def _diffusers_cases():
    from diffusers import (  # a dev dependency, imported only here
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    dpm = dict(cfg, final_sigmas_type="zero")
    return {  # name: (scheduler, VP start?, step options, our sampler, options, prediction)
        "EulerDiscrete": (EulerDiscreteScheduler(**cfg), False, {}, "euler", {}, "epsilon"),
        "EulerDiscrete v_prediction": (EulerDiscreteScheduler(**cfg, prediction_type="v_prediction"), False, {},
                                       "euler", {}, "v_prediction"),
        "EulerAncestralDiscrete": (EulerAncestralDiscreteScheduler(**cfg), False, {"seed": 1}, "euler_ancestral", {},
                                   "epsilon"),
        "HeunDiscrete": (HeunDiscreteScheduler(**cfg), False, {}, "heun", {}, "epsilon"),
        "DPMSolverMultistep dpmsolver++ 2": (DPMSolverMultistepScheduler(**dpm), True, {}, "dpmpp_2m", {}, "epsilon"),
        "DPMSolverMultistep sde-dpmsolver++ 2": (DPMSolverMultistepScheduler(**dpm, algorithm_type="sde-dpmsolver++"),
                                                 True, {"seed": 1}, "dpmpp_2m_sde", {}, "epsilon"),
        "DPMSolverMultistep dpmsolver++ 3 heun": (DPMSolverMultistepScheduler(**dpm, solver_order=3, solver_type="heun"),
                                                  True, {}, "dpmpp_3m_sde", {"eta": 0.0, "kdiffusion_compat": True},
                                                  "epsilon"),
        "DDIM eta=0": (DDIMScheduler(**cfg, clip_sample=False), True, {}, "ddim", {}, "epsilon"),
        "DDIM eta=1": (DDIMScheduler(**cfg, clip_sample=False), True, {"seed": 1, "eta": 1.0}, "ddim", {"eta": 1.0},
                       "epsilon"),
        "UniPCMultistep bh2 order 2": (UniPCMultistepScheduler(**dpm), True, {}, "unipc", {}, "epsilon"),
        "UniPCMultistep bh2 order 3": (UniPCMultistepScheduler(**dpm, solver_order=3), True, {}, "unipc",
                                       {"order": 3}, "epsilon"),
    }


def run_diffusers(sched, net_out, x, n, seed=None, mu=None, **step_options):
    sched.set_timesteps(n, **({} if mu is None else {"mu": mu}))
    if seed is not None:
        step_options["generator"] = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(net_out(x_in, t.expand(len(x))), t, x, **step_options).prev_sample
    return x


@pytest.mark.parametrize("case", list(_diffusers_cases()))
def test_diffusers_parity(case):
    sched, vp, step_options, name, options, prediction = _diffusers_cases()[case]
    net = tiny_net(dtype=torch.float32)
    D = DiscreteDenoiser(net, AC, prediction=prediction, quantize=True, learn_sigma=True)
    n = 20  # >= 15: diffusers' DPM-Solver lowers its order near the end below 15 steps; divides 1000 for DDIM
    sigmas = D.get_sigmas(n, "trailing")
    sched.set_timesteps(n)
    if hasattr(sched, "sigmas") and len(sched.sigmas) == n + 1:
        torch.testing.assert_close(sched.sigmas, sigmas)  # the same schedule
    x = start(sigmas[0], dtype=torch.float32)
    x_ref = x / (1 + sigmas[0] ** 2) ** 0.5 if vp else x  # DPM-Solver, DDIM, UniPC: VP space, unit-variance start
    ref = run_diffusers(sched, lambda x, t: net(x, t)[:, :4], x_ref, n, **step_options)
    ours = SAMPLERS[name](D, x, sigmas, generator=torch.Generator().manual_seed(1), disable=True, **options)
    err = (ours - ref).abs().max().item()
    print(f"diffusers {case:40s} | {name:16s} | max error {err:.1e} (|x| <= {ref.abs().max():.1f})")
    assert err <= 1e-5  # measured <= 1e-6 in float32


@pytest.mark.parametrize("shift, mu", [(3.0, None), (1.0, 0.8)])
def test_diffusers_flow_parity(shift, mu):
    from diffusers import FlowMatchEulerDiscreteScheduler
    net = tiny_net(learn_sigma=False, seed=1, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=mu is not None)
    x = start(1.0, seed=6, dtype=torch.float32)
    ref = run_diffusers(sched, net, x, 12, mu=mu)
    flow = FlowDenoiser(net)
    sigmas = flow.get_sigmas(12, shift, mu)
    torch.testing.assert_close(sched.sigmas, sigmas)
    err = (sample_euler(flow, x, sigmas, disable=True) - ref).abs().max().item()
    print(f"diffusers FlowMatchEulerDiscrete shift={shift} mu={mu} | euler | max error {err:.1e}")
    assert err <= 1e-5


def test_discrete_schedules_match_diffusers():
    from diffusers import EulerDiscreteScheduler
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    D = DiscreteDenoiser(None, AC)
    for schedule, options in {"linspace": {}, "leading": {"steps_offset": 1}, "trailing": {},
                              "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}
                              }.items():
        spacing = schedule if schedule in ("linspace", "leading", "trailing") else "linspace"
        sched = EulerDiscreteScheduler(**cfg, timestep_spacing=spacing, **options)
        sched.set_timesteps(10)
        ours = D.get_sigmas(10, schedule, steps_offset=options.get("steps_offset", 0))
        assert len(ours) == 11 and ours[-1] == 0 and bool((ours[:-1].diff() < 0).all())
        torch.testing.assert_close(ours, sched.sigmas, rtol=1e-5, atol=1e-6, msg=schedule)
        if schedule == "karras":  # diffusers' timesteps for these sigmas: log-sigma interpolation, as ours
            torch.testing.assert_close(D.sigma_to_t(ours[:-1]), sched.timesteps, rtol=0, atol=2e-3)


def test_flux_mu_and_exponential_sigmas():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    s = exponential_sigmas(5, 0.1, 10.0)
    torch.testing.assert_close(s[:-1].log().diff(), torch.full((4,), math.log(0.1 / 10) / 4))
    assert s[-1] == 0


# ---------------------------------------------------------------- DPM-Solver++(3M): the quadratic term

def test_3m_sde_weight_is_the_exact_integral_and_diffusers_is_off_by_one():
    for h in (0.05, 0.3, 1.0, 2.5):
        exact = _phi_weights(h, 1.0, 2) / h**2  # weight of h^2 D'' in the SDE step (eta = 1)
        ours = (1 - math.exp(-2 * h)) / (4 * h**2) - 1 / (2 * h) + 0.5  # what sample_dpmpp_3m_sde applies (-phi_3)
        diffusers = (1 - math.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5  # sde-dpmsolver++ solver_order=3
        assert ours == pytest.approx(exact, rel=1e-9)
        assert diffusers - ours == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_3m_steps_are_exact_for_a_quadratic_denoiser(eta):
    """D exactly quadratic in lambda (and independent of x): from the third step on, each 3M step equals
    the exact integral; k-diffusion's half-weighted second difference does not."""
    quadratic = lambda lam: 0.2 + 0.7 * lam - 0.1 * lam**2
    D = lambda x, s: quadratic(-s.log())[:, None] * torch.ones_like(x)
    sigmas = schedules.karras_sigmas(8, 0.05, 20.0).double()
    c = 1 + eta
    for compat in (False, True):
        xs = []
        sample_dpmpp_3m_sde(D, torch.zeros(1, 1, dtype=torch.float64), sigmas, eta=eta, s_noise=0.0, disable=True,
                            kdiffusion_compat=compat, callback=lambda info, xs=xs: xs.append(info["x"].item()))
        errors = []
        for i in range(2, len(xs) - 1):
            l0, l1 = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            weight = lambda lam, l1=l1: c * np.exp(-c * (l1 - lam)) * quadratic(lam)
            exact = math.exp(-c * (l1 - l0)) * xs[i] + integrate(weight, l0, l1)
            errors.append(abs(xs[i + 1] - exact))
        if compat:
            assert max(errors) > 1e-3  # measured 2e-2
        else:
            assert max(errors) < 1e-10  # measured 4e-16


# ---------------------------------------------------------------- measured order of accuracy

ODE_RUNS = {  # sampler name, options, expected order, margin (measured within 0.1, 0.18 for 2M)
    "euler": ({}, 1.0, 0.3), "heun": ({}, 2.0, 0.3), "dpm_2": ({}, 2.0, 0.3), "dpmpp_2m": ({}, 2.0, 0.3),
    "dpmpp_2s_ancestral": ({"eta": 0.0}, 2.0, 0.3), "dpmpp_2m_sde": ({"eta": 0.0}, 2.0, 0.3),
    "dpmpp_3m_sde": ({"eta": 0.0}, 3.0, 0.3), "unipc": ({}, 3.0, 0.3), "ddim": ({}, 1.0, 0.3),
    "lms": ({}, 4.0, 0.7),  # the ramp from order 1 keeps it at 3.74 over these NFE
}


def fitted_order(name, options):
    gauss = GaussianDenoiser(mean=0.3, std=1.0)
    x_T = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    nfes, errors = [], []
    for n in (16, 24, 32, 48, 64, 96, 128):
        sigmas = schedules.karras_sigmas(n, 0.002, 80.0).double()
        calls, last = [], {}
        counted = lambda x, s, calls=calls: calls.append(1) or gauss(x, s)
        SAMPLERS[name](counted, x_T, sigmas, callback=last.update, disable=True, **options)
        exact = gauss.ode_solution(x_T, float(sigmas[0]), float(sigmas[-2]))  # before the final denoise
        nfes.append(len(calls))
        errors.append((last["x"] - exact).abs().max().item())
    return -np.polyfit(np.log(nfes[-4:]), np.log(errors[-4:]), 1)[0]


@pytest.mark.parametrize("name", list(ODE_RUNS))
def test_order_of_accuracy(name):
    options, expected, margin = ODE_RUNS[name]
    order = fitted_order(name, options)
    print(f"order | {name:20s} | fitted {order:.2f} (expected {expected})")
    assert abs(order - expected) < margin


def test_kdiffusion_3m_is_second_order():
    order = fitted_order("dpmpp_3m_sde", {"eta": 0.0, "kdiffusion_compat": True})
    print(f"order | dpmpp_3m_sde (k-diffusion) | fitted {order:.2f}")
    assert order < 2.2  # measured 1.68


# ---------------------------------------------------------------- denoisers

def test_every_parametrisation_returns_x0_from_an_oracle():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 12.0])
    s = sigma[:, None, None, None]
    a, s_vp = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5
    for prediction, target in {"epsilon": eps, "v_prediction": a * eps - s_vp * x0, "sample": x0}.items():
        D = DiscreteDenoiser(lambda x_in, t, target=target: target, AC, prediction)
        torch.testing.assert_close(D(x0 + s * eps, sigma), x0, rtol=1e-5, atol=1e-5)
    t = torch.tensor([0.1, 0.5, 0.95])[:, None, None, None]
    flow = FlowDenoiser(lambda x, time: eps - x0)
    torch.testing.assert_close(flow((1 - t) * x0 + t * eps, t.flatten()), x0)


def test_model_inputs_learn_sigma_and_quantize():
    seen = {}

    class Net(torch.nn.Module):
        config = types.SimpleNamespace(learn_sigma=True)

        def forward(self, x, t, y=None):
            seen.update(x=x, t=t, y=y)
            return torch.cat([torch.zeros_like(x), torch.full_like(x, 1e6)], 1)  # variance channels must be dropped

    x, sigma = torch.ones(2, 4, 8, 8), torch.tensor([1.0, 3.0])
    D = DiscreteDenoiser(Net(), AC, quantize=True)
    torch.testing.assert_close(D(x, sigma, y=torch.tensor([1, 2])), x)  # eps = 0: D = x
    torch.testing.assert_close(seen["x"], x / (1 + sigma[:, None, None, None] ** 2) ** 0.5)
    assert torch.equal(seen["t"], seen["t"].round()) and seen["y"].tolist() == [1, 2]
    t_fractional = DiscreteDenoiser(Net(), AC).sigma_to_t(sigma)
    torch.testing.assert_close(schedules.t_to_sigma(t_fractional.round(), AC).log(), sigma.log(), atol=0.01, rtol=0)
    FlowDenoiser(Net(), time_scale=1000.0)(x, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 500.0]))
    with pytest.raises(ValueError, match="learn_sigma=True expects 8 output channels"):
        DiscreteDenoiser(lambda x, t: x, AC, learn_sigma=True)(x, sigma)


def test_denoiser_arguments_are_checked():
    with pytest.raises(ValueError, match="^prediction: expected one of 'epsilon'"):
        DiscreteDenoiser(None, AC, prediction="eps")
    with pytest.raises(ValueError, match="^alphas_cumprod: expected T >= 2 values in"):
        DiscreteDenoiser(None, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="^schedule: expected one of 'karras'"):
        DiscreteDenoiser(None, AC).get_sigmas(10, "cosine")
    with pytest.raises(ValueError, match="^time_scale: expected a number > 0"):
        FlowDenoiser(None, time_scale=0)


def test_ideal_denoiser_lands_on_training_examples():
    data = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ideal = IdealDenoiser(data)
    sigmas = schedules.karras_sigmas(10, 0.01, 40.0)
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 40.0
    for name, sampler in SAMPLERS.items():
        if name == "euler_ancestral_rf":
            continue  # a flow sampler (sigmas <= 1)
        out = sampler(ideal, x, sigmas, generator=torch.Generator().manual_seed(2), disable=True)
        dist = torch.cdist(out.flatten(1), data.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        # measured <= 1e-6; LMS's last step extrapolates old slopes instead of denoising: 3e-3 (spacing ~5)
        assert float(dist.max()) < (1e-2 if name == "lms" else 1e-4), name


def test_rectified_flow_ancestral_noise_level():
    mu, s = 0.5, 0.6  # Gaussian data; its flow denoiser in closed form
    col = lambda t: t[:, None]
    D = lambda x, t: mu + (1 - col(t)) * s**2 / ((1 - col(t)) ** 2 * s**2 + col(t) ** 2) * (x - (1 - col(t)) * mu)
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(2))
    sigmas = FlowDenoiser(None).get_sigmas(100)
    std = {name: SAMPLERS[name](D, noise, sigmas, generator=torch.Generator().manual_seed(3), disable=True).std().item()
           for name in ("euler", "euler_ancestral_rf", "euler_ancestral")}
    assert abs(std["euler_ancestral_rf"] - std["euler"]) < 0.02  # measured 0.574 vs 0.588 (data: 0.6)
    assert std["euler_ancestral"] - s > 0.1  # the VE step on a flow model: 0.84
    with pytest.raises(ValueError, match="expected flow times <= 1"):
        SAMPLERS["euler_ancestral_rf"](D, noise, schedules.karras_sigmas(4, 0.1, 10.0))


# ---------------------------------------------------------------- randomness, callback, conditioning

def test_seeds_reproduce_and_deterministic_samplers_leave_the_generator_alone():
    gauss = GaussianDenoiser()
    sigmas = schedules.karras_sigmas(6, 0.01, 10.0)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    for name, sampler in SAMPLERS.items():
        sig = FlowDenoiser(None).get_sigmas(6) if name == "euler_ancestral_rf" else sigmas
        runs = [sampler(gauss, x, sig, generator=torch.Generator().manual_seed(s), disable=True) for s in (1, 1, 2)]
        assert torch.equal(runs[0], runs[1]), name
        g = torch.Generator().manual_seed(5)
        state = g.get_state()
        sampler(gauss, x, sig, generator=g, disable=True)
        noisy = name in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde",
                         "euler_ancestral_rf")
        assert torch.equal(g.get_state(), state) != noisy, name
        assert torch.equal(runs[0], runs[2]) != noisy, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_sample_on_cuda():
    gauss = GaussianDenoiser()
    sigmas = schedules.karras_sigmas(8, 0.01, 10.0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 10
    for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        cpu = SAMPLERS[name](gauss, x, sigmas, generator=torch.Generator().manual_seed(1), disable=True)
        gpu = SAMPLERS[name](gauss, x.cuda(), sigmas.cuda(), generator=torch.Generator().manual_seed(1), disable=True)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="^generator: expected a CPU generator"):
        sample_euler(gauss, x, sigmas, generator=torch.Generator(device="cuda"))


def test_callback_and_extra_args():
    seen, conds = [], []

    def D(x, sigma, label=None):
        conds.append(label)
        return x * 0.5

    sigmas = schedules.karras_sigmas(5, 0.1, 10.0)
    x = torch.ones(2, 3)
    get_sampler("heun")(D, x, sigmas, extra_args={"label": 7}, callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == [0, 1, 2, 3, 4] and set(conds) == {7} and len(conds) == 9
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"} and float(seen[0]["sigma"]) == float(sigmas[0])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("sigmas, pattern", [
    ([3.0, 1.0, 2.0, 0.0], r"^sigmas: expected strictly decreasing values, got sigmas\[1\] = 1.0 <= sigmas\[2\] = 2.0"),
    ([1.0, 1.0, 0.0], r"^sigmas: expected strictly decreasing values, got sigmas\[0\] = 1.0 <= sigmas\[1\]"),
    ([2.0, 1.0, -1.0], r"^sigmas: expected noise levels >= 0, got a last value of -1.0"),
    ([0.0], r"^sigmas: expected n\+1 >= 2 noise levels"),
    ([float("nan"), 1.0, 0.0], r"^sigmas: expected finite values"),
    ([[1.0, 0.0]], r"^sigmas: expected a 1-D tensor"),
])
def test_bad_sigmas(sigmas, pattern):
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match=pattern):
            sampler(GaussianDenoiser(), torch.zeros(1, 3), torch.tensor(sigmas), disable=True)


def test_bad_arguments_and_nan():
    sigmas, x, gauss = schedules.karras_sigmas(10, 0.1, 10.0), torch.zeros(1, 3), GaussianDenoiser()
    nan_late = lambda x, s: gauss(x, s) * (float("nan") if s[0] <= sigmas[3] else 1.0)  # from the 4th sigma on
    for name, sampler in SAMPLERS.items():
        if name != "euler_ancestral_rf":  # two-call samplers may meet sigmas[3] already in step 3
            with pytest.raises(ValueError, match=r"^model: the denoiser returned NaN or inf at step [34] of 10"):
                sampler(nan_late, x, sigmas, disable=True)
    with pytest.raises(ValueError, match=r"NaN or inf at step 4 of 10 \(sigma = "):
        sample_euler(nan_late, x, sigmas, disable=True)
    with pytest.raises(UnknownSamplerError, match=r"^sampler: unknown name 'k_euler'; expected one of ddim, dpm_2"):
        SAMPLERS["k_euler"]
    with pytest.raises(KeyError):
        get_sampler("k_euler")
    with pytest.raises(ValueError, match="^eta: expected a number >= 0"):
        SAMPLERS["dpmpp_2m_sde"](gauss, x, sigmas, eta=-0.5)
    with pytest.raises(ValueError, match="^solver_type: expected one of 'midpoint', 'heun'"):
        SAMPLERS["dpmpp_2m_sde"](gauss, x, sigmas, solver_type="euler")
    with pytest.raises(TypeError, match="^generator: expected a torch.Generator or None"):
        sample_euler(gauss, x, sigmas, generator=0)
    with pytest.raises(ValueError, match="^x: expected finite values"):
        sample_euler(gauss, torch.full((1, 3), float("nan")), sigmas)
    with pytest.raises(ValueError, match="^model: expected a denoised sample of shape"):
        sample_euler(lambda x, s: x[:, :2], x, sigmas)
    with pytest.raises(ValueError, match="^s_tmax: expected a number >= s_tmin"):
        sample_euler(gauss, x, sigmas, s_tmin=1.0, s_tmax=0.5)
