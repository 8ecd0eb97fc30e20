"""Settings, read once from the environment into a frozen object.

This is the only module that reads ``os.environ``; everything else is handed a
:class:`Settings`. Each setting is declared once, as a field of :class:`Settings`
that names the environment variables it is read from, their defaults and meaning,
and how the text is parsed; :data:`ENVIRONMENT`, :meth:`Settings.environ` and
:func:`load_settings` are derived from those fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class Variable:
    """An environment variable: its name, its default (as text) and what it sets."""

    name: str
    default: str
    meaning: str


Parse = Callable[[str], Any]


def _positive(kind: type[int] | type[float]) -> Parse:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"is not a {kind.__name__}") from None
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    return parse


INT, FLOAT = _positive(int), _positive(float)


def OPTIONAL_INT(raw: str) -> int:  # a parser, named like INT
    """A positive integer; 0 when unset (or 0)."""
    return int(INT(raw)) if raw not in ("", "0") else 0


def setting(
    name: str, default: str, meaning: str, parse: Parse = str, *, also: Variable | None = None
) -> Any:
    """A :class:`Settings` field read from the variable ``name``.

    ``also`` is an older name for the same setting (seed 003's ``ORHESTRA_*``),
    read when ``name`` is unset or empty; its default applies when ``name`` has none.
    """
    variables = (Variable(name, default, meaning), *((also,) if also else ()))
    fallback = next((v.default for v in variables if v.default), "")
    return field(default=parse(fallback), metadata={"variables": variables, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one Tadpole deployment."""

    database_url: str = setting(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "PostgreSQL for the event store and read models",
    )
    redis_url: str = setting(
        "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis for the fast read models"
    )
    kafka_bootstrap_servers: str = setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        "",
        "Kafka brokers; unset: `tadpole up` starts the embedded broker",
    )
    port: int = setting(
        "TADPOLE_PORT",
        "",
        "HTTP port (falls back to ORHESTRA_PORT, then 8080)",
        INT,
        also=Variable("ORHESTRA_PORT", "8080", "seed 003's name for the HTTP port"),
    )
    host: str = setting("TADPOLE_HOST", "127.0.0.1", "HTTP bind address")
    agent_key: str = setting(
        "TADPOLE_AGENT_KEY",
        "",
        "if set, /internal/v1/* needs X-Orhestra-Key (falls back to ORHESTRA_AGENT_KEY)",
        also=Variable("ORHESTRA_AGENT_KEY", "", "seed 003's name for the agent key"),
    )
    max_attempts: int = setting(
        "TADPOLE_MAX_ATTEMPTS",
        "",
        "claims a task gets before it is FAILED (falls back to ORHESTRA_MAX_ATTEMPTS, then 3)",
        INT,
        also=Variable("ORHESTRA_MAX_ATTEMPTS", "3", "seed 003's name for max attempts"),
    )
    store_schema: str = setting(
        "TADPOLE_SCHEMA", "tadpole", "PostgreSQL schema for the event store"
    )
    read_schema: str = setting(
        "TADPOLE_READ_SCHEMA", "tadpole_read", "PostgreSQL schema for the read models"
    )
    redis_prefix: str = setting(
        "TADPOLE_REDIS_PREFIX", "tadpole", "key prefix of the Redis read models"
    )
    topic_prefix: str = setting(
        "TADPOLE_TOPIC_PREFIX", "tadpole", "prefix of every Kafka topic and consumer group"
    )
    topic_partitions: int = setting(
        "TADPOLE_TOPIC_PARTITIONS",
        "",
        "partitions of each event topic it creates; unset or 0: each topic's own "
        "(seed 001's) on Kafka, 1 on the embedded broker",
        OPTIONAL_INT,
    )
    max_sweep_tasks: int = setting(
        "TADPOLE_MAX_SWEEP_TASKS", "100000", "largest job a sweep may create", INT
    )
    max_sweep_bytes: int = setting(
        "TADPOLE_MAX_SWEEP_BYTES",
        "262144",
        "largest sweep, in bytes of canonical JSON (stored once, in Job.Created)",
        INT,
    )
    task_reaper_interval: float = setting(
        "TADPOLE_TASK_REAPER_INTERVAL", "30", "seconds between TaskReaper runs", FLOAT
    )
    task_reaper_threshold: float = setting(
        "TADPOLE_TASK_REAPER_THRESHOLD",
        "300",
        "seconds a RUNNING task may go without its holder's heartbeat",
        FLOAT,
    )
    lease_seconds: float = setting(
        "TADPOLE_LEASE_SECONDS",
        "30",
        "seconds a workflow task's lease lasts unless renewed (seed 002: 30, renewed every 10)",
        FLOAT,
    )
    timer_interval: float = setting(
        "TADPOLE_TIMER_INTERVAL",
        "0.25",
        "seconds between checks for workflow leases and timeouts that ran out",
        FLOAT,
    )
    spot_reaper_interval: float = setting(
        "TADPOLE_SPOT_REAPER_INTERVAL", "5", "seconds between SpotReaper runs", FLOAT
    )
    spot_timeout: float = setting(
        "TADPOLE_SPOT_TIMEOUT", "10", "seconds without heartbeat before a spot is DOWN", FLOAT
    )
    heartbeat_store_interval: float = setting(
        "TADPOLE_HEARTBEAT_STORE_INTERVAL",
        "5",
        "store an unchanged spot's heartbeat at most this often (seconds)",
        FLOAT,
    )
    read_wait: float = setting(
        "TADPOLE_READ_WAIT",
        "1.0",
        "seconds a query waits for the read model to reach the writer",
        FLOAT,
    )
    degraded_lag: float = setting(
        "TADPOLE_DEGRADED_LAG",
        "10",
        "seconds a pipeline step may be behind, with events waiting, before health is degraded",
        FLOAT,
    )
    body_timeout: float = setting(
        "TADPOLE_BODY_TIMEOUT",
        "10",
        "seconds a client may take to send a whole request; then 408 and the connection is closed",
        FLOAT,
    )
    command_timeout: float = setting(
        "TADPOLE_COMMAND_TIMEOUT",
        "2",
        "seconds a command may wait to be decided and stored before it is answered 503",
        FLOAT,
    )
    saga_hooks: str = setting(
        "TADPOLE_SAGA_HOOKS",
        "",
        "JSON object: saga step or compensation name → URL the saga runner POSTs it to "
        "(with retries and a circuit breaker) instead of its built-in handler",
    )
    saga_sweep_interval: float = setting(
        "TADPOLE_SAGA_SWEEP_INTERVAL",
        "2",
        "seconds between the saga runner's looks at open sagas it may have missed",
        FLOAT,
    )
    test_saga_faults: str = setting(
        "TADPOLE_TEST_SAGA_FAULTS",
        "",
        "tests and benchmarks only: a JSON file of faults the saga runner injects "
        "(re-read as it changes)",
    )
    log_level: str = setting("TADPOLE_LOG_LEVEL", "INFO", "logging level", str.upper)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def environ(self) -> dict[str, str]:
        """The environment that gives a child process these same settings."""
        return {_variables(f)[0].name: str(getattr(self, f.name)) for f in fields(self)}


def _variables(f: Field[Any]) -> tuple[Variable, ...]:
    variables: tuple[Variable, ...] = f.metadata["variables"]
    return variables


#: Every environment variable Tadpole reads, with its default and meaning.
#: The README's settings table and compose.yaml's test are checked against it.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    v.name: (v.default, v.meaning) for f in fields(Settings) for v in _variables(f)
}


class SettingsError(ValueError):
    """An environment variable holds a value Tadpole cannot use."""


def _read(env: Mapping[str, str], f: Field[Any]) -> Any:
    """The value of one field: from the first of its variables that is set, else its default."""
    variables = _variables(f)
    chosen = next((v for v in variables if env.get(v.name)), None)
    if chosen is None:
        chosen = next((v for v in variables if v.default), variables[0])
        raw = chosen.default
    else:
        raw = env[chosen.name]
    try:
        return f.metadata["parse"](raw)
    except ValueError as error:
        raise SettingsError(f"{chosen.name}={raw!r} {error}") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    return Settings(**{f.name: _read(env, f) for f in fields(Settings)})
