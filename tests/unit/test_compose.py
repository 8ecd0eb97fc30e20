"""compose.yaml describes production; it cannot run here, so its shape is checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import ENVIRONMENT, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Z_]+)(:-(?P<default>.*))?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def tadpole_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("build") == "."}


def test_the_stack_has_its_infrastructure_and_every_tadpole_process(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "kafka"} <= set(services)
    assert "zookeeper" not in services
    commands = sorted(tuple(svc["command"]) for svc in tadpole_services(compose).values())
    assert commands == [("api",), ("project", "postgres"), ("project", "redis"), ("relay",)]


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    roles = set(env["KAFKA_PROCESS_ROLES"].split(","))
    assert roles == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("ZOOKEEPER" in key for key in env)


def test_every_tadpole_setting_comes_from_the_environment(compose: dict[str, Any]) -> None:
    for name, svc in tadpole_services(compose).items():
        env = svc["environment"]
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        for key, value in env.items():
            assert key in ENVIRONMENT, f"{name}: {key} is not a Tadpole setting"
            match = INTERPOLATION.match(str(value))
            assert match, f"{name}: {key}={value!r} is hard-coded, not ${{{key}:-...}}"
            assert match.group("name") == key, f"{name}: {key} reads ${{{match.group('name')}}}"
        for needed in ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"):
            assert needed in env, f"{name} does not set {needed}"
        assert "kafka:9092" in env["KAFKA_BOOTSTRAP_SERVERS"]


def test_the_api_publishes_its_port_and_listens_on_every_interface(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["environment"]["TADPOLE_HOST"].endswith(":-0.0.0.0}")
    assert api["ports"] == ["${TADPOLE_PORT:-8080}:${TADPOLE_PORT:-8080}"]


def test_tadpole_names_win_over_seed_003_names() -> None:
    settings = load_settings(
        {"TADPOLE_PORT": "9000", "ORHESTRA_PORT": "9100", "ORHESTRA_AGENT_KEY": "k1"}
    )
    assert settings.port == 9000
    assert settings.agent_key == "k1"
    assert load_settings({"ORHESTRA_PORT": "9100"}).port == 9100
    assert load_settings({"TADPOLE_AGENT_KEY": "a", "ORHESTRA_AGENT_KEY": "b"}).agent_key == "a"
    assert load_settings({"ORHESTRA_MAX_ATTEMPTS": "5"}).max_attempts == 5
    assert load_settings({}).port == 8080


def test_a_setting_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="TADPOLE_MAX_ATTEMPTS"):
        load_settings({"TADPOLE_MAX_ATTEMPTS": "three"})
    with pytest.raises(SettingsError, match="TADPOLE_SPOT_TIMEOUT"):
        load_settings({"TADPOLE_SPOT_TIMEOUT": "-1"})


def test_a_child_process_gets_the_same_settings() -> None:
    settings = load_settings({"TADPOLE_PORT": "9001", "TADPOLE_SPOT_TIMEOUT": "7"})
    assert load_settings(settings.environ()) == settings
