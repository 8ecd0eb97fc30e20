"""compose.yaml describes production; it cannot run here, so its shape is checked."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.settings import ENVIRONMENT, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+)(?::?-(?P<default>.*))?\}$")
TADPOLE_COMMANDS = [["api"], ["project", "postgres"], ["project", "redis"], ["relay"]]
NEEDED = ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def tadpole_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository: the Tadpole processes."""
    return {name: svc for name, svc in compose["services"].items() if svc.get("build") == "."}


def environment_problems(compose: dict[str, Any]) -> list[str]:
    """Why some Tadpole service's settings do not all come from the operator's environment."""
    problems: list[str] = []
    for name, svc in tadpole_services(compose).items():
        env = svc.get("environment")
        if not isinstance(env, dict):
            problems.append(f"{name}: environment must be a mapping, got {env!r}")
            continue
        for key, value in env.items():
            if key not in ENVIRONMENT:
                problems.append(f"{name}: {key} is not a name in service.settings.ENVIRONMENT")
            match = INTERPOLATION.match(str(value))
            if match is None:
                problems.append(f"{name}: {key}={value!r} is hard-coded, not ${{{key}:-default}}")
            elif match.group("name") != key:
                problems.append(f"{name}: {key} reads ${{{match.group('name')}}}, not ${{{key}}}")
        problems.extend(f"{name}: does not set {needed}" for needed in NEEDED if needed not in env)
    return problems


def test_the_stack_has_its_infrastructure_and_every_tadpole_process(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    missing = {"postgres", "redis", "kafka"} - set(services)
    assert not missing, f"compose.yaml lacks the services {sorted(missing)}"
    assert not [s for s in services if "zookeeper" in s], "KRaft Kafka needs no ZooKeeper service"
    tadpole = tadpole_services(compose)
    commands = sorted(list(svc.get("command", [])) for svc in tadpole.values())
    assert commands == TADPOLE_COMMANDS, (
        f"the services built from '.' run {commands}, expected one each of {TADPOLE_COMMANDS}"
    )


def test_every_command_is_a_tadpole_subcommand(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tadpole"]' in dockerfile, "the image must run `tadpole <command>`"
    for name, svc in tadpole_services(compose).items():
        try:
            build_parser().parse_args(svc["command"])
        except SystemExit:
            pytest.fail(f"{name}: `tadpole {' '.join(svc['command'])}` is not a tadpole command")


def test_tadpole_waits_for_healthy_infrastructure(compose: dict[str, Any]) -> None:
    for infra in ("postgres", "redis", "kafka"):
        assert "healthcheck" in compose["services"][infra], f"{infra} has no healthcheck"
    for name, svc in tadpole_services(compose).items():
        depends = svc.get("depends_on", {})
        for infra in ("postgres", "redis", "kafka"):
            condition = depends.get(infra, {}).get("condition")
            assert condition == "service_healthy", (
                f"{name} must depend on {infra} with condition service_healthy, got {condition!r}"
            )


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    roles = set(str(env.get("KAFKA_PROCESS_ROLES", "")).split(","))
    assert {"broker", "controller"} <= roles, f"KAFKA_PROCESS_ROLES is {roles}, not KRaft"
    for key in ("KAFKA_NODE_ID", "KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_LISTENERS"):
        assert key in env, f"kafka: {key} is not set"
    assert "CONTROLLER" in env["KAFKA_LISTENERS"], "kafka: no CONTROLLER listener"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"], (
        "kafka must advertise kafka:9092 to the other services"
    )
    assert not any("ZOOKEEPER" in key for key in env), "kafka is configured for ZooKeeper"


def test_every_tadpole_setting_comes_from_the_environment(compose: dict[str, Any]) -> None:
    assert tadpole_services(compose), "no service is built from '.'"
    problems = environment_problems(compose)
    assert not problems, "\n".join(problems)


def test_tadpole_reaches_the_compose_kafka(compose: dict[str, Any]) -> None:
    for name, svc in tadpole_services(compose).items():
        match = INTERPOLATION.match(str(svc["environment"]["KAFKA_BOOTSTRAP_SERVERS"]))
        assert match, f"{name}: KAFKA_BOOTSTRAP_SERVERS is not an interpolation"
        hosts = [server.rsplit(":", 1)[0] for server in (match.group("default") or "").split(",")]
        assert "kafka" in hosts, (
            f"{name}: KAFKA_BOOTSTRAP_SERVERS defaults to {match.group('default')!r}, "
            "not the kafka service"
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DATABASE_URL", "postgresql://postgres@postgres/postgres"),
        ("TADPOLE_LOG_LEVEL", "${LOG_LEVEL:-INFO}"),
        ("NOT_A_SETTING", "${NOT_A_SETTING:-x}"),
    ],
)
def test_the_environment_check_catches_a_mistake(
    compose: dict[str, Any], key: str, value: str
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["relay"]["environment"][key] = value
    assert environment_problems(broken), f"{key}={value!r} in relay went unnoticed"


def test_the_api_publishes_its_port_and_listens_on_every_interface(
    compose: dict[str, Any],
) -> None:
    api = compose["services"]["api"]
    assert api["environment"].get("TADPOLE_HOST") == "${TADPOLE_HOST:-0.0.0.0}", (
        "the api must bind 0.0.0.0 inside its container"
    )
    port = api["environment"].get("TADPOLE_PORT")
    assert port == "${TADPOLE_PORT:-8080}", f"the api's TADPOLE_PORT is {port!r}"
    # The container listens on TADPOLE_PORT, so the published port maps to that same port.
    assert api.get("ports") == [f"{port}:{port}"], f"the api publishes {api.get('ports')}"


def test_tadpole_names_win_over_seed_003_names() -> None:
    settings = load_settings({"TADPOLE_PORT": "9000", "ORHESTRA_PORT": "9100"})
    assert settings.port == 9000, "TADPOLE_PORT must win over ORHESTRA_PORT"
    assert load_settings({"ORHESTRA_PORT": "9100"}).port == 9100, "ORHESTRA_PORT is ignored"
    assert load_settings({}).port == 8080
    assert load_settings({"ORHESTRA_AGENT_KEY": "k1"}).agent_key == "k1", (
        "ORHESTRA_AGENT_KEY must be honoured when TADPOLE_AGENT_KEY is unset"
    )
    both = load_settings({"TADPOLE_AGENT_KEY": "a", "ORHESTRA_AGENT_KEY": "b"})
    assert both.agent_key == "a", "TADPOLE_AGENT_KEY must win over ORHESTRA_AGENT_KEY"
    assert load_settings({"ORHESTRA_MAX_ATTEMPTS": "5"}).max_attempts == 5


def test_a_setting_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="TADPOLE_MAX_ATTEMPTS"):
        load_settings({"TADPOLE_MAX_ATTEMPTS": "three"})
    with pytest.raises(SettingsError, match="TADPOLE_SPOT_TIMEOUT"):
        load_settings({"TADPOLE_SPOT_TIMEOUT": "-1"})


def test_a_child_process_gets_the_same_settings() -> None:
    settings = load_settings({"TADPOLE_PORT": "9001", "TADPOLE_SPOT_TIMEOUT": "7"})
    assert load_settings(settings.environ()) == settings
