"""``kvroute chat`` driven end to end with click's CliRunner (stdin is not a TTY: no readline)."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result
from service_harness import Harness, start_harness
from test_client import free_port

from kvroute.cli import chat_cmd, main
from kvroute.client import TurnResult
from kvroute.engine.engine import Engine
from kvroute.proto import CachePath, ColdReason, FinishReason, TurnEnd, TurnStats, reply_sha256

STATUS = re.compile(
    r"cached (\d+)/(\d+) tok · TTFT \d+ ms · (?:\d+ tok/s · )?worker (w\d) · (cold \(\w+\)|\w+)"
)


def chat(url: str, text: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["chat", "--connect", url, *args], input=text)


@pytest.fixture(scope="module")
def real_service(engine: Engine) -> Iterator[Harness]:
    h = start_harness(engine, 1)
    yield h
    h.close()


def test_status_line_format() -> None:
    stats = TurnStats(640, 612, 28, 24, CachePath.TEXT_PREFIX, None, 38.0, 1000.0, "w1")
    r = TurnResult(TurnEnd(24, FinishReason.STOP, reply_sha256("x"), stats), "x", 0, 41.2, 1100.0)
    assert chat_cmd.status_line(r) == (
        "cached 612/640 tok · TTFT 41 ms · 23 tok/s · worker w1 · text_prefix"
    )
    cold = TurnStats(10, 0, 10, 1, CachePath.COLD, ColdReason.RESET, 5.0, 0.0, "w0")
    r = TurnResult(TurnEnd(1, FinishReason.CANCELLED, reply_sha256("y"), cold), "y", 2, None)
    assert chat_cmd.status_line(r) == (
        "cached 0/10 tok · TTFT 5 ms · worker w0 · cold (reset) · cancelled"
        " · dropped 2 old messages"
    )


def test_repl_end_to_end(tiny_service: Harness) -> None:
    result = chat(
        tiny_service.frontend,
        "hello\n/stats\n/reset\n/help\n/nope\n/exit\n",
        "--system",
        "Be brief.",
        "--max-tokens",
        "8",
        "--timeout",
        "5",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    m = STATUS.search(out)
    assert m is not None, out
    assert m.group(1) == "0" and int(m.group(2)) > 0 and m.group(4) == "cold (new)"
    assert "session " in result.stderr and "/help" in result.stderr
    assert "prompt tokens" in out and "3 messages in history" in out  # /stats
    assert f"worker           {m.group(3)}" in out
    assert "conversation reset" in out
    assert "/reset   forget" in out  # /help
    assert "unknown command /nope" in out
    assert "error" not in result.output


def test_eof_and_empty_lines_exit_cleanly(tiny_service: Harness) -> None:
    result = chat(tiny_service.frontend, "\n\n/stats\n", "--timeout", "5")
    assert result.exit_code == 0
    assert "no turn yet" in result.stdout


def test_errors_are_one_line_and_the_repl_goes_on(tiny_engine: Engine) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    result = chat(dead, "hello\n/stats\n/exit\n", "--timeout", "0.3")
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "within 0.3 s" in errors[0] and "kept" in errors[0]
    assert "0 messages in history" in result.stdout  # /stats ran after the error

    h = start_harness(tiny_engine, 0)
    try:
        result = chat(h.frontend, "hello\n", "--timeout", "5")
        assert result.exit_code == 0
        assert "error: service unavailable (no_worker)" in result.stderr
    finally:
        h.close()


@pytest.mark.model
def test_second_reply_is_warm(real_service: Harness) -> None:
    result = chat(
        real_service.frontend, "What is 2+2?\nAnd 3+3?\n", "--max-tokens", "8", "--timeout", "30"
    )
    assert result.exit_code == 0, result.output
    lines = STATUS.findall(result.stdout)
    assert len(lines) == 2, result.stdout
    assert lines[0][3] == "cold (new)"
    assert lines[1][3] == "text_prefix" and int(lines[1][0]) > 0


@pytest.mark.model
def test_ctrl_c_cancels_the_reply_not_the_repl(
    real_service: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = chat_cmd._cancel_on_ctrl_c

    def with_a_ctrl_c(session: chat_cmd.Session) -> object:
        # Press Ctrl-C half a second into the reply (while the REPL's handler is installed).
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        return real(session)

    monkeypatch.setattr(chat_cmd, "_cancel_on_ctrl_c", with_a_ctrl_c)
    # Safety net: a SIGINT landing outside the REPL's handler must not stop the test run.
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        result = chat(
            real_service.frontend,
            "Write a long story about a dragon.\n/stats\n/exit\n",
            "--max-tokens",
            "200",
            "--timeout",
            "30",
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 0, result.output
    assert "[cancelled]" in result.stdout
    m = STATUS.search(result.stdout)
    assert m is not None and "· cancelled" in result.stdout
    assert "finish           cancelled" in result.stdout  # /stats after the cancelled reply
    assert "2 messages in history" in result.stdout  # the partial reply was kept
