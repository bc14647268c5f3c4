"""Keys: from the environment or a keys file outside any graph, never in an error, a log line or the
metadata (even when a server echoes them back); settings from the environment."""
from __future__ import annotations

import json
import logging

import pytest

from fake_providers.testing import fails, run, start_fake  # noqa: F401 (fixture)
from flux_core.remote import KEY_ENV, AuthError, MissingKey, RemoteSettings, redact
from flux_core.remote import keys as keys_module
from flux_core.remote.request import SPEED_MODES

CANARY = "sk-CANARY-7f3a9c1e5b2d4f60"


@pytest.fixture
def no_keys(monkeypatch, tmp_path):
    for env in KEY_ENV.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("FLUX_JUICED_KEYS_FILE", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(keys_module, "_file_keys", {})
    return tmp_path


def test_keys_come_from_the_environment(no_keys, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "  fal-id:fal-secret-123456 ")
    assert keys_module.get_key("fal") == "fal-id:fal-secret-123456"
    assert keys_module.get_key("bfl") is None


def test_keys_file_by_variable_or_provider_name_and_the_environment_wins(no_keys, monkeypatch):
    path = no_keys / "keys.toml"
    path.write_text('# my keys\nBFL_API_KEY = "bfl-from-file-0001"\n[keys]\nreplicate = \'r8_from_file_0002\'  # ok\n')
    path.chmod(0o600)
    monkeypatch.setenv("FLUX_JUICED_KEYS_FILE", str(path))
    assert keys_module.get_key("bfl") == "bfl-from-file-0001"
    assert keys_module.get_key("replicate") == "r8_from_file_0002"
    monkeypatch.setenv("BFL_API_KEY", "bfl-from-env-0003")
    assert keys_module.get_key("bfl") == "bfl-from-env-0003"
    assert redact("x r8_from_file_0002 y") == "x *** y"  # file keys are scrubbed too


def test_default_keys_file_is_in_the_user_config_folder(no_keys, monkeypatch):
    monkeypatch.delenv("FLUX_JUICED_KEYS_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(no_keys / "cfg"))
    assert keys_module.keys_file_path() == no_keys / "cfg" / "flux-juiced" / "keys.toml"


def test_a_keys_file_others_can_read_is_warned_about(no_keys, monkeypatch, caplog):
    path = no_keys / "keys.toml"
    path.write_text('FAL_KEY = "fal-0123456789"\n')
    path.chmod(0o644)
    monkeypatch.setenv("FLUX_JUICED_KEYS_FILE", str(path))
    with caplog.at_level(logging.WARNING, logger="flux_juiced.remote"):
        assert keys_module.get_key("fal") == "fal-0123456789"
    assert "chmod 600" in caplog.text and "fal-0123456789" not in caplog.text


@pytest.mark.parametrize("provider", list(KEY_ENV))
def test_a_missing_key_says_where_to_put_it(no_keys, provider):
    error, _ = fails(provider, MissingKey)
    text = str(error)
    assert KEY_ENV[provider] in text and str(no_keys / "absent.toml") in text and text.startswith(f"[{provider}]")


def test_redaction_masks_every_known_key_and_both_halves_of_a_fal_key(monkeypatch):
    monkeypatch.setenv("FAL_KEY", "id-0123456789:secret-abcdefghij")
    monkeypatch.setenv("BFL_API_KEY", CANARY)
    text = f"key {CANARY}; fal secret-abcdefghij and id-0123456789"
    assert redact(text) == "key ***; fal *** and ***"
    assert redact(None) is None and redact("short") == "short"


def test_a_key_echoed_by_the_server_never_reaches_the_error(start_fake, monkeypatch):
    for provider in ("bfl", "replicate", "fal"):
        fake = start_fake(provider)
        fake.fault("submit", "echo_key")
        error, _ = fails(provider, AuthError)
        assert fake.key not in str(error) and "***" in str(error), str(error)


def test_the_key_is_in_no_metadata_and_no_log_line(start_fake, caplog):
    fake = start_fake("inference.sh")
    with caplog.at_level(logging.DEBUG):
        result, _ = run("inference.sh")
    assert fake.received("submit")[0].headers["authorization"] == f"Bearer {fake.key}"  # the key was used
    assert fake.key not in json.dumps(result.metadata) and fake.key not in caplog.text
    assert result.metadata["task_id"] in caplog.text  # the log does speak about the job


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUX_JUICED_REMOTE_DEADLINE_S", "42.5")
    monkeypatch.setenv("FLUX_JUICED_REMOTE_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("FLUX_JUICED_REMOTE_STRICT", "yes")
    settings = RemoteSettings.from_env()
    assert (settings.deadline_s, settings.max_attempts, settings.strict) == (42.5, 2, True)
    assert RemoteSettings.from_env(deadline_s=3).deadline_s == 3
    monkeypatch.setenv("FLUX_JUICED_REMOTE_POLL_INTERVAL_S", "often")
    with pytest.raises(Exception, match="FLUX_JUICED_REMOTE_POLL_INTERVAL_S"):
        RemoteSettings.from_env()


def test_the_remote_speed_modes_are_the_widget_strings():
    from flux_core.speed.presets import SPEED_MODES as ENGINE_SPEED_MODES

    assert SPEED_MODES == ENGINE_SPEED_MODES
