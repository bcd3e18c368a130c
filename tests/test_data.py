"""Chapter 01: the shapes dataset, its captions and the grid, checked against the pixels."""

import colorsys

import numpy as np
import pytest
import torch

from tinydit import data, emoji


# A reader that does not use the dataset's own colour table: name colours by hue band only.
HUE_BANDS = {"red": (345, 15), "orange": (20, 40), "yellow": (45, 65), "green": (90, 160),
             "blue": (200, 250), "purple": (260, 310)}


def named_hue(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))
    if s < 0.5 or v < 0.3:
        return None  # achromatic (background or anti-aliased edge)
    deg = h * 360
    for name, (lo, hi) in HUE_BANDS.items():
        if (lo <= deg <= hi) if lo < hi else (deg >= lo or deg <= hi):
            return name
    return None


def test_item_shape_dtype_range():
    ds = data.ShapesDataset(16, size=32)
    x, caption = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0 < x.max()
    assert isinstance(caption, str) and len(caption.split()) >= 4
    big, _ = data.ShapesDataset(4, size=64)[0]
    assert big.shape == (3, 64, 64)


def test_deterministic_in_seed_split_index():
    a, b = data.ShapesDataset(50, seed=3), data.ShapesDataset(500, seed=3)
    for i in (0, 7, 49):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert a.attributes(i) == b.attributes(i)
    other_seed = data.ShapesDataset(50, seed=4)
    other_split = data.ShapesDataset(50, seed=3, split="test")
    assert sum(a[i][1] != other_seed[i][1] for i in range(50)) > 40
    assert sum(a[i][1] != other_split[i][1] for i in range(50)) > 40


def test_attributes_structure_and_vocabulary():
    ds = data.ShapesDataset(300)
    counts = {1: 0, 2: 0}
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        counts[len(attrs)] += 1
        caption = ds[i][1]
        for a in attrs:
            assert set(a) == {"shape", "color", "size", "position"}
            assert a["shape"] in data.SHAPES and a["color"] in data.COLORS
            assert a["size"] in ("small", "large") and a["position"] in data.POSITIONS
            assert a["color"] in caption and a["shape"] in caption
        if len(attrs) == 2:
            assert attrs[0]["color"] != attrs[1]["color"]
            assert {attrs[0]["position"], attrs[1]["position"]} in ({"left", "right"}, {"top", "bottom"})
    assert counts[1] > 100 and counts[2] > 60


@pytest.mark.parametrize("split", ["train", "test"])
def test_caption_colours_match_pixels(split):
    """Every colour word in the caption is present in the pixels, and no other colour is."""
    ds = data.ShapesDataset(200, seed=11, split=split)
    for i in range(len(ds)):
        x, caption = ds[i]
        pixels = ((x + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3).numpy()
        found = {}
        for p in pixels:
            name = named_hue(p)
            if name:
                found[name] = found.get(name, 0) + 1
        present = {name for name, k in found.items() if k >= 6}  # a small object covers > 20 px
        named = {w for w in caption.replace(",", " ").split() if w in HUE_BANDS}
        assert present == named, f"sample {i}: caption {caption!r} but pixels show {present}"


def test_background_matches_caption():
    ds = data.ShapesDataset(200, seed=5)
    for i in range(len(ds)):
        x, caption = ds[i]
        corner = tuple(((x[:, 0, 0] + 1) * 127.5).round().int().tolist())
        if "gray background" in caption:
            assert corner == (128, 128, 128)
        elif "black background" in caption:
            assert corner == (0, 0, 0)
        else:
            assert corner == (255, 255, 255), caption


def test_positions_match_pixels():
    """The centre of mass of each object's colour lies on the named side of the image."""
    ds = data.ShapesDataset(150, seed=2)
    for i in range(len(ds)):
        x = ((ds[i][0] + 1) * 127.5).permute(1, 2, 0).numpy()
        for a in ds.attributes(i):
            mask = np.array([[named_hue(p) == a["color"] for p in row] for row in x])
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() / 32, ys.mean() / 32
            expect = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                      "center": 0.4 < cx < 0.6 and 0.4 < cy < 0.6}[a["position"]]
            assert expect, (i, a, cx, cy)


def test_held_out_pairs_only_in_test():
    def pairs(ds):
        return {(o["color"], o["shape"]) for i in range(len(ds)) for o in ds.attributes(i)}

    train, test = pairs(data.ShapesDataset(3000)), pairs(data.ShapesDataset(500, split="test"))
    assert not train & set(data.HELD_OUT)
    assert set(data.HELD_OUT) <= test
    assert len(train) == 18 - len(data.HELD_OUT)


def test_anti_aliased_edges():
    ds = data.ShapesDataset(20)
    x = ((ds[0][0] + 1) * 127.5).round()
    colours = {tuple(p) for p in x.permute(1, 2, 0).reshape(-1, 3).int().tolist()}
    assert len(colours) > 3  # background + object colour + blended edge shades


def test_captions_vary():
    ds = data.ShapesDataset(400)
    captions = {ds[i][1] for i in range(len(ds))}
    assert len(captions) > 300
    assert any(c.startswith("a picture of") for c in captions)
    assert any(" little " in c or " tiny " in c for c in captions)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [(dict(n=0), ValueError, r"^n: expected an integer >= 1, got 0"),
     (dict(n=-3), ValueError, r"^n:"),
     (dict(n=2.5), TypeError, r"^n: expected an integer, got 2\.5"),
     (dict(n=10**20), ValueError, r"^n: expected an integer <= \d+, got 100000000000000000000"),
     (dict(n=4, size=4), ValueError, r"^size: expected an integer >= 8"),
     (dict(n=4, size=100_000), ValueError, r"^size=100000 .*GiB"),
     (dict(n=4, size="32"), TypeError, r"^size:"),
     (dict(n=4, split="val"), ValueError, r"^split:"),
     (dict(n=4, seed=-1), ValueError, r"^seed:"),
     (dict(n=4, seed=1.0), TypeError, r"^seed:")],
)
def test_bad_arguments(kwargs, error, pattern):
    """Refused at construction (not later, in len() or indexing), naming the argument."""
    with pytest.raises(error, match=pattern):
        data.ShapesDataset(**kwargs)


def test_numpy_integers_are_accepted():
    ds = data.ShapesDataset(np.int64(6), size=np.int32(16), seed=np.uint8(3))
    assert len(ds) == 6 and type(ds.n) is int and type(ds.size) is int
    ref = data.ShapesDataset(6, size=16, seed=3)
    assert torch.equal(ds[np.int64(2)][0], ref[2][0]) and ds[np.int16(-1)][1] == ref[5][1]
    assert ds[0][0].shape == (3, 16, 16)


def test_largest_n_is_usable():
    ds = data.ShapesDataset(data.MAX_SAMPLES)
    assert len(ds) == data.MAX_SAMPLES and ds[-1][0].shape == (3, 32, 32)


def test_bad_split_lists_allowed_values():
    with pytest.raises(ValueError, match="train.*test"):
        data.ShapesDataset(4, split="validation")


def test_index_errors():
    ds = data.ShapesDataset(5)
    with pytest.raises(IndexError, match="0..4"):
        ds[5]
    with pytest.raises(IndexError):
        ds.attributes(-6)
    with pytest.raises(TypeError, match="index"):
        ds[1.5]
    assert ds.attributes(-1) == ds.attributes(4)


def test_image_grid_with_captions():
    ds = data.ShapesDataset(10)
    grid = data.dataset_grid(ds, n=10, cols=4, scale=2)
    assert grid.width == 4 * (64 + 4) + 4
    assert grid.height > 3 * 64  # three rows plus caption text
    arr = np.asarray(grid)
    assert (arr < 50).all(axis=2).sum() > 100  # black caption text was drawn
    with pytest.raises(ValueError, match="captions"):
        data.image_grid(torch.stack([ds[0][0], ds[1][0]]), ["only one"])
    with pytest.raises(ValueError, match="images"):
        data.image_grid(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda t: data.image_grid(t, ["a red circle", None]), TypeError, r"^captions\[1\]: expected a str, got None"),
        (lambda t: data.image_grid(t, "one caption"), TypeError, r"^captions: expected a list of 2 strings"),
        (lambda t: data.image_grid(t, cols=2.0), TypeError, r"^cols: expected an integer, got 2\.0"),
        (lambda t: data.image_grid(t, scale=0), ValueError, r"^scale: expected an integer >= 1"),
        (lambda t: data.image_grid(t, font_px=None), TypeError, r"^font_px:"),
        (lambda t: data.image_grid("grid.png"), TypeError, r"^images: .*path 'grid\.png'.*PIL\.Image\.open"),
        (lambda t: data.image_grid(__import__("pathlib").Path("x.png")), TypeError, r"^images: .*path 'x\.png'"),
        (lambda t: data.image_grid(t.permute(0, 2, 3, 1).numpy()), TypeError,
         r"^images: .*numpy array of shape \(2, 8, 8, 3\).*torch\.from_numpy"),
        (lambda t: data.image_grid([data.tensor_to_pil(t[0]), "b.png"]), TypeError, r"^images\[1\]: expected a PIL image"),
        (lambda t: data.image_grid([]), ValueError, r"^images: expected at least one image"),
        (lambda t: data.image_grid(t, scale=100_000), ValueError, r"^images \(2 of 8x8\) at scale=100000: .*GiB"),
        (lambda t: data.dataset_grid(data.ShapesDataset(3), n=0), ValueError, r"^n: expected an integer >= 1"),
        (lambda t: data.tensor_to_pil(t), ValueError, r"^x: expected a \(3, H, W\) image tensor"),
        (lambda t: data.tensor_to_pil(t[0].numpy()), TypeError, r"^x: expected a torch\.Tensor"),
    ],
)
def test_grid_arguments_named_in_errors(call, error, pattern):
    tiles = torch.zeros(2, 3, 8, 8)
    with pytest.raises(error, match=pattern):
        call(tiles)


def test_image_grid_accepts_numpy_ints_and_pil_lists():
    pils = [data.tensor_to_pil(torch.zeros(3, 8, 8)) for _ in range(3)]
    grid = data.image_grid(iter(pils), ("a", "b", "c"), cols=np.int64(2), scale=np.int32(2))
    assert grid.width == 2 * (16 + 4) + 4


def test_render_scene_refuses_huge_canvas():
    scene = data.ShapesDataset(1).scene(0)
    with pytest.raises(ValueError, match=r"^size=100000 with supersample=4: .*GiB"):
        data.render_scene(scene, size=100_000)


def test_tensor_pil_round_trip():
    x, _ = data.ShapesDataset(3)[1]
    assert torch.allclose(data.pil_to_tensor(data.tensor_to_pil(x)), x, atol=1 / 127.5)


def test_emoji_missing_font_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        emoji.EmojiDataset(font_path=tmp_path / "nope.ttf")


@pytest.mark.skipif(
    not any(__import__("pathlib").Path(p).is_file() for p in emoji.EMOJI_FONT_PATHS),
    reason="optional dataset: fonts-noto-color-emoji not installed (.ci/run installs it)",
)
def test_emoji_dataset():
    ds = emoji.EmojiDataset(size=32)
    assert 1500 < len(ds) < 2500
    x, caption = ds[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert caption and caption == ds.items[0][1]
    assert not any(emoji.SKIN_TONES & set(ch) for ch, _ in ds.items)
    assert x.std() > 0.1  # an actual picture, not a blank tile
    with pytest.raises(IndexError):
        ds[len(ds)]
