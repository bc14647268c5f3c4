"""Block streaming, the memory planner, the T5 policies and tiled decoding (flux_core.speed offload parts).

On a CPU the streamer's slots are separate CPU buffers, so a block's weights still have three homes
the tests can tell apart by address: the packed host buffer (between blocks), a slot (while the block
runs), nowhere else. Poisoning a slot as soon as its block is done proves nothing reads a slot outside
its copy/run window; corrupting the host buffer proves each run really reads freshly copied weights.
"""
from __future__ import annotations

import copy
import gc
import warnings
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from flux_core.model import Flux, FluxParams
from flux_core.speed.memory_plan import GIB, full_size, plan_memory, sizes_of
from flux_core.speed.offload import BlockStreamer, plan_arenas, stream_transformer
from flux_core.speed.placement import MemoryManager
from flux_core.speed.vae_tiling import decode_tiled

SMALL = FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=3, context_in_dim=64, vec_in_dim=64)


def _twins(params=SMALL, dtype=torch.float32):
    torch.manual_seed(0)
    a = Flux(params).to(dtype).eval().requires_grad_(False)
    b = Flux(params).to(dtype).eval().requires_grad_(False)
    b.load_state_dict(a.state_dict())
    return a, b


def _inputs(params=SMALL, tokens=16, text=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(1, tokens, params.in_channels, generator=g).to(dtype),
                img_ids=torch.randint(0, 4, (1, tokens, 3), generator=g).float(),
                txt=torch.randn(1, text, params.context_in_dim, generator=g).to(dtype),
                txt_ids=torch.zeros(1, text, 3), timesteps=torch.rand(1, generator=g).to(dtype),
                y=torch.randn(1, params.vec_in_dim, generator=g).to(dtype), guidance=torch.full((1,), 3.5, dtype=dtype))


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    start = buf.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buf.numel()


def _probe(streamer: BlockStreamer, log: list):
    """Hooks registered after the streamer's: see where each block's weights are while it runs and right
    after, and poison the slot it ran from as soon as it is released."""
    for i, packed in enumerate(streamer.blocks):
        def before(module, args, i=i, packed=packed):
            slots = streamer.slot_buffers()
            tensors = [t for t in list(module.parameters()) + list(module.buffers())]
            homes = {next((k for k, s in enumerate(slots) if _inside(t, s)), None) for t in tensors}
            assert len(homes) == 1 and None not in homes, f"block {i} is not running from one slot"
            log.append((i, homes.pop()))

        def after(module, args, output, i=i, packed=packed):
            for t in list(module.parameters()) + list(module.buffers()):
                assert _inside(t, packed.host), f"block {i} kept a device copy after it ran"
            slot = streamer.slot_buffers()[log[-1][1]]
            slot.fill_(0xFF)  # NaN in every float dtype: a later read of this slot before a new copy shows

        packed.module.register_forward_pre_hook(before)
        packed.module.register_forward_hook(after)


@torch.inference_mode()
def test_streaming_is_bit_exact_and_every_block_comes_in_and_goes_out():
    model, reference = _twins()
    x = _inputs()
    expected = reference(**x)
    streamer = stream_transformer(model, "cpu", resident_blocks=1)
    log = []
    _probe(streamer, log)
    outs = [model(**x) for _ in range(3)]
    assert all(torch.equal(o, expected) for o in outs)
    n = len(streamer.blocks)
    assert n == 4  # 5 blocks, the first one resident
    assert [i for i, _ in log] == list(range(n)) * 3
    assert {s for _, s in log} == {0, 1}  # the two slots take turns
    # each block copied once per forward, plus the first block prefetched for the next step
    assert streamer.loads == 3 * n + 1
    assert streamer.bytes_copied == 3 * sum(b.nbytes for b in streamer.blocks) + streamer.blocks[0].nbytes
    # the resident block and the embeddings were never touched by streaming
    resident = model.double_blocks[0].img_attn.qkv.weight
    assert not any(_inside(resident, b.host) for b in streamer.blocks)
    assert torch.equal(resident, reference.double_blocks[0].img_attn.qkv.weight)
    # state_dict reads the host copies: the same tensors as the reference
    ref_sd = reference.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())


@torch.inference_mode()
def test_weights_are_read_from_the_host_buffer_on_every_run():
    model, reference = _twins()
    x = _inputs()
    streamer = stream_transformer(model, "cpu", resident_blocks=0)
    assert torch.equal(model(**x), reference(**x))
    streamer.blocks[3].host.zero_()  # the 4th block's weights, in CPU memory (what state_dict() shows)
    reference.single_blocks[1].requires_grad_(False)
    for p in reference.single_blocks[1].parameters():
        p.zero_()
    out = model(**x)  # no device copy outlives its turn: the changed weights are what runs
    assert torch.equal(out, reference(**x))


@torch.inference_mode()
def test_out_of_order_calls_step_cache_and_release():
    """Step caching runs only the first block on its forecast steps; the streamer must follow."""
    from flux_core.speed.caching import StepCache
    from flux_core.speed.presets import step_cache_config

    model, reference = _twins()
    streamer = stream_transformer(model, "cpu", resident_blocks=0)
    x = _inputs()
    img_ids, txt, txt_ids, y, g = x["img_ids"], x["txt"], x["txt_ids"], x["y"], x["guidance"]
    config = step_cache_config("blink")

    def run(net):
        cache, img = StepCache(net, config, num_steps=8), x["img"]
        for t in torch.linspace(1, 0.1, 8):
            img = img - 0.1 * cache(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids,
                                    timesteps=t[None], y=y, guidance=g)
        return img, cache.full_evaluations

    (a, full_a), (b, full_b) = run(model), run(reference)
    assert torch.equal(a, b) and full_a == full_b < 8
    streamer.release()
    assert streamer.slot_buffers() == [] and streamer.device_bytes == 0
    assert torch.equal(model(**x), reference(**x))  # slots come back on demand


class _Int8Linear(nn.Module):
    """A quantized-linear stand-in: int8 weight and per-row scale as buffers, bf16 bias as a parameter."""

    def __init__(self, n_in, n_out, g):
        super().__init__()
        self.register_buffer("qweight", torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(n_out, 1, generator=g) / 64)
        self.bias = nn.Parameter(torch.randn(n_out, generator=g).to(torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T + self.bias.float()


@torch.inference_mode()
def test_streams_any_dtype_int8_fp8_bf16():
    g = torch.Generator().manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(_Int8Linear(32, 48, g), nn.GELU(), _Int8Linear(48, 32, g))
                            for _ in range(3)])
    for b in blocks:  # an fp8 tensor too, with an odd size so the packing alignment matters
        b.register_buffer("fp8", torch.randn(7, generator=g).to(torch.float8_e4m3fn))
    x = torch.randn(5, 32, generator=g)

    def run():
        h = x
        for b in blocks:
            h = b(h) + b.fp8.float().sum()
        return h

    expected = run()
    copies = {k: v.clone() for k, v in blocks.state_dict().items()}
    # pin=True packs the blocks into shared arenas (without CUDA they cannot be pinned: a warning says so)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not torch.cuda.is_available() else "error")
        streamer = BlockStreamer(list(blocks), "cpu", pin=True)
    hosts = {b.host.untyped_storage().data_ptr() for b in streamer.blocks}
    assert len(hosts) == 1  # three small blocks share one arena
    assert torch.equal(run(), expected) and streamer.loads == 3 + 1
    assert all(torch.equal(v, copies[k]) and v.dtype == copies[k].dtype for k, v in blocks.state_dict().items())


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@torch.inference_mode()
def test_streams_the_engines_quantized_linears(storage):
    QuantLinear = pytest.importorskip("flux_core.quant.linear").QuantLinear
    g = torch.Generator().manual_seed(1)
    blocks = [QuantLinear.from_dense(torch.randn(32, 32, generator=g) / 6, torch.randn(32, generator=g), storage)
              for _ in range(3)]
    x = torch.randn(4, 32, generator=g)

    def run():
        h = x
        for b in blocks:
            h = b(h)
        return h

    expected = run()
    streamer = BlockStreamer(blocks, "cpu")
    log = []
    _probe(streamer, log)
    assert torch.equal(run(), expected) and [i for i, _ in log] == [0, 1, 2]


@pytest.fixture(scope="module")
def flux_sizes():
    return full_size()  # bf16 transformer and text encoders, float32 autoencoder: load_models' defaults


def test_pinned_arenas_do_not_overlap_and_waste_little(flux_sizes):
    """torch rounds each pinned allocation up to a power of two; packing blocks into arenas keeps the
    pinned total near the weights instead of up to twice them."""
    for sizes in (flux_sizes.transformer.blocks, flux_sizes.transformer.blocks[4:], flux_sizes.t5.blocks,
                  (0, 5, 300, 7000, 7000)):
        arenas = plan_arenas(sizes)
        placed = sorted(i for _, members in arenas for i, _ in members)
        assert placed == list(range(len(sizes)))
        for size, members in arenas:
            assert size & (size - 1) == 0
            spans = sorted((off, off + sizes[i]) for i, off in members)
            assert all(off % 256 == 0 for off, _ in spans) and spans[-1][1] <= size
            assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert sum(size for size, _ in plan_arenas(flux_sizes.transformer.blocks)) <= 1.1 * flux_sizes.transformer.total
    assert sum(size for size, _ in plan_arenas(flux_sizes.t5.blocks)) <= 1.1 * flux_sizes.t5.total


# ------------------------------------------------------------------------------------------------
# the planner


def test_full_size_counts_match_the_published_sizes():
    s = full_size(torch.bfloat16, ae_dtype=torch.bfloat16)
    assert s.transformer.total / 1e9 == pytest.approx(23.8, rel=0.01)  # speed.md 5: 23.8 GB
    assert s.t5.total / 1e9 == pytest.approx(9.52, rel=0.01)
    assert s.clip / 1e9 == pytest.approx(0.246, rel=0.02)
    assert s.autoencoder / 1e9 == pytest.approx(0.168, rel=0.02)
    assert len(s.transformer.blocks) == 57 and len(s.t5.blocks) == 24


def _fits_exactly(plan, sizes, **kw):
    """The plan fits, and one more resident block would not (unless all are resident)."""
    limit = (plan.budget_gib - plan.reserve_gib) * GIB
    assert plan.fits and plan.peak_bytes <= limit
    if plan.stream_blocks and plan.vae_tile is None:
        from flux_core.speed.memory_plan import _phases

        prefix = [0]
        for b in sizes.transformer.blocks:
            prefix.append(prefix[-1] + b)
        more = _phases(sizes, plan.resident_blocks + 1, plan.t5_policy, None, plan.width, plan.height, 1, prefix)
        assert max(more.values()) > limit


@pytest.mark.parametrize("budget, resident, t5, peak", [
    (8, 4, "offload", 7.16),     # docs/low_memory.md, "Running in 8 GB"
    (12, 10, "offload", 10.96),
    (24, 44, "offload", 23.25),
    (80, 57, "keep", 35.55),
])
def test_documented_plans_for_full_size_flux(flux_sizes, budget, resident, t5, peak):
    sizes = flux_sizes
    plan = plan_memory(sizes, budget)
    assert (plan.resident_blocks, plan.t5_policy, plan.vae_tile) == (resident, t5, None)
    assert plan.stream_blocks == (resident < 57)
    assert plan.peak_bytes / GIB == pytest.approx(peak, abs=0.01)
    _fits_exactly(plan, sizes)


def test_planner_tiles_refuses_and_follows_explicit_choices(flux_sizes):
    sizes = flux_sizes
    big = plan_memory(sizes, 8, width=2048, height=2048)
    assert big.fits and big.vae_tile is not None and big.notes
    assert not plan_memory(sizes, 8, offload="none").fits  # 23.8 GB cannot sit in 8
    assert plan_memory(sizes, None, offload="blocks").resident_blocks == 0
    assert not plan_memory(sizes, None).stream_blocks
    assert plan_memory(sizes, 8, t5_policy="cpu").phases["encode"] < plan_memory(sizes, 8).phases["encode"]
    keep = plan_memory(sizes, 24, t5_policy="keep")
    assert keep.t5_policy == "keep" and keep.resident_blocks < plan_memory(sizes, 24).resident_blocks
    assert "8 GiB budget" in plan_memory(sizes, 8).describe()
    with pytest.raises(ValueError, match="t5_policy"):
        plan_memory(sizes, 8, t5_policy="sometimes")


# ------------------------------------------------------------------------------------------------
# T5 policies


@pytest.fixture(scope="module")
def pipeline_parts(tmp_path_factory):
    from safetensors.torch import save_file

    from flux_core.autoencoder import TINY_AE, AutoEncoder
    from flux_core.text_encoders import TINY_CLIP, TINY_T5, load_t5, random_text_encoders

    # 32 T5 tokens instead of 512 keep these CPU runs short; nothing here depends on the length
    encoders = random_text_encoders(TINY_T5, TINY_CLIP, dtype=torch.float32, t5_max_length=32)
    path = tmp_path_factory.mktemp("t5") / "t5.safetensors"
    save_file({k: v.contiguous() for k, v in encoders.t5.state_dict().items()}, path)
    torch.manual_seed(0)
    params = FluxParams(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=2, context_in_dim=64,
                        vec_in_dim=64)
    return params, AutoEncoder(TINY_AE).eval(), encoders, partial(load_t5, path, device="cpu", dtype=torch.float32)


def _models(parts, policy):
    from flux_core.pipeline import FluxModels

    params, ae, encoders, loader = parts
    encoders = copy.deepcopy(encoders)
    torch.manual_seed(0)
    models = FluxModels(Flux(params).eval().requires_grad_(False), copy.deepcopy(ae), encoders)
    sizes = sizes_of(models.transformer, encoders.t5, encoders.clip, ae)
    plan = plan_memory(sizes, None, offload="blocks", t5_policy=policy)
    return models, MemoryManager(models, "cpu", plan, t5_loader=loader)


@pytest.mark.parametrize("policy", ["keep", "offload", "cpu", "free"])
def test_t5_policies_give_the_same_embeddings_and_leave_the_t5_where_they_say(pipeline_parts, policy):
    plain, _ = _models(pipeline_parts, "keep")
    prompts = ["a juicy orange", "a blue cube"]
    expected = plain.text_encoders.encode(prompts)
    models, memory = _models(pipeline_parts, policy)
    encoders = models.text_encoders
    t5 = weakref.ref(encoders.t5)
    for round_ in range(2):
        with memory.encoding():
            txt, vec = encoders.encode(prompts)
        assert torch.equal(txt, expected[0]) and torch.equal(vec, expected[1])
        if policy == "free":
            gc.collect()
            assert encoders.t5 is None and t5() is None  # nothing holds the T5 any more
            assert memory.t5_loads == round_ and memory.t5_streamer is None
        elif policy == "offload":
            streamer = memory.t5_streamer
            assert streamer.loads == 2 * (round_ + 1)  # each of the 2 blocks copied once per prompt
            assert streamer.slot_buffers() == []  # slots handed back after encoding
            block = encoders.t5.encoder.block[1].layer[1].DenseReluDense.wo.weight
            assert _inside(block, streamer.blocks[1].host)
        else:
            assert encoders.t5 is t5() and memory.t5_streamer is None and memory.t5_loads == 0
    if policy == "free":
        assert memory.t5_loads == 1  # the second prompt loaded it again from its file


@torch.inference_mode()
def test_load_models_streams_frees_the_t5_and_generates_the_same_image():
    """The path the CLI takes: load_models(offload=..., t5_policy=...) on the demo files, then generate()."""
    from flux_core.demo import demo_model_files
    from flux_core.pipeline import generate, load_models

    files = demo_model_files()
    paths = (files["transformer"], files["tiny_autoencoder"], files["t5"], files["clip"])
    plain = load_models(*paths, dtype=torch.float32)
    managed = load_models(*paths, dtype=torch.float32, offload="blocks", t5_policy="free", plan_size=(64, 64))
    memory = managed.memory
    assert plain.memory is None and (memory.plan.width, memory.plan.resident_blocks) == (64, 0)
    kw = dict(image_size=64, num_inference_steps=1, seed=9, speed_mode="off")
    expected = generate("x", plain, **kw)
    for round_ in range(2):
        result = generate("x", managed, **kw)
        assert torch.equal(result.latents, expected.latents)
        assert result.images[0].tobytes() == expected.images[0].tobytes()
        assert managed.text_encoders.t5 is None and memory.t5_loads == round_  # freed; reloaded on the 2nd
        assert memory.transformer_streamer.slot_buffers() == []  # slots released before decoding
    assert result.settings["memory"]["t5_policy"] == "free"
    # per image: every block once, plus the first block prefetched for a next step that the release drops
    assert memory.transformer_streamer.loads == 2 * (len(memory.transformer_streamer.blocks) + 1)


# ------------------------------------------------------------------------------------------------
# tiled decoding


class _PointDecoder:
    """A decoder with no spatial context (each latent becomes an 8x8 patch): tiling must not change it."""

    class params:
        downscale = 8

    def parameters(self):
        yield torch.zeros(1)

    def decode(self, z):
        return (z[:, :3] * 2 + 1).repeat_interleave(8, 2).repeat_interleave(8, 3)


@pytest.mark.parametrize("tile, overlap", [(16, 4), (8, 2), (10, 7), (64, 8)])
def test_tiles_cover_the_image_and_blend_to_the_exact_result(tile, overlap):
    z = torch.randn(2, 16, 27, 33)
    out = decode_tiled(_PointDecoder(), z, tile, overlap)
    torch.testing.assert_close(out, _PointDecoder().decode(z), rtol=0, atol=1e-5)


@torch.inference_mode()
def test_one_tile_is_the_plain_decode(pipeline_parts):
    ae = pipeline_parts[1]
    z = torch.randn(1, 16, 12, 12)
    assert torch.equal(decode_tiled(ae, z, tile=12), ae.decode(z))


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: peak device memory is "
                    "only measurable there (torch.cuda.max_memory_allocated)")
@torch.inference_mode()
def test_cuda_streaming_stays_under_its_planned_peak_and_matches():
    params = FluxParams(depth=3, depth_single_blocks=6)  # full width, 9 of the 57 blocks: 3.9 GB in bf16
    with torch.device("meta"):
        reference = Flux(params)
    reference = reference.to(torch.bfloat16).to_empty(device="cuda").eval().requires_grad_(False)
    torch.manual_seed(0)
    for p in reference.parameters():  # random weights at trained-like scales, made on the GPU
        p.normal_(0, p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)
    x = {k: v.cuda() for k, v in _inputs(params, tokens=4096, text=512, dtype=torch.bfloat16).items()}
    expected = reference(**x)
    model = reference.cpu()
    sizes = sizes_of(model, None, None, nn.Linear(1, 1))
    budget = 2.5
    plan = plan_memory(sizes, budget, reserve_gib=0.0)
    assert plan.stream_blocks
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # the inputs and the reference output
    streamer = stream_transformer(model, "cuda", plan.resident_blocks)
    out = model(**x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(out, expected)
    assert peak <= plan.phases["denoise"] <= budget * GIB, (peak / GIB, plan.describe())
    assert all(p.device.type == "cpu" and p.is_pinned() for b in streamer.blocks for p in b.module.parameters())
