"""``kvroute chat`` in a pseudo-terminal, as a person runs it: readline, spinner, Ctrl-C.

Each test spawns ``python -m kvroute chat`` with pexpect and reads what the terminal shows.
The services run in this process (:mod:`chat_service`); every expect is bounded.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_service import FakeService, MuteBroker
from test_client import free_port

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
START_S = 60  # interpreter start and imports on a loaded machine


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "COLUMNS": "100", "LINES": "30", "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "kvroute", "chat", *args],
        env=env,
        encoding="utf-8",
        dimensions=(30, 100),
        timeout=START_S,
    )
    return child


@pytest.fixture
def children() -> Iterator[list[pexpect.spawn]]:
    started: list[pexpect.spawn] = []
    yield started
    for c in started:
        c.close(force=True)


@pytest.fixture
def fake() -> Iterator[FakeService]:
    service = FakeService()
    yield service
    service.close()


def test_no_server_says_so_at_once(children: list[pexpect.spawn]) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    child = spawn("--connect", url)
    children.append(child)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert f"error: no kvroute broker answers at {url} within 3 s" in out
    assert "kvroute chat ·" not in out and "Traceback" not in out and PROMPT not in out
    assert child.exitstatus == 1


@pytest.mark.parametrize(
    ("url", "why"),
    [("localhost", "no port"), ("localhost:99999", "port '99999' is not a number 1..65535")],
)
def test_bad_url_is_one_line(children: list[pexpect.spawn], url: str, why: str) -> None:
    child = spawn("--connect", url)
    children.append(child)
    child.expect(pexpect.EOF)
    child.close()
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert len(lines) == 1, child.before
    assert lines[0].startswith(f"error: Invalid value for '--connect': bad address '{url}': {why}")
    assert child.exitstatus == 2


def test_ctrl_c_while_nobody_answers_returns_at_once(children: list[pexpect.spawn]) -> None:
    mute = MuteBroker()
    try:
        child = spawn("--connect", mute.frontend)
        children.append(child)
        child.expect_exact(PROMPT)
        child.sendline("hello?")
        child.expect_exact("thinking", timeout=10)  # the spinner while waiting for a token
        t0 = time.monotonic()
        child.sendintr()
        child.expect_exact("[cancelled]", timeout=5)
        child.expect_exact(PROMPT, timeout=5)
        took = time.monotonic() - t0
        seen = child.before
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=10)
        child.close()
    finally:
        mute.close()
    assert took < 1.5, f"Ctrl-C took {took:.2f} s to give the prompt back"
    assert "WARNING" not in seen and "Traceback" not in seen and "error" not in seen
    assert child.exitstatus == 0


def test_ctrl_c_cancels_a_streaming_reply(fake: FakeService, children: list[pexpect.spawn]) -> None:
    fake.add("fw0", token_delay=0.05)
    child = spawn("--connect", fake.frontend, "--max-tokens", "300")
    children.append(child)
    child.expect_exact(PROMPT)
    child.sendline("a long story")
    child.expect_exact("t3 ", timeout=10)
    t0 = time.monotonic()
    child.sendintr()
    child.expect_exact("[cancelled]", timeout=5)
    child.expect(r"worker fw0 · cold \(new\) · cancelled", timeout=5)
    child.expect_exact(PROMPT, timeout=5)
    took = time.monotonic() - t0
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=10)
    assert took < 1.5, took


def test_save_and_resume(fake: FakeService, children: list[pexpect.spawn], tmp_path: Path) -> None:
    fake.add("fw0")
    saved = tmp_path / "talk.json"
    child = spawn("--connect", fake.frontend, "--max-tokens", "3", "--system", "Be brief.")
    children.append(child)
    child.expect_exact(PROMPT)
    child.sendline("hello")
    child.expect(r"worker fw0 · cold \(new\)")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {saved}")
    child.expect_exact(f"saved 3 messages to {saved}")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF, timeout=10)
    child.close()
    assert child.exitstatus == 0
    reply = json.loads(saved.read_text())["messages"][2]["content"]
    assert reply == "t0 t1 t2 "

    child = spawn("--connect", fake.frontend, "--resume", str(saved))
    children.append(child)
    child.expect_exact("resumed 3 messages")
    child.expect_exact(PROMPT)
    child.sendline("and then?")
    child.expect(r"worker fw0 · cold \(new\)")  # a new session, carrying the saved history
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=10)
    last = fake.turns()[-1]
    assert [m.content for m in last.messages] == ["Be brief.", "hello", reply, "and then?"]


def test_multi_line_block_in_a_terminal(fake: FakeService, children: list[pexpect.spawn]) -> None:
    fake.add("fw0")
    child = spawn("--connect", fake.frontend, "--max-tokens", "2")
    children.append(child)
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("one")
    child.expect_exact("... ")
    child.sendline('two"""')
    child.expect(r"worker fw0")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=10)
    assert fake.turns()[0].messages[-1].content == "one\ntwo"


def test_failover_erases_the_partial_reply(
    fake: FakeService, children: list[pexpect.spawn]
) -> None:
    workers = [fake.add("fw0", token_delay=0.03), fake.add("fw1", token_delay=0.03)]
    child = spawn("--connect", fake.frontend, "--max-tokens", "60")
    children.append(child)
    child.expect_exact(PROMPT)
    child.sendline("go")
    child.expect_exact("t10 ", timeout=10)
    next(w for w in workers if w.deliveries).crash.set()
    child.expect_exact("answering again on another worker]", timeout=10)
    erased = child.before
    child.expect(r"worker fw\d · cold \(worker_lost\)", timeout=10)
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=10)
    # The cursor went back over the partial reply and cleared it before the notice.
    assert re.search(r"\r(\x1b\[\d+A)?\x1b\[J(\x1b\[2m)?\[worker fw", erased), repr(erased[-80:])
    assert "send the message again" not in erased
