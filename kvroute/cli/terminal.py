"""Terminal helpers for interactive commands: a spinner, erasing printed text, multi-line input.

Everything here degrades to plain output when the stream is not a terminal (a pipe, a file, a
test runner): no escape codes are ever written there.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

import click
from rich.cells import cell_len

ReadLine = Callable[[str], str]
"""Returns the next line without its newline; EOFError at the end, KeyboardInterrupt on Ctrl-C."""

CONTINUATION = "... "
BLOCK = '"""'


def is_tty(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or a stand-in without isatty
        return False


class Spinner:
    """A one-line activity indicator on ``stream`` (stderr by default), drawn only on a TTY.

    Call :meth:`tick` from the loop that waits (every ~0.1 s) and :meth:`clear` before printing
    anything else on that line.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_tty(self.stream)
        self._frame = 0
        self._shown = False

    def tick(self, text: str) -> None:
        """Draw the next frame followed by ``text``."""
        if not self.enabled:
            return
        frame = self.FRAMES[self._frame % len(self.FRAMES)]
        self._frame += 1
        self.stream.write("\r\033[K" + click.style(f"{frame} {text}", dim=True))
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Remove the spinner's line (nothing to do if it was never drawn)."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


@contextlib.contextmanager
def no_echo(stdin: TextIO | None = None) -> Iterator[None]:
    """While a reply streams, keys typed are not echoed into it (``^C`` included); they stay
    buffered as type-ahead for the next prompt. Ctrl-C still sends SIGINT. No-op off a TTY."""
    stdin = stdin if stdin is not None else sys.stdin
    if not is_tty(stdin):
        yield
        return
    import termios

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def rows(text: str, width: int) -> int:
    """Terminal rows that ``text``, printed from column 0, occupies with ``width`` columns."""
    width = max(width, 1)
    return sum(max(1, -(-cell_len(line) // width)) for line in text.split("\n"))


def erase(text: str, stream: TextIO | None = None) -> bool:
    """Erase ``text``, just printed from column 0 of a line, on a terminal.

    Returns False (nothing written) when ``stream`` is not a terminal: the caller then says in
    words what it would have erased. Text that scrolled off the screen cannot be erased; the
    visible part is.
    """
    stream = stream if stream is not None else sys.stdout
    if not is_tty(stream):
        return False
    size = shutil.get_terminal_size()
    up = min(rows(text, size.columns), size.lines) - 1
    stream.write("\r" + (f"\033[{up}A" if up > 0 else "") + "\033[J")
    stream.flush()
    return True


def line_reader(stdin: TextIO | None = None) -> ReadLine:
    """``input`` with line editing and history on a terminal; plain lines otherwise."""
    stdin = stdin if stdin is not None else sys.stdin
    if is_tty(stdin):
        # Imported for its side effect: input() gains line editing and history. Missing on
        # some platforms (Windows), where plain input() still works.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
        return input

    def read(prompt: str) -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


def read_message(read_line: ReadLine, prompt: str) -> str:
    """One message, possibly over several lines.

    - A line ending in ``\\`` continues on the next line (the backslash is dropped).
    - A line starting with ``\"\"\"`` opens a block that runs until a line ending with
      ``\"\"\"``: paste several paragraphs at once. Both markers are dropped.

    EOF inside a block or after a ``\\`` ends the message there; Ctrl-C (KeyboardInterrupt)
    propagates, and the partial message is dropped.
    """
    first = read_line(prompt)
    if first.lstrip().startswith(BLOCK):
        body = first.lstrip()[len(BLOCK) :]
        if body.rstrip().endswith(BLOCK):  # """one line"""
            return body.rstrip()[: -len(BLOCK)]
        lines = [body] if body else []
        while True:
            try:
                line = read_line(CONTINUATION)
            except EOFError:
                break
            if line.rstrip().endswith(BLOCK):
                tail = line.rstrip()[: -len(BLOCK)]
                if tail:
                    lines.append(tail)
                break
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line(CONTINUATION))
        except EOFError:
            break
    return "\n".join(lines)
