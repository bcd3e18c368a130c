"""Parity of tinydit.schedules with diffusers' schedulers (DDPM, Euler, flow-match Euler) and
training utilities, plus the forward-process properties and clear errors on bad input."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from tinydit import flow as FM
from tinydit import schedules as S


TOL = 1e-6


def _abs_err(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def _rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()


DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_CASES = [("linear", None, None), ("scaled_linear", None, None), ("cosine", None, None),
              ("linear", 2e-4, 0.03), ("scaled_linear", 0.0001, 0.02)]


def _ddpm(name, start, end, T=1000, **kw):
    kw = {**kw, **({} if start is None else {"beta_start": start, "beta_end": end})}
    if name == "scaled_linear" and start is None:
        kw.update(beta_start=0.00085, beta_end=0.012)  # diffusers' defaults are DDPM's; SD's are ours
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[name], **kw)


@pytest.mark.parametrize("name, start, end", BETA_CASES)
@pytest.mark.parametrize("T", [1000, 50])
def test_betas_and_alphas_cumprod_match_ddpm_scheduler(name, start, end, T):
    ref = _ddpm(name, start, end, T)
    betas = S.make_betas(name, T, start, end)
    assert _abs_err(betas, ref.betas) <= TOL
    assert _abs_err(S.alphas_cumprod(betas), ref.alphas_cumprod) <= TOL


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_matches_ddpm_scheduler(name):
    ref = _ddpm(name, None, None, rescale_betas_zero_snr=True)
    betas = S.rescale_zero_terminal_snr(S.make_betas(name))
    assert _abs_err(betas, ref.betas) <= TOL
    ac = S.alphas_cumprod(betas)
    assert _abs_err(ac, ref.alphas_cumprod) <= TOL
    assert ac[-1] == 0 and abs(ac[0] - S.alphas_cumprod(S.make_betas(name))[0]) <= TOL


def test_cosine_alias_and_cap():
    assert torch.equal(S.make_betas("squaredcos_cap_v2"), S.make_betas("cosine"))
    assert S.make_betas("cosine").max().item() == pytest.approx(0.999)


EULER_CASES = [
    # (schedule, steps, spacing, karras, zero_snr, steps_offset)
    ("scaled_linear", 25, "linspace", False, False, 0),
    ("scaled_linear", 30, "leading", False, False, 1),
    ("scaled_linear", 20, "trailing", False, False, 0),
    ("scaled_linear", 25, "linspace", True, False, 0),
    ("scaled_linear", 25, "leading", True, False, 1),
    ("linear", 50, "linspace", False, False, 0),
    ("linear", 15, "trailing", True, False, 0),
    ("cosine", 40, "leading", False, False, 0),
    ("cosine", 10, "linspace", True, False, 0),
    ("scaled_linear", 20, "trailing", False, True, 0),
    ("scaled_linear", 7, "linspace", True, True, 0),
    ("linear", 1, "linspace", False, False, 0),
]


@pytest.mark.parametrize("name, n, spacing, karras, zero_snr, offset", EULER_CASES)
def test_discrete_sigmas_match_euler_discrete_scheduler(name, n, spacing, karras, zero_snr, offset):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = EulerDiscreteScheduler(beta_schedule=DIFFUSERS_NAMES[name], timestep_spacing=spacing,
                                 use_karras_sigmas=karras, rescale_betas_zero_snr=zero_snr, steps_offset=offset, **kw)
    ref.set_timesteps(n)
    betas = S.make_betas(name)
    if zero_snr:
        betas = S.rescale_zero_terminal_snr(betas)
    sigmas, timesteps = S.discrete_sigmas(S.alphas_cumprod(betas), n, spacing, karras=karras, steps_offset=offset)
    assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
    assert _rel_err(sigmas, ref.sigmas) <= TOL
    assert _abs_err(timesteps, ref.timesteps) <= 1e-3  # timestep indices in [0, 999]: 1e-6 relative


@pytest.mark.parametrize("n, smin, smax, rho", [(10, 0.0292, 14.6146, 7.0), (1, 0.1, 10.0, 7.0),
                                                (50, 0.002, 80.0, 7.0), (12, 0.03, 157.0, 3.0)])
def test_karras_sigmas_match_diffusers(n, smin, smax, rho):
    ref_sched = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=smin, sigma_max=smax)
    ours = S.karras_sigmas(n, smin, smax, rho)
    assert ours.shape == (n + 1,) and ours[-1] == 0 and ours[0] == pytest.approx(smax, rel=1e-6)
    if rho == 7.0:  # diffusers hard-codes rho = 7
        ref = ref_sched._convert_to_karras(in_sigmas=torch.tensor([smax, smin]), num_inference_steps=n)
        assert _rel_err(ours[:-1], ref) <= TOL
    ramp = np.linspace(0, 1, n)  # Karras et al. eq. 5 for any rho
    eq5 = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert _rel_err(ours[:-1], eq5) <= TOL


@pytest.mark.parametrize("n, shift", [(28, 3.0), (50, 1.0), (4, 3.0), (20, 6.0)])
def test_flow_sigmas_match_flow_match_euler(n, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ours = FM.flow_sigmas(n, shift=shift)
    assert ours.shape == (n + 1,) and ours[-1] == 0
    assert _abs_err(ours, ref.sigmas) <= TOL


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_flow_sigmas_with_flux_dynamic_shift(mu):
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(12, mu=mu)
    assert _abs_err(FM.flow_sigmas(12, mu=mu), ref.sigmas) <= TOL


def test_training_sigmas_of_flow_scheduler_are_shifted_times():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    assert _abs_err(FM.shift_sigmas(t, 3.0), ref.sigmas) <= TOL


def test_add_noise_matches_ddpm_scheduler():
    ref = _ddpm("scaled_linear", None, None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 300, 998, 999])
    xt, noise = S.add_noise(x0, t, S.alphas_cumprod(S.make_betas("scaled_linear")), generator=g)
    assert _abs_err(xt, ref.add_noise(x0, noise, t)) <= TOL


def test_flow_add_noise_matches_scale_noise():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    idx = torch.tensor([0, 100, 500, 999])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 16, 4, 4, generator=g)
    xt, noise = FM.flow_add_noise(x0, ref.sigmas[idx], generator=g)
    assert _abs_err(xt, ref.scale_noise(x0, ref.timesteps[idx], noise)) <= TOL


def test_add_noise_is_seeded_and_preserves_variance():
    ac = S.alphas_cumprod(S.make_betas("cosine"))
    x0 = torch.randn(20000, 8, generator=torch.Generator().manual_seed(2))
    a, na = S.add_noise(x0, 400, ac, generator=torch.Generator().manual_seed(3))
    b, nb = S.add_noise(x0, 400, ac, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(na, nb)
    assert abs(a.var().item() - 1) < 0.03
    corr = ((a * x0).mean() / x0.pow(2).mean()).item()
    assert abs(corr - ac[400].sqrt().item()) < 0.02


def test_snr_and_min_snr_weights_match_diffusers_training_utils():
    ref = _ddpm("scaled_linear", None, None)
    t = torch.tensor([0, 10, 200, 500, 999])
    ac = S.alphas_cumprod(S.make_betas("scaled_linear"))
    ours = S.snr(ac)[t]
    ref_snr = compute_snr(ref, t)
    assert _rel_err(ours, ref_snr) <= TOL
    gamma = 5.0
    mse_w = torch.stack([ref_snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]  # diffusers' train scripts
    assert _rel_err(S.min_snr_weights(ours, gamma, "epsilon"), mse_w / ref_snr) <= TOL
    assert _rel_err(S.min_snr_weights(ours, gamma, "v_prediction"), mse_w / (ref_snr + 1)) <= TOL
    assert _rel_err(S.min_snr_weights(ours, gamma, "sample"), mse_w) <= TOL


def test_sigma_conversions():
    ac = S.alphas_cumprod(S.make_betas("linear"))
    sig = S.sigmas_from_alphas_cumprod(ac)
    assert _rel_err(sig, ((1 - ac.double()) / ac.double()).sqrt()) <= TOL
    assert _abs_err(S.alphas_cumprod_from_sigmas(sig), ac) <= TOL
    assert _rel_err(S.snr(ac), sig.double() ** -2) <= 1e-5
    assert _abs_err(S.t_to_sigma(torch.arange(1000), ac), sig) <= TOL
    t = torch.tensor([0.0, 0.5, 12.3, 640.75, 999.0])
    assert _abs_err(S.sigma_to_t(S.t_to_sigma(t, ac), ac), t) < 0.05  # log- vs linear interpolation
    assert _abs_err(S.sigma_to_t(sig[[3, 400, 998]], ac), torch.tensor([3.0, 400.0, 998.0])) < 1e-3


def test_flow_snr_and_karras_sigma():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert _abs_err(FM.flow_snr(t), ((1 - t) / t) ** 2) <= TOL
    assert _abs_err(FM.flow_to_karras_sigma(t), t / (1 - t)) <= TOL
    assert _abs_err(FM.flow_snr(t), FM.flow_to_karras_sigma(t) ** -2) <= 1e-9


def test_logit_normal_timesteps_are_seeded_and_logit_normal():
    a = FM.logit_normal_timesteps(50000, 0.5, 0.8, generator=torch.Generator().manual_seed(0))
    b = FM.logit_normal_timesteps(50000, 0.5, 0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1
    z = torch.logit(a.double())
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.8) < 0.02


def test_timestep_spacing_values():
    assert S.timestep_spacing(10, spacing="leading", steps_offset=1).tolist() == [901, 801, 701, 601, 501, 401,
                                                                                   301, 201, 101, 1]
    assert S.timestep_spacing(4, spacing="trailing").tolist() == [999, 749, 499, 249]
    assert S.timestep_spacing(3).tolist() == [999.0, 499.5, 0.0]


@pytest.mark.parametrize("call, argument, fragment", [
    (lambda: S.make_betas("quadratic"), "name", "'linear', 'scaled_linear', 'cosine'"),
    (lambda: S.make_betas("linear", 1), "num_train_timesteps", "got 1"),
    (lambda: S.make_betas("linear", beta_start=0.1, beta_end=0.01), "beta_start", "beta_end=0.01"),
    (lambda: S.make_betas("cosine", beta_start=0.1), "beta_start", "None"),
    (lambda: S.add_noise(torch.zeros(2, 3), torch.tensor([0, 1000]),
                         S.alphas_cumprod(S.make_betas("linear"))), "t", "[0, 1000)"),
    (lambda: S.add_noise(torch.zeros(2, 3), torch.tensor([-1, 3]),
                         S.alphas_cumprod(S.make_betas("linear"))), "t", "from -1"),
    (lambda: S.add_noise(torch.zeros(2, 3), torch.tensor([0.5, 3.0]),
                         S.alphas_cumprod(S.make_betas("linear"))), "t", "torch.float32"),
    (lambda: S.add_noise(torch.zeros(2, 3), torch.tensor([0, 1, 2]),
                         S.alphas_cumprod(S.make_betas("linear"))), "t", "(3,)"),
    (lambda: S.add_noise(torch.zeros(2, 3), 5, S.alphas_cumprod(S.make_betas("linear")),
                         noise=torch.zeros(2, 4)), "noise", "(2, 4)"),
    (lambda: FM.flow_add_noise(torch.zeros(2, 3), torch.tensor([0.5, 1.5])), "t", "1.5"),
    (lambda: S.t_to_sigma(1000.0, S.alphas_cumprod(S.make_betas("linear"))), "t", "1000.0"),
    (lambda: S.karras_sigmas(0, 0.1, 10.0), "n", "got 0"),
    (lambda: S.karras_sigmas(10, 10.0, 0.1), "sigma_min", "sigma_min=10.0"),
    (lambda: S.karras_sigmas(10, 1.0, 1.0), "sigma_min", "sigma_max=1.0"),
    (lambda: FM.flow_sigmas(0), "num_inference_steps", "got 0"),
    (lambda: S.timestep_spacing(10, spacing="uniform"), "spacing", "'linspace', 'leading', 'trailing'"),
    (lambda: S.timestep_spacing(2000), "num_inference_steps", "2000"),
    (lambda: S.min_snr_weights(torch.ones(3), 5.0, "flow"), "prediction_type", "'epsilon'"),
    (lambda: FM.logit_normal_timesteps(0), "n", "got 0"),
    (lambda: FM.shift_sigmas(torch.tensor(0.5), 0.0), "shift", "got 0.0"),
])
def test_bad_input_names_argument_given_and_expected(call, argument, fragment):
    with pytest.raises(ValueError, match=rf"^{argument}\b.*expected") as info:
        call()
    assert fragment in str(info.value)


NAN, INF = float("nan"), float("inf")
AC_LINEAR = S.alphas_cumprod(S.make_betas("linear"))


@pytest.mark.parametrize("call, pattern", [
    (lambda: S.karras_sigmas(10, 0.03, 14.6, rho=NAN), r"^rho: expected a finite number, got nan"),
    (lambda: S.karras_sigmas(10, 0.03, INF), r"^sigma_max: expected a finite number, got inf"),
    (lambda: S.karras_sigmas(10, NAN, 14.6), r"^sigma_min: expected a finite number, got nan"),
    (lambda: FM.flow_sigmas(28, shift=NAN), r"^shift: expected a finite number, got nan"),
    (lambda: FM.flow_sigmas(28, mu=INF), r"^mu: expected a finite number, got inf"),
    (lambda: FM.shift_sigmas(torch.tensor([0.5, NAN]), 3.0), r"^t: expected finite values, got 1 NaN"),
    (lambda: FM.flow_add_noise(torch.zeros(2, 3), torch.tensor([0.5, NAN])), r"^t: expected finite values, got 1 NaN"),
    (lambda: S.t_to_sigma(torch.tensor([3.0, NAN]), AC_LINEAR), r"^t: expected finite values, got 1 NaN"),
    (lambda: S.t_to_sigma(torch.tensor([INF]), AC_LINEAR), r"^t: expected finite values, got 0 NaN and 1 inf"),
    (lambda: S.sigma_to_t(torch.tensor([NAN]), AC_LINEAR), r"^sigma: expected noise levels >= 0"),
    (lambda: S.sigma_to_t(torch.tensor([-1.0]), AC_LINEAR), r"^sigma: expected noise levels >= 0"),
    (lambda: S.make_betas("linear", beta_start=NAN), r"^beta_start: expected a finite number, got nan"),
    (lambda: S.alphas_cumprod(torch.tensor([0.1, INF])), r"^betas: expected finite values, got 0 NaN and 1 inf"),
    (lambda: S.alphas_cumprod(torch.tensor([0.1, 1.5])), r"^betas: expected values in \[0, 1\]"),
    (lambda: FM.logit_normal_timesteps(10, std=NAN), r"^std: expected a finite number, got nan"),
    (lambda: S.min_snr_weights(torch.ones(3), gamma=NAN), r"^gamma: expected a finite number, got nan"),
    (lambda: S.discrete_sigmas(torch.tensor([0.9, NAN]), 1), r"^alphas_cumprod: expected finite values"),
])
def test_non_finite_input_is_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("betas", [torch.tensor([0.02]), torch.tensor([])])
def test_zero_terminal_snr_needs_at_least_two_betas(betas):
    with pytest.raises(ValueError, match=r"^betas: expected at least 2 values \(T,\), got [01]"):
        S.rescale_zero_terminal_snr(betas)


def test_zero_terminal_snr_needs_a_schedule_that_loses_signal():
    with pytest.raises(ValueError, match=r"^betas: expected a schedule that loses signal"):
        S.rescale_zero_terminal_snr(torch.tensor([0.1, 0.0, 0.0]))


@pytest.mark.parametrize("t, pattern", [
    (torch.tensor([0, 1000]), r"^t: expected timesteps in \[0, 1000\), got values from 0 to 1000"),
    (torch.tensor([-1, 5]), r"^t: expected timesteps in \[0, 1000\), got values from -1 to 5"),
    (np.array([3, 1200]), r"^t: expected timesteps in \[0, 1000\), got values from 3 to 1200"),
    (np.int64(-3), r"^t: expected timesteps in \[0, 1000\), got values from -3 to -3"),
    (True, r"^t: expected integer timestep indices in \[0, 1000\), got a torch.bool tensor"),
])
def test_discrete_timesteps_outside_the_schedule_are_refused(t, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.check_timesteps(t, 1000)
    with pytest.raises(ValueError, match=pattern):
        S.add_noise(torch.zeros(2, 3) if np.ndim(t) else torch.zeros(1, 3), t, AC_LINEAR)


@pytest.mark.parametrize("n, T, offset, room", [(10, 1000, 100, 99), (1000, 1000, 1, 0), (3, 10, 4, 3)])
def test_steps_offset_past_the_schedule_is_refused(n, T, offset, room):
    assert S.timestep_spacing(n, T, "leading", steps_offset=room).max() == T - 1  # the largest offset that fits
    with pytest.raises(ValueError, match=rf"^steps_offset: expected at most {room} .*got {offset}"):
        S.timestep_spacing(n, T, "leading", steps_offset=offset)
    with pytest.raises(ValueError, match=rf"^steps_offset: expected at most {room}"):
        S.discrete_sigmas(S.alphas_cumprod(S.make_betas("linear", T)), n, "leading", steps_offset=offset)
    with pytest.raises(ValueError, match=r"^steps_offset: expected an integer >= 0, got -1"):
        S.timestep_spacing(n, T, "leading", steps_offset=-1)


def test_numpy_integers_count_as_integers_and_bools_do_not():
    assert torch.equal(S.make_betas("linear", np.int64(50)), S.make_betas("linear", 50))
    assert torch.equal(S.timestep_spacing(np.int32(10), np.int64(1000), "leading", np.int64(1)),
                       S.timestep_spacing(10, 1000, "leading", 1))
    assert torch.equal(S.karras_sigmas(np.int64(5), 0.1, 10.0), S.karras_sigmas(5, 0.1, 10.0))
    assert torch.equal(FM.flow_sigmas(np.int16(8), shift=np.float32(3.0)), FM.flow_sigmas(8, shift=3.0))
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    xt, _ = S.add_noise(x0, np.int64(10), AC_LINEAR, generator=torch.Generator().manual_seed(1))
    ref, _ = S.add_noise(x0, 10, AC_LINEAR, generator=torch.Generator().manual_seed(1))
    assert torch.equal(xt, ref)
    with pytest.raises(TypeError, match=r"^num_train_timesteps: expected an integer, got True"):
        S.make_betas("linear", True)
    with pytest.raises(TypeError, match=r"^n: expected an integer, got True"):
        S.karras_sigmas(True, 0.1, 10.0)
    with pytest.raises(TypeError, match=r"^steps_offset: expected an integer, got False"):
        S.timestep_spacing(10, spacing="leading", steps_offset=False)
