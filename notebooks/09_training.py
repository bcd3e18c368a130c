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
# # 09 · Training the book model: a text-to-image DiT that composes what it never saw

# %%
# | default_exp train

# %%
import os

FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
# | export
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from tinydit.data import ShapesDataset
from tinydit.denoisers import DiscreteDenoiser, FlowDenoiser
from tinydit.samplers import get_sampler
from tinydit.schedules import alphas_cumprod, make_betas, min_snr_weights, rescale_zero_terminal_snr
from tinydit.text import TextEmbeddings, load_book_text_encoder
from tinydit.textdit import TextDiT, config_from_diffusers_pixart
from tinydit.vae import load_book_vae
from tinydit.validation import check_bool, check_choice, check_float, check_int

OBJECTIVES = ("epsilon", "v_prediction", "flow")
BOOK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "book_model"

# %%
# | export
@dataclass
class TrainConfig:
    """Everything that defines a training run of the book model (saved in every checkpoint)."""

    # the network: a PixArt-style TextDiT (adaLN-single, cross-attention) that diffusers loads unmodified
    hidden_size: int = 192  # 6 heads of 32: 3.9 M parameters, ~0.45 s per step of 128 on 2 cores
    depth: int = 6  # blocks; 6 x 192 fits the hour, deeper / wider halves the steps we can afford
    num_heads: int = 6
    patch_size: int = 2  # 16 tokens on the 4x8x8 latent; patch 1 (64 tokens) costs 3.6x per step
    # what the network learns
    objective: str = "v_prediction"  # "epsilon" | "v_prediction" (DDPM, diffusers' stock schedulers) | "flow"
    beta_schedule: str = "linear"  # PixArt's DDPM betas, 1e-4 .. 0.02 over 1000 steps
    zero_terminal_snr: bool = False  # rescale the betas so the last step is pure noise (needs v_prediction)
    min_snr_gamma: float = 0.0  # min-SNR-gamma weights (Hang et al. 2023); 0 = plain v-MSE, see the text
    caption_dropout: float = 0.1  # p of training on the empty prompt: one model serves CFG
    # data: the shapes world's train split (never a HELD_OUT pair), encoded once
    n_train: int = 100_000  # scenes; 6,000 steps of 128 see each about 8 times
    data_seed: int = 0
    cache: bool = True  # VAE latents and text tokens computed once (measured 4x faster per step)
    # optimisation
    steps: int = 6000  # 44 min at 0.435 s/step on 2 idle cores (+3 min of encoding)
    batch_size: int = 128  # the global batch: split over the processes of torchrun
    lr: float = 5e-4
    warmup_steps: int = 500  # linear warm-up: AdamW's second moments are noise at first
    min_lr_ratio: float = 0.1  # cosine decay to 10 % of lr at the last step
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global gradient norm
    ema_decay: float = 0.999  # EMA of the weights (sampled from); ~1,000-step memory
    seed: int = 0  # model init, noise, timesteps, caption dropout (one generator per step)
    # checkpoints and speed
    checkpoint_every: int = 500  # steps between resumable checkpoints
    keep_last: int = 3  # checkpoints kept on disk (older ones deleted after a good save)
    snapshot_every: int = 500  # EMA-only weights kept for the adherence-vs-time curve; 0 = none
    compile: bool = False  # torch.compile the training forward
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "no"

    def __post_init__(self):
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "no"))
        for name in ("hidden_size", "depth", "num_heads", "patch_size", "n_train", "steps", "batch_size", "keep_last"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("warmup_steps", "checkpoint_every", "snapshot_every", "data_seed", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size, num_heads: hidden_size={self.hidden_size} must be a multiple of "
                             f"num_heads={self.num_heads}")
        check_float("caption_dropout", self.caption_dropout, minimum=0, maximum=1)
        check_float("lr", self.lr, minimum=0, min_inclusive=False)
        check_float("min_snr_gamma", self.min_snr_gamma, minimum=0)
        check_float("ema_decay", self.ema_decay, minimum=0, maximum=1)
        check_float("grad_clip", self.grad_clip, minimum=0, min_inclusive=False)
        check_bool("zero_terminal_snr", self.zero_terminal_snr)
        if self.zero_terminal_snr and self.objective == "epsilon":
            raise ValueError("zero_terminal_snr: at SNR 0 the noise *is* the input, so an epsilon model cannot "
                             "recover x0 at the last step; use objective='v_prediction' (Lin et al. 2023)")

    @classmethod
    def fast(cls, **overrides) -> TrainConfig:
        """The same recipe at CI size (TINYDIT_FAST=1): a few steps on a few scenes."""
        small = dict(n_train=512, steps=20, batch_size=32, warmup_steps=5, checkpoint_every=10,
                     snapshot_every=10, hidden_size=64, depth=2, num_heads=2)
        return cls(**{**small, **overrides})


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_last", "snapshot_every", "compile", "mixed_precision")

# %%
# | export
class Objective:
    """What the network learns to predict from a noised latent: epsilon or v on a DDPM schedule
    (Ho et al. 2020; Salimans & Ho 2022), or the rectified-flow velocity (Liu et al. 2022)."""

    def __init__(self, kind: str = "v_prediction", beta_schedule: str = "linear", zero_terminal_snr: bool = False,
                 min_snr_gamma: float = 0.0, num_train_timesteps: int = 1000):
        self.kind = check_choice("objective", kind, OBJECTIVES)
        self.min_snr_gamma = check_float("min_snr_gamma", min_snr_gamma, minimum=0)
        self.T = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
        betas = make_betas(beta_schedule, self.T)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = alphas_cumprod(betas).double()  # (T,), float64 like chapter 08's denoiser
        self.beta_schedule, self.zero_terminal_snr = beta_schedule, bool(zero_terminal_snr)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Objective:
        return cls(cfg.objective, cfg.beta_schedule, cfg.zero_terminal_snr, cfg.min_snr_gamma)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, normal: torch.Tensor):
        """(x_t, model time, target, loss weight) for clean x0 (B, C, H, W), noise like x0, and per-sample
        draws u ~ U(0, 1) (DDPM step) and normal ~ N(0, 1) (flow's logit-normal time), both (B,)."""
        if self.kind == "flow":
            t = torch.sigmoid(normal).to(x0.dtype)  # (B,) logit-normal (Esser et al. 2024)
            tb = t[:, None, None, None]
            return (1 - tb) * x0 + tb * noise, t * self.T, noise - x0, torch.ones_like(t)
        step = (u * self.T).long().clamp(max=self.T - 1)  # (B,) uniform over the T trained steps
        ab = self.alphas_cumprod[step].to(x0.dtype)  # (B,)
        a, s = ab.sqrt()[:, None, None, None], (1 - ab).sqrt()[:, None, None, None]
        x_t = a * x0 + s * noise  # (B, C, H, W), q(x_t | x0)
        target = noise if self.kind == "epsilon" else a * noise - s * x0  # eps, or v = a eps - s x0
        weight = torch.ones_like(ab)
        if self.min_snr_gamma > 0:
            snr = (ab / (1 - ab)).clamp(min=1e-10)  # clamp: zero-terminal-SNR's last step has SNR 0
            weight = min_snr_weights(snr, self.min_snr_gamma, self.kind)
        return x_t, step, target, weight

    def denoiser(self, model: nn.Module) -> nn.Module:
        """Chapter 08's wrapper for sampling: D(x, sigma, **cond) -> x0."""
        if self.kind == "flow":
            return FlowDenoiser(model, time_scale=self.T)
        return DiscreteDenoiser(model, self.alphas_cumprod, prediction=self.kind)

    def sigmas(self, denoiser: nn.Module, steps: int) -> torch.Tensor:
        """The noise levels to sample with: Karras (DDPM) or the flow times, n+1 values ending in 0."""
        if self.kind == "flow":
            return denoiser.get_sigmas(steps, shift=1.0)
        return denoiser.get_sigmas(steps, schedule="karras")


def scheduler_config(cfg: TrainConfig) -> dict:
    """A stock diffusers scheduler that samples the book model (chapter 12's PixArt pipeline reads it)."""
    if cfg.objective == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    return {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
            "beta_schedule": cfg.beta_schedule, "beta_start": 0.0001, "beta_end": 0.02,
            "prediction_type": cfg.objective, "rescale_betas_zero_snr": cfg.zero_terminal_snr,
            "use_karras_sigmas": True, "solver_order": 2, "algorithm_type": "dpmsolver++"}

# %%
# | export
@dataclass
class EncodedData:
    """The training set after the frozen encoders: what a step reads."""

    latents: torch.Tensor  # (N, 4, 8, 8) VAE latents, scaled and shifted (chapter 02's to_latent)
    tokens: torch.Tensor  # (N, T, 96) the book text encoder's last-layer states
    mask: torch.Tensor  # (N, T) bool, True = real token
    empty_tokens: torch.Tensor  # (T, 96) the empty prompt "", what caption dropout trains on
    empty_mask: torch.Tensor  # (T,)

    def __len__(self) -> int:
        return len(self.latents)


def _pad_tokens(emb: TextEmbeddings, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = emb.tokens.shape
    tokens = torch.cat([emb.tokens, emb.tokens.new_zeros(B, length - T, D)], 1)  # (B, length, D)
    return tokens, torch.cat([emb.mask, emb.mask.new_zeros(B, length - T)], 1)  # (B, length)


@torch.no_grad()
def encode_batch(images: torch.Tensor, captions: list[str], vae, text_encoder, length: int | None = None):
    """Latents (B, 4, 8, 8) and padded text tokens / mask for a batch of images in [-1, 1] and captions."""
    emb = text_encoder(captions)
    tokens, mask = _pad_tokens(emb, length or text_encoder.max_length)
    return vae.to_latent(images), tokens, mask


@torch.no_grad()
def encode_dataset(dataset, vae=None, text_encoder=None, batch_size: int = 500, disable: bool | None = None) -> EncodedData:
    """Run the frozen VAE and text encoder over a dataset of (image, caption) pairs once."""
    if len(dataset) == 0:
        raise ValueError(f"dataset: yields no samples (len 0): {dataset!r}; nothing to train on")
    vae = vae if vae is not None else load_book_vae()
    text_encoder = text_encoder if text_encoder is not None else load_book_text_encoder()
    parts = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding the training set", disable=disable):
        images, captions = zip(*(dataset[i] for i in range(start, min(start + batch_size, len(dataset)))))
        parts.append(encode_batch(torch.stack(images), list(captions), vae, text_encoder))
    latents, tokens, mask = (torch.cat(p) for p in zip(*parts))
    T = int(mask.sum(1).max())  # trim the padding no caption uses
    empty_tokens, empty_mask = encode_batch(torch.zeros(1, 3, 32, 32), [""], vae, text_encoder, length=T)[1:]
    return EncodedData(latents, tokens[:, :T].contiguous(), mask[:, :T].contiguous(), empty_tokens[0], empty_mask[0])

# %%
# | export
def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of `step`: epochs of seeded permutations, read in order, so the
    data position is a pure function of the step (resume needs nothing else)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's noise, timesteps and caption dropout (so a resumed run draws the same)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay from 1 to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model, with decay warmed up as (1 + step) / (10 + step)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)

# %%
# | export
def book_model_config(cfg: TrainConfig, context_dim: int = 96) -> dict:
    """The diffusers `PixArtTransformer2DModel` config.json of the book model."""
    return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.30.0",
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": 4, "out_channels": 4, "num_layers": cfg.depth, "sample_size": 8,
            "patch_size": cfg.patch_size, "cross_attention_dim": cfg.hidden_size, "caption_channels": context_dim,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "interpolation_scale": 1, "use_additional_conditions": False, "attention_type": "default",
            "dropout": 0.0, "norm_num_groups": 32, "upcast_attention": False}


def build_model(cfg: TrainConfig, context_dim: int = 96) -> TextDiT:
    """A fresh book model: the TextDiT that the diffusers config above describes (seeded by cfg.seed)."""
    torch.manual_seed(cfg.seed)
    return TextDiT(config_from_diffusers_pixart(book_model_config(cfg, context_dim)))

# %%
# | export
def pixart_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original PixArt) names -> diffusers `PixArtTransformer2DModel` names; the inverse of
    chapter 07's `convert_diffusers_pixart` (fused qkv / kv split back into to_q, to_k, to_v)."""
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # diffusers recomputes the fixed table
    out: dict[str, torch.Tensor] = {}
    renames = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
               "y_embedder.y_proj.fc1": "caption_projection.linear_1",
               "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out",
               "attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
               "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
    for key, value in sd.items():
        stem, suffix = key.rsplit(".", 1)
        if key == "final_layer.scale_shift_table":
            out["scale_shift_table"] = value
        elif key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            b = f"transformer_blocks.{n}."
            part = rest.rsplit(".", 1)[0]
            if rest == "scale_shift_table":
                out[b + rest] = value
            elif part == "attn.qkv":
                for name, chunk in zip("qkv", value.chunk(3)):
                    out[f"{b}attn1.to_{name}.{suffix}"] = chunk
            elif part == "cross_attn.kv_linear":
                for name, chunk in zip("kv", value.chunk(2)):
                    out[f"{b}attn2.to_{name}.{suffix}"] = chunk
            else:
                out[f"{b}{renames[part]}.{suffix}"] = value
        else:
            out[f"{renames[stem]}.{suffix}"] = value
    return {k: v.contiguous() for k, v in out.items()}

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


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`: a reader (or a crash at
    any instant) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def save_book_model(model: TextDiT, folder: str | Path, cfg: TrainConfig, info: dict | None = None) -> Path:
    """Write `model` in diffusers' PixArtTransformer2DModel layout (+ scheduler and training notes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = pixart_to_diffusers({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    atomic_write(folder / "diffusion_pytorch_model.safetensors", lambda p: save_file(sd, str(p)))
    files = {"config.json": book_model_config(cfg, model.config.context_dim),
             "scheduler_config.json": scheduler_config(cfg),
             "training.json": {"config": asdict(cfg), **(info or {})}}
    for name, content in files.items():
        atomic_write(folder / name, lambda p, c=content: p.write_text(json.dumps(c, indent=1)))
    return folder


def read_train_config(folder: str | Path) -> TrainConfig:
    """The TrainConfig a saved book model was trained with."""
    path = Path(folder) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"folder: no training.json in {str(folder)!r} (not a book model folder)")
    return TrainConfig(**json.loads(path.read_text())["config"])


def load_book_model(folder: str | Path | None = None) -> tuple[TextDiT, Objective]:
    """The shipped book model (EMA weights) or one saved by `save_book_model`, and its objective."""
    folder = Path(folder) if folder is not None else BOOK_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder: no book model in {str(folder)!r} (expected config.json and "
                                "diffusion_pytorch_model.safetensors); train one with python -m tinydit train")
    return TextDiT.from_pretrained(folder), Objective.from_config(read_train_config(folder))

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


CHECKPOINT_GLOB = "step-*.pt"


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (half-written temp files are not listed)."""
    return sorted(Path(folder).glob(CHECKPOINT_GLOB))


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint continues only the run that wrote it: name every setting that differs."""
    diff = {f.name: (saved.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
            if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(cfg, f.name)}
    if diff:
        listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: {path} was written by a different run ({listed}); start a new --out "
                         "folder or train with the checkpoint's settings")

# %%
# | export
class Trainer:
    """The book model's training loop: one global batch per step, split over torchrun's processes."""

    def __init__(self, config: TrainConfig, out_dir: str | Path | None = None, data: EncodedData | None = None,
                 device: str | torch.device | None = None, disable: bool | None = None):
        self.cfg, self.disable = config, disable
        self.rank, self.world = distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size: {config.batch_size} does not split over {self.world} processes")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.objective = Objective.from_config(config)
        self.data = data if data is not None else encode_dataset(
            ShapesDataset(config.n_train, seed=config.data_seed, split="train"), disable=disable or self.rank > 0)
        self.model = build_model(config, self.data.tokens.shape[-1]).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        decay, rest = [], []  # no weight decay on norms, biases and the adaLN tables (PixArt, nanoGPT)
        for p in self.model.parameters():
            (decay if p.ndim >= 2 and p.shape[0] > 1 else rest).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(
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

    def batch(self, step: int):
        """This process's share of the global batch of `step`: latents, tokens, mask and the draws."""
        cfg, d = self.cfg, self.data
        idx = batch_indices(step, len(d), cfg.batch_size, cfg.data_seed)  # (B,)
        g = step_generator(cfg.seed, step)
        noise = torch.randn(d.latents[idx].shape, generator=g)  # (B, 4, 8, 8), all drawn on the CPU
        u, normal = torch.rand(len(idx), generator=g), torch.randn(len(idx), generator=g)  # (B,), (B,)
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout  # (B,) train on "" instead
        tokens = torch.where(drop[:, None, None], d.empty_tokens, d.tokens[idx])  # (B, T, 96)
        mask = torch.where(drop[:, None], d.empty_mask, d.mask[idx])  # (B, T)
        share = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
        parts = (d.latents[idx], noise, u, normal, tokens, mask)
        return [p[share].to(self.device) for p in parts]

    def loss(self, step: int) -> torch.Tensor:
        x0, noise, u, normal, tokens, mask = self.batch(step)
        x_t, t, target, weight = self.objective.noised(x0, noise, u, normal)
        with self.autocast():
            pred = self.net(x_t, t, context=tokens, context_mask=mask)  # (b, 4, 8, 8)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (b,)
        return (weight * per_sample).mean()

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
        ema_update(self.ema, self.model, self.cfg.ema_decay, self.step)
        self.step += 1
        value = float(loss.detach())
        if self.world > 1:  # the logged loss is the global batch's, as one process would see it
            t = torch.tensor([value], device=self.device)
            dist.all_reduce(t)
            value = float(t) / self.world
        self.losses.append(value)
        return value

    def train(self, until: int | None = None, callback=None) -> Trainer:
        """Train to step `until` (default: the config's steps), checkpointing as configured.
        `callback(trainer)` runs after every step (sample grids, early stops)."""
        until = self.cfg.steps if until is None else check_int("until", until, minimum=0, maximum=self.cfg.steps)
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
        if self.out_dir is not None and self.step == self.cfg.steps:
            self.save_checkpoint()
        return self
    def state(self) -> dict:
        """Everything a resumed run needs: weights, EMA, optimiser, scheduler, step, RNG, losses."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "config": json.dumps(asdict(self.cfg)),
                "rng_torch": torch.get_rng_state(), "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes `step-NNNNNNN.pt` atomically, then deletes all but the last `keep_last`."""
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

    def save_snapshot(self) -> None:
        """EMA weights only, in the book-model layout, for the adherence-vs-time curve."""
        if self.rank == 0:
            save_book_model(self.ema, self.out_dir / "snapshots" / f"step-{self.step:07d}", self.cfg,
                            {"step": self.step, "losses": self.losses[-1:]})

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
        state = torch.load(path, map_location=self.device, weights_only=True)  # never arbitrary pickle
        _check_resumable(json.loads(state["config"]), self.cfg, path)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        self.step, self.losses, self.last_checkpoint = int(state["step"]), state["losses"].tolist(), path
        return self

# %%
# | export
class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) in its plainest form, one batched forward:
    D = D_uncond + scale (D_cond - D_uncond). Chapter 10 builds the full version and its cures."""

    def __init__(self, denoiser: nn.Module, scale: float):
        super().__init__()
        self.denoiser, self.scale = denoiser, check_float("guidance_scale", scale, minimum=0)

    def forward(self, x, sigma, context, context_mask, uncond_context, uncond_mask):
        if self.scale == 1:
            return self.denoiser(x, sigma, context=context, context_mask=context_mask)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(len(x))  # (B,)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([context, uncond_context]),
                            context_mask=torch.cat([context_mask, uncond_mask]))  # (2B, C, H, W)
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)


@torch.no_grad()
def generate(model: TextDiT, objective: Objective, captions: list[str], seeds: list[int] | None = None,
             steps: int = 20, guidance_scale: float = 3.0, sampler: str = "dpmpp_2m", vae=None,
             text_encoder=None, disable: bool | None = True, return_latents: bool = False) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] for a list of captions: noise from `seeds` (one per caption,
    drawn on the CPU), `steps` model evaluations of chapter 08's `sampler`, CFG at `guidance_scale`."""
    vae = vae if vae is not None else load_book_vae()
    text_encoder = text_encoder if text_encoder is not None else load_book_text_encoder()
    seeds = list(range(len(captions))) if seeds is None else list(seeds)
    if len(seeds) != len(captions):
        raise ValueError(f"seeds: one per caption expected ({len(captions)}), got {len(seeds)}")
    device = next(model.parameters()).device
    emb = text_encoder(list(captions)).to(device)
    empty = text_encoder([""] * len(captions)).to(device)
    T = max(emb.tokens.shape[1], empty.tokens.shape[1])
    (ctx, mask), (u_ctx, u_mask) = _pad_tokens(emb, T), _pad_tokens(empty, T)
    denoiser = objective.denoiser(model.eval())
    sigmas = objective.sigmas(denoiser, steps)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = (noise * sigmas[0]).to(device)  # (B, 4, 8, 8) at the first noise level
    latents = get_sampler(sampler)(GuidedDenoiser(denoiser, guidance_scale), x, sigmas.to(device), disable=disable,
                                   extra_args=dict(context=ctx, context_mask=mask, uncond_context=u_ctx, uncond_mask=u_mask))
    if return_latents:
        return latents
    return vae.from_latent(latents.float().cpu()).clamp(-1, 1)  # (B, 3, 32, 32)

# %%
# | export
def train_book_model(config: TrainConfig | None = None, out_dir: str | Path = "runs/book", resume: bool = False,
                     disable: bool | None = None) -> Path:
    """The whole recipe: encode the data, train (or continue a run), save the EMA weights in
    `<out_dir>/book_model` (diffusers layout). `python -m tinydit train` calls this."""
    cfg = config if config is not None else TrainConfig()
    out_dir = Path(out_dir)
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
