"""The ``kvroute`` command line. One module per command (group); this file only assembles them.

Library code logs; only the CLI prints. Every command turns the library's typed errors into a
one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from .app import main
from .bench_cmd import bench
from .broker_cmd import broker
from .chat_cmd import chat
from .gateway_cmd import gateway
from .generate_cmd import generate, tokenize
from .keys_cmd import keys
from .model_cmd import model
from .serve_cmd import serve, worker
from .status_cmd import status

main.add_command(model)
main.add_command(broker)
main.add_command(generate)
main.add_command(tokenize)
main.add_command(serve)
main.add_command(worker)
main.add_command(chat)
main.add_command(bench)
main.add_command(keys)
main.add_command(gateway)
main.add_command(status)

__all__ = ["main"]
