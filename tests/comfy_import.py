"""Make the real ComfyUI 0.3.75 host importable in-process, on the CPU, for parity tests.

The host lives where scripts/install_comfyui.py puts it (its comfyui_dir(); `./flux test` installs it).
If it is missing, the test fails with that instruction instead of skipping.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir() -> Path:
    """The host folder, from the installer script itself (so FLUX_COMFYUI_DIR is honoured the same way)."""
    spec = importlib.util.spec_from_file_location("_flux_install_comfyui", ROOT / "scripts" / "install_comfyui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.comfyui_dir())


def import_comfy():
    """Import ComfyUI's `comfy` package forced onto the CPU and return it.

    The host folder goes first on sys.path (as when ComfyUI runs main.py), and `args.cpu` is set before
    comfy.model_management is imported: with a CUDA build of torch and no driver, that import fails otherwise.
    """
    host = comfyui_dir()
    if not (host / "comfy" / "ldm" / "flux" / "model.py").exists():
        pytest.fail(f"the ComfyUI host is not installed at {host}; run `.venv/bin/python scripts/install_comfyui.py` "
                    f"(./flux test does it)", pytrace=False)
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    import comfy.cli_args  # parses no command line unless comfy.options.enable_args_parsing() was called

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if device.type != "cpu":
        pytest.fail(f"comfy.model_management was imported before the tests forced the CPU (it uses {device})",
                    pytrace=False)
    import comfy.ldm.flux.model  # noqa: F401
    import comfy.ops  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401

    return comfy


def comfy_flux(params, comfy=None):
    """ComfyUI's own comfy.ldm.flux.model.Flux for our FluxParams (fp32, CPU, weights uninitialised)."""
    comfy = comfy or import_comfy()
    patch = 2
    return comfy.ldm.flux.model.Flux(
        operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
        in_channels=params.in_channels // (patch * patch), out_channels=params.out_channels // (patch * patch),
        patch_size=patch, vec_in_dim=params.vec_in_dim, context_in_dim=params.context_in_dim,
        hidden_size=params.hidden_size, mlp_ratio=params.mlp_ratio, num_heads=params.num_heads,
        depth=params.depth, depth_single_blocks=params.depth_single_blocks, axes_dim=list(params.axes_dim),
        theta=params.theta, qkv_bias=params.qkv_bias, guidance_embed=params.guidance_embed,
    ).eval()


def comfy_forward(model, inputs: dict):
    """ComfyUI's forward_orig on packed tokens and ids, as the reference forward takes them."""
    with torch.no_grad():
        return model.forward_orig(inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"],
                                  inputs["timesteps"], inputs["y"], inputs["guidance"], transformer_options={})



@contextlib.contextmanager
def tiny_head_count(comfy):
    """Test harness only: ComfyUI's detection hard-codes 24 heads for FLUX.1 (model_detection.py); for our
    tiny files (head size 128 like the real model) the detected head count becomes hidden_size // 128."""
    import comfy.model_detection as detection

    original = detection.detect_unet_config

    def detect(*args, **kwargs):
        config = original(*args, **kwargs)
        if config is not None and config.get("image_model") == "flux":
            config["num_heads"] = config["hidden_size"] // 128
        return config

    detection.detect_unet_config = detect
    try:
        yield
    finally:
        detection.detect_unet_config = original


def native_demo_model(comfy):
    """A native MODEL: comfy.sd.load_diffusion_model (UNETLoader's own call) on the tiny demo transformer
    (flux_core.demo, BFL layout), float32, under tiny_head_count."""
    from flux_core.demo import demo_model_files

    with tiny_head_count(comfy):
        return comfy.sd.load_diffusion_model(str(demo_model_files()["transformer"]),
                                             model_options={"dtype": torch.float32})


def demo_conditioning():
    """Host CONDITIONING for the tiny demo transformer: random T5 tokens and pooled CLIP, guidance 3.5."""
    from flux_core.demo import TINY_FLUX

    gen = torch.Generator().manual_seed(5)
    context = torch.randn(1, 8, TINY_FLUX.context_in_dim, generator=gen)
    pooled = torch.randn(1, TINY_FLUX.vec_in_dim, generator=gen)
    return [[context, {"pooled_output": pooled, "guidance": 3.5}]]


def host_load_diffusion_model(comfy, path, model_options=None):
    """The host's own loader on a file: comfy.utils.load_torch_file + comfy.sd.load_diffusion_model_state_dict,
    under tiny_head_count. Everything else (prefix stripping, scaled_fp8 / _quantization_metadata detection,
    ops choice) is the host's. Returns the host's diffusion model (comfy.ldm.flux.model.Flux).
    """
    return host_load_patcher(comfy, path, model_options).model.diffusion_model


def host_load_patcher(comfy, path, model_options=None):
    """As host_load_diffusion_model, but the host's MODEL (its ModelPatcher)."""
    with tiny_head_count(comfy):
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options or {}, metadata=metadata)
    if patcher is None:
        raise AssertionError(f"ComfyUI did not recognise {path} as a diffusion model")
    return patcher


@contextlib.contextmanager
def imported_pack(module_name: str):
    """The pack imported the way ComfyUI imports it: its folder as a package (relative imports intact),
    removed from sys.modules afterwards. Yields the package module."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
            sys.modules.pop(name, None)
