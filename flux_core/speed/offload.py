"""Block streaming: a model's big blocks live in CPU memory and visit the compute device one at a time.

Each streamed block's parameters and buffers are packed once into one flat host buffer (pinned when
CUDA is there, so the copy is an asynchronous DMA). Two device slots, each as large as the largest
block, take turns: while block i runs from one slot, block i+1 is copied into the other on a side
stream. Between blocks the module's tensors point back into the host buffer, so state_dict() and any
code that looks at the weights sees ordinary CPU tensors, and the device holds at most two blocks.

CUDA synchronisation, per slot:
* "ready" is recorded on the copy stream after a copy; the compute stream waits on it before the block;
* "done" is recorded on the compute stream after the block; the copy stream waits on it before it
  overwrites the slot, so a copy never races kernels still reading the previous block.
The slots are fixed buffers, never handed back to the caching allocator while in use, so no
record_stream bookkeeping is needed. On a CPU the same code runs synchronously with the slots as
separate CPU buffers, which is what lets the tests see every block come in and go out.

With three or more streamed blocks every block is copied again on every pass, so weights changed in
place in the host buffers (state_dict() views) take effect at once; with one or two, the slots keep
them, so call release() after changing weights.

Works for any block whose tensors are plain registered parameters and buffers, of any dtype (bf16,
fp8, int8 weights with their scales, packed GGUF bytes). Attach only to blocks called through
module __call__ (hooks), and do not call .to() on a model while a streamer is attached.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

ALIGN = 256  # byte alignment of each tensor inside a packed buffer (vectorised kernels want it)


@dataclass
class _Entry:
    owner: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


def _views(flat: torch.Tensor, entries: list[_Entry]) -> list[torch.Tensor]:
    return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def _point(entries: list[_Entry], tensors: list[torch.Tensor]) -> None:
    """Make each module tensor of a block refer to the given storage (in place for parameters, so
    references held elsewhere to the Parameter objects stay valid)."""
    for e, t in zip(entries, tensors):
        if e.is_param:
            e.owner._parameters[e.name].data = t
        else:
            e.owner._buffers[e.name] = t


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan_arenas(sizes: Sequence[int]) -> list[tuple[int, list[tuple[int, int]]]]:
    """Group block buffers into power-of-two arenas: [(arena bytes, [(block index, offset), ...]), ...].

    torch's pinned-memory allocator rounds every allocation up to a power of two, so one buffer per block
    would pin up to twice the weights (a 648 MiB double block takes 1 GiB). First-fit decreasing into
    arenas of each power-of-two size, each arena then shrunk to the power of two its content needs; the
    cheapest packing wins (FLUX.1's 57 blocks: 24 GiB pinned for 22.0 GiB of weights).
    """
    aligned = [max(n + -n % ALIGN, ALIGN) for n in sizes]
    if not aligned:
        return []
    order = sorted(range(len(aligned)), key=lambda i: -aligned[i])
    best = None
    arena = _pow2(max(aligned))
    while True:
        bins: list[list] = []  # [used, members]
        for i in order:
            target = next((b for b in bins if arena - b[0] >= aligned[i]), None)
            if target is None:
                target = [0, []]
                bins.append(target)
            target[1].append((i, target[0]))
            target[0] += aligned[i]
        packing = [(_pow2(used), members) for used, members in bins]
        cost = sum(size for size, _ in packing)
        if best is None or cost < best[0]:
            best = (cost, packing)
        if arena >= sum(aligned):
            return best[1]
        arena *= 2


def _pinned(nbytes: int) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:  # pinned memory is page-locked RAM and can run out
        warnings.warn(f"could not pin {nbytes / 2**30:.2f} GiB of host memory ({exc}); streaming from "
                      "pageable memory, copies will not overlap compute")
        return torch.empty(nbytes, dtype=torch.uint8)


class _Packed:
    """One block: where each of its tensors sits in one flat host buffer."""

    def __init__(self, module: nn.Module, skip: Callable[[str], bool]):
        self.module = module
        self.entries: list[_Entry] = []
        self._sources, seen, offset = [], set(), 0
        for mod_name, mod in module.named_modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    full = f"{mod_name}.{name}" if mod_name else name
                    if t is None or skip(full):
                        continue
                    if id(t) in seen:
                        raise ValueError(f"tensor {full} is shared inside one block; cannot stream it")
                    if type(t.data) is not torch.Tensor:
                        raise TypeError(f"block streaming moves plain tensors; {full} is a {type(t.data).__name__}")
                    seen.add(id(t))
                    offset += -offset % ALIGN
                    nbytes = t.numel() * t.element_size()
                    self.entries.append(_Entry(mod, name, is_param, offset, nbytes, t.dtype, t.shape))
                    self._sources.append(t)
                    offset += nbytes
        self.nbytes = offset

    def fill(self, host: torch.Tensor) -> None:
        """Copy the block's tensors into `host` and make the module use them there."""
        self.host = host
        self.host_views = _views(host, self.entries)
        with torch.no_grad():
            for view, src in zip(self.host_views, self._sources):
                view.copy_(src)
        self._sources = None
        for e, view in zip(self.entries, self.host_views):
            param = e.owner._parameters.get(e.name) if e.is_param else None
            if param is not None and param.is_inference():  # loaded under inference mode: .data cannot swap
                e.owner._parameters[e.name] = nn.Parameter(view, requires_grad=False)
        _point(self.entries, self.host_views)  # the original tensors are freed here

    def managed(self) -> set[tuple[int, str]]:
        return {(id(e.owner), e.name) for e in self.entries}


class BlockStreamer:
    """Streams `blocks` (called in this order) through `device`; see the module docstring.

    skip(name) -> True leaves a tensor out of streaming (name relative to its block); such tensors, and
    everything outside the blocks, are placed by move_rest(). cyclic: after the last block, prefetch the
    first (the transformer runs its blocks again every step; a text encoder runs them once).
    """

    def __init__(self, blocks: Sequence[nn.Module], device, *, skip: Callable[[str], bool] | None = None,
                 pin: bool | None = None, cyclic: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        cuda = self.device.type == "cuda"
        pin = cuda if pin is None else pin
        skip = skip or (lambda name: False)
        with torch.inference_mode(False):
            self.blocks = [_Packed(b, skip) for b in blocks]
            self._fill_host(pin)
        self.cyclic = cyclic
        self.slot_bytes = max((b.nbytes for b in self.blocks), default=0)
        self._index = {id(b.module): i for i, b in enumerate(self.blocks)}
        self._slots: list[torch.Tensor | None] = [None, None]
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._held = [None, None]      # block index each slot holds (copied or being copied)
        self._last_slot = 1            # slot of the block that ran last
        self._active = None            # (block, slot) while a block runs
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._ready = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self._done = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self.loads = 0                 # block copies into a slot
        self.bytes_copied = 0
        self._handles = []
        for b in self.blocks:
            self._handles.append(b.module.register_forward_pre_hook(self._before))
            self._handles.append(b.module.register_forward_hook(self._after, always_call=True))

    def _fill_host(self, pin: bool) -> None:
        if not pin:  # plain memory is not rounded: one buffer per block
            for b in self.blocks:
                b.fill(torch.empty(max(b.nbytes, 1), dtype=torch.uint8))
            return
        # one arena at a time, so the host peak is the weights plus one arena, not twice the weights
        for size, members in plan_arenas([b.nbytes for b in self.blocks]):
            arena = _pinned(size)
            for i, offset in members:
                self.blocks[i].fill(arena[offset:offset + self.blocks[i].nbytes])

    # ---- public -----------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def device_bytes(self) -> int:
        """Device memory the slots take while allocated."""
        return sum(s.numel() for s in self._slots if s is not None)

    def slot_buffers(self) -> list[torch.Tensor]:
        return [s for s in self._slots if s is not None]

    def managed(self) -> set[tuple[int, str]]:
        out = set()
        for b in self.blocks:
            out |= b.managed()
        return out

    def move_rest(self, root: nn.Module, device) -> None:
        """Move every tensor of `root` that this streamer does not manage to `device`."""
        managed = self.managed()
        with torch.no_grad(), torch.inference_mode(False):
            for mod in root.modules():
                for name, p in mod._parameters.items():
                    if p is not None and (id(mod), name) not in managed:
                        p.data = p.data.to(device)
                for name, buf in mod._buffers.items():
                    if buf is not None and (id(mod), name) not in managed:
                        mod._buffers[name] = buf.to(device)

    def release(self) -> None:
        """Give the slots' device memory back (they are allocated again on the next block)."""
        if self._active is not None:
            raise RuntimeError("cannot release the slots while a streamed block runs")
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)  # no copy or kernel may still use a slot
        self._slots, self._held, self._slot_views = [None, None], [None, None], {}

    def detach(self) -> None:
        """Remove the hooks; the blocks keep their weights in the host buffers."""
        self.release()
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- mechanics --------------------------------------------------------------------------------
    def _slot(self, s: int) -> torch.Tensor:
        if self._slots[s] is None:
            with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
                self._slots[s] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            if self._copy_stream is not None:
                # the allocator may hand back memory that compute-stream kernels still use
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._slots[s]

    def _views_in(self, i: int, s: int) -> list[torch.Tensor]:
        key = (i, s)
        if key not in self._slot_views:
            with torch.inference_mode(False):
                self._slot_views[key] = _views(self._slot(s), self.blocks[i].entries)
        return self._slot_views[key]

    def _load(self, i: int, s: int) -> None:
        block, slot = self.blocks[i], self._slot(s)
        if self._copy_stream is None:
            slot[:block.nbytes].copy_(block.host[:block.nbytes])
        else:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._done[s])  # the slot's previous block has finished
                slot[:block.nbytes].copy_(block.host[:block.nbytes], non_blocking=True)
                self._ready[s].record(self._copy_stream)
        self._held[s] = i
        self.loads += 1
        self.bytes_copied += block.nbytes

    def _next(self, i: int) -> int | None:
        if i + 1 < len(self.blocks):
            return i + 1
        return 0 if self.cyclic and len(self.blocks) > 1 else None

    def _before(self, module, args):
        i = self._index[id(module)]
        if self._held[0] == i:
            s = 0
        elif self._held[1] == i:
            s = 1
        else:  # not prefetched (first call, or blocks ran out of order): load into the other slot
            s = 1 - self._last_slot
            self._load(i, s)
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[s])
        _point(self.blocks[i].entries, self._views_in(i, s))
        self._active, self._last_slot = (i, s), s
        nxt = self._next(i)
        if nxt is not None and nxt not in self._held:
            self._load(nxt, 1 - s)

    def _after(self, module, args, output):
        if self._active is None:
            return
        i, s = self._active
        _point(self.blocks[i].entries, self.blocks[i].host_views)
        if self._done is not None:
            self._done[s].record(torch.cuda.current_stream(self.device))
        self._active = None


# ------------------------------------------------------------------------------------------------
# the two models that stream


def stream_transformer(model: nn.Module, device, resident_blocks: int = 0, pin: bool | None = None):
    """Keep the first `resident_blocks` blocks (double then single, in execution order) and every
    non-block part on `device`; stream the rest. Returns the BlockStreamer (None if nothing streams)."""
    blocks = list(model.double_blocks) + list(model.single_blocks)
    if not 0 <= resident_blocks <= len(blocks):
        raise ValueError(f"resident_blocks must be 0..{len(blocks)}; got {resident_blocks}")
    if resident_blocks == len(blocks):
        model.to(device)
        return None
    streamer = BlockStreamer(blocks[resident_blocks:], device, pin=pin, cyclic=True)
    streamer.move_rest(model, device)
    return streamer


def stream_t5(t5: nn.Module, device, pin: bool | None = None) -> BlockStreamer:
    """Stream the T5 encoder's blocks; the embedding, final norm and position-bias table are left to
    move_rest (the encoder reads the bias table before block 0 runs)."""
    from .memory_plan import t5_rest

    return BlockStreamer(list(t5.encoder.block), device, skip=t5_rest, pin=pin, cyclic=False)
