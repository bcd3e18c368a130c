"""Command line: `python -m tinydit <command> ...` (or the `tinydit` script).

Hand-written glue (no notebook owns it): each subcommand parses flags and calls what the chapters
exported. Errors in flags or values print one line that names the flag and exit with status 2,
never a traceback. Every flag is checked before any work starts: ranges in the argparse types,
output paths and the size of the picture to draw in `_check_*` helpers.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


MAX_SAMPLES = 4096  # --n: at 8 columns that is a 512-row grid of ~90 megapixels
MAX_IMAGE_SIZE = 1024  # --size: pixels per side of one sample
MAX_SCALE = 64  # --scale: enlargement of each tile
MAX_GRID_PIXELS = 2**27  # ~134 megapixels (~400 MB in memory) for the whole grid
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_JPEG_SIDE = 65_500  # the JPEG format stores each side in 16 bits


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; we print a single line that points at --help."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _FlagError(ValueError):
    """A flag's value is unusable; the message starts with the flag's name."""


def _int_in(low: int, high: int):
    """An argparse type: an integer in [low, high] (argparse prefixes the flag's name)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid <name> value" messages
    return parse


def _number_at_least(low: float):
    """An argparse type: a finite number >= low (argparse prefixes the flag's name)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low:g}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _check_image_path(flag: str, text: str) -> Path:
    """`text` as a .png / .jpg file path whose folder exists or can be created."""
    out = Path(text)
    if out.is_dir():
        raise _FlagError(f"{flag}: expected an image file path ending in .png or .jpg, got {text!r}, "
                         "which is a folder (try --out grid.png)")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        got = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise _FlagError(f"{flag}: expected an image file path ending in .png or .jpg, got {text!r} ({got})")
    _check_writable_folder(flag, out.parent)
    return out


def _check_writable_folder(flag: str, folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise _FlagError(f"{flag}: cannot write to the folder {str(folder)!r} (it is a file); "
                         "choose a folder you can write to")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise _FlagError(f"{flag}: cannot write to the folder {str(folder)!r} ({reason}); "
                         "choose a folder you can write to") from None


def _check_grid_fits(args: argparse.Namespace, flags: str = "--n/--size/--scale/--cols") -> None:
    """Refuse a grid that would not fit in memory (e.g. --n 4096 --size 1024), before drawing it."""
    tile = args.size * args.scale + 4  # pixels per tile side, with padding
    cols = min(args.cols, args.n)
    rows = math.ceil(args.n / cols)
    width, height = cols * tile, rows * tile  # captions make it taller still
    if width * height > MAX_GRID_PIXELS:
        shrink = flags.split("/")[:-1]  # every flag but --cols makes the grid smaller
        lower = f"{', '.join(shrink[:-1])} or {shrink[-1]}"
        raise _FlagError(f"{flags}: the grid would be at least {width}x{height} px "
                         f"({width * height / 1e6:,.0f} megapixels), more than the "
                         f"{MAX_GRID_PIXELS / 1e6:.0f} megapixels allowed; lower {lower}")


def _cmd_dataset(args: argparse.Namespace) -> int:
    _check_grid_fits(args)  # before _check_image_path, which may create the output folder
    out = _check_image_path("--out", args.out)
    from tinydit import data, emoji

    if args.dataset == "shapes":
        ds = data.ShapesDataset(args.n, size=args.size, seed=args.seed, split=args.split)
    else:
        ds = emoji.EmojiDataset(size=args.size)
    t0 = time.perf_counter()
    grid = data.dataset_grid(ds, n=args.n, cols=args.cols, scale=args.scale)
    if out.suffix.lower() != ".png" and max(grid.size) > MAX_JPEG_SIDE:
        raise _FlagError(f"--out: a JPEG side is at most {MAX_JPEG_SIDE} px but this grid is "
                         f"{grid.width}x{grid.height}; write a .png or show fewer samples (--n)")
    grid.save(out)
    shown = min(args.n, len(ds))
    print(f"wrote {out} ({shown} {args.dataset} samples, {grid.width}x{grid.height} px, "
          f"{time.perf_counter() - t0:.2f} s)")
    return 0


def _cmd_train_vae(args: argparse.Namespace) -> int:
    _check_writable_folder("--out", Path(args.out))
    import torch

    from tinydit import vae, vae_training

    t0 = time.perf_counter()
    model, history = vae_training.train_book_vae(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                                 out_dir=args.out)
    images = vae.shapes_images(256, seed=0, split="test")
    with torch.no_grad():
        rec = model.decode(model.encode(images).mode()).clamp(-1, 1)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s); held-out PSNR "
          f"{float(vae.psnr(rec, images).mean()):.2f} dB on 256 test images")
    return 0


def _cmd_train_text_encoder(args: argparse.Namespace) -> int:
    _check_writable_folder("--out", Path(args.out))
    from tinydit import text_training

    t0 = time.perf_counter()
    encoders = text_training.train_book_text_encoder(out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                                                     seed=args.seed)
    metrics = text_training.evaluate_book_encoders(encoders.text_encoder, encoders.image_encoder, n=1000, seed=1)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s); on 1,000 test pairs:")
    for key, value in metrics.items():
        shown = ", ".join(f"{k} {v:.1%}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) \
            if isinstance(value, dict) else f"{value:.1%}" if isinstance(value, float) else str(value)
        print(f"  {key.replace('_', ' ')}: {shown}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from tinydit import train

    fast = os.environ.get("TINYDIT_FAST") == "1"
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed),
                                   ("objective", args.objective), ("compile", args.compile or None)) if v is not None}
    cfg = train.TrainConfig.fast(**overrides) if fast else train.TrainConfig(**overrides)
    _check_writable_folder("--out", Path(args.out))
    found = train.checkpoints(Path(args.out) / "checkpoints")
    if args.resume and not found:
        raise _FlagError(f"--resume: no checkpoint (step-*.pt) in {str(Path(args.out) / 'checkpoints')!r} to "
                         "continue; drop --resume to start a run there")
    if found and not args.resume:
        raise _FlagError(f"--out: {args.out} already holds checkpoints of a run; continue it with --resume, "
                         "or choose an empty folder")
    t0 = time.perf_counter()
    folder = train.train_book_model(cfg, out_dir=args.out, resume=args.resume)
    rank, _ = train.distributed()
    if rank == 0:
        print(f"wrote {folder} ({cfg.steps} steps{' at TINYDIT_FAST size' if fast else ''}, "
              f"{time.perf_counter() - t0:.0f} s)")
    return 0


def _check_evaluate_flags(args: argparse.Namespace) -> None:
    """--sampler, --model, --run and --json, before a model is loaded or an image drawn."""
    from tinydit.samplers import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise _FlagError(f"--sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {args.sampler!r}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise _FlagError(f"--model: no book model in {args.model!r} (expected config.json and "
                         "diffusion_pytorch_model.safetensors); train one with python -m tinydit train")
    if args.run is not None and not any(Path(args.run).glob("snapshots/step-*")):
        raise _FlagError(f"--run: no snapshots (snapshots/step-*) in {args.run!r}; train with snapshot_every > 0")
    if args.json is not None:
        if Path(args.json).is_dir() or Path(args.json).suffix.lower() != ".json":
            raise _FlagError(f"--json: expected a file path ending in .json, got {args.json!r}"
                             + (", which is a folder" if Path(args.json).is_dir() else ""))
        _check_writable_folder("--json", Path(args.json).resolve().parent)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from tinydit import evaluate

    _check_evaluate_flags(args)
    settings = dict(steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, seed=args.seed)
    t0 = time.perf_counter()
    if args.run is not None:
        result = evaluate.evaluate_run(args.run, n=args.n, **settings)
        for point in result:
            acc = point["accuracy"]
            print(f"step {point['step']:>6}: seen pair {acc['seen']['pair']:.1%}, HELD_OUT pair "
                  f"{acc['held_out']['pair']:.1%}, two objects + relation {acc['two']['relation']:.1%}, "
                  f"FD {point['frechet']:.2f}")
        cfg = args.cfg
    else:
        pipe = _load_model_flag(args.model)  # the pipeline `generate --model` runs: the grade is of the product
        report = evaluate.evaluate_model(pipe, n=args.n, **settings)
        result = report.as_dict()
        print(report.table())
        cfg = pipe.sampling.guidance_scale if args.cfg is None else args.cfg
    print(f"({args.n} prompts per group, {args.steps} steps of {args.sampler}, guidance "
          f"{'the pipeline default' if cfg is None else cfg}, {time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        Path(args.json).write_text(json.dumps({"settings": settings, "n": args.n, "result": result}, indent=1))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------- generate (chapter 13)

def _read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts file: one a line, blank lines and `#` comments skipped."""
    file = Path(path)
    if not file.is_file():
        what = "a folder" if file.is_dir() else "no such file"
        raise _FlagError(f"--prompts: expected a text file with one prompt a line, got {path!r} ({what})")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise _FlagError(f"--prompts: cannot read {path!r} as UTF-8 text ({reason})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise _FlagError(f"--prompts: no prompts in {path!r} (every line is blank or a # comment)")
    return prompts


def _processes() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK and WORLD_SIZE; (0, 1) for a plain run."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise _FlagError(f"RANK/WORLD_SIZE: expected integers (torchrun sets them), got RANK="
                         f"{os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None
    if not 0 <= rank < world:
        raise _FlagError(f"RANK/WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


def _check_model_flag(text: str | None) -> None:
    """--model: a folder holding a pipeline (model_index.json) or a book model (config.json), or a hub id."""
    if text is None:
        return
    folder = Path(text)
    if folder.exists():
        if not ((folder / "model_index.json").is_file() or (folder / "config.json").is_file()):
            raise _FlagError(f"--model: no model in {text!r} (expected a pipeline folder with model_index.json or "
                             "a book-model folder with config.json); train one with python -m tinydit train")
        return
    from tinydit.checkpoint import HUB_ID

    if not HUB_ID.match(text):
        raise _FlagError(f"--model: no folder {text!r}, and it is not a hub id (owner/name)")


def _check_generate_flags(args: argparse.Namespace) -> list[str]:
    """Every flag of `generate`, before a model is loaded; returns the prompts of the job."""
    if (args.prompt is None) == (args.prompts is None):
        given = "both" if args.prompts is not None else "neither"
        raise _FlagError(f"--prompts: expected a prompt or --prompts FILE (one of the two), got {given}")
    prompts = [args.prompt] if args.prompts is None else _read_prompts(args.prompts)
    from tinydit.samplers import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise _FlagError(f"--sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {args.sampler!r}")
    _check_model_flag(args.model)
    _, world = _processes()
    if args.out_dir is None:
        if args.prompts is not None:
            raise _FlagError("--out-dir: --prompts writes one PNG per image and a manifest; give --out-dir FOLDER")
        if world > 1:
            raise _FlagError(f"--out: one process writes one file, but WORLD_SIZE={world}; under torchrun "
                             "use --out-dir FOLDER (the images are shared out between the processes)")
        args.out = _check_image_path("--out", "out.png" if args.out is None else args.out)
    elif args.out is not None:
        raise _FlagError("--out: give --out FILE (one image or a grid) or --out-dir FOLDER (one PNG per image), "
                         "not both")
    else:
        out_dir = Path(args.out_dir)
        if out_dir.suffix.lower() in IMAGE_SUFFIXES and not out_dir.is_dir():
            raise _FlagError(f"--out-dir: expected a folder, got {args.out_dir!r}, an image file name "
                             "(use --out for one image or a grid)")
        _check_writable_folder("--out-dir", out_dir)
    return prompts


def _stochastic(sampler: str) -> bool:
    """Samplers that draw fresh noise on the way (ancestral, SDE): the pipeline draws it for a whole batch."""
    return "ancestral" in sampler or "sde" in sampler


def _generate_images(pipe, args, prompts: list[str], ks: list[int], bar=None, **edit) -> list:
    """Images k of the job (prompt k // n, seed --seed + k), in batches; an image depends on its k alone.
    `edit`: img2img / inpaint's source image and settings, passed on to the (edit) pipeline."""
    sampler = args.sampler or pipe.sampling.sampler
    fresh_noise = _stochastic(sampler) or edit.get("repaint") is not None  # drawn from the batch's first seed
    size = 1 if fresh_noise else args.batch_size
    images = []
    for start in range(0, len(ks), size):
        batch = ks[start:start + size]
        out = pipe([prompts[k // args.n] for k in batch], negative_prompt=args.negative,
                   num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
                   seed=[args.seed + k for k in batch], disable=True, **edit)
        images += out.images
        if bar is not None:
            bar.update(len(batch))
    return images


def _settings(pipe, args) -> str:
    s = pipe.sampling
    strength = getattr(args, "strength", None)  # img2img and inpaint
    return (f"{args.steps or s.steps} steps of {args.sampler or s.sampler}, guidance "
            f"{s.guidance_scale if args.cfg is None else args.cfg:g}"
            + ("" if strength is None else f", strength {strength:g}"))


def _enlarge(image, scale: int):
    from PIL import Image

    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _write_image_file(pipe, args, prompt: str, size: int | None = None, **edit) -> str:
    """--out: one image, or (--n > 1) a grid whose tiles are captioned with their seeds. `size`: the longer
    side of one image (default: the model's); `edit`: img2img / inpaint's source and settings."""
    from tinydit import data

    scale = 4 if args.scale is None else args.scale
    size = pipe.sampling.sample_size if size is None else size
    _check_grid_fits(argparse.Namespace(n=args.n, size=size, scale=scale, cols=args.cols), "--n/--scale/--cols")
    images = _generate_images(pipe, args, [prompt], list(range(args.n)), **edit)
    if args.n == 1:
        picture = _enlarge(images[0], scale)
    else:
        picture = data.image_grid(images, [f"seed {args.seed + k}" for k in range(args.n)], cols=args.cols,
                                  scale=scale)
    if args.out.suffix.lower() != ".png" and max(picture.size) > MAX_JPEG_SIDE:
        raise _FlagError(f"--out: a JPEG side is at most {MAX_JPEG_SIDE} px but this grid is "
                         f"{picture.width}x{picture.height}; write a .png or ask for fewer images (--n)")
    picture.save(args.out)
    seeds = f"seed {args.seed}" if args.n == 1 else f"seeds {args.seed}..{args.seed + args.n - 1}"
    source = f" from {args.src}" if edit else ""
    return f"wrote {args.out} ({args.n} image{'s' * (args.n > 1)} of {prompt!r}{source}, {seeds}, " \
           f"{_settings(pipe, args)}; {picture.width}x{picture.height} px"


def _write_image_folder(pipe, args, prompts: list[str]) -> str:
    """--out-dir: image k as NNNNN.png (this process's share under torchrun: k % WORLD_SIZE == RANK), and
    manifest.jsonl (one line per image: file, prompt, seed, settings), written once every image exists."""
    import json

    from tqdm.auto import tqdm

    rank, world = _processes()
    total = len(prompts) * args.n
    width = max(5, len(str(total - 1)))
    mine = list(range(rank, total, world))
    with tqdm(total=len(mine), desc="generate", unit="image", disable=None if rank == 0 else True) as bar:
        for start in range(0, len(mine), args.batch_size):  # write as we go: a long job keeps what it made
            ks = mine[start:start + args.batch_size]
            for k, image in zip(ks, _generate_images(pipe, args, prompts, ks, bar)):
                _enlarge(image, args.scale or 1).save(Path(args.out_dir) / f"{k:0{width}d}.png")
    _barrier(world)
    if rank == 0:
        s = pipe.sampling
        common = {"negative_prompt": args.negative or "", "steps": args.steps or s.steps,
                  "guidance_scale": s.guidance_scale if args.cfg is None else args.cfg,
                  "sampler": args.sampler or s.sampler, "model": args.model}
        lines = [json.dumps({"file": f"{k:0{width}d}.png", "prompt": prompts[k // args.n], "seed": args.seed + k,
                             **common}) for k in range(total)]
        manifest = Path(args.out_dir) / "manifest.jsonl"
        tmp = manifest.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(manifest)
    return (f"wrote {total} images and manifest.jsonl to {args.out_dir} ({len(prompts)} prompt"
            f"{'s' * (len(prompts) > 1)} x {args.n}, seeds {args.seed}..{args.seed + total - 1}, "
            f"{_settings(pipe, args)}, {world} process{'es' * (world > 1)}")


def _start_group(world: int) -> None:
    """Several processes (torchrun): a gloo group, used only for the barrier before the manifest."""
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _load_model_flag(model: str | None):
    """The pipeline --model names (None: the shipped book model); a load failure is a --model error."""
    from tinydit.pipeline import TextToImagePipeline

    try:
        return TextToImagePipeline.from_pretrained(model)
    except (OSError, ValueError) as e:  # a hub id that cannot be fetched, a broken folder
        raise _FlagError(f"--model: {str(e).removeprefix('path_or_id: ')}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    prompts = _check_generate_flags(args)
    rank, world = _processes()
    _start_group(world)

    t0 = time.perf_counter()
    pipe = _load_model_flag(args.model)
    loaded = time.perf_counter()
    if args.out_dir is None:
        done = _write_image_file(pipe, args, prompts[0])
    else:
        done = _write_image_folder(pipe, args, prompts)
    if rank == 0:
        print(f"{done}; load {loaded - t0:.1f} s + generate {time.perf_counter() - loaded:.1f} s)")
    return 0


# ---------------------------------------------------------------- img2img and inpaint (chapter 15)

def _strength(text: str) -> float:
    """An argparse type: --strength, a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        why = " (0 would return the source unchanged)" if value == 0 else ""
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1]{why}, got {text!r}")
    return value


_strength.__name__ = "number"


def _repaint(text: str) -> tuple[int, int]:
    """An argparse type: --repaint JUMP,N, RePaint's resampling (redo every JUMP steps N times)."""
    expected = "expected JUMP,N: two integers, JUMP in 1..1000 and N in 1..100, such as 4,4"
    try:
        jump, n = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not (1 <= jump <= 1000 and 1 <= n <= 100):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return jump, n


_repaint.__name__ = "JUMP,N"


def _open_image(name: str, path: str, mode: str):
    """The image file `path` (SRC or MASK) read in full and converted to `mode`, so that a missing or broken
    file stops the command before a model is loaded."""
    from PIL import Image

    file = Path(path)
    if not file.is_file():
        what = "a folder" if file.is_dir() else "no such file"
        raise _FlagError(f"{name}: expected an image file (.png, .jpg, ...), got {path!r} ({what})")
    try:
        with Image.open(file) as image:
            return image.convert(mode)  # reads every pixel: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = getattr(e, "strerror", None) or str(e).split(" '")[0] or type(e).__name__
        raise _FlagError(f"{name}: cannot read {path!r} as an image ({reason})") from None


def _check_edit_flags(args: argparse.Namespace):
    """Every argument of img2img / inpaint, before a model is loaded; returns SRC (RGB) and MASK (L or None)."""
    from tinydit.samplers import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise _FlagError(f"--sampler: expected one of {', '.join(sorted(SAMPLERS))}, got {args.sampler!r}")
    _check_model_flag(args.model)
    source = _open_image("SRC", args.src, "RGB")
    mask = _open_image("MASK", args.mask, "L") if args.command == "inpaint" else None
    args.out = _check_image_path("--out", args.out)  # last: it may create the output folder
    return source, mask


def _check_source_sides(pipe, args, source) -> None:
    """The model works on SRC itself (no --crop-padding): its sides must be multiples of the model's factor."""
    m, (w, h) = pipe.multiple, source.size
    if getattr(args, "crop_padding", None) is None and (w % m or h % m):
        hint = " (or inpaint only around the mask with --crop-padding)" if args.command == "inpaint" else ""
        raise _FlagError(f"SRC: expected sides that are multiples of {m} (the model's VAE factor x patch size), "
                         f"got {w}x{h} in {args.src!r}; resize or crop it first{hint}")


def _cmd_edit(args: argparse.Namespace) -> int:
    """img2img and inpaint: chapter 15's pipelines on the components of chapter 13's."""
    import warnings

    source, mask = _check_edit_flags(args)
    from tinydit.edit import Img2ImgPipeline, InpaintPipeline

    t0 = time.perf_counter()
    pipe = _load_model_flag(args.model)
    _check_source_sides(pipe, args, source)
    if mask is not None and mask.size != source.size:  # after the last check: a refusal stays one line
        print(f"python -m tinydit {args.command}: warning: MASK is {mask.width}x{mask.height} px, SRC "
              f"{source.width}x{source.height}; the mask is resized to SRC's size", file=sys.stderr)
    if mask is None:
        editor, edit = Img2ImgPipeline(**pipe.components), dict(image=source, strength=args.strength)
    else:
        editor = InpaintPipeline(**pipe.components)
        edit = dict(image=source, mask_image=mask, strength=args.strength, crop_padding=args.crop_padding,
                    soft=args.soft, blur=args.blur, repaint=args.repaint)
    loaded = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mask_image: ")  # said above, in one line
        done = _write_image_file(editor, args, args.prompt, max(source.size), **edit)
    print(f"{done}; load {loaded - t0:.1f} s + edit {time.perf_counter() - loaded:.1f} s)")
    return 0


def _demo_notebook(model: str | None, prompt: str) -> dict:
    """The one-cell notebook Voilà serves: chapter 14's GenerateDemo on `model`."""
    import nbformat

    source = ("from tinydit.demo import GenerateDemo\nfrom tinydit.pipeline import TextToImagePipeline\n"
              f"demo = GenerateDemo(TextToImagePipeline.from_pretrained({model!r}), prompt={prompt!r})\n"
              "demo.generate()  # the page opens with a picture\n"
              "demo")
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)],
                                    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("voila") is None:
        raise ImportError("the demo is served by Voila, which is not installed: pip install 'tinydit[notebooks]'")
    import nbformat

    from tinydit.demo import DEMO_PROMPT

    try:  # Voila would quietly move to another port; say so instead
        family, kind, _, _, address = socket.getaddrinfo(args.ip, args.port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as e:
        flag = "--port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "--ip"  # else: not an address here
        raise _FlagError(f"{flag}: cannot listen on {args.ip}:{args.port} ({e.strerror}); pick another "
                         f"{flag.removeprefix('--')}") from None
    _load_model_flag(args.model)  # fail here, in one line, rather than as a traceback in the served page
    model = None if args.model is None else str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    with tempfile.TemporaryDirectory(prefix="tinydit-demo-") as tmp:
        notebook = Path(tmp) / "tinydit_demo.ipynb"
        nbformat.write(nbformat.from_dict(_demo_notebook(model, DEMO_PROMPT if args.prompt is None else args.prompt)), notebook)
        command = [sys.executable, "-m", "voila", str(notebook), f"--port={args.port}", f"--Voila.ip={args.ip}",
                   "--Voila.port_retries=0", "--no-browser"]
        host = "127.0.0.1" if args.ip in ("0.0.0.0", "::") else f"[{args.ip}]" if ":" in args.ip else args.ip
        print(f"serving chapter 14's demo at http://{host}:{args.port}/ (Ctrl-C stops it)", flush=True)
        try:
            return subprocess.call(command)
        except KeyboardInterrupt:  # the server got the same Ctrl-C and is stopping
            return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those flags say in their help what they do when not given."""

    def _get_help_string(self, action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _subparser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every flag's default."""
    return sub.add_parser(name, formatter_class=_DefaultsHelp, **kwargs)


def _add_training_flags(p: argparse.ArgumentParser, out: str, steps: int, batch_size: int) -> None:
    p.add_argument("--out", default=out, help="output folder (created if missing; checked to be "
                   "writable before training starts)")
    p.add_argument("--steps", type=_int_in(1, 10**9), default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=_int_in(1, MAX_BATCH_SIZE), default=batch_size, help=f"batch size, 1..{MAX_BATCH_SIZE}")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help=f"training seed, 0..{MAX_SEED}")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m tinydit",
        description="tinydit: a DiT text-to-image engine built chapter by chapter. "
        "Each subcommand runs what one chapter of the book built.",
    )
    from tinydit import __version__

    parser.add_argument("--version", action="version", version=f"tinydit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_OneLineParser)
    sub.required = True
    parser.set_defaults(_subparsers=sub.choices)  # an unknown flag is reported by its own subcommand

    p = _subparser(
        sub, "dataset",
        help="draw a captioned grid of the book's training data (chapter 01)",
        description="Render samples of the book's dataset with their captions into one PNG grid. "
        "Shapes are drawn procedurally (deterministic in --seed and --split); emoji need the "
        "fonts-noto-color-emoji system package.",
    )
    p.add_argument("--n", type=_int_in(1, MAX_SAMPLES), default=64, help=f"number of samples to show, 1..{MAX_SAMPLES}")
    p.add_argument("--out", default="grid.png", help="output image path, ending in .png or .jpg")
    p.add_argument("--dataset", choices=("shapes", "emoji"), default="shapes", help="which dataset")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="shapes split; 'test' includes the held-out colour/shape pairs")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help=f"dataset seed, 0..{MAX_SEED}")
    p.add_argument("--size", type=_int_in(8, MAX_IMAGE_SIZE), default=32, help=f"image side in pixels, 8..{MAX_IMAGE_SIZE}")
    p.add_argument("--cols", type=_int_in(1, MAX_SAMPLES), default=8, help="grid columns")
    p.add_argument("--scale", type=_int_in(1, MAX_SCALE), default=4, help=f"enlargement of each tile, 1..{MAX_SCALE}")
    p.set_defaults(func=_cmd_dataset)

    p = _subparser(
        sub, "train-vae",
        help="retrain the book's tiny VAE (chapter 02) and save it",
        description="Train the book VAE on the shapes dataset (32x32 images -> 4x8x8 latents) with "
        "the chapter 02 recipe, save config.json + model.safetensors to --out, and print the held-out "
        "PSNR. The defaults reproduce the weights shipped in tinydit/assets/book_vae.",
    )
    _add_training_flags(p, out="outputs/book_vae", steps=4500, batch_size=32)
    p.set_defaults(func=_cmd_train_vae)

    p = _subparser(
        sub, "train-text-encoder",
        help="retrain the book's text encoder contrastively (chapter 06) and save it",
        description="Train the book's CLIP-style text encoder against a small image encoder on the "
        "shapes dataset (contrastive loss), save it in the Hugging Face format to --out. The defaults "
        "reproduce the weights shipped in tinydit/assets/book_text_encoder.",
    )
    _add_training_flags(p, out="outputs/book_text_encoder", steps=1500, batch_size=128)
    p.set_defaults(func=_cmd_train_text_encoder)

    p = _subparser(
        sub, "train",
        help="train the book's text-to-image model (chapter 09) and save it",
        description="Train the book model (a PixArt-style text-conditioned DiT on the shapes world) with "
        "the chapter 09 recipe: checkpoints every 500 steps in --out/checkpoints (atomic, the last 3 kept), "
        "the EMA weights in --out/book_model (diffusers PixArtTransformer2DModel layout). The defaults "
        "reproduce tinydit/assets/book_model. Several processes: torchrun --nproc_per_node K -m tinydit "
        "train (add --nnodes for several machines). TINYDIT_FAST=1 runs the same code for a few steps.",
    )
    p.add_argument("--out", default="runs/book", help="run folder (checkpoints/, snapshots/, book_model/)")
    p.add_argument("--steps", type=_int_in(1, 10**9), default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--batch-size", type=_int_in(1, MAX_BATCH_SIZE), default=None,
                   help="global batch size, split over the processes (default: the recipe's)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=None, help="training seed (default: the recipe's)")
    p.add_argument("--objective", choices=("epsilon", "v_prediction", "flow"), default=None,
                   help="what the network predicts (default: the recipe's v_prediction)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=_cmd_train)

    p = _subparser(
        sub, "evaluate",
        help="grade a text-to-image model's prompt adherence by reading its pictures back (chapter 10)",
        description="Generate images for fixed test-split prompts (one seen colour-shape pair, one HELD_OUT "
        "pair, two objects with a relation), read them back with the pixel reader and print accuracies "
        "and a Frechet distance. Default: the shipped book model. --run DIR grades every EMA snapshot of a "
        "training run (the adherence-vs-training curve).",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="book-model folder (default: the shipped one)")
    which.add_argument("--run", default=None, help="training run folder: evaluate each snapshot in it instead")
    p.add_argument("--n", type=_int_in(1, 5000), default=300, help="prompts per group")
    p.add_argument("--steps", type=_int_in(1, 1000), default=20, help="sampler steps")
    p.add_argument("--cfg", type=_number_at_least(0), default=None, help="guidance scale >= 0 (default: the chapter's)")
    p.add_argument("--sampler", default="dpmpp_2m", help="a sampler of chapter 08 (tinydit.samplers.SAMPLERS)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="which test-split prompts")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_evaluate)

    p = _subparser(
        sub, "generate",
        help="draw pictures from a text prompt with a text-to-image model (chapter 13)",
        description="Text to image with chapter 13's TextToImagePipeline (default: the shipped book model, "
        "32x32 pictures of the shapes world). One prompt: --out FILE gets the image, or for --n > 1 a grid "
        "captioned with each image's seed. Many prompts: --prompts FILE (one a line; blank lines and # "
        "comments skipped) --out-dir FOLDER writes NNNNN.png per image and manifest.jsonl (file, prompt, "
        "seed, settings). Image k of a job (k counts over prompts x --n) has prompt k // n and seed --seed + k, "
        "so it is the same picture whatever --batch-size or number of processes drew it (stochastic samplers "
        "run one image per batch for that). Several processes: torchrun --nproc_per_node K -m tinydit "
        "generate --prompts FILE --out-dir FOLDER (spell --n as --num-images there); process r draws the images "
        "with k % K == r.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the text prompt (or --prompts FILE)")
    p.add_argument("--prompts", default=None, help="a text file of prompts, one a line (needs --out-dir)")
    p.add_argument("--out", default=None, help="output image, ending in .png or .jpg (default: out.png)")
    p.add_argument("--out-dir", default=None, help="output folder: one PNG per image and manifest.jsonl")
    p.add_argument("--n", "--num-images", type=_int_in(1, MAX_SAMPLES), default=1, dest="n",
                   help=f"images per prompt, 1..{MAX_SAMPLES} (under torchrun write --num-images: torchrun reads "
                   "--n as an abbreviation of its own flags)")
    _add_sampling_flags(p)
    p.add_argument("--cols", type=_int_in(1, MAX_SAMPLES), default=8, help="grid columns (--out with --n > 1)")
    p.add_argument("--scale", type=_int_in(1, MAX_SCALE), default=None,
                   help=f"enlargement of each picture, 1..{MAX_SCALE} (default: 4 for --out, 1 for --out-dir)")
    p.set_defaults(func=_cmd_generate)

    p = _subparser(
        sub, "img2img",
        help="redraw a picture toward a text prompt (chapter 15, SDEdit)",
        description="Image to image with chapter 15's Img2ImgPipeline on a text-to-image model's weights "
        "(default: the shipped book model): SRC is noised part of the way (--strength) and denoised toward "
        "the prompt, so a low strength keeps its layout and colours and 1 ignores it. SRC's sides must be "
        "multiples of the model's factor (8 for the book model, whose pictures are 32x32); the output has "
        "SRC's size times --scale. --n > 1: a grid captioned with each image's seed (image k: seed --seed + k).",
    )
    p.add_argument("src", metavar="SRC", help="the picture to edit (.png, .jpg, any mode)")
    _add_edit_flags(p, strength=0.6)

    p = _subparser(
        sub, "inpaint",
        help="repaint the white part of a mask from a text prompt, keep the rest (chapter 15)",
        description="Inpainting with chapter 15's InpaintPipeline on a text-to-image model's weights "
        "(default: the shipped book model): where MASK is white the prompt is drawn, where it is black "
        "SRC's pixels are kept exactly. A MASK of another size is resized to SRC's (with a warning). "
        "SRC's sides must be multiples of the model's factor (8 for the book model), unless --crop-padding "
        "inpaints only the mask's bounding box (grown by that many pixels, drawn at the model's size and "
        "pasted back). --soft: grey means change a little (differential diffusion); --blur feathers the "
        "edge inward; --repaint JUMP,N: RePaint resampling. --n > 1: a grid captioned with each image's seed.",
    )
    p.add_argument("src", metavar="SRC", help="the picture to edit (.png, .jpg, any mode)")
    p.add_argument("mask", metavar="MASK", help="the mask: white = repaint, black = keep (any mode, to grey)")
    _add_edit_flags(p, strength=1.0)
    p.add_argument("--soft", action="store_true", help="grey in MASK changes a pixel partly (differential diffusion)")
    p.add_argument("--blur", type=_number_at_least(0), default=0.0, metavar="PIXELS",
                   help="feather the mask's edge by this many pixels (inward only)")
    p.add_argument("--repaint", type=_repaint, default=None, metavar="JUMP,N",
                   help="RePaint resampling JUMP,N, e.g. 4,4: redo every JUMP steps N times (default: off)")
    p.add_argument("--crop-padding", type=_int_in(0, 10**6), default=None, metavar="PIXELS",
                   help="inpaint only the mask's bounding box grown by PIXELS (default: the whole picture)")

    p = _subparser(
        sub, "demo",
        help="serve chapter 14's widget demo as a web app (Voila)",
        description="Serve chapter 14's GenerateDemo -- prompt, sampler, steps, guidance, seed -> the image and "
        "its cross-attention maps -- as a web page, with Voila, until Ctrl-C. Open the printed address in a "
        "browser. Needs the notebooks extra (pip install 'tinydit[notebooks]').",
    )
    p.add_argument("--model", default=None, help="pipeline or book-model folder, or a hub id (default: the shipped "
                   "book model)")
    p.add_argument("--prompt", default=None, help="the prompt the page starts with (default: a held-out pair)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8866, help="port to serve on")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on; 0.0.0.0 listens on every "
                   "interface, and the page has no password: anyone who reaches it can use it")
    p.set_defaults(func=_cmd_demo)
    return parser


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags generate, img2img and inpaint share."""
    p.add_argument("--steps", type=_int_in(1, 1000), default=None, help="sampler steps (default: the model's)")
    p.add_argument("--cfg", type=_number_at_least(0), default=None, help="guidance scale >= 0 (default: the model's)")
    p.add_argument("--sampler", default=None,
                   help="a sampler of chapter 08, tinydit.samplers.SAMPLERS (default: the model's)")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="seed of the first image; image k gets seed + k")
    p.add_argument("--model", default=None, help="pipeline or book-model folder, or a hub id (default: the shipped "
                   "book model)")
    p.add_argument("--negative", default=None, help="negative prompt (default: none)")
    p.add_argument("--batch-size", type=_int_in(1, MAX_BATCH_SIZE), default=8, help="images per model call")


def _add_edit_flags(p: argparse.ArgumentParser, strength: float) -> None:
    """The prompt and flags img2img and inpaint share with generate (one image or a grid, --out FILE)."""
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--strength", type=_strength, default=strength,
                   help="how far to noise SRC, in (0, 1]: 1 starts from pure noise")
    p.add_argument("--out", default="out.png", help="output image, ending in .png or .jpg")
    p.add_argument("--n", type=_int_in(1, MAX_SAMPLES), default=1, help=f"images, 1..{MAX_SAMPLES} (a grid if > 1)")
    _add_sampling_flags(p)
    p.add_argument("--cols", type=_int_in(1, MAX_SAMPLES), default=8, help="grid columns (--n > 1)")
    p.add_argument("--scale", type=_int_in(1, MAX_SCALE), default=1,
                   help=f"enlargement of each picture, 1..{MAX_SCALE} (1 keeps SRC's size)")
    p.set_defaults(func=_cmd_edit)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI shows it: one line that says what happened, no source path or code line."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `generate --bogus` points at `generate --help`, not at the top-level help
        args._subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except MemoryError:
        print(f"{parser.prog} {args.command}: error: out of memory; ask for less "
              "(smaller --n, --size, --scale or --batch-size)", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError, FloatingPointError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
