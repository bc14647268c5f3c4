"""Filling a module built on the meta device from lazy sources, one tensor at a time.

Every shape is checked before any data is read, so a file that does not fit fails fast and nothing is
half-loaded; each tensor is converted and placed as it is read, so peak memory is the model plus one
tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import CheckpointError
from .sources import Source


def _names(module: nn.Module) -> list[str]:
    return list(module.state_dict(keep_vars=True).keys())


def check_shapes(module: nn.Module, sources: dict[str, Source], path, what: str):
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sources]
    if missing:
        raise CheckpointError(path, f"the {what} weights are incomplete",
                              found=f"{len(missing)} tensors missing, e.g. '{missing[0]}'",
                              expected=f"all {len(expected)} tensors of the {what}",
                              hint="the file may be a different model variant or only part of a model")
    for name, ref in expected.items():
        got = tuple(sources[name].shape)
        if got != tuple(ref.shape):
            raise CheckpointError(path, f"the shapes do not fit the {what}",
                                  found=f"'{name}' of shape {list(got)}", expected=f"shape {list(ref.shape)}")


def iter_tensors(module: nn.Module, sources: dict[str, Source], *, path, what: str, device="cpu",
                 dtype: torch.dtype | None = None,
                 dtype_for: Callable[[str], torch.dtype | None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `module` (built on meta), converted and placed, one at a time.

    Every shape is checked before the first read. `dtype` converts floating-point tensors; `dtype_for(name)`
    may override it per tensor (None keeps the default).
    """
    check_shapes(module, sources, path, what)
    device = torch.device(device)
    for name in _names(module):
        tensor = sources[name].load()
        target = dtype
        if dtype_for is not None:
            target = dtype_for(name) or dtype
        if target is not None and tensor.is_floating_point():
            yield name, tensor.to(device=device, dtype=target)
        else:
            yield name, tensor.to(device=device)


def materialize(module: nn.Module, sources: dict[str, Source], **kwargs) -> nn.Module:
    """Load `sources` into `module` (built on meta) in place and return it in eval mode."""
    for name, tensor in iter_tensors(module, sources, **kwargs):
        assign_tensor(module, name, tensor)
        del tensor
    module.eval()
    return module


def read_state_dict(module: nn.Module, sources: dict[str, Source], **kwargs) -> dict[str, torch.Tensor]:
    """The same tensors as materialize would load, as a plain state dict (for hosts that build their own model)."""
    return dict(iter_tensors(module, sources, **kwargs))


@dataclass
class LoadPlan:
    """A model built on meta and the lazy sources that fill it: materialize it, or read it as a state dict."""

    module: nn.Module
    sources: dict[str, Source]
    path: object
    what: str
    dtype_for: Callable[[str], torch.dtype | None] | None = None

    def _kwargs(self, device, dtype):
        return dict(path=self.path, what=self.what, device=device, dtype=dtype, dtype_for=self.dtype_for)

    def materialize(self, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
        return materialize(self.module, self.sources, **self._kwargs(device, dtype))

    def state_dict(self, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return read_state_dict(self.module, self.sources, **self._kwargs(device, dtype))


def assign_tensor(module: nn.Module, name: str, tensor: torch.Tensor):
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor
