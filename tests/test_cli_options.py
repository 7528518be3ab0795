"""The option sets commands share: one definition each, checked at once, and the configs'
own checks for library users."""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner

from kvroute.broker import BrokerConfig
from kvroute.cli import main
from kvroute.cli.options import config_errors
from kvroute.worker.config import WorkerConfig

SETS = {
    "heartbeat": (("--heartbeat", "--liveness"), ("broker", "serve", "worker")),
    "broker": (
        ("--curve-secret", "--max-sessions-per-client", "--max-body-bytes", "--pin-ttl"),
        ("broker", "serve"),
    ),
    "worker": (
        (
            "--capacity",
            "--kv-budget-mb",
            "--prefill-chunk",
            "--threads",
            "--checkpoint-mb",
            "--checkpoint-ttl",
        ),
        ("serve", "worker"),
    ),
    "model": (("--model", "--ctx"), ("generate", "serve", "worker", "bench")),
}


def _option(command: str, flag: str) -> click.Option:
    cmd = main.commands[command]
    found = [p for p in cmd.params if isinstance(p, click.Option) and flag in p.opts]
    assert len(found) == 1, f"kvroute {command} has {len(found)} {flag}"
    return found[0]


def _spec(option: click.Option) -> tuple[object, ...]:
    return (option.opts, repr(option.type), option.default, option.show_default, option.help)


@pytest.mark.parametrize("concern", sorted(SETS))
def test_a_set_is_the_same_in_every_command(concern: str) -> None:
    flags, commands = SETS[concern]
    for flag in flags:
        first, *others = commands
        want = _spec(_option(first, flag))
        for command in others:
            assert _spec(_option(command, flag)) == want, f"{flag}: {first} vs {command}"


def test_defaults_come_from_the_configs() -> None:
    b, w = BrokerConfig(), WorkerConfig()
    assert _option("serve", "--heartbeat").default == b.heartbeat_interval == w.heartbeat_interval
    assert _option("worker", "--liveness").default == b.liveness == w.liveness
    assert _option("serve", "--capacity").default == w.capacity
    assert _option("worker", "--ctx").default == w.n_ctx
    assert _option("broker", "--max-pins").default == b.max_pins
    assert _option("serve", "--checkpoint-mb").default == w.checkpoint_mb
    assert _option("worker", "--checkpoint-ttl").default == w.checkpoint_ttl_s == 24 * 3600


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--heartbeat", "0"],
        ["worker", "--heartbeat", "0"],
        ["broker", "--heartbeat", "0"],
        ["serve", "--heartbeat", "nan"],
        ["worker", "--heartbeat", "inf"],
        ["serve", "--liveness", "0"],
        ["worker", "--capacity", "0"],
        ["serve", "--kv-budget-mb", "-1"],
        ["worker", "--prefill-chunk", "0"],
        ["serve", "--checkpoint-mb", "0"],
        ["worker", "--checkpoint-ttl", "-1"],
        ["worker", "--checkpoint-ttl", "nan"],
        ["generate", "--ctx", "8", "hi"],
        ["chat", "--temperature", "nan"],
    ],
)
def test_a_bad_value_is_one_usage_line_at_once(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert args[1] in lines[0], "the message names the option"


def test_config_errors_become_usage_errors() -> None:
    @click.command()
    def build() -> None:
        with config_errors():
            BrokerConfig(heartbeat_interval=0)

    result = CliRunner().invoke(build, [])
    assert result.exit_code == 2
    assert "heartbeat_interval must be at least" in result.output


@pytest.mark.parametrize(
    "kw",
    [
        {"heartbeat_interval": 0},
        {"heartbeat_interval": -1.0},
        {"heartbeat_interval": math.nan},
        {"heartbeat_interval": math.inf},
        {"liveness": 0},
        {"batch": 0},
        {"hwm": -1},
    ],
)
def test_broker_config_refuses_settings_that_cannot_work(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        BrokerConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"heartbeat_interval": 0},
        {"liveness": 0},
        {"capacity": 0},
        {"n_ctx": 8},
        {"kernels": "fast"},
        {"kv_budget_mb": -1.0},
        {"kv_budget_mb": math.nan},
        {"prefill_chunk": 0},
        {"threads": 0},
        {"host_workers": 0},
        {"max_wait_s": 0.0},
        {"checkpoint_mb": 0.0},
        {"checkpoint_ttl_s": -1.0},
        {"checkpoint_ttl_s": math.inf},
    ],
)
def test_worker_config_refuses_settings_that_cannot_work(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WorkerConfig(**kw)


def test_worker_config_accepts_the_edges() -> None:
    cfg = WorkerConfig(heartbeat_interval=0.01, liveness=1, capacity=1, kv_budget_mb=0.0, n_ctx=16)
    assert cfg.kv_budget_bytes == 0
    assert BrokerConfig(heartbeat_interval=0.01, liveness=1).expiry_s == 0.01
