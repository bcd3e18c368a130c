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
# # 17 · Appendix: loading real checkpoints — key maps and converters
#
# The chapters build their models in tinydit's own layout; the checkpoints people have come in other
# ones. This appendix holds every translation between them, so that a first reading of chapters 02,
# 05 and 07 can skip it: (1) the original LDM / SGM single-file VAEs (SD 1.x, SDXL, SD3, Flux);
# (2) facebookresearch's DiT files and diffusers' `DiTTransformer2DModel` folders; (3) the original
# PixArt-α/Σ checkpoints and diffusers' `PixArtTransformer2DModel` folders, both ways. These are
# pure functions on state dicts and folders: the models import them (their `from_single_file`,
# `from_original` and `from_pretrained`; chapter 07's `load_transformer`), and this module imports no
# model, so the floor plan keeps one direction. Each layout is checked here against the reference
# library on tiny random weights (the tests go further). It exports `tinydit.loading`.

# %%
# | default_exp loading

# %%
import os


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import math
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import display

from tinydit.data import image_grid
from tinydit.dit import DiT
from tinydit.textdit import TextDiT, load_transformer
from tinydit.vae import AutoencoderKL, psnr


torch.set_num_threads(1)  # tiny random models: one thread beats two contending

# %%
# | export
"""Real checkpoints (appendix, chapter 17): the key maps between tinydit's layouts and the original
LDM/SGM VAE files, diffusers' DiT and PixArt folders and back, and the small readers of a model folder
(its config.json, its kind, its weights file). Pure functions on dicts and paths: the models import
them (their `from_single_file`, `from_original`, `from_pretrained`), this module imports no model."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from tinydit.checkpoint import read_config, strip_prefix


SINGLE_FILE_PREFIXES = ("first_stage_model.", "vae.")  # where full checkpoints nest the VAE
IGNORED_PREFIXES = ("loss.", "model_ema.")  # training leftovers in some VAE .ckpt files (LPIPS, EMA)

# %% [markdown]
# ## 1. VAEs: the original LDM / SGM single-file layout
#
# Stability AI and Black Forest Labs publish VAEs as single `.safetensors` / `.ckpt` files (and the
# full SD 1.x / SDXL checkpoints nest the VAE under `first_stage_model.`). Same tensors, other names:
#
# | LDM / SGM | diffusers (ours) |
# |---|---|
# | `encoder.down.{i}.block.{j}.nin_shortcut` | `encoder.down_blocks.{i}.resnets.{j}.conv_shortcut` |
# | `encoder.down.{i}.downsample.conv` | `encoder.down_blocks.{i}.downsamplers.0.conv` |
# | `{en,de}coder.mid.block_1`, `block_2` | `mid_block.resnets.0`, `.1` |
# | `{en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}` ($1\times1$ convs) | `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (linear) |
# | `decoder.up.{L-1-i}.block.{j}`, `.upsample.conv` | `decoder.up_blocks.{i}.resnets.{j}`, `.upsamplers.0.conv` |
# | `{en,de}coder.norm_out` | `{en,de}coder.conv_norm_out` |
#
# LDM numbers the decoder levels by resolution (0 = full size), diffusers in the order they run.
# The file carries no config, so the caller names the family with `preset=`.

# %%
# | export
# One table, read both ways: (original LDM / SGM name, diffusers name, how the number {n} maps).
# "level": LDM numbers decoder levels by resolution, diffusers in running order (L - 1 - n, its own
# inverse); "one_based": LDM's mid block_1, block_2 are diffusers' resnets.0, .1.
VAE_RENAMES = (
    ("encoder.down.{n}.block.", "encoder.down_blocks.{n}.resnets.", None),
    ("encoder.down.{n}.downsample.conv.", "encoder.down_blocks.{n}.downsamplers.0.conv.", None),
    ("decoder.up.{n}.block.", "decoder.up_blocks.{n}.resnets.", "level"),
    ("decoder.up.{n}.upsample.conv.", "decoder.up_blocks.{n}.upsamplers.0.conv.", "level"),
    ("{side}.mid.block_{n}.", "{side}.mid_block.resnets.{n}.", "one_based"),
    ("{side}.mid.attn_1.norm.", "{side}.mid_block.attentions.0.group_norm.", None),
    ("{side}.mid.attn_1.q.", "{side}.mid_block.attentions.0.to_q.", None),
    ("{side}.mid.attn_1.k.", "{side}.mid_block.attentions.0.to_k.", None),
    ("{side}.mid.attn_1.v.", "{side}.mid_block.attentions.0.to_v.", None),
    ("{side}.mid.attn_1.proj_out.", "{side}.mid_block.attentions.0.to_out.0.", None),
    ("{side}.norm_out.", "{side}.conv_norm_out.", None),
)

# %%
# | export
def _rename_vae_key(key: str, num_levels: int, to_diffusers: bool) -> str:
    """One VAE key through `VAE_RENAMES`, LDM -> diffusers or back (`nin_shortcut` <-> `conv_shortcut`)."""
    for ldm, theirs, numbering in VAE_RENAMES:
        source, target = (ldm, theirs) if to_diffusers else (theirs, ldm)
        pattern = "^" + re.escape(source).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{side\}", "(?P<side>encoder|decoder)")
        m = re.match(pattern, key)
        if m is None:
            continue
        n = int(m["n"]) if "n" in m.groupdict() else None
        if numbering == "level":
            n = num_levels - 1 - n
        elif numbering == "one_based":
            n = n - 1 if to_diffusers else n + 1
        key = target.format(n=n, side=m.groupdict().get("side")) + key[m.end():]
        break
    old, new = ("nin_shortcut", "conv_shortcut") if to_diffusers else ("conv_shortcut", "nin_shortcut")
    return key.replace(old, new)

# %%
# | export
def ldm_to_diffusers(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename an original LDM/SGM VAE state dict (no prefix) to diffusers names (`VAE_RENAMES`); the
    attention's 1x1 convs (C, C, 1, 1) become linears (C, C)."""
    out = {}
    for k, v in sd.items():
        k = _rename_vae_key(k, num_levels, to_diffusers=True)
        out[k] = v.reshape(v.shape[0], v.shape[1]) if ".attentions.0.to_" in k and v.ndim > 2 else v
    return out

# %%
# | export
def diffusers_to_ldm(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """The inverse of `ldm_to_diffusers`, through the same table: diffusers names -> LDM/SGM names."""
    out = {}
    for k, v in sd.items():
        k = _rename_vae_key(k, num_levels, to_diffusers=False)
        out[k] = v[:, :, None, None] if re.search(r"\.attn_1\.(q|k|v|proj_out)\.", k) and v.ndim == 2 else v
    return out

# %%
# | export
def single_file_vae_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE entries of a single file: unnest first_stage_model. / vae., drop training leftovers."""
    prefix = next((p for p in SINGLE_FILE_PREFIXES if any(k.startswith(p) for k in sd)), None)
    sd = strip_prefix(sd, prefix) if prefix else sd
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}

# %% [markdown]
# **Parity with diffusers.** Build a small *random* AutoencoderKL with diffusers, save it in its
# real on-disk format, load it with our code and compare numbers, for both families (4 channels
# with quant convs; 16 without). Then write the same weights in the LDM layout nested under
# `first_stage_model.`, load that too, and check that diffusers' own single-file converter maps our
# LDM names back to exactly the diffusers state dict. (`tests/test_vae.py` does more.)

# %%
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file


families = {
    "SD/SDXL-like": dict(latent_channels=4, scaling_factor=0.13025),
    "SD3/Flux-like": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159),
}
x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2, 3, 32, 32)
for family, kw in families.items():
    torch.manual_seed(0)
    ref = DiffusersAutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3, **kw).eval()
    ldm = {"first_stage_model." + k: v.contiguous() for k, v in diffusers_to_ldm(ref.state_dict(), 3).items()}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = AutoencoderKL.from_pretrained(tmp)
        save_file(ldm, f"{tmp}/sd_checkpoint.safetensors")
        ours_ldm = AutoencoderKL.from_single_file(f"{tmp}/sd_checkpoint.safetensors", config=ours.config)
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    same_mapping = converted.keys() == ref.state_dict().keys() and all(
        torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    with torch.no_grad():
        rp, shift = ref.encode(x).latent_dist, ref.config.shift_factor or 0.0
        errs = {"encode mean": (ours.encode(x).mean - rp.mean).abs().max().item(),
                "decode": (ours.decode(rp.mean) - ref.decode(rp.mean).sample).abs().max().item(),
                "to_latent": (ours.to_latent(x) - (rp.mean - shift) * ref.config.scaling_factor).abs().max().item(),
                "single-file decode": (ours_ldm.decode(rp.mean) - ref.decode(rp.mean).sample).abs().max().item()}
    print(f"{family:14s}", "  ".join(f"{k}: {v:.1e}" for k, v in errs.items()), f"  converter agrees: {same_mapping}")
    assert max(errs.values()) <= 1e-5 and same_mapping  # float32 reordering noise is ~1e-7

# %% [markdown]
# ### A real VAE on a real photo (when you have the weights)
#
# Set `TINYDIT_VAE_PATH` to a diffusers VAE folder (e.g. `hf download stabilityai/sdxl-vae
# --local-dir sdxl-vae`) or to a single-file checkpoint (set `TINYDIT_VAE_PRESET` to `sd1`, `sdxl`,
# `sd3` or `flux`; default `sdxl`). The cell encodes the astronaut photo from `skimage.data` at
# 512×512, decodes it and shows both with the PSNR. Without the variable it says so and moves on:
# we never pretend to have weights we do not have.

# %%
from PIL import Image

from tinydit.data import pil_to_tensor


vae_path = os.environ.get("TINYDIT_VAE_PATH")
if not vae_path:
    print("TINYDIT_VAE_PATH is not set: with real weights this cell would encode skimage.data.astronaut() "
          "at 512x512 to a 4x64x64 (or 16x64x64) latent, decode it and show both with the PSNR. Skipping.")
else:
    import skimage.data  # the notebooks extra installs scikit-image; needed only with real weights

    real = (AutoencoderKL.from_pretrained(vae_path) if Path(vae_path).is_dir()
            else AutoencoderKL.from_single_file(vae_path, preset=os.environ.get("TINYDIT_VAE_PRESET", "sdxl")))
    photo = pil_to_tensor(Image.fromarray(skimage.data.astronaut()).resize((512, 512)))[None]  # (1, 3, 512, 512)
    with torch.no_grad():
        z_real = real.to_latent(photo)  # (1, C, 64, 64)
        photo_rec = real.from_latent(z_real)  # (1, 3, 512, 512)
    p_real = psnr(photo_rec, photo).item()
    print(f"{vae_path}: latent {tuple(z_real.shape)}, std {z_real.std():.3f}, PSNR {p_real:.2f} dB")
    display(image_grid(torch.cat([photo, photo_rec]), ["original", f"reconstruction, {p_real:.1f} dB"],
                       cols=2, scale=1))
    # not measured here (no weights in this sandbox); 20 dB is far below any working SD-family VAE
    # on a photo and only catches wrong weights or a wrong preset
    assert z_real.shape[-1] == 64 and p_real > 20

# %% [markdown]
# ## 2. DiT: the facebookresearch file and diffusers' folder
#
# Two on-disk layouts hold DiT weights:
#
# - **The original** facebookresearch `DiT-XL-2-256x256.pt`: a plain state dict with our parameter
#   names. `DiT.from_original(path)` reads it (`torch.load(weights_only=True)` or `.safetensors`)
#   and **infers the config from the weights**: width, patch size and channels from
#   `x_embedder.proj.weight`, depth from the block count, `learn_sigma` from the final layer, the
#   classes from the label table (minus the null row), the input size from the position table. The
#   head count is not in the weights: for the released (depth, width) pairs it is the paper's;
#   otherwise `num_heads=` is required, because a guess would load a different model without a word.
# - **diffusers'** `DiTTransformer2DModel` folder (`config.json` +
#   `diffusion_pytorch_model.safetensors`) splits `qkv` into `to_q/to_k/to_v`, renames everything,
#   and keeps a *copy* of the shared timestep and label embedders in every block.
#   `DiT.from_pretrained` converts it after checking that the copies are identical; if they are
#   not, one shared embedder cannot represent the model, and it says so.
#
# **A convention to check: `downscale_freq_shift`.** The timestep sinusoid uses the frequencies
# $\omega_i = 10000^{-i/(F/2 - s)}$. The original code, which **trained the released weights**,
# uses $s = 0$; diffusers' port uses $s = 1$, so the same weights see other frequencies and the
# outputs differ by order 1 (measured below). tinydit follows the code that trained the weights
# and keeps $s$ as a config field (`freq_shift`). (diffusers also uses LayerNorm
# $\epsilon = 10^{-5}$ before the MLP where the original uses $10^{-6}$; we keep `norm_eps=1e-6`.)
# A port can load the weights, make plausible pictures, and still not compute what the weights were
# trained to compute.

# %%
# | export
def read_config_json(folder: Path) -> dict:
    """`folder/config.json` as a dict, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"path_or_id: no config.json in {folder}")
    return read_config(path)

# %%
# | export
def transformer_kind(config: dict) -> str | None:
    """Which model a transformer config.json describes: tinydit's `_class` ("DiT", "TextDiT") or the
    diffusers class. Hub repos converted before diffusers split its classes (facebook/DiT-XL-2-256,
    the PixArt repos) still say "Transformer2DModel"; diffusers then picks by `norm_type`, as we do."""
    if "_class" in config:
        return config["_class"]
    name = config.get("_class_name")
    if name == "Transformer2DModel":
        return {"ada_norm_zero": "DiTTransformer2DModel",
                "ada_norm_single": "PixArtTransformer2DModel"}.get(config.get("norm_type"), name)
    return name

# %%
# | export
def diffusers_weights_file(folder: Path) -> Path:
    """The weights file of a diffusers model folder."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"path_or_id: no diffusion_pytorch_model.safetensors (or .bin) in {folder}")

# %%
# | export
def shared_dit_embedders(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The timestep / label embedders that diffusers' DiT copies into every block, as the original
    DiT's one shared set; refuses a checkpoint whose copies differ (it is not an original DiT)."""
    emb = "transformer_blocks.{}.norm1.emb."
    shared = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
              "class_embedder.embedding_table": "y_embedder.embedding_table"}
    out = {}
    for src, dst in shared.items():
        for suffix in ("weight", "bias"):
            key0 = emb.format(0) + f"{src}.{suffix}"
            if key0 not in sd:
                continue
            for n in range(1, depth):
                other = sd[emb.format(n) + f"{src}.{suffix}"]
                if not torch.equal(other, sd[key0]):
                    diff = (other.float() - sd[key0].float()).abs().max().item()
                    raise ValueError(
                        f"checkpoint: block {n}'s copy of the shared embedder '{src}.{suffix}' differs from "
                        f"block 0's (max abs diff {diff:.3g}); tinydit's DiT has one shared timestep/label "
                        "embedder, as the original DiT, so it cannot represent this model exactly")
            out[f"{dst}.{suffix}"] = sd[key0]
    return out

# %%
# | export
def convert_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel state dict -> original DiT names (checks the embedder copies)."""
    if "pos_embed.proj.weight" not in sd or "transformer_blocks.0.attn1.to_q.weight" not in sd:
        raise ValueError("checkpoint: not a diffusers DiTTransformer2DModel state dict (no "
                         "'pos_embed.proj.weight' / 'transformer_blocks.0.attn1.to_q.weight')")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           **shared_dit_embedders(sd, depth)}
    for n in range(depth):
        b, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([sd[b + f"attn1.to_{x}.{suffix}"] for x in "qkv"])
            out[o + f"attn.proj.{suffix}"] = sd[b + f"attn1.to_out.0.{suffix}"]
            out[o + f"mlp.fc1.{suffix}"] = sd[b + f"ff.net.0.proj.{suffix}"]
            out[o + f"mlp.fc2.{suffix}"] = sd[b + f"ff.net.2.{suffix}"]
            out[o + f"adaLN_modulation.1.{suffix}"] = sd[b + f"norm1.linear.{suffix}"]
        for x in "qk":
            if b + f"attn1.norm_{x}.weight" in sd:
                out[o + f"attn.{x}_norm.weight"] = sd[b + f"attn1.norm_{x}.weight"]
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = sd[f"proj_out_1.{suffix}"]
        out[f"final_layer.linear.{suffix}"] = sd[f"proj_out_2.{suffix}"]
    known = re.compile(r"pos_embed\.(proj\.(weight|bias)|pos_embed)|proj_out_[12]\.(weight|bias)|"
                       r"transformer_blocks\.\d+\.(norm1\.(emb\..*|linear\..*)|attn1\.(to_[qkv]|to_out\.0|norm_[qk])\..*|"
                       r"ff\.net\.(0\.proj|2)\..*)")
    unknown = sorted(k for k in sd if not known.fullmatch(k))
    if unknown:  # weights we would silently drop: refuse rather than load a different model
        raise ValueError(f"checkpoint: diffusers DiT keys tinydit does not use: {unknown[:10]}"
                         + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out

# %% [markdown]
# ### DiT parity with diffusers, measured
#
# A small random `DiTTransformer2DModel`, with block 0's embedders copied into every block (as a
# converted checkpoint has them), saved in diffusers' own format and loaded with
# `DiT.from_pretrained`; compared with diffusers as shipped (shift 1), then with shift 0. (Needs
# `diffusers`, from the `dev` extra.)

# %%
import tempfile


try:
    import diffusers
except ImportError:
    diffusers = None
    print("diffusers is not installed (pip install -e '.[dev]'); skipping the live comparison")
if diffusers is not None:
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                          out_channels=8, num_layers=2 if FAST else 12, sample_size=32,
                                          patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6).eval()
    with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
        for p in ref.parameters():
            p.normal_(0, 0.05)
        for blk_ref in ref.transformer_blocks[1:]:
            blk_ref.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = DiT.from_pretrained(tmp)
        ours_bf16 = DiT.from_pretrained(tmp, dtype="bf16")  # converted while reading (chapters 02, 12)
    xp, tp, yp = torch.randn(2, 4, 32, 32), torch.tensor([10.0, 700.0]), torch.tensor([3, 1000])
    with torch.no_grad():
        shipped = ref(xp, timestep=tp, class_labels=yp).sample
        for blk_ref in ref.transformer_blocks:
            blk_ref.norm1.emb.time_proj.downscale_freq_shift = 0
        fixed = ref(xp, timestep=tp, class_labels=yp).sample
        mine = ours(xp, tp, yp)
        rel_bf16 = ((ours_bf16(xp, tp, yp).float() - mine).abs().max() / mine.abs().max()).item()
    print(f"max |diffusers (shift 1) - tinydit| = {(shipped - mine).abs().max():.3f}")
    print(f"max |diffusers (shift 0) - tinydit| = {(fixed - mine).abs().max():.2e}")
    print(f"tinydit with bf16 weights: max error {rel_bf16:.1e} of the output's scale")
    assert (fixed - mine).abs().max() < 1e-5 < (shipped - mine).abs().max()
    assert rel_bf16 < 0.05  # measured 8.0e-3 (2 blocks, FAST) and 1.6e-2 (12 blocks); ~3x margin

# %% [markdown]
# What the one-character difference does: the timestep sinusoid's frequencies
# $\omega_i = 10000^{-i/(F/2 - s)}$ for the original's $s = 0$ and diffusers' $s = 1$, at DiT's
# $F = 256$. The curves differ most at the high end, where the fastest frequencies decide how finely
# the network tells neighbouring timesteps apart.

# %%
half = 128  # F / 2: DiT's frequency_embedding_size is 256
idx = torch.arange(half, dtype=torch.float64)
freqs = {s: torch.exp(-math.log(10000) * idx / (half - s)) for s in (0, 1)}  # (128,) each
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.8))
for s, label in [(0, "original DiT, s = 0 (trained the weights)"), (1, "diffusers' port, s = 1")]:
    ax1.plot(idx, freqs[s], label=label)
ax1.set(yscale="log", xlabel="index i", ylabel=r"$\omega_i$", title="timestep frequencies")
ax1.legend(fontsize=8)
ax2.plot(idx, freqs[1] / freqs[0] - 1)
ax2.set(xlabel="index i", ylabel="relative difference", title="diffusers / original - 1")
plt.tight_layout()
plt.show()
assert float(freqs[1][-1] / freqs[0][-1]) < 0.95  # the last frequency is 7 % lower in the port

# %% [markdown]
# ## 3. PixArt: the original checkpoints and diffusers' folder
#
# As for DiT in section 2, two layouts:
#
# - **diffusers'** `PixArtTransformer2DModel` folder. It splits `qkv` into `to_q/to_k/to_v`, and the
#   cross-attention's `kv_linear` into `to_k/to_v`; it calls the shared timestep map
#   `adaln_single.linear` (our `t_block.1`) and the caption MLP `caption_projection`. It does **not**
#   store the null caption `y_embedding`: its pipeline encodes an empty negative prompt with T5
#   instead, so a model loaded from it has `caption_tokens=0` and `null_context` says so.
# - **the original** PixArt-α/Σ checkpoints (`PixArt-XL-2-1024-MS.pth`, a `{"state_dict": ...}`
#   wrapper), whose names are ours. The config is inferred from the weights: width, patch, depth,
#   caption width, null-caption length (120 → α, 300 → Σ), micro-conditions (are `csize_embedder`
#   weights present?). Not in the weights: the number of heads (1152 → 16, as DiT-XL) and the
#   position interpolation scale (latent side / 64: 0.5, 1, 2 at 256, 512, 1024 px), which we check
#   against the stored `pos_embed` table when it is there.
#
# **Where diffusers and the original code differ**, we follow the original, which trained the
# weights: the caption padding is masked out exactly (the original attends over the real tokens
# only, via xformers' block-diagonal mask; diffusers adds a bias of $-10^4$, which in fp32 gives the
# same softmax to the last bit); the null caption for guidance is the learned `y_embedding` where
# the checkpoint has it; and when a diffusers config leaves `interpolation_scale` empty we use the
# original rule (latent side / 64, so 0.5 at 256 px) where diffusers' default would give 1. The timestep sinusoid is the same in both (`flip_sin_to_cos=True`, shift 0),
# unlike diffusers' DiT port of chapter 05.
#
# `TextDiT.from_pretrained` / `TextDiT.from_original` load PixArt; chapter 05's `DiT` loaders load
# class-conditional DiTs, and each refuses the other's files with a sentence saying which to use.
# `load_transformer(path_or_id)` reads either, dispatching on the files' contents: a single file in
# the original layout (PixArt when it has `t_block` weights), or a folder's `config.json`. All of them
# take `dtype=` ("bf16", "fp16"): PixArt-α XL/2 is 2.4 GB in float32, 1.2 GB read straight into bf16.

# %%
# | export
def convert_diffusers_pixart(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers PixArtTransformer2DModel state dict -> the original PixArt names (ours)."""
    if "adaln_single.linear.weight" not in sd or "transformer_blocks.0.attn2.to_q.weight" not in sd:
        raise ValueError("checkpoint: not a diffusers PixArtTransformer2DModel state dict (no "
                         "'adaln_single.linear.weight' / 'transformer_blocks.0.attn2.to_q.weight')")
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    take("pos_embed.proj", "x_embedder.proj")
    take("adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
    take("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
    take("adaln_single.emb.resolution_embedder.linear_1", "csize_embedder.mlp.0")
    take("adaln_single.emb.resolution_embedder.linear_2", "csize_embedder.mlp.2")
    take("adaln_single.emb.aspect_ratio_embedder.linear_1", "ar_embedder.mlp.0")
    take("adaln_single.emb.aspect_ratio_embedder.linear_2", "ar_embedder.mlp.2")
    take("adaln_single.linear", "t_block.1")
    take("caption_projection.linear_1", "y_embedder.y_proj.fc1")
    take("caption_projection.linear_2", "y_embedder.y_proj.fc2")
    take("proj_out", "final_layer.linear")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for n in range(depth):
        b, o = f"transformer_blocks.{n}.", f"blocks.{n}."
        out[o + "scale_shift_table"] = sd.pop(b + "scale_shift_table")
        for suffix in ("weight", "bias"):
            out[o + f"attn.qkv.{suffix}"] = torch.cat([sd.pop(b + f"attn1.to_{x}.{suffix}") for x in "qkv"])
            out[o + f"cross_attn.kv_linear.{suffix}"] = torch.cat([sd.pop(b + f"attn2.to_{x}.{suffix}") for x in "kv"])
        take(b + "attn1.to_out.0", o + "attn.proj")
        take(b + "attn2.to_q", o + "cross_attn.q_linear")
        take(b + "attn2.to_out.0", o + "cross_attn.proj")
        take(b + "ff.net.0.proj", o + "mlp.fc1")
        take(b + "ff.net.2", o + "mlp.fc2")
    if sd:
        raise ValueError(f"checkpoint: {len(sd)} diffusers PixArt keys that tinydit does not know how to map: "
                         f"{sorted(sd)[:10]}")
    return out


# %% [markdown]
# Writing is the inverse: our names back to diffusers' (the fused `qkv` / `kv` cut back into `to_q`,
# `to_k`, `to_v`) and our config back to a `PixArtTransformer2DModel` config.json. Chapter 09 saves the
# book model this way and chapter 14 writes whole pipeline folders with it; the round trip is checked
# in chapter 14 and, against diffusers itself, in the tests.

# %%
# | export
def pixart_config(cfg) -> dict:
    """diffusers' PixArtTransformer2DModel config.json for a TextDiT config (the inverse of chapter 07's reader)."""
    if cfg.modulation != "adaln_single" or cfg.pooled_dim:
        raise ValueError("transformer: only PixArt-style TextDiTs (adaln_single, no pooled text) have a diffusers "
                         f"layout; got modulation={cfg.modulation!r}, pooled_dim={cfg.pooled_dim}")
    return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.30.0",
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels * (2 if cfg.learn_sigma else 1),
            "num_layers": cfg.depth, "sample_size": cfg.input_size, "patch_size": cfg.patch_size,
            "cross_attention_dim": cfg.hidden_size, "caption_channels": cfg.context_dim,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps,
            "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "interpolation_scale": cfg.interpolation_scale, "use_additional_conditions": cfg.micro_conditions,
            "attention_type": "default", "dropout": 0.0, "norm_num_groups": 32, "upcast_attention": False}

# %%
# | export
PIXART_RENAMES = {"x_embedder.proj": "pos_embed.proj", "t_block.1": "adaln_single.linear",
                  "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
                  "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
                  "y_embedder.y_proj.fc1": "caption_projection.linear_1",
                  "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out",
                  "attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
                  "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}


def _is_pixart_key(key: str) -> bool:
    """Does pixart_to_diffusers know where `key` of a TextDiT (adaLN-single) state dict goes?"""
    if key in ("pos_embed", "final_layer.scale_shift_table"):
        return True
    parts = key.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3:
        rest = parts[2]
        part = rest.rsplit(".", 1)[0]  # "mlp.fc1" of "mlp.fc1.weight"
        split = ("attn.qkv", "cross_attn.kv_linear")  # fused weights, cut in three / two
        return rest == "scale_shift_table" or (part != rest and (part in PIXART_RENAMES or part in split))
    return key.rsplit(".", 1)[0] in PIXART_RENAMES

# %%
# | export
def _check_pixart_state_dict(sd) -> None:
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TypeError(f"sd: expected a state dict (name -> tensor), model.state_dict(), got {type(sd).__name__}")
    unknown = [k for k in sd if not _is_pixart_key(k)]
    if unknown:
        listed = ", ".join(repr(k) for k in unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise ValueError(f"sd: unexpected key(s) {listed} (not the state dict of a PixArt-style TextDiT)")

# %%
# | export
def pixart_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original PixArt) names -> diffusers `PixArtTransformer2DModel` names; the inverse of
    chapter 07's `convert_diffusers_pixart` (fused qkv / kv split back into to_q, to_k, to_v)."""
    _check_pixart_state_dict(sd)
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # diffusers recomputes the fixed table
    out: dict[str, torch.Tensor] = {}
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
                out[f"{b}{PIXART_RENAMES[part]}.{suffix}"] = value
        else:
            out[f"{PIXART_RENAMES[stem]}.{suffix}"] = value
    return {k: v.contiguous() for k, v in out.items()}

# %% [markdown]
# ### PixArt parity with diffusers, measured
#
# A tiny random `PixArtTransformer2DModel` saved in diffusers' format, loaded with
# `load_transformer`, and the same weights saved in the original layout (a `.pth` with PixArt's
# `{"state_dict": ...}` wrapper) and loaded with `TextDiT.from_original`; compared on padded captions,
# PixArt-α-style (with micro-conditions) and Σ-style (without), at the training grid and a larger,
# non-square one. `tests/test_textdit.py` repeats this with more timesteps and layouts.

# %%
import tempfile

import diffusers  # a dev dependency: the reference, never a run-time one


worst = {}
for micro in (True, False):
    torch.manual_seed(0)
    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=24, sample_size=8, patch_size=2, norm_eps=1e-6,
        use_additional_conditions=micro, interpolation_scale=8 / 64).eval()
    with torch.no_grad():  # random weights everywhere, including the zero-initialised ones
        for prm in ref.parameters():
            prm.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        loaded = [load_transformer(tmp)]
        torch.save({"state_dict": loaded[0].state_dict()}, f"{tmp}/PixArt-tiny.pth")
        loaded.append(TextDiT.from_original(f"{tmp}/PixArt-tiny.pth", num_heads=4))
    ctx, cmask = torch.randn(3, 7, 24), torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    res, ar = torch.tensor([[64.0, 64.0]] * 3), torch.tensor([[1.0]] * 3)
    kw = dict(resolution=res, aspect_ratio=ar) if micro else {}
    errs = []
    for shape, tp in (((3, 4, 8, 8), torch.tensor([0.0, 10.0, 999.0])), ((3, 4, 12, 16), torch.tensor([500.0, 250.0, 1.0]))):
        xp = torch.randn(shape)
        with torch.no_grad():
            r = ref(xp, encoder_hidden_states=ctx, timestep=tp, encoder_attention_mask=cmask,
                    added_cond_kwargs=kw or None).sample
            errs += [(m(xp, tp, context=ctx, context_mask=cmask, **kw) - r).abs().max().item() for m in loaded]
    worst["alpha (micro-conditions)" if micro else "sigma (none)"] = max(errs)
for name, err in worst.items():
    print(f"PixArt-{name}: max |diffusers - tinydit| = {err:.2e} (2 grids, both layouts)")
assert max(worst.values()) <= 1e-5

# %% [markdown]
# ## Summary
#
# - `tinydit.loading` holds every key map and converter the book's models need for real checkpoints:
#   LDM/SGM VAE files both ways (`ldm_to_diffusers`, `diffusers_to_ldm`), diffusers DiT folders
#   (`convert_diffusers_dit`), PixArt-α/Σ folders both ways (`convert_diffusers_pixart`,
#   `pixart_to_diffusers`, `pixart_config`), and the folder readers (`read_config_json`,
#   `transformer_kind`, `diffusers_weights_file`). The configs read from weights stay with their models
#   (chapters 05 and 07), as does `load_transformer`, which reads any of these layouts.
# - Each layout matches its reference here on tiny random weights: diffusers' own single-file converter
#   maps our LDM names back exactly; diffusers' DiT and PixArt models give our outputs (DiT after
#   diffusers' `downscale_freq_shift` is set to the original's 0).
#
# ## Exercises
#
# 1. SD 1.x full checkpoints nest the VAE under `first_stage_model.`. Write the key map for the UNet's
#    text encoder (`cond_stage_model.`) into chapter 06's CLIP, and test it on a tiny random CLIP.
# 2. `heads_for` refuses to guess the head count of an unreleased (depth, width). Train a tiny DiT with
#    2 and with 4 heads: do the two checkpoints differ in any stored tensor's shape?
