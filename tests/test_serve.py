"""Real processes on loopback: `kvroute serve`, and `kvroute broker` + `kvroute worker` apart.

Covers stickiness across two clients and two workers, TOKEN order and sequence numbers, busy,
cancel, kill -9 of a worker mid-stream (SESSION_LOST by heartbeat, failover cold worker_lost),
garbage frames, worker restart under serve, and a shutdown that leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from wire import WireClient

from kvroute.proto import ErrorCode, ErrorReply, Kind, SessionLost, Token
from kvroute.proto.messages import CachePath, ColdReason, FinishReason

KVROUTE = [sys.executable, "-m", "kvroute"]
HEARTBEAT = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A kvroute subprocess whose output lines we can wait for."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.seen: list[str] = []
        self._out = log.open("w")
        self.p = subprocess.Popen(
            [*KVROUTE, *args],
            stdout=subprocess.PIPE,
            stderr=self._out,
            text=True,
            start_new_session=True,
        )

    def wait_line(self, prefix: str, timeout: float = 120.0) -> str:
        """Next stdout line starting with ``prefix`` (lines before it are kept in ``seen``)."""
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.p.stdout.fileno(), False)
        buf = ""
        while time.monotonic() < deadline:
            chunk = self.p.stdout.readline()
            if chunk:
                buf = chunk
                if buf.startswith(prefix):
                    return buf.strip()
                self.seen.append(buf.strip())
                continue
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line; stderr:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._out.close()
        return self.p.returncode


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def start_serve(model: Path, tmp: Path, workers: int = 2) -> tuple[Proc, str, dict[str, int]]:
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = Proc(
        [
            "serve",
            "--workers",
            str(workers),
            "--model",
            str(model),
            "--frontend",
            url,
            "--heartbeat",
            str(HEARTBEAT),
        ],
        tmp / "serve.log",
    )
    ready = proc.wait_line("ready")
    assert f"frontend {url}" in ready and f"workers {workers}" in ready
    pids = {}
    for line in proc.seen:
        if line.startswith("worker "):
            _, wid, _, pid = line.split()
            pids[wid] = int(pid)
    assert len(pids) == workers, proc.seen
    return proc, url, pids


@pytest.fixture
def tiny_serve(tiny_model_path: Path, tmp_path: Path) -> Iterator[tuple[Proc, str, dict[str, int]]]:
    proc, url, pids = start_serve(tiny_model_path, tmp_path)
    yield proc, url, pids
    proc.stop()


def test_two_clients_two_workers_sticky_and_ordered(tiny_serve, zctx) -> None:
    _, url, pids = tiny_serve
    clients = [WireClient(zctx, url), WireClient(zctx, url)]
    owners: dict[bytes, set[str]] = {}
    for turn in range(3):
        for ci, c in enumerate(clients):
            for si in range(2):
                sid = f"c{ci}-s{si}".encode()
                res = c.turn(sid, f"t{turn}".encode(), ["hello"] * (2 * turn + 1), max_tokens=5)
                end = res.end
                assert [t.seq for t in res.tokens] == list(range(len(res.tokens)))
                assert end.seq == len(res.tokens)
                owners.setdefault(sid, set()).add(end.stats.worker)
                if turn > 0:
                    assert end.stats.path != CachePath.COLD, end.stats
    assert all(len(ws) == 1 for ws in owners.values()), owners
    assert set().union(*owners.values()) == set(pids), "placement should use both workers"


def test_busy_and_garbage(tiny_serve, zctx) -> None:
    _, url, _ = tiny_serve
    c = WireClient(zctx, url)
    c.send_turn(b"s", b"r1", ["a long one"], max_tokens=100)
    c.send_turn(b"s", b"r2", ["again"], max_tokens=5)
    kinds: dict[bytes, Kind | None] = {}
    while len(kinds) < 2:
        r = c.recv(10)
        assert r is not None
        if r.kind != Kind.TOKEN:
            kinds[r.request_id] = r.kind
    assert kinds == {b"r1": Kind.END, b"r2": Kind.BUSY}
    # Garbage from another peer gets ERROR; the honest session is unaffected.
    bad = zctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(url)
    for frames in (
        [b"garbage"],
        [b"KVR\x09\x01", b"s", b"r", b"\x80"],
        [b"KVR\x01\x01", b"s", b"r", b"\xc1not msgpack"],
    ):
        bad.send_multipart(frames)
        assert bad.poll(5000), frames
        reply = bad.recv_multipart()
        assert reply[0][4] == Kind.ERROR, reply
    assert c.turn(b"s", b"r3", ["a long one", "x", "more"], max_tokens=5).kind == Kind.END
    bad.close()


def test_worker_killed_under_serve_is_restarted(tiny_serve, zctx) -> None:
    proc, url, pids = tiny_serve
    c = WireClient(zctx, url)
    owner = c.turn(b"s", b"r1", ["hi"], max_tokens=3).end.stats.worker
    os.kill(pids[owner], signal.SIGKILL)
    # serve notices at once (process sentinel) and starts a replacement with the same id.
    want = f"worker {owner} exited; restarted"
    deadline = time.monotonic() + 60
    while want not in proc.log.read_text():
        assert time.monotonic() < deadline, proc.log.read_text()
        time.sleep(0.1)
    end = c.turn(b"s", b"r2", ["hi", "x", "again"], max_tokens=3).end
    assert (end.stats.path, end.stats.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)


def test_serve_shutdown_leaves_no_process(tiny_model_path: Path, tmp_path: Path) -> None:
    proc, _, pids = start_serve(tiny_model_path, tmp_path)
    children = psutil.Process(proc.p.pid).children(recursive=True)
    assert {p.pid for p in children} >= set(pids.values())
    assert proc.stop(signal.SIGTERM) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    log = proc.log.read_text()
    assert "starting 2 worker(s)" in log and "next: kvroute chat --connect tcp://" in log
    assert log.rstrip().endswith("stopped") and "Traceback" not in log


@pytest.mark.model
def test_ctrl_c_while_workers_load_stops_at_once(model_path: Path, tmp_path: Path) -> None:
    """The real model takes seconds to load: Ctrl-C then must not wait for it."""
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = Proc(
        ["serve", "--workers", "1", "--model", str(model_path), "--frontend", url],
        tmp_path / "s.log",
    )
    deadline = time.monotonic() + 60
    while "starting 1 worker(s)" not in proc.log.read_text():
        assert time.monotonic() < deadline and proc.p.poll() is None, proc.log.read_text()
        time.sleep(0.05)
    time.sleep(0.5)  # the worker process is up and loading
    children = psutil.Process(proc.p.pid).children(recursive=True)
    assert children
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGINT)
    proc.p.wait(10)
    took = time.monotonic() - t0
    log = proc.log.read_text()
    assert proc.stop() == 0, log
    assert took < 3, took
    assert "stopped" in log and "Traceback" not in log and "error" not in log
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


# --------------------------------------------------------------------------- real model, apart


@pytest.fixture
def apart(model_path: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, Proc]]]:
    """`kvroute broker` and two `kvroute worker` processes, no process sentinels involved."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = Proc(
        ["broker", "--frontend", front, "--backend", back, "--heartbeat", str(HEARTBEAT)],
        tmp_path / "broker.log",
    )
    workers = {
        wid: Proc(
            [
                "worker",
                "--connect",
                back,
                "--id",
                wid,
                "--model",
                str(model_path),
                "--heartbeat",
                str(HEARTBEAT),
            ],
            tmp_path / f"{wid}.log",
        )
        for wid in ("wa", "wb")
    }
    try:
        deadline = time.monotonic() + 120
        while not all(f"worker {wid} pid" in w.log.read_text() for wid, w in workers.items()):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        time.sleep(3 * HEARTBEAT)
        yield front, workers
    finally:  # also when start-up failed: never leave processes behind
        for w in workers.values():
            w.stop()
        broker.stop()


@pytest.mark.model
def test_cancel_and_kill9_mid_stream(apart, zctx) -> None:
    url, workers = apart
    c = WireClient(zctx, url)
    story = ["Write a very long story about a dragon who learns to paint."]
    # Cancel: compute stops, fewer tokens than asked for.
    c.send_turn(b"s1", b"r1", story, max_tokens=200)
    first = c.recv(30)
    assert first is not None and first.kind == Kind.TOKEN
    c.send(Kind.CANCEL, b"s1", b"r1")
    res = c.collect(b"r1")
    res.tokens.insert(0, Token.decode(first.body))
    end = res.end
    assert end.finish_reason == FinishReason.CANCELLED
    assert end.stats.generated_tokens == len(res.tokens) < 20
    # kill -9 the owner mid-stream: SESSION_LOST within 3 heartbeat intervals (no sentinel).
    c.send_turn(b"s1", b"r2", [*story, res.text, "Go on, longer."], max_tokens=200)
    first = c.recv(30)
    assert first is not None and first.kind == Kind.TOKEN
    owner = end.stats.worker
    t_kill = time.monotonic()
    workers[owner].p.send_signal(signal.SIGKILL)
    while True:
        r = c.recv(10)
        assert r is not None, "no terminal frame after kill -9"
        if r.kind != Kind.TOKEN:
            break
    elapsed = time.monotonic() - t_kill
    assert r.kind == Kind.SESSION_LOST, (r.kind, r.body)
    lost = SessionLost.decode(r.body)
    assert lost.worker == owner and lost.retryable
    assert elapsed <= 3 * HEARTBEAT + 0.5, elapsed
    # The resend is served by the other worker, cold, reason worker_lost.
    again = c.turn(b"s1", b"r3", [*story, res.text, "Go on, longer."], max_tokens=8).end
    assert again.stats.worker != owner
    assert (again.stats.path, again.stats.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)


def test_bad_model_fails_serve_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    out = subprocess.run(
        [*KVROUTE, "serve", "--model", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "error:" in out.stderr and "Traceback" not in out.stderr
    assert str(bad) in out.stderr
    assert ErrorCode and ErrorReply  # the protocol types this module relies on are importable
