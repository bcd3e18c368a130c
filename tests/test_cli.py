"""The command line: real subprocesses, as a user runs them."""

import subprocess
import sys

import pytest
from PIL import Image


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinydit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "dataset" in proc.stdout and "captioned grid" in proc.stdout
    sub = run("dataset", "--help")
    assert sub.returncode == 0 and "--out" in sub.stdout and "--n" in sub.stdout


def test_dataset_grid(tmp_path):
    out = tmp_path / "sub" / "grid.png"
    proc = run("dataset", "--n", "12", "--cols", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    with Image.open(out) as im:
        assert im.width == 4 * (128 + 4) + 4 and im.height > 3 * 128


@pytest.mark.parametrize(
    "args",
    [("dataset", "--n", "0"), ("dataset", "--n", "abc"), ("dataset", "--split", "val"),
     ("dataset", "--bogus"), ("nosuchcommand",), (), ("dataset", "--size", "4")],
)
def test_bad_flags_one_line_no_traceback(args, tmp_path):
    proc = run(*args, "--out", str(tmp_path / "g.png")) if args and args[0] == "dataset" and "--bogus" not in args else run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]


def test_train_vae_writes_a_loadable_vae(tmp_path):
    out = tmp_path / "vae"
    proc = run("train-vae", "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "held-out PSNR" in proc.stdout
    from tinydit import vae

    model = vae.AutoencoderKL.from_pretrained(out)
    assert model.config.latent_channels == 4


def test_train_commands_explain_themselves():
    for cmd in ("train-vae", "train-text-encoder"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "--steps" in proc.stdout and "shipped" in proc.stdout
