"""Filling a FLUX transformer built on meta with quantized-storage Linears, one tensor at a time.

Weight storage choices (the `weights` keyword of load_transformer):
  auto   GGUF blocks stay blocks; every dense tensor is loaded in the compute dtype (the default)
  dense  everything dequantized to the compute dtype (the old behaviour; GGUF fully expanded)
  int8   like auto, and the dense block Linears stored int8 with a per-row scale
  fp8    like auto, and the dense block Linears stored fp8 e4m3 with a per-row scale
The small input/output Linears (img_in, txt_in, time/vector/guidance embedders, final layer) stay dense in
int8/fp8, as GGUF FLUX files keep them: under 1% of the weights, and the most sensitive ones.

Peak memory is the packed model plus one tensor being converted: each weight is read, packed on the
target device and dropped before the next one is read.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoints.gguf import GGUFFile
from ..checkpoints.materialize import LoadPlan, assign_tensor, check_shapes
from ..checkpoints.sources import FileTensor, Source
from .linear import SPEC_KEY, QuantLinear, encode_spec
from .rowwise import empty_rows

WEIGHT_STORAGES = ("auto", "dense", "int8", "fp8")
DENSE_PREFIXES = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def check_storage(weights: str) -> str:
    if weights not in WEIGHT_STORAGES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_STORAGES)}; got {weights!r}")
    return weights


def gguf_blocks(source: Source) -> tuple[GGUFFile, str] | None:
    """(file, key) when `source` is a GGUF tensor whose blocks can be kept as they are."""
    if not isinstance(source, FileTensor) or not isinstance(source.tf, GGUFFile):
        return None
    info = source.tf.tensors[source.key]
    if not info.kind.quantized or info.stored_shape != info.shape or len(info.shape) != 2:
        return None
    return source.tf, source.key


def choose_storage(model: nn.Module, sources: dict[str, Source], weights: str) -> dict[str, str]:
    """Linear module name -> "gguf" / "int8" / "fp8" for the layers that will be kept packed."""
    check_storage(weights)
    if weights == "dense":
        return {}
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        source = sources.get(name + ".weight")  # a missing tensor is reported by check_shapes
        if source is None:
            continue
        if gguf_blocks(source) is not None:
            chosen[name] = "gguf"
        elif weights in ("int8", "fp8") and not name.startswith(DENSE_PREFIXES):
            chosen[name] = weights
    return chosen


def materialize_quantized(plan: LoadPlan, device="cpu", dtype: torch.dtype | None = torch.bfloat16,
                          weights: str = "auto") -> nn.Module:
    """Load `plan` with the chosen weight storage; dense tensors are converted to `dtype`."""
    model, sources = plan.module, plan.sources
    check_shapes(model, sources, plan.path, plan.what)  # before any read, on the plain module
    device = torch.device(device)
    packed = choose_storage(model, sources, weights)

    def dense(name: str) -> torch.Tensor:
        tensor = sources[name].load()
        target = (plan.dtype_for(name) if plan.dtype_for else None) or dtype
        if target is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=target)
        return tensor.to(device=device)

    for name, storage in packed.items():
        linear = model.get_submodule(name)
        bias = dense(name + ".bias") if linear.bias is not None else None
        if storage == "gguf":
            tf, key = gguf_blocks(sources[name + ".weight"])
            blocks = tf.read_packed(key)
            layer = QuantLinear.from_gguf(blocks.data.to(device), blocks.type_id, blocks.shape, bias)
        else:
            # The kept buffers first, then the transient read: freed temporaries stay above them in the heap.
            out = empty_rows((linear.out_features, linear.in_features), storage, device)
            weight = sources[name + ".weight"].load().to(device)
            layer = QuantLinear.from_dense(weight, bias, storage, out=out)
            del weight, out
        _set_module(model, name, layer)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            assign_tensor(model, name, dense(name))
    return model.eval()


def storage_report(model: nn.Module) -> dict:
    """Bytes held by packed Linears, by everything else, and the packed layers per storage kind."""
    packed_bytes, kinds = 0, {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            packed_bytes += module.packed_bytes()
            kinds[module.kind] = kinds.get(module.kind, 0) + 1
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"packed_bytes": packed_bytes, "dense_bytes": total - packed_bytes, "total_bytes": total,
            "packed_layers": kinds}


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (packed ones as qweight/scale) plus a SPEC_KEY entry per packed layer, for a host
    that builds its own modules from a state dict. Tensors are shared, not copied."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state[f"{name}.{SPEC_KEY}"] = encode_spec(module.spec())
    return state


def _set_module(model: nn.Module, name: str, module: nn.Module):
    owner_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, leaf, module)
