"""tinydit.safety: the Stable Diffusion checker port against diffusers' class on its real on-disk layout
(a tiny random checker saved by diffusers, every parameter non-zero), the book-world concept checker,
the prompt filter, the pipeline's safety switch, and bad input. No unsafe content anywhere."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tinydit import data
from tinydit.pipeline import TextToImagePipeline
from tinydit.safety import (
    BookConceptChecker,
    ClipPreprocess,
    PromptFilter,
    SafetyChecker,
    StableDiffusionChecker,
    concept_scores,
    normalize_text,
)


def tiny_sd_checker(folder, concept_threshold=0.0, special_threshold=0.3):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=8)
    ref = StableDiffusionSafetyChecker(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        ref.concept_embeds_weights.copy_(torch.linspace(-0.2, 0.6, 17))  # some fire, some do not
        ref.special_care_embeds_weights.fill_(special_threshold)
    ref.save_pretrained(folder / "safety_checker")
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    fe.save_pretrained(folder / "feature_extractor")
    return ref, fe


def random_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
            [(32, 32), (64, 48), (40, 90), (33, 35)]] + [data.render_scene(data.sample_scene(0, "test", 1), 32)]


@pytest.mark.parametrize("special", [0.3, -1.0])  # -1: every special concept hits, so the 0.01 adjustment applies
def test_sd_checker_matches_diffusers(tmp_path, special):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    ref, fe = tiny_sd_checker(tmp_path, special_threshold=special)
    ours = StableDiffusionChecker.from_pretrained(tmp_path)
    images = random_images()
    px_ref = fe(images, return_tensors="pt").pixel_values
    assert torch.equal(ours.preprocess(images), px_ref)  # CLIPImageProcessor's steps, exactly
    with torch.no_grad():
        ref_embeds = ref.visual_projection(ref.vision_model(px_ref)[1])
    err = (ours.embed(px_ref) - ref_embeds).abs().max().item()
    print(f"SD checker: image embeddings max |diff| {err:.1e}")
    assert err < 1e-5  # measured ~1e-7
    _, ref_flags = ref(px_ref.clone(), [np.zeros(3) for _ in images])
    flags, reasons, scores = ours.check(images)
    assert flags == list(ref_flags)
    raw = (cosine_distance(ref_embeds, ref.concept_embeds) - ref.concept_embeds_weights).numpy()  # (B, 17)
    special_hit = ((cosine_distance(ref_embeds, ref.special_care_embeds) - ref.special_care_embeds_weights) > 0).any(1)
    for i, s in enumerate(scores):
        want = raw[i] + 0.01 * bool(special_hit[i])
        np.testing.assert_allclose([s["concept_scores"][j] for j in range(17)], want, atol=5e-4 + 1e-5)  # rounding


def test_sd_checker_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a safety-checker folder; missing config.json"):
        StableDiffusionChecker.from_pretrained(tmp_path)
    tiny_sd_checker(tmp_path)
    (tmp_path / "feature_extractor" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing feature_extractor/preprocessor_config.json"):
        StableDiffusionChecker.from_pretrained(tmp_path)


def test_sequential_special_care_adjustment():
    """diffusers' order: the 0.01 applies to special concepts after the first hit, and to every concept."""
    e = torch.eye(4)[:1]  # one image along axis 0
    special = torch.eye(4)[[1, 0, 2]]  # special 1 is the image's direction: hits; special 0 and 2 do not
    concepts = torch.eye(4)[[3]]
    out = concept_scores(e, concepts, torch.tensor([0.005]), special, torch.tensor([0.0, 0.5, -0.005]))
    assert out[0]["special_care"] == [1, 2]  # special 2: 0 - (-0.005) + 0.01 > 0 only thanks to the adjustment
    assert out[0]["concept_scores"][0] == round(0 - 0.005 + 0.01, 3) and out[0]["bad_concepts"] == [0]


def test_clip_preprocess_converts_modes():
    pre = ClipPreprocess(32, (32, 32))
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    assert pre([rgba, rgba.convert("L")]).shape == (2, 3, 32, 32)


@pytest.fixture(scope="module")
def book_checker():
    return BookConceptChecker(["anything purple", "squares"]).fit(n=1000).calibrate(fpr=0.05, n=1000)


def test_book_checker_flags_renders_of_the_concept(book_checker):
    scenes = [data.sample_scene(21, "test", i) for i in range(300)]
    flags, reasons = book_checker.check([data.render_scene(s, 32) for s in scenes])
    for concept in book_checker.concepts:
        truth = [concept.present(s) for s in scenes]
        hit = [f and any(concept.name in r for r in rs) for f, rs in zip(flags, reasons)]
        recall = sum(h and t for h, t in zip(hit, truth)) / sum(truth)
        fpr = sum(h and not t for h, t in zip(hit, truth)) / (len(truth) - sum(truth))
        print(f"{concept.name}: recall {recall:.2f}, false positives {fpr:.3f} on renders")
        assert recall > 0.8 and fpr < 0.12  # calibrated at 5 %; measured recall >= 0.9


def test_prompt_filter_normalises_and_matches_whole_words():
    f = PromptFilter(["gore", "red triangle"])
    assert normalize_text("A RED-triangle!!") == "a red triangle"
    assert f.check(["Some GORE.", "a Red--Triangle", "gorgeous", "a red circle"]) == [
        ["prompt: contains 'gore'"], ["prompt: contains 'red triangle'"], [], []]


def test_pipeline_runs_the_checker_and_logs_when_it_is_off(book_checker, caplog):
    pipe = TextToImagePipeline.from_pretrained()
    safe = TextToImagePipeline(**{**pipe.components, "safety_checker": SafetyChecker([book_checker], PromptFilter(["gore"]))})
    out = safe(["a green circle", "a green circle with gore"], seed=[3, 3], disable=True)
    assert out.nsfw[1] and out.reasons[1] == ["prompt: contains 'gore'"]
    assert out.images[1].getextrema() == ((0, 0), (0, 0), (0, 0))
    assert out.images[0].getextrema() != ((0, 0), (0, 0), (0, 0)) or out.nsfw[0]
    with caplog.at_level(logging.WARNING, logger="tinydit"):
        safe("a green circle", seed=0, disable=True, safety=False)
        safe("a green circle", seed=0, disable=True, safety=False)
    assert sum("safety checker turned off" in r.message for r in caplog.records) == 1  # logged once
    blurred = SafetyChecker([], PromptFilter(["green"]), replace="blur")(pipe("a green circle", seed=0, disable=True).images,
                                                                         ["a green circle"])
    assert blurred[1] == [True] and blurred[0][0].getextrema() != ((0, 0), (0, 0), (0, 0))
    with pytest.raises(ValueError, match="safety: True, but this pipeline has no safety checker"):
        pipe("a red circle", safety=True, disable=True)
    with pytest.raises(TypeError, match="safety: expected True, False or None"):
        safe("a red circle", safety="yes", disable=True)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: BookConceptChecker("a red triangle"), ValueError, "concepts: expected a non-empty list"),
    (lambda: BookConceptChecker(["a happy dog"]), ValueError, "concepts: 'a happy dog' names no colour"),
    (lambda: PromptFilter([]), ValueError, "blocklist: expected a non-empty list"),
    (lambda: PromptFilter([3]), ValueError, "blocklist: every entry must be a string"),
    (lambda: SafetyChecker([], None), ValueError, "image_checkers: give at least one"),
    (lambda: SafetyChecker([], PromptFilter(["x"]), replace="pixelate"), ValueError, "replace: expected 'black' or 'blur'"),
    (lambda: ClipPreprocess()([]), TypeError, "images: expected a PIL image or a non-empty list"),
])
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_fit_calibrate_and_checkers_refuse_bad_input(book_checker):
    with pytest.raises(ValueError, match="n: expected an integer >= 10, got 0"):
        book_checker.calibrate(n=0)
    with pytest.raises(ValueError, match="n: expected an integer >= 10, got -5"):
        book_checker.fit(n=-5)
    with pytest.raises(ValueError, match="fpr: expected a finite number, got nan"):
        book_checker.calibrate(fpr=float("nan"))
    with pytest.raises(TypeError, match=r"image_checkers: each needs a check\(images\)"):
        SafetyChecker([object()])


def test_probe_starts_from_the_text_direction_and_finds_the_pair_in_a_scene():
    scenes = [data.sample_scene(21, "test", i) for i in range(600)]
    renders = [data.render_scene(s, 32) for s in scenes]
    zero_shot = BookConceptChecker(["a red triangle"]).calibrate(fpr=0.01, n=1000)
    # the pull-back: the text direction at every position, summed over positions, is the pooled projection
    f = zero_shot.feature_map(renders[:8])  # (8, P, C)
    directions = zero_shot.text_directions(f.shape[1], f.shape[2])  # (1, C, P)
    with torch.no_grad():
        pooled = (zero_shot.image_encoder(zero_shot._pixels(renders[:8])) - zero_shot.image_encoder.proj.bias) @ zero_shot.embeds.T
    torch.testing.assert_close(torch.einsum("bpc,kcp->bk", f, directions), pooled, atol=1e-4, rtol=1e-4)  # (8, 1)

    fitted = BookConceptChecker(["a red triangle"]).fit(n=1000).calibrate(fpr=0.01, n=1000)
    truth = [zero_shot.concepts[0].present(s) for s in scenes]
    recall = {name: sum(f and t for f, t in zip(c.check(renders)[0], truth)) / sum(truth)
              for name, c in [("zero-shot", zero_shot), ("probe", fitted)]}
    print(f"'a red triangle' among {sum(truth)} renders that show it: recall {recall}")
    assert recall["probe"] > 0.85 and recall["probe"] > recall["zero-shot"] + 0.2  # measured 0.98 against 0.59 (chapter 16)
