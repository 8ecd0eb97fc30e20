"""The reference worker's pure parts: a job task's argv, and the report read from output."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

import orjson
import pytest

from service.cli import build_parser
from service.execution import (
    DEFAULT_JOB_COMMAND,
    Complete,
    Fail,
    PermanentError,
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
    takes_context,
    template_fields,
)
from service.worker import Backoff, _third_of_lease

PAYLOAD = {
    "alg": "PSO",
    "iterations": 100,
    "agents": 10,
    "dimension": 2,
    "jarPath": "/opt/opt jar/opt.jar",
    "mainClass": "com.example.OptRunner",
}


def test_the_default_job_command_is_seed_003s_java_line() -> None:
    assert job_argv(DEFAULT_JOB_COMMAND, PAYLOAD) == [
        "java",
        "-cp",
        "/opt/opt jar/opt.jar",  # a value with a space stays one word
        "com.example.OptRunner",
        "PSO",
        "100",
        "10",
        "2",
    ]


def test_a_value_is_one_word_and_never_reaches_a_shell() -> None:
    argv = job_argv("run --alg={alg} {alg}", {"alg": "x; rm -rf / $(id)"})
    assert argv == ["run", "--alg=x; rm -rf / $(id)", "x; rm -rf / $(id)"]


def test_placeholders_take_json_for_non_text_values_and_the_whole_payload() -> None:
    given = {"alg": "GA", "flag": True, "ratio": 0.5, "none": None, "list": [1, 2]}
    argv = job_argv("'cmd {alg}' {flag} {ratio} {none} {list} {{alg}} {payload}", given)
    assert argv[:6] == ["cmd GA", "true", "0.5", "null", "[1,2]", "{alg}"]
    assert orjson.loads(argv[6]) == given


def test_braces_around_anything_but_a_name_are_left_alone() -> None:
    script = "import json; print(json.dumps({'fopt': 1, 'x': {'y': []}}), {0}, {})"
    assert job_argv(f"python -c {json.dumps(script)} {{alg}}", {"alg": "GA"}) == [
        "python",
        "-c",
        script,
        "GA",
    ]


def test_a_placeholder_the_payload_lacks_names_it_and_what_the_payload_has() -> None:
    with pytest.raises(TaskError) as raised:
        job_argv("java {jarPath} {seed} {zeta}", PAYLOAD)
    assert str(raised.value).startswith(
        "the job command names {seed}, {zeta}, which the task's payload lacks (it has agents, "
    )
    assert raised.value.retriable  # a worker configured otherwise may run it


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "the job command is empty"),
        ("  ", "the job command is empty"),
        ("java 'unclosed", "cannot be split into words"),
    ],
)
def test_a_job_command_that_cannot_be_a_template_is_refused(template: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        template_fields(template)


def test_template_fields_lists_the_names() -> None:
    assert template_fields(DEFAULT_JOB_COMMAND) == {
        "jarPath",
        "mainClass",
        "alg",
        "iterations",
        "agents",
        "dimension",
    }


def test_a_last_line_json_object_is_the_result_and_fills_iter_fopt_runtime() -> None:
    out = b'starting\niteration 1\n{"fopt": 0.001, "iter": 99, "runtimeMs": 1234, "x": [1]}\n\n'
    outcome = job_outcome(0, out, b"", runtime_ms=50)
    assert isinstance(outcome, Complete)
    assert outcome.body == {
        "runtimeMs": 1234,
        "iter": 99,
        "fopt": 0.001,
        "resultJson": '{"fopt":0.001,"iter":99,"runtimeMs":1234,"x":[1]}',
    }


def test_fields_of_the_wrong_type_stay_in_the_result_only() -> None:
    line = b'{"fopt": "low", "iter": 1.5, "runtimeMs": -3, "fopt2": true}'
    outcome = job_outcome(0, line, b"", runtime_ms=7)
    assert isinstance(outcome, Complete)
    assert outcome.body == {"runtimeMs": 7, "resultJson": orjson.dumps(orjson.loads(line)).decode()}
    huge = job_outcome(0, b'{"iter": 9223372036854775808, "fopt": true}', b"", runtime_ms=7)
    assert isinstance(huge, Complete) and "iter" not in huge.body and "fopt" not in huge.body


def test_output_that_is_not_a_json_object_becomes_its_tail_with_the_measured_runtime() -> None:
    for out in (b"best 0.5\n", b"[1, 2]\n", b'{"broken": \n', b""):
        outcome = job_outcome(0, out, b"", runtime_ms=42)
        assert isinstance(outcome, Complete)
        assert outcome.body["runtimeMs"] == 42
        assert orjson.loads(outcome.body["resultJson"]) == {"stdout": out.decode().strip()}
    long = job_outcome(0, b"x" * 10_000, b"", runtime_ms=1)
    assert isinstance(long, Complete)
    assert orjson.loads(long.body["resultJson"])["stdout"] == "…" + "x" * 4000


def test_a_non_zero_exit_fails_retriably_with_the_end_of_stderr() -> None:
    outcome = job_outcome(3, b"partial", b"boot\n" + b"e" * 5000 + b"\nOutOfMemoryError\n", 10)
    assert isinstance(outcome, Fail) and outcome.retriable
    assert outcome.error.startswith("exit code 3: …")
    assert outcome.error.endswith("OutOfMemoryError")
    assert len(outcome.error) < 4100
    assert job_outcome(1, b"only stdout", b"", 1) == Fail("exit code 1: only stdout")
    assert job_outcome(-9, b"", b"", 1) == Fail("killed by SIGKILL")


def test_a_result_above_the_apis_cap_fails_for_good() -> None:
    outcome = job_outcome(0, orjson.dumps({"x": "y" * 70_000}), b"", 1)
    assert isinstance(outcome, Fail) and not outcome.retriable
    assert "above the API's 65536" in outcome.error


def test_a_workflow_commands_stdout_is_its_output() -> None:
    assert command_outcome(0, b'{\n  "a": 1\n}\n', b"") == Complete({"output": {"a": 1}})
    assert command_outcome(0, b'log line\n{"a": 2}\n', b"") == Complete({"output": {"a": 2}})
    assert command_outcome(0, b"  \n", b"") == Complete({"output": {}})
    refused = command_outcome(0, b"done\n", b"")
    assert isinstance(refused, Fail) and not refused.retriable
    assert refused.error.endswith("not a JSON object (nor is its last line): done")
    failed = command_outcome(2, b"", b"boom")
    assert failed == Fail("exit code 2: boom", retriable=True)


def test_a_callables_value_is_its_output() -> None:
    assert output_outcome({"a": [1]}) == Complete({"output": {"a": [1]}})
    assert output_outcome(None) == Complete({"output": {}})
    assert output_outcome(3) == Fail("the task returned int, not a dict", retriable=False)
    odd = output_outcome({"a": object()})
    assert isinstance(odd, Fail) and "not JSON" in odd.error and not odd.retriable


def test_an_exception_fails_the_attempt_and_a_permanent_error_the_task() -> None:
    def boom() -> None:
        raise ValueError("no capacity in eu")

    try:
        boom()
    except ValueError as error:
        outcome = error_outcome(error)
    assert outcome.retriable and outcome.error.endswith("ValueError: no capacity in eu")
    assert "in boom" in outcome.error  # the traceback says where
    assert not error_outcome(PermanentError("bad region")).retriable


def test_load_callable_names_what_is_wrong() -> None:
    assert load_callable("os.path:join") is __import__("os").path.join
    assert load_callable("service.execution:TaskError.__init__") is TaskError.__init__
    for spec, message, retriable in [
        ("os.path.join", "is not of the form", False),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'", True),
        ("os.path:nothing", "has no 'nothing'", False),
        ("os:sep", "is not callable", False),
    ]:
        with pytest.raises(TaskError, match=message) as raised:
            load_callable(spec)
        assert raised.value.retriable is retriable


def _context() -> TaskContext:
    return TaskContext("wf-1-a", "a", 1, "1", {}, {})


def test_takes_context_counts_positional_parameters() -> None:
    def one(given: Any) -> None: ...
    def two(given: Any, task: Any) -> None: ...
    def many(*args: Any) -> None: ...
    def keyword(given: Any, *, task: Any = None) -> None: ...

    assert [takes_context(f) for f in (one, two, many, keyword)] == [False, True, True, False]


async def test_call_runs_plain_functions_in_a_thread_and_awaits_coroutines() -> None:
    loop_thread = threading.get_ident()

    def plain(given: dict[str, Any], task: TaskContext) -> dict[str, Any]:
        return {"thread": threading.get_ident() != loop_thread, "attempt": task.attempt, **given}

    async def coroutine(given: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"async": True}

    def exits(given: dict[str, Any]) -> None:
        sys.exit(3)

    assert await call(plain, {"x": 1}, _context()) == {"thread": True, "attempt": 1, "x": 1}
    assert await call(coroutine, {}, _context()) == {"async": True}
    with pytest.raises(RuntimeError, match="SystemExit"):
        await call(exits, {}, _context())  # not the worker's own exit


async def test_run_command_feeds_stdin_and_stops_a_cancelled_command() -> None:
    done = await run_command(
        [sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], stdin=b"abc"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"ABC\n", b"")
    with pytest.raises(TaskError, match="cannot start"):
        await run_command(["/no/such/program"])
    slow = asyncio.ensure_future(
        run_command([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    )
    await asyncio.sleep(0.3)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(slow, 10)  # stopped, not waited out


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(first=0.2, most=1.0)
    pauses = [backoff.pause() for _ in range(5)]
    assert 0.16 <= pauses[0] <= 0.24 and 0.8 <= pauses[-1] <= 1.2
    backoff.reset()
    assert backoff.pause() <= 0.24


def test_renewals_come_at_least_every_third_of_the_lease_left() -> None:
    from datetime import UTC, datetime, timedelta

    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    assert 0.9 <= _third_of_lease(soon, 10) <= 1.0
    assert _third_of_lease(None, 10) == 10
    assert _third_of_lease("not a time", 10) == 10
    assert _third_of_lease((datetime.now(UTC) - timedelta(seconds=1)).isoformat(), 10) == 10


def test_the_worker_command_line() -> None:
    args = build_parser().parse_args(
        ["worker", "--url", "http://h:1", "--concurrency", "4", "--grace", "5"]
    )
    assert (args.url, args.concurrency, args.grace, args.key) == ("http://h:1", 4, 5.0, None)
    assert args.job_command == DEFAULT_JOB_COMMAND
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--url", "u", "--concurrency", "0"])
    helptext = build_parser()._subparsers._group_actions[0].choices["worker"].format_help()  # type: ignore[union-attr]
    assert "How to write a task" in helptext and '"callable"' in helptext
