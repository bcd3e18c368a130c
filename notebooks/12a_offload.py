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
# # 12a · Efficiency, part 1: models that do not fit (offloading)
#
# Chapters 05–11 built an engine that runs the book model in seconds on a laptop. The real models it
# loads do not fit that easily: T5-XXL alone is 4.8 B parameters (9.5 GB in bf16), PixArt-Σ's DiT
# 0.6 B, Flux's 12 B. This chapter makes them fit and run faster, and **measures what each trick
# costs and saves**. It takes two sittings: this one is offloading, the second (12b) the rest:
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
# This part exports `tinydit.offload` (12b: `tinydit.precision`, `tinydit.stepcache`). Everything runs on a
# CPU; the CUDA-only parts (streams, pinned memory, fp8 matmul speed) are written for a GPU and
# measured by `benchmarks/offload.py` and `benchmarks/precision.py` where one is available.

# %%
# | default_exp offload
# %%
import os

from tinydit.notebook import add_to_class  # long classes are built across cells (chapter 00)


FAST = os.environ.get("TINYDIT_FAST") == "1"  # CI sets this: same code, smaller numbers

# %%

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

from tinydit.validation import check_device, check_int


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
        self.device = check_device("device", device, allow_meta=True)
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
# **Looking at it.** The peak bytes on the device for each mode, as a share of the whole model:

# %%
import matplotlib.pyplot as plt


plt.figure(figsize=(6, 2.6))
plt.barh(list(peaks), [100 * v / total for v in peaks.values()], color="tab:blue")
plt.xlabel("peak weights on the device, % of the model")
plt.title("offloading the DiT-shaped toy (meta device, exact ledger)")
plt.gca().invert_yaxis()
plt.show()

# %% [markdown]
# ## Summary
#
# - **Offloading** with hooks, the model's code untouched (`tinydit.offload`): `ModelOffload` (one
#   component at a time), `BlockOffload` (groups of blocks, the next prefetched on a side CUDA stream
#   from pinned memory) and `LeafOffload` (every layer alone). CPU masters make "sending back" free. On
#   the meta device the ledger is exact: a DiT-shaped toy of 8 blocks holds 100 % (model), 13 % (block)
#   or 6 % (leaf) of its weights on the device at the peak; outputs equal the plain model's exactly.
#   `DualTextEncoder(..., offload=BlockOffload)` streams T5 block by block.
# - Not measured here (no GPU): pinned-memory bandwidth and stream overlap; `benchmarks/offload.py`
#   prints them on a GPU.
#
# ## Exercises
#
# 1. Add a `disk` mode to `Group` (masters in a safetensors file read with `safe_open` per group): how
#    much slower is block offload of T5-base from disk than from CPU memory, per prompt?
# 2. `BlockOffload` prefetches one group ahead. Make the look-ahead a parameter and measure, on a GPU,
#    the peak memory and the time per forward for look-ahead 0, 1 and 2.
