"""`kvroute bench`: metrics (I/O-free), workloads, and end-to-end runs on the tiny model.

The end-to-end tests drive the real command through click's CliRunner against the in-process
``tiny_service`` (broker + 2 worker threads); errors are forced deterministically (overflow of
the tiny model's 256-position context, a frontend nobody listens on). Nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from service_harness import Harness

from kvroute.bench import (
    RunConfig,
    Runner,
    Script,
    TurnRecord,
    WorkloadError,
    builtin_workload,
    classify_error,
    file_workload,
    load_jsonl,
    summarize,
)
from kvroute.bench.metrics import find_violations, percentile, percentiles
from kvroute.bench.plot import PlotUnavailable, check_available
from kvroute.bench.workload import FOLLOW_UPS, TOPICS, builtin_prompts
from kvroute.cli import main
from kvroute.client import (
    ContextOverflow,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.proto import ErrorCode

pytestmark = pytest.mark.timeout(60)

SHORT_TURNS = [  # short, so a few turns fit the tiny model's 256 positions (1 token per byte)
    {"turns": ["hi", "ok", "more"]},
    {"system": "be brief", "turns": ["a", "b", "c"]},
]


def ok(session: int, turn: int, worker: str, **kw: Any) -> TurnRecord:
    """A successful warm turn record with sensible defaults."""
    fields: dict[str, Any] = dict(
        start=0.0, end=1.0, pieces=[0.1, 0.2, 0.4], prompt_tokens=100, cached_tokens=80,
        prefill_tokens=20, generated_tokens=3, path="text_prefix", finish_reason="length",
        worker_ttft_ms=50.0,
    )  # fmt: skip
    fields.update(kw)
    return TurnRecord(session=session, turn=turn, worker=worker, **fields)


def failed(session: int, turn: int, error: str, **kw: Any) -> TurnRecord:
    return TurnRecord(session=session, turn=turn, error=error, error_detail=error, **kw)


# --- metrics ------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        percentile(values, 101)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ContextOverflow(200, 100, 256), "overflow"),
        (SessionBusy("s"), "busy"),
        (SessionLost("w0", "exited"), "lost"),
        (Timeout(1.0, "TURN reply", "tcp://x"), "timeout"),
        (ProtocolError(ErrorCode.INTERNAL, "boom"), "other"),
        (ServiceUnavailable(ErrorCode.NO_WORKER, "none"), "other"),
    ],
)
def test_classify_error(exc: Exception, kind: str) -> None:
    assert classify_error(exc) == kind


def test_stickiness_violation_detected() -> None:
    records = [ok(0, 1, "w0"), ok(0, 2, "w0"), ok(0, 3, "w1"), ok(1, 1, "w1"), ok(1, 2, "w1")]
    [v] = find_violations(records)
    assert (v.session, v.turn, v.previous_worker, v.worker) == (0, 3, "w0", "w1")


def test_stickiness_failover_exemptions() -> None:
    records = [
        # session 0: SessionLost, then served elsewhere: reported failover
        ok(0, 1, "w0"),
        failed(0, 2, "lost"),
        ok(0, 3, "w1", path="cold", cold_reason="worker_lost"),
        ok(0, 4, "w1"),
        # session 1: moved with cold reason worker_lost, no error seen by the client
        ok(1, 1, "w0"),
        ok(1, 2, "w1", path="cold", cold_reason="worker_lost"),
        # session 2: a timeout is not a failover; a move after it is a violation
        ok(2, 1, "w0"),
        failed(2, 2, "timeout"),
        ok(2, 3, "w1"),
        # session 3: after a failover to w1, going back to w0 unannounced is a violation
        ok(3, 1, "w0"),
        failed(3, 2, "lost"),
        ok(3, 3, "w1"),
        ok(3, 4, "w0"),
        # probes run in fresh sessions: wherever they land is fine
        ok(4, 1, "w0"),
        ok(4, 1, "w1", probe=True),
        ok(4, 2, "w0"),
    ]
    assert [(v.session, v.turn) for v in find_violations(records)] == [(2, 3), (3, 4)]


def test_errors_by_kind_and_error_rate() -> None:
    records = [
        ok(0, 1, "w0"),
        failed(0, 2, "overflow"),
        failed(0, 3, "busy"),
        ok(1, 1, "w0"),
        ok(1, 2, "w1"),  # violation
        failed(1, 3, "other"),
        ok(0, 1, "w1", probe=True),
        failed(1, 1, "timeout", probe=True),
    ]
    s = summarize(records)
    assert s.errors == {"overflow": 1, "busy": 1, "lost": 0, "timeout": 0, "other": 1}
    assert s.probe_errors == {"overflow": 0, "busy": 0, "lost": 0, "timeout": 1, "other": 0}
    assert len(s.violations) == 1
    assert (s.requests, s.turns, s.turns_ok, s.probes) == (8, 6, 3, 2)
    assert s.error_rate == pytest.approx((3 + 1 + 1) / 8)
    assert s.error_examples["overflow"] == "overflow"


def test_warmup_records_are_excluded() -> None:
    records = [
        ok(0, 1, "w0", start=10.0, end=12.0, pieces=[11.0, 11.5, 12.0], generated_tokens=3),
        ok(5, 1, "w0", warmup=True, start=0.0, end=9.0, generated_tokens=1000),
        failed(5, 2, "overflow", warmup=True),
        ok(5, 3, "w1", warmup=True),  # would be a violation if it counted
    ]
    s = summarize(records)
    assert (s.requests, s.turns, s.output_tokens) == (1, 1, 3)
    assert sum(s.errors.values()) == 0 and s.violations == [] and s.error_rate == 0
    assert s.duration_s == pytest.approx(2.0) and s.output_tok_s == pytest.approx(1.5)
    assert s.ttft_ms["p50"] == pytest.approx(1000.0)
    assert s.workers["w0"].turns == 1 and "w1" not in s.workers


def test_cache_hit_latencies_and_per_turn() -> None:
    records = [
        ok(0, 1, "w0", prompt_tokens=50, cached_tokens=0, path="cold", cold_reason="new"),
        ok(0, 2, "w0", prompt_tokens=100, cached_tokens=90),
        ok(1, 1, "w1", prompt_tokens=50, cached_tokens=0, path="cold", cold_reason="new"),
        ok(1, 2, "w1", prompt_tokens=200, cached_tokens=100),
        # cold probes of turn 2: 10x the warm TTFT (warm turns above take 100 ms to 1st piece)
        ok(0, 2, "w1", probe=True, pieces=[], end=1.0, worker_ttft_ms=900.0),
        ok(1, 2, "w0", probe=True, pieces=[], end=1.0, worker_ttft_ms=900.0),
    ]
    s = summarize(records)
    assert s.cache_hit == pytest.approx(190 / 400)  # token-weighted
    t1, t2 = s.per_turn
    assert t1.cache_hit == 0 and t2.cache_hit == pytest.approx((0.9 + 0.5) / 2)  # mean per turn
    assert t2.prompt_tokens == 150
    assert t2.ttft_ms["p50"] == pytest.approx(100.0)
    assert t2.cold_ttft_ms["p50"] == pytest.approx(1000.0)  # no piece: END time
    assert t2.speedup == pytest.approx(10.0) and t2.worker_speedup == pytest.approx(18.0)
    assert t1.speedup is None  # no probes for turn 1
    assert s.paths == {"cold": 2, "text_prefix": 2}
    assert s.cold_reasons == {"new": 2}
    assert s.itl_ms == pytest.approx({"p50": 150.0, "p99": 200.0})  # gaps of 100, 200 ms a turn
    assert s.tpot_ms["p50"] == pytest.approx(150.0)  # (0.4 - 0.1) s / 2 tokens
    assert s.workers["w0"].probes == 1 and s.workers["w0"].sessions == 1
    assert sum(v for _, v in s.timeline) * s.timeline_bin_s == pytest.approx(12.0)


# --- workload -----------------------------------------------------------------------------------


def test_builtin_workload_is_varied_and_deterministic() -> None:
    assert len(set(builtin_prompts())) >= 40
    a = builtin_workload(seed=7, n_sessions=6, n_turns=12)
    assert a == builtin_workload(seed=7, n_sessions=6, n_turns=12)
    assert a != builtin_workload(seed=8, n_sessions=6, n_turns=12)
    assert builtin_workload(7, 3, 12) == a[:3]  # more sessions never change earlier ones
    assert builtin_workload(7, 2, 12, first=3) == a[3:5]  # warm-up numbering
    assert all(len(s.turns) == 12 for s in a)
    known = set(builtin_prompts())
    for s in a:
        for t in s.turns:
            assert t.removeprefix("Changing the subject: ") in known
    assert len({s.turns for s in a}) > 1
    long = builtin_workload(0, 1, 60)[0]  # more turns than one topic: moves on
    assert len(long.turns) == 60 and len(set(long.turns)) >= len(TOPICS) * 5
    assert {t for t in long.turns if t in FOLLOW_UPS}


def test_load_jsonl_and_file_workload(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(
        '{"turns": ["one", "two", "three"]}\n\n{"system": "sys", "turns": ["x"]}\n',
        encoding="utf-8",
    )
    convs = load_jsonl(f)
    assert convs == [Script(None, ("one", "two", "three")), Script("sys", ("x",))]
    scripts = file_workload(convs, n_sessions=3, n_turns=2)
    assert scripts == [Script(None, ("one", "two")), Script("sys", ("x",)), scripts[0]]
    assert file_workload(convs, 1, 5, first=1) == [Script("sys", ("x",))]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no conversations"),
        ('{"turns": ["a"]}\n{"turns": ["b"]\n', "c.jsonl:2: not valid JSON"),
        ('["a", "b"]\n', "expected an object"),
        ('{"turn": ["a"]}\n', "unknown keys ['turn']"),
        ('{"turns": []}\n', "non-empty list"),
        ('{"turns": "hello"}\n', "non-empty list"),
        ('{"turns": ["a", 3]}\n', "turns[1] must be a non-empty string"),
        ('{"turns": ["a", " "]}\n', "turns[1] must be a non-empty string"),
        ('{"system": 1, "turns": ["a"]}\n', "'system' must be a string"),
    ],
)
def test_load_jsonl_errors(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(WorkloadError, match=re.escape(message)):
        load_jsonl(f)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot read prompts file"):
        load_jsonl(tmp_path / "nope.jsonl")


# --- end to end ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in SHORT_TURNS), encoding="utf-8")
    return f


def bench(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_bench_end_to_end_json_and_plot(
    tiny_service: Harness, prompts: Path, tmp_path: Path
) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = bench(
        "--connect", tiny_service.frontend, "--sessions", 4, "--turns", 3,
        "--concurrency", 2, "--max-tokens", 6, "--prompts", prompts, "--warmup", 1,
        "--compare-cold", "--json", out, "--plot", png, "--timeout", 10,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "stickiness violations" in r.output and "per turn index" in r.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kvroute-bench/1" and doc["meta"]["options"]["sessions"] == 4
    assert (doc["turns"], doc["probes"], doc["turns_ok"]) == (12, 12, 12)  # warm-up excluded
    assert sum(doc["errors"].values()) == 0 and doc["violations"] == []
    assert doc["error_rate"] == 0
    assert [t["turn"] for t in doc["per_turn"]] == [1, 2, 3]
    assert doc["per_turn"][0]["cache_hit"] == 0  # every session starts cold
    assert all(t["cache_hit"] > 0 for t in doc["per_turn"][1:])
    assert all(t["speedup"] is not None for t in doc["per_turn"])
    assert doc["cold_reasons"] == {"new": 4}
    assert sum(w["turns"] for w in doc["workers"].values()) == 12
    assert set(doc["workers"]) <= {"w0", "w1"}
    assert doc["output_tokens"] > 0 and doc["ttft_ms"]["p50"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_overflow_fails_the_error_budget(tiny_service: Harness, tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    args = ["--connect", tiny_service.frontend, "--sessions", 2, "--turns", 2]
    r = bench(*args, "--max-tokens", 1000, "--json", out)  # > n_ctx 256: every turn overflows
    assert r.exit_code == 3, r.output
    assert "exceeds --max-error-rate" in r.output and "context overflow" in r.output
    doc = json.loads(out.read_text())
    assert doc["errors"]["overflow"] == 4 and doc["error_rate"] == 1.0
    r = bench(*args, "--max-tokens", 1000, "--max-error-rate", 1)
    assert r.exit_code == 0, r.output


def test_bench_timeouts_against_a_silent_frontend(tmp_path: Path) -> None:
    from chat_service import MuteBroker  # answers the bench's PING, then never a TURN

    out = tmp_path / "t.json"
    mute = MuteBroker()
    try:
        r = bench(
            "--connect", mute.frontend, "--sessions", 2, "--turns", 1,
            "--concurrency", 2, "--timeout", 0.2, "--json", out, "--max-error-rate", 0.5,
        )  # fmt: skip
    finally:
        mute.close()
    assert r.exit_code == 3, r.output
    assert json.loads(out.read_text())["errors"]["timeout"] == 2


def test_bench_with_nobody_at_the_address_stops_at_once() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    r = bench("--connect", url, "--sessions", 2, "--turns", 1, "--timeout", 30)
    assert r.exit_code == 1, r.output
    assert f"error: no kvroute broker answers at {url} within 3 s" in r.output


def test_bench_failover_is_not_a_violation(tiny_service: Harness) -> None:
    """A worker leaving mid-run moves its sessions (reported as worker_lost or SessionLost):
    sessions change worker, yet no violation is counted."""
    stopped: list[str] = []

    def stop_first_worker(rec: TurnRecord) -> None:
        if rec.ok and rec.turn == 2 and not stopped and rec.worker is not None:
            stopped.append(rec.worker)
            tiny_service.stop_worker(rec.worker)

    scripts = [Script(None, ("a", "b", "c", "d", "e"))] * 4
    runner = Runner(RunConfig(tiny_service.frontend, concurrency=4, max_tokens=4, timeout=10),
                    on_record=stop_first_worker)  # fmt: skip
    result = asyncio.run(asyncio.wait_for(runner.run(scripts), 30))
    s = summarize(result.records)
    assert stopped and s.violations == []
    workers_of: dict[int, set[str]] = {}
    for rec in result.records:
        if rec.worker is not None:
            workers_of.setdefault(rec.session, set()).add(rec.worker)
    assert any(len(ws) > 1 for ws in workers_of.values())  # sessions did move
    moved = s.cold_reasons.get("worker_lost", 0) + s.errors["lost"]
    assert moved > 0, s


def test_bench_usage_and_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = bench("--sessions", 1)
    assert r.exit_code == 2 and "exactly one of --connect URL or --serve N" in r.output
    r = bench("--connect", "tcp://127.0.0.1:1", "--serve", 1)
    assert r.exit_code == 2
    r = bench("--connect", "not-an-address", "--sessions", 1, "--turns", 1)
    assert r.exit_code == 2 and "tcp://HOST:PORT" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n', encoding="utf-8")
    r = bench("--connect", "tcp://127.0.0.1:1", "--prompts", bad)
    assert r.exit_code == 1 and "error:" in r.output and "bad.jsonl:1" in r.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotUnavailable, match="pip install"):
        check_available()
    r = bench("--connect", "tcp://127.0.0.1:1", "--plot", tmp_path / "x.png")
    assert r.exit_code == 1 and "--plot needs matplotlib" in r.output


def test_bench_serve_starts_and_stops_workers(tiny_model_path: Path, prompts: Path) -> None:
    r = bench(
        "--serve", 2, "--model", tiny_model_path, "--sessions", 2, "--turns", 2,
        "--max-tokens", 4, "--prompts", prompts,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "starting 2 worker(s)" in r.output and "w0" in r.output
