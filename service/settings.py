"""Settings, read once from the environment into a frozen object.

This is the only module that reads ``os.environ``; everything else is handed a
:class:`Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

#: Every environment variable Tadpole reads, with its default and meaning.
#: The README's settings table and compose.yaml's test are checked against it.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "DATABASE_URL": (
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "PostgreSQL for the event store and read models",
    ),
    "REDIS_URL": ("redis://127.0.0.1:6379/0", "Redis for the fast read models"),
    "KAFKA_BOOTSTRAP_SERVERS": (
        "",
        "Kafka brokers; unset: `tadpole up` starts the embedded broker",
    ),
    "TADPOLE_PORT": ("", "HTTP port (falls back to ORHESTRA_PORT, then 8080)"),
    "ORHESTRA_PORT": ("8080", "seed 003's name for the HTTP port"),
    "TADPOLE_HOST": ("127.0.0.1", "HTTP bind address"),
    "TADPOLE_AGENT_KEY": (
        "",
        "if set, /internal/v1/* needs X-Orhestra-Key (falls back to ORHESTRA_AGENT_KEY)",
    ),
    "ORHESTRA_AGENT_KEY": ("", "seed 003's name for the agent key"),
    "TADPOLE_MAX_ATTEMPTS": (
        "",
        "claims a task gets before it is FAILED (falls back to ORHESTRA_MAX_ATTEMPTS, then 3)",
    ),
    "ORHESTRA_MAX_ATTEMPTS": ("3", "seed 003's name for max attempts"),
    "TADPOLE_SCHEMA": ("tadpole", "PostgreSQL schema for the event store"),
    "TADPOLE_READ_SCHEMA": ("tadpole_read", "PostgreSQL schema for the read models"),
    "TADPOLE_REDIS_PREFIX": ("tadpole", "key prefix of the Redis read models"),
    "TADPOLE_TOPIC_PREFIX": ("tadpole", "prefix of every Kafka topic and consumer group"),
    "TADPOLE_MAX_SWEEP_TASKS": ("100000", "largest job a sweep may create"),
    "TADPOLE_MAX_SWEEP_BYTES": (
        "262144",
        "largest sweep, in bytes of canonical JSON (stored once, in Job.Created)",
    ),
    "TADPOLE_TASK_REAPER_INTERVAL": ("30", "seconds between TaskReaper runs"),
    "TADPOLE_TASK_REAPER_THRESHOLD": (
        "300",
        "seconds a RUNNING task may go without its holder's heartbeat",
    ),
    "TADPOLE_SPOT_REAPER_INTERVAL": ("5", "seconds between SpotReaper runs"),
    "TADPOLE_SPOT_TIMEOUT": ("10", "seconds without heartbeat before a spot is DOWN"),
    "TADPOLE_HEARTBEAT_STORE_INTERVAL": (
        "5",
        "store an unchanged spot's heartbeat at most this often (seconds)",
    ),
    "TADPOLE_READ_WAIT": ("1.0", "seconds a query waits for the read model to reach the writer"),
    "TADPOLE_DEGRADED_LAG": (
        "10",
        "seconds a pipeline step may be behind, with events waiting, before health is degraded",
    ),
    "TADPOLE_BODY_TIMEOUT": (
        "10",
        "seconds a client may take to send a whole request; then 408 and the connection is closed",
    ),
    "TADPOLE_COMMAND_TIMEOUT": (
        "2",
        "seconds a command may wait to be decided and stored before it is answered 503",
    ),
    "TADPOLE_LOG_LEVEL": ("INFO", "logging level"),
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one Tadpole deployment."""

    database_url: str = ENVIRONMENT["DATABASE_URL"][0]
    redis_url: str = ENVIRONMENT["REDIS_URL"][0]
    kafka_bootstrap_servers: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    agent_key: str = ""
    max_attempts: int = 3
    store_schema: str = "tadpole"
    read_schema: str = "tadpole_read"
    redis_prefix: str = "tadpole"
    topic_prefix: str = "tadpole"
    max_sweep_tasks: int = 100_000
    max_sweep_bytes: int = 262_144
    task_reaper_interval: float = 30.0
    task_reaper_threshold: float = 300.0
    spot_reaper_interval: float = 5.0
    spot_timeout: float = 10.0
    heartbeat_store_interval: float = 5.0
    read_wait: float = 1.0
    degraded_lag: float = 10.0
    body_timeout: float = 10.0
    command_timeout: float = 2.0
    log_level: str = "INFO"
    extra: Mapping[str, str] = field(default_factory=dict)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def environ(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "TADPOLE_HOST": self.host,
            "TADPOLE_PORT": str(self.port),
            "TADPOLE_AGENT_KEY": self.agent_key,
            "TADPOLE_MAX_ATTEMPTS": str(self.max_attempts),
            "TADPOLE_SCHEMA": self.store_schema,
            "TADPOLE_READ_SCHEMA": self.read_schema,
            "TADPOLE_REDIS_PREFIX": self.redis_prefix,
            "TADPOLE_TOPIC_PREFIX": self.topic_prefix,
            "TADPOLE_MAX_SWEEP_TASKS": str(self.max_sweep_tasks),
            "TADPOLE_MAX_SWEEP_BYTES": str(self.max_sweep_bytes),
            "TADPOLE_TASK_REAPER_INTERVAL": str(self.task_reaper_interval),
            "TADPOLE_TASK_REAPER_THRESHOLD": str(self.task_reaper_threshold),
            "TADPOLE_SPOT_REAPER_INTERVAL": str(self.spot_reaper_interval),
            "TADPOLE_SPOT_TIMEOUT": str(self.spot_timeout),
            "TADPOLE_HEARTBEAT_STORE_INTERVAL": str(self.heartbeat_store_interval),
            "TADPOLE_READ_WAIT": str(self.read_wait),
            "TADPOLE_DEGRADED_LAG": str(self.degraded_lag),
            "TADPOLE_BODY_TIMEOUT": str(self.body_timeout),
            "TADPOLE_COMMAND_TIMEOUT": str(self.command_timeout),
            "TADPOLE_LOG_LEVEL": self.log_level,
        }


class SettingsError(ValueError):
    """An environment variable holds a value Tadpole cannot use."""


def _number(env: Mapping[str, str], name: str, kind: type[int] | type[float]) -> Any:
    raw = env.get(name) or ENVIRONMENT[name][0]
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than zero")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env

    def text(name: str) -> str:
        return env.get(name) or ENVIRONMENT[name][0]

    port_name = "TADPOLE_PORT" if env.get("TADPOLE_PORT") else "ORHESTRA_PORT"
    attempts_name = (
        "TADPOLE_MAX_ATTEMPTS" if env.get("TADPOLE_MAX_ATTEMPTS") else "ORHESTRA_MAX_ATTEMPTS"
    )
    return Settings(
        database_url=text("DATABASE_URL"),
        redis_url=text("REDIS_URL"),
        kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS", ""),
        host=text("TADPOLE_HOST"),
        port=_number(env, port_name, int),
        agent_key=env.get("TADPOLE_AGENT_KEY") or env.get("ORHESTRA_AGENT_KEY") or "",
        max_attempts=_number(env, attempts_name, int),
        store_schema=text("TADPOLE_SCHEMA"),
        read_schema=text("TADPOLE_READ_SCHEMA"),
        redis_prefix=text("TADPOLE_REDIS_PREFIX"),
        topic_prefix=text("TADPOLE_TOPIC_PREFIX"),
        max_sweep_tasks=_number(env, "TADPOLE_MAX_SWEEP_TASKS", int),
        max_sweep_bytes=_number(env, "TADPOLE_MAX_SWEEP_BYTES", int),
        task_reaper_interval=_number(env, "TADPOLE_TASK_REAPER_INTERVAL", float),
        task_reaper_threshold=_number(env, "TADPOLE_TASK_REAPER_THRESHOLD", float),
        spot_reaper_interval=_number(env, "TADPOLE_SPOT_REAPER_INTERVAL", float),
        spot_timeout=_number(env, "TADPOLE_SPOT_TIMEOUT", float),
        heartbeat_store_interval=_number(env, "TADPOLE_HEARTBEAT_STORE_INTERVAL", float),
        read_wait=_number(env, "TADPOLE_READ_WAIT", float),
        degraded_lag=_number(env, "TADPOLE_DEGRADED_LAG", float),
        body_timeout=_number(env, "TADPOLE_BODY_TIMEOUT", float),
        command_timeout=_number(env, "TADPOLE_COMMAND_TIMEOUT", float),
        log_level=text("TADPOLE_LOG_LEVEL").upper(),
    )
