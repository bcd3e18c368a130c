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
# # 01b · An optional second dataset: colour emoji
#
# For a taste of *real* pictures with *real* captions: the Noto Color Emoji font holds about two
# thousand hand-drawn images, each with an official name ("grinning face", "red apple", from the
# `emoji` package). `EmojiDataset` renders each glyph with Pillow (this bitmap font renders only at
# size 109), crops it, pads it to a white square and resizes it; skin-tone variants are skipped.
# The font is a system package (`sudo apt-get install fonts-noto-color-emoji`), or pass `font_path=`.

# %%
# | default_exp emoji


# %%
# %%
import os

import numpy as np
from IPython.display import display

from tinydit.data import image_grid


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
# | export
"""An optional dataset of real pictures with real captions: the glyphs of a colour emoji font,
rendered with Pillow, named by the `emoji` package (chapter 01b)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from tinydit.data import check_image_size, check_index, pil_to_tensor


# %%
# | export
EMOJI_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/System/Library/Fonts/Apple Color Emoji.ttc",
)
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


def find_emoji_font(font_path: str | Path | None = None) -> Path:
    """Locate NotoColorEmoji.ttf, or raise a FileNotFoundError that says how to install it."""
    candidates = [Path(font_path)] if font_path else [Path(p) for p in EMOJI_FONT_PATHS]
    for p in candidates:
        if p.is_file():
            return p
    where = f"font_path={str(font_path)!r} does not exist" if font_path else "no colour emoji font found"
    raise FileNotFoundError(
        f"EmojiDataset: {where}. Install it with `sudo apt-get install fonts-noto-color-emoji` "
        "(Debian/Ubuntu) or pass font_path= to a NotoColorEmoji.ttf."
    )

# %%
# | export
def _emoji_items() -> list[tuple[str, str]]:
    """(emoji, caption) for every fully qualified emoji without a skin tone, sorted by caption."""
    try:
        import emoji
    except ImportError as e:
        raise ImportError("EmojiDataset needs the `emoji` package: pip install emoji") from e
    items = []
    for ch, info in emoji.EMOJI_DATA.items():
        if info.get("status") != emoji.STATUS["fully_qualified"] or SKIN_TONES & set(ch):
            continue
        name = info["en"].strip(":").replace("_", " ")
        if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in ch):  # two regional indicators = a flag
            name = f"flag of {name}"
        items.append((ch, name))
    return sorted(items, key=lambda t: t[1])

# %%
# | export
class EmojiDataset(Dataset):
    """Colour emoji rendered from Noto Color Emoji, captioned with their CLDR names.

    `ds[i]` -> `(image, caption)`: image float32 `(3, size, size)` in [-1, 1] on white.
    """

    RENDER_PX = 109  # the only size at which Pillow renders this bitmap font

    def __init__(self, size: int = 32, font_path: str | Path | None = None):
        self.size = check_image_size(size)
        self.items = _emoji_items()
        self.font = ImageFont.truetype(str(find_emoji_font(font_path)), self.RENDER_PX)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def render(self, i: int) -> Image.Image:
        ch, _ = self.items[i]
        canvas = Image.new("RGBA", (4 * self.RENDER_PX, 2 * self.RENDER_PX), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), ch, font=self.font, embedded_color=True)
        bbox = canvas.getchannel("A").getbbox()
        glyph = canvas.crop(bbox) if bbox else canvas
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        return square.convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        i = check_index(i, len(self))
        if i not in self._cache:
            self._cache[i] = pil_to_tensor(self.render(i))  # (3, size, size)
        return self._cache[i], self.items[i][1]

# %% [markdown]
# With the font installed, some emoji and their captions; without it, how to install it.

# %%
try:
    emoji_ds = EmojiDataset(size=32)
except (FileNotFoundError, ImportError) as e:
    emoji_ds = None
    print(e)
if emoji_ds is not None:
    picks = np.random.default_rng(0).choice(len(emoji_ds), size=24, replace=False)
    print(f"{len(emoji_ds)} emoji")
    imgs, caps = zip(*(emoji_ds[int(k)] for k in picks))
    display(image_grid(torch.stack(imgs), list(caps), cols=8, scale=3))
    assert imgs[0].shape == (3, 32, 32) and len(emoji_ds) > 1000

# %% [markdown]
# ## Summary
#
# - **Built** (`tinydit.emoji`): `EmojiDataset`, about two thousand colour emoji rendered from the
#   system's font with their official names as captions, skin-tone variants skipped; a missing font
#   is an error that says how to install it. `python -m tinydit dataset --dataset emoji` draws a grid.
