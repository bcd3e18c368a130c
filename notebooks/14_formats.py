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
# # 14 · Folders and the demo: diffusers' layout both ways, attention maps, a widget
#
# Chapter 13's pipeline loads with `from_pretrained` and writes with `save_pretrained`; this chapter
# is what those read and write: diffusers' pipeline layout, both ways — our folders load in diffusers'
# `PixArtAlphaPipeline`, and diffusers' PixArt folders load here, tested to give the same latents.
# Then two ways of looking at the pipeline at work: the cross-attention maps of each caption word, and
# a widget demo that a test drives in a real browser. It exports `tinydit.formats` and `tinydit.demo`.

# %%
# | default_exp formats
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import io
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import display

from tinydit import evaluate
from tinydit.pipeline import TextToImagePipeline
from tinydit.validation import expect_error


torch.set_num_threads(1)  # a 4 M-parameter model on 16 tokens: one thread beats two contending

# %% [markdown]
# ## 1. Two layouts, both ways
#
# A diffusers pipeline folder is a `model_index.json` naming each component's library and class, and
# one subfolder per component in that library's own format. Chapter 07 reads diffusers'
# `PixArtTransformer2DModel`, chapter 02 its `AutoencoderKL`, chapter 06 transformers' CLIP and T5; the
# scheduler config is read above. Writing is the inverse, plus one private key (`"_tinydit"`, which
# diffusers ignores, as it ignores every key that starts with `_`) for what diffusers has no field for:
# our default sampler, steps and guidance, and how the text encoder pads.

# %%
# | export
"""Pipeline folders on disk (chapter 14): diffusers' layout read and written (model_index.json and one
subfolder per component, PixArt-α / Σ), and chapter 09's book-model folder read. The pipeline builds
itself from what `load_parts` returns; `save_pipeline` writes any pipeline's components."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinydit.checkpoint import read_config, resolve_pretrained
from tinydit.loading import pixart_config, pixart_to_diffusers
from tinydit.text import CLIPTextEncoder, T5TextEncoder, _quiet_transformers, load_book_text_encoder
from tinydit.textdit import TextDiT
from tinydit.vae import AutoencoderKL, load_book_vae


MODEL_INDEX = "model_index.json"
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_FILES = (MODEL_INDEX, "*/config.json", "*/*.safetensors", "tokenizer/*", "scheduler/*")
SAVED_DEFAULTS = ("steps", "guidance_scale", "sample_size", "sampler")  # what "_tinydit" keeps that diffusers cannot


def resolve_pipeline_folder(path_or_id) -> Path:
    """A local folder for `path_or_id`, downloading a hub id's pipeline files when online."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id: expected a folder path or a hub id, got {type(path_or_id).__name__}")
    return resolve_pretrained(path_or_id, filenames=PIPELINE_FILES)

# %%
# | export
def _require(folder: Path, names, what: str) -> None:
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} is {what} but lacks {', '.join(missing)}")

# %%
# | export
def load_parts(folder: Path, dtype=None) -> dict:
    """A pipeline folder or a book-model folder -> text_encoder, transformer, vae, the scheduler config
    (a dict) and the defaults the folder stores (a dict of SamplingConfig fields)."""
    return load_pipeline_parts(folder, dtype) if (folder / MODEL_INDEX).is_file() else load_book_parts(folder, dtype)

# %%
# | export
def load_book_parts(folder: Path, dtype=None) -> dict:
    """A book-model folder (chapter 09): its PixArt transformer and scheduler, the book encoder and VAE."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path_or_id: {str(folder)!r} is neither a pipeline folder (no {MODEL_INDEX}) nor a "
                                "book-model folder (no config.json with diffusion_pytorch_model.safetensors)")
    _require(folder, ["diffusion_pytorch_model.safetensors", "scheduler_config.json"], "a book-model folder")
    scheduler = read_config(folder / "scheduler_config.json", "path_or_id")
    return dict(text_encoder=load_book_text_encoder(dtype=dtype), transformer=TextDiT.from_pretrained(folder, dtype=dtype),
                vae=load_book_vae(dtype=dtype), scheduler=scheduler, defaults={})

# %%
# | export
def load_text_encoder(folder: Path, index: dict, dtype=None):
    """The text encoder + tokenizer a model_index.json names (transformers' CLIP or T5 classes)."""
    kind = (index.get("text_encoder") or [None, None])[1] or ""
    extra = index.get("_tinydit", {}).get("text_encoder", {})
    if "T5" in kind:
        max_length = extra.get("max_length", 300 if "Sigma" in index.get("_class_name", "") else 120)
        return T5TextEncoder.from_pretrained(folder, "text_encoder", "tokenizer", dtype=dtype, max_length=max_length,
                                             padding=extra.get("padding", "max_length"))
    if "CLIP" in kind:
        options = {k: extra[k] for k in ("max_length", "padding", "layer") if k in extra}
        with _quiet_transformers(progress_bar=False):
            return CLIPTextEncoder.from_pretrained(folder, "text_encoder", "tokenizer", dtype=dtype, **options)
    raise ValueError(f"path_or_id: text_encoder class {kind!r} in {MODEL_INDEX}; expected a CLIP or T5 text model")

# %%
# | export
def _check_index(index: dict) -> dict:
    """model_index.json's entries: [library, class] pairs, and our "_tinydit" object."""
    for part in PIPELINE_PARTS:
        entry = index.get(part)
        if entry is not None and not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"path_or_id: {MODEL_INDEX}'s {part!r} entry should be [library, class], got {entry!r}")
    extra = index.get("_tinydit", {})
    if not isinstance(extra, dict) or not all(isinstance(extra.get(k, {}), dict) for k in ("sampling", "text_encoder")):
        raise ValueError(f"path_or_id: {MODEL_INDEX}'s '_tinydit' entry should be an object with 'sampling' and "
                         f"'text_encoder' objects, got {extra!r}")
    return index

# %%
# | export
def load_pipeline_parts(folder: Path, dtype=None) -> dict:
    """Every component of a pipeline folder, its scheduler config and its stored defaults."""
    index = _check_index(read_config(folder / MODEL_INDEX, "path_or_id"))
    _require(folder, [f"{p}/" for p in PIPELINE_PARTS] + ["scheduler/scheduler_config.json"], "a pipeline folder")
    scheduler = read_config(folder / "scheduler" / "scheduler_config.json", "path_or_id")
    transformer = TextDiT.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = index.get("_tinydit", {}).get("sampling", {})
    defaults = dict(steps=20, guidance_scale=4.5, sample_size=transformer.config.input_size * factor)  # PixArt's
    defaults.update({k: v for k, v in saved.items() if k in SAVED_DEFAULTS})
    return dict(text_encoder=load_text_encoder(folder, index, dtype), transformer=transformer, vae=vae,
                scheduler=scheduler, defaults=defaults)

# %%
# | export
def pixart_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE to save in a PixArt folder. diffusers' PixArt pipelines decode `z / scaling_factor` and
    never add `shift_factor`, so a shifted VAE (the book's: -0.2582) is saved with the shift folded into
    its 1x1 convs (exact: post_quant_conv's bias += W @ shift, quant_conv's mean bias -= shift) and
    shift_factor 0: the same latents and the same images in both libraries."""
    shift = vae.config.shift_factor
    if not shift:
        return vae
    if vae.quant_conv is None or vae.post_quant_conv is None:
        warnings.warn(f"vae: shift_factor {shift} cannot be folded (no quant convs); diffusers' PixArt pipelines "
                      "will decode without it", stacklevel=3)
        return vae
    folded, C = copy.deepcopy(vae), vae.config.latent_channels
    with torch.no_grad():
        folded.post_quant_conv.bias += folded.post_quant_conv.weight[:, :, 0, 0] @ torch.full((C,), float(shift))
        folded.quant_conv.bias[:C] -= shift  # moments = (mean, logvar): the mean's channels come first
    folded.config = dataclasses.replace(folded.config, shift_factor=0.0)
    return folded

# %%
# | export
def save_pipeline(pipe, folder: Path, sampling: dict, scheduler: dict) -> Path:
    """`TextToImagePipeline.save_pretrained`: diffusers' pipeline layout, with `scheduler` (a diffusers
    scheduler config) and tinydit's `sampling` defaults under model_index.json's "_tinydit" key."""
    for part in PIPELINE_PARTS:
        (folder / part).mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(pixart_config(pipe.transformer.config), indent=1))
    sd = {k: v for k, v in pipe.transformer.state_dict().items() if k != "y_embedder.y_embedding"}  # diffusers has none
    save_file(pixart_to_diffusers({k: v.detach().cpu() for k, v in sd.items()}),
              str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    pixart_vae(pipe.vae).save_pretrained(folder / "vae")
    encoder = pipe.text_encoder
    with _quiet_transformers(progress_bar=False):
        encoder.model.save_pretrained(folder / "text_encoder")
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    text = {"max_length": encoder.max_length, "padding": encoder.padding}
    if isinstance(encoder, CLIPTextEncoder):
        text["layer"] = encoder.layer
    index = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.30.0",
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", type(encoder.model).__name__],
             "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "_tinydit": {"sampling": sampling, "text_encoder": text}}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=1))
    return folder

# %% [markdown]

# %% [markdown]
# Round trip: the book model written in diffusers' layout and read back gives the same latents, and
# its files are exactly what diffusers expects. (The tests go further: diffusers' own
# `PixArtAlphaPipeline` loads this folder and, fed the book encoder's embeddings, lands on our
# latents within 3.4e-5; and a random PixArt-α pipeline saved by diffusers loads here and gives
# diffusers' latents within 2e-5 of their size.)

# %%
pipe = TextToImagePipeline.from_pretrained()
with tempfile.TemporaryDirectory() as tmp:
    pipe.save_pretrained(tmp)
    print(sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file()))
    back = TextToImagePipeline.from_pretrained(tmp)
    a = pipe(["a red circle above a blue square"], seed=0, disable=True, output_type="latent").latents
    b = back(["a red circle above a blue square"], seed=0, disable=True, output_type="latent").latents
assert torch.equal(a, b) and back.sampling == pipe.sampling

# %% [markdown]
# ## 2. What the model looks at: cross-attention maps
#
# Each block's cross-attention lets every image token (a 2×2 patch of the 8×8 latent: a 4×4 grid)
# read the caption's tokens. Recording the attention weights during sampling — with forward hooks
# again, the model untouched — shows which part of the image listens to which word.

# %%
# | export demo
"""What the model looks at, and a widget to play with it (chapter 14): cross-attention maps recorded
with forward hooks while the pipeline samples, their plot, and `GenerateDemo` (ipywidgets; served by
`python -m tinydit demo`). matplotlib, ipywidgets and IPython are imported only where they are used."""

from __future__ import annotations

import html
import io
import time

import torch
from PIL import Image

from tinydit.pipeline import PipelineOutput, TextToImagePipeline
from tinydit.samplers import SAMPLERS
from tinydit.textdit import TextDiT


# %%
# | export demo
class CrossAttentionMaps:
    """Records a TextDiT's text-to-image cross-attention while sampling: `with CrossAttentionMaps(model)
    as maps: pipe(...)`, then `maps.mean(B)` -> (B, T, h, w): the attention of the image tokens to each
    text token, averaged over heads, blocks and steps (the first B rows of each call: the conditional
    half of a CFG batch)."""

    def __init__(self, model: TextDiT):
        self.model, self.calls, self.hooks = model, [], []
        self.grid = model.config.input_size // model.config.patch_size

    def _record(self, module, args, kwargs, out) -> None:
        from tinydit.attention import attention_weights

        x, context = args[0], args[1]
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        q, k, _ = module.qkv_heads(x, context)  # (B, heads, N, hd), (B, heads, T, hd)
        self.calls.append(attention_weights(q, k, mask).mean(1).detach().float().cpu())  # (B, N, T)

    def mean(self, batch_size: int) -> torch.Tensor:
        maps = torch.stack([c[:batch_size] for c in self.calls if c.shape[0] >= batch_size]).mean(0)  # (B, N, T)
        return maps.transpose(1, 2).reshape(batch_size, -1, self.grid, self.grid)  # (B, T, h, w)

    def __enter__(self) -> CrossAttentionMaps:
        blocks = self.model.blocks
        for block in [blocks[i] for i in range(len(blocks))]:  # indexing: a step cache's iteration yields callables
            self.hooks.append(block.cross_attn.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


# %%
# | export demo
def attention_maps(pipe: TextToImagePipeline, prompt: str, seed: int = 0, **options):
    """Generate `prompt` and record where the image tokens attended: (PipelineOutput, (T, h, w) maps, T tokens)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected one string, got {type(prompt).__name__}")
    with CrossAttentionMaps(pipe.transformer) as maps:
        out = pipe([prompt], seed=seed, disable=True, **options)
    attn = maps.mean(1)[0]  # (T, h, w)
    ids = pipe.text_encoder.tokenizer([prompt], truncation=True, max_length=attn.shape[0])["input_ids"][0]
    return out, attn, pipe.text_encoder.tokenizer.convert_ids_to_tokens(ids)  # the tokens the encoder kept

# %%
# | export demo
def plot_attention(attn: torch.Tensor, words: list[str], image: Image.Image | None = None):
    """One panel per caption token (and the image first, if given); returns the matplotlib figure."""
    import matplotlib.pyplot as plt  # optional: the notebooks extra

    panels = len(words) + (image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(1.6 * panels, 1.9), squeeze=False)
    axes = list(axes[0])
    if image is not None:
        axes.pop(0).imshow(image)
        fig.axes[0].set_title("image", fontsize=8)
    vmax = float(attn[1:len(words) - 1].max()) if len(words) > 2 else float(attn.max())  # scale by the words, not <sot>/<eot>
    for ax, word, m in zip(axes, words, attn.numpy()):
        ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(word.replace("<|startoftext|>", "<sot>").replace("<|endoftext|>", "<eot>"), fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    return fig

# %%
def show_attention(pipe, prompt, seed=0, **options):
    """The image for `prompt` and, per caption word, where the image tokens attended to it."""
    out, attn, words = attention_maps(pipe, prompt, seed=seed, **options)
    plot_attention(attn, words, out.images[0])
    plt.show()
    return out, attn, words


pipe = TextToImagePipeline.from_pretrained()  # the package's class, which the demo module above imported
out, attn, words = show_attention(pipe, "a red circle above a blue square")
torch.testing.assert_close(attn.sum(0), torch.ones(4, 4), atol=1e-5, rtol=0)  # each image token's weights sum to 1
share = attn.mean((1, 2))  # (T,) how much of the attention each token receives
print("  ".join(f"{w}: {100 * s:.0f} %" for w, s in zip(words, share)))
assert words[int(share.argmax())] not in ("<pad>",)  # the model reads real tokens, never padding

# %% [markdown]
# The maps are not the crisp "red goes to the top" pictures of large models. The book text encoder is
# a *causal* CLIP (chapter 06): each token sees only the words before it, so the last ones — the final
# noun and the end token — carry a summary of the whole caption, and the DiT learnt to read mostly
# those, with image tokens in the centre columns (where objects are drawn) attending differently from
# the border. PixArt's T5 is bidirectional: every token sees the whole caption, and its maps are
# spatial. Exercise 3 asks you to measure the difference.

# %% [markdown]
# ## 3. Try it
#
# Type a prompt (the book's vocabulary: colours red, green, blue, yellow, purple, orange; shapes circle,
# square, triangle; positions and relations left / right / above / below; backgrounds white, gray,
# black), pick a sampler, the steps, the guidance scale and a seed, and press Generate. The progress bar
# follows the sampler's steps; beside the image, what each word was attended to.
#
# The demo is a small class, exported, so the same object runs here, in a served web app
# (`python -m tinydit demo` serves it with Voilà; a test drives it in headless Chromium) and in your own
# notebooks. The image is an `ipywidgets.Image` holding the PNG itself — the browser shows it enlarged
# with crisp pixels, and a program can read back the exact picture the pipeline made.

# %%
# | export demo
DEMO_PROMPT = "a green triangle below a purple circle"  # two objects and a relation, read back right at seed 0


class GenerateDemo:
    """The chapter's widget: prompt, sampler, steps, guidance scale, seed -> the image (PNG, read back
    exactly) and the cross-attention maps. `display(GenerateDemo(pipe))`; `python -m tinydit demo` serves it."""

    def __init__(self, pipe: TextToImagePipeline, prompt: str = DEMO_PROMPT, attention: bool = True):
        import ipywidgets as widgets  # optional: the notebooks extra

        if not isinstance(pipe, TextToImagePipeline):
            raise TypeError(f"pipe: expected a TextToImagePipeline; got {type(pipe).__name__}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
        self.pipe, self.attention, self.last = pipe, attention, None
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="70%"))
        flow = pipe.sampling.prediction == "flow"  # the *_rf samplers need flow times <= 1
        names = sorted(n for n in SAMPLERS if flow or not n.endswith("_rf"))
        self.sampler = widgets.Dropdown(options=names, value=pipe.sampling.sampler, description="sampler")
        self.steps = widgets.IntSlider(value=pipe.sampling.steps, min=1, max=50, description="steps")
        self.cfg = widgets.FloatSlider(value=pipe.sampling.guidance_scale, min=0, max=8, step=0.5, description="CFG")
        self.seed = widgets.IntText(value=0, description="seed")
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.progress = widgets.IntProgress(min=0, max=1, description="steps")
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="256px", height="256px"))
        self.status = widgets.HTML()  # the time taken, or the pipeline's one-line error
        self.maps = widgets.Output()
        for widget, name in [(self.prompt, "prompt"), (self.seed, "seed"), (self.button, "generate"),
                             (self.image, "image"), (self.status, "status")]:
            widget.add_class(f"tinydit-{name}")  # stable handles for a browser test
        self.button.on_click(self._clicked)
        style = widgets.HTML("<style>.tinydit-image { image-rendering: pixelated; border: 1px solid #ccc; }</style>")
        self.view = widgets.VBox([style, self.prompt, widgets.HBox([self.sampler, self.steps]),
                                  widgets.HBox([self.cfg, self.seed]), widgets.HBox([self.button, self.progress]),
                                  widgets.HBox([self.image, self.maps]), self.status])

# %%
# | export demo
@add_to_class(GenerateDemo)
def generate(self) -> PipelineOutput | None:
    """Run the pipeline on the widgets' values; shows the image, the maps and the time (or the error)."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    self.progress.max, self.progress.value = self.steps.value, 0
    self.button.disabled = True  # one run at a time: a second click while sampling would interleave
    self.status.value = "generating…"
    start = time.perf_counter()
    options = dict(seed=self.seed.value, sampler=self.sampler.value, num_inference_steps=self.steps.value,
                   guidance_scale=self.cfg.value, callback=lambda info: setattr(self.progress, "value", self.progress.value + 1))
    try:
        out, attn, words = attention_maps(self.pipe, self.prompt.value, **options)
    except (ValueError, TypeError) as e:  # the pipeline's one-line errors, shown to the reader
        self.status.value = f"<b>error</b>: {html.escape(str(e))}"
        return None
    finally:
        self.button.disabled = False
    buffer = io.BytesIO()
    out.images[0].save(buffer, format="PNG")
    self.image.value = buffer.getvalue()
    self.maps.clear_output(wait=True)
    if self.attention:
        fig = plot_attention(attn, words)
        with self.maps:
            display(fig)  # a PNG in the page; closed below so the inline backend does not draw it twice
        plt.close(fig)
    self.status.value = f"{time.perf_counter() - start:.2f} s · seed {self.seed.value} · {html.escape(self.prompt.value)}"
    self.last = out
    return out

# %%
# | export demo
@add_to_class(GenerateDemo)
def _clicked(self, _button) -> None:
    """A click: any failure is shown in the page (a widget callback's exception reaches only the server's log)."""
    try:
        self.generate()
    except Exception as e:  # the page has nowhere else to say it
        self.status.value = f"<b>error</b>: {html.escape(f'{type(e).__name__}: {e}')}"

# %%
# | export demo
@add_to_class(GenerateDemo)
def _repr_mimebundle_(self, **kwargs):
    return self.view._repr_mimebundle_(**kwargs)

# %%
demo = GenerateDemo(pipe)
display(demo)
first = demo.generate()  # one run now, so the page shows a result without a kernel
assert demo.progress.value >= demo.steps.value  # the bar followed every step (Heun-type samplers call back once a step)
reading = evaluate.read_image(evaluate.data.pil_to_tensor(Image.open(io.BytesIO(demo.image.value))))
print("the widget's PNG reads as:", [(o.color, o.shape) for o in reading.objects])
assert sorted((o.color, o.shape) for o in reading.objects) == [("green", "triangle"), ("purple", "circle")]
assert torch.equal(evaluate.data.pil_to_tensor(Image.open(io.BytesIO(demo.image.value))),
                   evaluate.data.pil_to_tensor(first.images[0]))  # the widget shows the pipeline's picture, unchanged
same, _, _ = show_attention(pipe, demo.prompt.value, seed=0)  # the printed page has no kernel: the same call, as a figure
assert same.images[0].tobytes() == first.images[0].tobytes()  # the demo is the pipeline with the widgets' values
demo.seed.value = -1  # the seed box takes any integer; the pipeline does not
assert demo.generate() is None and "seed" in demo.status.value  # the pipeline's one-line error, in the page
print(demo.status.value)
demo.seed.value = 0

# %% [markdown]
# ## 4. Bad input

# %%
with tempfile.TemporaryDirectory() as tmp:
    expect_error(lambda: TextToImagePipeline.from_pretrained(tmp), "is neither a pipeline folder", FileNotFoundError)
    (Path(tmp) / "model_index.json").write_text("{}")
    expect_error(lambda: TextToImagePipeline.from_pretrained(tmp), "is a pipeline folder but lacks", FileNotFoundError)
    expect_error(lambda: pipe.save_pretrained(Path(tmp) / "model_index.json"), "is a file, expected a folder")
expect_error(lambda: GenerateDemo("a pipeline"), "pipe: expected a TextToImagePipeline", TypeError)
expect_error(lambda: attention_maps(pipe, ["a", "b"]), "prompt: expected one string", TypeError)

# %% [markdown]
# ## Summary
#
# - `tinydit.formats` reads and writes diffusers' pipeline layout: `model_index.json` and one subfolder
#   per component in its library's own format, plus a private `"_tinydit"` key for what diffusers has no
#   field for (our default sampler, steps, guidance, the text encoder's padding). `save_pretrained`
#   writes a folder that diffusers' `PixArtAlphaPipeline` loads and samples to our latents (3.4e-5),
#   and diffusers' PixArt folders load here with diffusers' latents (2e-5 relative, tests).
# - `tinydit.demo`: cross-attention maps show what the model reads; `GenerateDemo` drives the pipeline
#   from widgets, in a notebook or served as a web page (`python -m tinydit demo`).
#
# ## Exercises
#
# 1. Load a PixArt-style model with a bidirectional text encoder (a tiny T5, as in the tests) and compare
#    its cross-attention maps with the book model's: which is more spatial, and why?
# 2. Save the book pipeline with `sampler="euler"` as its default and read `scheduler/scheduler_config.json`:
#    which diffusers class does it name, and does diffusers sample it to the same latents?
