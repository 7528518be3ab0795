"""OpenAI response bodies and Server-Sent Events framing, as bytes ready to send.

- :func:`completion`: the ``chat.completion`` object of a non-streamed request.
- :class:`ChunkEncoder`: the ``chat.completion.chunk`` events of a streamed one. Each event is one
  ``data: <json>\\n\\n`` frame (JSON never contains a raw newline); the stream ends with
  ``data: [DONE]\\n\\n``. The constant part of a content chunk is encoded once per request, so a
  piece costs one ``json.dumps`` of its text.
- :func:`sse_error`: the event that reports a failure after the stream started (OpenAI SDKs
  raise on a ``data`` object carrying ``error``); the stream then closes without ``[DONE]``.

Every response carries usage (``prompt_tokens_details.cached_tokens`` included) and a
``kvroute`` object (:func:`kvroute_info`); a stream carries both on its last chunk: the usage
chunk when ``stream_options.include_usage`` asked for it, else the chunk with ``finish_reason``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .errors import ApiError
from .turns import Finished

DONE: bytes = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(fin: Finished) -> dict[str, Any]:
    """OpenAI's usage object from the worker's stats."""
    s = fin.result.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }


def kvroute_info(fin: Finished) -> dict[str, Any]:
    """What kvroute adds to every response: the session, its worker and how the cache served."""
    s = fin.result.stats
    return {
        "session": fin.route.session_id,
        "affinity": str(fin.route.via),
        "worker": s.worker,
        "path": str(s.path),
        "cold_reason": None if s.cold_reason is None else str(s.cold_reason),
        "cached_tokens": s.cached_tokens,
        "prefill_tokens": s.prefill_tokens,
        "ttft_ms": s.ttft_ms,
        "decode_ms": s.decode_ms,
    }


def completion(cid: str, model: str, fin: Finished, created: int | None = None) -> bytes:
    """The JSON body of a non-streamed chat completion."""
    body = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": fin.reply, "refusal": None},
                "logprobs": None,
                "finish_reason": fin.finish_reason,
            }
        ],
        "usage": usage(fin),
        "system_fingerprint": None,
        "kvroute": kvroute_info(fin),
    }
    return _dumps(body).encode()


def sse_error(err: ApiError) -> bytes:
    """The SSE event reporting a failure mid-stream."""
    return b"data: " + _dumps(err.body()).encode() + b"\n\n"


class ChunkEncoder:
    """The SSE events of one streamed completion.

    Parameters
    ----------
    cid, model
        The completion id and model name every chunk repeats.
    include_usage
        ``stream_options.include_usage``: every chunk has ``"usage": null`` and a last chunk
        with empty ``choices`` carries the usage.
    created
        Unix time of the request (now if None).
    """

    def __init__(
        self, cid: str, model: str, include_usage: bool, created: int | None = None
    ) -> None:
        self.include_usage = include_usage
        self._base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()) if created is None else created,
            "model": model,
            "system_fingerprint": None,
        }
        head = _dumps(self._base)[:-1]  # the object without its closing brace
        choice = f'data: {head},"choices":[{{"index":0,"delta":{{'
        self._head = f'{choice}"content":'.encode()
        self._first_head = f'{choice}"role":"assistant","content":'.encode()
        usage_null = ',"usage":null' if include_usage else ""
        self._tail = f'}},"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'.encode()

    def content(self, text: str) -> bytes:
        """A chunk carrying reply text."""
        return self._head + json.dumps(text).encode() + self._tail

    def first(self, text: str) -> bytes:
        """The first chunk: OpenAI's opens with the role (and the first text here)."""
        return self._first_head + json.dumps(text).encode() + self._tail

    def end(self, fin: Finished) -> bytes:
        """The finish chunk, the usage chunk if asked for, and ``[DONE]``."""
        info = kvroute_info(fin)
        if not self.include_usage:
            return self._event({}, fin.finish_reason, kvroute=info) + DONE
        last = {**self._base, "choices": [], "usage": usage(fin), "kvroute": info}
        usage_event = b"data: " + _dumps(last).encode() + b"\n\n"
        return self._event({}, fin.finish_reason) + usage_event + DONE

    def _event(self, delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        chunk = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return b"data: " + _dumps(chunk).encode() + b"\n\n"
