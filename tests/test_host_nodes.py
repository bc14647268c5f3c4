"""The pack's nodes inside a real ComfyUI 0.3.75 server: how the host sees them (/object_info, start-up log),
progress and previews over the websocket, interruption, missing model files, bad input values, and the
seed -1 promise (a new seed every run, never a cached result).
"""
from __future__ import annotations

import json
import re
import time

import pytest

import workflow_tools as wt
from flux_core.model_files import MODEL_FILES
from host_server import PACK_NAME, messages

pytestmark = pytest.mark.host

PACK_NODES = ("FluxJuicedTransformerLoader", "FluxJuicedTextEncoderLoader", "FluxJuicedVAELoader",
              "FluxJuicedSampler", "FluxJuicedTextToImage", "FluxJuicedSaveImage")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with wt.demo_server(tmp_path_factory.mktemp("comfy_nodes")) as server:
        yield server


@pytest.fixture(scope="module")
def ws(server):
    with wt.WsClient(server) as client:
        yield client


def text_to_image(**inputs) -> dict:
    """The shipped all-in-one graph, small and quick, with some inputs replaced."""
    prompt = wt.shrink(wt.load_api("flux_text_to_image"), steps=1, image_size=64)
    prompt["1"]["inputs"].update(inputs)
    return prompt


def modular(steps: int = 2, **changes) -> dict:
    """The shipped modular graph, small; changes: {node class: {input: value}}."""
    prompt = wt.shrink(wt.load_api("flux_modular"), steps=steps, latent_scale=16)
    for class_type, values in changes.items():
        for _, node in wt.nodes_of(prompt, class_type):
            node["inputs"].update(values)
    return prompt


def assert_next_prompt_succeeds(server):
    entry = server.run(text_to_image(seed=-1), timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(messages(entry))[:2000]


# ------------------------------------------------------------------------------------------------
# how the host sees the pack


def test_every_pack_node_is_listed_with_description_and_tooltips(server):
    info = server.object_info()
    for node_id in PACK_NODES:
        node = info.get(node_id)
        assert node is not None, f"{node_id} missing from /object_info"
        assert node["python_module"] == f"custom_nodes.{PACK_NAME}"
        assert node["display_name"] and node["display_name"] != node_id
        assert node["category"].startswith("FLUX.1 [dev] Juiced")
        assert len(node["description"]) > 40, node_id
        inputs = list(wt.ordered_inputs(node))
        assert inputs, node_id
        for name, spec, _ in inputs:
            assert wt.input_options(spec).get("tooltip"), f"{node_id}.{name} has no tooltip"
        if node["output"]:
            assert len(node.get("output_tooltips", [])) == len(node["output"]), node_id
            assert all(node["output_tooltips"]), node_id
    assert info["FluxJuicedSaveImage"]["output_node"] and info["FluxJuicedTextToImage"]["output_node"]
    # The all-in-one node offers the design table's inputs with its defaults.
    t2i = info["FluxJuicedTextToImage"]["input"]["required"]
    assert t2i["aspect_ratio"][0][:2] == ["1:1", "16:9"] and t2i["aspect_ratio"][1]["default"] == "1:1"
    assert t2i["num_inference_steps"][1]["default"] == 28 and t2i["guidance"][1]["default"] == 3.5
    assert t2i["seed"][1]["default"] == -1 and t2i["image_size"][1]["default"] == 1024
    assert t2i["output_format"][0] == ["jpg", "png", "webp"] and t2i["output_quality"][1]["default"] == 80


def test_server_log_shows_the_pack_imported(server):
    log = server.log()
    timing = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_NAME}")
              or f"custom_nodes/{PACK_NAME} " in line]
    assert timing, "the pack is missing from the host's import-time table"
    assert not any("IMPORT FAILED" in line for line in timing), timing
    assert "the nodes failed to load" not in log
    assert not re.search(rf"Cannot import .*{re.escape(PACK_NAME)}", log)


# ------------------------------------------------------------------------------------------------
# progress, previews, interruption


@pytest.mark.parametrize("graph", ["flux_modular", "flux_text_to_image"])
def test_progress_for_every_step_and_latent_previews(server, ws, graph):
    steps = 4
    if graph == "flux_modular":
        prompt = modular(steps=steps, FluxJuicedSampler={"seed": 7})
        (node_id, _), = wt.nodes_of(prompt, "FluxJuicedSampler")
    else:
        prompt = text_to_image(num_inference_steps=steps, seed=7, image_size=96)
        node_id = "1"
    prompt_id, seen = ws.run(prompt)
    assert wt.of_type(seen, "execution_success"), wt.summarize(seen)
    progress = [m for m in wt.of_type(seen, "progress") if m["node"] == node_id]
    assert [(m["value"], m["max"]) for m in progress] == [(i, steps) for i in range(1, steps + 1)]
    assert all(m["prompt_id"] == prompt_id for m in progress)
    previews = [m for m in seen if m[0] == "binary" and m[1] == 1]  # PREVIEW_IMAGE: format, then the image
    assert previews, wt.summarize(seen)
    fmt, image = previews[0][2][:4], previews[0][2][4:]
    assert wt.image_format(image) in ("jpg", "png")
    assert int.from_bytes(fmt, "big") in (1, 2)  # 1 = JPEG, 2 = PNG


def test_interrupt_stops_sampling_within_a_few_steps_then_the_next_prompt_runs(server, ws):
    steps = 50
    prompt = text_to_image(num_inference_steps=steps, image_size=1024, seed=11)
    state = {"at": None, "sent": None}

    def interrupt_on_first_step(message):
        if message[0] == "json" and message[1]["type"] == "progress" and state["at"] is None:
            state["at"] = message[1]["data"]["value"]
            state["sent"] = time.monotonic()
            response = server.post("/interrupt", {"prompt_id": message[1]["data"]["prompt_id"]})
            assert response.status_code == 200

    prompt_id, seen = ws.run(prompt, on_message=interrupt_on_first_step, timeout=300)
    interrupted = wt.of_type(seen, "execution_interrupted")
    assert interrupted and interrupted[0]["node_id"] == "1" and interrupted[0]["node_type"] == "FluxJuicedTextToImage"
    assert not wt.of_type(seen, "execution_success") and not wt.of_type(seen, "execution_error")
    values = [m["value"] for m in wt.of_type(seen, "progress")]
    assert state["at"] is not None and max(values) <= state["at"] + 3, values
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages(entry)
    assert not entry["outputs"].get("1", {}).get("images")
    assert_next_prompt_succeeds(server)


# ------------------------------------------------------------------------------------------------
# missing models and bad input values

SPECS = {spec.role: spec for spec in MODEL_FILES}


@pytest.mark.parametrize("graph,class_type,input_name,role", [
    ("flux_modular", "FluxJuicedTransformerLoader", "transformer_name", "transformer"),
    ("flux_modular", "FluxJuicedTextEncoderLoader", "t5_name", "t5"),
    ("flux_modular", "FluxJuicedTextEncoderLoader", "clip_name", "clip"),
    ("flux_modular", "FluxJuicedVAELoader", "vae_name", "autoencoder"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "transformer_name", "transformer"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "vae_name", "autoencoder"),
])
def test_missing_model_file_names_the_file_and_the_fix(server, graph, class_type, input_name, role):
    missing = f"not-downloaded-{role}.safetensors"
    prompt = modular() if graph == "flux_modular" else text_to_image(seed=-1)
    (node_id, node), = wt.nodes_of(prompt, class_type)
    node["inputs"][input_name] = missing
    entry = server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "error"
    error = messages(entry)["execution_error"]
    assert error["node_id"] == node_id and error["node_type"] == class_type
    text = error["exception_message"]
    spec = SPECS[role]
    assert missing in text, text
    assert spec.url in text and f"models/{spec.folder}" in text, text
    assert_next_prompt_succeeds(server)


REFUSED = [
    ("flux_text_to_image", "FluxJuicedTextToImage", "aspect_ratio", "7:3", "value_not_in_list"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "speed_mode", "Warp 9", "value_not_in_list"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "output_format", "gif", "value_not_in_list"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "num_inference_steps", 0, "value_smaller_than_min"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "num_inference_steps", 51, "value_bigger_than_max"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "guidance", 10.5, "value_bigger_than_max"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "seed", -5, "value_smaller_than_min"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "image_size", 32, "value_smaller_than_min"),
    ("flux_text_to_image", "FluxJuicedTextToImage", "output_quality", 0, "value_smaller_than_min"),
    ("flux_modular", "FluxJuicedSampler", "seed", -5, "value_smaller_than_min"),
    ("flux_modular", "FluxJuicedSampler", "steps", 0, "value_smaller_than_min"),
    ("flux_modular", "FluxJuicedTransformerLoader", "weight_dtype", "int4", "custom_validation_failed"),
    ("flux_modular", "FluxJuicedSaveImage", "output_format", "bmp", "value_not_in_list"),
]


@pytest.mark.parametrize("graph,class_type,input_name,value,error_type", REFUSED,
                         ids=[f"{c}.{i}={v}" for _, c, i, v, _ in REFUSED])
def test_bad_input_values_are_refused_naming_the_input(server, graph, class_type, input_name, value, error_type):
    prompt = modular() if graph == "flux_modular" else text_to_image()
    (node_id, node), = wt.nodes_of(prompt, class_type)
    node["inputs"][input_name] = value
    response = server.queue(prompt)
    assert response.status_code == 400, response.text[:500]
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"][node_id]["errors"]
    ours = [e for e in errors if e["extra_info"].get("input_name") == input_name]
    assert ours and ours[0]["type"] == error_type, errors
    assert input_name in ours[0]["details"]
    if error_type == "custom_validation_failed":
        assert "must be one of" in ours[0]["details"]  # the pack's own message, with the choices


def test_empty_prompt_fails_with_a_clear_message(server):
    entry = server.run(text_to_image(prompt="   "), timeout=120)
    assert entry["status"]["status_str"] == "error"
    assert "prompt is empty" in messages(entry)["execution_error"]["exception_message"]


# ------------------------------------------------------------------------------------------------
# seeds


def test_seed_minus_one_draws_a_new_seed_every_run_and_a_fixed_seed_is_cached(server):
    """-1 means random: queueing the same graph again must run again with a new seed (the host would
    otherwise serve its cached result), while a fixed seed may be served from the cache."""
    seeds = []
    for _ in range(2):
        entry = server.run(modular(FluxJuicedSampler={"seed": -1}), timeout=120)
        assert entry["status"]["status_str"] == "success"
        sampler_id = wt.nodes_of(modular(), "FluxJuicedSampler")[0][0]
        assert sampler_id not in messages(entry)["execution_cached"]["nodes"]
        seeds.append(wt.seed_from_ui(entry["outputs"][sampler_id]))
    assert all(isinstance(s, int) and s >= 0 for s in seeds) and seeds[0] != seeds[1]
    for expect_cached in (False, True):
        entry = server.run(modular(FluxJuicedSampler={"seed": 5}), timeout=120)
        assert entry["status"]["status_str"] == "success"
        cached = messages(entry)["execution_cached"]["nodes"]
        assert (wt.nodes_of(modular(), "FluxJuicedSampler")[0][0] in cached) == expect_cached
