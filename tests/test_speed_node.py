"""The speed node (FluxJuicedSpeed) on a native MODEL inside the real ComfyUI 0.3.75 (in-process, CPU), and
its shipped workflow and the all-in-one node's speed_mode over HTTP.

The MODEL comes from the host's own loader (comfy.sd.load_diffusion_model, UNETLoader's call) on the tiny
random demo transformer (flux_core.demo, BFL layout). Detection hard-codes FLUX.1's 24 heads, so while
loading, the detected head count is set to hidden_size // 128 (as comfy_import.host_load_diffusion_model
does); everything else is the host's. Random weights say nothing about visual quality, so closeness is
judged against the exact reference, against the engine's own step cache on the same weights, and against
the cheapest honest alternative with the same number of full evaluations: fewer steps.
"""
from __future__ import annotations

import contextlib
import json
import importlib
import importlib.util
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from comfy_import import demo_conditioning, imported_pack, native_demo_model
from gguf_factory import one_torch_thread  # noqa: F401 (autouse: one thread for tiny tensors)
from transformer_factory import rel_l2
from flux_core.demo import demo_model_files
from flux_core.speed import StepCache, StepCacheConfig, plan_pattern, presets

pytestmark = pytest.mark.host

PACK_MODULE = "flux_juiced_pack_speed_test"
BUDGET_AT_28 = {presets.LIGHTLY_JUICED: 15, presets.JUICED: 12, presets.EXTRA_JUICED: 9, presets.BLINK: 6}
LATENT = (1, 16, 16, 16)  # 128x128 pixels: 64 image tokens
SEED = 11


def budget(mode: str, steps: int) -> int:
    return math.ceil(BUDGET_AT_28[mode] * steps / 28)  # 28: 15/12/9/6; 15: 9/7/5/4


def max_run(pattern: str) -> int:
    return max((len(r) for r in pattern.split("F")), default=0)


# ------------------------------------------------------------------------------------------------
# fixtures: the pack as ComfyUI imports it, a native MODEL, conditioning


@pytest.fixture(scope="module")
def pack(comfy):
    with imported_pack(PACK_MODULE) as module:
        assert "FluxJuicedSpeed" in module.NODE_CLASS_MAPPINGS, "the pack's nodes failed to import (see the log)"
        yield SimpleNamespace(nodes=module.NODE_CLASS_MAPPINGS, names=module.NODE_DISPLAY_NAME_MAPPINGS,
                              speed=importlib.import_module(f"{PACK_MODULE}.nodes.speed_node"),
                              cache=importlib.import_module(f"{PACK_MODULE}.nodes.host_step_cache"),
                              sampling=importlib.import_module(f"{PACK_MODULE}.nodes.flux_sampling"))


@pytest.fixture(scope="module")
def model(comfy):
    """A native MODEL: comfy.sd.load_diffusion_model (UNETLoader's own call) on the demo transformer file."""
    patcher = native_demo_model(comfy)
    assert type(patcher.model.diffusion_model) is comfy.ldm.flux.model.Flux
    return patcher


@pytest.fixture(scope="module")
def cond():
    return demo_conditioning()


def sample_ours(pack, model, cond, steps, seed=SEED):
    """The pack's sampling (our shifted sigmas, euler) through comfy.sample.sample_custom."""
    latent = {"samples": torch.zeros(LATENT)}
    return pack.sampling.sample(model, cond, latent, seed, steps, 3.5)["samples"]


def sample_native(comfy, model, cond, steps, scheduler="simple", sampler="euler", cfg=1.0, seed=SEED, callback=None):
    """The native KSampler path: comfy.sample.sample with a host scheduler."""
    import comfy.sample

    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, seed)
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, cond, negative, latent, seed=seed,
                               callback=callback, disable_pbar=True)


@contextlib.contextmanager
def stack_runs(model):
    """Counts how often the blocks after the first really ran: the list gets one entry per model call that
    ran all of them (a silent no-op cache, or one that still runs the skipped blocks, shows here)."""
    net = model.model.diffusion_model
    blocks = list(net.double_blocks)[1:] + list(net.single_blocks)
    counts = [0] * len(blocks)
    handles = [b.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(blocks)]
    calls = []
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
    assert len(set(counts)) == 1, f"some blocks ran more often than others: {counts}"
    calls.extend([1] * counts[0])


def speed(pack, model, mode):
    patched, cache = pack.speed.apply_speed_mode(model, mode)
    assert cache is not None
    return patched, cache


@pytest.fixture(scope="module")
def reference(pack, comfy, model, cond):
    return {("ours", steps): sample_ours(pack, model, cond, steps) for steps in (28, 15)} | {
        ("native", steps): sample_native(comfy, model, cond, steps) for steps in (28, 15)}


@pytest.fixture(scope="module")
def cached_runs(pack, comfy, model, cond):
    """Every preset at 28 and 15 steps, with our sigmas and with the native KSampler's simple scheduler."""
    runs = {}
    for mode in presets.SPEED_MODES:
        for steps in (28, 15):
            for path in ("ours", "native"):
                patched, cache = speed(pack, model, mode)
                with stack_runs(model) as calls:
                    out = (sample_ours(pack, patched, cond, steps) if path == "ours"
                           else sample_native(comfy, patched, cond, steps))
                runs[mode, steps, path] = SimpleNamespace(out=out, cache=cache, info=cache.last_run, stack=len(calls))
    return runs


# ------------------------------------------------------------------------------------------------
# the node


def test_node_offers_the_all_in_one_nodes_modes_plus_off(pack):
    node = pack.nodes["FluxJuicedSpeed"]
    assert pack.names["FluxJuicedSpeed"] == "FLUX.1 Speed Mode (Juiced)"
    spec = node.INPUT_TYPES()["required"]
    all_in_one = pack.nodes["FluxJuicedTextToImage"].INPUT_TYPES()["required"]["speed_mode"]
    assert spec["speed_mode"][0] == all_in_one[0] + ["Off"]
    assert spec["speed_mode"][1]["default"] == all_in_one[1]["default"] == presets.EXTRA_JUICED
    assert spec["model"][0] == "MODEL" and node.RETURN_TYPES == ("MODEL",)


@pytest.mark.parametrize("path", ["ours", "native"])
@pytest.mark.parametrize("steps", [28, 15])
@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_each_mode_stays_within_its_budget_on_a_native_model(cached_runs, mode, steps, path):
    run = cached_runs[mode, steps, path]
    config = presets.MODES[mode].cache
    info, pattern = run.info, run.info["pattern"]
    print(f"\n{path:6} {steps} steps {mode}: {info['full_evaluations']} full evaluations, {pattern}")
    assert info["speed_mode"] == mode and info["steps"] == steps and len(pattern) == steps
    assert config.warmup_steps + config.final_steps < info["full_evaluations"] <= budget(mode, steps), pattern
    assert info["full_evaluations"] == pattern.count("F") == info["full_model_calls"]
    assert info["model_calls"] == steps  # cfg 1: one call per step
    # The count is true: every block after the first ran exactly that often.
    assert run.stack == info["full_model_calls"]
    assert pattern.startswith("F" * config.warmup_steps) and pattern.endswith("F" * config.final_steps)
    assert max_run(pattern) <= config.max_consecutive_skips, pattern
    # The decisions are the engine's planner's on the measured changes, nothing else.
    changes = [step.change for step in run.cache.last_steps]
    assert plan_pattern(config, steps, changes) == pattern


@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_cached_output_is_close_to_the_uncached_one(pack, comfy, model, cond, reference, cached_runs, mode):
    """Relative L2 of the final latent against the uncached run at 28 steps, both sampling paths: at most 1%
    (measured 0.17-0.55%), and at most half the error of spending the same full evaluations on a shorter
    schedule (measured 3.6-5.9x smaller)."""
    for path, sample in (("ours", lambda m, n: sample_ours(pack, m, cond, n)),
                         ("native", lambda m, n: sample_native(comfy, m, cond, n))):
        run = cached_runs[mode, 28, path]
        ref = reference[path, 28]
        err = rel_l2(run.out, ref)
        fewer = rel_l2(sample(model, run.info["full_evaluations"]), ref)
        print(f"\n{path:6} {mode}: {run.info['full_evaluations']} full evaluations, rel L2 {err:.5f} "
              f"(fewer steps: {fewer:.5f})")
        assert err <= 0.01, err
        assert err <= 0.5 * fewer, (err, fewer)


@pytest.mark.parametrize("steps", [28, 15])
def test_the_node_gives_the_engines_step_cache_result(pack, comfy, model, cached_runs, cond, steps):
    """Same weights, noise, schedule and mode: the node on the host's FLUX and flux_core's StepCache on the
    engine's own transformer make the same decisions and the same latent (to float rounding; measured 1e-7)."""
    import comfy.latent_formats
    from flux_core import load_transformer, sampling

    engine = load_transformer(demo_model_files()["transformer"], dtype=torch.float32)
    size = LATENT[2] * 8
    inputs = sampling.prepare(sampling.get_noise(1, size, size, "cpu", torch.float32, SEED), cond[0][0],
                              cond[0][1]["pooled_output"])
    schedule = sampling.get_schedule(steps, inputs["img"].shape[1])

    def engine_run(config):
        cache = StepCache(engine, config, num_steps=steps)
        with torch.inference_mode():
            packed = sampling.denoise(cache, **inputs, timesteps=schedule, guidance=3.5)
        return comfy.latent_formats.Flux().process_out(sampling.unpack(packed, size, size)), cache  # host LATENT

    for mode in presets.SPEED_MODES:
        latent, cache = engine_run(presets.MODES[mode].cache)
        run = cached_runs[mode, steps, "ours"]
        assert run.info["pattern"] == cache.pattern(), mode
        assert rel_l2(run.out, latent) <= 1e-5, mode
    # Random features change erratically, so the probe above always picks plain reuse (order 0); the
    # linear and quadratic forecasts are compared with the order fixed.
    for order in (1, 2):
        config = presets.MODES[presets.JUICED].cache.with_(forecast_order=order, probe_order=False)
        latent, cache = engine_run(config)
        patched = model.clone()
        ours = pack.cache.HostStepCache("fixed order", config)
        ours.attach(patched)
        out = sample_ours(pack, patched, cond, steps)
        assert {d.order for d in cache.decisions if not d.full} == {order}
        assert ours.last_run["pattern"] == cache.pattern() and rel_l2(out, latent) <= 1e-5, order


def test_off_is_the_model_itself_and_bit_identical(pack, comfy, model, cond, reference):
    node = pack.nodes["FluxJuicedSpeed"]()
    (off,) = node.apply(model, "Off")
    assert off is model
    assert torch.equal(sample_ours(pack, off, cond, 15), reference["ours", 15])
    # Computing every step through the patches (cap 0: nothing ever skipped) is bit-identical too: the
    # split forward changes no arithmetic.
    patched = model.clone()
    every = pack.cache.HostStepCache("every step", StepCacheConfig(threshold=0.1, max_consecutive_skips=0))
    every.attach(patched)
    with stack_runs(model) as calls:
        assert torch.equal(sample_native(comfy, patched, cond, 15), reference["native", 15])
    assert every.last_run["pattern"] == "F" * 15 and len(calls) == 15


def test_same_inputs_same_image_and_same_decisions(pack, comfy, model, cond, cached_runs):
    for path in ("ours", "native"):
        first = cached_runs[presets.JUICED, 28, path]
        patched, cache = speed(pack, model, presets.JUICED)
        again = sample_ours(pack, patched, cond, 28) if path == "ours" else sample_native(comfy, patched, cond, 28)
        assert torch.equal(again, first.out)
        assert cache.last_run == first.info
        assert [(s.full, s.reason, s.change) for s in cache.last_steps] == \
               [(s.full, s.reason, s.change) for s in first.cache.last_steps]


def test_the_input_model_is_untouched(pack, comfy, model, cond, reference):
    before_options = repr(model.model_options)
    before_wrappers = {k: {kk: list(v) for kk, v in w.items()} for k, w in model.wrappers.items()}
    patched, _ = speed(pack, model, presets.BLINK)
    assert patched is not model
    assert repr(model.model_options) == before_options and model.wrappers == before_wrappers
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert patched.model_options["transformer_options"]["patches_replace"]["dit"]
    sample_native(comfy, patched, cond, 15)
    # Sampling the original after the patched clone ran gives the reference, bit for bit.
    assert torch.equal(sample_native(comfy, model, cond, 15), reference["native", 15])


def test_every_sampling_run_starts_fresh_even_after_an_interrupted_one(pack, comfy, model, cond, cached_runs):
    fresh = cached_runs[presets.EXTRA_JUICED, 15, "native"]
    patched, cache = speed(pack, model, presets.EXTRA_JUICED)

    class Stop(Exception):
        pass

    def stop_at_step_6(step, *_):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        sample_native(comfy, patched, cond, 15, callback=stop_at_step_6)
    assert cache.last_run is None  # an interrupted run reports nothing
    for _ in range(2):
        assert torch.equal(sample_native(comfy, patched, cond, 15), fresh.out)
        assert cache.last_run == fresh.info


def test_other_schedulers_cfg_and_second_order_samplers(pack, comfy, model, cond):
    """Sigmas that are not ours: the step comes from the run's schedule, so the counts stay per step, and the
    result stays close to the uncached run of the same sampler (measured rel L2 in the test output)."""
    mode = presets.JUICED
    cases = [  # (steps, sampler, scheduler, cfg, model calls)
        (20, "euler", "beta", 2.0, 20),  # cond and uncond in one batch: one call per step
        (12, "heun", "simple", 1.0, 2 * 12 - 1),  # two calls per step (the second at the next sigma), the last one
        (12, "dpm_2", "simple", 1.0, 2 * 12 - 1),  # the second call at an in-between sigma
    ]
    for steps, sampler, scheduler, cfg, calls in cases:
        exact = sample_native(comfy, model, cond, steps, scheduler=scheduler, sampler=sampler, cfg=cfg)
        patched, cache = speed(pack, model, mode)
        with stack_runs(model) as ran:
            out = sample_native(comfy, patched, cond, steps, scheduler=scheduler, sampler=sampler, cfg=cfg)
        info, err = cache.last_run, rel_l2(out, exact)
        print(f"\n{sampler}/{scheduler} cfg {cfg}, {steps} steps: {info['pattern']}, {info['full_model_calls']} of "
              f"{info['model_calls']} calls in full, rel L2 {err:.5f}")
        assert info["steps"] == steps and "-" not in info["pattern"] and info["model_calls"] == calls
        assert info["full_evaluations"] <= budget(mode, steps) and len(ran) == info["full_model_calls"]
        assert info["full_model_calls"] < calls
        assert torch.isfinite(out).all() and err <= 0.02, err


def test_a_second_speed_node_replaces_the_first(pack, comfy, model, cond, cached_runs):
    twice, _ = speed(pack, speed(pack, model, presets.LIGHTLY_JUICED)[0], presets.BLINK)
    key = pack.cache.KEY
    assert all(len(twice.wrappers[kind][key]) == 1 for kind in ("outer_sample", "diffusion_model"))
    assert torch.equal(sample_native(comfy, twice, cond, 28), cached_runs[presets.BLINK, 28, "native"].out)


def test_a_later_patch_on_its_blocks_turns_skipping_off_not_half_on(pack, comfy, model, cond, reference, caplog):
    patched, cache = speed(pack, model, presets.BLINK)
    late = patched.clone()
    late.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "single_block", 1)
    with caplog.at_level(logging.WARNING):
        out = sample_native(comfy, late, cond, 15)
    assert torch.equal(out, reference["native", 15])
    assert cache.last_run["pattern"] == "F" * 15
    assert "replaced some of this node's block patches" in caplog.text


def test_a_model_that_is_not_the_hosts_flux_is_refused(pack, model):
    other = model.clone()
    other.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs a FLUX.1 MODEL"):
        pack.speed.apply_speed_mode(other, presets.JUICED)
    with pytest.raises(ValueError, match="speed_mode must be one of"):
        pack.speed.apply_speed_mode(model, "Turbo")


# ------------------------------------------------------------------------------------------------
# runtime choices: compile through the host's torch.compile wrapper; attention stays the host's, and so do the
# matmuls of a MODEL without packed fp8 layers (those: test_speed_node_fp8.py)

COMPILE_ENV = "FLUX_JUICED_COMPILE"


def compile_wrappers(model):
    from comfy.patcher_extension import WrappersMP

    return model.get_wrappers(WrappersMP.APPLY_MODEL, "torch.compile")


def test_on_a_cpu_the_modes_stay_eager_and_say_why(pack, model, monkeypatch, caplog):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="flux_juiced.speed"):
        patched, cache = speed(pack, model, presets.JUICED)
    assert not compile_wrappers(patched) and "torch_compile_kwargs" not in patched.model_options
    choices = cache.acceleration
    json.dumps(choices)  # goes into image metadata as it is
    assert choices["device"] == "cpu" and choices["dtype"] == "float32"
    assert choices["compile"] is False and choices["compiled_blocks"] == 0 and choices["compile_backend"] is None
    assert "on a CPU compiled blocks measured no faster" in choices["compile_reason"]
    assert f"{COMPILE_ENV}=on forces it" in choices["compile_reason"]
    assert choices["options"]["compile"] == "auto" and choices["compile_request_from"] == "speed mode"
    # Attention and matmuls stay ComfyUI's (fp8 matmuls need packed fp8 layers: test_speed_node_fp8.py); the
    # engine's own choice (fp8 for Juiced, not on a CPU) is recorded.
    assert choices["attention"].startswith("comfyui:") and choices["engine_attention"] == "sdpa"
    assert "does not replace host attention" in choices["attention_reason"]
    assert choices["precision"] == "comfyui" and "adds no fp8 matmuls" in choices["precision_reason"]
    assert choices["engine_precision"] == "native" and "not fp8" in choices["precision_reason"]
    assert choices["fp8_layers"] == 0 and "load with weight_dtype fp8" in choices["fp8_reason"]  # no packed layers
    (line,) = [r.getMessage() for r in caplog.records if "compile off" in r.getMessage()]
    assert line.startswith("FLUX.1 Speed Mode (Juiced) [juiced]: compile off (eager: on a CPU")
    monkeypatch.setenv(COMPILE_ENV, "off")
    choices = speed(pack, model, presets.BLINK)[1].acceleration
    assert choices["compile"] is False and choices["compile_reason"] == "compilation off, as requested"
    assert choices["compile_request_from"] == COMPILE_ENV


def test_forced_compile_runs_the_compiled_blocks_with_the_same_result(pack, model, cond, monkeypatch, caplog):
    """FLUX_JUICED_COMPILE=on on a CPU: each block compiled through ComfyUI's set_torch_compile_wrapper, under
    the step cache's block patches. Same decisions, same latent up to float rounding, and the blocks the host
    ran during the model calls were the compiled ones."""
    from comfy.patcher_extension import WrappersMP
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    mode, steps = presets.EXTRA_JUICED, 15
    # The host's CPU default attention (sub-quadratic) asks psutil for free memory inside every call, which
    # breaks the compiled graph there and recompiles whenever the number changes; its public override hook
    # swaps in its PyTorch SDPA attention (its GPU default) for both runs, which keeps compiling quick.
    from comfy.ldm.modules.attention import get_attention_function

    sdpa = get_attention_function("pytorch")
    base = model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda func, *args, **kwargs: sdpa(*args, **kwargs)
    monkeypatch.setenv(COMPILE_ENV, "off")
    eager, eager_cache = speed(pack, base, mode)
    expected = sample_ours(pack, eager, cond, steps)
    monkeypatch.setenv(COMPILE_ENV, "on")
    with caplog.at_level(logging.INFO, logger="flux_juiced.speed"):
        compiled, cache = speed(pack, base, mode)
    assert compile_wrappers(compiled) and not compile_wrappers(base) and not compile_wrappers(model)
    assert "torch_compile_kwargs" not in base.model_options
    assert compiled.model_options["torch_compile_kwargs"]["backend"] == "inductor"
    net = model.model.diffusion_model
    originals = list(net.double_blocks) + list(net.single_blocks)
    choices, blocks = cache.acceleration, len(originals)
    assert choices["compile"] is True and choices["compiled_blocks"] == blocks
    assert choices["compile_backend"] == "inductor"
    assert "set_torch_compile_wrapper" in choices["compile_reason"] and choices["compile_request_from"] == COMPILE_ENV
    assert f"compile on, {blocks} blocks" in caplog.text

    seen = []

    def spy(executor, *args, **kwargs):  # inside apply_model: what the host's block lists hold right now
        seen.append({type(b) for b in (*net.double_blocks, *net.single_blocks)})
        return executor(*args, **kwargs)

    compiled.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "flux_juiced_test_spy", spy)
    torch._dynamo.reset()
    counters.clear()
    try:
        out = sample_ours(pack, compiled, cond, steps)
        frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    err = rel_l2(out, expected)
    print(f"\ncompiled {mode}: {cache.last_run['pattern']}, rel L2 {err:.2e} against eager, "
          f"{frames} frames compiled, {graphs} graphs")
    assert cache.last_run == eager_cache.last_run  # same decisions, same counts
    assert cache.last_run["full_evaluations"] < steps
    assert err < 1e-4, err
    assert len(seen) == steps and all(kinds == {OptimizedModule} for kinds in seen)
    assert list(net.double_blocks) + list(net.single_blocks) == originals  # swapped back after each call
    assert frames == graphs == 2  # one graph per block kind, shared by all blocks of that kind; no recompiles

    # A later speed node with compile off takes its compile wrapper off again.
    monkeypatch.setenv(COMPILE_ENV, "off")
    again, again_cache = speed(pack, compiled, mode)
    assert not compile_wrappers(again) and "torch_compile_kwargs" not in again.model_options
    assert again_cache.acceleration["compile"] is False


def test_another_nodes_torch_compile_is_left_alone(pack, model, monkeypatch):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    theirs = model.clone()
    set_torch_compile_wrapper(theirs, backend="inductor")  # TorchCompileModel's call: the whole diffusion_model
    wrapper = compile_wrappers(theirs)[0]
    monkeypatch.setenv(COMPILE_ENV, "on")
    patched, cache = speed(pack, theirs, presets.JUICED)
    assert compile_wrappers(patched) == [wrapper]
    assert cache.acceleration["compile"] is False and "another node" in cache.acceleration["compile_reason"]
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# the real server over HTTP: the shipped workflow and the all-in-one node


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server with the demo weights; one torch thread (tiny tensors, shared cores); compile left to the
    modes (eager on this CPU) whatever the calling shell sets."""
    import workflow_tools as wt
    from host_server import ComfyServer

    server = ComfyServer(tmp_path_factory.mktemp("comfy_speed"),
                         env={"OMP_NUM_THREADS": "1", COMPILE_ENV: "auto"}).start()
    try:
        wt.place_demo_models(server, [wt.load_api(name) for name in wt.LOCAL_WORKFLOWS])
        yield server
    finally:
        server.stop()


def saved_settings(server, prompt: dict, node_id: str) -> dict:
    import workflow_tools as wt
    from host_server import messages

    entry = server.run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success", str(messages(entry))[:3000]
    (image,) = entry["outputs"][node_id]["images"]
    return wt.read_metadata(server.view(image))["settings"]


def test_the_host_lists_the_speed_node(server):
    from host_server import PACK_NAME

    info = server.object_info()["FluxJuicedSpeed"]
    assert info["display_name"] == "FLUX.1 Speed Mode (Juiced)" and info["python_module"] == f"custom_nodes.{PACK_NAME}"
    assert info["category"] == "FLUX.1 [dev] Juiced" and len(info["description"]) > 40
    speed_mode = info["input"]["required"]["speed_mode"]
    assert speed_mode[0] == presets.SPEED_MODES + ["Off"] and speed_mode[1]["default"] == presets.EXTRA_JUICED
    assert all(spec[1].get("tooltip") for spec in info["input"]["required"].values())
    assert info["output"] == ["MODEL"] and all(info["output_tooltips"])


def test_the_shipped_speed_workflow_saves_its_evaluations(server):
    import workflow_tools as wt

    prompt = wt.shrink(wt.load_api("flux_speed_native"), steps=28, latent_scale=16)  # 64x64 pixels
    (speed_id, _), = wt.nodes_of(prompt, "FluxJuicedSpeed")
    (sampler_id, _), = wt.nodes_of(prompt, "FluxJuicedSampler")
    (save_id, _), = wt.nodes_of(prompt, "FluxJuicedSaveImage")
    assert prompt[speed_id]["inputs"]["speed_mode"] == presets.EXTRA_JUICED
    for mode, steps, expected in ((presets.EXTRA_JUICED, 28, 9), (presets.BLINK, 15, 4), ("Off", 15, None)):
        prompt[speed_id]["inputs"]["speed_mode"] = mode
        prompt[sampler_id]["inputs"].update(steps=steps, seed=7)
        settings = saved_settings(server, prompt, save_id)
        assert settings["FluxJuicedSpeed"] == {"speed_mode": mode}
        if expected is None:  # Off: the MODEL itself, nothing cached, nothing counted
            assert "evaluations" not in settings and "step_cache" not in settings and "acceleration" not in settings
            continue
        cache = settings["step_cache"]
        assert settings["evaluations"] == cache["full_evaluations"] == expected == cache["pattern"].count("F")
        assert cache["steps"] == cache["model_calls"] == steps and cache["speed_mode"] == mode
        assert settings["acceleration"]["compile"] is False and settings["acceleration"]["device"] == "cpu"
    assert "FLUX.1 Speed Mode (Juiced) [extra-juiced]: 9 of 28 steps evaluated in full" in server.log()
    assert "FLUX.1 Speed Mode (Juiced) [blink-of-an-eye]: 4 of 15 steps evaluated in full" in server.log()


def test_the_all_in_one_nodes_speed_mode_runs_the_same_machinery(server):
    import workflow_tools as wt

    prompt = wt.shrink(wt.load_api("flux_text_to_image"), image_size=64)
    (node_id, node), = wt.nodes_of(prompt, "FluxJuicedTextToImage")
    for mode, steps, expected in ((presets.JUICED, 28, 12), (presets.LIGHTLY_JUICED, 15, 9)):
        node["inputs"].update(speed_mode=mode, num_inference_steps=steps, seed=3, output_format="png")
        settings = saved_settings(server, prompt, node_id)
        assert settings["speed_mode"] == mode and settings["num_inference_steps"] == steps
        assert settings["evaluations"] == settings["step_cache"]["full_evaluations"] == expected
        assert settings["step_cache"]["pattern"].count("F") == expected
        choices = settings["acceleration"]
        assert choices["compile"] is False and "on a CPU" in choices["compile_reason"]
        assert choices["attention"].startswith("comfyui:") and choices["precision"] == "comfyui"
    assert "FLUX.1 Speed Mode (Juiced) [juiced]: compile off (eager: on a CPU" in server.log()
