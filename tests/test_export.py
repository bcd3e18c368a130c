"""tools/export.py: notebooks -> package, and --check catching stale and orphan modules."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import export  # noqa: E402


NOTEBOOK = '''# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A chapter
# # | export   <- inside markdown: ignored

# %%
# | default_exp toy

# %%
# | export
def double(x):
    return 2 * x

# %%
print("a demo cell, not exported")

# %%
# | export helpers
HELPER = 1

# %%
# | export

CONSTANT = double(21)
'''


def make_project(tmp_path: Path) -> Path:
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "tinydit").mkdir()
    (tmp_path / "notebooks" / "07_toy.py").write_text(NOTEBOOK)
    (tmp_path / "tinydit" / "__init__.py").write_text('"""hand-written, never touched"""\n')
    return tmp_path


def run_tool(root: Path, *flags):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--root", str(root), *flags],
                          capture_output=True, text=True)


def test_export_writes_modules_with_header(tmp_path):
    root = make_project(tmp_path)
    assert run_tool(root).returncode == 0
    toy = (root / "tinydit" / "toy.py").read_text()
    assert toy.startswith(export.HEADER_MARK)
    assert "notebooks/07_toy.py" in toy.splitlines()[0] and "DO NOT EDIT" in toy.splitlines()[0]
    assert "def double" in toy and "CONSTANT = double(21)" in toy
    assert "demo cell" not in toy and "# | export" not in toy and "HELPER" not in toy
    assert toy.index("def double") < toy.index("CONSTANT")  # notebook order
    notebook = (root / "notebooks" / "07_toy.py").read_text().splitlines()
    for source in [line for line in toy.splitlines() if line.startswith("# notebooks/07_toy.py:")]:
        number = int(source.rsplit(":", 1)[1])  # each chunk names the line its code starts on
        following = toy.splitlines()[toy.splitlines().index(source) + 1]
        assert notebook[number - 1] == following, (source, following)
    assert "HELPER = 1" in (root / "tinydit" / "helpers.py").read_text()
    ns = {}
    exec(compile(toy, "toy.py", "exec"), ns)
    assert ns["CONSTANT"] == 42
    assert (root / "tinydit" / "__init__.py").read_text() == '"""hand-written, never touched"""\n'
    assert run_tool(root, "--check").returncode == 0


def test_check_names_hand_edited_module(tmp_path):
    root = make_project(tmp_path)
    run_tool(root)
    path = root / "tinydit" / "toy.py"
    path.write_text(path.read_text() + "\nEDITED = True\n")
    proc = run_tool(root, "--check")
    assert proc.returncode == 1
    assert "tinydit/toy.py" in proc.stderr and "differs" in proc.stderr
    assert "helpers.py" not in proc.stderr


def test_check_names_module_stale_after_notebook_change(tmp_path):
    root = make_project(tmp_path)
    run_tool(root)
    nb = root / "notebooks" / "07_toy.py"
    nb.write_text(nb.read_text().replace("return 2 * x", "return 3 * x"))
    proc = run_tool(root, "--check")
    assert proc.returncode == 1 and "tinydit/toy.py" in proc.stderr


def test_check_names_missing_module(tmp_path):
    root = make_project(tmp_path)
    proc = run_tool(root, "--check")
    assert proc.returncode == 1
    assert "tinydit/toy.py: missing" in proc.stderr and "tinydit/helpers.py: missing" in proc.stderr


def test_check_names_orphan_after_notebook_renamed(tmp_path):
    root = make_project(tmp_path)
    run_tool(root)
    nb = root / "notebooks" / "07_toy.py"
    nb.rename(root / "notebooks" / "07_game.py")
    text = (root / "notebooks" / "07_game.py").read_text().replace("default_exp toy", "default_exp game")
    (root / "notebooks" / "07_game.py").write_text(text)
    proc = run_tool(root, "--check")
    assert proc.returncode == 1
    assert "tinydit/toy.py: orphan" in proc.stderr and "07_toy.py" in proc.stderr
    assert "tinydit/game.py: missing" in proc.stderr
    # exporting again removes the orphan and brings the package back in sync
    assert run_tool(root).returncode == 0
    assert not (root / "tinydit" / "toy.py").exists()
    assert run_tool(root, "--check").returncode == 0


def test_export_without_default_module_is_an_error(tmp_path):
    root = make_project(tmp_path)
    nb = root / "notebooks" / "07_toy.py"
    nb.write_text(nb.read_text().replace("# | default_exp toy", "# no module declared"))
    proc = run_tool(root)
    assert proc.returncode == 2 and "default_exp" in proc.stderr


@pytest.mark.parametrize("flags", [(), ("--check",)])
def test_module_fed_by_two_notebooks_is_refused(tmp_path, flags):
    root = make_project(tmp_path)
    second = "# %%\n# | default_exp other\n\n# %%\n# | export toy\nEXTENDED = True\n"
    (root / "notebooks" / "08_more.py").write_text("# ---\n# ---\n\n" + second)
    proc = run_tool(root, *flags)
    assert proc.returncode == 2
    assert "tinydit/toy.py is fed by 2 notebooks" in proc.stderr
    assert "07_toy.py" in proc.stderr and "08_more.py" in proc.stderr
    assert not (root / "tinydit" / "toy.py").exists() or "EXTENDED" not in (root / "tinydit" / "toy.py").read_text()


def test_split_cells_kinds():
    cells = export.split_cells("header\n# %% [markdown]\n# text\n# %%\nx = 1\n")
    assert [k for k, _ in cells] == ["markdown", "code"]
    assert cells[1][1] == ["x = 1"]


@pytest.mark.parametrize("flags", [("--check",)])
def test_repository_is_in_sync(flags):
    proc = run_tool(ROOT, *flags)
    assert proc.returncode == 0, proc.stderr


CLASS_ACROSS_CELLS = '''# %%
# | default_exp toy

# %%
# | export
class Box:
    def __init__(self, x):
        self.x = x

# %%
print("a demo cell between the two")

# %%
# | export
@add_to_class(Box)
# a comment about the method
@property
def doubled(self):
    """Twice x."""
    return 2 * self.x
'''


def test_add_to_class_cells_are_written_inside_the_class_body(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "tinydit").mkdir()
    (tmp_path / "notebooks" / "03_box.py").write_text(CLASS_ACROSS_CELLS)
    assert run_tool(tmp_path).returncode == 0
    text = (tmp_path / "tinydit" / "toy.py").read_text()
    assert "add_to_class" not in text and "    @property\n    def doubled(self):" in text
    namespace: dict = {}
    exec(text, namespace)  # the generated module is ordinary Python: the method is in the class body
    assert namespace["Box"](3).doubled == 6
    # and the notebook's decorator does the same at run time, for a property too
    from tinydit.notebook import add_to_class

    class Box2:
        x = 4

    add_to_class(Box2)(property(lambda self: 2 * self.x))
    assert Box2().__class__.__dict__["<lambda>"].fget(Box2()) == 8

def test_add_to_class_without_an_earlier_class_is_an_error(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "tinydit").mkdir()
    (tmp_path / "notebooks" / "03_box.py").write_text(CLASS_ACROSS_CELLS.replace("class Box:", "class Other:"))
    r = run_tool(tmp_path)
    assert r.returncode == 2 and "@add_to_class(Box)" in r.stderr and "class Box" in r.stderr
