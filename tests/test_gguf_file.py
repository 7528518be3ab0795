"""Bad model files and oversized prompts: one-line errors naming the file or the numbers.

Each bad file is checked twice: through the library (`Engine.load` raises `ModelLoadError`) and
through the command line (`kvroute generate --model BAD` exits 1 with one ``error: ...`` line on
stderr and no traceback). One case runs the installed console script in a subprocess, so the
check covers what a user really sees, not only what click's test runner captures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute.cli import main
from kvroute.engine.engine import Engine
from kvroute.engine.errors import ModelLoadError
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.model_store import resolve_model

MISSING_TENSOR = "blk.1.ffn_down.weight"


def write_random_bytes(path: Path, tiny: Path) -> None:
    """Noise that does not start with the GGUF magic."""
    path.write_bytes(b"NOPE" + np.random.default_rng(0).bytes(4096))


def write_bad_magic_header(path: Path, tiny: Path) -> None:
    """The right magic followed by noise: the GGUF parser itself must fail cleanly."""
    path.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))


def truncated_at(fraction: float) -> Callable[[Path, Path], None]:
    """A writer copying the first ``fraction`` of the tiny model."""

    def write(path: Path, tiny: Path) -> None:
        data = tiny.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return write


def write_spec(**changes: Any) -> Callable[[Path, Path], None]:
    """A writer producing the tiny model with some `TinySpec` fields changed."""

    def write(path: Path, tiny: Path) -> None:
        write_tiny_gguf(path, TinySpec(**changes))

    return write


def write_missing_tensor(path: Path, tiny: Path) -> None:
    """The tiny model without one of its tensors."""

    class DroppingWriter(gguf.GGUFWriter):
        def add_tensor(self, name: str, *args: Any, **kwargs: Any) -> None:
            if name != MISSING_TENSOR:
                super().add_tensor(name, *args, **kwargs)

    # write_tiny_gguf looks `gguf.GGUFWriter` up when called: swap it for the duration.
    original = gguf.GGUFWriter
    gguf.GGUFWriter = DroppingWriter
    try:
        write_tiny_gguf(path)
    finally:
        gguf.GGUFWriter = original


def write_nothing(path: Path, tiny: Path) -> None:
    """Leave the path absent."""


# (id, writer, a fragment the message must contain besides the path)
BAD_FILES: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("missing-file", write_nothing, "no such model file"),
    ("random-bytes", write_random_bytes, "not a GGUF file"),
    ("gguf-magic-then-noise", write_bad_magic_header, "GGUF"),
    ("empty-file", truncated_at(0.0), "not a GGUF file"),
    ("truncated-header", truncated_at(0.002), "GGUF"),
    ("truncated-metadata", truncated_at(0.02), "GGUF"),
    ("truncated-tensors", truncated_at(0.5), "GGUF"),
    ("truncated-last-byte", truncated_at(0.99999), "GGUF"),
    ("unknown-architecture", write_spec(architecture="gpt2"), "unsupported architecture 'gpt2'"),
    ("no-tokenizer", write_spec(with_tokenizer=False), "tokenizer"),
    ("missing-tensor", write_missing_tensor, MISSING_TENSOR),
    ("inconsistent-heads", write_spec(n_kv_heads=3), "heads"),
]


@pytest.fixture(params=BAD_FILES, ids=[b[0] for b in BAD_FILES])
def bad_file(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model_path: Path
) -> tuple[Path, str]:
    """A bad model file (or an absent path) and the fragment its error message must contain."""
    _, writer, fragment = request.param
    path = tmp_path / "bad.gguf"
    writer(path, tiny_model_path)
    return path, fragment


def assert_one_line_naming(message: str, path: Path, fragment: str) -> None:
    """The message is one line, names the file, and says what is wrong."""
    assert "\n" not in message.strip(), message
    assert str(path) in message, message
    assert fragment in message, message


def test_engine_load_raises_model_load_error(bad_file: tuple[Path, str]) -> None:
    path, fragment = bad_file
    with pytest.raises(ModelLoadError) as info:
        Engine.load(path)
    assert_one_line_naming(str(info.value), path, fragment)


def test_cli_generate_reports_one_line_error(bad_file: tuple[Path, str]) -> None:
    path, fragment = bad_file
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    # A SystemExit from `user_errors` is the expected way out; anything else escaped it.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert_one_line_naming(result.stderr, path, fragment)


def test_cli_tokenize_reports_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    write_random_bytes(path, path)
    result = CliRunner().invoke(main, ["tokenize", "--model", str(path), "hi"])
    assert result.exit_code == 1
    assert_one_line_naming(result.stderr, path, "not a GGUF file")


def kvroute_command() -> list[str]:
    """The installed ``kvroute`` console script, or the same entry point through the interpreter."""
    script = Path(sys.executable).with_name("kvroute")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from kvroute.cli import main; main()"]


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    write_random_bytes(path, path)
    proc = subprocess.run(
        [*kvroute_command(), "generate", "--model", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(path) in lines[0]


def test_prompt_longer_than_context_reports_the_numbers(tiny_model_path: Path) -> None:
    prompt = "hello world " * 20
    args = ["generate", "--model", str(tiny_model_path), "--ctx", "64", "--max-tokens", "8"]
    result = CliRunner().invoke(main, [*args, "--raw", "--prompt", prompt])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    n_prompt = len(Engine.load(tiny_model_path).encode(prompt))
    assert n_prompt > 64
    assert result.stderr.strip() == (
        f"error: prompt of {n_prompt} tokens + max_tokens 8 exceeds the context of 64 tokens"
    )


def test_prompt_fitting_but_max_tokens_overflowing_reports_the_numbers(
    tiny_model_path: Path,
) -> None:
    prompt = "hello world " * 3  # fits in 64, but not with 60 tokens to generate
    args = ["generate", "--model", str(tiny_model_path), "--ctx", "64", "--max-tokens", "60"]
    result = CliRunner().invoke(main, [*args, "--raw", "--prompt", prompt])
    assert result.exit_code == 1
    n_prompt = len(Engine.load(tiny_model_path).encode(prompt))
    assert f"prompt of {n_prompt} tokens + max_tokens 60" in result.stderr
    assert "context of 64 tokens" in result.stderr


def test_empty_raw_prompt_is_a_one_line_error(tiny_model_path: Path) -> None:
    args = ["generate", "--model", str(tiny_model_path), "--raw", "--prompt", ""]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == "error: empty prompt: there is no token to generate from"


def test_missing_model_path_is_rejected_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(path))
    assert_one_line_naming(str(info.value), path, "no such model file")


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        GGUFFile(tmp_path)
    assert_one_line_naming(str(info.value), tmp_path, "no such model file")


def test_good_file_loads(tiny_model_path: Path) -> None:
    """Control for the cases above: the unmodified tiny model is accepted."""
    f = GGUFFile(tiny_model_path)
    assert f.architecture == "llama"
    assert f.require("llama.block_count") == 2
    embed = f.tensor("token_embd.weight")
    assert embed.dtype == np.float32
    assert embed.shape == (len(f.require("tokenizer.ggml.tokens")), 64)
    with pytest.raises(ModelLoadError, match=r"missing metadata no\.such\.key"):
        f.require("no.such.key")
