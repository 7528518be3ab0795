"""``kvroute generate``, ``kvroute tokenize`` and ``kvroute model path`` through click's runner.

Most tests use the tiny model (loading it takes milliseconds). The real-model tests check the
command end to end against llama.cpp: one loads the model through the CLI as a user would, the
other reuses the session's engine to check the chat-template path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from kvroute.cli import generate_cmd, main
from kvroute.engine import quant
from kvroute.engine.engine import Engine
from kvroute.engine.model_store import DEFAULT_MODEL_NAME

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "llamacpp_cases.json").read_text()
)["cases"]
CLEAR_MARGIN = 0.5  # as in test_engine: below it llama.cpp's own choice is a near-tie
REAL_CASE = 2  # its first 17 greedy steps are clear, so all 8 generated ids are comparable


def clear_prefix(case: dict[str, Any]) -> int:
    """Number of leading greedy steps whose llama.cpp top-1/top-2 margin is at least 0.5."""
    margins = [step["margin_top1_top2"] for step in case["steps"]]
    return next((i for i, m in enumerate(margins) if m < CLEAR_MARGIN), len(margins))


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``kvroute ARGS`` in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(main, list(args), env=env)


def generate_json(model: Path, *args: str) -> dict[str, Any]:
    """``kvroute generate --model MODEL --json ARGS``, parsed; fails the test on a non-zero exit."""
    result = invoke("generate", "--model", str(model), "--json", *args)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "--json prints exactly one object"
    return json.loads(lines[0])


def test_generate_json_fields_and_top_logits(tiny_model_path: Path, tiny_engine: Engine) -> None:
    out = generate_json(
        tiny_model_path, "--prompt", "hi", "--max-tokens", "6", "--ignore-eos", "--top-logits", "5"
    )
    assert set(out) == {"prompt_ids", "kernels", "token_ids", "text", "finish_reason", "top_logits"}
    # Without --raw the prompt is one user message rendered with the model's template.
    expected_prompt = tiny_engine.encode(tiny_engine.render([{"role": "user", "content": "hi"}]))
    assert out["prompt_ids"] == expected_prompt
    assert len(out["token_ids"]) == 6
    assert out["finish_reason"] == "length"
    assert out["text"] == tiny_engine.tokenizer.decode(out["token_ids"])

    top = out["top_logits"]
    assert len(top) == 5 and all(isinstance(i, int) and isinstance(v, float) for i, v in top)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert top[0][0] == out["token_ids"][0]  # greedy picks the best first logit
    logits = tiny_engine.prefill(tiny_engine.new_cache(), expected_prompt)
    np.testing.assert_allclose([v for _, v in top], logits[[i for i, _ in top]], atol=1e-4)
    assert {i for i, _ in top} == set(np.argsort(-logits)[:5].tolist())


def test_generate_without_top_logits_has_no_such_field(tiny_model_path: Path) -> None:
    out = generate_json(tiny_model_path, "--prompt", "hi", "--max-tokens", "2")
    assert "top_logits" not in out


def test_raw_prompt_is_tokenized_verbatim(tiny_model_path: Path, tiny_engine: Engine) -> None:
    prompt = "<|im_start|>user\nthe hat<|im_end|>\n"
    out = generate_json(tiny_model_path, "--raw", "--prompt", prompt, "--max-tokens", "2")
    tokenized = invoke("tokenize", "--model", str(tiny_model_path), "--json", prompt)
    assert tokenized.exit_code == 0, tokenized.stderr
    assert out["prompt_ids"] == json.loads(tokenized.stdout)
    assert out["prompt_ids"] == tiny_engine.encode(prompt)
    # Special tokens parsed, nothing prepended (<|im_start|> is id 1, also the BOS).
    assert out["prompt_ids"][0] == 1 and out["prompt_ids"].count(1) == 1
    assert out["prompt_ids"][-2:] == tiny_engine.encode("<|im_end|>\n")


def test_text_output_matches_json_text(tiny_model_path: Path) -> None:
    args = ["--model", str(tiny_model_path), "--prompt", "hi", "--max-tokens", "5"]
    as_json = generate_json(tiny_model_path, *args[2:])
    text = invoke("generate", *args)
    assert text.exit_code == 0, text.stderr
    assert text.stdout == as_json["text"] + "\n"


def test_prompt_file_equals_prompt(tiny_model_path: Path, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the hat on the mat", encoding="utf-8")
    from_file = generate_json(
        tiny_model_path, "--prompt-file", str(prompt_file), "--max-tokens", "8"
    )
    inline = generate_json(tiny_model_path, "--prompt", "the hat on the mat", "--max-tokens", "8")
    positional = generate_json(tiny_model_path, "the hat on the mat", "--max-tokens", "8")
    assert from_file == inline == positional


@pytest.mark.parametrize(
    "prompt_args",
    [[], ["--prompt", "a", "--prompt-file", __file__], ["a", "--prompt", "b"]],
)
def test_exactly_one_prompt_source_is_required(
    tiny_model_path: Path, prompt_args: list[str]
) -> None:
    result = invoke("generate", "--model", str(tiny_model_path), *prompt_args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()  # one line, no usage block
    assert "give the text exactly once: PROMPT, --prompt or --prompt-file" in line


def test_seeded_sampling_is_reproducible(tiny_model_path: Path) -> None:
    def sample(seed: str) -> list[int]:
        args = ["--prompt", "hi", "--max-tokens", "12", "--ignore-eos", "--temperature", "2"]
        return generate_json(tiny_model_path, *args, "--seed", seed)["token_ids"]

    assert sample("5") == sample("5")
    assert sample("5") != sample("6")


def test_tokenize_json_and_plain(tiny_model_path: Path, tiny_engine: Engine) -> None:
    text = "<|im_start|>the hat"
    expected = tiny_engine.encode(text)
    as_json = invoke("tokenize", "--model", str(tiny_model_path), "--json", text)
    plain = invoke("tokenize", "--model", str(tiny_model_path), text)
    assert as_json.exit_code == plain.exit_code == 0
    assert json.loads(as_json.stdout) == expected
    assert plain.stdout == " ".join(map(str, expected)) + "\n"
    as_option = invoke("tokenize", "--model", str(tiny_model_path), "--text", text)
    assert as_option.exit_code == 0 and as_option.stdout == plain.stdout
    both = invoke("tokenize", "--model", str(tiny_model_path), "--text", text, text)
    assert both.exit_code == 2 and "exactly once: TEXT, --text" in both.stderr


def _commands(group: click.Group, path: str = "kvroute") -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, cmd in sorted(group.commands.items()):
        out.append((f"{path} {name}", cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, f"{path} {name}")
    return out


@pytest.mark.parametrize(("path", "cmd"), _commands(main), ids=lambda v: str(v).split()[-1])
def test_every_option_has_help_and_shows_its_default(path: str, cmd: click.Command) -> None:
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name in ("help", "version"):
            continue
        assert p.help, f"{path} {p.opts[0]} has no help text"
        default = p.default
        unset = default is None or type(default).__module__.startswith("click")  # no default
        if not unset and not p.is_flag and not p.count:
            assert p.show_default, f"{path} {p.opts[0]} hides its default {default!r}"


@pytest.mark.parametrize("args", [["-v", "tokenize"], ["tokenize", "-v"], ["tokenize", "-vv"]])
def test_verbose_before_or_after_the_command(args: list[str], tiny_model_path: Path) -> None:
    import logging

    root = logging.getLogger()
    before = root.level
    try:
        result = invoke(*args, "--model", str(tiny_model_path), "hi")
        assert result.exit_code == 0, result.stderr
        want = logging.DEBUG if "-vv" in args else logging.INFO
        assert root.level == want
    finally:
        root.setLevel(before)


def test_model_path_honours_kvroute_home(tmp_path: Path) -> None:
    result = invoke("model", "path", env={"KVROUTE_HOME": str(tmp_path)})
    assert result.exit_code == 0
    assert result.stdout.strip() == str(tmp_path / "models" / DEFAULT_MODEL_NAME)
    assert not (tmp_path / "models").exists(), "`model path` must not fetch"


@pytest.mark.model
def test_real_model_raw_greedy_matches_llamacpp(model_path: Path) -> None:
    case = CASES[REAL_CASE]
    n = min(8, clear_prefix(case))
    assert n == 8, "the chosen case must make all 8 generated ids comparable"
    out = generate_json(
        model_path,
        "--raw",
        "--prompt",
        case["prompt"],
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--top-logits",
        "5",
    )
    assert out["prompt_ids"] == case["prompt_ids"]
    assert out["token_ids"][:n] == case["greedy_ids"][:n]
    assert out["finish_reason"] == "length"
    assert {i for i, _ in out["top_logits"]} == {i for i, _ in case["first_top5"]}


@pytest.mark.model
def test_real_model_chat_template_prompt_matches_llamacpp(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The conformance prompts are ChatML with SmolLM2's default system prompt: exactly what the
    # CLI renders for one user message. The session engine stands in for a second 4 s load.
    monkeypatch.setattr(generate_cmd.Engine, "load", lambda *_a, **_k: engine)
    case = CASES[REAL_CASE]
    out = generate_json(Path(__file__), "--prompt", case["question"], "--max-tokens", "4")
    assert out["prompt_ids"] == case["prompt_ids"]
    assert out["token_ids"] == case["greedy_ids"][:4]


def test_kernels_option_picks_the_products_and_keeps_greedy_output(tiny_model_path: Path) -> None:
    """``--kernels`` reaches the engine (what runs where the CPU lacks an instruction set is
    `quant.mode`'s choice); off and exact give the same greedy tokens."""
    args = ("--prompt", "hi", "--max-tokens", "8", "--ignore-eos")
    outs = {k: generate_json(tiny_model_path, *args, "--kernels", k) for k in quant.ASKS}
    for k, out in outs.items():
        assert out["kernels"] == (quant.mode(k) or "off")
    assert outs["exact"]["token_ids"] == outs["off"]["token_ids"] == outs["auto"]["token_ids"]
    assert len(outs["int8"]["token_ids"]) == 8
    bad = invoke("generate", "--model", str(tiny_model_path), "--kernels", "fast", *args)
    assert bad.exit_code == 2 and "fast" in bad.output
