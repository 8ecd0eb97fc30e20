"""Settings: each declared once, as a field; the environment table and reading derived from it."""

from __future__ import annotations

import dataclasses

from service.settings import ENVIRONMENT, Settings, load_settings


def test_every_setting_names_its_variables_and_every_variable_is_listed_once() -> None:
    names = [v.name for f in dataclasses.fields(Settings) for v in f.metadata["variables"]]
    assert len(names) == len(set(names)), "a variable is read by two settings"
    assert list(ENVIRONMENT) == names


def test_the_defaults_are_what_an_empty_environment_gives() -> None:
    assert load_settings({}) == Settings()
    assert Settings().port == 8080 and Settings().max_attempts == 3
    assert isinstance(Settings().task_reaper_interval, float)


def test_a_child_process_gets_every_setting_changed() -> None:
    changed = {
        "DATABASE_URL": "postgresql://elsewhere/db",
        "REDIS_URL": "redis://elsewhere/1",
        "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "TADPOLE_PORT": "9002",
        "TADPOLE_HOST": "0.0.0.0",
        "TADPOLE_AGENT_KEY": "secret",
        "TADPOLE_MAX_ATTEMPTS": "7",
        "TADPOLE_SCHEMA": "s",
        "TADPOLE_READ_SCHEMA": "r",
        "TADPOLE_REDIS_PREFIX": "p",
        "TADPOLE_TOPIC_PREFIX": "t",
        "TADPOLE_MAX_SWEEP_TASKS": "11",
        "TADPOLE_MAX_SWEEP_BYTES": "12",
        "TADPOLE_TASK_REAPER_INTERVAL": "1.5",
        "TADPOLE_TASK_REAPER_THRESHOLD": "2.5",
        "TADPOLE_SPOT_REAPER_INTERVAL": "3.5",
        "TADPOLE_SPOT_TIMEOUT": "4.5",
        "TADPOLE_HEARTBEAT_STORE_INTERVAL": "5.5",
        "TADPOLE_READ_WAIT": "6.5",
        "TADPOLE_DEGRADED_LAG": "7.5",
        "TADPOLE_BODY_TIMEOUT": "8.5",
        "TADPOLE_COMMAND_TIMEOUT": "9.5",
        "TADPOLE_LEASE_SECONDS": "12",
        "TADPOLE_TIMER_INTERVAL": "0.5",
        "TADPOLE_TOPIC_PARTITIONS": "2",
        "TADPOLE_SAGA_HOOKS": '{"register_with_mesh": "http://hooks/register"}',
        "TADPOLE_SAGA_SWEEP_INTERVAL": "3",
        "TADPOLE_TEST_SAGA_FAULTS": "/tmp/faults.json",
        "TADPOLE_LOG_LEVEL": "debug",
    }
    settings = load_settings(changed)
    unchanged = [
        f.name for f in dataclasses.fields(Settings) if getattr(settings, f.name) == f.default
    ]
    assert not unchanged, f"settings these variables did not change: {unchanged}"
    assert settings.log_level == "DEBUG"
    assert load_settings(settings.environ()) == settings


def test_with_changes_makes_a_changed_copy() -> None:
    settings = Settings()
    assert settings.with_changes(port=1).port == 1
    assert settings.port == 8080
