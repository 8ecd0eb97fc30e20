"""The long-running processes: API (gunicorn), relay, projectors, and `tadpole up`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import psycopg
from eventsourcing.persistence import PersistenceError

from eventstore.store import TadpoleStore
from service.settings import Settings
from service.wiring import configure_logging, open_store
from streaming.backoff import Backoff

if TYPE_CHECKING:
    from streaming.broker import EmbeddedBroker
    from streaming.topics import TopicCatalogue

log = logging.getLogger(__name__)


def _on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM or SIGINT.

    From another thread: a handler runs inside the main thread, which may be
    waiting on the very ``threading.Event`` that ``stop`` sets, and taking that
    Event's lock again there deadlocks.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=stop, name="stop", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def require_broker(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        sys.exit(
            "KAFKA_BOOTSTRAP_SERVERS is not set: point it at a Kafka broker, "
            "or run `tadpole up`, which starts the embedded one"
        )
    return settings.kafka_bootstrap_servers


def wait_for_store(settings: Settings, who: str) -> TadpoleStore:
    """The event store, once PostgreSQL answers: a process started during an outage
    waits for it (growing pauses) instead of exiting and being restarted in a loop."""
    backoff = Backoff(first=0.5, most=10.0)
    while True:
        try:
            return open_store(settings)
        except (psycopg.OperationalError, PersistenceError) as error:
            pause = backoff.next()
            log.warning(
                "%s: the event store is unavailable (%s); retrying in %.1fs", who, error, pause
            )
            time.sleep(pause)


def run_relay(settings: Settings) -> int:
    from service.bootstrap import bootstrap

    configure_logging(settings)
    servers = require_broker(settings)
    store = wait_for_store(settings, "relay")
    relay = bootstrap(settings).relay(store, servers)
    _on_signals(relay.stop)
    log.info("relay: store schema %s → %s", settings.store_schema, servers)
    try:
        relay.run()
    finally:
        relay.close()
        store.close()
    return 0


def run_projector(settings: Settings, which: str) -> int:
    from service.bootstrap import bootstrap

    configure_logging(settings)
    servers = require_broker(settings)
    store = wait_for_store(settings, f"projector {which}")
    projector = bootstrap(settings).projector(store, servers, which)
    _on_signals(projector.stop)
    log.info("projector %s: consuming %s as %s", which, servers, projector.group)
    try:
        projector.run()
    finally:
        projector.close()
        store.close()
    return 0


def run_sagas(settings: Settings, driver: str = "", group: str = "") -> int:
    """The saga runner (``tadpole sagas``): drives sagas through the API until stopped."""
    import asyncio
    import socket

    import httpx

    from sagas.client import SagaApi
    from sagas.handlers import Faults, Handlers
    from sagas.runner import SagaRunner, TopicCues
    from service.bootstrap import topic_catalogue

    configure_logging(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    servers = require_broker(settings)
    driver = driver or f"{socket.gethostname()}-{os.getpid()}"
    url = f"http://{settings.host}:{settings.port}"

    async def main() -> None:
        api = SagaApi(url, driver, settings.agent_key)
        hooks = httpx.AsyncClient(timeout=5.0)
        runner = SagaRunner(
            api,
            Handlers.from_setting(settings.saga_hooks, hooks),
            Faults(settings.test_saga_faults),
            settings.saga_sweep_interval,
        )
        loop = asyncio.get_running_loop()
        catalogue = topic_catalogue(settings)
        cues = TopicCues(
            servers,
            group or f"{settings.topic_prefix}.sagas",
            [catalogue.agent_lifecycle, catalogue.topic("mesh_coordination")],
            runner.on_event,
            loop,
        )

        def stop() -> None:
            loop.call_soon_threadsafe(runner.stopping.set)

        _on_signals(stop)
        cues.start()
        log.info("saga runner %s: driving sagas through %s", driver, url)
        try:
            await runner.sweep()
        finally:
            await runner.stop()
            cues.stop()
            await api.close()
            await hooks.aclose()

    asyncio.run(main())
    return 0


def gunicorn_argv(settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "service.http.TadpoleWorker",
        # One worker: it is the single writer of every job, block and spot.
        "--workers",
        "1",
        "--bind",
        f"{settings.host}:{settings.port}",
        "--no-control-socket",
        "--graceful-timeout",
        "10",
        "--log-level",
        settings.log_level.lower(),
        "service.web:app_factory()",
    ]


def run_api(settings: Settings) -> int:
    os.execve(sys.executable, gunicorn_argv(settings), {**os.environ, **settings.environ()})


class Kept(Protocol):
    """Something besides the child commands that the supervisor keeps alive."""

    def check(self) -> None:
        """Look whether it still runs and bring it back if not; must return quickly."""


class BrokerKeeper:
    """Brings the embedded broker back on its port, with its topics, when it dies.

    The children were given the broker's address, so it must come back on the
    same port; until the port can be bound again (or the broker answers) the
    attempts are repeated with a growing pause. The broker comes back empty
    (memory-only): the topics are created again here at once, the projectors'
    consumers rejoin by themselves, and the relay replaces its producer when it
    next sends (see :mod:`streaming.relay`).

    Args:
        broker: The started embedded broker.
        catalogue: The topics to create again after a restart.
        first_pause: Seconds before the second attempt; doubled each time.
        max_pause: The longest pause between attempts.
        clock: Monotonic seconds (a parameter for tests).
    """

    def __init__(
        self,
        broker: EmbeddedBroker,
        catalogue: TopicCatalogue,
        first_pause: float = 0.25,
        max_pause: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.broker = broker
        self.catalogue = catalogue
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.clock = clock
        self.restarts = 0
        self._pause = first_pause
        self._next_attempt = 0.0
        self._down_since: float | None = None

    def check(self) -> None:
        from streaming.broker import BrokerError
        from streaming.topics import TopicError, ensure_topics

        now = self.clock()
        if self._down_since is None:
            if self.broker.running:
                return
            self._down_since = now
            log.warning(
                "embedded broker exited with %s; restarting it on %s",
                self.broker.exit_code,
                self.broker.bootstrap_servers,
            )
        if now < self._next_attempt:
            return
        try:
            self.broker.start()  # the same port: it was kept
            ensure_topics(self.broker.bootstrap_servers, self.catalogue)
        except (BrokerError, TopicError) as error:
            log.warning(
                "embedded broker not back yet (%s); trying again in %.2gs", error, self._pause
            )
            self._next_attempt = now + self._pause
            self._pause = min(self._pause * 2, self.max_pause)
            return
        log.warning(
            "embedded broker is back on %s after %.1fs, empty; topics %s.* created again",
            self.broker.bootstrap_servers,
            self.clock() - self._down_since,
            self.catalogue.prefix,
        )
        self.restarts += 1
        self._down_since, self._pause, self._next_attempt = None, self.first_pause, 0.0


class Supervisor:
    """Runs the children of `tadpole up`, restarting any that dies, until stopped.

    ``kept`` are further things to keep alive (the embedded broker), checked on
    every round, before the children.
    """

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str],
        nice: dict[str, int] | None = None,
        kept: Sequence[Kept] = (),
    ):
        self.commands = commands
        self.env = env
        self.nice = nice or {}
        self.kept = tuple(kept)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()

    def start(self) -> None:
        for name in self.commands:
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        increment = self.nice.get(name, 0)
        self.children[name] = subprocess.Popen(
            self.commands[name],
            env=self.env,
            preexec_fn=(lambda: os.nice(increment)) if increment else None,
        )
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def watch(self) -> None:
        while not self.stopping.wait(0.5):
            for kept in self.kept:
                kept.check()
            for name, child in list(self.children.items()):
                code = child.poll()
                if code is not None and not self.stopping.is_set():
                    log.warning("%s exited with %s; restarting it", name, code)
                    time.sleep(0.5)
                    self._spawn(name)

    def stop(self) -> None:
        self.stopping.set()
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 15
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def run_up(settings: Settings) -> int:
    """Everything in one process tree; the embedded broker when no Kafka is configured."""
    from service.bootstrap import topic_catalogue
    from streaming.broker import EmbeddedBroker

    configure_logging(settings)
    broker: EmbeddedBroker | None = None
    kept: list[Kept] = []
    if not settings.kafka_bootstrap_servers:
        print("starting the embedded Kafka-protocol broker (Tansu, memory-only)...", flush=True)
        broker = EmbeddedBroker()
        broker.start()
        # Each partition costs the embedded broker work in every fetch of every
        # consumer: with one partition per topic it used a seventh of the CPU per
        # workflow run (bench/workflows.py), and one projector per read model needs
        # no more. Kafka (compose.yaml) keeps the production counts.
        settings = settings.with_changes(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            topic_partitions=settings.topic_partitions or 1,
        )
        kept.append(BrokerKeeper(broker, topic_catalogue(settings)))
    open_store(settings).close()  # create the store's schema and tables once, up front
    me = [sys.executable, "-m", "service.cli"]
    supervisor = Supervisor(
        {
            "api": [*me, "api"],
            "relay": [*me, "relay"],
            "projector-postgres": [*me, "project", "postgres"],
            "projector-redis": [*me, "project", "redis"],
            "sagas": [*me, "sagas"],
        },
        {**os.environ, **settings.environ()},
        # Everything shares the machine's cores. A closed loop of workers makes the
        # API take all the CPU it can get, and then the relay and the projectors,
        # which must keep the read models within 100 ms, fell behind by 100-370 ms
        # now and then (niced, more often). So the API yields to them instead:
        # measured on two cores, ~15% fewer tasks/s and read-model lag p99 halved
        # (see the README's benchmark). Separate machines (compose.yaml) need none.
        nice={"api": 5},
        kept=kept,
    )
    _on_signals(supervisor.stopping.set)
    supervisor.start()
    print(
        "\nTadpole is up (Ctrl-C stops everything):\n"
        f"  API            http://{settings.host}:{settings.port}/api/v1/health\n"
        f"  worker API     http://{settings.host}:{settings.port}/internal/v1/\n"
        f"  event store    {settings.database_url} (schema {settings.store_schema})\n"
        f"  read models    PostgreSQL schema {settings.read_schema}; "
        f"Redis {settings.redis_url} (prefix {settings.redis_prefix})\n"
        f"  Kafka          {settings.kafka_bootstrap_servers}"
        f"{' (embedded, memory-only)' if broker else ''}, topics {settings.topic_prefix}.*\n",
        flush=True,
    )
    try:
        supervisor.watch()
    finally:
        print("stopping...", flush=True)
        supervisor.stop()
        if broker is not None:
            broker.stop()
        print("stopped", flush=True)
    return 0
