"""The pack's shareable workflows against the real ComfyUI 0.3.75 host.

UI-format graphs (example_workflows/, served as the pack's templates) must load in the editor: only node
types the host knows, the widget values laid out as the editor lays them out, consistent links, and the
same graph as the shipped API-format file (workflows/api/) once converted. Every API-format graph must run
over /prompt on tiny random weights placed under the file names the graphs use, and give images of the
right size and format whose files carry the prompt, the seed really used and the graphs.
"""
from __future__ import annotations

import json
import re
from io import BytesIO

import pytest
from PIL import Image

import workflow_tools as wt
from flux_core import presets
from flux_core.model_files import MODEL_FILES
from host_server import PACK_NAME, messages

pytestmark = pytest.mark.host

SAVERS = ("FluxJuicedTextToImage", "FluxJuicedSaveImage", "SaveImage")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with wt.demo_server(tmp_path_factory.mktemp("comfy_workflows")) as server:
        yield server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ------------------------------------------------------------------------------------------------
# where the files live and how the host serves them


def test_layout_ui_files_in_the_served_folder_api_files_elsewhere():
    ui_files = sorted(p.stem for p in wt.UI_DIR.glob("*.json"))
    api_files = sorted(p.stem for p in wt.API_DIR.glob("*.json"))
    assert ui_files == sorted(wt.WORKFLOWS)
    assert api_files == sorted(wt.WORKFLOWS)
    for name in wt.WORKFLOWS:
        ui, api = wt.load_ui(name), wt.load_api(name)
        assert "nodes" in ui and "links" in ui, f"{name}: the served folder must hold UI-format graphs only"
        assert all("class_type" in node and "inputs" in node for node in api.values()), name
    # The host serves example_workflows/ (and workflows/, which must therefore not hold API files at its top).
    assert not list((wt.REPO / "workflows").glob("*.json"))


def test_templates_are_served_by_the_host(server):
    listed = server.get("/workflow_templates").json()
    assert sorted(listed.get(PACK_NAME, [])) == sorted(wt.WORKFLOWS), listed
    for name in wt.WORKFLOWS:
        response = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert response.status_code == 200, name
        assert response.json() == wt.load_ui(name)


# ------------------------------------------------------------------------------------------------
# UI format


@pytest.mark.parametrize("name", wt.WORKFLOWS)
def test_ui_workflow_matches_the_hosts_node_definitions(name, object_info):
    ui = wt.load_ui(name)
    assert wt.check_ui_workflow(ui, object_info) == []
    assert any(node["type"].startswith("FluxJuiced") for node in ui["nodes"])


@pytest.mark.parametrize("name", wt.WORKFLOWS)
def test_ui_workflow_converts_to_the_shipped_api_workflow(name, object_info):
    converted = wt.ui_to_api(wt.load_ui(name), object_info)
    shipped = wt.load_api(name)
    assert wt.api_graph(converted) == wt.api_graph(shipped)
    for node_id, node in shipped.items():
        assert node["_meta"]["title"] == converted[node_id]["_meta"]["title"], node_id


def test_widget_layout_follows_the_official_templates(object_info):
    """The layout rules reproduce the host's own FLUX.1 [dev] template (seed, "randomize", steps, ...)."""
    import comfyui_workflow_templates_media_image as media

    templates = wt.Path(media.__file__).parent / "templates"
    template = json.loads((templates / "flux_dev_full_text_to_image.json").read_text())
    assert wt.check_ui_workflow(template, object_info) == []
    ksampler = next(n for n in template["nodes"] if n["type"] == "KSampler")
    layout = [name for name, _ in wt.widget_layout(object_info["KSampler"])]
    assert layout == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert ksampler["widgets_values"][1] == "randomize"
    api = wt.ui_to_api(template, object_info)
    assert "43" not in api  # the MarkdownNote stays in the editor
    assert wt.api_graph(api)["31"] == {"class_type": "KSampler", "inputs": {
        "model": ["38", 0], "seed": 192044955347061, "steps": 20, "cfg": 1, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["41", 0], "negative": ["42", 0], "latent_image": ["27", 0],
        "denoise": 1}}
    assert api["41"]["inputs"]["guidance"] == 3.5 and api["40"]["inputs"]["type"] == "flux"


def test_the_checker_catches_broken_workflows(object_info):
    """The UI checks are not vacuous: each kind of damage a hand edit can do is reported."""
    import copy

    original = wt.load_ui("flux_modular")
    sampler = next(i for i, n in enumerate(original["nodes"]) if n["type"] == "FluxJuicedSampler")

    def broken(edit):
        ui = copy.deepcopy(original)
        edit(ui)
        return wt.check_ui_workflow(ui, object_info)

    assert broken(lambda ui: ui["nodes"][sampler]["widgets_values"].pop(1))  # the seed's control value dropped
    assert broken(lambda ui: ui["nodes"][sampler].update(type="FluxJuicedSamplerV2"))  # unknown node type
    assert broken(lambda ui: ui["nodes"][sampler]["widgets_values"].__setitem__(2, 0))  # steps below min
    assert broken(lambda ui: ui["links"][0].__setitem__(5, "MODEL"))  # link type does not match the output
    assert broken(lambda ui: ui["links"][0].__setitem__(4, 3))  # link ends in a slot that does not hold it
    assert broken(lambda ui: ui["nodes"][sampler]["inputs"][0].update(link=None))  # required input unlinked
    assert broken(lambda ui: ui.update(version=0.3))


@pytest.mark.parametrize("name", wt.WORKFLOWS)
def test_ui_workflow_model_links_and_pack_identity(name):
    """Every node naming model files lists them in properties.models (name, download url, folder), so the
    editor's missing-model dialog can fetch them; the pack's nodes carry the pack's registry id."""
    pack_id = re.search(r'^name = "([^"]+)"', (wt.REPO / "pyproject.toml").read_text(), re.M).group(1)
    by_name = {spec.names[0]: spec for spec in MODEL_FILES}
    api = wt.load_api(name)
    for node in wt.load_ui(name)["nodes"]:
        if node["type"] in wt.FRONTEND_ONLY:
            continue
        inputs = api[str(node["id"])]["inputs"]
        files = [(value, wt.MODEL_INPUTS[key][1]) for key, value in inputs.items() if key in wt.MODEL_INPUTS]
        expected = [{"name": file, "url": by_name[file].url, "directory": folder} for file, folder in files]
        assert all(by_name[file].folder == folder for file, folder in files)
        assert node["properties"].get("models", []) == expected, node["type"]
        if node["type"].startswith("FluxJuiced"):
            assert node["properties"]["cnr_id"] == pack_id
        else:
            assert node["properties"]["cnr_id"] == "comfy-core"


def test_shipped_settings_are_the_designs_defaults():
    """What a user gets when opening the graphs: the design table's defaults, real sizes, the standard names."""
    t2i = wt.nodes_of(wt.load_api("flux_text_to_image"), "FluxJuicedTextToImage")[0][1]["inputs"]
    assert (t2i["aspect_ratio"], t2i["num_inference_steps"], t2i["guidance"], t2i["seed"], t2i["image_size"],
            t2i["output_format"], t2i["output_quality"]) == ("1:1", 28, 3.5, -1, 1024, "jpg", 80)
    native = wt.load_api("flux_native_ksampler")
    ksampler = wt.nodes_of(native, "KSampler")[0][1]["inputs"]
    assert (ksampler["cfg"], ksampler["sampler_name"], ksampler["scheduler"], ksampler["denoise"]) == (
        1.0, "euler", "simple", 1.0)
    assert wt.nodes_of(native, "FluxGuidance")[0][1]["inputs"]["guidance"] == 3.5
    negative = native[ksampler["negative"][0]]
    assert negative["class_type"] == "ConditioningZeroOut"
    variations = wt.load_api("flux_variations")
    assert wt.nodes_of(variations, "EmptySD3LatentImage")[0][1]["inputs"]["batch_size"] == 4
    for name in ("flux_modular", "flux_variations"):
        prompt = wt.load_api(name)
        (sampler_id, _), = wt.nodes_of(prompt, "FluxJuicedSampler")
        (_, save), = wt.nodes_of(prompt, "FluxJuicedSaveImage")
        assert save["inputs"]["seed"] == [sampler_id, 1], f"{name}: the sampler's seed must reach the save node"


# ------------------------------------------------------------------------------------------------
# API format: run every graph


def expected_size(prompt: dict, node_id: str) -> tuple[int, int]:
    """(width, height) the saved images of a saving node must have, from the graph's own settings."""
    node = prompt[node_id]
    if node["class_type"] == "FluxJuicedTextToImage":
        return presets.dimensions(node["inputs"]["aspect_ratio"], node["inputs"]["image_size"])
    latent = wt.nodes_of(prompt, "EmptySD3LatentImage")[0][1]["inputs"]
    return latent["width"] // 8 * 8, latent["height"] // 8 * 8


def expected_format(prompt: dict, node_id: str) -> str:
    node = prompt[node_id]
    return "png" if node["class_type"] == "SaveImage" else node["inputs"]["output_format"]


def batch_size(prompt: dict) -> int:
    latents = wt.nodes_of(prompt, "EmptySD3LatentImage")
    return latents[0][1]["inputs"]["batch_size"] if latents else 1


def prompt_text(prompt: dict) -> str:
    for node in prompt.values():
        for key in ("prompt", "text"):
            if isinstance(node["inputs"].get(key), str):
                return node["inputs"][key]
    raise AssertionError("no prompt text in the graph")


def reported_seed(prompt: dict, entry: dict) -> int | None:
    """The seed the pack's sampling node reported in its UI output (None for native-only graphs)."""
    for node_id, node in prompt.items():
        if node["class_type"] in ("FluxJuicedSampler", "FluxJuicedTextToImage"):
            return wt.seed_from_ui(entry["outputs"].get(node_id, {}))
    return None


def run_and_check(server, prompt: dict, ui: dict | None) -> list[dict]:
    """Run a prompt (with the UI graph as the editor sends it) and check every saved image. Returns the
    metadata read back from each file."""
    extra = {"extra_pnginfo": {"workflow": ui}} if ui is not None else None
    entry = server.run(prompt, timeout=240, extra_data=extra)
    assert entry["status"]["status_str"] == "success", json.dumps(messages(entry))[:3000]
    history = server.get(f"/history/{entry['prompt'][1]}").json()
    assert list(history) == [entry["prompt"][1]]
    seed = reported_seed(prompt, entry)
    savers = [node_id for node_id, node in prompt.items() if node["class_type"] in SAVERS]
    assert savers
    found = []
    for node_id in savers:
        images = entry["outputs"][node_id]["images"]
        assert len(images) == batch_size(prompt)
        for i, image in enumerate(images):
            data = server.view(image)
            fmt = expected_format(prompt, node_id)
            assert wt.image_format(data) == fmt
            assert image["filename"].endswith("." + fmt) and image["type"] == "output"
            with Image.open(BytesIO(data)) as pil:
                assert pil.size == expected_size(prompt, node_id)
                assert pil.mode == "RGB"
            meta = wt.read_metadata(data)
            # The graphs, as the host embeds them: the API prompt that ran and the editor's workflow.
            assert wt.as_submitted(meta["prompt"]) == prompt
            if ui is not None:
                assert meta["workflow"] == ui
            if prompt[node_id]["class_type"] == "SaveImage":
                found.append({"seed": None, "meta": meta})
                continue  # the host's own node: the graphs above are all it writes
            settings = meta["settings"]
            # Next to the "prompt" graph a PNG keeps the prompt text as "prompt_text".
            assert settings["prompt_text" if fmt == "png" else "prompt"] == prompt_text(prompt), settings
            assert isinstance(seed, int) and seed >= 0
            assert settings["seed"] == seed + i, settings
            found.append({"seed": settings["seed"], "settings": settings, "meta": meta})
    return found


@pytest.mark.parametrize("name", wt.LOCAL_WORKFLOWS)  # the remote graph runs in test_remote_host.py
def test_api_workflow_runs_and_saves_images_with_metadata(server, name):
    prompt = wt.shrink(wt.load_api(name), image_size=64, latent_scale=16)
    saved = run_and_check(server, prompt, wt.load_ui(name))
    if name == "flux_native_ksampler":  # the host's SaveImage: the seed is the one in the embedded graph
        (ksampler_id, _), = wt.nodes_of(prompt, "KSampler")
        assert [s["meta"]["prompt"][ksampler_id]["inputs"]["seed"] for s in saved] == [42]
    if name == "flux_variations":
        seeds = [s["seed"] for s in saved]
        assert seeds == list(range(seeds[0], seeds[0] + 4)), "image i of a batch uses seed + i"


@pytest.mark.parametrize("aspect_ratio,output_format", [("16:9", "png"), ("2:3", "webp"), ("21:9", "jpg")])
def test_text_to_image_sizes_and_formats(server, aspect_ratio, output_format):
    prompt = wt.shrink(wt.load_api("flux_text_to_image"), image_size=128)
    (node_id, node), = wt.nodes_of(prompt, "FluxJuicedTextToImage")
    node["inputs"].update(aspect_ratio=aspect_ratio, output_format=output_format, seed=1234,
                          prompt="Une orange pressée 🍊 sur une table en bois")  # non-ASCII survives every format
    saved = run_and_check(server, prompt, wt.load_ui("flux_text_to_image"))
    assert [s["seed"] for s in saved] == [1234]
