"""The ``tadpole`` command: run the stack or one of its processes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from service.settings import ENVIRONMENT, Settings, SettingsError, load_settings

EPILOG = "settings come from the environment:\n" + "\n".join(
    f"  {name:34} {meaning} (default: {default or 'unset'})"
    for name, (default, meaning) in ENVIRONMENT.items()
)


def _settings(args: argparse.Namespace) -> Settings:
    try:
        settings = load_settings()
    except SettingsError as error:
        sys.exit(f"tadpole: {error}")
    if getattr(args, "port", None):
        settings = settings.with_changes(port=args.port)
    return settings


def _up(args: argparse.Namespace) -> int:
    from service.processes import run_up

    return run_up(_settings(args))


def _api(args: argparse.Namespace) -> int:
    from service.processes import run_api

    return run_api(_settings(args))


def _relay(args: argparse.Namespace) -> int:
    from service.processes import run_relay

    return run_relay(_settings(args))


def _project(args: argparse.Namespace) -> int:
    from service.processes import run_projector

    return run_projector(_settings(args), args.read_model)


def _sagas(args: argparse.Namespace) -> int:
    from service.processes import run_sagas

    return run_sagas(_settings(args), args.driver, args.group)


def _dead_letters(args: argparse.Namespace) -> int:
    from service.deadletters import list_letters, retry_letters

    settings = _settings(args)
    if args.action == "retry":
        return retry_letters(settings, args.ids or None, args.stage, args.wait)
    return list_letters(settings, args.stage, args.all, args.json)


def _worker(args: argparse.Namespace) -> int:
    from service.execution import JOB_FIELDS, TaskError, template_fields
    from service.worker import MAX_WAIT_MS, WorkerConfig, run_worker

    settings = _settings(args)
    try:
        unknown = template_fields(args.job_command) - set(JOB_FIELDS)
    except TaskError as error:
        sys.exit(f"tadpole worker: --job-command: {error}")
    if unknown:
        print(
            f"tadpole worker: note: --job-command names {', '.join(sorted(unknown))}, which "
            "seed 003 job payloads do not have; such tasks will fail",
            file=sys.stderr,
        )
    config = WorkerConfig(
        url=args.url,
        key=args.key if args.key is not None else settings.agent_key,
        concurrency=args.concurrency,
        job_command=args.job_command,
        renew_every=args.renew_every or settings.lease_seconds / 3,
        grace=args.grace,
        heartbeat_every=args.heartbeat_every,
        wait_ms=min(max(args.wait_ms, 0), MAX_WAIT_MS),
        ip_address=args.ip,
    )
    return run_worker(config, settings.log_level, args.path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def _schemas(args: argparse.Namespace) -> int:
    from schemas.events import rendered_schemas, write_schemas

    if args.write:
        for path in write_schemas():
            print(f"wrote {path}")
        return 0
    for name, text in rendered_schemas().items():
        print(f"# {name}\n{text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tadpole",
        description="Tadpole: an event-sourced control plane for jobs, tasks and worker spots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    up = add(
        "up",
        "run everything: API, relay, projectors, reapers (and the embedded "
        "broker when KAFKA_BOOTSTRAP_SERVERS is unset)",
    )
    up.add_argument(
        "--port", type=int, help="HTTP port (default: TADPOLE_PORT / ORHESTRA_PORT / 8080)"
    )
    up.set_defaults(run=_up)

    api = add(
        "api", "run the HTTP API (gunicorn, one ASGI worker: the single writer and the reapers)"
    )
    api.add_argument("--port", type=int, help="HTTP port")
    api.set_defaults(run=_api)

    add("relay", "relay events from the event store to Kafka").set_defaults(run=_relay)
    sagas = add(
        "sagas",
        "run a saga runner: drive agent-spawning sagas and play the mesh-formation "
        "saga's participants, through the API",
    )
    sagas.add_argument(
        "--driver", default="", help="this runner's name in the sagas' leases (default host-pid)"
    )
    sagas.add_argument(
        "--group",
        default="",
        help="its consumer group (default <topic prefix>.sagas: runners share the cues; "
        "in groups of their own each gets every cue, and the leases still let one drive)",
    )
    sagas.set_defaults(run=_sagas)

    project = add("project", "feed one read model from Kafka, healing from the event store")
    project.add_argument("read_model", choices=["postgres", "redis"], help="which read model")
    project.set_defaults(run=_project)

    letters = add(
        "dead-letters",
        "list the events a pipeline step could not take, or have them re-applied "
        "once the cause is fixed",
    )
    letters.add_argument(
        "action",
        nargs="?",
        choices=["list", "retry"],
        default="list",
        help="list (default) the letters not yet re-applied, or retry them",
    )
    letters.add_argument("ids", nargs="*", type=int, help="retry only these letter ids")
    letters.add_argument(
        "--stage", help="only this step: relay, projector.postgres or projector.redis"
    )
    letters.add_argument("--all", action="store_true", help="list re-applied letters too")
    letters.add_argument("--json", action="store_true", help="list as JSON lines")
    letters.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds retry waits for the steps to re-apply the letters (default 30)",
    )
    letters.set_defaults(run=_dead_letters)

    from service.execution import DEFAULT_JOB_COMMAND
    from service.worker import HELP

    worker = sub.add_parser(
        "worker",
        help="run tasks for a Tadpole API (the reference worker a worker node runs)",
        description=HELP,
        epilog="settings from the environment: TADPOLE_AGENT_KEY (or ORHESTRA_AGENT_KEY), "
        "TADPOLE_LEASE_SECONDS (the API's lease, to renew every third of it), "
        "TADPOLE_LOG_LEVEL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument("--url", required=True, help="the API, e.g. http://127.0.0.1:8080")
    worker.add_argument(
        "--key", help="the agent key, sent as X-Orhestra-Key (default: TADPOLE_AGENT_KEY)"
    )
    worker.add_argument(
        "--concurrency", type=_positive_int, default=1, help="tasks run at once (default 1)"
    )
    worker.add_argument(
        "--job-command",
        default=DEFAULT_JOB_COMMAND,
        help="the command line of a job task, {placeholders} from its payload "
        f"(default: {DEFAULT_JOB_COMMAND!r})",
    )
    worker.add_argument(
        "--renew-every",
        type=_positive_float,
        help="seconds between renewals of a workflow task's lease "
        "(default: a third of TADPOLE_LEASE_SECONDS, 10)",
    )
    worker.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running tasks get to finish after SIGTERM (default 30)",
    )
    worker.add_argument(
        "--heartbeat-every",
        type=_positive_float,
        default=3.0,
        help="seconds between heartbeats (default 3; the API marks a spot DOWN after "
        "TADPOLE_SPOT_TIMEOUT, 10, without one)",
    )
    worker.add_argument(
        "--wait-ms",
        type=int,
        default=30_000,
        help="how long a claim waits for a task, in ms (default and most: 30000)",
    )
    worker.add_argument(
        "--ip", help="the address reported to the API (default: the one that reaches --url)"
    )
    worker.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory to import task callables from (repeatable; the current one always)",
    )
    worker.set_defaults(run=_worker)

    schemas = add("schemas", "print the Avro schemas of every event, or write schemas/avro/")
    schemas.add_argument("--write", action="store_true", help="write schemas/avro/*.avsc")
    schemas.set_defaults(run=_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
