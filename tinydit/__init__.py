"""tinydit: a DiT text-to-image diffusion engine, built chapter by chapter in notebooks/.

Hand-written (no notebook owns it). Submodules are generated from the notebooks and imported on
demand, e.g. `from tinydit import data` or `from tinydit.data import ShapesDataset`, so that
`import tinydit` stays cheap.
"""

__version__ = "0.1.0"
