"""Guidance (chapter 11): parity of the cures with diffusers (`rescale_noise_cfg`,
`DDPMScheduler._threshold_sample`, `normalized_guidance` with its `MomentumBuffer`), the mimic scale
against an independent loop transcription of sd-dynamic-thresholding's rule and its defining property,
the batched wrapper with every sampler, negative prompts, padding, the interval, the saturation
measures, and bad input.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.guider_utils import rescale_noise_cfg

from tinydit import schedules
from tinydit.denoisers import DiscreteDenoiser
from tinydit.evaluate import eval_scenes, render_scenes
from tinydit.guidance import (
    APG,
    CFGDenoiser,
    GuidanceStep,
    Mimic,
    Rescale,
    Threshold,
    dynamic_threshold,
    from_space,
    guidance_args,
    mimic_cfg,
    rescale_cfg,
    scheduled_scale,
    to_space,
)
from tinydit.guidance_study import Guided, generate_guided, palette_error, saturation
from tinydit.pipeline import TextToImagePipeline
from tinydit.samplers import SAMPLERS
from tinydit.textdit import TextDiT, TextDiTConfig
from tinydit.vae import load_book_vae


AC = schedules.alphas_cumprod(schedules.make_betas("linear"))  # (1000,): the book model's schedule
WIDTH = 16  # token width of the tiny text DiT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_text_dit(seed=0, dtype=torch.float32):
    """A random 1-block text DiT whose output depends on x, t and the tokens (adaLN-Zero would start as 0)."""
    torch.manual_seed(seed)
    net = TextDiT(TextDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                                learn_sigma=False, context_dim=WIDTH))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.to(dtype).eval().requires_grad_(False)


def conditioning(batch=2, t=5, t_uncond=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx, u_ctx = torch.randn(batch, t, WIDTH, generator=g, dtype=dtype), torch.randn(batch, t_uncond, WIDTH, generator=g, dtype=dtype)
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[0, -2:] = False
    return dict(context=ctx, context_mask=mask, uncond_context=u_ctx, uncond_mask=torch.ones(batch, t_uncond, dtype=torch.bool))


def padded(args):
    """The same conditioning with the uncond tokens padded to the cond length by hand (masked zeros)."""
    T, (B, Tu, D) = args["context"].shape[1], args["uncond_context"].shape
    pad = torch.cat([args["uncond_context"], args["uncond_context"].new_zeros(B, T - Tu, D)], 1)
    return {**args, "uncond_context": pad, "uncond_mask": torch.cat([args["uncond_mask"], torch.zeros(B, T - Tu, dtype=torch.bool)], 1)}


def toy_D(x, sigma, context, context_mask=None):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    w = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return x / (1 + s**2) + context.mean((1, 2)).reshape(-1, 1, 1, 1) * w


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 16, 5), (1, 4, 2, 8, 8)])
def test_rescale_cfg_matches_diffusers(phi, shape):
    g = torch.Generator().manual_seed(1)
    cond, cfg = torch.randn(shape, generator=g), 6 * torch.randn(shape, generator=g) + 0.5
    assert (rescale_cfg(cond, cfg, phi) - rescale_noise_cfg(cfg, cond, phi)).abs().max() <= 1e-6


@pytest.mark.parametrize("percentile", [0.5, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("max_value", [1.0, 1.5, 10.0])
@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_dynamic_threshold_matches_diffusers(percentile, max_value, spread):
    x0 = spread * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ddpm = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=percentile, sample_max_value=max_value)
    assert (dynamic_threshold(x0, percentile, max_value) - ddpm._threshold_sample(x0)).abs().max() <= 1e-6
    half = dynamic_threshold(x0.half(), percentile, max_value)  # upcast for the quantile, back to fp16
    assert half.dtype == torch.float16 and (half.float() - ddpm._threshold_sample(x0.half()).float()).abs().max() <= 1e-3


@pytest.mark.parametrize("prediction, space", [("v_prediction", "v"), ("epsilon", "eps")])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescale_in_prediction_space_matches_diffusers_pipeline(prediction, space, phi):
    """Rescale on the denoiser's x0 = a diffusers pipeline rescaling the network's own v / eps outputs."""
    net = tiny_text_dit(dtype=torch.float64)
    D = DiscreteDenoiser(net, AC, prediction=prediction)
    args = {k: v.double() if v.is_floating_point() else v for k, v in padded(conditioning()).items()}
    x, sigma = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([4.0, 4.0], dtype=torch.float64)
    ours = CFGDenoiser(D, 7.5, Rescale(phi, space))(x, sigma, **args)
    s, t = sigma[:, None, None, None], D.sigma_to_t(sigma)
    out_c = net(x / (s**2 + 1) ** 0.5, t, context=args["context"], context_mask=args["context_mask"])
    out_u = net(x / (s**2 + 1) ** 0.5, t, context=args["uncond_context"], context_mask=args["uncond_mask"])
    theirs = from_space(space, rescale_noise_cfg(out_u + 7.5 * (out_c - out_u), out_c, phi), x, sigma)
    assert (ours - theirs).abs().max() <= 1e-9


def test_spaces_round_trip():
    x, x0, sigma = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 9.0], dtype=torch.float64)
    for space in ("v", "eps", "x0"):
        torch.testing.assert_close(from_space(space, to_space(space, x0, x, sigma), x, sigma), x0)


@pytest.mark.parametrize("eta, r, momentum", [(0.0, 0.0, 0.0), (0.0, 2.0, -0.5), (0.5, 0.0, 0.3), (1.0, 5.0, -0.75)])
def test_apg_matches_diffusers_normalized_guidance(eta, r, momentum):
    """Five calls of a run: ours at scale w vs diffusers' original formulation at scale w - 1."""
    g = torch.Generator().manual_seed(3)
    cure, state, buffer = APG(eta, r, momentum), {}, (MomentumBuffer(momentum) if momentum else None)
    for _ in range(5):
        cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        step = GuidanceStep(torch.zeros(2, 4, 8, 8), torch.ones(2), cond, uncond, 6.0, 0.0, state)
        ref = normalized_guidance(cond, uncond, 5.0, buffer, eta, r, use_original_formulation=True)
        assert (cure(step, None) - ref).abs().max() <= 1e-6


def test_apg_through_wrapper_and_reset_between_runs():
    net = tiny_text_dit()
    D = DiscreteDenoiser(net, AC, prediction="v_prediction")
    args, sigmas = conditioning(), DiscreteDenoiser(net, AC).get_sigmas(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    guided = CFGDenoiser(D, 5.0, APG(0.0, 3.0, momentum=-0.5), sigmas=sigmas)
    first = SAMPLERS["dpmpp_2m"](guided, x, sigmas, extra_args=args, disable=True)
    again = SAMPLERS["dpmpp_2m"](guided, x, sigmas, extra_args=args, disable=True)  # a new run: momentum restarts
    assert torch.equal(first, again)
    # the same run by hand: momentum over the calls, diffusers' buffer
    buffer = MomentumBuffer(-0.5)
    fresh = CFGDenoiser(D, 1.0)  # the conditional branch alone

    def by_hand(x, sigma, **cond):
        c = fresh(x, sigma, context=cond["context"], context_mask=cond["context_mask"])
        u = fresh(x, sigma, context=cond["uncond_context"], context_mask=cond["uncond_mask"])
        return normalized_guidance(c, u, 4.0, buffer, 0.0, 3.0, use_original_formulation=True)

    reference = SAMPLERS["dpmpp_2m"](by_hand, x, sigmas, extra_args=args, disable=True)
    assert (first - reference).abs().max() <= 1e-5


# ---------------------------------------------------------------- the mimic scale


def dynthres_reference(cond, uncond, scale, mimic, percentile, phi):
    """sd-dynamic-thresholding's rule (MEAN startpoint, AD variability, separate channels), one
    (sample, channel) at a time in numpy: an independent transcription."""
    cond, uncond = cond.double().numpy(), uncond.double().numpy()
    cfg, mim = uncond + scale * (cond - uncond), uncond + mimic * (cond - uncond)
    out = np.empty_like(cfg)
    for b, c in np.ndindex(cfg.shape[:2]):
        centred, m = cfg[b, c] - cfg[b, c].mean(), mim[b, c] - mim[b, c].mean()
        mim_ref, cfg_ref = np.abs(m).max(), np.quantile(np.abs(centred), percentile)
        top = max(mim_ref, cfg_ref)
        out[b, c] = np.clip(centred, -top, top) / top * mim_ref + cfg[b, c].mean()
    return torch.from_numpy(phi * out + (1 - phi) * cfg)


@pytest.mark.parametrize("percentile", [1.0, 0.995, 0.9])
@pytest.mark.parametrize("phi", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("scale, mimic", [(12.0, 3.0), (2.0, 7.0)])
def test_mimic_matches_reference_transcription(percentile, phi, scale, mimic):
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mimic_cfg(cond, uncond, scale, mimic, percentile, phi),
                               dynthres_reference(cond, uncond, scale, mimic, percentile, phi), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("percentile", [1.0, 0.995, 0.9])
def test_mimic_output_has_the_mimics_spread(percentile):
    """The defining property at phi = 1: per channel, the spread around the CFG result's mean is the
    mimic's (the CFG result is the wider at scale 12 vs 3); at percentile 1 also around its own mean."""
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    cfg, mim = uncond + 12 * (cond - uncond), uncond + 3 * (cond - uncond)
    spread = lambda t, centre: (t - centre).abs().amax((2, 3))  # (B, C)
    out = mimic_cfg(cond, uncond, 12.0, 3.0, percentile)
    torch.testing.assert_close(spread(out, cfg.mean((2, 3), keepdim=True)), spread(mim, mim.mean((2, 3), keepdim=True)))
    if percentile == 1.0:
        torch.testing.assert_close(spread(out, out.mean((2, 3), keepdim=True)), spread(mim, mim.mean((2, 3), keepdim=True)))


def test_scheduled_scales_and_progress():
    assert scheduled_scale(7.0, "constant", 0.3) == 7.0
    assert scheduled_scale(7.0, "linear", 0.25, 1.0) == pytest.approx(5.5)
    assert scheduled_scale(7.0, "cosine", 1.0, 1.0) == pytest.approx(1.0)
    assert scheduled_scale(7.0, "cosine", 0.0, 1.0) == pytest.approx(7.0)
    seen = []
    record = lambda step, guided: (seen.append(step.progress), guided)[1]
    sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0])
    guided = CFGDenoiser(toy_D, 3.0, record, sigmas=sigmas)
    x, args = torch.randn(2, 4, 8, 8), conditioning()
    for s in sigmas[:-1]:
        guided(x, s, **args)
    assert seen == pytest.approx([0.0, 0.5, 1.0])  # in log sigma between the first and last level
    with pytest.raises(ValueError, match=r"^mode: 'linear' needs the run's noise levels; pass sigmas="):
        CFGDenoiser(toy_D, 3.0, Mimic(mode="linear"))(x, torch.tensor(1.0), **args)


# ---------------------------------------------------------------- the wrapper


def test_one_batched_forward_and_scale_one_skips_uncond():
    calls = []
    counted = lambda x, sigma, **cond: (calls.append(len(x)), toy_D(x, sigma, **cond))[1]
    x, sigma, args = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0]), padded(conditioning())
    out = CFGDenoiser(counted, 4.0)(x, sigma, **args)
    cond, uncond = toy_D(x, sigma, args["context"]), toy_D(x, sigma, args["uncond_context"])
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    CFGDenoiser(counted, 1.0, Threshold())(x, sigma, **args)
    assert calls == [4, 2]


def test_negative_prompt_broadcast_and_padding():
    net = tiny_text_dit()
    D = DiscreteDenoiser(net, AC, prediction="v_prediction")
    x, sigma, args = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0]), conditioning()
    guided = CFGDenoiser(D, 4.0)
    torch.testing.assert_close(guided(x, sigma, **args), guided(x, sigma, **padded(args)), rtol=1e-5, atol=1e-6)
    one = {**args, "uncond_context": args["uncond_context"][:1], "uncond_mask": args["uncond_mask"][:1]}
    same = {**args, "uncond_context": args["uncond_context"][:1].expand(2, -1, -1), "uncond_mask": args["uncond_mask"][:1].expand(2, -1)}
    torch.testing.assert_close(guided(x, sigma, **one), guided(x, sigma, **same))
    negative = {**args, "uncond_context": torch.randn_like(args["uncond_context"])}
    assert (guided(x, sigma, **negative) - guided(x, sigma, **args)).abs().max() > 1e-3  # the negative matters


def two_call_cfg(D, w):
    """CFG as the formula: two separate forwards, no batching (the reference for the batched wrapper)."""
    def guided(x, sigma, context, context_mask, uncond_context, uncond_mask):
        uncond = D(x, sigma, context=uncond_context, context_mask=uncond_mask)
        return uncond + w * (D(x, sigma, context=context, context_mask=context_mask) - uncond)
    return guided


SAMPLER_NAMES = [n for n in SAMPLERS if n != "euler_ancestral_rf"]  # that one needs a flow model (sigma <= 1)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_runs_the_wrapper(name):
    net = tiny_text_dit()
    D = DiscreteDenoiser(net, AC, prediction="v_prediction")
    sigmas, args = D.get_sigmas(5), padded(conditioning())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * sigmas[0]
    run = lambda model, extra: SAMPLERS[name](model, x, sigmas, extra_args=extra, disable=True,
                                              generator=torch.Generator().manual_seed(8))
    cond_only = dict(context=args["context"], context_mask=args["context_mask"])
    torch.testing.assert_close(run(CFGDenoiser(D, 1.0), args), run(D, cond_only))
    torch.testing.assert_close(run(CFGDenoiser(D, 3.0), args), run(two_call_cfg(D, 3.0), args), rtol=1e-5, atol=1e-5)
    cured = run(CFGDenoiser(D, 8.0, (APG(0.0, 4.0, -0.5), Rescale(0.5)), interval=(0.1, 50.0), sigmas=sigmas), args)
    assert cured.shape == x.shape and bool(torch.isfinite(cured).all())


def test_interval_guides_only_inside():
    calls = []
    counted = lambda x, sigma, **cond: (calls.append(len(x)), toy_D(x, sigma, **cond))[1]
    x, args = torch.randn(2, 4, 8, 8), padded(conditioning())
    guided = CFGDenoiser(counted, 4.0, interval=(0.5, 5.0))
    for s, inside in [(6.0, False), (5.0, True), (0.5, True), (0.4, False)]:
        sigma = torch.full((2,), s)
        cond, uncond = toy_D(x, sigma, args["context"]), toy_D(x, sigma, args["uncond_context"])
        torch.testing.assert_close(guided(x, sigma, **args), uncond + 4.0 * (cond - uncond) if inside else cond)
    assert calls == [2, 4, 4, 2]
    mixed = guided(x, torch.tensor([6.0, 1.0]), **args)  # per sample: the first outside, the second inside
    cond, uncond = toy_D(x, torch.tensor([6.0, 1.0]), args["context"]), toy_D(x, torch.tensor([6.0, 1.0]), args["uncond_context"])
    torch.testing.assert_close(mixed, torch.stack([cond[0], (uncond + 4.0 * (cond - uncond))[1]]))


def test_threshold_cure_bounds_latents():
    x0 = 8 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    step = GuidanceStep(x0, torch.ones(2), x0, x0, 5.0, 0.0, {})
    out = Threshold(0.995, max_value=100.0, bound=3.0)(step, x0)
    assert out.abs().max() <= 3.0 + 1e-5
    small = x0 / 10  # already inside the bound: untouched
    torch.testing.assert_close(Threshold(0.995, 4.0, 3.0)(step, small), small)


# ---------------------------------------------------------------- the book model and the measures


@pytest.fixture(scope="module")
def book_pipe():
    return TextToImagePipeline.from_pretrained()


def test_generate_guided_is_the_pipeline_with_its_raw_decode(book_pipe):
    captions = ["a red circle on the left", "a blue square above a green triangle"]
    ours = generate_guided(book_pipe, captions, [3, 4], scale=3.0, cure=None, steps=4)
    out = book_pipe(captions, seed=[3, 4], guidance_scale=3.0, num_inference_steps=4, output_type="latent", disable=True)
    assert torch.equal(ours.raw, book_pipe.decode(out.latents, clamp=False))  # the same steps, the same latents
    assert torch.equal(ours.images, book_pipe.decode(out.latents))
    assert ours.x0.shape == (2, 4, 8, 8) and ours.raw.shape == (2, 3, 32, 32)
    negative = generate_guided(book_pipe, captions, [3, 4], scale=3.0, cure=None, steps=4, negative_prompt="a red circle")
    assert (negative.images - ours.images).abs().max() > 0


def _guided_by_hand(pipe, captions, seeds, scale, cure, interval, negative_prompt, steps, sampler):
    """generate_guided written out from chapter 08 and 11's parts: the reference it keeps, bit for bit."""
    denoiser = pipe.sampling.denoiser(pipe.transformer)
    sigmas = pipe.sampling.sigmas(denoiser, steps)
    guided = CFGDenoiser(denoiser, scale, cure, interval, sigmas)
    args = guidance_args(pipe.text_encoder, captions, negative_prompt)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    last = {}
    latents = SAMPLERS[sampler](guided, noise * sigmas[0], sigmas, extra_args=args, callback=last.update, disable=True,
                                generator=torch.Generator().manual_seed(seeds[0] + 1))  # the pipeline's fresh-noise seed
    raw = pipe.vae.from_latent(latents.float())
    return Guided(raw.clamp(-1, 1), raw, last["denoised"].float())


@pytest.mark.parametrize("scale, cure, interval, negative, sampler", [
    (2.0, None, None, "", "dpmpp_2m"),
    (6.0, Rescale(0.7), (0.5, 10.0), "a red circle", "dpmpp_2m"),
    (8.0, (APG(momentum=-0.5, norm_threshold=5.0), Threshold(bound=3.0)), None, "", "heun"),
    (9.0, Mimic(3.0, mode="linear"), None, ["", "a cat"], "euler_ancestral"),
])
def test_generate_guided_is_bit_identical_to_the_parts_by_hand(book_pipe, scale, cure, interval, negative, sampler):
    captions, seeds = ["a red circle on the left", "a blue square above a green triangle"], [3, 4]
    with torch.no_grad():
        ref = _guided_by_hand(book_pipe, captions, seeds, scale, cure, interval, negative, 5, sampler)
    out = generate_guided(book_pipe, captions, seeds, scale, cure, interval, negative, 5, sampler)
    for name in ("images", "raw", "x0"):
        if isinstance(negative, list):  # the pipeline's prompt cache encodes "a cat" in another batch: float rounding
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-4)  # measured 1e-5
        else:
            assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_saturation_measures_on_real_renders():
    images = render_scenes(eval_scenes("two", 40))
    vae = load_book_vae()
    with torch.no_grad():
        z = vae.to_latent(images)
        decoded = vae.from_latent(z)
    sat = {k: float(v.nanmean()) for k, v in saturation(Guided(decoded.clamp(-1, 1), decoded, z)).items()}
    assert sat["clipped"] < 0.005 and sat["palette_error"] < 25  # measured 0.0007 and ~13 (100 renders)
    assert 0.5 < sat["mean_abs_x0"] < 1.1  # real latents: about 0.8
    flat = torch.tensor([220, 30, 30]).float().div(127.5).sub(1).reshape(1, 3, 1, 1).expand(1, 3, 8, 8)  # palette red
    assert float(palette_error(flat)) < 1e-3
    assert float(palette_error(torch.ones(1, 3, 8, 8).mul(torch.tensor([1.0, -1.0, -1.0]).reshape(1, 3, 1, 1)))) > 40  # pure red
    assert math.isnan(float(palette_error(torch.ones(1, 3, 8, 8))))  # white: a background, no object


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, pattern", [
    (lambda: CFGDenoiser(toy_D, -1.0), r"^scale: expected a number >= 0, got -1.0"),
    (lambda: CFGDenoiser(toy_D, float("nan")), r"^scale: expected a finite number, got nan"),
    (lambda: CFGDenoiser(toy_D, "4"), r"^scale: expected a number"),
    (lambda: Threshold(percentile=0.0), r"^percentile: expected a fraction in \(0, 1\]"),
    (lambda: Threshold(percentile=1.5), r"^percentile: expected a fraction in \(0, 1\].*got 1.5"),
    (lambda: Mimic(percentile=-0.1), r"^percentile: expected a fraction in \(0, 1\]"),
    (lambda: dynamic_threshold(torch.zeros(1, 4), 99.5), r"^percentile: expected a fraction in \(0, 1\].*99.5"),
    (lambda: dynamic_threshold(torch.zeros(1, 4), 0.9, 0.5), r"^max_value: expected a number >= 1"),
    (lambda: Rescale(phi=1.5), r"^phi: expected a number <= 1"),
    (lambda: Rescale(space="pixels"), r"^space: expected one of 'v', 'eps', 'x0'"),
    (lambda: Mimic(mode="sawtooth"), r"^mode: expected one of 'constant', 'linear', 'cosine'"),
    (lambda: APG(norm_threshold=-1), r"^norm_threshold: expected a number >= 0"),
    (lambda: CFGDenoiser(toy_D, 3.0, interval=(1.0,)), r"^interval: expected \(sigma_lo, sigma_hi\)"),
    (lambda: CFGDenoiser(toy_D, 3.0, cure="rescale"), r"^cure: expected Rescale, Threshold, Mimic, APG"),
])
def test_bad_settings(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        make()


def test_bad_conditioning():
    D = DiscreteDenoiser(tiny_text_dit(), AC, prediction="v_prediction")
    x, sigma, args = torch.randn(2, 4, 8, 8), torch.tensor(2.0), conditioning()
    guided = CFGDenoiser(D, 4.0)
    cases = [
        ({"uncond_context": torch.randn(3, 3, WIDTH), "uncond_mask": None}, r"^uncond_context: expected a batch of 1 or 2 \(x has 2 images\)"),
        ({"context": args["context"][:1], "context_mask": None}, r"^context: expected a batch of 2"),
        ({"context": torch.randn(2, 5, 8), "context_mask": None}, r"^context: expected tokens of width 16 \(the model's context_dim\)"),
        ({"uncond_context": torch.randn(2, 3, 8)}, r"^uncond_context: expected tokens of width 16 \(the width of context\)"),
        ({"uncond_context": None}, r"^uncond_context: needed when the scale is not 1"),
        ({"context_mask": torch.ones(2, 4, dtype=torch.bool)}, r"^context_mask: expected shape \(2, 5\)"),
        ({"context": torch.randn(2, 5)}, r"^context: expected a 3-D tensor"),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            guided(x, sigma, **{**args, **change})
    with pytest.raises(TypeError, match=r"^uncond_mask: expected a boolean mask"):
        guided(x, sigma, **{**args, "uncond_mask": args["uncond_mask"].float()})
