"""One address parser for every command and the library: same forms, same one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvroute.broker.config import BrokerConfig
from kvroute.cli import main
from kvroute.client import AsyncClient, Client
from kvroute.proto.endpoint import FORMS, MAX_IPC_PATH_BYTES, EndpointError, parse_endpoint
from kvroute.worker.config import WorkerConfig


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("localhost:5555", "tcp://localhost:5555"),
        (" 127.0.0.1:80 ", "tcp://127.0.0.1:80"),
        ("TCP://host.example:05555", "tcp://host.example:5555"),
        ("tcp://[::1]:5555", "tcp://[::1]:5555"),
        ("ipc:///tmp/kv.sock", "ipc:///tmp/kv.sock"),
        ("ipc://@abstract", "ipc://@abstract"),
        ("inproc://x", "inproc://x"),
    ],
)
def test_accepted_forms(text: str, want: str) -> None:
    assert parse_endpoint(text) == want
    assert parse_endpoint(text, bind=True) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("localhost", "no port"),
        ("5555", "no host (for this machine: 127.0.0.1:5555)"),
        ("tcp://localhost", "no port"),
        ("tcp://localhost:", "no port"),
        ("tcp://:5555", "no host"),
        ("http://localhost:5555", "unknown scheme http://"),
        ("tcp://::1:5555", "IPv6 addresses go in brackets, e.g. [::1]"),
        ("tcp://a b:1", "not a host name"),
        ("tcp://h:99999", "port '99999' is not a number 1..65535"),
        ("tcp://h:http", "port 'http' is not a number 1..65535"),
        ("tcp://*:5555", "wildcards (* host, port 0 or *) are for binding only"),
        ("tcp://127.0.0.1:0", "wildcards (* host, port 0 or *) are for binding only"),
        ("ipc://", "no path after ipc://"),
        ("ipc://*", "ipc://* (a fresh path) is for binding, not connecting"),
        ("ipc://" + "x" * (MAX_IPC_PATH_BYTES + 1), f"longer than {MAX_IPC_PATH_BYTES} bytes"),
    ],
)
def test_rejected_with_one_line_saying_why(text: str, why: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(text)
    message = str(info.value)
    assert why in message and message.endswith(FORMS) and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_wildcards_are_for_binding() -> None:
    assert parse_endpoint("tcp://*:0", bind=True) == "tcp://*:0"
    assert parse_endpoint("tcp://127.0.0.1:*", bind=True) == "tcp://127.0.0.1:*"
    assert parse_endpoint("ipc://*", bind=True) == "ipc://*"


def test_library_and_configs_use_the_same_words() -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint("localhost")
    want = str(info.value)
    for make in (
        lambda: Client("localhost"),
        lambda: AsyncClient("localhost"),
        lambda: WorkerConfig(connect="localhost"),
        lambda: BrokerConfig(frontend="localhost"),
    ):
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == want
    assert WorkerConfig(connect="localhost:1").connect == "tcp://localhost:1"
    assert BrokerConfig(frontend="*:0").frontend == "tcp://*:0"


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "--connect", "localhost"],
        ["bench", "--connect", "localhost", "--sessions", "1"],
        ["serve", "--frontend", "localhost"],
        ["serve", "--backend", "localhost"],
        ["broker", "--frontend", "localhost"],
        ["worker", "--connect", "localhost"],
    ],
)
def test_every_command_says_it_in_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "bad address 'localhost': no port; " + FORMS in lines[0]
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
