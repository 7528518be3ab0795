"""``kvroute bench``: a multi-turn load tester that also checks session stickiness.

Closed-loop simulated users chat with a kvroute service (:mod:`.runner`) using a built-in or
JSONL prompt set (:mod:`.workload`); every request becomes a record, and :mod:`.metrics` turns
the records into TTFT / ITL / throughput percentiles, per-turn cache reuse, error counts and
stickiness violations (a turn served by a worker other than the session's owner without a
reported failover). :mod:`.report` renders tables and JSON, :mod:`.plot` a PNG.

Use from Python::

    from kvroute.bench import RunConfig, builtin_workload, run, summarize

    result = run(RunConfig("tcp://127.0.0.1:5555", concurrency=4), builtin_workload(0, 8, 5))
    print(summarize(result.records).output_tok_s)
"""

from .metrics import ERROR_KINDS, Summary, TurnRecord, Violation, classify_error, summarize
from .runner import RunConfig, Runner, RunResult, run
from .workload import Script, WorkloadError, builtin_workload, file_workload, load_jsonl

__all__ = [
    "ERROR_KINDS",
    "RunConfig",
    "RunResult",
    "Runner",
    "Script",
    "Summary",
    "TurnRecord",
    "Violation",
    "WorkloadError",
    "builtin_workload",
    "classify_error",
    "file_workload",
    "load_jsonl",
    "run",
    "summarize",
]
