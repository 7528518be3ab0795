"""Saved conversations: what ``/save FILE`` writes and ``kvroute chat --resume FILE`` reads.

A JSON object, readable and editable by hand::

    {"format": "kvroute-chat", "version": 1, "saved_at": "2025-01-01T12:00:00+00:00",
     "settings": {"max_tokens": 256, "temperature": 0.0, ...},
     "messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, ...]}

Only ``messages`` is required; ``settings`` are the reply options in force when it was saved.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = "kvroute-chat"
VERSION = 1
_ROLES = ("system", "user", "assistant")


class ChatFileError(ValueError):
    """A file that cannot be read or written as a saved chat; the message is one line."""


@dataclass
class SavedChat:
    """A conversation on disk."""

    messages: list[dict[str, str]]
    settings: dict[str, Any] = field(default_factory=dict)


def save_chat(path: str | Path, chat: SavedChat) -> None:
    """Write ``chat`` to ``path`` atomically (a crash never leaves half a file).

    Raises
    ------
    ChatFileError
        The file cannot be written.
    """
    path = Path(path)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": chat.settings,
        "messages": chat.messages,
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise ChatFileError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ChatFileError(f"cannot save to {path}: {exc.strerror or exc}") from exc


def load_chat(path: str | Path) -> SavedChat:
    """Read a saved chat.

    Raises
    ------
    ChatFileError
        Missing or unreadable file, not JSON, or messages that are not role/content pairs.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ChatFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatFileError(f"{path} is not a saved chat (not JSON: {exc})") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("messages"), list):
        raise ChatFileError(f"{path} is not a saved chat (no 'messages' list)")
    messages = []
    for i, m in enumerate(doc["messages"]):
        ok = isinstance(m, Mapping) and m.get("role") in _ROLES
        if not ok or not isinstance(m.get("content"), str):
            raise ChatFileError(f"{path}: message {i} is not a {{'role', 'content'}} pair")
        messages.append({"role": m["role"], "content": m["content"]})
    settings = doc.get("settings")
    return SavedChat(messages, dict(settings) if isinstance(settings, Mapping) else {})
