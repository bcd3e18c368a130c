"""Chapter 10: the pixel reader, the GenEval-style scores, the Fréchet distance and `evaluate`."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinydit import data
from tinydit import evaluate as ev


def render(scene):
    return data.pil_to_tensor(data.render_scene(scene))  # (3, 32, 32)


def blur2(x):
    """Average-pool 2x, then bilinear back up: a 32x32 image seen at 16x16."""
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


def add_noise(std):
    g = torch.Generator().manual_seed(0)
    return lambda x: x + std * torch.randn(x.shape, generator=g)


def scene_of(shape="circle", color="red", position="center", cx=None, cy=None, background="white"):
    x, y = data.POSITIONS[position]
    obj = data.ShapeObject(shape, color, "large", position, x if cx is None else cx, y if cy is None else cy)
    return data.Scene(background, (obj,), f"a large {color} {shape} {data.POSITION_PHRASES[position][0]}")


# ---- connected components -------------------------------------------------------------------

def test_label_components_is_8_connected():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component under 8-connectivity
    mask[4:6, 0:3] = True  # a 2x3 block
    mask[0:3, 5] = True  # a vertical bar
    labels = ev.label_components(mask)
    assert labels.max() == 3
    assert labels[0, 0] == labels[1, 1] > 0
    assert len({labels[0, 0], labels[4, 0], labels[0, 5]}) == 3
    assert (labels > 0).sum() == mask.sum() and (labels[~mask] == 0).all()
    assert all((labels == k).sum() == n for k, n in zip((labels[0, 0], labels[4, 0], labels[0, 5]), (2, 6, 3)))


# ---- the reader on real renders -------------------------------------------------------------

def test_read_image_on_one_render():
    scene = data.sample_scene(0, "test", 3)
    reading = ev.read_image(render(scene))
    truth = {o.color: o for o in scene.objects}
    assert reading.background == scene.background
    assert sorted(o.color for o in reading.objects) == sorted(truth)
    for o in reading.objects:
        t = truth[o.color]
        assert o.shape == t.shape
        # centroids: measured within 0.008 of ShapeObject.cx/cy (triangles: cy 0.03-0.065 lower)
        assert abs(o.cx - t.cx) < 0.015
        assert abs(o.cy - t.cy) < (0.075 if t.shape == "triangle" else 0.015)
    assert [o.area for o in reading.objects] == sorted((o.area for o in reading.objects), reverse=True)


def test_reader_accuracy_on_clean_renders():
    acc = ev.reader_accuracy(n=100, seed=0)
    assert set(acc) == set(ev.GROUPS)
    assert set(acc["two"]) == {"both", "relation", "background"}
    # measured 1.000 on every check (n=100, seed 0; also n=500 at seed 1, outside the calibration
    # set); one error in 100 allowed
    for group, checks in acc.items():
        for check, value in checks.items():
            assert value >= 0.99, (group, check, value)


@pytest.mark.parametrize("name, corrupt", [("noise std 0.1", add_noise(0.1)), ("2x blur", blur2)])
def test_reader_is_robust_to_noise_and_blur(name, corrupt):
    acc = ev.reader_accuracy(n=100, seed=1, corrupt=corrupt)
    # measured 1.000 on every check for both (n=500, seed 1); stronger damage does cost: noise std
    # 0.2 -> shape 0.93 (seen), 4x blur -> 0.53, both 2x blur + noise 0.1 -> 0.92. 3 % margin here.
    for group, checks in acc.items():
        for check, value in checks.items():
            assert value >= 0.97, (name, group, check, value)


def test_recoloured_object_is_scored_wrong_on_colour():
    scenes = ev.eval_scenes("seen", 12)
    others = list(data.COLORS)
    for scene in scenes:
        o = scene.objects[0]
        swapped = others[(others.index(o.color) + 3) % len(others)]  # 3 steps round the palette
        image = render(dataclasses.replace(scene, objects=(dataclasses.replace(o, color=swapped),)))
        reading = ev.read_image(image)
        scores = ev.score_scene(scene, reading)
        assert reading.objects[0].color == swapped
        assert not scores["color"] and not scores["pair"]
        assert scores["shape"] and scores["background"]  # nothing else changed


def test_blank_background_scores_no_object():
    scene = ev.eval_scenes("seen", 1)[0]
    blank = torch.tensor(data.BACKGROUNDS[scene.background], dtype=torch.float32)[:, None, None]
    reading = ev.read_image((blank / 127.5 - 1).expand(3, 32, 32))
    scores = ev.score_scene(scene, reading)
    assert reading.objects == [] and reading.background == scene.background
    assert not scores["pair"] and not scores["color"] and not scores["shape"] and scores["background"]


def test_off_palette_background_reads_none():
    teal = torch.tensor([0.0, 128.0, 128.0])[:, None, None] / 127.5 - 1
    assert ev.read_image(teal.expand(3, 32, 32).clone()).background is None


def test_touching_objects_are_split_by_colour():
    objs = (data.ShapeObject("square", "red", "large", "left", 0.33, 0.5),
            data.ShapeObject("circle", "yellow", "large", "right", 0.67, 0.5))  # overlap by ~1 px
    image = render(data.Scene("white", objs, "a red square left of a yellow circle"))
    rgb = ((image.double() + 1) * 127.5).permute(1, 2, 0).numpy()
    colour, _ = ev.classify_pixels(rgb, np.array([255.0, 255.0, 255.0]))
    assert ev.label_components(colour >= 0).max() == 1  # they touch: one component before the split
    reading = ev.read_image(image)
    assert sorted((o.color, o.shape) for o in reading.objects) == [("red", "square"), ("yellow", "circle")]


# ---- scoring --------------------------------------------------------------------------------

def test_extra_object_makes_pair_wrong_but_not_colour():
    scene = scene_of("square", "blue", "left", cx=0.3)
    extra = data.ShapeObject("circle", "green", "small", "right", 0.78, 0.5)
    image = render(dataclasses.replace(scene, objects=scene.objects + (extra,)))
    scores = ev.score_scene(scene, ev.read_image(image))
    assert scores["color"] and scores["shape"] and scores["position"]
    assert not scores["pair"]


def test_position_is_scored_only_when_the_caption_names_it():
    scene = scene_of("circle", "green", "top")
    assert ev.score_scene(scene, ev.read_image(render(scene)))["position"]
    moved = scene_of("circle", "green", "bottom")
    assert not ev.score_scene(scene, ev.read_image(render(moved)))["position"]
    silent = dataclasses.replace(scene, caption="a large green circle")
    assert "position" not in ev.score_scene(silent, ev.read_image(render(scene)))


def test_relation_needs_the_right_order():
    scene = next(s for s in ev.eval_scenes("two", 20) if ev.relation_of(s) in ("left of", "above"))
    a, b = scene.objects
    swapped = dataclasses.replace(scene, objects=(dataclasses.replace(a, cx=b.cx, cy=b.cy),
                                                  dataclasses.replace(b, cx=a.cx, cy=a.cy)))
    right = ev.score_scene(scene, ev.read_image(render(scene)))
    wrong = ev.score_scene(scene, ev.read_image(render(swapped)))
    assert right["both"] and right["relation"]
    assert wrong["both"] and not wrong["relation"]
    for gap, expected in ((0.05, False), (0.15, True)):  # RELATION_MARGIN is 0.1 of the side
        first = ev.ObjectReading(a.color, a.shape, 0.5, 0.5, 40, 0.8, 0.0)
        second = dataclasses.replace(first, color=b.color, shape=b.shape, cx=0.5 + gap, cy=0.5 + gap)
        assert ev.score_scene(scene, ev.Reading(scene.background, [first, second]))["relation"] == expected


# ---- prompts --------------------------------------------------------------------------------

def test_eval_scenes_groups_are_deterministic_and_right():
    for group in ev.GROUPS:
        scenes = ev.eval_scenes(group, 15)
        assert len(scenes) == 15 and scenes == ev.eval_scenes(group, 15)
        assert all(ev.scene_group(s) == group for s in scenes)
    held = ev.eval_scenes("held_out", 15)
    assert all((s.objects[0].color, s.objects[0].shape) in data.HELD_OUT for s in held)
    indices = ev.eval_indices("held_out", 15)
    assert indices == sorted(indices) and [data.sample_scene(0, "test", i) for i in indices] == held


def test_eval_scenes_too_few_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ev, "MAX_SCAN", 1)
    with pytest.raises(RuntimeError, match=r"n: asked for 20 'held_out' scenes, found only \d+"):
        ev.eval_scenes("held_out", 20)


# ---- Fréchet distance -----------------------------------------------------------------------

def hadamard(k):
    h = np.ones((1, 1))
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    return h  # (2^k, 2^k), orthogonal +-1 columns


def test_frechet_distance_matches_closed_forms():
    # Columns 1..3 of a Hadamard matrix are zero-mean and orthogonal: sample covariances are
    # exactly diagonal, so FD = |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2.
    z = hadamard(3)[:, 1:4]  # (8, 3)
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    a, b = mu_a + z * sd_a, mu_b + z * sd_b
    scale = np.sqrt(8 / 7)  # np.cov divides by N - 1
    expected = ((mu_a - mu_b) ** 2).sum() + (((sd_a - sd_b) * scale) ** 2).sum()
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert ev.frechet_distance(torch.from_numpy(a[:, :1]), b[:, :1]) == pytest.approx(
        1.0 + (2.0 * scale) ** 2, rel=1e-10)  # 1-D: (mu diff)^2 + (sd diff)^2


def test_frechet_distance_matches_2d_closed_form():
    # For 2x2 covariances, Tr((S_a S_b)^1/2) = sqrt(Tr(S_a S_b) + 2 sqrt(det S_a det S_b)): an
    # independent check of the cross term where S_a and S_b do not commute.
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(50, 2, generator=g) @ torch.tensor([[2.0, 0.0], [1.5, 0.5]])).double().numpy()
    b = (torch.randn(60, 2, generator=g) @ torch.tensor([[0.5, -1.0], [0.0, 1.0]]) + 1).double().numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.trace(s_a @ s_b) + 2 * np.sqrt(np.linalg.det(s_a) * np.linalg.det(s_b)))
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_symmetric_and_zero_on_itself():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated features
    b = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.5
    assert ev.frechet_distance(a, a) < 1e-8 * float(a.var(0).sum())
    assert ev.frechet_distance(a, b) == pytest.approx(ev.frechet_distance(b, a), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))  # a rotation
    assert ev.frechet_distance(a.double() @ q, b.double() @ q) == pytest.approx(ev.frechet_distance(a, b), rel=1e-8)


def real_images(seed, n=500):
    return ev.render_scenes([data.sample_scene(seed, "test", i) for i in range(n)])  # (n, 3, 32, 32)


def test_frechet_distance_of_book_features_separates_real_from_damaged():
    encoder = ev.load_book_image_encoder()
    a, b = real_images(0), real_images(1)
    fa, fb = ev.image_features(a, encoder), ev.image_features(b, encoder)
    real = ev.frechet_distance(fa, fb)
    blurred = ev.frechet_distance(fa, ev.image_features(blur2(b), encoder))
    blurred4 = ev.frechet_distance(fa, ev.image_features(
        F.interpolate(F.avg_pool2d(b, 4), scale_factor=4, mode="bilinear", align_corners=False), encoder))
    noise = ev.frechet_distance(fa, ev.image_features(torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
                                                      .clamp(-1, 1), encoder))
    print(f"FD real/real {real:.2f}, real/2x blur {blurred:.2f}, real/4x blur {blurred4:.2f}, real/noise {noise:.1f}")
    # measured (500 vs 500): real 1.87, 2x blur 4.97, 4x blur 28.15, pure noise 133.4. The book image
    # encoder was trained on content (colour, shape, position), so it barely notices a 2x blur.
    assert real < 3.0  # 1.87 measured; the estimate's own bias at N=500 is most of it
    assert blurred > 1.5 * real
    assert blurred4 > 8 * real and noise > 40 * real


def test_image_features_shape_batches_and_mode():
    encoder = ev.load_book_image_encoder().train()
    x = real_images(0, n=20)
    f = ev.image_features(x, encoder, batch_size=7)
    assert f.shape == (20, 64) and not f.requires_grad
    torch.testing.assert_close(f, ev.image_features(x, encoder), rtol=1e-5, atol=1e-5)
    assert encoder.training  # restored


# ---- evaluate end to end --------------------------------------------------------------------

def perfect_generate(captions, seeds):
    """The real render of each prompt: seeds are the prompts' test-split indices."""
    scenes = [data.sample_scene(0, "test", i) for i in seeds]
    assert [s.caption for s in scenes] == captions
    return ev.render_scenes(scenes)


def test_evaluate_with_perfect_generator():
    calls = []
    report = ev.evaluate(lambda c, s: calls.append(len(c)) or perfect_generate(c, s), n=40, batch_size=16,
                         disable=True)
    assert calls == [16, 16, 8] * 3
    for group, checks in report.accuracy.items():
        assert all(v == 1.0 for v in checks.values()), (group, checks)  # the reader is right on renders
        assert report.counts[group]["background"] == 40
    assert 0 < report.counts["seen"]["position"] < 40  # only captions that name a position
    assert report.frechet < 1e-6  # the very same images
    table = report.table()
    print(table)
    for row in ("| seen pairs | colour / shape / pair / position | 100.0 / 100.0 / 100.0 / 100.0 | 40 |",
                "| HELD_OUT pairs |", "| two objects | both / relation | 100.0 / 100.0 | 40 |",
                "| background | all prompts | 100.0 | 120 |", "| Fréchet distance |"):
        assert row in table
    back = json.loads(json.dumps(report.as_dict()))
    assert back["accuracy"]["two"]["relation"] == 1.0 and back["background"] == 1.0 and back["n"] == 40


def test_evaluate_with_blank_generator():
    def blank(captions, seeds):
        colours = [data.BACKGROUNDS[data.sample_scene(0, "test", i).background] for i in seeds]
        return (torch.tensor(colours, dtype=torch.float32)[:, :, None, None] / 127.5 - 1).expand(-1, 3, 32, 32)

    report = ev.evaluate(blank, n=30, disable=True)
    for group, checks in report.accuracy.items():
        assert checks["background"] == 1.0
        assert all(v == 0.0 for k, v in checks.items() if k != "background"), (group, checks)
    assert report.frechet > 150  # measured 356.5


def test_evaluate_seeds_are_fixed_per_prompt():
    seen = []
    ev.evaluate(lambda c, s: seen.append(list(s)) or perfect_generate(c, s), n=5, disable=True)
    again = []
    ev.evaluate(lambda c, s: again.append(list(s)) or perfect_generate(c, s), n=5, disable=True)
    flat = [i for batch in seen for i in batch]
    assert seen == again and len(set(flat)) == 15  # one seed per prompt, none shared across groups


# ---- errors ---------------------------------------------------------------------------------

def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"group: expected one of 'seen', 'held_out', 'two', got 'three'"):
        ev.eval_scenes("three", 5)
    with pytest.raises(ValueError, match=r"n: expected an integer >= 1, got 0"):
        ev.eval_scenes("seen", 0)
    with pytest.raises(ValueError, match=r"image: expected a \(3, H, W\) RGB tensor .* got shape \(3, 32\)"):
        ev.read_image(torch.zeros(3, 32))
    with pytest.raises(ValueError, match=r"image: expected a \(3, H, W\) RGB tensor .* got shape \(1, 32, 32\)"):
        ev.read_image(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match=r"images: expected a \(B, 3, H, W\) RGB tensor .* got shape \(3, 32, 32\)"):
        ev.read_images(torch.zeros(3, 32, 32))
    bad = torch.zeros(3, 32, 32)
    bad[0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"image: expected finite values, got 1 NaN"):
        ev.read_image(bad)
    with pytest.raises(TypeError, match=r"image: expected a floating-point tensor, got dtype torch.uint8"):
        ev.read_image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"reading: expected a Reading"):
        ev.score_scene(data.sample_scene(0, "test", 0), "red circle")
    with pytest.raises(ValueError, match=r"feats_b: expected 4 features per row like feats_a, got shape \(5, 3\)"):
        ev.frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"feats_a: expected at least 2 feature rows"):
        ev.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"images: the book image encoder reads 32x32 images, got shape \(2, 3, 16, 16\)"):
        ev.image_features(torch.zeros(2, 3, 16, 16))


def test_evaluate_rejects_a_bad_generator():
    with pytest.raises(TypeError, match=r"generate: expected a callable"):
        ev.evaluate(None, n=2, disable=True)
    with pytest.raises(ValueError, match=r"n: expected an integer >= 1, got 0"):
        ev.evaluate(perfect_generate, n=0, disable=True)
    cases = [
        (lambda c, s: perfect_generate(c, s)[:-1], ValueError,
         r"generate: expected it to return a \(4, 3, 32, 32\) float tensor .* got shape \(3, 3, 32, 32\)"),
        (lambda c, s: perfect_generate(c, s)[:, :, :16, :16], ValueError,
         r"generate: expected it to return a \(4, 3, 32, 32\) .* got shape \(4, 3, 16, 16\)"),
        (lambda c, s: list(perfect_generate(c, s)), TypeError, r"generate: expected it to return a .* got list"),
        (lambda c, s: perfect_generate(c, s) * float("nan"), ValueError, r"generate: expected finite values"),
        (lambda c, s: perfect_generate(c, s).to(torch.uint8), TypeError, r"generate: expected a floating-point"),
    ]
    for generate, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            ev.evaluate(generate, n=4, disable=True)


# ---- the teaching version -------------------------------------------------------------------
