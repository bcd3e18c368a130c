"""`python -m tinydit generate`: text to image from the command line (chapter 13's pipeline).

Real subprocesses where the process matters (the files a user gets, torchrun); `cli.main` in this
process for the refused flags, which stop before a model is loaded. --steps 4 wherever the picture's
content does not matter.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinydit import cli


PROMPTS = "# shapes to draw\n\na red triangle above a blue circle\n  a green square  \n# the end\na yellow circle\n"
JOB = ["--n", "3", "--steps", "4", "--seed", "7"]  # 3 prompts x 3 images: seeds 7..15
TORCHRUN_JOB = ["--num-images", "3", *JOB[2:]]  # torchrun's own parser takes --n for an abbreviation of its flags


def run(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tinydit", "generate", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def one_line_error(code: int, err: str) -> str:
    """The single stderr line of a refused command (exit status 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m tinydit generate: error: ")
    return lines[0]


def test_one_prompt_writes_one_image(tmp_path):
    out = tmp_path / "sub" / "one.png"
    proc = run("a red triangle above a blue circle", "--steps", "4", "--seed", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.match(rf"wrote {re.escape(str(out))} \(1 image of 'a red triangle above a blue circle', seed 2, "
                    r"4 steps of dpmpp_2m, guidance 2; 128x128 px; load [\d.]+ s \+ generate [\d.]+ s\)$",
                    proc.stdout.strip()), proc.stdout
    image = pixels(out)  # the book model's 32x32 picture, enlarged 4 times (nearest neighbour)
    assert image.shape == (128, 128, 3) and image.std() > 10  # a picture, not a flat colour
    np.testing.assert_array_equal(image, np.repeat(np.repeat(image[::4, ::4], 4, 0), 4, 1))


def test_n_images_make_one_captioned_grid(tmp_path):
    out = tmp_path / "grid.png"
    proc = run("a green square", "--n", "4", "--cols", "2", "--scale", "2", "--steps", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 images of 'a green square', seeds 0..3" in proc.stdout
    with Image.open(out) as im:  # 2 columns of 64-px tiles and 4-px gaps; two rows, each with a caption line
        assert im.width == 2 * (64 + 4) + 4 and 2 * (64 + 4) < im.height < 2 * (64 + 4 + 30)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference job: 3 prompts x 3 images in one process, batches of 8."""
    folder = tmp_path_factory.mktemp("generate")
    (folder / "prompts.txt").write_text(PROMPTS)
    proc = run("--prompts", str(folder / "prompts.txt"), *JOB, "--out-dir", str(folder / "one"))
    assert proc.returncode == 0, proc.stderr
    return folder, proc.stdout


def test_prompts_file_writes_images_and_manifest(one_process):
    folder, stdout = one_process
    assert "wrote 9 images and manifest.jsonl" in stdout and "3 prompts x 3, seeds 7..15" in stdout
    files = sorted(p.name for p in (folder / "one").iterdir())
    assert files == [f"{k:05d}.png" for k in range(9)] + ["manifest.jsonl"]
    manifest = [json.loads(line) for line in (folder / "one" / "manifest.jsonl").read_text().splitlines()]
    prompts = ["a red triangle above a blue circle", "a green square", "a yellow circle"]  # comments, blanks skipped
    assert [(m["file"], m["prompt"], m["seed"]) for m in manifest] == [
        (f"{k:05d}.png", prompts[k // 3], 7 + k) for k in range(9)]
    assert manifest[0]["steps"] == 4 and manifest[0]["sampler"] == "dpmpp_2m"
    assert pixels(folder / "one" / "00000.png").shape == (32, 32, 3)  # --out-dir keeps the model's pixels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_the_images_of_one(one_process):
    """2 CPU processes (k % 2 == rank, batches of 2) write byte-identical PNGs and the same manifest."""
    folder, _ = one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "tinydit",
                           "generate", "--prompts", str(folder / "prompts.txt"), *TORCHRUN_JOB, "--batch-size", "2",
                           "--out-dir", str(folder / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 9 images") == 1 and "2 processes" in proc.stdout  # rank 0 reports
    one, two = sorted((folder / "one").iterdir()), sorted((folder / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two]  # none lost, none extra (no temporary files left)
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_stochastic_sampler_images_do_not_depend_on_batch_size(tmp_path, capsys):
    """An ancestral sampler draws fresh noise per batch, so generate runs it one image at a time."""
    (tmp_path / "p.txt").write_text("a blue square\na red circle\n")
    for size in ("1", "8"):
        assert cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--steps", "4",
                         "--sampler", "euler_ancestral", "--batch-size", size, "--out-dir", str(tmp_path / size)]) == 0
    assert "4 steps of euler_ancestral" in capsys.readouterr().out
    for k in range(4):
        assert (tmp_path / "1" / f"{k:05d}.png").read_bytes() == (tmp_path / "8" / f"{k:05d}.png").read_bytes()


def test_missing_prompt_is_one_line_in_a_real_process(tmp_path):
    proc = run("--out", str(tmp_path / "a.png"))
    line = one_line_error(proc.returncode, proc.stderr)
    assert "--prompts: expected a prompt or --prompts FILE (one of the two), got neither" in line


@pytest.mark.parametrize("args, expected", [
    (("a cat", "--prompts", "{p}", "--out-dir", "{d}"), r"--prompts: .*one of the two\), got both"),
    (("--out-dir", "{d}"), r"--prompts: .*got neither"),
    (("--prompts", "{empty}", "--out-dir", "{d}"), r"--prompts: no prompts in .*empty\.txt.* # comment"),
    (("--prompts", "{d}/none.txt", "--out-dir", "{d}"), r"--prompts: .*none\.txt' \(no such file\)"),
    (("--prompts", "{p}",), r"--out-dir: --prompts writes one PNG per image"),
    (("a cat", "--out", "{d}/a.png", "--out-dir", "{d}"), r"--out: give --out FILE .* not both"),
    (("a cat", "--steps", "0"), r"argument --steps: expected an integer in 1\.\.1000, got 0"),
    (("a cat", "--cfg", "-1"), r"argument --cfg: expected a finite number >= 0, got '-1'"),
    (("a cat", "--n", "0"), r"argument --n/--num-images: expected an integer in 1\.\.4096, got 0"),
    (("a cat", "--sampler", "bogus"), r"--sampler: expected one of .*dpmpp_2m.*, got 'bogus'"),
    (("a cat", "--out", "{d}/a.gif"), r"--out: .*\.png or \.jpg, got '.*a\.gif' \(extension '\.gif'\)"),
    (("a cat", "--out", "{d}"), r"--out: .* which is a folder"),
    (("a cat", "--model", "{d}/no_such_model"), r"--model: no folder '.*no_such_model', and it is not a hub id"),
    (("a cat", "--model", "{d}"), r"--model: no model in '.*' \(expected a pipeline folder"),
    (("a cat", "--n", "4096", "--scale", "64"), r"--n/--scale/--cols: the grid would be .* lower --n or --scale"),
])
def test_bad_flags_are_one_line_naming_the_flag(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("# nothing here\n\n   \n")
    argv = ["generate", *(a.format(p=tmp_path / "p.txt", d=tmp_path, empty=tmp_path / "empty.txt") for a in args)]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    line = one_line_error(code, capsys.readouterr().err)
    assert re.search(expected, line), line
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jsonl"))


def test_out_file_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["generate", "a cat", "--out", str(tmp_path / "a.png")])
    assert "--out: one process writes one file, but WORLD_SIZE=2" in one_line_error(code, capsys.readouterr().err)
