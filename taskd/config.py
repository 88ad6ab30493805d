"""Settings: `config.toml` with `TASKD_<TABLE>_<KEY>` environment overrides, validated once."""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "TASKD_"
CONFIG_ENV = "TASKD_CONFIG"
DEFAULT_CONFIG = Path("config.toml")
MIN_SECRET_BYTES = 32

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PublicUrl(BaseModel):
    """`scheme://host[:port]` as clients reach the service."""

    model_config = ConfigDict(frozen=True)
    scheme: str
    authority: str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    public_url: PublicUrl | None = None
    drain_seconds: float = Field(5.0, ge=0)
    shutdown_grace: float = Field(10.0, ge=0)
    keepalive_timeout: float = Field(75.0, gt=0)

    @field_validator("public_url", mode="before")
    @classmethod
    def _public_url(cls, value: Any) -> Any:
        if value in ("", None):
            return None
        if isinstance(value, str):
            scheme, sep, rest = value.rstrip("/").partition("://")
            if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
                raise ValueError("must be like https://tasks.example.com (no path)")
            return PublicUrl(scheme=scheme, authority=rest.lower())
        return value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return (
            tuple(str(v).rstrip("/") for v in value) if isinstance(value, list | tuple) else value
        )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(str(v).strip(), strict=False) for v in value)
        return value


class PostgresSettings(_Section):
    dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/taskd")
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(10, ge=1)
    timeout: float = Field(5.0, gt=0)
    statement_timeout_ms: int = Field(10_000, ge=0)


class RedisSettings(_Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    namespace: str = Field("taskd", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    max_connections: int = Field(32, ge=2)
    timeout: float = Field(1.0, gt=0)
    cluster_nodes: tuple[str, ...] = ()
    wait_replicas: int = Field(0, ge=0)
    wait_timeout_ms: int = Field(1000, ge=1)

    @field_validator("cluster_nodes", mode="before")
    @classmethod
    def _nodes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            for node in value:
                host, sep, port = str(node).rpartition(":")
                if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"{node!r} is not host:port")
            return tuple(str(v) for v in value)
        return value


class AuthSettings(_Section):
    secret: SecretStr = SecretStr("")
    algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    access_ttl: int = Field(300, ge=1)
    refresh_ttl: int = Field(86_400, ge=1)
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    bcrypt_threads: int = Field(2, ge=1)
    bcrypt_max_wait: float = Field(2.0, gt=0)
    cutoff_cache_size: int = Field(100_000, ge=1)
    cutoff_max_age: float = Field(60.0, gt=0)
    cutoff_recheck: float = Field(1.0, gt=0)


class ThrottleSettings(_Section):
    window: int = Field(60, ge=1)
    login_per_address: int = Field(30, ge=1)
    login_per_username: int = Field(10, ge=1)
    register_per_address: int = Field(10, ge=1)
    refresh_per_user: int = Field(60, ge=1)
    password_per_user: int = Field(10, ge=1)
    local_max_keys: int = Field(100_000, ge=1)


class StreamSettings(_Section):
    maxlen: int = Field(1000, ge=1)
    live_inline_bytes: int = Field(4096, ge=256)
    ping_interval: float = Field(15.0, gt=0)
    queue_size: int = Field(1000, ge=1)
    queue_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    catch_up_bytes: int = Field(256 * 1024, ge=1024)
    max_per_user: int = Field(32, ge=1)
    reconnect_wait: float = Field(1.0, ge=0)
    retry_ms: int = Field(2000, ge=0)
    catch_up_batch: int = Field(500, ge=1)
    send_timeout: float = Field(10.0, gt=0)


class RelaySettings(_Section):
    batch_size: int = Field(500, ge=1)
    sweep_interval: float = Field(1.0, gt=0)
    lease_seconds: int = Field(5, ge=1)
    max_backoff: float = Field(5.0, gt=0)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    http: HttpSettings = HttpSettings()
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    throttle: ThrottleSettings = ThrottleSettings()
    stream: StreamSettings = StreamSettings()
    relay: RelaySettings = RelaySettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        _check_lease(self)
        return self


def _check_lease(settings: Settings) -> None:
    """The leader's session must not fall silent for a whole lease during one sweep: a sweep
    is a Redis call (one retry: twice the timeout) plus the wait for the next doorbell."""
    busiest = settings.relay.sweep_interval + 2 * settings.redis.timeout
    if busiest >= settings.relay.lease_seconds:
        raise ValueError(
            f"[relay] lease_seconds ({settings.relay.lease_seconds}) must exceed"
            f" [relay] sweep_interval + 2 x [redis] timeout ({busiest:g})"
        )


class ConfigError(Exception):
    """The configuration file or environment is not valid."""


# Keys earlier versions had and this one ignores (with a warning) rather than refuse: a
# deployment's config file keeps working across the upgrade that retired them.
RETIRED = {
    ("stream", "firehose_maxlen"): "there is no firehose since live events use shard channels",
    ("stream", "hub_batch"): "the hub no longer reads a firehose",
    ("stream", "hub_block_ms"): "the hub no longer reads a firehose",
}
RENAMED = {("stream", "firehose_inline_bytes"): "live_inline_bytes"}


def _drop_retired(data: dict[str, Any]) -> list[str]:
    """Remove retired keys from `data` and carry renamed ones over; a warning for each."""
    warnings = []
    for (table, key), why in RETIRED.items():
        section = data.get(table)
        if isinstance(section, dict) and key in section:
            del section[key]
            warnings.append(f"[{table}] {key} is ignored: {why}")
    for (table, key), new in RENAMED.items():
        section = data.get(table)
        if isinstance(section, dict) and key in section:
            section.setdefault(new, section.pop(key))
            warnings.append(f"[{table}] {key} is now [{table}] {new}")
    return warnings


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Overlay `TASKD_<TABLE>_<KEY>` variables; an unknown key of a known table is an error."""
    tables = Settings.model_fields
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        table, _, key = rest.partition("_")
        if table not in tables:
            continue
        section_model = tables[table].annotation
        fields = (
            section_model.model_fields
            if isinstance(section_model, type) and issubclass(section_model, BaseModel)
            else {}
        )
        if key not in fields and (table, key) not in {*RETIRED, *RENAMED}:
            raise ConfigError(f"{name}: [{table}] has no key {key!r}")
        data.setdefault(table, {})[key] = value


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), overlay the environment and validate."""
    env = os.environ if env is None else env
    if path is None:
        path = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"{path}: no such file")
    _apply_env(data, env)
    for warning in _drop_retired(data):
        log.warning("%s", warning)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(exc)) from exc


def check_secret(settings: Settings) -> None:
    """Refuse to serve with a missing or short signing key."""
    secret = settings.auth.secret.get_secret_value()
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"[auth] secret (TASKD_AUTH_SECRET) must be at least {MIN_SECRET_BYTES} bytes; "
            'generate one with: python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
