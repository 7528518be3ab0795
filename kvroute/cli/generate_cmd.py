"""``kvroute generate`` and ``kvroute tokenize``: run the engine in-process, no service."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from kvroute.engine.engine import Engine, Generation
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.model_store import resolve_model
from kvroute.engine.sampling import SamplingParams
from kvroute.engine.tokenizer import Tokenizer

from .app import model_option, user_errors


@click.command()
@model_option
@click.option("--prompt", help="Prompt text (one user message unless --raw).")
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
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True)
)
@click.option("--seed", type=int, help="Sampler seed (only matters with --temperature > 0).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens.")
@click.option(
    "--top-logits",
    type=click.IntRange(min=1),
    help="With --json: K best [id, logit] at the first generated position.",
)
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context size (default 2048).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def generate(
    model: str,
    prompt: str | None,
    prompt_file: Path | None,
    raw: bool,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    ignore_eos: bool,
    top_logits: int | None,
    n_ctx: int | None,
    as_json: bool,
) -> None:
    """Generate a completion in-process (no broker or worker needed)."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-file")
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8")  # type: ignore[union-attr]
    with user_errors():
        engine = Engine.load(resolve_model(model), n_ctx=n_ctx)
        rendered = text if raw else engine.render([{"role": "user", "content": text}])
        ids = engine.encode(rendered)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
        )
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of ids.")
@click.argument("text")
def tokenize(model: str, as_json: bool, text: str) -> None:
    """Print the token ids of TEXT (special tokens parsed, no BOS)."""
    with user_errors():
        tok = Tokenizer.from_gguf(GGUFFile(resolve_model(model)))
        ids = tok.encode(text)
    click.echo(json.dumps(ids) if as_json else " ".join(map(str, ids)))
