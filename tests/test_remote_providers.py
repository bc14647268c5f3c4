"""Each provider's wire protocol against its fake: the exact fields and enum strings sent, statuses by name
under both inference.sh numberings, NDJSON/SSE streaming and polling, BFL's polling_url and moderation,
fal's subpath rule and safety flags, Replicate's statuses and retention, CometAPI's BFL route; and what a
provider cannot honour, noted (or refused in strict mode), never silently changed."""
from __future__ import annotations

import json

import pytest

from fake_providers.testing import fails, fast, run, start_fake  # noqa: F401 (fixture)
from flux_core import presets
from flux_core.remote import (AuthError, InvalidRequest, MalformedReply, ModerationError, PaymentRequired,
                              ResultExpired, TaskFailed)
from flux_core.remote.providers.bfl import bfl_size
from flux_core.remote.providers.inference_sh import status_name
from flux_core.remote.providers.replicate import cancel_after
from flux_core.remote.request import SPEED_MODES, Adjustments, RemoteRequest

ORANGE = "Une orange pressée 🍊 on a table"


def adjustments(result) -> dict:
    return {a["input"]: a for a in result.metadata["adjustments"]}


# ------------------------------------------------------------------------------------------------------------
# inference.sh


@pytest.mark.parametrize("speed_mode", SPEED_MODES)
def test_inference_sends_the_design_table_inputs_byte_exact(start_fake, speed_mode):
    fake = start_fake("inference.sh")
    result, _ = run("inference.sh", prompt=ORANGE, aspect_ratio="21:9", speed_mode=speed_mode,
                    num_inference_steps=12, guidance=0.0, seed=1234, image_size=768, output_format="webp",
                    output_quality=55)
    (submit,) = fake.received("submit")
    assert submit.headers["authorization"] == f"Bearer {fake.key}"
    assert submit.json == {"app": "pruna/flux-dev", "infra": "cloud", "input": {
        "prompt": ORANGE, "aspect_ratio": "21:9", "speed_mode": speed_mode, "num_inference_steps": 12,
        "guidance": 0.0, "seed": 1234, "image_size": 768, "output_format": "webp", "output_quality": 55}}
    assert result.metadata["adjustments"] == [] and result.seed == 1234
    assert result.metadata["provider_info"]["output_meta"]["outputs"][0]["steps"] == 12


@pytest.mark.parametrize("numbering", ["current", "legacy", "names"])
@pytest.mark.parametrize("mode", ["stream", "poll"])
def test_inference_statuses_by_name_under_both_numberings(start_fake, monkeypatch, numbering, mode):
    monkeypatch.setenv("FLUX_JUICED_INFERENCE_MODE", mode)
    fake = start_fake("inference.sh", numbering=numbering)
    result, _ = run("inference.sh", seed=3)
    assert result.image.size == (64, 64) and result.metadata["provider_info"]["status"] == "completed"
    assert fake.counts["stream" if mode == "stream" else "status"] >= 1


def test_inference_status_numbers_read_with_the_task_content():
    image = {"output": {"image": {"uri": "https://x/y.png"}}}
    assert status_name({"status": 9}) == "uploading"                     # new scheme: not finished
    assert status_name({"status": 9, **image}) == "completed"            # old scheme: finished
    assert status_name({"status": 10, **image}) == "completed"           # new scheme
    assert status_name({"status": 10, "error": "oom"}) == "failed"       # old scheme
    assert status_name({"status": 11, "error": "oom"}) == "failed"       # new scheme
    assert status_name({"status": 11}) == "cancelled"                    # old scheme
    assert status_name({"status": 12}) == "cancelled" and status_name({"status": 13}) == "rejected"
    assert status_name({"status": "RUNNING"}) == "running" and status_name({"status": "10"}, "current") == "completed"
    assert status_name({"status": 9}, "legacy") == "completed" and status_name({"status": 9}, "current") == "uploading"
    assert status_name({"status": None}) == "unknown"


@pytest.mark.parametrize("envelope", ["v3", "v1", "bare"])
def test_inference_accepts_every_envelope(start_fake, envelope):
    start_fake("inference.sh", envelope=envelope, image_as="string")
    result, _ = run("inference.sh")
    assert result.image.size == (64, 64)


@pytest.mark.parametrize("stream_mode", ["heartbeats_only", "close_early", "sse", "unsupported"])
def test_inference_stream_faults_end_in_the_result(start_fake, stream_mode):
    fake = start_fake("inference.sh", stream_mode=stream_mode, run_s=0.6)
    result, seconds = run("inference.sh", settings=fast(stream_idle_s=0.3))
    assert result.image.size == (64, 64) and seconds < 4
    assert fake.counts["stream"] >= 1 and fake.counts["get"] >= 1  # every stream end is reconciled with a GET


@pytest.mark.parametrize("kind", ["drop", "html", "invalid_json"])
def test_inference_stream_that_fails_to_start_or_says_nonsense_is_reconciled(start_fake, kind):
    fake = start_fake("inference.sh")
    fake.fault("stream", kind)
    result, _ = run("inference.sh")
    assert result.image.size == (64, 64) and fake.counts["stream"] >= 1 and fake.counts["submit"] == 1


def test_inference_heartbeats_only_streams_are_abandoned_then_polling_takes_over(start_fake):
    fake = start_fake("inference.sh", stream_mode="heartbeats_only", run_s=1.5)
    result, seconds = run("inference.sh", settings=fast(stream_idle_s=0.15, stream_reconnects=3))
    assert result.image.size == (64, 64) and seconds < 3
    assert fake.counts["stream"] == 4 and fake.counts["get"] >= 4  # 1 + 3 reconnects, each reconciled
    assert fake.counts["status"] >= 1  # then the light status poll


@pytest.mark.parametrize("outcome,error,words", [
    ("failed", TaskFailed, "CUDA out of memory"), ("moderated", ModerationError, "moderation"),
    ("rejected", PaymentRequired, "insufficient balance")])
def test_inference_failures_name_provider_task_and_fix(start_fake, outcome, error, words):
    start_fake("inference.sh", outcome=outcome)
    exc, _ = fails("inference.sh", error)
    text = str(exc)
    assert text.startswith("[inference.sh]") and words in text and f"(task {exc.task_id})" in text
    assert "What to do:" in text


def test_inference_refused_key_names_the_variable_and_not_the_key(start_fake, monkeypatch):
    start_fake("inference.sh")
    monkeypatch.setenv("INFERENCE_API_KEY", "inf_wrong_key_9876543210")
    exc, _ = fails("inference.sh", AuthError)
    assert "INFERENCE_API_KEY" in str(exc) and "inf_wrong_key_9876543210" not in str(exc) and "401" in str(exc)


def test_inference_app_reference_is_configurable_and_validation_errors_are_shown(start_fake, monkeypatch):
    fake = start_fake("inference.sh")
    monkeypatch.setenv("FLUX_JUICED_INFERENCE_APP", "pruna/flux-dev@abc123")
    exc, _ = fails("inference.sh", InvalidRequest)
    assert "pruna/flux-dev@abc123" in str(exc) and "422" in str(exc)
    fake.app = "pruna/flux-dev@abc123"
    assert run("inference.sh")[0].metadata["model"] == "pruna/flux-dev@abc123"


# ------------------------------------------------------------------------------------------------------------
# Black Forest Labs


@pytest.mark.parametrize("image_size", [64, 512, 1024, 1440, 2048])
@pytest.mark.parametrize("aspect_ratio", presets.ASPECT_RATIOS)
def test_bfl_sizes_keep_the_aspect_ratio_within_its_limits(aspect_ratio, image_size):
    adjust = Adjustments("bfl")
    request = RemoteRequest("x", aspect_ratio=aspect_ratio, image_size=image_size).checked()
    width, height = bfl_size(request, adjust)
    assert width % 32 == 0 and height % 32 == 0 and 256 <= min(width, height) and max(width, height) <= 1440
    rw, rh = (int(v) for v in aspect_ratio.split(":"))
    assert abs(width / height - rw / rh) / (rw / rh) < 0.1, (width, height)
    if 256 <= image_size <= 1440 and min(request.size) >= 256:
        assert max(width, height) == image_size // 32 * 32 or abs(max(width, height) - image_size) <= 16
    noted = [a for a in adjust.items if a["input"] == "size"]
    assert bool(noted) == ((width, height) != request.size)


def test_bfl_maps_fields_clamps_guidance_and_notes_what_it_cannot_take(start_fake):
    fake = start_fake("bfl")
    result, _ = run("bfl", aspect_ratio="2:3", guidance=8.0, seed=77, num_inference_steps=20, output_format="jpg")
    (submit,) = fake.received("submit")
    assert submit.headers["x-key"] == fake.key
    assert submit.json == {"prompt": "a juicy orange", "width": 352, "height": 512, "steps": 20, "guidance": 5.0,
                           "seed": 77, "safety_tolerance": 2, "output_format": "jpeg", "prompt_upsampling": False}
    notes = adjustments(result)
    assert notes["guidance"]["asked"] == 8.0 and notes["guidance"]["sent"] == 5.0 and "1.5 to 5.0" in notes["guidance"]["why"]
    assert notes["size"] == {"input": "size", "asked": "336x512", "sent": "352x512",
                             "why": "BFL's flux-dev takes sides in multiples of 32"}
    assert notes["speed_mode"]["sent"] is None and "no speed setting" in notes["speed_mode"]["why"]
    assert result.image.size == (352, 512) and result.seed == 77
    assert result.metadata["provider_info"]["cost"] == 2.5


def test_strict_mode_refuses_instead_of_clamping(start_fake, monkeypatch):
    fake = start_fake("bfl")
    monkeypatch.setenv("FLUX_JUICED_REMOTE_STRICT", "1")
    from flux_core.remote import RemoteSettings

    settings = RemoteSettings.from_env(**{k: v for k, v in fast().__dict__.items() if k not in ("strict", "rng")})
    assert settings.strict
    exc, _ = fails("bfl", InvalidRequest, settings, guidance=8.0)
    assert "guidance=8.0 cannot be honoured" in str(exc) and fake.counts["submit"] == 0
    result, _ = run("bfl", settings, guidance=3.5, image_size=1024)  # speed modes are mapped and noted, not refused
    assert "speed_mode" in adjustments(result)


def test_bfl_polls_a_regional_polling_url_without_sending_the_key_there(start_fake):
    fake = start_fake("bfl", regional=True)
    run("bfl")
    polls = fake.received("poll")
    assert polls and all(p.headers.get("host", "").startswith("localhost") for p in polls)
    assert all("x-key" not in p.headers for p in polls)
    assert fake.received("submit")[0].headers["x-key"] == fake.key


def test_bfl_polls_its_own_host_with_the_key(start_fake):
    fake = start_fake("bfl")
    run("bfl")
    assert all(p.headers.get("x-key") == fake.key for p in fake.received("poll"))


@pytest.mark.parametrize("outcome,error,words", [
    ("request_moderated", ModerationError, "prompt was refused by moderation (Request Moderated)"),
    ("content_moderated", ModerationError, "generated image was refused by moderation (Content Moderated)"),
    ("error", TaskFailed, "status Error")])
def test_bfl_final_statuses_become_clear_errors(start_fake, outcome, error, words):
    start_fake("bfl", outcome=outcome)
    exc, _ = fails("bfl", error)
    assert words in str(exc) and f"(task {exc.task_id})" in str(exc) and "What to do:" in str(exc)
    if "moderated" in outcome:
        assert "Derivative Works Filter" in str(exc) and "FLUX_JUICED_BFL_SAFETY_TOLERANCE" in str(exc)


@pytest.mark.parametrize("outcome", ["not_found", "not_found_404"])
def test_bfl_task_not_found_gets_a_grace_period_then_fails(start_fake, outcome):
    fake = start_fake("bfl", outcome=outcome)
    exc, _ = fails("bfl", ResultExpired, fast(not_found_grace=3))
    assert fake.counts["poll"] == 4 and "Task not found" in str(exc)


def test_bfl_unknown_statuses_count_as_pending(start_fake):
    fake = start_fake("bfl", pending_status="Generating", run_s=0.3)
    result, _ = run("bfl")
    assert result.image.size == (512, 512) and fake.counts["poll"] >= 3


def test_bfl_reply_without_status_is_malformed(start_fake):
    start_fake("bfl", outcome="missing_status")
    exc, _ = fails("bfl", MalformedReply)
    assert "without a status" in str(exc)


def test_bfl_expired_link_is_replaced_by_polling_again(start_fake):
    fake = start_fake("bfl")
    fake.fault("download", "status", code=403, body="<Error>AuthenticationFailed</Error>", content_type="application/xml")
    result, _ = run("bfl")
    assert fake.counts["download"] == 2 and result.image.size == (512, 512)
    first, second = (r.path for r in fake.received("download"))
    assert first != second  # a fresh signed link


def test_bfl_link_that_stays_expired_says_what_to_do(start_fake):
    fake = start_fake("bfl", link_ttl=0.0)
    exc, _ = fails("bfl", ResultExpired)
    assert fake.counts["download"] == 2 and "403" in str(exc) and "10 minutes" in str(exc)


def test_bfl_payment_and_bad_key(start_fake, monkeypatch):
    fake = start_fake("bfl")
    fake.fault("submit", "status", code=402, body={"detail": "Insufficient credits"})
    exc, _ = fails("bfl", PaymentRequired)
    assert "Insufficient credits" in str(exc) and "credits" in exc.hint
    monkeypatch.setenv("BFL_API_KEY", "bfl-wrong-0123456789")
    exc, _ = fails("bfl", AuthError)
    assert "BFL_API_KEY" in str(exc) and "bfl-wrong-0123456789" not in str(exc)


# ------------------------------------------------------------------------------------------------------------
# fal.ai


@pytest.mark.parametrize("speed_mode,level,noted", [
    (SPEED_MODES[0], "none", True), (SPEED_MODES[1], "regular", False), (SPEED_MODES[2], "high", False),
    (SPEED_MODES[3], "high", True)])
def test_fal_maps_speed_modes_to_acceleration(start_fake, speed_mode, level, noted):
    fake = start_fake("fal")
    result, _ = run("fal", speed_mode=speed_mode, aspect_ratio="16:9", guidance=0.5, output_format="webp", seed=9)
    (submit,) = fake.received("submit")
    assert submit.headers["authorization"] == f"Key {fake.key}"
    assert submit.json == {"prompt": "a juicy orange", "image_size": {"width": 512, "height": 288},
                           "num_inference_steps": 28, "guidance_scale": 1.0, "seed": 9, "num_images": 1,
                           "enable_safety_checker": True, "output_format": "png", "sync_mode": False,
                           "acceleration": level}
    assert 2 <= int(submit.headers["x-fal-request-timeout"]) <= 10  # the start timeout follows the deadline
    notes = adjustments(result)
    assert ("speed_mode" in notes) == noted and notes["guidance"]["sent"] == 1.0
    assert notes["output_format"]["sent"] is None and "png" in notes["output_format"]["why"]
    assert result.image.size == (512, 288)


def test_fal_follows_the_returned_urls_without_the_subpath(start_fake):
    fake = start_fake("fal")
    run("fal")
    assert fake.received("submit")[0].path == "/fal-ai/flux/dev"
    assert all(r.path.startswith("/fal-ai/flux/requests/") and "/dev/" not in r.path
               for r in fake.received("status") + fake.received("result"))
    assert fake.received("status")[0].query.get("logs") == "1"
    assert fake.counts["unknown"] == 0


def test_fal_safety_flag_is_a_moderation_error_not_a_black_image(start_fake):
    fake = start_fake("fal", outcome="nsfw")
    exc, _ = fails("fal", ModerationError)
    assert "has_nsfw_concepts" in str(exc) and fake.counts["download"] == 0


def test_fal_completed_with_an_error_fails(start_fake):
    start_fake("fal", outcome="error")
    exc, _ = fails("fal", TaskFailed)
    assert "runner_error" in str(exc)


def test_fal_validation_error_lists_the_field(start_fake):
    fake = start_fake("fal")
    fake.fault("submit", "status", code=422, body={"detail": [{"loc": ["body", "prompt"], "msg": "field required",
                                                               "type": "value_error.missing"}]})
    exc, _ = fails("fal", InvalidRequest)
    assert "prompt: field required" in str(exc)


# ------------------------------------------------------------------------------------------------------------
# Replicate


def test_replicate_maps_fields_megapixels_and_go_fast(start_fake):
    fake = start_fake("replicate")
    result, _ = run("replicate", aspect_ratio="16:9", image_size=1024, speed_mode=SPEED_MODES[0], guidance=0.0,
                    output_format="webp", output_quality=33, seed=5)
    (submit,) = fake.received("submit")
    assert submit.json == {"input": {
        "prompt": "a juicy orange", "aspect_ratio": "16:9", "megapixels": "1", "num_outputs": 1,
        "num_inference_steps": 28, "guidance": 0.0, "seed": 5, "output_format": "webp", "output_quality": 33,
        "go_fast": False, "disable_safety_checker": False}}
    assert submit.headers["authorization"] == f"Bearer {fake.key}"
    assert submit.headers["cancel-after"] == "10s"  # the deadline of the fast settings
    notes = adjustments(result)
    assert notes["image_size"]["sent"].startswith("megapixels=1 (about 1365x768)")
    assert notes["speed_mode"]["sent"] == "go_fast=false"
    assert result.seed == 5  # read back from the model's log line


def test_cancel_after_durations():
    assert [cancel_after(s) for s in (3, 44.2, 60, 600, 610.7)] == ["5s", "45s", "1m", "10m", "10m11s"]


@pytest.mark.parametrize("outcome,error,words", [
    ("nsfw", ModerationError, "NSFW content detected"), ("failed", TaskFailed, "device-side assert"),
    ("aborted", TaskFailed, "not billed"), ("unknown_final", TaskFailed, "expired_somehow")])
def test_replicate_final_statuses(start_fake, outcome, error, words):
    start_fake("replicate", outcome=outcome)
    exc, _ = fails("replicate", error)
    assert words in str(exc) and exc.task_id in str(exc)


def test_replicate_unknown_status_that_is_not_final_keeps_polling(start_fake):
    fake = start_fake("replicate", pending_status="booting", run_s=0.3)
    result, _ = run("replicate")
    assert result.image and fake.counts["poll"] >= 3


def test_replicate_deleted_outputs_are_an_expiry_error(start_fake):
    start_fake("replicate", data_removed=True)
    exc, _ = fails("replicate", ResultExpired)
    assert "an hour" in str(exc)


def test_replicate_link_gone_after_retention(start_fake):
    fake = start_fake("replicate", link_ttl=0.0)
    exc, _ = fails("replicate", ResultExpired)
    assert "404" in str(exc) and fake.counts["download"] == 2


# ------------------------------------------------------------------------------------------------------------
# CometAPI


def test_cometapi_uses_the_bfl_route_with_a_bearer_key(start_fake):
    fake = start_fake("cometapi")
    result, _ = run("cometapi", output_format="webp", seed=11)
    (submit,) = fake.received("submit")
    assert submit.path == "/flux/v1/flux-dev" and submit.headers["authorization"] == f"Bearer {fake.key}"
    assert submit.json["output_format"] == "png" and "webp" in json.dumps(result.metadata["adjustments"])
    assert all(p.path == "/flux/v1/get_result" and p.headers["authorization"] == f"Bearer {fake.key}"
               for p in fake.received("poll"))
    assert result.seed == 11


def test_cometapi_wrong_path_redirect_is_not_followed(start_fake, monkeypatch):
    fake = start_fake("cometapi")
    monkeypatch.setenv("FLUX_JUICED_COMETAPI_BASE_URL", fake.url + "/v2")
    exc, _ = fails("cometapi", MalformedReply)
    assert "redirected (HTTP 301" in str(exc) and "FLUX_JUICED_COMETAPI_BASE_URL" in str(exc)


def test_cometapi_error_envelope_message_is_shown(start_fake, monkeypatch):
    start_fake("cometapi")
    monkeypatch.setenv("COMETAPI_API_KEY", "sk-wrong-0123456789")
    exc, _ = fails("cometapi", AuthError)
    assert "invalid token (request id: 2026112200000001)" in str(exc) and "sk-wrong" not in str(exc)
