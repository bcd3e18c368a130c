"""The public API's contract, one property-based test per class of defect (Hypothesis).

Each test generates hostile inputs of one kind and checks, over every public function that takes
such an argument, that the input is either handled as documented or refused with an error that
starts with the argument's name: never a silent wrong result, never a raw internal error. The
examples a hostile-input pass found are pinned with `@example`, so each stays a case.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tinydit import data, dit, edit, guidance, safety, validation
from tinydit.pipeline import TextToImagePipeline, _check_sampler
from tinydit.samplers import SAMPLERS


FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "big", "the", "cat", "é", "  "]
PROMPT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join).filter(str.strip)


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


# 1. A bare string where a list of prompts is expected is one prompt, never its characters.
@FAST
@given(prompt=PROMPT)
@example(prompt="a red circle")
def test_a_bare_string_is_one_prompt_everywhere(pipe, prompt):
    assert validation.check_prompts("prompt", prompt) == [prompt]
    one, listed = pipe.encode(prompt), pipe.encode([prompt])
    assert one.tokens.shape[0] == 1 and torch.equal(one.tokens, listed.tokens)
    args = guidance.guidance_args(pipe.text_encoder, prompt)
    assert args["context"].shape[0] == 1
    assert pipe.text_encoder.encode(prompt).tokens.shape[0] == 1
    words = safety.PromptFilter(["red"])
    assert words.check(prompt) == words.check([prompt])
    checker = safety.SafetyChecker(prompt_filter=words)
    _, flags, _ = checker([Image.new("RGB", (32, 32))], prompt)
    assert flags == [bool(words.check([prompt])[0])]


@FAST
@given(bad=st.one_of(st.integers(), st.none(), st.just([]), st.lists(st.integers(), min_size=1, max_size=3)))
def test_what_is_not_a_prompt_is_refused_by_name(bad):
    with pytest.raises((TypeError, ValueError), match=r"^prompts?(\[\d+\])?: "):
        validation.check_prompts("prompt", bad)


# 2. Images outside what the code assumes: any PIL mode, empty images, 0-255 or NaN tensors.
@FAST
@given(level=st.integers(0, 65535), mode=st.sampled_from(["I;16", "I"]))
@example(level=1000, mode="I;16")
def test_deep_greyscale_is_scaled_not_clipped_to_white(level, mode):
    img = Image.fromarray(np.full((8, 8), level, dtype=np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    got = data.pil_to_tensor(img)  # (3, 8, 8) in [-1, 1]
    top = 65535 if mode == "I;16" or level > 255 else 255
    assert abs(float(got.mean()) - (round(level / top * 255) / 127.5 - 1)) < 1e-5


@FAST
@given(lo=st.floats(-300, 300), span=st.floats(0, 300), nan=st.booleans())
@example(lo=0.0, span=255.0, nan=False)  # a 0-255 tensor
@example(lo=-1.0, span=2.0, nan=True)  # NaN pixels
def test_a_source_tensor_is_in_range_or_refused(lo, span, nan):
    x = torch.linspace(lo, lo + span, 3 * 8 * 8).reshape(3, 8, 8)
    if nan:
        x[0, 0, 0] = float("nan")
    if nan or lo < -1.01 or lo + span > 1.01:
        with pytest.raises(ValueError, match=r"^image: "):
            edit.load_rgb("image", x)
    else:
        assert edit.load_rgb("image", x).size == (8, 8)


@pytest.mark.parametrize("size", [(0, 0), (0, 8), (8, 0)])
def test_an_empty_image_is_refused(size):
    with pytest.raises(ValueError, match=r"^img: .*empty"):
        data.pil_to_tensor(Image.new("RGB", size))


def test_a_source_far_larger_than_the_model_is_resized_with_a_warning_before_any_work():
    pipe = edit.Img2ImgPipeline.from_pretrained()
    with pytest.warns(UserWarning, match=r"^image: 512x512 is far larger .* resized to 32x32"):
        out = pipe("a red circle", Image.new("RGB", (512, 512), "white"), strength=0.5, num_inference_steps=2,
                   disable=True)
    assert out.images[0].size == (32, 32)


# 3. Parameters out of range or of the wrong type, refused by name.
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.text(max_size=3),
                    st.none())


@FAST
@given(blur=NUMBERS)
@example(blur=-3.0)
@example(blur=float("nan"))
@example(blur="2")
def test_blur(blur):
    img, mask = torch.zeros(1, 3, 8, 8), torch.ones(1, 8, 8)  # (B, 3, H, W), (1, H, W)
    ok = isinstance(blur, (int, float)) and not isinstance(blur, bool) and math.isfinite(blur) and 0 <= blur <= 8
    if ok:
        assert edit.composite(img, img, mask, blur=blur).shape == img.shape
    else:
        with pytest.raises((TypeError, ValueError), match=r"^blur: "):
            edit.composite(img, img, mask, blur=blur)


@FAST
@given(soft=st.one_of(st.text(max_size=3), st.integers(2, 5), st.none()),
       repaint=st.one_of(st.tuples(st.integers(-2, 4)), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
                         st.text(max_size=4), st.tuples(st.floats(0.5, 3), st.integers(1, 3))))
@example(soft="no", repaint=(2,))
@example(soft="no", repaint=(2, 2, 2))
@example(soft="no", repaint="4,4")
def test_edit_options(soft, repaint):
    with pytest.raises((TypeError, ValueError), match=r"^soft: "):
        edit._check_edit_options(soft, 0.0, None)
    with pytest.raises((TypeError, ValueError), match=r"^repaint"):
        edit._check_edit_options(False, 0.0, repaint)


@FAST
@given(mode=st.text(max_size=8), progress=st.floats(allow_nan=False))
@example(mode="bogus", progress=0.5)
@example(mode="cosine", progress=2.0)
def test_scheduled_scale(mode, progress):
    if mode in guidance.MODES and (mode == "constant" or 0 <= progress <= 1):
        assert guidance.scheduled_scale(5.0, mode, progress) >= 0
    else:
        with pytest.raises(ValueError, match=r"^(mode|progress): "):
            guidance.scheduled_scale(5.0, mode, progress)


@FAST
@given(t=st.floats(allow_nan=True, allow_infinity=True))
@example(t=1e9)
@example(t=-5.0)
def test_dit_timesteps_in_range_or_refused(t):
    model = dit.DiT(dit.DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                                  num_classes=3))
    x = torch.zeros(1, 4, 4, 4)
    if math.isfinite(t) and 0 <= t <= dit.MAX_TIMESTEP:
        assert model(x, torch.tensor([t])).shape[0] == 1
    else:
        with pytest.raises(ValueError, match=r"^t: "):
            model(x, torch.tensor([t]))


@pytest.mark.parametrize("returns", [lambda x: (x,), lambda x: x.numpy(), lambda x: {"sample": x}])
def test_a_denoiser_that_returns_no_tensor_is_named(returns):
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    with pytest.raises(TypeError, match=r"^model: expected the denoiser to return a tensor"):
        SAMPLERS["euler"](lambda x, s: returns(x), torch.ones(1, 2), sigmas, disable=True)


@FAST
@given(callback=st.one_of(st.integers(), st.text(max_size=3), st.just([])))
def test_a_callback_that_cannot_be_called_is_refused_before_the_first_step(callback):
    calls = []
    with pytest.raises(TypeError, match=r"^callback: "):
        SAMPLERS["euler"](lambda x, s: calls.append(1) or x, torch.ones(1, 2), torch.tensor([2.0, 0.0]),
                          callback=callback, disable=True)
    assert not calls


# 4. Counts that do not match are refused, not passed on.
@FAST
@given(n_images=st.integers(1, 4), n_reasons=st.integers(0, 5))
def test_a_checker_must_answer_for_every_image(n_images, n_reasons):
    class Checker:
        def check(self, images):
            return [False] * n_reasons, [[] for _ in range(n_reasons)]

    images = [Image.new("RGB", (8, 8))] * n_images
    checker = safety.SafetyChecker(image_checkers=[Checker()])
    if n_reasons == n_images:
        assert checker(images, "a red circle")[1] == [False] * n_images
    else:
        with pytest.raises(ValueError, match=r"^image_checkers: "):
            checker(images, "a red circle")


@FAST
@given(n_images=st.integers(1, 4), n_prompts=st.integers(1, 5))
def test_prompts_are_one_for_all_images_or_one_each(n_images, n_prompts):
    checker = safety.SafetyChecker(prompt_filter=safety.PromptFilter(["red"]))
    images, prompts = [Image.new("RGB", (8, 8))] * n_images, ["a red circle"] * n_prompts
    if n_prompts in (1, n_images):
        assert len(checker(images, prompts)[1]) == n_images
    else:
        with pytest.raises(ValueError, match=r"^prompts: "):
            checker(images, prompts)


# 6. Devices that do not exist here are refused up front, 'meta' wherever a model must run.
@FAST
@given(device=st.one_of(st.sampled_from(["cpu", "meta", "mps", "xpu", "cuda", "cuda:7", "gpu", "tpu", ""]),
                        st.text(max_size=6)))
def test_devices(device):
    try:
        got = validation.check_device("device", device)
    except ValueError as e:
        assert str(e).startswith("device: ")
    else:
        torch.zeros(1, device=got)  # a device it accepts is one that works here
        assert got.type != "meta"


@pytest.mark.parametrize("device", ["mps", "meta", "cuda:7", "tpu"])
def test_the_pipeline_refuses_a_device_before_moving_anything(pipe, device):
    with pytest.raises(ValueError, match=r"^device: "):
        pipe.to(device)
    assert pipe.device.type == "cpu"


# 8. Maths that would produce NaN.
@FAST
@given(value=st.floats(-10, 10), phi=st.floats(0, 1))
def test_rescale_of_a_constant_prediction_is_finite(value, phi):
    flat = torch.full((2, 4, 8, 8), value)
    assert bool(torch.isfinite(guidance.rescale_cfg(flat, flat.clone(), phi)).all())


# 9. Errors name the argument the caller got wrong.
@FAST
@given(strength=st.floats(0.001, 1.0), steps=st.integers(1, 30))
@example(strength=0.04, steps=20)
def test_a_strength_that_runs_no_step_names_strength(strength, steps):
    if int(steps * strength) >= 1:
        assert edit._check_strength(strength, steps) == strength
    else:
        with pytest.raises(ValueError, match=r"^strength: "):
            edit._check_strength(strength, steps)


def test_inpainting_without_a_mask_asks_for_one():
    pipe = edit.InpaintPipeline.from_pretrained()
    with pytest.raises(ValueError, match=r"^mask_image: inpainting needs a mask"):
        pipe("a red circle", Image.new("RGB", (32, 32)), None)


# 10. A sampler that does not fit the model is refused by name, listing the ones that do.
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_fit_the_model(name, prediction):
    if name == "euler_ancestral_rf" and prediction != "flow":
        with pytest.raises(ValueError, match=r"^sampler: 'euler_ancestral_rf' is for rectified-flow models"):
            _check_sampler(name, prediction)
    else:
        assert _check_sampler(name, prediction) == name


def test_generate_with_a_flow_sampler_on_the_book_model_names_the_mismatch(pipe):
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"^sampler: .*rectified-flow.*v_prediction"):
        pipe("a red circle", sampler="euler_ancestral_rf", num_inference_steps=2, disable=True)


# The first hour: a word the book model never saw is named, not silently read as <unk>.
@FAST
@given(word=st.sampled_from(["pink", "hexagon", "cat", "photo"]))
def test_unknown_words_are_named(pipe, word):
    with pytest.warns(UserWarning, match=rf"^prompts\[0\]: '{word}' not in the CLIP text encoder's vocabulary"):
        pipe.text_encoder.encode([f"a red {word}"])


# 9. An all-padding row of the unconditional mask is named as uncond_mask, not as context_mask.
@pytest.mark.parametrize("which", ["context_mask", "uncond_mask"])
def test_an_empty_mask_row_names_its_argument(pipe, which):
    args = guidance.guidance_args(pipe.text_encoder, ["a red circle", "a blue square"])
    args[which] = args[which].clone()
    args[which][1] = False
    D = guidance.CFGDenoiser(pipe.sampling.denoiser(pipe.transformer), 3.0)
    with pytest.raises(ValueError, match=rf"^{which}: row 1 marks no token as real"):
        D(torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 1.0]), **args)


# 7. Resuming from a damaged checkpoint is refused before the trainer is touched.
@pytest.mark.parametrize("damage", [
    {"step": -5}, {"step": 2.5}, {"step": True}, {"config": "not json {"}, {"config": "[1, 2]"},
    {"optimizer": {}}, {"optimizer": {"state": {}, "param_groups": []}}, {"losses": [0.1, 0.2]},
])
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, damage):
    from tinydit import train

    state = {"model": {}, "ema": {}, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "scheduler": {},
             "step": 2, "config": "{}", "rng_torch": torch.get_rng_state(), "losses": torch.tensor([0.1, 0.2]),
             **damage}
    torch.save(state, tmp_path / "step-00000002.pt")
    with pytest.raises(ValueError, match=r"^resume: .* is damaged"):
        train._load_training_state(tmp_path / "step-00000002.pt")
