"""CURVE end to end: keys, an authenticating broker, clients and workers in and out.

The broker runs in a thread with tiny-model workers (the harness of service_harness.py), or as
``kvroute serve`` in a process. A refused peer gets no answer at all, so every negative test
waits with a bounded timeout (the client's Timeout) and checks the cause where it can be seen:
the broker's ZAP refusal counter, or the handshake failure a socket monitor reports.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from fake_peers import wait_until
from service_harness import HEARTBEAT, Harness
from test_serve import Proc, free_port
from zmq.utils.monitor import recv_monitor_message

from kvroute import AsyncClient, Client, NotOwner, Timeout
from kvroute.broker import Broker, BrokerConfig
from kvroute.cli import main
from kvroute.cli.keys_cmd import write_layout
from kvroute.engine.engine import Engine
from kvroute.proto import (
    ErrorCode,
    ErrorReply,
    Kind,
    Ready,
    control_frames,
    parse_reply,
    request_frames,
)
from kvroute.proto.identity import CurveClient, KeyFileError, load_allowed_keys

TIMEOUT = 5.0  # an allowed client's timeout: never reached when things work
REFUSED = 0.5  # a refused client's timeout: it is expected to expire


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """server; clients/: client, other (a second client); workers/: worker; strangers/."""
    root = tmp_path_factory.mktemp("keys")
    layout = (("", ("server",)), ("clients", ("client", "other")), ("workers", ("worker",)))
    write_layout(root, (*layout, ("strangers", ("stranger",))), force=False)
    paths = {n: root / sub / n for sub, names in layout for n in names}
    paths["stranger"] = root / "strangers" / "stranger"
    paths["clients"], paths["workers"] = root / "clients", root / "workers"
    return paths


def secret(keys: dict[str, Path], name: str) -> str:
    return f"{keys[name]}.key_secret"


def public(keys: dict[str, Path], name: str) -> str:
    return f"{keys[name]}.key"


@pytest.fixture
def curve_service(tiny_engine: Engine, keys: dict[str, Path]) -> Iterator[Harness]:
    """A CURVE broker (thread) and one tiny worker w0 authenticated with worker.key."""
    cfg = BrokerConfig(
        frontend="tcp://127.0.0.1:0",
        backend="tcp://127.0.0.1:0",
        heartbeat_interval=HEARTBEAT,
        curve_secret=secret(keys, "server"),
        allow_keys=str(keys["clients"]),
        allow_worker_keys=str(keys["workers"]),
    )
    broker = Broker(cfg)
    t = threading.Thread(target=broker.run, name="broker", daemon=True)
    t.start()
    frontend, backend = broker.wait_bound(10)
    h = Harness(broker, frontend, backend, threads=[t])
    try:
        h.add_worker(
            tiny_engine, "w0", server_key=public(keys, "server"), key=secret(keys, "worker")
        )
        yield h
    finally:
        h.close()


def connect(h: Harness, keys: dict[str, Path], who: str | None, timeout: float) -> Client:
    if who is None:
        return Client(h.frontend, timeout=timeout)
    return Client(h.frontend, timeout, server_key=public(keys, "server"), key=secret(keys, who))


def handshake_failure(sock: zmq.Socket[bytes]) -> int:
    """The first handshake-failure event of a socket being connected (bounded wait)."""
    mon = sock.get_monitor_socket()
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:  # (other events, e.g. reconnect attempts, come and go meanwhile)
            left = deadline - time.monotonic()
            assert left > 0 and mon.poll(left * 1000), "no handshake failure reported"
            event = recv_monitor_message(mon)["event"]
            if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                return int(event)
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


# --- the service ------------------------------------------------------------------------------


def test_allowed_client_end_to_end(curve_service: Harness, keys: dict[str, Path]) -> None:
    with connect(curve_service, keys, "client", TIMEOUT) as client:
        assert client.ping() >= 0
        chat = client.session()
        reply = "".join(chat.send("hello", max_tokens=6))
        assert chat.last is not None and chat.last.reply == reply and chat.last.worker == "w0"
        list(chat.send("again", max_tokens=4))
        assert chat.last.path == "text_prefix"  # sticky and warm, as without CURVE
    # The server key as z85 text and the client key as a pair work the same way.
    assert curve_service.broker.curve is not None
    server_z85 = curve_service.broker.curve.public.decode()
    pair = CurveClient.load(server_z85, secret(keys, "other"))
    assert pair is not None
    with Client(
        curve_service.frontend, TIMEOUT, server_key=server_z85, key=(pair.public, pair.secret)
    ) as client:
        assert client.ping() >= 0


def test_the_key_owns_sessions_and_owner_frames_are_refused(
    curve_service: Harness, keys: dict[str, Path]
) -> None:
    """Under CURVE the key is the principal: two connections holding it share sessions and
    transcripts, and a token in an owner frame (a bearer secret anyone could send) is refused."""
    digest = bytes(16)
    with (
        connect(curve_service, keys, "client", TIMEOUT) as one,
        connect(curve_service, keys, "client", TIMEOUT) as two,
        connect(curve_service, keys, "other", TIMEOUT) as other,
    ):
        chat = one.session()
        chat.ask("hello", max_tokens=2)
        one.index(chat.id, digest)
        assert two.lookup(digest) == chat.id and other.lookup(digest) is None
        with pytest.raises(NotOwner):
            other.index(chat.id, digest)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        curve = CurveClient.load(public(keys, "server"), secret(keys, "client"))
        assert curve is not None
        curve.apply(sock)
        sock.connect(curve_service.frontend)
        sock.send_multipart(request_frames(Kind.PING, b"", b"r1", owner=b"any-token"))
        assert sock.poll(TIMEOUT * 1000)
        reply = parse_reply(sock.recv_multipart())
        assert reply.kind is Kind.ERROR
        assert ErrorReply.decode(reply.body).code is ErrorCode.BAD_FRAME
        sock.close()
    finally:
        ctx.destroy(linger=0)


def test_async_client_speaks_curve(curve_service: Harness, keys: dict[str, Path]) -> None:
    async def main(who: str) -> str:
        async with AsyncClient(
            curve_service.frontend,
            TIMEOUT if who == "client" else REFUSED,
            server_key=public(keys, "server"),
            key=secret(keys, who),
        ) as client:
            chat = client.session()
            _ = [p async for p in chat.send("hi", max_tokens=3)]
            assert chat.last is not None
            return chat.last.worker

    assert asyncio.run(main("client")) == "w0"
    with pytest.raises(Timeout):
        asyncio.run(main("stranger"))


@pytest.mark.parametrize("who", ["stranger", None, "wrong server key"])
def test_refused_client_gets_nothing(
    curve_service: Harness, keys: dict[str, Path], who: str | None
) -> None:
    b = curve_service.broker
    refused, heard = b.stats.keys_refused, b.stats.client_messages
    if who == "wrong server key":  # an allowed key, but talking to another server's key
        client = Client(
            curve_service.frontend,
            REFUSED,
            server_key=public(keys, "other"),
            key=secret(keys, "client"),
        )
    else:
        client = connect(curve_service, keys, who, REFUSED)
    with client:
        with pytest.raises(Timeout):
            client.ping()
        with pytest.raises(Timeout):
            list(client.session().send("let me in", max_tokens=2))
    if who == "stranger":
        wait_until(lambda: b.stats.keys_refused > refused)  # ZAP said no to that very key
    assert b.stats.client_messages == heard  # not one frame reached the broker
    with connect(curve_service, keys, "client", TIMEOUT) as client:
        assert client.ping() >= 0  # and the door still works for those allowed


@pytest.mark.parametrize("how", ["stranger", "plaintext"])
def test_refused_handshakes(curve_service: Harness, keys: dict[str, Path], how: str) -> None:
    """What the refused sockets see: ZAP's refusal, or a mechanism mismatch."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if how == "stranger":
            curve = CurveClient.load(public(keys, "server"), secret(keys, "stranger"))
            assert curve is not None
            curve.apply(sock)
        sock.connect(curve_service.frontend)
        expected = {
            "stranger": zmq.EVENT_HANDSHAKE_FAILED_AUTH,
            "plaintext": zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        }
        assert handshake_failure(sock) == expected[how]
        sock.close()
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("who", ["stranger", "client"])
def test_only_worker_keys_open_the_backend(
    curve_service: Harness, keys: dict[str, Path], who: str
) -> None:
    """A client key is no worker key: with it a client could register, be placed other users'
    sessions and read them. Here it even claims the live worker's id: nothing moves."""
    b = curve_service.broker
    with connect(curve_service, keys, "client", TIMEOUT) as client:
        chat = client.session()
        list(chat.send("hello", max_tokens=4))
        refused = b.stats.keys_refused
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            curve = CurveClient.load(public(keys, "server"), secret(keys, who))
            assert curve is not None
            curve.apply(rogue)
            rogue.connect(curve_service.backend)
            for name in ("rogue", "w0"):
                ready = Ready(name, os.getpid(), 1, 4, "fake", 2048)
                rogue.send_multipart(control_frames(Kind.READY, ready.encode()), zmq.NOBLOCK)
            assert handshake_failure(rogue) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            wait_until(lambda: b.stats.keys_refused > refused)
            assert b.table.worker_key("rogue") is None
            assert len(b.table.workers) == 1 and b.stats.workers_lost == 0
            assert not rogue.poll(0)
        finally:
            ctx.destroy(linger=0)
        list(chat.send("still mine?", max_tokens=4))
        assert chat.last is not None and (chat.last.worker, chat.last.path) == ("w0", "text_prefix")
    # And the other way round: a worker key does not open the clients' socket.
    with connect(curve_service, keys, "worker", REFUSED) as posing, pytest.raises(Timeout):
        posing.ping()


def test_broker_restart_keeps_curve_sessions_warm_and_owned(
    curve_service: Harness, keys: dict[str, Path]
) -> None:
    """The worker learns each session's owner (the client's key) with its TURNs and announces
    it when it registers with a new broker: the session stays warm, and stays the key's."""
    h = curve_service
    owner_key = CurveClient.load(public(keys, "server"), secret(keys, "client"))
    assert owner_key is not None
    with connect(h, keys, "client", TIMEOUT) as client:
        chat = client.session()
        list(chat.send("hello", max_tokens=4))
        held = h.workers["w0"].scheduler.store.get(chat.id.encode())
        assert held is not None and held.owner == owner_key.public
        old = h.broker
        old.close()
        h.threads[0].join(TIMEOUT)
        new = Broker(replace(old.config, frontend=h.frontend, backend=h.backend))
        t = threading.Thread(target=new.run, name="broker-2", daemon=True)
        t.start()
        new.wait_bound(10)
        h.broker = new
        h.threads.append(t)
        # The stat is counted after the pin is made, in the broker's thread: wait for both.
        wait_until(lambda: new.stats.sessions_repinned == 1, 10)
        assert new.table.principal(chat.id.encode()) == owner_key.public
        list(chat.send("still there?", max_tokens=4))
        assert chat.last is not None and (chat.last.worker, chat.last.path) == ("w0", "text_prefix")
        with connect(h, keys, "other", TIMEOUT) as other:
            stranger = other.session(session_id=chat.id, history=chat.history)
            with pytest.raises(NotOwner):
                list(stranger.send("mine now", max_tokens=2))


def test_sessions_belong_to_keys(curve_service: Harness, keys: dict[str, Path]) -> None:
    with (
        connect(curve_service, keys, "client", TIMEOUT) as one,
        connect(curve_service, keys, "client", TIMEOUT) as same_key,
        connect(curve_service, keys, "other", TIMEOUT) as other_key,
    ):
        mine = one.session()
        list(mine.send("hello", max_tokens=4))
        stranger = other_key.session(session_id=mine.id, history=mine.history)
        with pytest.raises(NotOwner):
            list(stranger.send("mine now", max_tokens=2))
        with pytest.raises(NotOwner):
            stranger.reset()
        # Another connection holding the same key is the same owner: it picks up warm.
        again = same_key.session(session_id=mine.id, history=mine.history)
        list(again.send("go on", max_tokens=4))
        assert again.last is not None and again.last.path == "text_prefix"


def test_serve_lets_its_own_workers_in(
    tiny_model_path: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    """``kvroute serve`` with CURVE: its workers use a throwaway key the directory lacks."""
    url = f"tcp://127.0.0.1:{free_port()}"
    args = ["serve", "--workers", "1", "--model", str(tiny_model_path), "--frontend", url]
    args += ["--curve-secret", secret(keys, "server"), "--allow-keys", str(keys["clients"])]
    proc = Proc(args, tmp_path / "serve.log")
    try:
        assert "workers 1" in proc.wait_line("ready")
        server = public(keys, "server")
        with Client(url, TIMEOUT, server_key=server, key=secret(keys, "client")) as client:
            list(client.session().send("hi", max_tokens=3))
        stranger = Client(url, REFUSED, server_key=server, key=secret(keys, "stranger"))
        with stranger, pytest.raises(Timeout):
            stranger.ping()
    finally:
        assert proc.stop() == 0


# --- keys and their errors --------------------------------------------------------------------


def test_keys_generate(tmp_path: Path) -> None:
    d = tmp_path / "k"
    result = CliRunner().invoke(main, ["keys", "generate", str(d)])
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files == sorted(
        f"{n}{e}"
        for n in ("server", "clients/client", "workers/worker")
        for e in (".key", ".key_secret")
    )
    for sub in (d, d / "clients", d / "workers"):
        assert stat.S_IMODE(sub.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "clients/client.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "workers/worker.key").stat().st_mode) == 0o644
    # Usable as --allow-keys and --allow-worker-keys as they are, and apart from each other.
    clients, workers = load_allowed_keys(d / "clients"), load_allowed_keys(d / "workers")
    assert len(clients) == len(workers) == 1 and not clients & workers
    assert f"--allow-keys {d / 'clients'} --allow-worker-keys {d / 'workers'}" in result.stderr
    assert CurveClient.load(str(d / "server.key"), str(d / "clients/client.key_secret"))
    before = (d / "server.key_secret").read_bytes()
    again = CliRunner().invoke(main, ["keys", "generate", str(d)])
    assert again.exit_code == 1
    assert again.stderr == f"error: {d / 'server.key'} exists (use --force to replace it)\n"
    assert (d / "server.key_secret").read_bytes() == before  # nothing was overwritten
    named = CliRunner().invoke(
        main, ["keys", "generate", str(d), "--client", "alice", "--worker", "w2", "--name", "b2"]
    )
    assert named.exit_code == 0, named.output
    for made in ("clients/alice", "workers/w2", "b2"):
        assert (d / f"{made}.key_secret").exists()
    assert (d / "server.key_secret").read_bytes() == before  # only the names asked for
    clash = CliRunner().invoke(
        main, ["keys", "generate", str(d), "--client", "x", "--worker", "w2"]
    )
    assert clash.exit_code == 1 and not (d / "clients/x.key").exists()  # all or nothing
    bad = CliRunner().invoke(main, ["keys", "generate", str(d), "--worker", "../up"])
    assert bad.exit_code == 2 and "not a plain file name" in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["broker", "--curve-secret", "{missing}", "--allow-keys", "{clients}"],
            "error: cannot read CURVE key file {missing}: no such file",
        ),
        (
            ["broker", "--curve-secret", "{server}.key", "--allow-keys", "{clients}"],
            "error: {server}.key holds no secret key (give the .key_secret file)",
        ),
        (
            ["broker", "--curve-secret", "{server}.key_secret", "--allow-keys", "{missing}"],
            "error: cannot read allowed keys from {missing}: not a directory",
        ),
        (
            ["broker", "--curve-secret", "{server}.key_secret", "--allow-keys", "{clients}"],
            "error: no worker keys: give the directory of the workers' public certificates"
            " (--allow-worker-keys); client keys are not let in on the backend",
        ),
        (
            [
                *("broker", "--curve-secret", "{server}.key_secret", "--allow-keys", "{clients}"),
                *("--allow-worker-keys", "{missing}"),
            ],
            "error: cannot read allowed keys from {missing}: not a directory",
        ),
        (
            ["chat", "--server-key", "{server}.key", "--key", "{missing}"],
            "error: cannot read CURVE key file {missing}: no such file",
        ),
        (
            ["chat", "--server-key", "{server}.key"],
            "error: CURVE needs both the server's public key and this peer's own key pair",
        ),
        (
            ["worker", "--server-key", "{garbage}", "--key", "{server}.key_secret"],
            "error: CURVE key file {garbage} holds no public key",
        ),
    ],
)
def test_bad_key_files_are_one_line_errors(
    tmp_path: Path, keys: dict[str, Path], args: list[str], message: str
) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a certificate\n")
    names = {
        "missing": str(tmp_path / "nope"),
        "clients": str(keys["clients"]),
        "server": str(keys["server"]),
        "garbage": str(garbage),
    }
    argv = [a.format(**names) for a in args]
    if argv[0] == "chat":
        argv += ["--connect", f"tcp://127.0.0.1:{free_port()}"]
    result = CliRunner().invoke(main, argv, input="")
    assert result.exit_code == 1, result.output
    assert result.stderr == message.format(**names) + "\n"  # one line, no traceback


def test_key_errors_in_the_library(tmp_path: Path, keys: dict[str, Path]) -> None:
    server = public(keys, "server")
    with pytest.raises(KeyFileError, match="no such file"):
        Client("tcp://127.0.0.1:1", server_key=server, key=str(tmp_path / "nope"))
    with pytest.raises(KeyFileError, match="needs both"):
        Client("tcp://127.0.0.1:1", key=secret(keys, "client"))
    with pytest.raises(KeyFileError, match="not a CURVE key"):
        Client("tcp://127.0.0.1:1", server_key=b"short", key=secret(keys, "client"))
    with pytest.raises(KeyFileError, match="does not match"):
        pair = CurveClient.load(server, secret(keys, "client"))
        other = CurveClient.load(server, secret(keys, "other"))
        assert pair is not None and other is not None
        CurveClient.load(server, (pair.public, other.secret))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="no public keys"):
        Broker(
            BrokerConfig(curve_secret=secret(keys, "server"), allow_keys=str(tmp_path / "empty"))
        )
    with pytest.raises(ValueError, match="both"):
        BrokerConfig(curve_secret=secret(keys, "server"))
    with pytest.raises(ValueError, match="needs CURVE"):
        BrokerConfig(allow_worker_keys=str(keys["workers"]))
    mixed = BrokerConfig(
        curve_secret=secret(keys, "server"),
        allow_keys=str(keys["clients"]),
        allow_worker_keys=str(keys["clients"]),
    )
    with pytest.raises(KeyFileError, match="both as a client and as a worker"):
        Broker(mixed)
    usage = CliRunner().invoke(main, ["broker", "--allow-worker-keys", str(keys["workers"])])
    assert usage.exit_code == 2 and "--allow-worker-keys needs --curve-secret" in usage.output


def test_bench_speaks_curve(curve_service: Harness, keys: dict[str, Path]) -> None:
    """`kvroute bench --connect --server-key --key` runs against a CURVE broker."""
    args = [
        "bench",
        "--connect",
        curve_service.frontend,
        "--sessions",
        "2",
        "--turns",
        "2",
        "--concurrency",
        "2",
        "--max-tokens",
        "3",
        "--timeout",
        "10",
        "--server-key",
        public(keys, "server"),
        "--key",
        secret(keys, "client"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stickiness violations" in result.output
