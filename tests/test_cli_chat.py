"""``kvroute chat`` driven end to end with click's CliRunner (stdin is not a TTY: no readline).

Real-engine tests use the tiny model through the in-process harness; the others use fake
workers (:mod:`chat_service`) that record exactly what chat sent. The pseudo-terminal tests
(spinner, Ctrl-C timing, what a person sees) are in ``test_cli_pty.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_service import FakeService
from click.testing import CliRunner, Result
from fake_peers import wait_until
from service_harness import REAL_MODEL_HEARTBEAT, Harness, start_harness
from test_client import free_port

from kvroute.cli import chat_repl, main
from kvroute.client import SessionLost, TurnResult
from kvroute.engine.engine import Engine
from kvroute.proto import CachePath, ColdReason, FinishReason, TurnEnd, TurnStats, reply_sha256

STATUS = re.compile(
    r"cached (\d+)/(\d+) tok · TTFT \d+ ms · (?:\d+ tok/s · )?worker (\w+) · (cold \(\w+\)|\w+)"
)


def chat(url: str, text: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["chat", "--connect", url, *args], input=text)


@pytest.fixture
def fake() -> Iterator[FakeService]:
    service = FakeService()
    yield service
    service.close()


def test_status_line_format() -> None:
    stats = TurnStats(640, 612, 28, 24, CachePath.TEXT_PREFIX, None, 38.0, 1000.0, "w1")
    r = TurnResult(TurnEnd(24, FinishReason.STOP, reply_sha256("x"), stats), "x", 0, 41.2, 1100.0)
    assert chat_repl.status_line(r) == (
        "cached 612/640 tok · TTFT 41 ms · 23 tok/s · worker w1 · text_prefix"
    )
    cold = TurnStats(10, 0, 10, 1, CachePath.COLD, ColdReason.RESET, 5.0, 0.0, "w0")
    r = TurnResult(TurnEnd(1, FinishReason.CANCELLED, reply_sha256("y"), cold), "y", 2, None)
    assert chat_repl.status_line(r) == (
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
    assert "/reset            forget" in out  # /help
    assert "unknown command /nope" in out
    assert "error" not in result.output


def test_eof_and_empty_lines_exit_cleanly(tiny_service: Harness) -> None:
    result = chat(tiny_service.frontend, "\n\n/stats\n", "--timeout", "5")
    assert result.exit_code == 0
    assert "no turn yet" in result.stdout


def test_no_broker_fails_fast_in_one_line() -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    result = chat(dead, "hello\n", "--timeout", "30")
    took = time.monotonic() - t0
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: no kvroute broker answers at {dead} within 3 s (is `kvroute serve` running there?)"
    ]
    assert "kvroute chat ·" not in result.output  # no banner as if connected
    assert took < 10, took  # the ping's 3 s, not the 30 s reply timeout


def test_no_worker_is_one_line_and_the_repl_goes_on(tiny_engine: Engine) -> None:
    h = start_harness(tiny_engine, 0)
    try:
        result = chat(h.frontend, "hello\n/stats\n", "--timeout", "5")
    finally:
        h.close()
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "service unavailable (no_worker)" in errors[0]
    assert "the conversation is kept" in errors[0]
    assert "0 messages in history" in result.stdout  # /stats ran after the error


def test_ctrl_c_cancels_the_reply_not_the_repl(
    fake: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("fw0", token_delay=0.05)  # 200 tokens would take 10 s
    real = chat_repl.counting_ctrl_c

    def with_a_ctrl_c() -> object:
        # Press Ctrl-C 0.3 s into the reply, while the REPL's handler is installed.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        return real()

    monkeypatch.setattr(chat_repl, "counting_ctrl_c", with_a_ctrl_c)
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a stray SIGINT must not stop pytest
    try:
        t0 = time.monotonic()
        result = chat(fake.frontend, "a long story\n/stats\n/exit\n", "--max-tokens", "200")
        took = time.monotonic() - t0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 0, result.output
    assert "[cancelled]" in result.stdout and "· cancelled" in result.stdout
    assert "finish           cancelled" in result.stdout  # /stats after the cancelled reply
    assert "2 messages in history" in result.stdout  # the partial reply was kept
    assert took < 5, took
    assert "WARNING" not in result.output and "error" not in result.output


def test_set_changes_what_is_sent(fake: FakeService) -> None:
    fake.add("fw0")
    script = [
        "/set",
        "/set temperature 0.5",
        "/set top-p 0.9",
        "/set top_k=7",
        "/set seed 3",
        "/set max_tokens 4",
        "/set overflow raise",
        "/set top_p 2",
        "/set colour blue",
        "hi",
    ]
    result = chat(fake.frontend, "\n".join(script) + "\n")
    assert result.exit_code == 0, result.output
    assert "max_tokens 256 · temperature 0.0 · top_p 1.0 · top_k 0 · seed random" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("error: top_p: 2") and "0.0<x<=1.0" in errors[0]
    assert errors[1].startswith("error: usage: /set NAME VALUE")
    (turn,) = fake.turns()
    assert (turn.temperature, turn.top_p, turn.top_k, turn.seed, turn.max_tokens) == (
        0.5,
        0.9,
        7,
        3,
        4,
    )


def test_command_line_sampling_options_are_sent(fake: FakeService) -> None:
    fake.add("fw0")
    args = ["--temperature", "0.7", "--top-p", "0.8", "--top-k", "5", "--seed", "11"]
    result = chat(fake.frontend, "hi\n", *args, "--max-tokens", "3")
    assert result.exit_code == 0, result.output
    (turn,) = fake.turns()
    assert (turn.temperature, turn.top_p, turn.top_k, turn.seed, turn.max_tokens) == (
        0.7,
        0.8,
        5,
        11,
        3,
    )


def test_multi_line_input(fake: FakeService) -> None:
    fake.add("fw0")
    text = '"""\nfirst line\n\nthird line\n"""\none \\\ntwo\n"""inline"""\n'
    result = chat(fake.frontend, text, "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    sent = [t.messages[-1].content for t in fake.turns()]
    assert sent == ["first line\n\nthird line", "one \ntwo", "inline"]


def test_save_and_resume(fake: FakeService, tmp_path: Path) -> None:
    fake.add("fw0")
    saved = tmp_path / "chat.json"
    first = chat(
        fake.frontend, f"hello\n/set temperature 0.5\n/save {saved}\n", "--system", "Be brief."
    )
    assert first.exit_code == 0, first.output
    assert f"saved 3 messages to {saved}" in first.stdout
    doc = json.loads(saved.read_text())
    assert [m["role"] for m in doc["messages"]] == ["system", "user", "assistant"]
    assert doc["settings"]["temperature"] == 0.5

    again = chat(fake.frontend, "and then?\n", "--resume", str(saved), "--top-k", "9")
    assert again.exit_code == 0, again.output
    assert "resumed 3 messages" in again.stderr
    turn = fake.turns()[-1]
    assert [m.content for m in turn.messages] == [
        "Be brief.",
        "hello",
        doc["messages"][2]["content"],
        "and then?",
    ]
    assert turn.temperature == 0.5 and turn.top_k == 9  # saved setting kept, typed one wins


@pytest.mark.parametrize(
    ("content", "why"),
    [("not json", "not JSON"), ('{"messages": [{"role": "x"}]}', "message 0 is not")],
)
def test_resume_of_a_bad_file_is_one_line(
    fake: FakeService, tmp_path: Path, content: str, why: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = chat(fake.frontend, "", "--resume", str(bad))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and why in line


def test_save_to_a_bad_path_is_one_line_and_the_repl_goes_on(fake: FakeService) -> None:
    fake.add("fw0")
    result = chat(fake.frontend, "hi\n/save /nonexistent-dir/x.json\n/stats\n")
    assert result.exit_code == 0
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "cannot save to /nonexistent-dir/x.json" in line
    assert "2 messages in history" in result.stdout


def test_crash_mid_reply_is_said_once_and_resent(fake: FakeService) -> None:
    workers = [fake.add("fw0", token_delay=0.05), fake.add("fw1", token_delay=0.05)]

    def crash_the_owner() -> None:
        wait_until(lambda: any(w.deliveries for w in workers), timeout=10)
        time.sleep(0.3)  # a few tokens streamed
        next(w for w in workers if w.deliveries).crash.set()

    threading.Thread(target=crash_the_owner, daemon=True).start()
    result = chat(fake.frontend, "tell me\n/stats\n", "--max-tokens", "10")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if "failed mid-reply" in line]
    assert len(notes) == 1, result.stdout
    assert notes[0].endswith("answering again on another worker]")
    assert "send the message again" not in result.output
    (owner,) = [w for w in workers if w.crash.is_set()]
    m = STATUS.search(result.stdout)
    assert m is not None and m.group(3) != owner.name and m.group(4) == "cold (worker_lost)"
    assert "3 messages in history" not in result.stdout and "2 messages in history" in result.stdout
    assert len(fake.turns()) == 2


def test_service_shutting_down_is_said_and_not_resent(fake: FakeService) -> None:
    w = fake.add("fw0", token_delay=0.05)

    def stop_broker() -> None:
        wait_until(lambda: bool(w.deliveries), timeout=10)
        time.sleep(0.3)
        fake.broker.close()

    threading.Thread(target=stop_broker, daemon=True).start()
    result = chat(fake.frontend, "tell me\n", "--max-tokens", "100")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the service is shutting down; "
        "your message was not answered; the conversation is kept"
    ]
    assert len(fake.turns()) == 1


def test_orderly_worker_stop_is_not_resent() -> None:
    assert chat_repl._resend(SessionLost("w0", "exited"))
    assert chat_repl._resend(SessionLost("w0", "heartbeat_timeout"))
    assert not chat_repl._resend(SessionLost("w0", "disconnected"))
    assert not chat_repl._resend(SessionLost("w0", "exited", retryable=False))
    line = chat_repl._explain(SessionLost("w0", "disconnected"), again=False)
    assert line.startswith("worker w0 stopped mid-reply (disconnected)")
    assert "send the message again" not in line and line.endswith("the conversation is kept")


@pytest.mark.model
def test_second_reply_is_warm(engine: Engine) -> None:
    h = start_harness(engine, 1, heartbeat=REAL_MODEL_HEARTBEAT)
    try:
        result = chat(h.frontend, "What is 2+2?\nAnd 3+3?\n", "--max-tokens", "8")
    finally:
        h.close()
    assert result.exit_code == 0, result.output
    lines = STATUS.findall(result.stdout)
    assert len(lines) == 2, result.stdout
    assert lines[0][3] == "cold (new)"
    assert lines[1][3] == "text_prefix" and int(lines[1][0]) > 0
