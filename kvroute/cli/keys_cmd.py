"""``kvroute keys generate DIR``: CURVE key pairs for the broker, its workers and its clients.

Each pair is two files written by pyzmq (``zmq.auth.create_certificates``): ``NAME.key``, the
public certificate, and ``NAME.key_secret``, which also holds the secret key and is made
readable by its owner only. The broker lets in every ``*.key`` of its ``--allow-keys``
directory, so the directory written here can serve as that directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import zmq.auth

from .app import echo_err, user_errors

DEFAULT_NAMES: tuple[str, ...] = ("server", "client", "worker")


def _check_name(name: str) -> str:
    if not name or name.startswith(".") or os.sep in name or (os.altsep or os.sep) in name:
        raise click.BadParameter(f"{name!r} is not a plain file name", param_hint="--name")
    return name


def write_key_pairs(directory: Path, names: tuple[str, ...], force: bool) -> list[Path]:
    """Write a key pair per name into ``directory`` (created if missing, owner-only).

    Returns the public certificate paths. Raises ``FileExistsError`` if a file exists and
    ``force`` is not set (nothing is written then), ``OSError`` if the directory is unusable.
    """
    targets = [directory / f"{n}{ext}" for n in names for ext in (".key", ".key_secret")]
    clash = [t for t in targets if t.exists()]
    if clash and not force:
        raise FileExistsError(f"{clash[0]} exists (use --force to replace it)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    # Owner-only from the first byte: chmod after writing would leave a moment of exposure.
    old_umask = os.umask(0o077)
    try:
        for name in names:
            public, _ = zmq.auth.create_certificates(directory, name)
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
    "--name",
    "names",
    multiple=True,
    help="Key pair to write (repeatable). Default: server, client and worker.",
)
@click.option("--force", is_flag=True, help="Replace key files that exist.")
def generate(directory: Path, names: tuple[str, ...], force: bool) -> None:
    """Write NAME.key (public) and NAME.key_secret (secret) into DIRECTORY for each name."""
    chosen = tuple(_check_name(n) for n in names) or DEFAULT_NAMES
    with user_errors(OSError):
        for public in write_key_pairs(directory, chosen, force):
            click.echo(f"wrote {public} and {public}_secret")
    if chosen == DEFAULT_NAMES:
        d = directory
        echo_err(
            "every *.key in the --allow-keys directory is let in (clients and workers):\n"
            f"  kvroute serve (or broker) --curve-secret {d}/server.key_secret --allow-keys {d}\n"
            f"  kvroute chat --server-key {d}/server.key --key {d}/client.key_secret\n"
            f"  kvroute worker --server-key {d}/server.key --key {d}/worker.key_secret"
        )
