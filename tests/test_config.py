"""config.toml plus TASKD_<TABLE>_<KEY> overrides, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskd.config import ConfigError, Settings, check_secret, load_settings

PROJECT = Path(__file__).resolve().parent.parent


def test_shipped_file_lists_every_key_with_its_default() -> None:
    text = (PROJECT / "config.toml").read_text()
    for table, field in Settings.model_fields.items():
        section = field.annotation
        assert section is not None
        assert f"[{table}]" in text
        for key in section.model_fields:
            assert f"\n{key} = " in text, f"[{table}] {key} is missing from config.toml"
    assert load_settings(PROJECT / "config.toml", env={}) == Settings()


def test_environment_overrides_the_file() -> None:
    env = {
        "TASKD_HTTP_PORT": "9999",
        "TASKD_POSTGRES_DSN": "postgresql://x@h/db",
        "TASKD_HTTP_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        "TASKD_AUTH_SECRET": "s" * 40,
        "UNRELATED": "1",
    }
    settings = load_settings(PROJECT / "config.toml", env=env)
    assert settings.http.port == 9999
    assert settings.postgres.dsn.get_secret_value() == "postgresql://x@h/db"
    assert [str(n) for n in settings.http.trusted_proxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    check_secret(settings)


def test_unknown_key_in_environment_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no key"):
        load_settings(PROJECT / "config.toml", env={"TASKD_HTTP_PROT": "1"})


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[http]\nprot = 1\n")
    with pytest.raises(ConfigError):
        load_settings(path, env={})


def test_bad_value_is_an_error() -> None:
    with pytest.raises(ConfigError):
        load_settings(PROJECT / "config.toml", env={"TASKD_HTTP_PORT": "eighty"})


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[http]\nport = 1234\n")
    assert load_settings(env={"TASKD_CONFIG": str(path)}).http.port == 1234
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(env={"TASKD_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize("secret", ["", "short"])
def test_missing_or_short_secret_is_refused(secret: str) -> None:
    settings = load_settings(PROJECT / "config.toml", env={"TASKD_AUTH_SECRET": secret})
    with pytest.raises(ConfigError, match="secret"):
        check_secret(settings)


def test_a_lease_shorter_than_a_sweep_is_refused() -> None:
    with pytest.raises(ConfigError, match="lease_seconds"):
        load_settings(PROJECT / "config.toml", env={"TASKD_RELAY_LEASE_SECONDS": "2"})


def test_public_url() -> None:
    env = {"TASKD_HTTP_PUBLIC_URL": "https://Tasks.Example.com:8443/"}
    pinned = load_settings(PROJECT / "config.toml", env=env).http.public_url
    assert pinned is not None
    assert (pinned.scheme, pinned.authority) == ("https", "tasks.example.com:8443")
    for bad in ("tasks.example.com", "ftp://x", "https://x/path"):
        with pytest.raises(ConfigError, match="public_url"):
            load_settings(PROJECT / "config.toml", env={"TASKD_HTTP_PUBLIC_URL": bad})


def test_retired_keys_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config file from before the live channels still loads; the renamed key carries over."""
    path = tmp_path / "old.toml"
    path.write_text("[stream]\nfirehose_maxlen = 5\nfirehose_inline_bytes = 1024\n")
    settings = load_settings(path, env={"TASKD_STREAM_HUB_BATCH": "7"})
    assert settings.stream.live_inline_bytes == 1024
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "firehose_maxlen is ignored" in warned
    assert "hub_batch is ignored" in warned


def test_cluster_nodes_are_host_and_port(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    nodes = load_settings(path, env={"TASKD_REDIS_CLUSTER_NODES": "a:7000, b:7001"})
    assert nodes.redis.cluster_nodes == ("a:7000", "b:7001")
    with pytest.raises(ConfigError):
        load_settings(path, env={"TASKD_REDIS_CLUSTER_NODES": "a:70000"})
