# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # 09b · Training the book model, part 2: a diffusers layout, checkpoints you cannot lose, the loop
#
# 09a wrote the recipe: the step, the objective, the data encoded once, the schedule and EMA. This
# sitting (5) saves the book model in a layout diffusers reads, (6) makes **checkpoints you cannot
# lose** (atomic writes, resume bit for bit) and the `Trainer` that uses them, (7) watches a run and
# (8) spreads it over processes with **torchrun** (DDP). It exports `tinydit.train`.

# %%
# | default_exp train
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from tinydit.data import ShapesDataset, image_grid, pil_to_tensor
from tinydit.text import load_book_text_encoder
from tinydit.textdit import TextDiT, TextDiTConfig
from tinydit.vae import load_book_vae
from tinydit.validation import expect_error


torch.set_num_threads(1 if FAST else torch.get_num_threads())  # CI shares 2 cores with other jobs
vae, text_encoder = load_book_vae(), load_book_text_encoder()  # frozen: chapters 02 and 06
emb = text_encoder(["a red circle", "a blue square left of a green triangle"])  # (2, T, 96) tokens

# %%
# | export
"""Training the book model (chapter 09b): 09a's recipe run by the `Trainer`, atomic checkpoints and bit-exact
resume, torchrun (DDP), the diffusers layout the pipeline loads. Inference never imports it."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tinydit import train_recipe as recipe
from tinydit.checkpoint import BOOK_MODEL_DIR, _read_pickle, check_and_load, read_config
from tinydit.data import ShapesDataset
from tinydit.denoisers import Parametrisation
from tinydit.loading import pixart_config, pixart_to_diffusers
from tinydit.pipeline import SamplingConfig, TextToImagePipeline
from tinydit.samplers import DEFAULT_SAMPLER
from tinydit.text import load_book_text_encoder
from tinydit.textdit import TextDiT, TextDiTConfig
from tinydit.train_recipe import EncodedData, StreamingData, TrainConfig, encode_dataset
from tinydit.vae import load_book_vae
from tinydit.validation import check_bool, check_device, check_int, unknown_fields


# %% [markdown]
# ## 5. The book model, in a layout diffusers reads
#
# The network is chapter 07's `TextDiT` with PixArt's adaLN-single modulation and cross-attention
# to the book text encoder's tokens (96 wide). `book_model_config` gives its `TextDiTConfig`; saving
# writes chapter 07's `pixart_config` of it (the diffusers `PixArtTransformer2DModel` config.json) and
# renames our keys to diffusers' with chapter 07's `pixart_to_diffusers` (the inverse of its reader),
# so the book's folder is written by the same code as any PixArt folder.

# %%
# | export
def book_model_config(cfg: TrainConfig, context_dim: int = 96) -> TextDiTConfig:
    """The book model's architecture: a PixArt-style TextDiT (adaLN-single, cross-attention) on the
    book VAE's 8x8x4 latents and `context_dim`-wide text tokens, sized by `cfg`."""
    recipe.check_train_config("cfg", cfg)
    return TextDiTConfig(input_size=8, patch_size=cfg.patch_size, in_channels=4, hidden_size=cfg.hidden_size,
                         depth=cfg.depth, num_heads=cfg.num_heads, learn_sigma=False, context_dim=context_dim,
                         modulation="adaln_single", pos_base_size=8 // cfg.patch_size, interpolation_scale=1)

# %%
# | export
def build_model(cfg: TrainConfig, context_dim: int = 96) -> TextDiT:
    """A fresh book model: the TextDiT of `book_model_config` (seeded by cfg.seed)."""
    recipe.check_train_config("cfg", cfg)
    torch.manual_seed(cfg.seed)
    return TextDiT(book_model_config(cfg, context_dim))

# %%
# | export
def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry is data too (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

# %%
# | export
def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`: a reader (or a crash at
    any instant) sees the old file or the new one, never half of one."""
    path = Path(path)
    if not callable(write):
        raise TypeError(f"write: expected a callable that writes the file it is given, got {type(write).__name__}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: no folder {str(path.parent)!r} to write {path.name!r} into")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"write: did not create the file it was given ({tmp.name})")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path

# %%
# | export
def _check_book_model(model, cfg) -> None:
    """`model` is a TextDiT and `cfg` describes it: the saved config.json must rebuild these weights."""
    if not isinstance(model, TextDiT):
        raise TypeError(f"model: expected the book model, a TextDiT (build_model), got {type(model).__name__}")
    want = book_model_config(cfg, model.config.context_dim)
    diff = [f"{f.name}: cfg {getattr(want, f.name)!r}, model {getattr(model.config, f.name)!r}"
            for f in fields(want) if getattr(want, f.name) != getattr(model.config, f.name)]
    if diff:
        raise ValueError(f"cfg: does not describe the model ({'; '.join(diff)}); pass the one it was built with")

# %%
# | export
def save_book_model(model: TextDiT, folder: str | Path, cfg: TrainConfig, info: dict | None = None) -> Path:
    """Write `model` in diffusers' PixArtTransformer2DModel layout (+ scheduler and training notes)."""
    _check_book_model(model, cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = pixart_to_diffusers({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda p: save_file(sd, str(p)))
    files = {"config.json": pixart_config(model.config),
             "scheduler_config.json": recipe.parametrisation(cfg).scheduler_config(DEFAULT_SAMPLER),
             "training.json": {"config": asdict(cfg), **(info or {})}}
    for name, content in files.items():
        atomic_write(folder / name, lambda p, c=content: p.write_text(json.dumps(c, indent=1)))
    return folder

# %%
# | export
def read_train_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig a saved book model was trained with."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: no training.json in {str(folder)!r} (not a book model folder)")
    config = read_config(path, "folder").get("config")  # a JSON object, else "folder: ... is not valid JSON"
    if not isinstance(config, dict):
        raise ValueError(f"folder: {str(path)!r} is not a book-model training record (no \"config\" object)")
    unknown = unknown_fields(config, TrainConfig)
    if unknown:
        raise ValueError(f"folder: {str(path)!r} has settings TrainConfig does not know: {', '.join(unknown)}")
    return TrainConfig(**config)

# %%
# | export
def load_book_model(folder: str | Path | None = None) -> tuple[TextDiT, Parametrisation]:
    """The shipped book model (EMA weights) or one saved by `save_book_model`, and its parametrisation."""
    folder = Path(folder) if folder is not None else BOOK_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder: no book model in {str(folder)!r} (expected config.json and "
                                "diffusion_pytorch_model.safetensors); train one with python -m tinydit train")
    return TextDiT.from_pretrained(folder), recipe.parametrisation(read_train_config(folder))

# %%
# | export
def book_pipeline(model: TextDiT, cfg: TrainConfig | None = None, text_encoder=None, vae=None) -> TextToImagePipeline:
    """Chapter 13's pipeline around a book model (the EMA of a run: the pipeline puts it in eval mode):
    its parametrisation from `cfg` (default TrainConfig()), the book text encoder and VAE. Previews and
    the evaluator sample through it, so what is graded is what `generate` draws."""
    if not isinstance(model, TextDiT):
        raise TypeError(f"model: expected the book model, a TextDiT (load_book_model, build_model), got {type(model).__name__}")
    sampling = SamplingConfig(**asdict(recipe.parametrisation(cfg if cfg is not None else TrainConfig())))
    return TextToImagePipeline(text_encoder if text_encoder is not None else load_book_text_encoder(), model,
                               vae if vae is not None else load_book_vae(), sampling.validate())

# %%
book_cfg = TrainConfig()
book_net = build_model(book_cfg)
print(f"book model: {sum(p.numel() for p in book_net.parameters()) / 1e6:.2f} M parameters, "
      f"{book_cfg.depth} blocks of width {book_cfg.hidden_size}, {(8 // book_cfg.patch_size) ** 2} tokens per image")
with torch.no_grad():  # every weight non-zero, so a wrong key map cannot hide behind zero init
    for p in book_net.parameters():
        p.add_(torch.randn_like(p) * 0.02)
with TemporaryDirectory() as tmp:
    save_book_model(book_net, tmp, book_cfg)
    back = TextDiT.from_pretrained(tmp)
    print(sorted(p.name for p in Path(tmp).iterdir()))
    x_demo, t_demo = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(back(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2]),
                                   book_net(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2]),
                                   atol=0, rtol=0)
    try:  # diffusers is a test dependency: when present, it loads the folder unmodified
        from diffusers import PixArtTransformer2DModel
    except ImportError:
        PixArtTransformer2DModel = None
    if PixArtTransformer2DModel is not None:
        ref = PixArtTransformer2DModel.from_pretrained(tmp).eval()
        with torch.no_grad():
            out_ref = ref(x_demo, encoder_hidden_states=emb.tokens[:2], timestep=t_demo,
                          encoder_attention_mask=emb.mask[:2].long(),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            diff = (out_ref - back(x_demo, t_demo, context=emb.tokens[:2], context_mask=emb.mask[:2])).abs().max()
        print(f"diffusers PixArtTransformer2DModel vs tinydit: max |difference| {diff:.1e}")
        assert diff < 1e-5  # measured 0 (same kernels); 1e-5 allows other SDPA backends

# %% [markdown]
# ## 6. Checkpoints you cannot lose
#
# A run of an hour dies for dull reasons: a laptop lid, an out-of-memory kill, a full disk in the
# middle of a save. `atomic_write` writes to a temporary file, forces it to disk (`fsync`), and only
# then renames it over the target; the rename is atomic, so at any instant the folder holds the old
# checkpoint or the new one, never half of one (the tests kill a process with SIGKILL mid-save and
# load what is left). A checkpoint holds everything the next step depends on — weights, EMA,
# optimiser moments, scheduler, step (which fixes the data position and the step's random draws),
# the global RNG and the loss history — so a resumed run continues **bit for bit**.

# %%
# | export
def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun (WORLD_SIZE > 1):
    gloo on CPU, NCCL on CUDA. Several nodes: the same command with torchrun --nnodes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

# %%
# | export
CHECKPOINT_GLOB = "step-*.pt"


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (half-written temp files are not listed)."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder: expected a folder path, got {type(folder).__name__}")
    return sorted(Path(folder).glob(CHECKPOINT_GLOB))

# %%
# | export
def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: name every setting that differs."""
    diff = {f.name: (saved.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
            if f.name not in recipe.RESUMABLE_CHANGES and saved.get(f.name) != getattr(cfg, f.name)}
    if diff:
        listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: {path} was written by a different run ({listed}); start a new --out "
                         "folder or train with the checkpoint's settings")

# %%
# | export
TRAINING_STATE = ("model", "ema", "optimizer", "scheduler", "step", "config", "rng_torch", "losses")


def _load_training_state(path: Path) -> dict:
    """A Trainer checkpoint read with torch.load(weights_only=True); anything else is refused by name."""
    if path.suffix == ".safetensors":
        raise ValueError(f"resume: {path} holds weights only, not a training checkpoint (step-*.pt)")
    try:
        state = _read_pickle(path)  # chapter 02: damaged, truncated or code-carrying files get one clear error
    except ValueError as e:  # a file this run wrote is not downloaded again: an older one is the cure
        reason = str(e).removeprefix("path: ").replace("download it again", "resume from an older one")
        raise ValueError(f"resume: {reason}") from None
    missing = [k for k in TRAINING_STATE if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"resume: {path} is not a training checkpoint (missing {', '.join(missing)})")
    return _check_training_state(state, path)

# %%
# | export
def _check_training_state(state: dict, path: Path) -> dict:
    """The parts of a checkpoint a resume trusts before it touches the trainer: a whole step >= 0, a
    JSON config object, an optimiser state with its parameter groups, the losses as a 1-D tensor."""
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"resume: {path} is damaged (step {step!r}; expected a whole number >= 0)")
    try:
        config = json.loads(state["config"])
    except (TypeError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"resume: {path} is damaged (its config is not a JSON object of TrainConfig fields)")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= set(opt) or not opt["param_groups"]:
        raise ValueError(f"resume: {path} is damaged (its optimiser state is empty or has no parameter groups)")
    if not isinstance(state["losses"], torch.Tensor) or state["losses"].ndim != 1:
        raise ValueError(f"resume: {path} is damaged (its losses are not a 1-D tensor)")
    return state

# %%
# | export
class Trainer:
    """The book model's training loop: one global batch per step, split over torchrun's processes."""

    def __init__(self, config: TrainConfig, out_dir: str | Path | None = None, data: EncodedData | None = None,
                 device: str | torch.device | None = None, disable: bool | None = None):
        self.cfg, self.disable = recipe.check_train_config("config", config), disable
        if data is not None:
            recipe.check_encoded_data(data)
        self.rank, self.world = distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size: {config.batch_size} does not split over {self.world} processes")
        if device is None and torch.cuda.is_available():  # one GPU per process: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = check_device("device", device or "cpu")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.objective = recipe.parametrisation(config)
        if data is None:
            dataset = ShapesDataset(config.n_train, seed=config.data_seed, split="train")
            data = encode_dataset(dataset, disable=disable or self.rank > 0) if config.cache else StreamingData(dataset)
        self.data = data
        self.model = build_model(config, data.empty_tokens.shape[-1]).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        decay, rest = [], []  # no weight decay on norms, biases and the adaLN tables (PixArt, nanoGPT)
        for p in self.model.parameters():
            (decay if p.ndim >= 2 and p.shape[0] > 1 else rest).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: recipe.lr_factor(
            s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.net = self.model
        if self.world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.net = torch.compile(self.net)
        self.step, self.losses, self.last_checkpoint = 0, [], None

    def autocast(self):
        use = self.cfg.mixed_precision == "bf16" or (self.cfg.mixed_precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use)

# %%
# | export
@add_to_class(Trainer)
def batch(self, step: int):
    """This process's share of the global batch of `step`: latents, tokens, mask and the draws."""
    cfg, d = self.cfg, self.data
    idx = recipe.batch_indices(step, len(d), cfg.batch_size, cfg.data_seed)  # (B,)
    share = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
    g = recipe.step_generator(cfg.seed, step)
    noise = torch.randn(len(idx), 4, 8, 8, generator=g)  # (B, 4, 8, 8), all drawn on the CPU
    u, normal = torch.rand(len(idx), generator=g), torch.randn(len(idx), generator=g)  # (B,), (B,)
    drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout  # (B,) train on "" instead
    latents, tokens, mask = d.take(idx[share])  # this process's rows only
    tokens = torch.where(drop[share, None, None], d.empty_tokens, tokens)  # (b, T, 96)
    mask = torch.where(drop[share, None], d.empty_mask, mask)  # (b, T)
    parts = (latents, noise[share], u[share], normal[share], tokens, mask)
    return [p.to(self.device) for p in parts]

# %%
# | export
@add_to_class(Trainer)
def loss(self, step: int) -> torch.Tensor:
    x0, noise, u, normal, tokens, mask = self.batch(step)
    x_t, t, target = self.objective.noised(x0, noise, u, normal)
    weight = recipe.loss_weight(self.objective, t, self.cfg.min_snr_gamma)  # (b,)
    with self.autocast():
        pred = self.net(x_t, t, context=tokens, context_mask=mask)  # (b, 4, 8, 8)
    per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (b,)
    return (weight * per_sample).mean()

# %%
# | export
@add_to_class(Trainer)
def train_step(self) -> float:
    loss = self.loss(self.step)
    if not torch.isfinite(loss):
        kept = self.last_checkpoint or "none written yet"
        raise FloatingPointError(f"loss: {float(loss.detach())} at step {self.step}; training stopped before the "
                                 f"update, the last good checkpoint is {kept} (lower lr, or check the data)")
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
    self.opt.step()
    self.sched.step()
    recipe.ema_update(self.ema, self.model, self.cfg.ema_decay, self.step)
    self.step += 1
    value = float(loss.detach())
    if self.world > 1:  # the logged loss is the global batch's, as one process would see it
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t)
        value = float(t) / self.world
    self.losses.append(value)
    return value

# %%
# | export
@add_to_class(Trainer)
def train(self, until: int | None = None, callback=None) -> Trainer:
    """Train to step `until` (default: the config's steps), checkpointing as configured.
    `callback(trainer)` runs after every step (sample grids, early stops)."""
    until = self.cfg.steps if until is None else check_int("until", until, minimum=0, maximum=self.cfg.steps)
    if until < self.step:
        raise ValueError(f"until: this trainer is already at step {self.step}, got until={until}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a function callback(trainer) or None, got {type(callback).__name__}")
    bar = tqdm(total=until, initial=self.step, desc="training", disable=self.disable or self.rank > 0)
    t0, s0 = time.perf_counter(), self.step
    while self.step < until:
        loss = self.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{(self.step - s0) / (time.perf_counter() - t0):.2f}")
        if self.out_dir is not None and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.out_dir is not None and self.cfg.snapshot_every and self.step % self.cfg.snapshot_every == 0:
            self.save_snapshot()
        if callback is not None:
            callback(self)
    bar.close()
    every = self.cfg.checkpoint_every
    if self.out_dir is not None and self.step == self.cfg.steps and (not every or self.step % every):
        self.save_checkpoint()  # the end of the run, unless the loop just saved it
    return self

# %%
# | export
@add_to_class(Trainer)
def state(self) -> dict:
    """Everything a resumed run needs: weights, EMA, optimiser, scheduler, step, RNG, losses."""
    return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "step": self.step, "config": json.dumps(asdict(self.cfg)),
            "rng_torch": torch.get_rng_state(), "losses": torch.tensor(self.losses, dtype=torch.float64)}

# %%
# | export
@add_to_class(Trainer)
def save_checkpoint(self) -> Path | None:
    """Rank 0 writes `step-NNNNNNN.pt` atomically, then deletes all but the last `keep_last`."""
    self._check_out_dir()
    if self.rank == 0:
        folder = self.out_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = atomic_write(folder / f"step-{self.step:07d}.pt", lambda p: torch.save(self.state(), p))
        for old in checkpoints(folder)[:-self.cfg.keep_last]:
            old.unlink()
        self.last_checkpoint = path
    if self.world > 1:
        dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
    return self.last_checkpoint

# %%
# | export
@add_to_class(Trainer)
def save_snapshot(self) -> None:
    """EMA weights only, in the book-model layout, for the adherence-vs-time curve."""
    self._check_out_dir()
    if self.rank == 0:
        save_book_model(self.ema, self.out_dir / "snapshots" / f"step-{self.step:07d}", self.cfg,
                        {"step": self.step, "losses": self.losses[-1:]})

# %%
# | export
@add_to_class(Trainer)
def _check_out_dir(self) -> None:
    if self.out_dir is None:
        raise ValueError("out_dir: this Trainer has none to save into; create it with Trainer(config, out_dir=...)")

# %%
# | export
@add_to_class(Trainer)
def resume(self, path: str | Path | None = None) -> Trainer:
    """Continue from a checkpoint file, or from the newest one in `<out_dir>/checkpoints`."""
    if path is None:
        found = checkpoints(self.out_dir / "checkpoints") if self.out_dir is not None else []
        if not found:
            raise FileNotFoundError(f"resume: no checkpoint (step-*.pt) in "
                                    f"{str(self.out_dir / 'checkpoints') if self.out_dir else 'out_dir=None'}")
        path = found[-1]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint file {str(path)!r}")
    state = _load_training_state(path)  # never arbitrary pickle
    _check_resumable(json.loads(state["config"]), self.cfg, path)
    if state["step"] > self.cfg.steps:
        raise ValueError(f"resume: {path} is at step {state['step']}, beyond this run's steps={self.cfg.steps}")
    check_and_load(self.model, state["model"], f"resume: {path.name} (model)")  # + NaN / inf weights refused
    check_and_load(self.ema, state["ema"], f"resume: {path.name} (ema)")
    self.opt.load_state_dict(state["optimizer"])
    self.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    self.step, self.losses, self.last_checkpoint = int(state["step"]), state["losses"].tolist(), path
    return self

# %% [markdown]
# ## 7. Training, watched
#
# A short run at this notebook's size: the loss curve and what the EMA model draws for a few
# captions, every few steps. (At CI size it is a few dozen steps of a tiny model, so expect blobs;
# chapter 10 loads the real run.) The previews are drawn by chapter 13's pipeline around the EMA
# weights (`book_pipeline`): the one way this book samples a model, so a preview, a grade and
# `python -m tinydit generate` are the same computation.

# %%
demo_cfg = TrainConfig.fast(steps=30 if FAST else 300, checkpoint_every=15 if FAST else 150,
                            n_train=512 if FAST else 5000)  # a tiny model: this is about the loop
demo_prompts = ["a big red circle in the middle", "a small blue square on the left", "a green triangle at the top",
                "a yellow circle above a purple square"]
demo_data = encode_dataset(ShapesDataset(demo_cfg.n_train, split="train"), vae, text_encoder, disable=True)
grids = []


def watch(trainer):
    if trainer.step % (demo_cfg.steps // 3) == 0:
        out = book_pipeline(trainer.ema, demo_cfg, text_encoder, vae)(demo_prompts, num_inference_steps=10, seed=0,
                                                                      disable=True)
        grids.append((trainer.step, torch.stack([pil_to_tensor(im) for im in out.images])))  # (4, 3, 32, 32)


with TemporaryDirectory() as run_dir:
    demo = Trainer(demo_cfg, out_dir=run_dir, data=demo_data, disable=FAST).train(until=demo_cfg.steps // 2)
    half = [p.name for p in checkpoints(Path(run_dir) / "checkpoints")]
    resumed = Trainer(demo_cfg, out_dir=run_dir, data=demo_data, disable=FAST).resume().train(callback=watch)
    straight = Trainer(demo_cfg, data=demo_data, disable=FAST).train()
print("checkpoints at half time:", half)
assert resumed.step == straight.step == demo_cfg.steps
same = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()))
print("resumed run == straight run, bit for bit:", same)
assert same
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(resumed.losses, lw=0.6)
ax.set(xlabel="step", ylabel="weighted v-MSE", title=f"a {demo_cfg.steps}-step run (resumed at {demo_cfg.steps // 2})")
plt.show()
image_grid(torch.cat([g for _, g in grids]), [f"step {s}: {p}" for s, _ in grids for p in demo_prompts],
           cols=len(demo_prompts))

# %% [markdown]
# Section 3's question — is caching the encoders worth its memory? — measured on a book-size step:

# %%
def seconds_per_step(trainer, n=3):
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    return (time.perf_counter() - t0) / n


probe_cfg = TrainConfig.fast(hidden_size=192, depth=6, num_heads=6, batch_size=128, n_train=256)  # book-model size
probe_set = ShapesDataset(256, split="train")
cached = Trainer(probe_cfg, data=encode_dataset(probe_set, vae, text_encoder, disable=True), disable=True)
streamed = Trainer(replace(probe_cfg, cache=False), data=StreamingData(probe_set, vae, text_encoder), disable=True)
t_cached, t_streamed = seconds_per_step(cached), seconds_per_step(streamed)
print(f"one step of 128, cached:   {t_cached * 1000:.0f} ms")
print(f"one step of 128, streamed: {t_streamed * 1000:.0f} ms  (cache saves {1 - t_cached / t_streamed:.0%})")
torch.testing.assert_close(cached.loss(7), streamed.loss(7), atol=1e-5, rtol=1e-4)  # same batch, same loss

# %% [markdown]
# ## 8. Many processes, the standard way
#
# The same loop runs on several processes under PyTorch's launcher:
#
# ```bash
# torchrun --nproc_per_node 2 -m tinydit train --out runs/book2     # 2 processes, one machine
# torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m tinydit train ...  # 2 machines
# ```
#
# `distributed()` starts the process group (gloo on CPU, NCCL on CUDA) when torchrun set
# `WORLD_SIZE`; the model is wrapped in `DistributedDataParallel`, which averages gradients across
# processes. Every process computes the same global batch indices and the same step draws, and
# keeps its slice of the rows, so K processes with a global batch B do exactly the arithmetic of one
# process with batch B — `tests/test_train.py` runs 2 CPU processes and checks the weights match a
# single process to 1e-6. Only rank 0 writes checkpoints; the others wait at a barrier. On a GPU
# the loop runs the forward in bf16 autocast (`mixed_precision="auto"`), and `compile=True` hands
# the network to `torch.compile` (chapter 05 showed it compiles without graph breaks).

# %%
# | export
def _check_run_folder(out_dir: Path, resume: bool) -> None:
    """Before the data is encoded: out_dir is writable; resume needs a checkpoint there, a new run none
    (resuming into a folder that does not exist refuses without creating it)."""
    if resume and not out_dir.is_dir():
        raise FileNotFoundError(f"resume: no checkpoint to continue: {str(out_dir)!r} does not exist")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OSError(f"out_dir: cannot write to {str(out_dir)!r} ({e.strerror or type(e).__name__})") from None
    found = checkpoints(out_dir / "checkpoints")
    if resume and not found:
        raise FileNotFoundError(f"resume: no checkpoint (step-*.pt) in {out_dir / 'checkpoints'}")
    if found and not resume:
        raise ValueError(f"out_dir: {str(out_dir)!r} already holds checkpoints of a run (up to {found[-1].name}); "
                         "continue it with resume=True, or choose an empty folder")

# %%
# | export
def train_book_model(config: TrainConfig | None = None, out_dir: str | Path = "runs/book", resume: bool = False,
                     disable: bool | None = None) -> Path:
    """The whole recipe: encode the data, train (or continue a run), save the EMA weights in
    `<out_dir>/book_model` (diffusers layout). `python -m tinydit train` calls this."""
    cfg = recipe.check_train_config("config", config) if config is not None else TrainConfig()
    out_dir = Path(out_dir)
    _check_run_folder(out_dir, check_bool("resume", resume))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out_dir=out_dir, disable=disable)
    encode_seconds = time.perf_counter() - t0
    if resume:
        trainer.resume()
    start_step, t1 = trainer.step, time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t1
    info = {"steps_trained_here": trainer.step - start_step, "train_seconds": round(seconds, 1),
            "encode_seconds": round(encode_seconds, 1), "seconds_per_step": round(seconds / max(1, trainer.step - start_step), 4),
            "torch_threads": torch.get_num_threads(), "processes": trainer.world, "device": str(trainer.device),
            "losses": [round(v, 5) for v in trainer.losses]}
    folder = out_dir / "book_model"
    if trainer.rank == 0:
        save_book_model(trainer.ema, folder, cfg, info)
    return folder

# %% [markdown]
# ## 9. Bad input gets a clear error

# %%
expect_error(lambda: TrainConfig(objective="x0"), r"objective.*x0")
expect_error(lambda: TrainConfig(objective="epsilon", zero_terminal_snr=True), r"zero_terminal_snr.*v_prediction")
expect_error(lambda: TrainConfig(objective="flow", min_snr_gamma=5.0), r"min_snr_gamma: .*objective='flow'")
expect_error(lambda: encode_dataset([]), r"dataset: yields no samples")
expect_error(lambda: book_pipeline("a model"), r"model: expected the book model, a TextDiT", TypeError)
with TemporaryDirectory() as tmp:
    expect_error(lambda: Trainer(demo_cfg, out_dir=tmp, data=demo_data).resume(), r"resume: no checkpoint",
                 FileNotFoundError)
    Trainer(demo_cfg, out_dir=tmp, data=demo_data, disable=True).train(until=demo_cfg.checkpoint_every)
    wider = replace(demo_cfg, hidden_size=128, num_heads=4)
    expect_error(lambda: Trainer(wider, out_dir=tmp, data=demo_data).resume(), r"hidden_size: checkpoint 64, this run 128")
    exploding = Trainer(replace(demo_cfg, lr=1e30, warmup_steps=0, checkpoint_every=1), out_dir=Path(tmp) / "nan",
                        data=demo_data, disable=True)
    expect_error(exploding.train, r"at step \d+; .*last good checkpoint is .*step-", FloatingPointError)

# %% [markdown]
# ## Summary
#
# - The production `Trainer` runs 09a's recipe: the objectives (chapter 08's `Parametrisation`: ε, v with optional
#   zero-terminal SNR, flow; min-SNR-γ weights), cached encoders, AdamW with warm-up and cosine decay,
#   clipping, EMA, bf16 autocast on CUDA, `torch.compile`, atomic checkpoints that resume bit for bit,
#   and torchrun/DDP.
# - The book model is a 3.9 M-parameter PixArt-style DiT saved in diffusers' layout; diffusers'
#   `PixArtTransformer2DModel` loads it unmodified and computes the same outputs.
# - Previews sample through the pipeline (`book_pipeline`), the one way the book draws a picture.
#   Chapter 10 grades what the shipped run learnt.
#
# ## Exercises
#
# 1. Run `torchrun --nproc_per_node 2 -m tinydit train --steps 20 --out runs/ddp` with `TINYDIT_FAST=1`
#    and compare the checkpoint with a single-process run. Where does the last bit of difference
#    come from?
# 2. Give the model patch size 1 (64 tokens instead of 16): what does a step cost, and do the
#    two-object relations improve for the same minutes of training?
