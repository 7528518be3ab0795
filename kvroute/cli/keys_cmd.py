"""``kvroute keys generate DIR``: CURVE key pairs for the broker, its clients and its workers.

Each pair is two files written by pyzmq (``zmq.auth.create_certificates``): ``NAME.key``, the
public certificate, and ``NAME.key_secret``, which also holds the secret key and is made
readable by its owner only. The layout keeps clients and workers apart, because the broker
lets them in from separate directories (a client key must never open the workers' socket)::

    DIR/server.key, DIR/server.key_secret      the broker's pair (--curve-secret)
    DIR/clients/NAME.key(_secret)              --allow-keys DIR/clients
    DIR/workers/NAME.key(_secret)              --allow-worker-keys DIR/workers
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import zmq.auth

from .app import echo_err, user_errors

CLIENTS_DIR = "clients"
WORKERS_DIR = "workers"
DEFAULT_LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("server",)),
    (CLIENTS_DIR, ("client",)),
    (WORKERS_DIR, ("worker",)),
)
"""(subdirectory, names) written when no name is given."""


def _check_name(name: str, option: str) -> str:
    if not name or name.startswith(".") or os.sep in name or (os.altsep or os.sep) in name:
        raise click.BadParameter(f"{name!r} is not a plain file name", param_hint=option)
    return name


def write_layout(
    directory: Path, layout: tuple[tuple[str, tuple[str, ...]], ...], force: bool
) -> list[Path]:
    """Write key pairs into subdirectories of ``directory``: ``layout`` pairs a subdirectory
    ("" for ``directory`` itself) with the names to write there.

    Every file is checked before any is written: with a clash and no ``force``, raises
    ``FileExistsError`` and writes nothing. Returns the public certificate paths.
    """
    targets = [
        directory / sub / f"{n}{ext}"
        for sub, names in layout
        for n in names
        for ext in (".key", ".key_secret")
    ]
    clash = [t for t in targets if t.exists()]
    if clash and not force:
        raise FileExistsError(f"{clash[0]} exists (use --force to replace it)")
    written = []
    # Owner-only from the first byte: chmod after writing would leave a moment of exposure.
    old_umask = os.umask(0o077)
    try:
        for sub, names in layout:
            d = directory / sub
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in names:
                public, _ = zmq.auth.create_certificates(d, name)
                written.append(Path(public))
    finally:
        os.umask(old_umask)
    for p in written:
        p.chmod(0o644)  # public certificates are meant to be copied around
    return written


@click.group()
def keys() -> None:
    """CURVE keys: let only known clients and workers talk to a broker."""


@keys.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME",
    help=f"A client key pair to write into DIRECTORY/{CLIENTS_DIR} (repeatable).",
)
@click.option(
    "--worker",
    "workers",
    multiple=True,
    metavar="NAME",
    help=f"A worker key pair to write into DIRECTORY/{WORKERS_DIR} (repeatable).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="NAME",
    help="A key pair to write into DIRECTORY itself, e.g. another broker's (repeatable).",
)
@click.option("--force", is_flag=True, help="Replace key files that exist.")
def generate(
    directory: Path,
    clients: tuple[str, ...],
    workers: tuple[str, ...],
    names: tuple[str, ...],
    force: bool,
) -> None:
    """Write NAME.key (public) and NAME.key_secret (secret) for each pair.

    With no name given: DIRECTORY/server, DIRECTORY/clients/client, DIRECTORY/workers/worker.
    """
    layout = tuple(
        (sub, tuple(_check_name(n, option) for n in chosen))
        for sub, chosen, option in (
            ("", names, "--name"),
            (CLIENTS_DIR, clients, "--client"),
            (WORKERS_DIR, workers, "--worker"),
        )
        if chosen
    )
    layout = layout or DEFAULT_LAYOUT
    with user_errors(OSError):
        for public in write_layout(directory, layout, force):
            click.echo(f"wrote {public} and {public}_secret")
    if layout == DEFAULT_LAYOUT:
        d, c, w = directory, directory / CLIENTS_DIR, directory / WORKERS_DIR
        echo_err(
            "clients and workers are let in from separate directories:\n"
            f"  kvroute broker --curve-secret {d}/server.key_secret --allow-keys {c}"
            f" --allow-worker-keys {w}\n"
            f"  kvroute worker --server-key {d}/server.key --key {w}/worker.key_secret\n"
            f"  kvroute chat --server-key {d}/server.key --key {c}/client.key_secret\n"
            f"(kvroute serve --curve-secret {d}/server.key_secret --allow-keys {c}"
            " lets its own workers in by itself)"
        )
