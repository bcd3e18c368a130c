"""The floor plan: inference on the ground floor, one way to generate an image, schedules that split.

- `tinydit.pipeline` and `tinydit.edit`, imported alone in a fresh interpreter, bring no training,
  grading or chapter-study module, and nothing of torch.distributed beyond what `import torch` loads.
- The evaluator grades exactly what `python -m tinydit generate` draws: same prompt and seed, the same
  pixels, bit for bit.
- Samplers run any strictly descending schedule: one run over `sigmas` equals a run over
  `sigmas[:k+1]` followed by a run over `sigmas[k:]` (one-step samplers bit for bit, ancestral ones
  with the same generator).
- Chapters stay within one sitting: none grows past its size at this commit, none new past 1,000 lines.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinydit import cli, evaluate
from tinydit.data import pil_to_tensor
from tinydit.denoisers import GaussianDenoiser
from tinydit.pipeline import TextToImagePipeline
from tinydit.samplers import SAMPLERS
from tinydit.schedules import karras_sigmas


ROOT = Path(__file__).resolve().parents[1]
ABOVE_INFERENCE = ("tinydit.train", "tinydit.evaluate", "tinydit.guidance_study", "tinydit.demo", "tinydit.cli",
                   "tinydit.safety")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, torch; base = set(sys.modules); {statement}; print('\\n'.join(sorted(set(sys.modules) - base)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["tinydit.pipeline", "tinydit.edit"])
def test_inference_imports_nothing_from_training_grading_or_studies(module):
    loaded = _modules_after(f"import {module}")
    assert module in loaded
    above = sorted(m for m in loaded if m.startswith(ABOVE_INFERENCE))
    assert not above, f"{module} pulls in {above}"
    # `import torch` (2.13) already loads torch.distributed and DDP, so this guards older and newer torches
    distributed = sorted(m for m in loaded if m.startswith(("torch.distributed", "torch.nn.parallel.distributed")))
    assert not distributed, f"{module} pulls in {distributed[:5]}"


def test_the_floor_plan_test_can_fail():
    """The same check sees training when it is there (so an empty answer above means something)."""
    loaded = _modules_after("import tinydit.evaluate")
    assert {"tinydit.train", "tinydit.evaluate", "tinydit.pipeline"} <= loaded  # grading stands on both


@pytest.fixture(scope="module")
def book_pipe():
    return TextToImagePipeline.from_pretrained()


@torch.no_grad()
def test_evaluate_grades_the_pictures_generate_writes(book_pipe, tmp_path):
    drawn = []

    def recording(captions, seeds):
        images = evaluate.pipeline_generator(book_pipe)(captions, seeds)
        drawn.extend(zip(captions, seeds, images))
        return images

    # batch_size=1, as the CLI draws one image: a batch of two moves latents by ~1e-6 (float GEMM blocking),
    # enough to flip a rounded pixel now and then
    report = evaluate.evaluate(recording, n=2, batch_size=1, disable=True)
    assert evaluate.evaluate_model(book_pipe, n=2, batch_size=1, disable=True).as_dict() == report.as_dict()
    assert len(drawn) == 6  # 2 prompts in each of the 3 groups
    for i, (caption, seed, image) in enumerate(drawn[1::2]):  # one prompt per group through the CLI
        (tmp_path / f"p{i}.txt").write_text(caption + "\n")
        out = tmp_path / f"out{i}"  # --out-dir: each image at its own size (--out draws a grid at 4x)
        assert cli.main(["generate", "--prompts", str(tmp_path / f"p{i}.txt"), "--seed", str(seed),
                         "--out-dir", str(out)]) == 0
        png = pil_to_tensor(Image.open(out / "00000.png").convert("RGB"))
        assert torch.equal(png, image), (caption, seed)


ONE_STEP = ["euler", "heun", "dpm_2", "ddim", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"]


@pytest.mark.parametrize("name", ONE_STEP)
@pytest.mark.parametrize("k", [1, 4, 8])
def test_a_schedule_split_in_two_is_the_whole_run(name, k):
    gauss = GaussianDenoiser(0.3, 1.0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = karras_sigmas(10, 0.03, 80.0).double()
    whole = SAMPLERS[name](gauss, x, sigmas, disable=True, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    first = SAMPLERS[name](gauss, x, sigmas[: k + 1], disable=True, generator=g)  # stops at sigma_k > 0
    assert not torch.equal(first, whole)  # partly denoised, not finished
    assert torch.equal(SAMPLERS[name](gauss, first, sigmas[k:], disable=True, generator=g), whole)


@torch.no_grad()
def test_a_split_schedule_on_the_book_model(book_pipe):
    """Two halves through the pipeline's own denoise step (ComfyUI's SplitSigmas), Euler: the whole run."""
    r = book_pipe.check_inputs(["a red circle above a blue square"], num_inference_steps=8, sampler="euler")
    cond, start = book_pipe.encode_prompt(r.prompts, r.negatives), book_pipe.prepare_latents(r.shape, seed=0)
    sigmas = book_pipe.schedule(8)
    x = start.noise * sigmas[0]
    whole = book_pipe.denoise(x, cond, sigmas, sampler="euler", disable=True)
    half = book_pipe.denoise(x, cond, sigmas[:4], sampler="euler", span=sigmas, disable=True)
    assert torch.equal(book_pipe.denoise(half, cond, sigmas[3:], sampler="euler", span=sigmas, disable=True), whole)


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - set(ONE_STEP) - {"euler_ancestral_rf"}))
def test_multistep_samplers_restart_their_history_at_a_split(name):
    """Multistep methods restart their history at a split (as k-diffusion's do): the first part stops
    at its last noise level, partly denoised, and the two parts land near the whole run."""
    gauss = GaussianDenoiser(0.3, 1.0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = karras_sigmas(10, 0.03, 80.0).double()
    whole = SAMPLERS[name](gauss, x, sigmas, disable=True, generator=torch.Generator().manual_seed(1))
    first = SAMPLERS[name](gauss, x, sigmas[:5], disable=True, generator=torch.Generator().manual_seed(1))
    assert float((first - 0.3).std()) > 0.5 * float(sigmas[4])  # noise of level sigma_4 is left
    done = SAMPLERS[name](gauss, first, sigmas[4:], disable=True, generator=torch.Generator().manual_seed(1))
    if "sde" in name:  # other noise after the split: compare the spread (measured 1.32 / 1.21, 2.24 / 2.04)
        assert abs(float(done.std()) - float(whole.std())) < 0.5
    else:  # measured: 2M 0.027, LMS 0.047, UniPC 0.014 apart (the restart's lower-order first steps)
        assert float((done - whole).abs().max()) < 0.1


CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.py"))
SITTING = 900  # lines a chapter aims at: one sitting
HARD_LIMIT = 1000  # lines no chapter may pass


def test_every_chapter_fits_one_sitting():
    sizes = {nb.stem: len(nb.read_text().splitlines()) for nb in CHAPTERS}
    too_long = {name: n for name, n in sizes.items() if n > HARD_LIMIT}
    assert not too_long, f"chapters over {HARD_LIMIT} lines: {too_long}; split them (NNa, NNb) or move plumbing out"
    long = {name: n for name, n in sizes.items() if n > SITTING}
    assert not long, f"chapters over one sitting ({SITTING} lines): {long}"


def _exported_cells(nb: Path):
    """(first line, non-blank lines, top-level definitions) of every exported cell of a notebook."""
    sys.path.insert(0, str(ROOT / "tools"))
    from export import split_cells_at

    for kind, lines, start in split_cells_at(nb.read_text()):
        body = [line for line in lines if line.strip()]
        if kind != "code" or not body or not re.match(r"#\s*\|\s*export\b", body[0]):
            continue
        tree = ast.parse("\n".join(lines))
        defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        yield start, len(body), defs


def test_exported_cells_are_short_with_one_definition_each():
    long, crowded = [], []
    for nb in CHAPTERS:
        for start, n, defs in _exported_cells(nb):
            if n > 40:
                long.append(f"{nb.name}:{start} ({n} lines)")
            if len(defs) > 1:
                crowded.append(f"{nb.name}:{start} {defs}")
    assert not long, f"exported cells over 40 non-blank lines (build the class across cells with @add_to_class): {long}"
    assert not crowded, f"exported cells with more than one definition: {crowded}"


def test_the_cell_checks_see_a_long_crowded_cell(tmp_path):
    """Control: the two checks above do fail on a notebook that breaks them."""
    nb = tmp_path / "99_bad.py"
    nb.write_text("# %%\n# | export\n" + "\n".join(f"x{i} = {i}" for i in range(41)) + "\ndef a():\n    pass\n\n\ndef b():\n    pass\n")
    (start, n, defs), = _exported_cells(nb)
    assert n > 40 and defs == ["a", "b"]
