"""The remote-API node in the real ComfyUI 0.3.75 host, against the fake providers: the shipped workflow
(UI and API format) runs for every provider, progress reaches the websocket, an interrupt cancels the job
at the provider, failures are clear, and a distinctive key set in the server's environment appears nowhere
it must not: the saved workflow, the history, the image metadata, the server log."""
from __future__ import annotations

import io
import json
import secrets
import time

import pytest
from PIL import Image

import workflow_tools as wt
from fake_providers import BASE_ENV, FAKES
from flux_core.remote import KEY_ENV
from host_server import ComfyServer, messages

pytestmark = pytest.mark.host

NAME = "flux_remote_text_to_image"
NODE = "FluxJuicedRemoteTextToImage"
CANARIES = {provider: f"CANARY{secrets.token_hex(10)}" for provider in KEY_ENV}


@pytest.fixture(scope="module")
def fakes():
    started = {provider: FAKES[provider](key=CANARIES[provider], run_s=0.6).start() for provider in FAKES}
    yield started
    for fake in started.values():
        fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fakes):
    home = tmp_path_factory.mktemp("comfy_remote")
    env = {"FLUX_JUICED_REMOTE_POLL_INTERVAL_S": "0.05", "FLUX_JUICED_REMOTE_BACKOFF_BASE_S": "0.05",
           "FLUX_JUICED_REMOTE_DEADLINE_S": "60", "FLUX_JUICED_KEYS_FILE": str(home / "no-keys.toml")}
    for provider, fake in fakes.items():
        env[BASE_ENV[provider]] = fake.url
        env[KEY_ENV[provider]] = CANARIES[provider]
    server = ComfyServer(home, env=env).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ws(server):
    with wt.WsClient(server) as client:
        yield client


def graphs(provider: str, object_info: dict, **inputs) -> tuple[dict, dict]:
    """The shipped UI workflow with the provider chosen, and the API prompt the editor would send for it."""
    ui = wt.load_ui(NAME)
    node = next(n for n in ui["nodes"] if n["type"] == NODE)
    layout = [name for name, _ in wt.widget_layout(object_info[NODE])]
    for key, value in dict(inputs, provider=provider).items():
        node["widgets_values"][layout.index(key)] = value
    return ui, wt.ui_to_api(ui, object_info)


def leaks(text) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return [provider for provider, key in CANARIES.items() if key in text]


def find_seed(payload) -> int | None:
    if isinstance(payload, dict):
        if isinstance(payload.get("seed"), int):
            return payload["seed"]
        return next((s for s in map(find_seed, payload.values()) if s is not None), None)
    return None


def test_the_node_takes_the_local_nodes_inputs_plus_provider_and_no_key(server):
    info = server.object_info()
    remote, local = info[NODE], info["FluxJuicedTextToImage"]
    assert list(remote["input"]["required"]) == ["provider"] + list(local["input"]["required"])
    for name, spec in local["input"]["required"].items():
        assert remote["input"]["required"][name] == spec, name
    assert remote["input"]["required"]["provider"][0] == ["inference.sh", "bfl", "fal", "replicate", "cometapi"]
    assert remote["output"][:2] == local["output"] and remote["output"][2] == "STRING"
    assert not any("key" in name.lower() or "token" in name.lower() for section in remote["input"].values()
                   for name in section)
    assert remote["output_node"] and len(remote["description"]) > 40
    assert all(wt.input_options(spec).get("tooltip") for _, spec, _ in wt.ordered_inputs(remote))
    assert len(remote["output_tooltips"]) == 3 and all(remote["output_tooltips"])
    assert remote["category"] == local["category"] and remote["python_module"] == local["python_module"]


@pytest.mark.parametrize("provider", list(FAKES))
def test_the_shipped_workflow_runs_at_every_provider_and_the_key_leaks_nowhere(server, ws, fakes, provider):
    fake = fakes[provider]
    submits_before = fake.counts["submit"]
    ui, prompt = graphs(provider, server.object_info(), image_size=512, prompt=f"an orange for {provider}")
    expected = wt.load_api(NAME)
    expected["1"]["inputs"].update(provider=provider, image_size=512, prompt=f"an orange for {provider}")
    assert wt.api_graph(prompt) == wt.api_graph(expected)  # the UI file, converted, is the API file
    prompt_id, seen = ws.run(prompt, extra_data={"extra_pnginfo": {"workflow": ui}}, timeout=60)
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(messages(entry))[:3000]

    # The job ran once at the provider, with the key from the server's environment.
    assert fake.counts["submit"] == submits_before + 1
    submit = fake.received("submit")[-1]
    assert CANARIES[provider] in json.dumps(submit.headers)
    # Progress came through the host's progress bar, up to the end.
    progress = [(m["value"], m["max"]) for m in wt.of_type(seen, "progress") if m["node"] == "1"]
    assert progress and progress[-1] == (100, 100) and any(0 < v < 100 for v, _ in progress), progress

    # The seed shown is the one sent; the file carries it, the provider and the task id.
    output = entry["outputs"]["1"]
    seed = wt.seed_from_ui(output)
    assert seed == find_seed(submit.json)
    assert any(text == f"{provider} task {job}" for text in output["text"] for job in fake.jobs)
    (image,) = output["images"]
    data = server.view(image)
    assert wt.image_format(data) == "jpg" and image["filename"].endswith(".jpg")
    with Image.open(io.BytesIO(data)) as pil:
        assert pil.mode == "RGB"
    meta = wt.read_metadata(data)
    assert meta["settings"]["provider"] == provider and meta["settings"]["seed"] == seed
    assert meta["settings"]["task_id"] in fake.jobs
    if provider in ("bfl", "cometapi", "replicate"):  # no speed mode there as asked: shown and recorded
        assert any(t.startswith("speed_mode 'Extra Juiced") for t in output["text"]), output["text"]
        assert "speed_mode" in [a["input"] for a in meta["settings"]["adjustments"]]
    assert wt.as_submitted(meta["prompt"]) == prompt and meta["workflow"] == ui

    # The key is in none of: the image file, the history, the graphs, the node definitions.
    history = server.get(f"/history/{prompt_id}").text
    assert leaks(data) == [] and leaks(history) == [] and leaks(server.get("/history").text) == []
    assert leaks(json.dumps(ui)) == [] and leaks(json.dumps(prompt)) == []
    assert leaks(json.dumps(server.object_info())) == []


def test_a_saved_workflow_holds_no_key(server):
    """What the editor saves (POST /userdata) is the graph, which has no place for a key."""
    ui, _ = graphs("bfl", server.object_info())
    response = server.post("/userdata/workflows%2Fremote.json?overwrite=true", ui)
    assert response.status_code == 200, response.text
    saved = server.get("/userdata/workflows%2Fremote.json").text
    assert json.loads(saved) == ui and leaks(saved) == []


def test_interrupt_cancels_the_job_at_the_provider(server, fakes):
    fake = fakes["replicate"]
    fake.hold = True
    try:
        _, prompt = graphs("replicate", server.object_info(), seed=4242, prompt="held at the provider")
        prompt_id = server.queue(prompt).json()["prompt_id"]
        deadline = time.monotonic() + 60
        while not any(find_seed(r.json) == 4242 for r in fake.received("submit")) and time.monotonic() < deadline:
            time.sleep(0.05)
        cancels_before = fake.counts["cancel"]
        time.sleep(0.3)  # the node is waiting on the provider now
        sent = time.monotonic()
        assert server.post("/interrupt", {"prompt_id": prompt_id}).status_code == 200
        entry = server.wait(prompt_id, timeout=30)
        assert entry["status"]["status_str"] == "error" and "execution_interrupted" in messages(entry)
        assert fake.counts["cancel"] == cancels_before + 1
        cancel = fake.received("cancel")[-1]
        assert cancel.time - sent < 2.0 and cancel.path.endswith(f"{next(reversed(fake.jobs))}/cancel")
    finally:
        fake.hold = False


def test_provider_failures_are_clear_errors_without_the_key(server, fakes):
    fakes["bfl"].outcome = "content_moderated"
    fakes["fal"].fault("submit", "echo_key")
    try:
        for provider, words in (("bfl", "Content Moderated"), ("fal", "key was refused")):
            _, prompt = graphs(provider, server.object_info(), prompt=f"failing at {provider}")
            entry = server.run(prompt, timeout=60)
            assert entry["status"]["status_str"] == "error"
            error = messages(entry)["execution_error"]
            text = error["exception_message"]
            assert text.startswith(f"[{provider}]") and words in text and "What to do:" in text, text
            if provider == "bfl":
                assert f"(task {next(reversed(fakes['bfl'].jobs))})" in text
            assert leaks(json.dumps(entry)) == [] and leaks(server.get("/history").text) == []
    finally:
        fakes["bfl"].outcome = "ready"


def test_the_server_log_never_shows_a_key(server, fakes):
    log = server.log()
    assert "FLUX.1 Juiced: bfl job" in log  # the log does speak about the jobs (by task id)
    assert leaks(log) == []
    assert all(fake.counts["submit"] >= 1 for fake in fakes.values())
