"""tinydit.edit: img2img (SDEdit) and inpainting with the ordinary book model: strength 1 and an
all-white mask equal text-to-image, an all-black mask returns the source, kept pixels are exact after
compositing and kept latents exact before decoding; soft masks, RePaint, cropping; bad input."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tinydit import data
from tinydit.edit import Img2ImgPipeline, InpaintPipeline, mask_bbox, start_index
from tinydit.pipeline import TextToImagePipeline


@pytest.fixture(scope="module")
def pipes():
    pipe = TextToImagePipeline.from_pretrained()
    return pipe, Img2ImgPipeline(**pipe.components), InpaintPipeline(**pipe.components)


@pytest.fixture(scope="module")
def source():
    return data.render_scene(data.sample_scene(0, "test", 5), 32)


def half_mask(left=True):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32) if left else (16, 0, 32, 32))
    return mask


def test_components_are_shared_not_copied(pipes):
    pipe, i2i, inp = pipes
    assert i2i.transformer is pipe.transformer and inp.vae is pipe.vae and inp.text_encoder is pipe.text_encoder


def test_strength_one_is_text_to_image_and_strength_picks_the_steps(pipes, source):
    pipe, i2i, _ = pipes
    a = pipe("a green circle", seed=0, disable=True, output_type="latent").latents
    b = i2i("a green circle", source, strength=1.0, seed=0, disable=True, output_type="latent").latents
    assert torch.equal(a, b)
    assert [start_index(20, s) for s in (1.0, 0.6, 0.05, 0.01)] == [0, 8, 19, 20]
    calls = []
    i2i("a green circle", source, strength=0.6, seed=0, disable=True, callback=calls.append, output_type="latent")
    assert len(calls) == 12  # 20 steps at strength 0.6: the last 12


def test_low_strength_stays_closer_to_the_source(pipes, source):
    _, i2i, _ = pipes
    src = data.pil_to_tensor(source)
    dist = [(data.pil_to_tensor(i2i("a green circle", source, strength=s, seed=0, disable=True).images[0]) - src).abs().mean()
            for s in (0.2, 0.9)]
    assert dist[0] < dist[1]


def test_white_mask_is_text_to_image_black_mask_is_the_source(pipes, source):
    pipe, _, inp = pipes
    a = pipe("a green circle", seed=0, disable=True, output_type="latent").latents
    assert torch.equal(inp("a green circle", source, Image.new("L", (32, 32), 255), seed=0, disable=True).latents, a)
    out = inp("a green circle", source, Image.new("L", (32, 32), 0), seed=0, disable=True)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(source))


@pytest.mark.parametrize("options", [{}, {"soft": True}, {"repaint": (2, 2)}, {"sampler": "euler_ancestral"},
                                     {"blur": 2.0}, {"crop_padding": 2}])
def test_unmasked_pixels_are_exact_after_compositing(pipes, source, options):
    pipe, _, inp = pipes
    out = inp("a green circle on the left", source, half_mask(), seed=0, disable=True, **options)
    assert np.array_equal(np.asarray(out.images[0])[:, 16:], np.asarray(source)[:, 16:])
    if "crop_padding" not in options and "soft" not in options:
        z_src = pipe.vae.to_latent(data.pil_to_tensor(source)[None])
        if options.get("sampler") != "euler_ancestral" and "repaint" not in options:
            assert torch.equal(out.latents[..., 4:], z_src[..., 4:])  # kept cells land exactly on the source


def test_soft_mask_changes_grey_less_than_white(pipes, source):
    _, _, inp = pipes
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    mask[:, :, 16:] = 0.3  # grey: follows the source for the first 70 % of the run
    out = inp("a green circle", source, mask, seed=0, disable=True, soft=True)
    diff = (data.pil_to_tensor(out.images[0]) - data.pil_to_tensor(source)).abs()  # (3, 32, 32)
    assert diff[:, :, 16:].mean() < diff[:, :, :16].mean()


def test_mask_bbox_is_square_padded_and_inside():
    mask = torch.zeros(1, 32, 32)
    mask[:, 10:14, 20:22] = 1
    top, left, bottom, right = mask_bbox(mask, 2, 8)
    assert bottom - top == right - left == 8 and 0 <= top <= 8 and bottom <= 32 and right <= 32
    assert top <= 8 and bottom >= 16 and left <= 18 and right >= 24


def test_mask_of_another_size_is_resized_with_a_warning(pipes, source):
    _, _, inp = pipes
    with pytest.warns(UserWarning, match=r"mask_image: \(64, 64\) differs from the image's \(32, 32\); resized"):
        inp("a green circle", source, Image.new("L", (64, 64), 255), seed=0, num_inference_steps=2, disable=True)


def test_non_rgb_sources_are_converted(pipes, source):
    _, i2i, _ = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = i2i("a green circle", source.convert("RGBA"), strength=0.5, seed=0, num_inference_steps=4, disable=True)
    assert out.images[0].mode == "RGB"
    i2i("a green circle", source.convert("L"), strength=0.5, seed=0, num_inference_steps=4, disable=True)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda i2i, inp, src: i2i("a", src, strength=0), ValueError, r"strength: expected a number in \(0, 1\]"),
    (lambda i2i, inp, src: i2i("a", src, strength=1.5), ValueError, r"strength: expected a number in \(0, 1\]"),
    (lambda i2i, inp, src: i2i("a", "/no/such/file.png"), FileNotFoundError, "image: no image file at"),
    (lambda i2i, inp, src: i2i("a", 3), TypeError, "image: expected a PIL image, a path or a"),
    (lambda i2i, inp, src: i2i("a", src.resize((30, 30))), ValueError, "image: expected sides that are multiples of 8"),
    (lambda i2i, inp, src: inp("a", src, "/no/mask.png"), FileNotFoundError, "mask_image: no image file at"),
    (lambda i2i, inp, src: inp("a", src, torch.full((32, 32), 2.0)), ValueError, r"mask_image: expected values in \[0, 1\]"),
    (lambda i2i, inp, src: inp("a", src, half_mask(), crop_padding=-1), ValueError, "crop_padding: expected an integer >= 0"),
    (lambda i2i, inp, src: inp("a", src, half_mask(), repaint=(0, 2)), ValueError, "jump: expected an integer >= 1"),
])
def test_bad_input_gets_clear_errors(pipes, source, call, error, pattern):
    _, i2i, inp = pipes
    with pytest.raises(error, match=pattern):
        call(i2i, inp, source)
