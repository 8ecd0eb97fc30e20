"""``tadpole worker``: the reference worker a user starts on each worker node.

It speaks the worker API (seed 003's ``/internal/v1``, with seed 002's renewals
and long polls): says hello, heartbeats, long-polls claims for as many tasks as it
has free slots, runs each (``service.execution``), renews a workflow task's lease
while it runs and stops its work once the lease is lost, and reports complete or
fail. On SIGTERM it stops claiming, gives running tasks ``grace`` seconds, then
stops the rest and gives them back (fail with ``retriable``), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import orjson

from service.execution import (
    DEFAULT_JOB_COMMAND,
    Complete,
    Fail,
    Outcome,
    TaskContext,
    TaskError,
    call,
    command_outcome,
    error_outcome,
    job_argv,
    job_outcome,
    load_callable,
    output_outcome,
    run_command,
    word,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("tadpole.worker")

#: ``tadpole worker --help``: how to run it, and how to write a task for it.
HELP = """\
Run tasks for a Tadpole API, as many at once as --concurrency: the worker says
hello, heartbeats, long-polls for tasks, runs each one, renews a workflow task's
lease while it runs and reports complete (its result) or fail (its error).

How to write a task
-------------------
A job task (a seed 003 sweep: {"alg", "iterations", "agents", "dimension",
"jarPath", "mainClass"}) runs --job-command, each {name} in it replaced by the
payload's field of that name ({payload}: the whole payload as JSON; {{name}}: a
literal {name}; other braces are left alone). The line is split into words as a
shell would, but no shell runs it, and a value is always one word. Exit code 0 completes the task: if the last line the command prints is
a JSON object, that object is the result (resultJson), and its "iter", "fopt"
and "runtimeMs" fill the report; otherwise the result is {"stdout": "<its last
4000 characters>"} and runtimeMs is measured. Another exit code fails the attempt
(retried) with the end of stderr. Example, without java:
  --job-command 'python3 opt.py --alg {alg} --iterations {iterations}'
  (opt.py ends with print(json.dumps({"fopt": best, "iter": n})))

A workflow task runs what its payload in the workflow definition names:
  "payload": {"command": ["python3", "deploy.py", "${input.region}"]}
      The command gets the task's input on stdin as JSON,
        {"input": <the run's input>, "tasks": {"<dependency>": <its output>}}
      (a compensation gets its own task's output under "tasks"), and the
      environment TADPOLE_TASK_ID, TADPOLE_WORKFLOW_TASK, TADPOLE_ATTEMPT and
      TADPOLE_INSTANCE_ID. An argument that is not a string (a template that
      resolved to a number) is passed as its JSON text. What it prints on stdout, a JSON object (or, when it
      prints more, its last line), is the task's output; nothing is {}. A non-zero
      exit fails the attempt (retried per the task's "retry"); output that is not
      a JSON object fails the task for good.
  "payload": {"callable": "mypackage.steps:deploy"}
      The function is imported (from the directory the worker was started in, or
      --path) and called with that input dict; it returns a dict, the output. It
      may be "async def". Raising fails the attempt (retried);
      service.execution.PermanentError fails the task for good. A function with a
      second parameter also gets a TaskContext: .task_id, .attempt, .payload,
      .workflow, .instance_id and .stopping, a threading.Event set when the worker
      gives the task up.
        def deploy(given, task):
            region = given["input"]["region"]
            server = given["tasks"]["provision"]["server"]
            return {"deployed": server, "attempt": task.attempt}

While a workflow task runs, its lease is renewed: first within a second (the
answer tells the worker how long the API's lease is), then every third of that
lease, or every --renew-every seconds if that is sooner. If the API says the lease is lost (the run was cancelled or the lease expired),
the worker stops that task's work and reports nothing: a command is stopped
(SIGTERM to its process group, SIGKILL 3 s later), an async function is
cancelled, a plain function (it runs in a thread) sees task.stopping set.

SIGTERM or Ctrl-C: the worker claims nothing more, gives running tasks --grace
seconds to finish, then stops the rest and gives them back (fail with
retriable=true, so another worker takes them), and exits 0. A second signal
gives them back at once.
"""

_UNAUTHORISED = "the API answered 401: it wants the agent key (--key or TADPOLE_AGENT_KEY)"

#: The first renewal of a lease comes within this many seconds (it tells the lease's length).
FIRST_RENEWAL = 1.0
#: How long a task given back at shutdown is reported while the API is unreachable (s).
GIVE_BACK_PATIENCE = 10.0

#: The longest long poll the API allows (``Claims.MAX_WAIT_MS``).
MAX_WAIT_MS = 30_000


@dataclass(frozen=True)
class WorkerConfig:
    url: str
    key: str = ""
    concurrency: int = 1
    job_command: str = DEFAULT_JOB_COMMAND
    #: Seconds between renewals of a workflow task's lease (a third of the lease).
    renew_every: float = 10.0
    #: Seconds running tasks get to finish after SIGTERM before they are given back.
    grace: float = 30.0
    heartbeat_every: float = 3.0
    wait_ms: int = MAX_WAIT_MS
    #: The address the hello and heartbeats report; None: the one that reaches ``url``.
    ip_address: str | None = None
    #: How long a complete or fail is retried while the API is unreachable or 503 (s).
    report_patience: float = 60.0


class FatalError(Exception):
    """The API refuses this worker for good (a wrong key): retrying cannot help."""


class Backoff:
    """A growing pause, 0.2 s doubling to 5 s with ±20% jitter; reset on success."""

    def __init__(self, first: float = 0.2, most: float = 5.0):
        self.first, self.most, self.next = first, most, first

    def pause(self) -> float:
        pause, self.next = self.next, min(self.next * 2, self.most)
        return pause * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.next = self.first


@dataclass(eq=False)
class Held:
    """A task this worker holds: claimed under ``spot`` with ``fence``, being run."""

    id: str
    fence: int | None
    spot: str
    payload: dict[str, Any]
    context: TaskContext | None = None
    work: asyncio.Future[Outcome] | None = None
    #: The API said the lease is gone: stop, report nothing.
    lost: bool = False
    #: The worker is stopping and gives the task back.
    given_back: bool = False
    runner: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def is_workflow(self) -> bool:
        return self.payload.get("kind") == "workflow"


class Worker:
    def __init__(self, config: WorkerConfig, client: httpx.AsyncClient, *, signals: bool = True):
        self.config = config
        self.signals = signals
        self.client = client
        self.ip = config.ip_address or local_address(config.url)
        self.spot = ""
        self.held: dict[str, Held] = {}
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.slot_freed = asyncio.Event()
        self._registering = asyncio.Lock()
        self.refused = False
        #: True while a claim is out: a report then asks for no next task (the claim
        #: was sized for the free slots already).
        self.polling = False

    # ---- the life of a worker ------------------------------------------------------------

    async def run(self) -> int:
        """Work until stopped; 0 after a stop, 2 when the API refuses the worker's key."""
        if self.signals:
            self._handle_signals()
        beating: asyncio.Task[None] | None = None
        try:
            if await self._hello():
                beating = asyncio.ensure_future(self._heartbeats())
                await self._claims()
        except FatalError as error:
            self._fatal(error)
        await self._drain()  # heartbeats go on meanwhile: the spot stays UP
        if beating is not None:
            beating.cancel()
        log.info("stopped")
        return 2 if self.refused else 0

    def _fatal(self, error: FatalError) -> None:
        log.error("%s", error)
        self.refused = True
        self.stopping.set()
        self.hurry.set()

    def stop(self) -> None:
        """First call: claim nothing more and drain. Second: give back at once."""
        if self.stopping.is_set():
            log.info("stopping now: giving back what is still running")
            self.hurry.set()
            return
        log.info(
            "stopping: no more claims; %d running task(s) get %gs to finish",
            len(self.held),
            self.config.grace,
        )
        self.stopping.set()

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    async def _drain(self) -> None:
        """Let running tasks finish within the grace; stop and give back the rest."""
        runners = [h.runner for h in self.held.values() if h.runner is not None]
        if runners:
            finished = asyncio.ensure_future(asyncio.wait(runners))
            hurry = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait(
                [finished, hurry], timeout=self.config.grace, return_when=asyncio.FIRST_COMPLETED
            )
            finished.cancel()  # the wait, not the tasks it waited for
            hurry.cancel()
        left = [h for h in self.held.values() if h.runner is not None]
        if not left:
            return
        log.info("giving back %d task(s) still running", len(left))
        for held in left:
            self._give_up(held, lost=False)
        await asyncio.wait([h.runner for h in left if h.runner is not None])

    def _give_up(self, held: Held, *, lost: bool) -> None:
        """Stop ``held``'s work: its lease is ``lost`` (report nothing), or it is given back."""
        held.lost = held.lost or lost
        held.given_back = not held.lost
        if held.context is not None:
            held.context.stopping.set()
        if held.work is not None:
            held.work.cancel()

    # ---- registration and heartbeats ----------------------------------------------------

    async def _hello(self) -> bool:
        """Register (again); False if stopped before the API answered."""
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                status, body = await self._post("/internal/v1/hello", {"ipAddress": self.ip})
            except _transport_errors() as error:
                log.warning(
                    "hello: %s cannot be reached (%s); trying again", self.config.url, error
                )
            else:
                if status == 401:
                    raise FatalError(_UNAUTHORISED)
                if status == 200:
                    self.spot = str(body["spotId"])
                    log.info(
                        "registered as %s at %s (%d slots)",
                        self.spot,
                        self.config.url,
                        self.config.concurrency,
                    )
                    return True
                self._refused("hello", status, body)
            await self._pause(backoff.pause())
        return False

    async def _register_again(self, stale: str) -> None:
        """The API no longer knows spot ``stale``: say hello again (once, however many ask)."""
        async with self._registering:
            if self.spot == stale and not self.stopping.is_set():
                log.warning("the API does not know spot %s: registering again", stale)
                await self._hello()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_every)
            try:
                await self._beat()
            except FatalError as error:  # registering again was refused
                self._fatal(error)
                return

    async def _beat(self) -> None:
        spot = self.spot
        cores = os.cpu_count() or 1
        body = {
            "spotId": spot,
            "ipAddress": self.ip,
            "cpuLoad": round(min(100.0, os.getloadavg()[0] / cores * 100), 1),
            "runningTasks": len(self.held),
            "totalCores": cores,
        }
        try:
            status, answer = await self._post("/internal/v1/heartbeat", body)
        except _transport_errors() as error:
            log.warning("heartbeat: %s cannot be reached (%s)", self.config.url, error)
            return
        if status == 404:
            await self._register_again(spot)
        elif status != 200:
            log.warning("heartbeat answered %d: %s", status, answer.get("error", answer))

    # ---- claims --------------------------------------------------------------------------

    async def _claims(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            free = self.config.concurrency - len(self.held)
            if free <= 0:
                self.slot_freed.clear()
                await self._until(self.slot_freed)
                continue
            spot = self.spot
            body = {"spotId": spot, "maxTasks": min(free, 100), "waitMs": self.config.wait_ms}
            try:
                self.polling = True
                answered = await self._until_stopped(
                    self._post(
                        "/internal/v1/tasks/claim", body, timeout=self.config.wait_ms / 1000 + 10
                    )
                )
            except _transport_errors() as error:
                log.warning("claim: %s cannot be reached (%s)", self.config.url, error)
                await self._pause(backoff.pause())
                continue
            finally:
                self.polling = False
            if answered is None:  # stopped while the long poll waited
                return
            status, answer = answered
            if status == 401:
                raise FatalError(_UNAUTHORISED)
            if status == 200:
                backoff.reset()
                for task in answer.get("tasks", []):
                    self._start(spot, task)
            elif status == 404:
                await self._register_again(spot)
            elif status == 409:  # the spot was marked DOWN: a heartbeat brings it back
                log.warning("claim answered 409 (%s): sending a heartbeat", answer.get("error"))
                await self._beat()
            else:
                self._refused("claim", status, answer)
                await self._pause(backoff.pause())

    def _start(self, spot: str, task: dict[str, Any]) -> None:
        task_id, fence = str(task["id"]), task.get("fenceToken")
        try:
            payload = orjson.loads(task.get("payload") or "{}")
        except orjson.JSONDecodeError:
            payload = None
        held = Held(task_id, fence, spot, payload if isinstance(payload, dict) else {})
        stale = self.held.get(task_id)
        if stale is not None:  # its lease ran out and came back to us: the old run is void
            log.warning("%s came back with fence %s: stopping its older run", task_id, fence)
            self._give_up(stale, lost=True)
        self.held[task_id] = held
        held.runner = asyncio.ensure_future(self._hold(held, payload_ok=isinstance(payload, dict)))
        held.runner.add_done_callback(lambda _: self._release(held))

    def _release(self, held: Held) -> None:
        if self.held.get(held.id) is held:
            del self.held[held.id]
        self.slot_freed.set()
        runner = held.runner
        if runner is not None and not runner.cancelled() and runner.exception() is not None:
            log.error("task %s ended abnormally", held.id, exc_info=runner.exception())

    # ---- one task ------------------------------------------------------------------------

    async def _hold(self, held: Held, *, payload_ok: bool) -> None:
        """Run a held task to its report (or to its end, if its lease was lost)."""
        log.info("running %s (fence %s)", held.id, held.fence)
        if not payload_ok:
            await self._report(held, Fail("the task's payload is not a JSON object", False))
            return
        held.work = asyncio.ensure_future(self._execute(held))
        renewing = asyncio.ensure_future(self._renew(held)) if held.is_workflow else None
        try:
            outcome = await held.work
        except asyncio.CancelledError:
            if held.lost:
                log.warning("stopped %s: its lease is lost", held.id)
                return
            outcome = Fail(
                "the worker was stopped before the task finished; given back", retriable=True
            )
        finally:
            if renewing is not None:
                renewing.cancel()
        await self._report(held, outcome)

    async def _execute(self, held: Held) -> Outcome:
        try:
            if held.is_workflow:
                return await self._workflow_task(held)
            if "kind" in held.payload:
                raise TaskError(
                    f"this worker does not know tasks of kind {held.payload['kind']!r}",
                    retriable=False,
                )
            return await self._job_task(held)
        except TaskError as error:
            return Fail(str(error), error.retriable)
        except Exception as error:  # the worker's own trouble with this task: let another try
            log.exception("running %s", held.id)
            return Fail(f"the worker could not run the task: {error!r}", retriable=True)

    async def _job_task(self, held: Held) -> Outcome:
        argv = job_argv(self.config.job_command, held.payload)
        env = _environment(TADPOLE_TASK_ID=held.id, TADPOLE_PAYLOAD=orjson.dumps(held.payload))
        done = await run_command(argv, env=env)
        return job_outcome(done.returncode, done.stdout, done.stderr, done.runtime_ms)

    async def _workflow_task(self, held: Held) -> Outcome:
        spec = held.payload.get("payload")
        given = held.payload.get("input")
        if not isinstance(spec, dict) or not isinstance(given, dict):
            raise TaskError("the workflow task has no payload or input object", retriable=False)
        context = TaskContext(
            id=held.id,
            task_id=str(held.payload.get("taskId", "")),
            attempt=int(held.payload.get("attempt") or 0),
            instance_id=str(held.payload.get("instanceId", "")),
            workflow=dict(held.payload.get("workflow") or {}),
            payload=spec,
        )
        held.context = context
        if "command" in spec:
            return await self._workflow_command(spec["command"], given, context)
        if "callable" in spec:
            fn = load_callable(str(spec["callable"]))
            try:
                value = await call(fn, given, context)
            except (Exception, SystemExit) as error:  # the task's own failure: reported
                return error_outcome(error)
            return output_outcome(value)
        raise TaskError(
            "the workflow task's payload names neither 'command' (an argv list) nor "
            f"'callable' ('package.module:function'): it has {', '.join(sorted(spec)) or 'nothing'}",
            retriable=False,
        )

    async def _workflow_command(
        self, argv: Any, given: dict[str, Any], context: TaskContext
    ) -> Outcome:
        if not (isinstance(argv, list) and argv and isinstance(argv[0], str)):
            raise TaskError(
                "a workflow task's 'command' must be a list: the program, then its arguments",
                retriable=False,
            )
        env = _environment(
            TADPOLE_TASK_ID=context.id,
            TADPOLE_WORKFLOW_TASK=context.task_id,
            TADPOLE_ATTEMPT=str(context.attempt),
            TADPOLE_INSTANCE_ID=context.instance_id,
        )
        words = [word(a) for a in argv]  # a template may resolve to a number
        done = await run_command(words, stdin=orjson.dumps(given), env=env)
        return command_outcome(done.returncode, done.stdout, done.stderr)

    async def _renew(self, held: Held) -> None:
        """Extend the lease every ``renew_every`` s; once the API says it is lost, stop the work.

        The lease's length is the API's (TADPOLE_LEASE_SECONDS), which the worker's
        own setting may not match: the first renewal comes within :data:`FIRST_RENEWAL`
        s (a task that ends sooner is never renewed), and its answer says when the lease
        now ends; from then on the worker renews at least every third of that.
        """
        every = self.config.renew_every
        path = f"/internal/v1/tasks/{quote(held.id, safe='~')}/renew"
        pause = min(every, FIRST_RENEWAL)
        while True:
            await asyncio.sleep(pause)
            pause = every
            body = {"spotId": held.spot, "fenceToken": held.fence}
            try:
                status, answer = await self._post(path, body)
            except _transport_errors() as error:
                log.warning("renew of %s: the API cannot be reached (%s)", held.id, error)
                continue
            if status == 200:
                every = pause = min(every, _third_of_lease(answer.get("leaseExpiresAt"), every))
            elif status in (404, 409):
                log.warning("renew of %s answered %d: %s", held.id, status, answer.get("error"))
                self._give_up(held, lost=True)
                return
            else:
                log.warning("renew of %s answered %d: %s", held.id, status, answer.get("error"))

    async def _report(self, held: Held, outcome: Outcome) -> None:
        """Complete or fail ``held``, retrying while the API is unreachable or busy (503)."""
        verb = "complete" if isinstance(outcome, Complete) else "fail"
        body: dict[str, Any] = {"spotId": held.spot, "fenceToken": held.fence}
        if isinstance(outcome, Complete):
            body.update(outcome.body)
        else:
            body.update(error=outcome.error[:8000], retriable=outcome.retriable)
        path = f"/internal/v1/tasks/{quote(held.id, safe='~')}/{verb}"
        # Every slot busy and no claim out: the report also claims the task for the slot
        # it frees, in the same batch (the next step of a chain, often).
        if not (self.polling or self.stopping.is_set() or held.given_back):
            body["claimNext"] = 1
        backoff = Backoff()
        patience = GIVE_BACK_PATIENCE if held.given_back else self.config.report_patience
        deadline = asyncio.get_running_loop().time() + patience
        while True:
            try:
                status, answer = await self._post(path, body)
            except _transport_errors() as error:
                status, answer = 0, {"error": f"the API cannot be reached ({error})"}
            for task in answer.get("tasks", []):  # claimed with the report: ours now
                self._start(held.spot, task)
            if status == 200:
                if isinstance(outcome, Fail):
                    log.warning(
                        "failed %s (%s): %s",
                        held.id,
                        "will retry" if answer.get("willRetry") else "no retry",
                        outcome.error.splitlines()[-1] if outcome.error else "",
                    )
                else:
                    log.info("completed %s", held.id)
                return
            if status not in (0, 502, 503, 504) or asyncio.get_running_loop().time() > deadline:
                log.warning("%s of %s answered %s: %s", verb, held.id, status, answer.get("error"))
                return
            await asyncio.sleep(backoff.pause())

    # ---- HTTP and waiting ----------------------------------------------------------------

    async def _post(
        self, path: str, body: dict[str, Any], timeout: float = 10.0
    ) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(path, content=orjson.dumps(body), timeout=timeout)
        try:
            answer = orjson.loads(resp.content) if resp.content else {}
        except orjson.JSONDecodeError:
            answer = {"error": resp.text[:200]}
        return resp.status_code, answer if isinstance(answer, dict) else {}

    def _refused(self, what: str, status: int, answer: dict[str, Any]) -> None:
        log.warning("%s answered %d: %s", what, status, answer.get("error", answer))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but no longer than until the worker is stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or the stop, whichever comes first."""
        await self._until_stopped(event.wait())

    async def _until_stopped(self, awaitable: Any) -> Any:
        """``awaitable``'s result, or None once the worker is stopped (it is cancelled then)."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return None
        return work.result()


def _third_of_lease(expires_at: Any, fallback: float) -> float:
    """A third of the lease left after a renewal (at least 0.5 s); ``fallback`` if unknown."""
    if not isinstance(expires_at, str):
        return fallback
    try:
        left = (datetime.fromisoformat(expires_at) - datetime.now(UTC)).total_seconds()
    except (ValueError, TypeError):
        return fallback
    return max(left / 3, 0.5) if left > 0 else fallback


def _environment(**extra: str | bytes) -> dict[str, str]:
    """The worker's own environment, plus what tells a command which task it runs."""
    env = dict(os.environ)
    env.update({k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()})
    return env


def _transport_errors() -> tuple[type[Exception], ...]:
    import httpx

    return (httpx.TransportError,)


def local_address(url: str) -> str:
    """The address this machine uses to reach ``url`` (no packet is sent)."""
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname or "127.0.0.1", parts.port or 80)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def make_client(
    config: WorkerConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The worker's HTTP client: keep-alive connections to ``config.url``, with the key."""
    import httpx

    headers = {"Content-Type": "application/json"}
    if config.key:
        headers["X-Orhestra-Key"] = config.key
    connections = config.concurrency * 2 + 4  # a claim, a heartbeat, a renewal and a report each
    return httpx.AsyncClient(
        base_url=config.url.rstrip("/"),
        headers=headers,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        transport=transport,
    )


async def serve(config: WorkerConfig) -> int:
    async with make_client(config) as client:
        return await Worker(config, client).run()


def run_worker(
    config: WorkerConfig, log_level: str = "INFO", paths: list[str] | None = None
) -> int:
    """``tadpole worker``: configure logging and the import path, then work until stopped."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Callables are imported as the user names them, from where the worker was started.
    for path in reversed([os.getcwd(), *(paths or [])]):
        if path not in sys.path:
            sys.path.insert(0, path)
    return asyncio.run(serve(config))
