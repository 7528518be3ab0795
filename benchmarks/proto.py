"""Body codec cost: decode and encode of the bodies on the turn path, per call.

    python benchmarks/proto.py [--number 20000] [--rounds 3] [--baseline DIR] [--json OUT]

Times ``Cls.decode(frame)`` (what the worker pays per TURN, the client per TOKEN / END) and
``body.encode()`` (what the worker pays per reply) for: a typical 10-message TURN (a system
prompt and nine alternating user / assistant messages of a few hundred characters), a one-token
TOKEN and an END. ``msgpack.unpackb`` / ``msgpack.packb`` of the same bytes / map is reported as
the floor (decoding to plain dicts, no validation, no typed objects).

``--baseline DIR`` runs the same measurements in a subprocess whose ``kvroute`` is imported from
``DIR`` (e.g. a copy of the package from before a codec change) and prints both with ratios, so
the comparison comes from one run on one machine state. Each figure is the best of
``--repeat`` timings of ``--number`` calls (the minimum is the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any

import msgpack

from kvroute.proto import (
    CachePath,
    ChatMessage,
    ColdReason,
    FinishReason,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    reply_sha256,
)


def _sentence(i: int, n: int) -> str:
    words = ("the", "cache", "keeps", "every", "session", "warm", "on", "its", "worker", "é")
    return " ".join(words[(i * 7 + j) % len(words)] for j in range(n))


def bodies() -> dict[str, Any]:
    """The bodies measured, by name."""
    messages = [ChatMessage(Role.SYSTEM, _sentence(0, 40))]
    for i in range(1, 10):
        role = Role.USER if i % 2 else Role.ASSISTANT
        messages.append(ChatMessage(role, _sentence(i, 30 + 5 * i)))
    stats = TurnStats(900, 850, 50, 64, CachePath.TEXT_PREFIX, None, 41.25, 2270.5, "w0")
    stats_cold = TurnStats(900, 0, 900, 64, CachePath.COLD, ColdReason.NEW, 412.0, 2270.5, "w0")
    return {
        "TURN (10 messages)": TurnRequest(
            tuple(messages), max_tokens=256, temperature=0.7, top_p=0.95, top_k=40, seed=1234
        ),
        "TOKEN": Token(17, " word", (1234,)),
        "END": TurnEnd(64, FinishReason.STOP, reply_sha256("reply"), stats),
        "END (cold)": TurnEnd(64, FinishReason.LENGTH, reply_sha256("reply"), stats_cold),
    }


def _best_us(fn: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure(number: int, repeat: int) -> dict[str, dict[str, float]]:
    """Microseconds per call for each body: decode, encode, and msgpack's floor for both."""
    out: dict[str, dict[str, float]] = {}
    for name, body in bodies().items():
        cls = type(body)
        frame = body.encode()
        plain = msgpack.unpackb(frame)
        assert cls.decode(frame) == body
        out[name] = {
            "bytes": len(frame),
            "decode_us": _best_us(lambda: cls.decode(frame), number, repeat),  # noqa: B023
            "encode_us": _best_us(body.encode, number, repeat),
            "msgpack_unpackb_us": _best_us(lambda: msgpack.unpackb(frame), number, repeat),  # noqa: B023
            "msgpack_packb_us": _best_us(lambda: msgpack.packb(plain), number, repeat),  # noqa: B023
        }
    return out


def _baseline(directory: Path, number: int, repeat: int) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": f"{directory}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, __file__, "--number", str(number), "--repeat", str(repeat)]
    done = subprocess.run([*args, "--raw"], env=env, check=True, capture_output=True, text=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


def _best(
    a: dict[str, dict[str, float]] | None, b: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    if a is None:
        return b
    return {k: {f: min(v[f], b[k][f]) for f in v} for k, v in a.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20_000, help="Calls per timing.")
    ap.add_argument("--repeat", type=int, default=5, help="Timings per figure (best is kept).")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating baseline/current runs.")
    ap.add_argument("--baseline", type=Path, help="Directory holding the baseline kvroute package.")
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # JSON to stdout only
    args = ap.parse_args()
    if args.raw:
        print(json.dumps(measure(args.number, args.repeat)))
        return
    # Alternate baseline and current runs so drift in machine load hits both; keep the best.
    base: dict[str, dict[str, float]] | None = None
    now: dict[str, dict[str, float]] | None = None
    for _ in range(args.rounds):
        if args.baseline:
            base = _best(base, _baseline(args.baseline, args.number, args.repeat))
        now = _best(now, measure(args.number, args.repeat))
    assert now is not None
    import kvroute.proto

    print(f"codec: {Path(kvroute.proto.__file__).parent}")
    head = f"{'body':<20}{'bytes':>7}{'decode us':>11}{'encode us':>11}{'unpackb':>9}{'packb':>9}"
    print(head + ("  baseline decode / encode (ratio now/base)" if base else ""))
    for name, r in now.items():
        line = (
            f"{name:<20}{r['bytes']:>7.0f}{r['decode_us']:>11.2f}{r['encode_us']:>11.2f}"
            f"{r['msgpack_unpackb_us']:>9.2f}{r['msgpack_packb_us']:>9.2f}"
        )
        if base and name in base:
            b = base[name]
            dec, enc = r["decode_us"] / b["decode_us"], r["encode_us"] / b["encode_us"]
            line += f"  {b['decode_us']:.2f} / {b['encode_us']:.2f} us ({dec:.2f}x / {enc:.2f}x)"
            if b["bytes"] != r["bytes"]:
                line += f"  SIZE DIFFERS: {b['bytes']:.0f} bytes"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"now": now, "baseline": base}, indent=2) + "\n")


if __name__ == "__main__":
    main()
