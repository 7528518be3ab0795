"""What the simulated users say: a built-in multi-turn prompt set, or conversations from JSONL.

A :class:`Script` is one session's conversation: an optional system prompt and the user turns,
in order; the replies come from the service. The built-in set has topics, each a coherent chain of
follow-ups, plus generic follow-ups ("give an example") that fit any topic. A session's script is
drawn from them by a per-session ``random.Random`` seeded with a string built from ``--seed``
and the session index, so the same seed gives the same scripts on any machine and Python version
(string seeds are hashed with SHA-512, not with the per-process ``hash``), and adding warm-up
sessions or sessions does not change the earlier ones.

A JSONL file holds one conversation per line: ``{"system"?: str, "turns": [str, ...]}``; blank
lines are skipped. Session ``i`` plays conversation ``i mod n`` in file order, up to ``--turns``
of its turns.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPTS: tuple[str | None, ...] = (
    None,  # the model's default system prompt
    "You are a concise assistant. Answer in a few sentences.",
    "You are a friendly tutor who explains things step by step.",
    "You are an experienced engineer. Be practical and precise.",
)

TOPICS: dict[str, tuple[str, ...]] = {
    "travel": (
        "I am planning a week-long trip to Portugal next spring. Which cities would you suggest "
        "for someone who likes history, food and walking?",
        "Lisbon sounds great. Which neighbourhoods there are worth exploring on foot?",
        "How many days should I spend in Porto if I also want a day trip to the Douro valley?",
        "What is the best way to travel between Lisbon and Porto: train, bus or a rental car?",
        "Could you suggest a quiet beach town within two hours of Lisbon for the last two days?",
    ),
    "cooking": (
        "I want to learn to bake bread at home. What equipment do I really need to start?",
        "What is the difference between using fresh yeast, dry yeast and a sourdough starter?",
        "My first loaf came out dense and flat. What are the most likely reasons?",
        "How do I know when the dough has proofed enough before it goes into the oven?",
        "Can you give me a simple weekly schedule for keeping a sourdough starter alive?",
    ),
    "programming": (
        "I am writing a Python service that reads messages from a queue. How should I structure "
        "the code so that it is easy to test?",
        "Should I use threads or asyncio for a service that mostly waits on network sockets?",
        "How do I make sure the service shuts down cleanly when it receives SIGTERM?",
        "What is a good way to log errors so that I can find the cause of a failure later?",
        "How would you write a unit test for the part that retries failed messages?",
    ),
    "science": (
        "Why is the sky blue during the day but red and orange at sunset?",
        "Does the same effect explain why distant mountains look bluish?",
        "Why do clouds look white while the sky around them is blue?",
        "What would the sky look like from the surface of Mars, and why?",
        "How do astronomers correct for the atmosphere when they take pictures of stars?",
    ),
    "history": (
        "What were the main causes of the fall of the Western Roman Empire?",
        "How important were economic problems compared to the military pressure on the borders?",
        "Why did the Eastern Roman Empire survive for almost a thousand years longer?",
        "Which Roman inventions or institutions still influence daily life in Europe today?",
        "Can you recommend two readable books about the late Roman period for a beginner?",
    ),
    "fitness": (
        "I am thirty-five and want to start running. How should I plan my first month?",
        "How many times a week should a beginner run to improve without getting injured?",
        "What should I eat before and after a morning run of about forty minutes?",
        "My knees hurt a little after running on concrete. What can I change?",
        "How do I prepare for my first ten kilometre race in three months?",
    ),
    "finance": (
        "What is the difference between saving money in a bank account and investing it in an "
        "index fund?",
        "How large should an emergency fund be for a family with two children?",
        "What does compound interest mean, with a small example using round numbers?",
        "Is it better to pay off a student loan early or to invest the extra money?",
        "What are the most common mistakes people make with their first investments?",
    ),
    "music": (
        "I would like to learn to play the guitar as an adult. Acoustic or electric first?",
        "How long should I practise each day, and what should a practice session contain?",
        "What are the first five chords I should learn, and which songs use them?",
        "My fingertips hurt after playing. Is that normal and how long does it last?",
        "How can I learn to keep a steady rhythm when I play along with a song?",
    ),
}

FOLLOW_UPS: tuple[str, ...] = (
    "Can you give me a concrete example of that?",
    "Please summarise your last answer in two sentences.",
    "What would you say is the most common mistake here?",
    "Could you explain that more simply, as if to a twelve-year-old?",
    "What are the pros and cons of the approach you just described?",
    "Is there anything important you left out?",
    "How would the answer change if I only had half the time or budget?",
    "Which part of that should I focus on first, and why?",
    "Can you turn that into a short checklist?",
    "Where can I learn more about this on my own?",
    "Thanks. One more question: what do experts disagree about here?",
    "Let me check I understood: what is the single key idea?",
)

FOLLOW_UP_ODDS = 0.3
"""Chance that a turn is a generic follow-up rather than the topic's next question."""


class WorkloadError(ValueError):
    """A prompts file that cannot be used (missing, malformed line, wrong field types)."""


@dataclass(frozen=True, slots=True)
class Script:
    """One session's conversation: the system prompt (None: the model's default) and the user
    turns, sent in order."""

    system: str | None
    turns: tuple[str, ...]


def builtin_prompts() -> list[str]:
    """Every distinct user turn of the built-in set."""
    return [t for turns in TOPICS.values() for t in turns] + list(FOLLOW_UPS)


def builtin_script(seed: int, index: int, n_turns: int) -> Script:
    """The built-in conversation of session ``index`` for ``seed``: ``n_turns`` user turns.

    It opens a random topic and mostly walks through its questions in order, with generic
    follow-ups mixed in; when a topic is used up it moves on to another one ("Changing the
    subject: ..."), so any number of turns is possible; topic questions repeat only after all
    eight topics are used, follow-ups after all twelve.
    """
    rng = random.Random(f"kvroute-bench:{seed}:{index}")
    system = rng.choice(SYSTEM_PROMPTS)
    topics = list(TOPICS)
    rng.shuffle(topics)
    follow_ups = list(FOLLOW_UPS)
    rng.shuffle(follow_ups)
    turns: list[str] = []
    topic_i, question_i, follow_i = 0, 0, 0
    while len(turns) < n_turns:
        questions = TOPICS[topics[topic_i % len(topics)]]
        if question_i >= len(questions):
            topic_i, question_i = topic_i + 1, 0
            continue
        if question_i > 0 and rng.random() < FOLLOW_UP_ODDS:
            turns.append(follow_ups[follow_i % len(follow_ups)])
            follow_i += 1
            continue
        text = questions[question_i]
        if question_i == 0 and turns:
            text = f"Changing the subject: {text}"
        turns.append(text)
        question_i += 1
    return Script(system, tuple(turns))


def builtin_workload(seed: int, n_sessions: int, n_turns: int, first: int = 0) -> list[Script]:
    """Scripts of sessions ``first .. first + n_sessions - 1`` (see :func:`builtin_script`)."""
    return [builtin_script(seed, first + i, n_turns) for i in range(n_sessions)]


def load_jsonl(path: str | Path) -> list[Script]:
    """Read conversations from a JSONL file, one ``{"system"?: str, "turns": [str, ...]}`` a line.

    Raises
    ------
    WorkloadError
        The file cannot be read, holds no conversation, or a line is not valid JSON, is not an
        object, has unknown keys, or has ``turns`` that is not a non-empty list of non-empty
        strings (or a ``system`` that is not a string); the message names the line.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read prompts file {p}: {exc}") from exc
    scripts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            scripts.append(_parse_line(line, f"{p}:{n}"))
    if not scripts:
        raise WorkloadError(f"{p}: no conversations (expected one JSON object per line)")
    return scripts


def _parse_line(line: str, where: str) -> Script:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = set(obj) - {"system", "turns"}
    if unknown:
        # A typo ("turn", "sytem") must not silently become an empty or default field.
        raise WorkloadError(f"{where}: unknown keys {sorted(unknown)} (allowed: system, turns)")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise WorkloadError(f"{where}: 'turns' must be a non-empty list of strings")
    for i, t in enumerate(turns):
        if not isinstance(t, str) or not t.strip():
            raise WorkloadError(f"{where}: turns[{i}] must be a non-empty string")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise WorkloadError(f"{where}: 'system' must be a string")
    return Script(system, tuple(turns))


def file_workload(
    scripts: list[Script], n_sessions: int, n_turns: int, first: int = 0
) -> list[Script]:
    """Scripts of sessions ``first ..``: file conversations, cycled, cut to ``n_turns`` turns."""
    assert scripts, "load_jsonl never returns an empty list"
    chosen = (scripts[(first + i) % len(scripts)] for i in range(n_sessions))
    return [Script(s.system, s.turns[:n_turns]) for s in chosen]
