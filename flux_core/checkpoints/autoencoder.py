"""Autoencoder checkpoints in every layout, mapped to the reference names, and the config they imply.

Layouts: BFL `ae.safetensors` (bare keys), the same under a prefix (ComfyUI all-in-one `vae.`, SD-style
`first_stage_model.`), and diffusers `AutoencoderKL` (single file, `vae/` folder, or a pipeline root
holding one), in any float dtype. Diffusers names its decoder stages in reverse and stores the
attention projections as Linear weights; both are undone here without copying data.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..autoencoder import AutoEncoder, AutoEncoderParams
from ..errors import CheckpointError
from .families import VAE_BFL, VAE_DIFFUSERS, describe, find_prefixes
from .materialize import LoadPlan
from .reader import TensorFile, open_checkpoint
from .sources import FileTensor, Reshaped, Source, is_quant_aux

_WHAT = "FLUX autoencoder"
_EXPECTED = (f"keys like '{VAE_BFL}' (Black Forest Labs ae.safetensors / ComfyUI) or "
             f"'{VAE_DIFFUSERS}' (diffusers AutoencoderKL)")
_HINT = ("the FLUX autoencoder is ae.safetensors from the FLUX.1 repository (or its diffusers vae/ folder); "
         "it goes in models/vae")

# diffusers name inside a mid block's attention -> reference name (both spellings diffusers has used).
_DIFFUSERS_ATTN = {
    "group_norm": "norm",
    "to_q": "q", "query": "q",
    "to_k": "k", "key": "k",
    "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}
_ATTN_PROJ = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_SHORTCUT = re.compile(r"\.conv_shortcut\.")


def _vae_prefixes(tf: TensorFile, anchor: str) -> list[str]:
    # A prefix is empty or ends at a name boundary; 'text_decoder.conv_in.weight' is not a VAE.
    prefixes = [p for p in find_prefixes(tf.keys(), anchor) if p == "" or p.endswith(".")]
    if len(prefixes) > 1:
        raise CheckpointError(tf.path, "the file holds more than one autoencoder",
                              found="prefixes " + ", ".join(f"'{p}'" for p in prefixes),
                              expected="one autoencoder per file")
    return prefixes


def autoencoder_sources(tf: TensorFile) -> dict[str, Source]:
    """Reference-named lazy sources for the autoencoder in `tf`, whatever its layout."""
    # diffusers first: its files also have the BFL anchor 'decoder.conv_in.weight'.
    prefixes = _vae_prefixes(tf, VAE_DIFFUSERS)
    if prefixes:
        sources = _diffusers_sources(tf, prefixes[0])
    else:
        prefixes = _vae_prefixes(tf, VAE_BFL)
        if not prefixes:
            raise CheckpointError(tf.path, "this is not a FLUX autoencoder", found=describe(tf.keys()),
                                  expected=_EXPECTED, hint=_HINT)
        sources = _bfl_sources(tf, prefixes[0])
    _refuse_quant_convs(tf, prefixes[0], sources)
    return sources


def _bfl_sources(tf: TensorFile, prefix: str) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for key in tf.keys():
        if not key.startswith(prefix) or is_quant_aux(key):
            continue
        name = key[len(prefix):]
        # Quant convs are kept only so that an SD autoencoder is recognised and refused.
        if name.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[name] = _as_conv1x1(name, FileTensor(tf, key))
    return out


def _diffusers_sources(tf: TensorFile, prefix: str) -> dict[str, Source]:
    names = [k[len(prefix):] for k in tf.keys() if k.startswith(prefix) and not is_quant_aux(k)]
    up_levels = len(_indices(names, "decoder.up_blocks"))
    out: dict[str, Source] = {}
    for name in names:
        new = _diffusers_to_reference(name, up_levels)
        if new is not None:
            out[new] = _as_conv1x1(new, FileTensor(tf, prefix + name))
    return out


def _diffusers_to_reference(name: str, up_levels: int) -> str | None:
    """The reference name of one diffusers VAE tensor, or None for tensors that are not the VAE's."""
    part, _, rest = name.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return name
    if part not in ("encoder", "decoder"):
        return None
    rest = _SHORTCUT.sub(".nin_shortcut.", "." + rest)[1:]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)$", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest):
        rest = f"up.{up_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", rest):
        rest = f"up.{up_levels - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.match(r"mid_block\.resnets\.([01])\.(.+)$", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest):
        if m[1] not in _DIFFUSERS_ATTN:
            return None
        rest = f"mid.attn_1.{_DIFFUSERS_ATTN[m[1]]}.{m[2]}"
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + rest[len("conv_norm_out."):]
    return f"{part}.{rest}"


def _as_conv1x1(name: str, source: Source) -> Source:
    # Attention projections stored as Linear [C, C] become the reference's 1x1 convolutions [C, C, 1, 1].
    if _ATTN_PROJ.search("." + name) and len(source.shape) == 2:
        return Reshaped(source, (*source.shape, 1, 1))
    return source


def _indices(names, stem: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(stem)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def _refuse_quant_convs(tf: TensorFile, prefix: str, sources: dict[str, Source]):
    # Stable Diffusion 1.x/2.x/XL autoencoders have quant convs and 4 latent channels; FLUX has neither.
    if "quant_conv.weight" in sources or "post_quant_conv.weight" in sources:
        z = sources["decoder.conv_in.weight"].shape[1] if "decoder.conv_in.weight" in sources else "?"
        raise CheckpointError(tf.path, "this autoencoder is not the FLUX one",
                              found=f"an autoencoder with quant_conv/post_quant_conv and {z} latent channels "
                                    f"under '{prefix}' (Stable Diffusion 1.x/2.x/XL style)",
                              expected="the FLUX autoencoder: 16 latent channels, no quant convs", hint=_HINT)


def infer_autoencoder_params(sources: dict[str, Source], path) -> AutoEncoderParams:
    """The autoencoder configuration implied by the tensor shapes."""
    def shape(name):
        if name not in sources:
            raise CheckpointError(path, f"the {_WHAT} weights are incomplete", found=f"no '{name}'",
                                  expected="both the encoder and the decoder of the autoencoder", hint=_HINT)
        return sources[name].shape

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _indices(sources, "encoder.down")
    if not levels:
        shape("encoder.down.0.block.0.conv1.weight")  # raises: names what is missing
    ch_mult = []
    for level in levels:
        width = shape(f"encoder.down.{level}.block.0.conv1.weight")[0]
        if width % ch:
            raise CheckpointError(path, f"the shapes do not fit the {_WHAT}",
                                  found=f"level {level} is {width} channels wide",
                                  expected=f"a multiple of the base width {ch}")
        ch_mult.append(width // ch)
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=ch_mult,
        num_res_blocks=len(_indices(sources, "encoder.down.0.block")),
        z_channels=shape("decoder.conv_in.weight")[1],
    )


def resolve_autoencoder_path(path) -> Path:
    """The folder or file that holds the weights: a diffusers pipeline root means its vae/ subfolder, and a
    diffusers vae/ folder means its full-precision file when fp16 variants sit beside it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    if (path / "model_index.json").is_file() or (not any(path.glob("*.safetensors")) and (path / "vae").is_dir()):
        if not (path / "vae").is_dir():
            raise CheckpointError(path, "this diffusers pipeline folder has no vae/ subfolder",
                                  found=", ".join(p.name for p in sorted(path.iterdir())[:8]),
                                  expected="a vae/ folder holding diffusion_pytorch_model.safetensors", hint=_HINT)
        path = path / "vae"
    main = path / "diffusion_pytorch_model.safetensors"
    return main if main.is_file() else path


def _diffusers_scaling(path: Path, params: AutoEncoderParams) -> AutoEncoderParams:
    """Latent scale and shift from a diffusers config.json beside the weights, when there is one."""
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file() or not (path.is_dir() or path.name.startswith("diffusion_pytorch_model")):
        return params
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(config_file, "the autoencoder config is not valid JSON", found=str(exc)[:200]) from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        return params
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    if isinstance(scale, (int, float)):
        params.scale_factor = float(scale)
    if "shift_factor" in config:
        params.shift_factor = float(shift) if isinstance(shift, (int, float)) else 0.0  # null: no shift
    return params


@contextmanager
def autoencoder_plan(path) -> Iterator[LoadPlan]:
    """The autoencoder in `path`, built on meta, with the sources that fill it (file open while in use)."""
    resolved = resolve_autoencoder_path(path)
    with open_checkpoint(resolved) as tf:
        sources = autoencoder_sources(tf)
        params = _diffusers_scaling(resolved, infer_autoencoder_params(sources, tf.path))
        with torch.device("meta"):
            model = AutoEncoder(params)
        _refuse_extra(model, sources, tf.path)
        yield LoadPlan(model, sources, tf.path, _WHAT)


def load_autoencoder(path, device="cpu", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """Load the FLUX autoencoder from any supported layout; the configuration comes from the shapes."""
    with autoencoder_plan(path) as plan:
        return plan.materialize(device=device, dtype=dtype)


def _refuse_extra(model: AutoEncoder, sources: dict[str, Source], path):
    # A strict load: a tensor the model has no place for means the inferred config is not the file's.
    expected = model.state_dict(keep_vars=True)
    extra = [k for k in sources if k not in expected]
    if extra:
        raise CheckpointError(path, f"the shapes do not fit the {_WHAT}",
                              found=f"{len(extra)} tensors it has no place for, e.g. '{extra[0]}'",
                              expected=f"the {len(expected)} tensors of an autoencoder with ch={model.params.ch}, "
                                       f"ch_mult={model.params.ch_mult}, num_res_blocks={model.params.num_res_blocks}")
