"""The transport's promises, measured over real HTTP against the fake providers: timeouts on every call, an
overall deadline, retries with capped exponential backoff and jitter that honour Retry-After, submits that
are never blindly repeated (no job billed twice), cancel at the provider, caps and refusals on downloads."""
from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from fake_providers import FakeBFL
from fake_providers.testing import fails, fast, run, start_fake  # noqa: F401 (fixture)
from flux_core.remote import (DownloadRefused, Interrupted, InvalidRequest, MalformedReply, ProviderUnavailable,
                              RateLimited, RemoteTimeout, SubmitUncertain, generate_remote)
from flux_core.remote.http import backoff_delay, retry_after_seconds
from flux_core.remote.settings import RemoteSettings, base_url


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ------------------------------------------------------------------------------------------------------------
# the policy itself


def test_backoff_doubles_with_jitter_and_stays_under_the_cap():
    settings = RemoteSettings(backoff_base_s=1.0, backoff_cap_s=30.0, rng=random.Random(7))
    for attempt in range(1, 12):
        nominal = min(30.0, 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, settings) for _ in range(200)]
        assert all(0.5 * nominal <= d <= min(30.0, 1.5 * nominal) for d in delays), attempt
        assert max(delays) - min(delays) > 0.2 * nominal  # jitter really spreads the retries
    assert max(backoff_delay(20, settings) for _ in range(500)) <= 30.0


def test_retry_after_as_seconds_or_http_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Sun, 22 Nov 2026 00:00:10 GMT", now=1795305600.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_base_addresses_are_overridable_and_plain_http_only_to_this_machine(monkeypatch):
    monkeypatch.setenv("FLUX_JUICED_BFL_BASE_URL", "http://127.0.0.1:9/")
    assert base_url("bfl", "FLUX_JUICED_BFL_BASE_URL", "https://api.bfl.ai") == "http://127.0.0.1:9"
    monkeypatch.setenv("FLUX_JUICED_BFL_BASE_URL", "http://gateway.example")
    with pytest.raises(InvalidRequest, match="unencrypted"):
        base_url("bfl", "FLUX_JUICED_BFL_BASE_URL", "https://api.bfl.ai")
    monkeypatch.setenv("FLUX_JUICED_BFL_BASE_URL", "ftp://gateway.example")
    with pytest.raises(InvalidRequest, match="not an http"):
        base_url("bfl", "FLUX_JUICED_BFL_BASE_URL", "https://api.bfl.ai")


# ------------------------------------------------------------------------------------------------------------
# reads: retried, Retry-After honoured, backoff capped


def test_poll_429_waits_as_long_as_retry_after_says(start_fake):
    fake = start_fake("bfl")
    fake.fault("poll", "status", code=429, body={"detail": "Too many requests"}, headers={"Retry-After": "0.6"})
    result, _ = run("bfl")
    first_gap = gaps(fake.times("poll"))[0]
    assert 0.55 <= first_gap < 2.0, first_gap  # not the 0.02 s backoff: the server's 0.6 s
    assert result.metadata["http"]["retries"] >= 1


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408])
def test_poll_errors_are_retried_until_the_job_is_done(start_fake, code):
    fake = start_fake("bfl")
    fake.fault("poll", "status", times=2, code=code, body={"detail": "upstream"})
    result, _ = run("bfl")
    assert result.image.size == (512, 512)
    assert fake.counts["submit"] == 1 and result.metadata["http"]["retries"] >= 2


def test_backoff_is_capped_when_a_poll_keeps_failing(start_fake):
    fake = start_fake("bfl")
    fake.fault("poll", "status", times=5, code=503)
    result, _ = run("bfl", fast(backoff_base_s=0.1, backoff_cap_s=0.15, max_attempts=6))
    waits = gaps(fake.times("poll"))[:5]
    # Uncapped, the five waits would be 0.1, 0.2, 0.4, 0.8, 1.6 s (x0.5..1.5): at least 1.55 s together.
    assert len(waits) == 5 and sum(waits) < 1.3 and max(waits) < 0.6, waits
    assert result.image.size == (512, 512)


def test_a_poll_that_keeps_failing_stops_after_max_attempts(start_fake):
    fake = start_fake("bfl")
    fake.fault("poll", "status", times=20, code=503, body={"detail": "maintenance"})
    error, _ = fails("bfl", ProviderUnavailable, fast(max_attempts=3))
    assert fake.counts["poll"] == 3
    text = str(error)
    assert text.startswith("[bfl]") and "503" in text and "maintenance" in text and error.task_id in text
    assert "What to do:" in text


def test_a_slow_reply_times_out_and_the_read_is_retried(start_fake):
    fake = start_fake("bfl")
    fake.fault("poll", "slow", delay=2.0)
    result, seconds = run("bfl", fast(read_timeout_s=0.3))
    assert seconds < 1.5, seconds  # the 2 s reply was abandoned after 0.3 s
    assert fake.counts["poll"] >= 2 and result.image.size == (512, 512)


def test_ingress_502_html_page_is_retried(start_fake):
    fake = start_fake("fal")
    fake.fault("status", "html", times=2)
    result, _ = run("fal")
    assert result.image.size == (512, 512) and result.metadata["http"]["retries"] >= 2


def test_retry_after_beyond_the_deadline_fails_at_once(start_fake):
    fake = start_fake("bfl")
    fake.fault("poll", "status", code=429, headers={"Retry-After": "30"}, body={"detail": "slow down"})
    error, seconds = fails("bfl", RateLimited, fast(deadline_s=5))
    assert seconds < 1.0 and "30" in str(error) and "deadline" in str(error)
    assert fake.counts["poll"] == 1


# ------------------------------------------------------------------------------------------------------------
# submits: never blindly repeated


@pytest.mark.parametrize("code", [500, 502, 503])
def test_a_submit_that_fails_is_not_repeated(start_fake, code):
    fake = start_fake("replicate")
    fake.fault("submit", "status", code=code, body={"detail": "boom"})
    error, _ = fails("replicate", ProviderUnavailable)
    assert fake.counts["submit"] == 1
    assert "not repeated" in str(error) and "billed twice" in str(error)


def test_a_submit_without_answer_is_uncertain_and_not_repeated(start_fake):
    fake = start_fake("fal")
    fake.fault("submit", "slow", delay=1.5)
    error, seconds = fails("fal", SubmitUncertain, fast(read_timeout_s=0.3))
    assert fake.counts["submit"] == 1 and seconds < 1.2
    assert "may have been created" in str(error) and "dashboard" in str(error)


def test_a_dropped_submit_connection_is_uncertain_too(start_fake):
    fake = start_fake("inference.sh")
    fake.fault("submit", "drop")
    fails("inference.sh", SubmitUncertain)
    assert fake.counts["submit"] == 1


def test_a_submit_answered_429_is_retried_after_retry_after(start_fake):
    fake = start_fake("replicate")
    fake.fault("submit", "status", times=2, code=429, headers={"Retry-After": "0.3"},
               body={"detail": "Request was throttled. Your rate limit resets in ~30s."})
    result, _ = run("replicate")
    assert fake.counts["submit"] == 3 and len(fake.jobs) == 1
    assert all(0.28 <= g < 1.5 for g in gaps(fake.times("submit"))), gaps(fake.times("submit"))
    assert result.image.size[0] > 0


def test_a_submit_to_a_refused_connection_is_retried(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FLUX_JUICED_BFL_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("BFL_API_KEY", "late-key-0123456789")
    late = []  # nothing listens on the port for 0.3 s: the first connections are refused
    timer = threading.Timer(0.3, lambda: late.append(FakeBFL(key="late-key-0123456789", port=port).start()))
    timer.start()
    try:
        result, _ = run("bfl", fast(backoff_base_s=0.1, backoff_cap_s=0.4, max_attempts=6))
        assert late[0].counts["submit"] == 1 and result.metadata["http"]["retries"] >= 1
    finally:
        timer.join()
        for fake in late:
            fake.stop()


# ------------------------------------------------------------------------------------------------------------
# the deadline and the cancel button


def test_the_deadline_is_kept_and_the_job_cancelled_at_the_provider(start_fake):
    fake = start_fake("replicate", hold=True)
    error, seconds = fails("replicate", RemoteTimeout, fast(deadline_s=0.8))
    assert 0.75 <= seconds < 2.5, seconds
    assert fake.counts["cancel"] == 1 and "cancelled at the provider" in str(error)
    assert error.task_id and error.task_id in str(error) and "FLUX_JUICED_REMOTE_DEADLINE_S" in str(error)


@pytest.mark.parametrize("provider", ["inference.sh", "fal", "replicate"])
def test_user_cancel_stops_waiting_and_cancels_at_the_provider(start_fake, provider):
    fake = start_fake(provider, hold=True)
    pressed = time.monotonic() + 0.4
    started = time.monotonic()
    with pytest.raises(Interrupted) as info:
        generate_remote("an orange", provider, image_size=512, settings=fast(),
                        is_cancelled=lambda: time.monotonic() > pressed)
    assert time.monotonic() - pressed < 1.0  # the wait noticed within a fraction of a second
    assert fake.counts["cancel"] == 1 and fake.counts["submit"] == 1
    assert "cancelled at the provider" in str(info.value) and info.value.task_id in str(info.value)
    assert time.monotonic() - started < 3


def test_bfl_has_no_cancel_so_the_error_says_the_job_runs_out(start_fake):
    fake = start_fake("bfl", hold=True)
    pressed = time.monotonic() + 0.2
    with pytest.raises(Interrupted, match="runs out on its own"):
        generate_remote("an orange", "bfl", image_size=512, settings=fast(),
                        is_cancelled=lambda: time.monotonic() > pressed)
    assert fake.counts["submit"] == 1


def test_a_cancel_before_submitting_submits_nothing(start_fake):
    fake = start_fake("fal")
    with pytest.raises(Interrupted):
        generate_remote("an orange", "fal", settings=fast(), is_cancelled=lambda: True)
    assert fake.counts["submit"] == 0


# ------------------------------------------------------------------------------------------------------------
# replies that are not what the protocol promises, and downloads


@pytest.mark.parametrize("kind,words", [("invalid_json", "invalid JSON"), ("wrong_content_type", "web page")])
def test_malformed_poll_replies_are_clear_errors(start_fake, kind, words):
    fake = start_fake("bfl")
    fake.fault("poll", kind)
    error, _ = fails("bfl", MalformedReply)
    text = str(error)
    assert text.startswith("[bfl]") and words in text and error.task_id in text and "What to do:" in text


def test_a_result_link_that_is_a_web_page_is_refused(start_fake):
    fake = start_fake("fal")
    fake.fault("download", "wrong_content_type")
    error, _ = fails("fal", MalformedReply)
    assert "text/html" in str(error) and "not an image" in str(error)


def test_a_result_that_is_not_an_image_is_refused(start_fake):
    fake = start_fake("fal")
    fake.fault("download", "status", code=200, body=b"\x00garbage", content_type="image/png")
    error, _ = fails("fal", MalformedReply)
    assert "not a readable image" in str(error)


def test_downloads_are_capped(start_fake):
    start_fake("bfl")
    error, _ = fails("bfl", DownloadRefused, fast(max_download_mb=0.0005))
    assert "cap" in str(error) and "FLUX_JUICED_REMOTE_MAX_DOWNLOAD_MB" in str(error)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA"])
def test_only_http_result_links_are_fetched(start_fake, url):
    fake = start_fake("fal", result_url=url)
    error, _ = fails("fal", DownloadRefused)
    assert "http(s)" in str(error) and fake.counts["download"] == 0
