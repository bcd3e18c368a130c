"""book/manifest.md backs its claims with commands: every `python ...` command it quotes exists and runs
with --help (the script or the CLI subcommand), so no claim points at something gone."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "book" / "manifest.md").read_text()
COMMANDS = sorted(set(re.findall(r"`(python [^`]+)`", TEXT)))


def entry_point(command: str) -> list[str]:
    """`python -m tinydit evaluate --n 300` -> [python, -m, tinydit, evaluate]; `python tools/x.py` -> [python, tools/x.py]."""
    words = shlex.split(command)
    assert words[0] == "python", command
    if words[1] == "-m":
        return [sys.executable, "-m", words[2]] + ([words[3]] if len(words) > 3 and not words[3].startswith("-") else [])
    return [sys.executable, str(ROOT / words[1])]


def test_the_manifest_quotes_commands():
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_quoted_command_runs_with_help(command):
    proc = subprocess.run(entry_point(command) + ["--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), f"{command}: {proc.stderr[-1500:]}"
