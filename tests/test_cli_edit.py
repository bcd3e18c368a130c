"""`python -m tinydit img2img` and `inpaint`: chapter 15's editing pipelines from the command line.

One real subprocess (the files and the output line a user gets); `cli.main` in this process for the rest,
most of which stop before a model is loaded. --steps 4 everywhere: the pictures' content does not matter
here, only their size and which pixels are kept.
"""

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from tinydit import cli, data


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def one_line(code: int, err: str, command: str, kind: str = "error") -> str:
    """The single stderr line (no traceback) of a refused command (exit status 2) or of a warning."""
    if kind == "error":
        assert code == 2, err
    assert "Traceback" not in err and "Warning" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m tinydit {command}: {kind}: "), lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """src.png (a 32x32 test-split scene), right.png (white on the right half: repaint it), small.png (that
    mask at 16x16), odd.png (30x30), broken.png (not an image); the test runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    data.render_scene(data.sample_scene(0, "test", 5), 32).save("src.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    mask.save("right.png")
    mask.resize((16, 16), Image.Resampling.NEAREST).save("small.png")
    Image.open("src.png").resize((30, 30)).save("odd.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def test_img2img_writes_the_enlarged_picture_in_a_real_process(files):
    proc = subprocess.run([sys.executable, "-m", "tinydit", "img2img", "src.png", "a red circle", "--steps", "4",
                           "--seed", "3", "--scale", "2", "--out", "sub/out.png"], capture_output=True, text=True,
                          cwd=files, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"wrote sub/out\.png \(1 image of 'a red circle' from src\.png, seed 3, 4 steps of dpmpp_2m, "
                    r"guidance 2, strength 0\.6; 64x64 px; load [\d.]+ s \+ edit [\d.]+ s\)$",
                    proc.stdout.strip()), proc.stdout
    image = pixels(files / "sub" / "out.png")  # SRC's 32x32, enlarged twice (nearest neighbour)
    assert image.shape == (64, 64, 3) and image.std() > 10  # a picture, not a flat colour
    np.testing.assert_array_equal(image, np.repeat(np.repeat(image[::2, ::2], 2, 0), 2, 1))


def test_inpaint_keeps_the_unmasked_half_exactly(files, capsys):
    assert cli.main(["inpaint", "src.png", "right.png", "a yellow square", "--steps", "4", "--out", "out.png"]) == 0
    assert "1 image of 'a yellow square' from src.png, seed 0, 4 steps of dpmpp_2m, guidance 2, strength 1; " \
           "32x32 px" in capsys.readouterr().out
    out, src = pixels("out.png"), pixels("src.png")
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[:, :16], src[:, :16])  # black in the mask: the source's pixels
    assert (out[:, 16:] != src[:, 16:]).any()  # white: redrawn from pure noise (strength 1)


def test_inpaint_n_images_make_a_captioned_grid(files, capsys):
    assert cli.main(["inpaint", "src.png", "right.png", "a green circle", "--n", "2", "--scale", "2",
                     "--steps", "4", "--out", "grid.png"]) == 0
    assert "2 images of 'a green circle' from src.png, seeds 0..1" in capsys.readouterr().out
    with Image.open("grid.png") as im:  # 2 columns of 64-px tiles and 4-px gaps, one row with a caption line
        assert im.width == 2 * (64 + 4) + 4 and 64 + 8 < im.height < 64 + 8 + 30


def test_mask_of_another_size_is_one_warning_line(files, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(["inpaint", "src.png", "small.png", "a red square", "--steps", "4",
                         "--repaint", "2,2", "--soft", "--blur", "1", "--out", "out.png"])
    assert code == 0 and not caught  # no Python warning: the CLI says it once, in its own words
    err = capsys.readouterr().err
    line = one_line(code, err, "inpaint", kind="warning")
    assert "MASK is 16x16 px, SRC 32x32; the mask is resized to SRC's size" in line
    out, src = pixels("out.png"), pixels("src.png")
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[:, :12], src[:, :12])  # far from the resized mask's soft edge: kept


@pytest.mark.parametrize("args, expected", [
    (("img2img", "none.png", "x"), r"SRC: expected an image file \(\.png, \.jpg, \.\.\.\), got 'none\.png' "
                                   r"\(no such file\)"),
    (("img2img", ".", "x"), r"SRC: expected an image file .*got '\.' \(a folder\)"),
    (("img2img", "broken.png", "x"), r"SRC: cannot read 'broken\.png' as an image"),
    (("inpaint", "src.png", "none.png", "x"), r"MASK: expected an image file .*got 'none\.png' \(no such file\)"),
    (("inpaint", "src.png", "broken.png", "x"), r"MASK: cannot read 'broken\.png' as an image"),
    (("img2img", "src.png", "x", "--strength", "0"), r"argument --strength: expected a number in \(0, 1\] "
                                                     r"\(0 would return the source unchanged\), got '0'"),
    (("inpaint", "src.png", "right.png", "x", "--strength", "1.5"), r"argument --strength: .* got '1\.5'"),
    (("img2img", "src.png", "x", "--strength", "nan"), r"argument --strength: expected a number in \(0, 1\], "
                                                       r"got 'nan'"),
    (("inpaint", "src.png", "right.png", "x", "--repaint", "4"), r"argument --repaint: expected JUMP,N: .*got '4'"),
    (("inpaint", "src.png", "right.png", "x", "--repaint", "4,x"), r"argument --repaint: .* such as 4,4, got '4,x'"),
    (("inpaint", "src.png", "right.png", "x", "--repaint", "0,4"), r"argument --repaint: .*got '0,4'"),
    (("inpaint", "src.png", "right.png", "x", "--blur", "-1"), r"argument --blur: expected a finite number >= 0"),
    (("inpaint", "src.png", "right.png", "x", "--crop-padding", "-1"), r"argument --crop-padding: expected an "
                                                                        r"integer in 0\.\."),
    (("img2img", "src.png", "x", "--out", "o.gif"), r"--out: .*\.png or \.jpg, got 'o\.gif' \(extension '\.gif'\)"),
    (("img2img", "src.png", "x", "--sampler", "bogus"), r"--sampler: expected one of .*dpmpp_2m.*, got 'bogus'"),
    (("img2img", "src.png", "x", "--model", "no_such_model"), r"--model: no folder 'no_such_model'"),
    (("inpaint", "odd.png", "right.png", "x"), r"SRC: expected sides that are multiples of 8 .*got 30x30 in "
                                                 r"'odd\.png'; resize or crop it first \(or .*--crop-padding\)"),
])
def test_bad_inputs_are_one_line_naming_the_argument(args, expected, files, capsys):
    before = sorted(p.name for p in files.iterdir())
    try:
        code = cli.main([*args, "--steps", "4"] if "--out" in args else [*args, "--steps", "4", "--out", "o.png"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    line = one_line(code, capsys.readouterr().err, args[0])
    assert re.search(expected, line), line
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written


def test_refusal_in_a_real_process_is_one_line(files):
    proc = subprocess.run([sys.executable, "-m", "tinydit", "inpaint", "src.png", "nowhere.png", "a cat"],
                          capture_output=True, text=True, cwd=files, timeout=120)
    line = one_line(proc.returncode, proc.stderr, "inpaint")
    assert "MASK: expected an image file (.png, .jpg, ...), got 'nowhere.png' (no such file)" in line
    assert not (files / "out.png").exists()
