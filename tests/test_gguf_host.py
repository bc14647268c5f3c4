"""GGUF and int8/fp8 weight storage inside the real ComfyUI 0.3.75 host (in-process, CPU): the pack's
transformer loader lists .gguf files from diffusion_models, gives the host's own FLUX model built with the
pack's operations class (packed Linears, dequantized in forward), and that MODEL computes what the engine's
model and a dense host model of the dequantized weights compute.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import gguf_factory as gf
import lora_factory as lf
import transformer_factory as tf
from comfy_import import comfy_forward, imported_pack
from flux_core.loaders import load_transformer
from gguf_factory import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.host

PACK_MODULE = "flux_juiced_pack_gguf_test"


@pytest.fixture(scope="module")
def pack(comfy):
    with imported_pack(PACK_MODULE) as module:
        assert "FluxJuicedTransformerLoader" in module.NODE_CLASS_MAPPINGS, "the pack's nodes failed to import"
        yield module.NODE_CLASS_MAPPINGS["FluxJuicedTransformerLoader"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, comfy):
    """A diffusion_models folder registered with the host, holding a mixed-type GGUF, the same weights
    dequantized by the oracle as float32 safetensors, and a bf16 file."""
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    weights = tf.random_bfl_state_dict(tf.TINY, seed=7)
    layers = sorted(k for k, v in weights.items() if v.ndim == 2 and not k.startswith(gf.DENSE_PREFIXES))
    types = {k: gf.LISTED[i % len(gf.LISTED)] for i, k in enumerate(layers)}
    path, reference = gf.write_flux_gguf(weights, folder / "flux1-dev-tiny-mixed.gguf", "Q8_0", types=types,
                                         prefix="model.diffusion_model.")
    tf.write_bfl(reference, folder / "flux1-dev-tiny-dequantized.safetensors")
    tf.write_bfl({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "flux1-dev-tiny-bf16.safetensors")
    (folder / "notes.txt").write_text("not a model")
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    return folder


def inputs():
    return tf.make_inputs(tf.TINY)


def packed_layers(diffusion_model):
    return {n: m for n, m in diffusion_model.named_modules() if getattr(m, "qweight", None) is not None}


def apply_model(patcher) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])  # the host's own loading of the MODEL
    return forward_model(patcher)


def forward_model(patcher) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 12, generator=gen)
    context = torch.randn(1, 7, tf.TINY.context_in_dim, generator=gen)
    y = torch.randn(1, tf.TINY.vec_in_dim, generator=gen)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=context, y=y,
                                         guidance=torch.tensor([3.5]))


def test_gguf_loads_quantized_into_the_host_and_matches(pack, models_dir):
    names = pack.INPUT_TYPES()["required"]["transformer_name"][0]
    assert "flux1-dev-tiny-mixed.gguf" in names and "notes.txt" not in names

    patcher = pack().load("flux1-dev-tiny-mixed.gguf", "default")[0]
    host = patcher.model.diffusion_model
    assert type(host).__module__ == "comfy.ldm.flux.model"
    packed = packed_layers(host)
    assert len(packed) == 26 and all(m.qweight.dtype == torch.uint8 and m.weight is None for m in packed.values())
    assert host.img_in.weight is not None and host.img_in.weight.dtype == patcher.model.get_dtype()

    # The host budgets the packed size: the transformer counts as about a third of its dense float32 size.
    dense = load_transformer(models_dir / "flux1-dev-tiny-dequantized.safetensors", dtype=torch.float32)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    assert patcher.model_size() < 0.35 * dense_bytes, (patcher.model_size(), dense_bytes)

    engine = load_transformer(models_dir / "flux1-dev-tiny-mixed.gguf", dtype=torch.float32)
    expected = tf.run_flux(engine, inputs())
    got = comfy_forward(host, inputs())
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max().item() < 1e-4

    # Through the host's model management and apply_model: the same numbers as a dense host model of the
    # oracle's dequantized weights.
    reference = pack().load("flux1-dev-tiny-dequantized.safetensors", "fp32")[0]
    assert not packed_layers(reference.model.diffusion_model)
    want = apply_model(reference)
    assert (apply_model(patcher) - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_8bit_weight_dtype_stores_the_host_model_packed(pack, models_dir, storage):
    patcher = pack().load("flux1-dev-tiny-bf16.safetensors", storage)[0]
    packed = packed_layers(patcher.model.diffusion_model)
    expected_dtype = torch.int8 if storage == "int8" else torch.uint8
    assert len(packed) == 26 and all(m.qweight.dtype == expected_dtype and m.scale.shape == (m.out_features, 1)
                                     for m in packed.values())
    engine = load_transformer(models_dir / "flux1-dev-tiny-bf16.safetensors", dtype=torch.float32, weights=storage)
    got = comfy_forward(patcher.model.diffusion_model, inputs())
    assert (got - tf.run_flux(engine, inputs())).abs().max().item() < 1e-4
    dense = pack().load("flux1-dev-tiny-bf16.safetensors", "fp32")[0]
    want = comfy_forward(dense.model.diffusion_model, inputs())
    error = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < error < (0.02 if storage == "int8" else 0.06), error


# ------------------------------------------------------------------------------------------------
# LoRAs on packed layers, through the host's own LoRA loader node


@pytest.fixture(scope="module")
def loras(models_dir, comfy):
    """The two standard LoRA files (lora_factory) in a loras folder registered with the host."""
    import folder_paths

    folder = models_dir.parent / "loras"
    folder.mkdir(exist_ok=True)
    changes = lf.write_standard_loras(folder)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return changes


def with_loras(patcher):
    """`patcher` through the host's LoraLoaderModelOnly node twice (a kohya and a diffusers LoRA)."""
    import nodes

    loader = nodes.LoraLoaderModelOnly()
    for name, strength in lf.STRENGTHS.items():
        patcher = loader.load_lora_model_only(patcher, name, strength)[0]
    return patcher


def merged_reference(pack, models_dir, patcher, loras, name: str):
    """A dense float32 host MODEL of `patcher`'s weights as it computes them (packed layers dequantized)
    with both LoRAs merged into them by hand (lora_factory.merge copies them to float32 first)."""
    import comfy.model_management
    from flux_core.quant.linear import dequantize_weight

    comfy.model_management.load_models_gpu([patcher])  # undoes the LoRAs the host merged into dense layers
    host = patcher.model.diffusion_model
    packed = packed_layers(host)
    dense = {k: v for k, v in host.state_dict().items()
             if k.rpartition(".")[0] not in packed or k.endswith(".bias")}
    for layer, m in packed.items():
        dense[layer + ".weight"] = dequantize_weight(m.storage, m.qweight, m.scale, m.type_id,
                                                     (m.out_features, m.in_features), torch.float32)
    tf.write_bfl(lf.merge(dense, loras), models_dir / name)
    return pack().load(name, "fp32")[0]


def lora_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]


def test_host_lora_loader_patches_gguf_layers(pack, models_dir, loras, caplog):
    import comfy.model_management as mm

    patcher = pack().load("flux1-dev-tiny-mixed.gguf", "default")[0]
    plain = apply_model(patcher)
    with caplog.at_level("WARNING"):
        patched = with_loras(patcher)
    assert not lora_warnings(caplog), lora_warnings(caplog)
    got = apply_model(patched)

    want = apply_model(merged_reference(pack, models_dir, patcher, loras, "tiny-gguf-merged.safetensors"))
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-4 * scale
    assert (got - plain).abs().max().item() > 0.05 * scale, "the LoRAs changed nothing"
    # The packed bytes were never touched: the MODEL without LoRAs computes what it did before.
    assert torch.equal(apply_model(patcher), plain)
    assert (apply_model(patched) - want).abs().max().item() < 1e-4 * scale

    # The host's low-VRAM mode streams every layer and hangs its own per-call patch on each: the LoRA still
    # applies exactly once.
    mm.unload_all_models()
    patched.patch_model(device_to=mm.get_torch_device(), lowvram_model_memory=1)
    try:
        host_patched = [m for m in packed_layers(patched.model.diffusion_model).values() if m.weight_function]
        assert len(host_patched) == 5, "the host's low-VRAM path was not taken"
        with torch.no_grad():
            low_vram = forward_model(patched)
    finally:
        patched.unpatch_model(device_to=patched.offload_device)
    assert (low_vram - want).abs().max().item() < 1e-4 * scale


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_host_lora_loader_patches_8bit_layers(pack, models_dir, loras, storage, caplog):
    fp8_matmul_enabled = importlib.import_module(PACK_MODULE + ".nodes.quantized_ops").fp8_matmul_enabled

    patcher = pack().load("flux1-dev-tiny-bf16.safetensors", storage)[0]
    with caplog.at_level("WARNING"):
        patched = with_loras(patcher)
    assert not lora_warnings(caplog), lora_warnings(caplog)
    got = apply_model(patched)

    # fp8 matmuls skip the layers a LoRA patches (they need the dense weight) and keep the others.
    layers = packed_layers(patched.model.diffusion_model)
    x = torch.randn(3, lf.H, dtype=torch.bfloat16)
    with fp8_matmul_enabled(torch.device("cpu")):
        assert not layers["double_blocks.0.img_attn.qkv"]._fp8_matmul_allowed(x)
        assert layers["double_blocks.0.txt_attn.qkv"]._fp8_matmul_allowed(x) == (storage == "fp8")

    want = apply_model(merged_reference(pack, models_dir, patcher, loras, f"tiny-{storage}-merged.safetensors"))
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
