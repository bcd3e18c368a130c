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
# # 12 · Efficiency: models that do not fit, fewer bits, fewer blocks, one graph
#
# Chapters 05–11 built an engine that runs the book model in seconds on a laptop. The real models it
# loads do not fit that easily: T5-XXL alone is 4.8 B parameters (9.5 GB in bf16), PixArt-Σ's DiT
# 0.6 B, Flux's 12 B. This chapter makes them fit and run faster, and **measures what each trick
# costs and saves**:
#
# 1. **offloading** with hooks, for any `nn.Module` and without touching its code: whole components
#    (model offload), groups of blocks streamed in just before use (block offload, prefetched on a side
#    CUDA stream from pinned memory), or every layer on its own (leaf offload);
# 2. **precision**: fp16 / bf16 weights, and **fp8 storage** upcast layer by layer at forward time;
#    which attention kernel runs for which inputs;
# 3. **step caching**: skip the deep blocks when the first block's output barely moved since the last
#    step (first-block cache), measured as model evaluations saved against adherence lost;
# 4. **compilation**: one graph per forward, and what `torch.compile` buys for the sampling loop.
#
# It exports `tinydit.offload`, `tinydit.precision` and `tinydit.stepcache`. Everything here runs on a
# CPU; the CUDA-only parts (streams, pinned memory, fp8 matmul speed) are written for a GPU and
# measured by `benchmarks/offload.py` and `benchmarks/precision.py` where one is available.

# %%
# | default_exp offload
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn


torch.manual_seed(0)

# %% [markdown]
# ## 1. Offloading: weights visit the GPU only while they work
#
# A forward pass touches one layer at a time. Weights that are not working right now can wait in CPU
# memory (or on disk, chapter 06), and come to the GPU just before they are needed. PyTorch lets us
# run code right before and after any module's forward — **hooks** — so the model's own code never
# changes. The whole idea, on a model of four blocks:

# %%
def lesson_offload(model, device):
    """Every block comes to `device` before its forward and goes back to the CPU after it."""
    moves = []
    for name, block in model.named_children():
        def bring_in(m, args, name=name):
            m.to(device)
            moves.append(f"in {name}")

        def send_out(m, args, out, name=name):
            m.to("cpu")
            moves.append(f"out {name}")

        block.register_forward_pre_hook(bring_in)
        block.register_forward_hook(send_out)
    return moves


toy = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
expected = toy(torch.ones(2, 8))  # (2, 8), no offloading
moves = lesson_offload(toy, "cpu")  # on a CPU-only machine the "GPU" is the CPU: same code path
torch.testing.assert_close(toy(torch.ones(2, 8)), expected, rtol=0, atol=0)
print(moves)
assert moves == [f"{w} {i}" for i in range(4) for w in ("in", "out")]

# %% [markdown]
# That is the whole mechanism. A production version needs five more things:
#
# - **Copies, not moves.** Inference never changes the weights, so the CPU copy stays the master and
#   "sending back" is free: we drop the GPU copy (`p.data = master`) instead of copying 9 GB back.
# - **Inputs follow the weights**: each hook moves the tensors a module receives to its device.
# - **Units**: a whole component (*model offload*: text encoder, then DiT, then VAE), a group of
#   transformer blocks (*block offload*) or every layer that owns weights (*leaf offload*), the
#   smallest peak and the most copies.
# - **Overlap**: a copy from *pinned* (page-locked) CPU memory can run on a side CUDA stream while
#   the current block computes; the next block's weights are then ready when it starts. Pageable
#   memory copies at ~1 GB/s and blocks the host; pinned memory reaches 10–25 GB/s.
# - **Accounting**: how many bytes are on the device, and the peak, so that we can *measure* what each
#   mode saves. On this CPU-only machine we run the same hooks with `device="meta"`: a meta tensor
#   has a shape and a dtype but no storage, so the accounting is exact and the copies are free.
#
# First, the unit of transfer: a group of tensors with their CPU masters.

# %%
# | export
"""Offloading any `nn.Module` with forward hooks, its code untouched (chapter 12): model offload
(one component on the device at a time), block offload (groups of blocks streamed in, the next
prefetched on a side CUDA stream from pinned memory) and leaf offload (every layer on its own)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from tinydit.validation import check_int


def as_device(name: str, device) -> torch.device:
    """`device` as a torch.device that exists here, or a ValueError naming `name`."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected a device such as 'cuda', 'cuda:1', 'cpu' or 'meta', got {device!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"{name}: {str(device)!r}, but this machine has {count} CUDA device(s)")
    elif device.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"{name}: expected a device such as 'cuda', 'cuda:1', 'cpu' or 'meta', got {str(device)!r}")
    return device

# %%
# | export
def tensors_of(modules: list[nn.Module], recurse: bool = True) -> list[torch.Tensor]:
    """The unique parameters and buffers of `modules` (tied weights once)."""
    seen, out = set(), []
    for m in modules:
        for t in [*m.parameters(recurse=recurse), *m.buffers(recurse=recurse)]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out

# %%
# | export
def nbytes(tensors) -> int:
    """Bytes the tensors take (their dtype times their size; meta tensors count too)."""
    return sum(t.numel() * t.element_size() for t in tensors)

# %%
# | export
def move_inputs(obj, device: torch.device):
    """`obj` with every tensor in it (also inside tuples, lists and dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_inputs(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_inputs(v, device) for k, v in obj.items()}
    return obj

# %%
# | export
def set_data(t: torch.Tensor, new: torch.Tensor) -> None:
    """Point `t` (a parameter or buffer, kept by identity) at `new`'s data. `t.data = new` between CPU
    and CUDA; the meta device (used to count bytes without storage) needs a full `swap_tensors`."""
    if t.is_meta == new.is_meta:
        t.data = new
    else:
        fresh = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new.detach()  # a new object
        torch.utils.swap_tensors(t, fresh)  # (swapping `new` itself would overwrite the caller's tensor)

# %%
# | export
def _check_offloadable(name: str, module) -> None:
    """An nn.Module with real (not meta) weights, no part of which another offloader holds."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(module).__name__}")
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{name}: {len(meta)} tensors are on the meta device (no data: e.g. {meta[0]!r}); load "
                         "real weights before offloading (meta is only valid as the compute device)")
    if any(getattr(m, "_tinydit_offload", None) is not None for m in module.modules()):
        raise ValueError(f"{name}: already offloaded (all or part of it); call close() on its offloader first")
    if isinstance(getattr(module, "blocks", None), nn.ModuleList) and hasattr(module.blocks, "cache"):
        raise ValueError(f"{name}: a step cache is on (chapter 12's StepCache); close() it before offloading")

# %%
# | export
def _check_flag(name: str, value) -> bool | None:
    """None (the default rule) or a real bool: the string "no" must not read as True."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name}: expected True, False or None, got {value!r}")
    return value

# %%
# | export
class Group:
    """Tensors that travel together. Each keeps a CPU *master* (pinned when the device is CUDA); the
    device copy is made by `onload` and dropped by `offload` (the weights never change in inference,
    so nothing is copied back)."""

    def __init__(self, name: str, tensors: list[torch.Tensor], pin: bool):
        self.name, self.tensors = name, tensors
        self.home = tensors[0].device if tensors else torch.device("cpu")  # where close() puts them
        with torch.no_grad():
            self.masters = [t.data.cpu().pin_memory() if pin else t.data.cpu() for t in tensors]
            for t, m in zip(tensors, self.masters):
                set_data(t, m)  # from now on the tensors live on their CPU master between visits
        self.bytes = nbytes(self.masters)
        self.on_device, self.ready = False, None  # ready: a CUDA event the compute stream waits on

    def check(self, modules: list[nn.Module], recurse: bool = True) -> None:
        """Refuse to run when a parameter was replaced after offloading (its new tensor has no master)."""
        if {id(t) for t in tensors_of(modules, recurse)} != {id(t) for t in self.tensors}:
            raise ValueError(f"model: a parameter or buffer of {self.name!r} was replaced after offloading; "
                             "close() the offloader and offload again")

    def onload(self, device: torch.device, stream=None) -> None:
        if self.on_device:
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for t, m in zip(self.tensors, self.masters):
                set_data(t, m.to(device, non_blocking=True))
            self.ready = stream.record_event() if stream is not None else None
        self.on_device = True

    def wait(self) -> None:
        """Before the compute stream uses a prefetched group: wait for its copy, and tell the caching
        allocator that the compute stream uses that memory too (so it is not reused too early)."""
        if self.ready is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(self.ready)
            for t in self.tensors:
                t.data.record_stream(compute)
            self.ready = None

# %%
# | export
@add_to_class(Group)
def offload(self) -> None:
    if self.on_device:
        for t, m in zip(self.tensors, self.masters):
            set_data(t, m)
        self.on_device, self.ready = False, None

# %%
# | export
@dataclass
class Ledger:
    """What is on the device: bytes now, the peak, and the moves (for plots and tests)."""

    resident: int = 0
    peak: int = 0
    loads: int = 0
    moved: int = 0  # bytes copied to the device in all
    events: list = field(default_factory=list)  # (what, group, bytes resident after)

    def note(self, what: str, group: Group) -> None:
        if what == "in":
            self.resident, self.loads, self.moved = self.resident + group.bytes, self.loads + 1, self.moved + group.bytes
        else:
            self.resident -= group.bytes
        self.peak = max(self.peak, self.resident)
        self.events.append((what, group.name, self.resident))

# %% [markdown]
# Every offloader below shares one skeleton: it splits a model's tensors into `Group`s, hooks the
# modules where each group must be present, keeps a `Ledger`, and `close()` puts the weights back
# where they were. It is also a context manager (`with offloader:` brings the always-needed group in
# and sends everything out after), which is exactly the interface chapter 06's `DualTextEncoder`
# uses for its secondary encoder — so chapter 12's offloaders plug in there unchanged.

# %%
# | export
class Offloader:
    """The skeleton of every offload mode: groups, hooks, a ledger, `close()`."""

    def __init__(self, device, pin_memory: bool | None = None):
        self.device = as_device("device", device)
        pin_memory = _check_flag("pin_memory", pin_memory)
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        if self.pin and not torch.cuda.is_available():
            raise ValueError("pin_memory: pinned CPU memory needs CUDA, and this torch sees no CUDA device")
        self.ledger, self.groups, self.hooks, self.modules = Ledger(), [], [], []

    def _adopt(self, module: nn.Module) -> None:
        for m in module.modules():  # every part: a later offloader of a part (or a parent) is refused
            m._tinydit_offload = self
        self.modules.append(module)

    def onload(self, group: Group, stream=None) -> None:
        if not group.on_device:
            group.onload(self.device, stream)
            self.ledger.note("in", group)

    def offload(self, group: Group) -> None:
        if group.on_device:
            group.offload()
            self.ledger.note("out", group)

    def _pre(self, module: nn.Module, group: Group, owners: list[nn.Module] | None = None):
        """A forward pre-hook: `group` on the device, the module's inputs there too."""
        def hook(m, args, kwargs):
            if owners is not None:
                group.check(owners, recurse=False)
            self.onload(group)
            group.wait()
            return move_inputs(args, self.device), move_inputs(kwargs, self.device)
        self.hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module: nn.Module, group: Group) -> None:
        self.hooks.append(module.register_forward_hook(lambda m, args, out: self.offload(group)))

    def release(self) -> None:
        """Everything off the device (the offloader stays active)."""
        for g in self.groups:
            self.offload(g)

    def __enter__(self):
        return self

# %%
# | export
@add_to_class(Offloader)
def __exit__(self, *exc) -> None:
    self.release()

# %%
# | export
@add_to_class(Offloader)
def close(self) -> None:
    """Remove the hooks and put every weight back on the device it had before; safe to call twice."""
    self.release()
    for h in self.hooks:
        h.remove()
    with torch.no_grad():
        for g in self.groups:
            for t, m in zip(g.tensors, g.masters):
                set_data(t, m.to(g.home))
    for module in self.modules:
        for m in module.modules():
            m._tinydit_offload = None
    self.hooks, self.groups, self.modules = [], [], []

# %% [markdown]
# **Model offload** (diffusers' `enable_model_cpu_offload`): one group per component. Calling a
# component brings it in and sends the previous one out, so the peak is the largest component, and
# each component is copied once per call. Right for a pipeline whose parts run one after the other.

# %%
# | export
def _check_disjoint(models: dict) -> None:
    """No tensor in two components (a module twice, or one inside another)."""
    owner = {}
    for name, m in models.items():
        for t in tensors_of([m]):
            if id(t) in owner and owner[id(t)] != name:
                raise ValueError(f"models: {name!r} shares tensors with {owner[id(t)]!r}; each component must be "
                                 "separate (not the same module twice, not one inside another)")
            owner[id(t)] = name

# %%
# | export
class ModelOffload(Offloader):
    """One component on `device` at a time: calling one (its forward) brings it in and sends out the
    one before. `models`: a dict name -> module (or a list). Peak = the largest component."""

    def __init__(self, models, device="cuda", pin_memory: bool | None = None):
        super().__init__(device, pin_memory)
        if not isinstance(models, (dict, list, tuple)):
            raise TypeError(f"models: expected a dict or list of nn.Modules (name -> module), got {type(models).__name__}")
        models = dict(models) if isinstance(models, dict) else {f"model{i}": m for i, m in enumerate(models)}
        if not models:
            raise ValueError("models: expected at least one module, got none")
        for name, m in models.items():
            _check_offloadable(f"models[{name!r}]", m)
        _check_disjoint(models)
        for name, m in models.items():
            self._adopt(m)
            group = Group(name, tensors_of([m]), self.pin)
            self.groups.append(group)
            self.hooks.append(m.register_forward_pre_hook(self._switch_to(group, m), with_kwargs=True))
        self.active = None

    def _switch_to(self, group: Group, module: nn.Module | None = None):
        def hook(m, args, kwargs):
            if module is not None:
                group.check([module])
            if self.active is not group:
                if self.active is not None:
                    self.offload(self.active)
                self.onload(group)
                self.active = group
            return move_inputs(args, self.device), move_inputs(kwargs, self.device)
        return hook

    def release(self) -> None:
        super().release()
        self.active = None

# %%
# | export
@add_to_class(ModelOffload)
@contextlib.contextmanager
def use(self, name: str):
    """Bring component `name` in for a call that is not its forward (e.g. `vae.decode`)."""
    group = next((g for g in self.groups if g.name == name), None)
    if group is None:
        raise ValueError(f"name: expected one of {[g.name for g in self.groups]}, got {name!r}")
    self._switch_to(group)(None, (), {})
    yield self.device

# %% [markdown]
# **Block offload** (diffusers' group offloading): a transformer is mostly a list of identical blocks.
# Split it into groups of `group_size` blocks; a group comes in when its first block starts and goes
# out when its last block ends. Everything outside the list (embeddings, final layer: the *rest*)
# comes in when one of its modules runs and stays for the whole call. With `stream=True` (CUDA), the
# next group's copy starts on a side stream as soon as the current group starts computing, so the
# copy hides behind compute and the peak is about two groups plus the rest.

# %%
# | export
def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's largest `nn.ModuleList` by parameter count (DiT's `blocks`, T5's `encoder.block`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"model: {type(model).__name__} has no nn.ModuleList of blocks to offload; pass blocks= "
                         "explicitly, or use LeafOffload / ModelOffload")
    return max(lists, key=lambda ml: nbytes(tensors_of([ml])))

# %%
# | export
def _check_blocks(model: nn.Module, blocks) -> nn.ModuleList:
    """`blocks`: a non-empty nn.ModuleList inside `model`."""
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"blocks: expected an nn.ModuleList of the model's blocks, got {type(blocks).__name__}")
    if len(blocks) == 0:
        raise ValueError("blocks: expected a non-empty nn.ModuleList, got an empty one")
    if not any(m is blocks for m in model.modules()):
        raise ValueError("blocks: not a part of model (pass the model's own block list, e.g. model.blocks)")
    return blocks

# %%
# | export
def owners(model: nn.Module, tensors: list[torch.Tensor]) -> list[nn.Module]:
    """The modules that directly own (not through a child) any of `tensors`."""
    ids = {id(t) for t in tensors}
    return [m for m in model.modules() if any(id(t) in ids for t in tensors_of([m], recurse=False))]

# %%
# | export
class BlockOffload(Offloader):
    """Groups of `group_size` blocks on `device` only while they run; the rest of the model while the
    model runs. `stream` (CUDA only; default: on for CUDA) prefetches the next group on a side
    stream. `blocks`: the nn.ModuleList to split (default: the largest one, `find_blocks`)."""

    def __init__(self, model: nn.Module, device="cuda", group_size: int = 1, stream: bool | None = None,
                 blocks: nn.ModuleList | None = None, pin_memory: bool | None = None):
        super().__init__(device, pin_memory)
        _check_offloadable("model", model)
        group_size = check_int("group_size", group_size, minimum=1)
        stream = _check_flag("stream", stream)
        if stream and self.device.type != "cuda":
            raise ValueError(f"stream: prefetching on a side stream needs a CUDA device, got device={str(self.device)!r}")
        self.stream = torch.cuda.Stream(self.device) if (stream is None and self.device.type == "cuda") or stream else None
        blocks = find_blocks(model) if blocks is None else _check_blocks(model, blocks)
        self._adopt(model)
        modules = [blocks[i] for i in range(len(blocks))]  # indexing, not iteration: a step cache yields callables
        chunks = [modules[i:i + group_size] for i in range(0, len(modules), group_size)]
        self.block_groups = [Group(f"blocks {i * group_size}-{i * group_size + len(c) - 1}", tensors_of(c), self.pin)
                             for i, c in enumerate(chunks)]
        in_blocks = {id(t) for g in self.block_groups for t in g.tensors}
        rest = [t for t in tensors_of([model]) if id(t) not in in_blocks]
        self.rest = Group("rest", rest, self.pin)
        self.groups = [self.rest, *self.block_groups]
        rest_owners = owners(model, rest)
        for m in rest_owners:  # the rest comes in with the first of its modules that runs
            self._pre(m, self.rest, rest_owners)
        self.chunks = chunks
        for i, (chunk, group) in enumerate(zip(chunks, self.block_groups)):
            self.hooks.append(chunk[0].register_forward_pre_hook(self._enter_group(i), with_kwargs=True))
            self._post(chunk[-1], group)
        self.hooks.append(model.register_forward_hook(lambda m, args, out: self.offload(self.rest)))

# %%
# | export
@add_to_class(BlockOffload)
def _enter_group(self, i: int):
    def hook(m, args, kwargs):
        group = self.block_groups[i]
        group.check(self.chunks[i])
        self.onload(group)  # a no-op when the previous group prefetched it
        group.wait()
        nxt = self.block_groups[(i + 1) % len(self.block_groups)]
        if self.stream is not None and nxt is not group:
            self.stream.wait_stream(torch.cuda.current_stream())  # the side stream starts after what came before
            self.onload(nxt, self.stream)
        return move_inputs(args, self.device), move_inputs(kwargs, self.device)
    return hook

# %%
# | export
@add_to_class(BlockOffload)
def __enter__(self):
    self.onload(self.rest)
    return self

# %% [markdown]
# **Leaf offload** (diffusers' sequential offload): every module that owns weights is its own group,
# in for its forward and out after it. The smallest peak (about the largest layer), the most copies,
# and no overlap: the slowest mode, for when nothing else fits.

# %%
# | export
class LeafOffload(Offloader):
    """Every module that directly owns weights is on `device` only during its own forward."""

    def __init__(self, model: nn.Module, device="cuda", pin_memory: bool | None = None):
        super().__init__(device, pin_memory)
        _check_offloadable("model", model)
        self._adopt(model)
        for name, m in model.named_modules():
            own = tensors_of([m], recurse=False)
            if own:
                group = Group(name or type(model).__name__, own, self.pin)
                self.groups.append(group)
                self._pre(m, group, [m])
                self._post(m, group)

# %%
# | export
OFFLOAD_MODES = {"model": ModelOffload, "block": BlockOffload, "leaf": LeafOffload}


def offload(model, mode: str = "block", device="cuda", **options) -> Offloader:
    """Offload `model` (for "model": a dict or list of components) in `mode` ("model", "block", "leaf");
    returns the offloader (its `.ledger` counts bytes; `.close()` undoes it)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"mode: expected one of {sorted(OFFLOAD_MODES)}, got {mode!r}")
    return OFFLOAD_MODES[mode](model, device=device, **options)

# %% [markdown]
# ### Checking it: exact outputs, and the bytes on the device
#
# Two checks for each mode. On the CPU (`device="cpu"`), every hook runs and the outputs must equal the
# plain model's **exactly**. On the meta device the ledger tells us how many bytes sat on the device at
# the peak. The model: a DiT-shaped toy with an embedding, 8 blocks and a head.

# %%
class ToyDiT(nn.Module):
    def __init__(self, d=64, depth=8):
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(depth))
        self.head = nn.Linear(d, 16)

    def forward(self, x):
        x = self.embed(x)  # (B, T, d)
        for block in self.blocks:
            x = x + block(x)  # (B, T, d)
        return self.head(x)  # (B, T, 16)


x_toy = torch.randn(2, 10, 16)
peaks = {}
for mode, options in [("model", {}), ("block", {"group_size": 1}), ("block", {"group_size": 4}), ("leaf", {})]:
    model = ToyDiT()
    expected = model(x_toy)
    target = {"toy": model} if mode == "model" else model
    with offload(target, mode, device="cpu", **options) as off:
        torch.testing.assert_close(model(x_toy), expected, rtol=0, atol=0)  # exact: same kernels, same data
    off.close()
    model_meta = ToyDiT()
    with offload({"toy": model_meta} if mode == "model" else model_meta, mode, device="meta", **options) as off, \
            torch.no_grad():  # inference: the meta path swaps tensors, which autograd's references forbid
        out = model_meta(x_toy)
    assert out.is_meta and out.shape == expected.shape
    peaks[f"{mode} {options}"] = off.ledger.peak
    print(f"{mode:5} {str(options):17} peak on device {off.ledger.peak / 1e3:7.1f} kB of "
          f"{nbytes(tensors_of([model_meta])) / 1e3:.1f} kB, {off.ledger.loads:3} copies")
    off.close()

total = nbytes(tensors_of([ToyDiT()]))
block = nbytes(tensors_of([ToyDiT().blocks[0]]))
rest = total - 8 * block
assert peaks["model {}"] == total  # the whole component
assert peaks["block {'group_size': 1}"] == rest + block  # no stream on meta: one block at a time
assert peaks["block {'group_size': 4}"] == rest + 4 * block
assert peaks["leaf {}"] == max(nbytes(tensors_of([m], recurse=False)) for m in ToyDiT().modules())

# %% [markdown]
# Block offload keeps one block of six (plus the embeddings) on the device; leaf offload one layer;
# model offload everything, once per call. The price is the copies: `ledger.loads` per forward. For a
# DiT called 20 times per image, block offload copies the whole model 20 times, model offload once —
# which is why the pipeline of chapter 13 uses model offload for the DiT and block offload only for
# the encoder that does not fit (T5-XXL: 9.5 GB in bf16, run once per new prompt). On a GPU,
# `benchmarks/offload.py` measures both (peak memory, seconds per prompt, GB/s pinned vs pageable).

# %% [markdown]
# ## 2. Precision: fewer bits per weight
#
# A float has a sign, an exponent (the range) and a mantissa (the precision). Halving the bits
# halves the memory and the bytes each matmul reads; what we lose depends on which part shrinks:

# %%
# | export precision
"""Weights in fewer bits (chapter 12): dtype names, fp8 storage with a per-layer upcast at forward
time (diffusers' layerwise casting), which modules stay in the compute dtype per model, and which
attention kernel runs for which inputs."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tinydit.attention import _check_qkv
from tinydit.checkpoint import resolve_dtype
from tinydit.offload import nbytes, set_data, tensors_of


FP8 = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}  # name -> torch attribute (torch >= 2.1)


def fp8_dtype(name: str) -> torch.dtype:
    """The float8 storage dtype `name` ("fp8_e4m3": more precision; "fp8_e5m2": more range)."""
    if not isinstance(name, str) or name not in FP8:
        raise ValueError(f"storage_dtype: expected one of {sorted(FP8)}, got {name!r}")
    if not hasattr(torch, FP8[name]):
        raise RuntimeError(f"storage_dtype: this torch ({torch.__version__}) has no {FP8[name]}; fp8 storage needs "
                           "torch >= 2.1")
    return getattr(torch, FP8[name])

# %%
# | export precision
def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return model

# %%
# | export precision
def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (fp8 layers count 1 byte a value)."""
    return nbytes(tensors_of([_check_model(model)]))

# %%
from tinydit.precision import FP8, fp8_dtype, weight_bytes  # noqa: E402


w = torch.randn(512, 512) * 0.05  # a weight matrix's typical scale
print(f"{'dtype':9} {'bits':>4} {'largest':>9} {'eps':>9} {'weight error (rel.)':>20}")
round_trip = {}
for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                    ("fp8_e4m3", fp8_dtype("fp8_e4m3")), ("fp8_e5m2", fp8_dtype("fp8_e5m2"))]:
    info = torch.finfo(dtype)
    round_trip[name] = ((w.to(dtype).float() - w).norm() / w.norm()).item()  # relative error of a round trip
    print(f"{name:9} {info.bits:4} {info.max:9.3g} {info.eps:9.3g} {round_trip[name]:20.2e}")
assert round_trip["fp32"] == 0 < round_trip["fp16"] < round_trip["bf16"] < round_trip["fp8_e4m3"] < round_trip["fp8_e5m2"]

# %% [markdown]
# - **bf16** keeps fp32's 8 exponent bits: the same range, 3 significant digits. Training and
#   inference are safe in it; it is the default on GPUs that have it.
# - **fp16** has 5 exponent bits: more digits, but nothing above 65,504. Activations that grow large —
#   the SDXL VAE's decoder is the famous case — overflow to `inf`, then NaN. Chapter 02's VAE detects
#   that, warns once, and decodes again in fp32 (below).
# - **fp8** (e4m3 / e5m2) is *storage*: ~6 % error per weight, too coarse to compute in without
#   scaled-matmul kernels, but fine to **store** weights in and upcast each layer to bf16 just before
#   it runs — half of bf16's memory. That is diffusers' *layerwise casting*, and our next export.
#
# Which layers must not be stored in fp8? The ones whose small errors are amplified: normalisation
# parameters, the embeddings of the timestep and position, the patch embedding and the final
# projection (diffusers skips `pos_embed`, `patch_embed`, `norm`, `proj_in`, `proj_out`). Each model
# declares its list.

# %%
# | export precision
SKIP_LAYERWISE = {  # module-name patterns kept in the compute dtype, per model class
    "DiT": ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "norm", "final_layer"),
    "TextDiT": ("pos_embed", "x_embedder", "t_embedder", "t_block", "y_embedder", "csize_embedder", "ar_embedder",
                "pooled_embedder", "norm", "final_layer"),
    "AutoencoderKL": ("conv_in", "conv_out", "norm", "quant_conv"),
    "default": ("pos_embed", "patch_embed", "embed", "norm", "proj_in", "proj_out"),
}
CASTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose weights fp8 can store


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The SKIP_LAYERWISE entry of the model's class (or the default)."""
    return SKIP_LAYERWISE.get(type(model).__name__, SKIP_LAYERWISE["default"])

# %%
# | export precision
def _check_skip(skip) -> tuple[str, ...]:
    """One pattern or a sequence of regular expressions (strings)."""
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (tuple, list)) or not all(isinstance(p, str) for p in skip):
        raise TypeError(f"skip: expected a regular expression or a list of them (module names), got {skip!r}")
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"skip: invalid regular expression {pattern!r} ({e})") from None
    return tuple(skip)

# %%
# | export precision
def _castable_layers(model: nn.Module, skip: tuple[str, ...], storage: torch.dtype) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv layers to store in fp8: not skipped, and with weights inside its range."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, CASTABLE)]
    if not candidates:
        raise ValueError(f"model: {type(model).__name__} has no Linear/Conv layer whose weights fp8 could store")
    layers = [(n, m) for n, m in candidates if not any(re.search(p, n) for p in skip)]
    if not layers:
        raise ValueError(f"skip: {skip!r} matches every one of the {len(candidates)} Linear/Conv layers; nothing "
                         "would be stored in fp8")
    limit = torch.finfo(storage).max
    for name, m in layers:
        if any(t.is_meta for t in tensors_of([m], recurse=False)):
            continue  # no values to check (a model built to count bytes)
        big = max(float(t.detach().abs().max()) for t in tensors_of([m], recurse=False))
        if big > limit:
            raise ValueError(f"model: layer {name!r} has weights up to {big:.4g}, beyond {storage}'s range ({limit:g}); "
                             "skip it (skip=...) or store in fp8_e5m2")
    return layers

# %%
# | export precision
class LayerwiseCasting:
    """Store the weights of every Linear / Conv layer in `storage_dtype` (fp8) and upcast each layer to
    `compute_dtype` right before its forward, dropping the upcast copy after it. Layers whose name
    matches `skip` (default: the model's SKIP_LAYERWISE) and all other modules are held in
    `compute_dtype`. Weight memory ≈ 1 byte a value; `close()` leaves the model in `compute_dtype`."""

    def __init__(self, model: nn.Module, storage_dtype: str = "fp8_e4m3", compute_dtype="bf16",
                 skip: tuple[str, ...] | None = None):
        self.storage = fp8_dtype(storage_dtype)
        self.compute = resolve_dtype(compute_dtype, "compute_dtype")
        if self.compute not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype: expected fp32, fp16 or bf16, got {compute_dtype!r}")
        if getattr(_check_model(model), "_tinydit_casting", None) is not None:
            raise ValueError("model: layerwise casting is already on; call close() on it first")
        skip = skip_patterns(model) if skip is None else _check_skip(skip)
        self.layers = _castable_layers(model, skip, self.storage)  # every check before the model changes
        model.to(self.compute)
        self.model, self.hooks = model, []
        for _, m in self.layers:
            with torch.no_grad():
                for t in tensors_of([m], recurse=False):
                    set_data(t, t.data.to(self.storage))
            self.hooks.append(m.register_forward_pre_hook(self._upcast))
            self.hooks.append(m.register_forward_hook(self._downcast))
        model._tinydit_casting = self

    def _upcast(self, m: nn.Module, args) -> None:
        if not hasattr(m, "_fp8"):  # still there when the last forward raised before _downcast ran
            m._fp8 = [t.data for t in tensors_of([m], recurse=False)]  # the stored copies, kept aside
        for t, stored in zip(tensors_of([m], recurse=False), m._fp8):
            set_data(t, stored.to(self.compute))

    def _downcast(self, m: nn.Module, args, out) -> None:
        for t, stored in zip(tensors_of([m], recurse=False), m._fp8):
            set_data(t, stored)  # the bf16 copy is dropped, nothing is re-rounded
        del m._fp8

# %%
# | export precision
@add_to_class(LayerwiseCasting)
def close(self) -> None:
    for h in self.hooks:
        h.remove()
    with torch.no_grad():
        for _, m in self.layers:
            for t in tensors_of([m], recurse=False):
                set_data(t, t.data.to(self.compute))
    self.model._tinydit_casting, self.hooks, self.layers = None, [], []

# %% [markdown]
# ### The book model in four precisions
#
# The same EMA weights, loaded in fp32, bf16 and fp16 (every loader takes `dtype=` and converts
# tensor by tensor while reading, so a large model never has an fp32 copy in memory), and stored in
# fp8 with layerwise casting. For each: the weight bytes, the error of one forward against fp32, the
# CPU time of a forward at batch 16, and the adherence of the images (chapter 10's reader).

# %%
from tinydit import evaluate  # noqa: E402
from tinydit.checkpoint import BOOK_MODEL_DIR  # noqa: E402
from tinydit.precision import LayerwiseCasting  # noqa: E402
from tinydit.text import load_book_text_encoder  # noqa: E402
from tinydit.textdit import TextDiT  # noqa: E402
from tinydit.train import book_pipeline  # noqa: E402
from tinydit.vae import load_book_vae  # noqa: E402


torch.set_num_threads(1)  # a 4 M-parameter model: one thread beats two contending
vae, encoder = load_book_vae(), load_book_text_encoder()
N_EVAL = 8 if FAST else 100  # prompts per group


def draw_with(model):
    """evaluate's generate(captions, seeds) for `model`: chapter 13's pipeline, the book encoder and VAE."""
    return evaluate.pipeline_generator(book_pipeline(model, text_encoder=encoder, vae=vae))


def book_model(precision: str):
    """The shipped book model in `precision` ("fp32", "bf16", "fp16" or "fp8": e4m3 storage, bf16 compute)."""
    dtype = "bf16" if precision == "fp8" else precision
    model = TextDiT.from_pretrained(BOOK_MODEL_DIR, dtype=dtype).eval()
    if precision == "fp8":
        LayerwiseCasting(model, "fp8_e4m3", compute_dtype="bf16")
    return model


emb = encoder(["a red circle above a blue square"] * 16)
x16, t16 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((16,), 500)
with torch.no_grad():
    reference = book_model("fp32")(x16, t16, context=emb.tokens, context_mask=emb.mask)
precision_rows = {}
for precision in ["fp32", "bf16", "fp16", "fp8"]:
    model = book_model(precision)
    with torch.no_grad():
        out = model(x16, t16, context=emb.tokens, context_mask=emb.mask).float()
        start = time.perf_counter()
        for _ in range(3):
            model(x16, t16, context=emb.tokens, context_mask=emb.mask)
        seconds = (time.perf_counter() - start) / 3
    report = evaluate.evaluate(draw_with(model), n=N_EVAL, disable=True)
    precision_rows[precision] = dict(mb=weight_bytes(model) / 1e6, error=((out - reference).norm() / reference.norm()).item(),
                                     ms=1e3 * seconds, pair=report.accuracy["held_out"]["pair"],
                                     both=report.accuracy["two"]["both"])
    print(f"{precision:5} {precision_rows[precision]['mb']:6.2f} MB  error {precision_rows[precision]['error']:.2e}  "
          f"forward {precision_rows[precision]['ms']:6.1f} ms  HELD_OUT pair {100 * precision_rows[precision]['pair']:5.1f} %  "
          f"two objects {100 * precision_rows[precision]['both']:5.1f} %")

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
names = list(precision_rows)
for ax, key, label in zip(axes, ["mb", "ms", "pair"], ["weights (MB)", "CPU forward, batch 16 (ms)",
                                                        "HELD_OUT pair accuracy"]):
    ax.bar(names, [precision_rows[n][key] for n in names], color=["#555", "#2a7", "#27a", "#a52"])
    ax.set_title(label)
fig.suptitle("the book model: memory, CPU time and adherence per precision")
plt.tight_layout()
plt.show()

# %%
rows = precision_rows
assert rows["fp8"]["mb"] <= 0.52 * rows["bf16"]["mb"] + 0.35  # the skipped embeddings/norms stay bf16 (0.3 MB)
assert rows["bf16"]["mb"] <= 0.5 * rows["fp32"]["mb"] + 1e-6
# measured errors vs fp32: fp16 ~1e-3, bf16 ~7e-3, fp8 ~5e-2; a 3x margin each
assert rows["fp16"]["error"] < 3e-3 and rows["bf16"]["error"] < 2e-2 and rows["fp8"]["error"] < 0.15
assert max(abs(rows[p]["pair"] - rows["fp32"]["pair"]) for p in rows) <= (0.5 if FAST else 0.1)


# %% [markdown]
# ## 3. Step caching: skip the deep blocks when nothing changed
#
# Between two sampler steps the input changes a little, and so does every block's output. The
# *first-block cache* (ParaAttention's FBCache; TeaCache, Liu et al. 2024, uses the same signal on the
# timestep-modulated input) runs the first block, compares its residual (output − input) with the one
# of the last fully computed step, and when the relative change is below a threshold, skips every
# other block and adds the residual they produced last time. The whole rule:

# %%
def lesson_step(blocks, x, cache, threshold):
    """One forward through `blocks` with a first-block cache (`cache`: a dict kept across steps)."""
    h = blocks[0](x)  # (B, T, D)
    r1 = h - x  # the first block's residual
    prev = cache.get("r1")
    if prev is not None and ((r1 - prev).abs().mean() / prev.abs().mean()) < threshold:
        return h + cache["deep"], True  # skipped: the deep blocks' residual of the last full step
    out = h
    for block in blocks[1:]:
        out = block(out)  # (B, T, D)
    cache.update(r1=r1, deep=out - h)
    return out, False


toy_blocks = [nn.Linear(16, 16) for _ in range(4)]
cache, x = {}, torch.randn(2, 16)
full, skipped1 = lesson_step(toy_blocks, x, cache, 0.1)  # the first call always computes
near, skipped2 = lesson_step(toy_blocks, x + 1e-4, cache, 0.1)  # almost the same input: reuse
far, skipped3 = lesson_step(toy_blocks, -x, cache, 0.1)  # a different input: compute
assert (skipped1, skipped2, skipped3) == (False, True, False)
torch.testing.assert_close(near, full, atol=1e-3, rtol=0)

# %% [markdown]
# The production version must not change the model's code either. It replaces the model's block
# list by a `CachedBlocks` list holding the **same** block modules (same parameters, same state-dict
# keys) whose iteration yields small callables applying the rule; any model whose forward loops
# `for block in self.blocks` gets the cache. `reset()` starts a new image.

# %%
# | export stepcache
"""Step caching for DiTs (chapter 12): the first-block cache. When the first block's residual moved
less than `threshold` (relative L1) since the last fully computed step, the other blocks are skipped
and their last residual reused (ParaAttention's FBCache; the TeaCache rule, Liu et al. 2024)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tinydit.offload import find_blocks
from tinydit.validation import check_float, check_int


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old| (one device sync per step)."""
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()

# %%
# | export stepcache
class CachedBlocks(nn.ModuleList):
    """The model's blocks, the same modules under the same keys; iterating yields cached calls."""

    def __init__(self, blocks: nn.ModuleList, cache: StepCache):
        super().__init__(list(blocks))
        object.__setattr__(self, "cache", cache)  # not a submodule

    def __iter__(self):
        blocks = list(super().__iter__())
        yield partial(self.cache.first, blocks[0])
        for i, block in enumerate(blocks[1:], start=1):
            yield partial(self.cache.deep, block, i == len(blocks) - 1)

# %%
# | export stepcache
class StepCache:
    """A first-block cache on `model.blocks` (or `blocks=`, an nn.ModuleList inside it). `threshold`: the
    largest relative change of the first block's residual that still reuses the deep blocks (0: never);
    `warmup`: calls after each `reset()` that always compute. `close()` puts the original list back."""

    def __init__(self, model: nn.Module, threshold: float = 0.1, warmup: int = 1, blocks: nn.ModuleList | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.threshold = check_float("threshold", threshold, minimum=0)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.original = find_blocks(model) if blocks is None else blocks
        if not isinstance(self.original, nn.ModuleList) or len(self.original) == 0:
            raise ValueError(f"blocks: expected a non-empty nn.ModuleList, got {self.original!r}")
        self.parent, self.attr = next(((m, n) for m in model.modules() for n, c in m.named_children()
                                       if c is self.original), (None, None))
        if self.parent is None:
            raise ValueError("blocks: not a child list of model")
        if isinstance(self.original, CachedBlocks):
            raise ValueError("model: a step cache is already on; call close() on it first")
        setattr(self.parent, self.attr, CachedBlocks(self.original, self))
        self.depth, self.calls, self.skipped = len(self.original), 0, 0
        self.reset()

    def reset(self) -> None:
        """Forget the cached residuals (a new image, or a new batch)."""
        self.r1 = self.start = self.deep_residual = None
        self.since_reset, self.skip = 0, False

    def first(self, block: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = block(x, *args, **kwargs)  # (B, T, D)
        r1 = h - x
        fits = self.r1 is not None and self.r1.shape == r1.shape and self.since_reset >= self.warmup
        fits = fits and self.deep_residual is not None  # (None when the last full call raised midway)
        self.skip = fits and self.depth > 1 and relative_change(r1, self.r1) < self.threshold
        if not self.skip:
            self.r1, self.start = r1, h
        self.calls, self.skipped, self.since_reset = self.calls + 1, self.skipped + self.skip, self.since_reset + 1
        return h

# %%
# | export stepcache
@add_to_class(StepCache)
def deep(self, block: nn.Module, last: bool, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.skip:
        return x + self.deep_residual if last else x  # (B, T, D): the deep blocks' last residual
    out = block(x, *args, **kwargs)  # (B, T, D)
    if last:
        self.deep_residual = out - self.start
    return out

# %%
# | export stepcache
@add_to_class(StepCache)
def saved(self) -> float:
    """The fraction of block evaluations skipped so far."""
    return self.skipped * (self.depth - 1) / max(1, self.calls * self.depth)

# %%
# | export stepcache
@add_to_class(StepCache)
def close(self) -> None:
    setattr(self.parent, self.attr, self.original)

# %%
# | export stepcache
@add_to_class(StepCache)
def __enter__(self) -> StepCache:
    return self

# %%
# | export stepcache
@add_to_class(StepCache)
def __exit__(self, *exc) -> None:
    self.close()

# %%
from tinydit.stepcache import StepCache  # noqa: E402


model = book_model("fp32")
emb2 = encoder(["a red circle above a blue square", ""])
args = dict(context=emb2.tokens, context_mask=emb2.mask)
with torch.no_grad():
    plain = [model(x16[:2], torch.full((2,), t), **args) for t in (500, 499, 100)]
    with StepCache(model, threshold=0.05) as cache:
        cached = [model(x16[:2], torch.full((2,), t), **args) for t in (500, 499, 100)]
        assert [cache.calls, cache.skipped] == [3, 1]  # t=499 is next to t=500: reused; t=100 is not
        assert sorted(model.state_dict()) == sorted(book_model("fp32").state_dict())  # same keys while on
torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=0)  # computed steps are exact
torch.testing.assert_close(cached[2], plain[2], rtol=0, atol=0)
print(f"reused step: relative error {((cached[1] - plain[1]).norm() / plain[1].norm()).item():.2e}")
assert isinstance(model.blocks, nn.ModuleList) and not hasattr(model.blocks, "cache")  # close() put the list back

# %% [markdown]
# ### Evaluations saved against adherence lost
#
# The book model with DPM++ 2M at 20 steps and guidance 2, for thresholds from 0 (never skip) up.
# "Saved" counts block evaluations (a skipped step still runs 1 of the 6 blocks, the embeddings and the
# final layer); adherence is chapter 10's reader on HELD_OUT pairs and two-object scenes.

# %%
thresholds = [0.0, 0.05, 0.1, 0.2, 0.3] if FAST else [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5]
cache_curve = []
for threshold in thresholds:
    model = book_model("fp32")
    draw = draw_with(model)
    with StepCache(model, threshold) as cache:
        def generate(captions, seeds, draw=draw, cache=cache):
            cache.reset()  # a new batch of images: nothing to reuse
            return draw(captions, seeds)

        start = time.perf_counter()
        report = evaluate.evaluate(generate, n=N_EVAL, disable=True)
        seconds = time.perf_counter() - start
    cache_curve.append(dict(threshold=threshold, saved=cache.saved(), seconds=seconds,
                            pair=report.accuracy["held_out"]["pair"], both=report.accuracy["two"]["both"]))
    print(f"threshold {threshold:4.2f}: {100 * cache.saved():5.1f} % of block evaluations skipped, "
          f"{seconds:5.1f} s, HELD_OUT pair {100 * cache_curve[-1]['pair']:5.1f} %, "
          f"two objects {100 * cache_curve[-1]['both']:5.1f} %")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([100 * r["saved"] for r in cache_curve], [100 * r["pair"] for r in cache_curve], "o-", label="HELD_OUT pair")
ax.plot([100 * r["saved"] for r in cache_curve], [100 * r["both"] for r in cache_curve], "s-", label="two objects: both")
for r in cache_curve:
    ax.annotate(f"{r['threshold']:g}", (100 * r["saved"], 100 * r["pair"]), textcoords="offset points", xytext=(3, 4))
ax.set_xlabel("block evaluations skipped (%)")
ax.set_ylabel("accuracy (%)")
ax.set_title("first-block cache on the book model (labels: threshold)")
ax.legend()
plt.show()

# %%
assert cache_curve[0]["saved"] == 0  # threshold 0 never skips
assert all(a["saved"] <= b["saved"] for a, b in zip(cache_curve, cache_curve[1:]))  # more threshold, more skipped
assert cache_curve[-1]["saved"] > 0.2  # measured: a large threshold skips a third or more


# %% [markdown]
# Skipping is nearly free here: the book model's adherence does not move until most deep-block
# evaluations are skipped, because a 20-step DPM++ 2M trajectory changes slowly in its middle. The
# default of `StepCache` (0.1) is conservative; chapter 13's pipeline leaves the cache off unless asked.
#
# ## 4. Attention kernels and compilation
#
# `F.scaled_dot_product_attention` dispatches to one of several kernels — flash, memory-efficient,
# cuDNN, or the plain math — depending on the device, the dtype, the head size and whether there is
# a mask. Which one ran is invisible, yet it decides speed and memory. We ask each backend in turn:

# %%
# | export precision
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"backend: expected one of {SDPA_BACKENDS}, got {name!r}")
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]

# %%
# | export precision
def sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, bool]:
    """Which SDPA kernels accept these inputs (each tried alone), and "auto": the one torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _check_qkv(q, k, v)
    accepts = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel([_sdp_backend(name)]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            accepts[name] = True
        except RuntimeError:  # "No available kernel": this backend refuses these inputs
            accepts[name] = False
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None))
    auto = next((n for n in SDPA_BACKENDS if _sdp_backend(n) == choice), "math")
    return {**accepts, "auto": auto}

# %%
# | export precision
@contextmanager
def pin_sdpa(backend: str):
    """Run the block with one SDPA kernel only (an error where it refuses the inputs, never a silent fallback)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdp_backend(backend)]):
        yield

# %%
from tinydit.precision import pin_sdpa, sdpa_backends  # noqa: E402


print(f"{'dtype':8} {'mask':5} {'head':>4}  " + " ".join(f"{n:9}" for n in ["flash", "efficient", "cudnn", "math", "auto"]))
for dtype in [torch.float32, torch.bfloat16]:
    for masked in [False, True]:
        for head in [32, 64, 256]:
            q = torch.randn(2, 4, 16, head, dtype=dtype)
            mask = torch.ones(2, 1, 16, 16, dtype=torch.bool) if masked else None
            b = sdpa_backends(q, q, q, mask)
            print(f"{str(dtype)[6:]:8} {str(masked):5} {head:4}  " + " ".join(f"{str(b[n]):9}" for n in
                                                                            ["flash", "efficient", "cudnn", "math", "auto"]))
q = torch.randn(2, 4, 16, 32)
with pin_sdpa("math"):
    pinned = F.scaled_dot_product_attention(q, q, q)
torch.testing.assert_close(pinned, F.scaled_dot_product_attention(q, q, q), atol=1e-5, rtol=0)
assert sdpa_backends(q, q, q)["math"]  # the math kernel accepts everything

# %% [markdown]
# On this CPU, flash runs for everything (PyTorch ships a CPU flash kernel). On an H100/H200 the
# table is the one to read before a benchmark: with a boolean padding mask the flash kernel refuses
# and the memory-efficient or cuDNN kernel runs instead (`benchmarks/precision.py` prints it there).
#
# **Compilation.** `torch.compile` traces the forward into one graph and fuses the elementwise
# operations between matmuls (the modulation, the gates, GELU). It needs a forward without
# Python-level decisions on tensor values: every value check (NaN in the input, an empty mask row)
# would be a graph break *and* a device→host sync. Chapters 05–07 run those checks only in eager
# calls (`torch.compiler.is_compiling()`); while writing this chapter, `torch._dynamo.explain` found
# one more, in the timestep embedding's finiteness check for float times, now skipped when compiling
# too. The book model's forward, as the samplers call it:

# %%
model = book_model("fp32")
x_t, t_t = torch.randn(4, 4, 8, 8), torch.tensor([999.0, 500.5, 10.25, 0.0])  # float times, as samplers pass
emb4 = encoder(["a red circle", "a blue square above a green triangle", "", "a tiny purple star"])
torch._dynamo.reset()
explanation = torch._dynamo.explain(model)(x_t, t_t, context=emb4.tokens, context_mask=emb4.mask)
print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}")
assert explanation.graph_break_count == 0

# %%
captions = ["a red circle above a blue square"] * 8
eager_model, compiled_model = book_model("fp32"), book_model("fp32")
compiled_model.compile()  # in place: still a TextDiT, so the pipeline takes it
times = {}
for name, m in [("eager", eager_model), ("compiled (first call)", compiled_model), ("eager", eager_model),
                ("compiled", compiled_model)]:
    start = time.perf_counter()
    images = draw_with(m)(captions, list(range(8)))
    times[name] = time.perf_counter() - start
    if name == "eager":
        eager_images = images
print("  ".join(f"{k}: {v:.2f} s" for k, v in times.items()), f"-> compiled / eager = {times['compiled'] / times['eager']:.2f}")
torch.testing.assert_close(images, eager_images, atol=1 / 127.5 + 1e-6, rtol=0)  # 8-bit pictures: ~2e-6 apart before rounding, at most one level after

# %% [markdown]
# On this 2-core CPU the compiled sampling loop of the book model takes about two thirds of the eager
# time once compiled (the first call pays ~15–25 s of compilation); the images agree to 1e-5. On a GPU
# the gain comes from the same fusions plus CUDA graphs (`mode="reduce-overhead"`); `benchmarks/precision.py`
# compares tinydit and diffusers compiled on the same weights.
#
# ## Summary
#
# - **Offloading** with hooks, the model's code untouched (`tinydit.offload`): `ModelOffload` (one
#   component at a time), `BlockOffload` (groups of blocks, the next prefetched on a side CUDA stream
#   from pinned memory) and `LeafOffload` (every layer alone). CPU masters make "sending back" free. On
#   the meta device the ledger is exact: a DiT-shaped toy of 8 blocks holds 100 % (model), 13 % (block)
#   or 6 % (leaf) of its weights on the device at the peak; outputs equal the plain model's exactly.
#   `DualTextEncoder(..., offload=BlockOffload)` streams T5 block by block.
# - **Precision** (`tinydit.precision`): every loader takes `dtype=` and converts while reading; fp8
#   storage with per-layer upcast (`LayerwiseCasting`) stores the book model in 4.3 MB against 7.9 MB
#   in bf16 and 15.7 MB in fp32, with adherence unchanged at the measured sample size; which SDPA
#   kernel runs for which inputs (`sdpa_backends`) and how to pin one (`pin_sdpa`).
# - **Step caching** (`tinydit.stepcache.StepCache`): the first-block cache skips up to ~57 % of block
#   evaluations of a 20-step DPM++ 2M run on the book model before adherence moves.
# - **Compilation**: the book model's forward is one graph (`torch._dynamo.explain`: 0 breaks, float
#   times included), and the compiled sampling loop is faster on this CPU.
# - Not measured here (no GPU in this session): pinned-memory bandwidth, stream overlap, fp8 speed on
#   tensor cores, CUDA graphs. `benchmarks/offload.py` and `benchmarks/precision.py` print them on a GPU.
#
# ## Exercises
#
# 1. Add a `disk` mode to `Group` (masters in a safetensors file read with `safe_open` per group): how
#    much slower is block offload of T5-base from disk than from CPU memory, per prompt?
# 2. `BlockOffload` prefetches one group ahead. Make the look-ahead a parameter and measure, on a GPU,
#    the peak memory and the time per forward for look-ahead 0, 1 and 2.
# 3. TeaCache rescales the first-block distance with a polynomial fitted per model and *accumulates*
#    it across skipped steps. Implement the accumulation in `StepCache` and compare its curve with
#    the one above.
# 4. Store the book model in `fp8_e5m2` instead of `fp8_e4m3`. Which is closer to fp32, and why
#    (look at the weights' range against each format's largest value and epsilon)?
# 5. Compile the book model with `mode="max-autotune-no-cudagraphs"` and with `dynamic=True`; how do
#    compile time and the sampling loop's time change on your machine?
