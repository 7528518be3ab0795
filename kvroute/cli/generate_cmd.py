"""``kvroute generate`` and ``kvroute tokenize``: run the engine in-process, no service."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from kvroute.engine.engine import Engine, Generation
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.model_store import resolve_model
from kvroute.engine.sampling import SamplingParams
from kvroute.engine.tokenizer import Tokenizer

from .app import user_errors
from .options import max_tokens_option, model_option, model_options, sampling_options


def _one_text(positional: str | None, option: str | None, name: str, file: Path | None) -> str:
    """The text given exactly once: as the argument, as ``--NAME``, or (if any) in a file."""
    given = [v for v in (positional, option) if v is not None]
    forms = f"{name.upper()}, --{name}" + (f" or --{name}-file" if name == "prompt" else "")
    if len(given) + (file is not None) != 1:
        raise click.UsageError(f"give the text exactly once: {forms}")
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{name}-file") from None
    return given[0]


@click.command()
@model_options
@click.argument("text", metavar="[PROMPT]", required=False)
@click.option("--prompt", help="Prompt text, instead of PROMPT (one user message unless --raw).")
@click.option(
    "--prompt-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the prompt from a file.",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Feed the prompt verbatim: special tokens parsed, no template, no BOS.",
)
@max_tokens_option
@sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens.")
@click.option(
    "--top-logits",
    type=click.IntRange(min=1),
    help="With --json: K best [id, logit] at the first generated position.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def generate(
    model_kw: dict[str, Any],
    text: str | None,
    prompt: str | None,
    prompt_file: Path | None,
    raw: bool,
    max_tokens: int,
    sampling: dict[str, Any],
    ignore_eos: bool,
    top_logits: int | None,
    as_json: bool,
) -> None:
    """Generate a completion of PROMPT in-process (no broker or worker needed)."""
    text = _one_text(text, prompt, "prompt", prompt_file)
    with user_errors():
        engine = Engine.load(
            resolve_model(model_kw["model"]), n_ctx=model_kw["n_ctx"], kernels=model_kw["kernels"]
        )
        if raw:  # the user's own prompt text: control-token texts are control tokens
            ids = engine.encode(text)
        else:  # a message: its text is content, only the template's markers are control
            ids = engine.encode_prompt(engine.render_prompt([{"role": "user", "content": text}]))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **sampling)
        result = Generation(ids)
        for piece in engine.generate(ids, params, result=result):
            if not as_json:
                click.echo(piece.text, nl=False)
                sys.stdout.flush()
    if not as_json:
        click.echo()
        return
    out: dict[str, object] = {
        "prompt_ids": ids,
        "kernels": engine.kernels,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
    }
    if top_logits and result.first_logits is not None:
        lg = result.first_logits
        best = np.argsort(-lg, kind="stable")[:top_logits]
        out["top_logits"] = [[int(i), float(lg[i])] for i in best]
    click.echo(json.dumps(out, ensure_ascii=False))


@click.command()
@model_option
@click.argument("positional", metavar="[TEXT]", required=False)
@click.option("--text", default=None, help="The text, instead of TEXT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ids.")
def tokenize(model: str, positional: str | None, text: str | None, as_json: bool) -> None:
    """Print the token ids of TEXT (special tokens parsed, no BOS)."""
    text = _one_text(positional, text, "text", None)
    with user_errors():
        tok = Tokenizer.from_gguf(GGUFFile(resolve_model(model)))
        ids = tok.encode(text)
    click.echo(json.dumps(ids) if as_json else " ".join(map(str, ids)))
