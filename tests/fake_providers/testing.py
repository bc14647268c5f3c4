"""Pytest helpers for the remote tests: start a fake and point the client at it, with short timings."""
from __future__ import annotations

import time

import pytest

from flux_core.remote import KEY_ENV, RemoteSettings, generate_remote

from . import BASE_ENV, FAKES

# Short everything: the whole remote test set must run in about a minute on two shared cores.
FAST = dict(poll_interval_s=0.02, backoff_base_s=0.02, backoff_cap_s=0.2, connect_timeout_s=1.0, read_timeout_s=1.0,
            deadline_s=10.0, stream_idle_s=0.4, max_attempts=5)


def fast(**changes) -> RemoteSettings:
    return RemoteSettings(**{**FAST, **changes})


@pytest.fixture
def start_fake(monkeypatch):
    """start_fake(provider, **attributes) -> a running fake that the client's environment points at."""
    started = []

    def start(name: str, **attributes):
        fake = FAKES[name]()
        for key, value in attributes.items():
            setattr(fake, key, value)
        fake.start()
        started.append(fake)
        monkeypatch.setenv(BASE_ENV[name], fake.url)
        monkeypatch.setenv(KEY_ENV[name], fake.key)
        return fake

    yield start
    for fake in started:
        fake.stop()


def run(provider: str, settings: RemoteSettings | None = None, **inputs):
    """generate_remote with small, quick defaults; returns (result, seconds)."""
    inputs.setdefault("image_size", 512)
    started = time.monotonic()
    result = generate_remote(inputs.pop("prompt", "a juicy orange"), provider, settings=settings or fast(), **inputs)
    return result, time.monotonic() - started


def fails(provider: str, error, settings: RemoteSettings | None = None, **inputs):
    """The error generate_remote raises (asserting its type), and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(error) as info:
        run(provider, settings, **inputs)
    return info.value, time.monotonic() - started
