"""How the reference worker runs one task, and what it reports for it.

A job task (seed 003) runs the worker's job command line, its ``{placeholders}``
filled from the task's payload; a workflow task (seed 002) runs the command or
the Python callable its payload names. Either way the work ends in an
:data:`Outcome`: a :class:`Complete` with the body of the complete request, or a
:class:`Fail` with the error and whether the attempt may be retried.

The pure parts (building the argv, reading a result from the output) are
separate functions so they are tested without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import math
import os
import re
import shlex
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

#: Seed 003's spot runs the optimiser jar with the sweep's parameters.
DEFAULT_JOB_COMMAND = "java -cp {jarPath} {mainClass} {alg} {iterations} {agents} {dimension}"
#: The fields of a seed 003 job task's payload (a job command may name any of them).
JOB_FIELDS = ("alg", "iterations", "agents", "dimension", "jarPath", "mainClass", "payload")
#: The API's cap on a result (``resultJson``) or a workflow task's ``output``, in bytes.
MAX_RESULT = 64 * 1024
#: How much of a command's stdout is kept (the result is read from its end).
STDOUT_KEPT = 2 * MAX_RESULT
#: How much of stdout or stderr a report quotes.
QUOTED = 4000
#: How long a stopped command gets between SIGTERM and SIGKILL (s).
KILL_GRACE = 3.0

INT64 = range(-(2**63), 2**63)


@dataclass(frozen=True)
class Complete:
    """The task is done: ``body`` goes into the complete request (with spotId and fenceToken)."""

    body: dict[str, Any]


@dataclass(frozen=True)
class Fail:
    """The attempt failed; ``retriable=False`` asks the API not to try the task again."""

    error: str
    retriable: bool = True


Outcome = Complete | Fail


class TaskError(Exception):
    """The task cannot be run as given (a bad payload, a command that cannot start...)."""

    def __init__(self, message: str, *, retriable: bool = True):
        super().__init__(message)
        self.retriable = retriable


class PermanentError(Exception):
    """Raised by a task's callable: fail the task for good, without further attempts."""


@dataclass(frozen=True)
class TaskContext:
    """What a workflow callable taking a second parameter is given besides its input."""

    #: The API's id of the task (``wf-…-reserve``), as claimed.
    id: str
    #: The task's id in its workflow definition (``reserve``).
    task_id: str
    attempt: int
    instance_id: str
    #: ``namespace``, ``name``, ``version``, ``runId`` of the run.
    workflow: dict[str, Any]
    #: The task's payload from the definition, its templates resolved.
    payload: dict[str, Any]
    #: Set when the worker gives the task up (its lease was lost, or the worker is
    #: stopping): a callable running in a thread cannot be interrupted, so it should
    #: look at this between steps and return.
    stopping: threading.Event = field(default_factory=threading.Event)


# ---- job tasks: the command line, and the result read from its output ---------------------


#: ``{name}`` is a placeholder; ``{{name}}`` a literal ``{name}``; other braces are left alone.
PLACEHOLDER = re.compile(r"\{\{([A-Za-z_]\w*)\}\}|\{([A-Za-z_]\w*)\}")


def template_fields(template: str) -> set[str]:
    """The placeholder names of a job command; ``TaskError`` if it cannot be split into words."""
    try:
        tokens = shlex.split(template)
    except ValueError as error:
        raise TaskError(f"the job command cannot be split into words: {error}") from None
    if not tokens:
        raise TaskError("the job command is empty")
    return {m[2] for token in tokens for m in PLACEHOLDER.finditer(token) if m[2]}


def job_argv(template: str, payload: Mapping[str, Any]) -> list[str]:
    """The argv of a job task: ``template`` split like a shell would, then each word's
    ``{name}`` replaced by the payload's field of that name (``{payload}``: all of it as
    JSON). A value stays one word whatever it holds: no shell ever sees it. Braces
    around anything but a name (a dict in an inline script) are left as they are."""
    names = template_fields(template)
    values = {name: word(value) for name, value in payload.items()}
    values.setdefault("payload", orjson.dumps(dict(payload)).decode())
    missing = sorted(names - set(values))
    if missing:
        raise TaskError(
            f"the job command names {', '.join('{' + m + '}' for m in missing)}, which the "
            f"task's payload lacks (it has {', '.join(sorted(payload)) or 'nothing'})"
        )

    def fill(match: re.Match[str]) -> str:
        return "{" + match[1] + "}" if match[1] else values[match[2]]

    return [PLACEHOLDER.sub(fill, token) for token in shlex.split(template)]


def word(value: Any) -> str:
    """A value as one word of a command line: text as it is, anything else as JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def job_outcome(returncode: int, stdout: bytes, stderr: bytes, runtime_ms: int) -> Outcome:
    """A finished job command's report.

    Exit code 0: if the last line on stdout is a JSON object, it is the result
    (``resultJson``) and its ``iter``, ``fopt`` and ``runtimeMs`` fill the report's
    fields; otherwise the result is ``{"stdout": <the output's tail>}`` and
    ``runtimeMs`` is what was measured. Any other exit code fails the attempt,
    retriably, with the tail of stderr.
    """
    if returncode != 0:
        return Fail(_exit_error(returncode, stderr, stdout))
    found = _json_object(_last_line(stdout))
    if found is None:
        result = orjson.dumps({"stdout": _tail(stdout)}).decode()
        return Complete({"runtimeMs": runtime_ms, "resultJson": result})
    result = orjson.dumps(found).decode()
    if len(result) > MAX_RESULT:
        return Fail(
            f"the result line is {len(result)} bytes of JSON, above the API's {MAX_RESULT}",
            retriable=False,
        )
    body: dict[str, Any] = {"runtimeMs": runtime_ms, "resultJson": result}
    for name, fits in (("iter", _is_int), ("fopt", _is_number), ("runtimeMs", _is_count)):
        if fits(found.get(name)):
            body[name] = found[name]
    return Complete(body)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in INT64


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and (not isinstance(value, int) or value in INT64)


# ---- workflow tasks: a command's or a callable's output ------------------------------------


def command_outcome(returncode: int, stdout: bytes, stderr: bytes) -> Outcome:
    """A finished workflow command's report: its stdout is its output, a JSON object
    (the whole of it, or its last line when it printed more); nothing printed is ``{}``.
    A non-zero exit fails the attempt (retried per the task's policy); an output that
    is no JSON object fails it for good, since running it again would print the same."""
    if returncode != 0:
        return Fail(_exit_error(returncode, stderr, stdout))
    text = stdout.strip()
    if not text:
        return output_outcome({})
    found = _json_object(text) if len(stdout) < STDOUT_KEPT else None
    if found is None:
        found = _json_object(_last_line(stdout))
    if found is None:
        return Fail(
            "the command's stdout is not a JSON object (nor is its last line): "
            + _tail(stdout, 500),
            retriable=False,
        )
    return output_outcome(found)


def output_outcome(value: Any) -> Outcome:
    """What a callable returned (or a command printed), as its task's output."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return Fail(f"the task returned {type(value).__name__}, not a dict", retriable=False)
    try:
        size = len(orjson.dumps(value))
    except TypeError as error:
        return Fail(f"the task's output is not JSON: {error}", retriable=False)
    if size > MAX_RESULT:
        return Fail(
            f"the task's output is {size} bytes of JSON, above the API's {MAX_RESULT}",
            retriable=False,
        )
    return Complete({"output": value})


def error_outcome(error: BaseException) -> Fail:
    """A callable's exception: the attempt failed (for good if it is a PermanentError)."""
    lines = traceback.format_exception(error)
    return Fail(
        _tail("".join(lines).encode(), QUOTED),
        retriable=not isinstance(error, PermanentError),
    )


# ---- reading output ------------------------------------------------------------------------


def _last_line(data: bytes) -> bytes:
    lines = data.rstrip().rsplit(b"\n", 1)
    return lines[-1].strip()


def _json_object(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(b"{"):
        return None
    try:
        found = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return found if isinstance(found, dict) else None


def _tail(data: bytes, chars: int = QUOTED) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= chars else "…" + text[-chars:]


def _exit_error(returncode: int, stderr: bytes, stdout: bytes) -> str:
    what = f"exit code {returncode}"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            what = f"killed by {signal.Signals(-returncode).name}"
    said = _tail(stderr) or _tail(stdout)
    return f"{what}: {said}" if said else what


# ---- running a command ---------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """A command that ran to its end: exit code, the kept ends of its output, its runtime."""

    returncode: int
    stdout: bytes
    stderr: bytes
    runtime_ms: int


async def run_command(
    argv: list[str], *, stdin: bytes | None = None, env: Mapping[str, str] | None = None
) -> Finished:
    """Run ``argv`` in its own session, keeping the last :data:`STDOUT_KEPT` bytes of
    stdout and :data:`QUOTED` of stderr. Cancelled, it stops the command (SIGTERM to
    its process group, SIGKILL after :data:`KILL_GRACE` s) before it re-raises."""
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own group: stopped with all its children
        )
    except OSError as error:
        raise TaskError(f"cannot start {argv[0]!r}: {error}") from None
    assert process.stdout is not None and process.stderr is not None
    try:
        feeding = asyncio.ensure_future(_feed(process, stdin))
        out, err = await asyncio.gather(
            _keep_tail(process.stdout, STDOUT_KEPT), _keep_tail(process.stderr, QUOTED * 4)
        )
        await feeding
        returncode = await process.wait()
    except asyncio.CancelledError:
        await _stop(process)
        raise
    runtime_ms = int((time.monotonic() - started) * 1000)
    return Finished(returncode, out, err, runtime_ms)


async def _feed(process: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is None or process.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
    process.stdin.close()


async def _keep_tail(stream: asyncio.StreamReader, limit: int) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return bytes(kept)


async def _stop(process: asyncio.subprocess.Process) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), wait)
            return
        except TimeoutError:
            continue


# ---- calling a Python callable -------------------------------------------------------------


def load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` (or ``module:Class.method``), imported."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TaskError(
            f"callable {spec!r} is not of the form 'package.module:function'", retriable=False
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # maybe installed on another node: let another try
        raise TaskError(f"cannot import {module_name!r} for callable {spec!r}: {error}") from None
    try:
        found = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise TaskError(f"module {module_name!r} has no {attribute!r}", retriable=False) from None
    if not callable(found):
        raise TaskError(f"{spec!r} is not callable", retriable=False)
    return found


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a second positional parameter (the :class:`TaskContext`)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


async def call(fn: Callable[..., Any], given: dict[str, Any], context: TaskContext) -> Any:
    """Call ``fn`` with the task's input (and its context, if it takes one).

    A coroutine function runs on the worker's event loop (and is cancelled when the
    task is given up); a plain function runs in a thread of its own, so a slow one
    holds neither the loop (heartbeats, renewals) nor the other tasks' threads.
    """
    args = (given, context) if takes_context(fn) else (given,)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await _in_thread(fn, args, context.id)
    if inspect.isawaitable(result):
        result = await result
    return result


def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> asyncio.Future[Any]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # given up already: nobody waits for it
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        failure: BaseException | None = None
        try:
            result = fn(*args)
        except Exception as error:  # handed to the awaiting task, which reports it
            failure = error
        except BaseException as error:  # SystemExit and the like must not stop the loop
            failure = RuntimeError(f"the task raised {error!r}")
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker has exited
            loop.call_soon_threadsafe(settle, result, failure)

    # A daemon thread: one the worker gave up on does not keep it from exiting.
    threading.Thread(target=target, name=f"task {name}", daemon=True).start()
    return future
