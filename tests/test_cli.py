"""The command line: real subprocesses, as a user runs them."""

import argparse
import re
import subprocess
import sys

import pytest
from PIL import Image

from tinydit import cli


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinydit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def one_line_error(proc) -> str:
    """The single stderr line of a refused command (exit status 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    return lines[0]


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


def test_dataset_jpeg(tmp_path):
    out = tmp_path / "grid.JPG"
    proc = run("dataset", "--n", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.format == "JPEG"


@pytest.mark.parametrize(
    "args",
    [("dataset", "--n", "0"), ("dataset", "--n", "abc"), ("dataset", "--split", "val"),
     ("dataset", "--bogus"), ("nosuchcommand",), (), ("dataset", "--size", "4")],
)
def test_bad_flags_one_line_no_traceback(args, tmp_path):
    proc = run(*args, "--out", str(tmp_path / "g.png")) if args and args[0] == "dataset" and "--bogus" not in args else run(*args)
    one_line_error(proc)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--out", "somedir"), r"--out: expected an image file path ending in \.png or \.jpg, got 'somedir' \(no extension\)"),
        (("--out", "grid.gif"), r"--out: .*\.png or \.jpg, got 'grid\.gif' \(extension '\.gif'\)"),
        (("--n", "100000"), r"argument --n: expected an integer in 1\.\.4096, got 100000"),
        (("--scale", "100000"), r"argument --scale: expected an integer in 1\.\.64, got 100000"),
        (("--size", "100000"), r"argument --size: expected an integer in 8\.\.1024, got 100000"),
        (("--size", "1024", "--n", "4096"), r"--n/--size/--scale/--cols: the grid would be .* megapixels"),
        (("--seed", "99999999999999999999999"), r"argument --seed: expected an integer in 0\.\.\d+, got 9{23}"),
        (("--seed", "-1"), r"argument --seed: expected an integer in 0\.\.\d+, got -1"),
    ],
)
def test_dataset_refuses_bad_values_naming_the_flag(args, expected, tmp_path):
    """Each bad value is refused in one line that names the flag, what was given and what is expected."""
    proc = run("dataset", *args, cwd=tmp_path)
    assert re.search(expected, one_line_error(proc)), proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written


def test_dataset_out_is_a_folder(tmp_path):
    line = one_line_error(run("dataset", "--out", str(tmp_path)))
    assert "--out" in line and str(tmp_path) in line and "folder" in line and ".png" in line


def test_dataset_out_folder_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = one_line_error(run("dataset", "--n", "2", "--out", str(blocker / "grid.png")))
    assert "--out" in line and "a_file" in line


@pytest.mark.parametrize("cmd", ["train-vae", "train-text-encoder"])
def test_train_out_unwritable_is_refused_before_training(cmd, tmp_path):
    """With the default 1500-4500 steps, a check made only after training would time out here."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "model"):
        proc = run(cmd, "--out", str(out))
        line = one_line_error(proc)
        assert line.startswith(f"python -m tinydit {cmd}: error: --out: cannot write to the folder")
        assert str(out) in line and not proc.stdout


@pytest.mark.parametrize("cmd", ["train-vae", "train-text-encoder"])
def test_train_flags_refused_naming_the_flag(cmd, tmp_path):
    assert "argument --seed:" in one_line_error(run(cmd, "--seed", str(2**70), "--out", str(tmp_path)))
    assert "argument --batch-size:" in one_line_error(run(cmd, "--batch-size", "10000000", "--out", str(tmp_path)))


def test_train_text_encoder_help_shows_out_default():
    proc = run("train-text-encoder", "--help")
    assert proc.returncode == 0
    assert "outputs/book_text_encoder" in " ".join(proc.stdout.split())


def test_every_subcommand_help_shows_every_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.default not in (None, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (name, action.option_strings)


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


def test_version_is_printed():
    import subprocess
    import sys

    from tinydit import __version__

    out = subprocess.run([sys.executable, "-m", "tinydit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tinydit {__version__}"


def test_an_unknown_flag_points_at_its_subcommands_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "a red circle", "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.strip() == (
        "python -m tinydit generate: error: unrecognized arguments: --bogus (see `python -m tinydit generate --help`)")
