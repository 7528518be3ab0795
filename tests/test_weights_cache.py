"""The host's weights cache: one prepared copy per model, mapped read-only, never a bad one used.

Every test runs on the tiny synthetic model with the size threshold lowered to 0, in its own
cache directory. The reference is the same model prepared in memory (cache off): a model
mapped from the cache must give bit-identical logits, since it holds the very same arrays.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute.engine import gguf_file, quant, weights_cache
from kvroute.engine.engine import Engine
from kvroute.engine.errors import ModelLoadError
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.model_store import sha256_of, weights_dir
from kvroute.engine.models import open_metadata
from kvroute.engine.models.llama import LlamaModel
from kvroute.engine.models.llama_weights import form_for
from kvroute.engine.weights_cache import CacheConfig, CacheInvalid, Recipe

PROMPT = [5, 80, 81, 72, 79, 79, 82, 3, 100]


def model_arrays(model: LlamaModel) -> list[np.ndarray]:
    """Every weight array the model computes with."""
    arrays = [model.out_norm]
    for lin in model.matrices():
        arrays += [a for a in (lin.w, lin.gain) if a is not None]
        arrays += [lin.q.tiles] if lin.q is not None else []
    return arrays + ([model.embed] if model.embed is not None else [])


def logits(engine: Engine) -> np.ndarray:
    """All-position logits of a fixed prompt on a fresh cache."""
    return engine.forward([(engine.new_cache(), PROMPT)], all_logits=True)[0]


@pytest.fixture
def config(tmp_path: Path) -> CacheConfig:
    """Caching on, in a fresh directory, for models of any size."""
    return CacheConfig(directory=tmp_path / "weights", min_model_bytes=0)


@pytest.fixture(scope="module")
def reference(tiny_model_path: Path) -> np.ndarray:
    """Logits of the tiny model prepared in memory, no cache involved."""
    return logits(Engine.load(tiny_model_path, weights=CacheConfig(enabled=False)))


@pytest.fixture
def cache_file(tiny_model_path: Path, config: CacheConfig) -> Path:
    """Where the tiny model's prepared weights go in ``config``'s directory."""
    assert config.directory is not None
    return weights_cache.cache_file(
        config.directory, sha256_of(tiny_model_path), form_for(quant.mode())
    )


def preparations(caplog: pytest.LogCaptureFixture) -> int:
    """How many times weights were prepared (cache miss or rebuild) so far in this test."""
    return sum("preparing weights" in r.getMessage() for r in caplog.records)


def reasons(caplog: pytest.LogCaptureFixture) -> str:
    """Every warning the cache logged, joined."""
    return " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_second_load_maps_the_file_read_only_and_matches_memory(
    tiny_model_path: Path,
    config: CacheConfig,
    cache_file: Path,
    reference: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.engine.weights_cache")
    first = Engine.load(tiny_model_path, weights=config)
    second = Engine.load(tiny_model_path, weights=config)
    assert cache_file.is_file()
    assert preparations(caplog) == 1, "the second load must map, not prepare"
    for engine in (first, second):
        for arr in model_arrays(engine.model):
            # Pages of the one file, shared by every process that maps it, and never written.
            assert isinstance(arr, np.memmap) and Path(arr.filename) == cache_file
            assert not arr.flags.writeable
        np.testing.assert_array_equal(logits(engine), reference)
    # Metadata came from the cache: tokenizer and template behave the same.
    assert second.encode("hello there") == first.encode("hello there")
    msgs = [{"role": "user", "content": "hi"}]
    assert second.render(msgs) == first.render(msgs)


def test_a_cached_model_is_opened_without_parsing_the_gguf(
    tiny_model_path: Path, config: CacheConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = GGUFFile(tiny_model_path).meta
    expected = Engine.load(tiny_model_path, weights=config).encode("hello there")

    def no_parsing(*_: object, **__: object) -> None:
        raise AssertionError("the GGUF was parsed although the cache holds the model")

    monkeypatch.setattr(gguf_file.gguf, "GGUFReader", no_parsing)
    assert open_metadata(tiny_model_path, config).meta == parsed  # what Engine.check uses
    assert Engine.load(tiny_model_path, weights=config).encode("hello there") == expected


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of a file in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def corrupt_data(path: Path) -> None:
    flip_byte(path, weights_cache.ALIGN + 100)  # inside the first array


def corrupt_header(path: Path) -> None:
    flip_byte(path, path.stat().st_size - weights_cache._TRAILER.size - 20)


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def truncate_trailer(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(100_000))


def foreign(path: Path) -> None:
    """The valid cache file of another model, under this model's name."""
    other = write_tiny_gguf(path.parent / "other.gguf", TinySpec(seed=7))
    recipe = Recipe("x", {"general.architecture": "llama"}, [("a", np.ones(3, np.float32))])
    weights_cache.write(path, sha256_of(other), recipe)


def old_layout(path: Path) -> None:
    """A valid file for this model, but written with another layout."""
    sha = path.name.split(".")[0]  # <sha256>.<form>.kvw
    prepared = weights_cache.read(path, sha)
    recipe = Recipe("llama-f32-old", prepared.meta, list(prepared.arrays.items()))
    weights_cache.write(path, sha, recipe)


BREAKERS = {
    "data-bit-flip": (corrupt_data, "checksum"),
    "header-bit-flip": (corrupt_header, "header"),
    "truncated-half": (truncate_half, "partial"),
    "truncated-trailer": (truncate_trailer, "partial"),
    "empty": (empty, "cannot map"),
    "garbage": (garbage, "magic"),
    "foreign-model": (foreign, "another model"),
    "old-layout": (old_layout, "layout"),
}


@pytest.mark.parametrize("breaker", list(BREAKERS), ids=list(BREAKERS))
def test_bad_cache_file_is_rebuilt_never_used(
    tiny_model_path: Path,
    config: CacheConfig,
    cache_file: Path,
    reference: np.ndarray,
    caplog: pytest.LogCaptureFixture,
    breaker: str,
) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.engine.weights_cache")
    Engine.load(tiny_model_path, weights=config)
    breaker_fn, reason = BREAKERS[breaker]
    breaker_fn(cache_file)
    caplog.clear()
    engine = Engine.load(tiny_model_path, weights=config)
    assert preparations(caplog) == 1, "a bad file must be rebuilt"
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert reason in logged
    np.testing.assert_array_equal(logits(engine), reference)
    assert isinstance(engine.model.out_norm, np.memmap)  # the rebuilt file is mapped
    # The rebuilt file is whole again.
    weights_cache.read(cache_file, sha256_of(tiny_model_path))
    caplog.clear()
    Engine.load(tiny_model_path, weights=config)
    assert preparations(caplog) == 0


def test_read_rejects_what_it_cannot_trust(tmp_path: Path) -> None:
    path = tmp_path / "x.kvw"
    arr = np.arange(10, dtype=np.float32)
    weights_cache.write(path, "a" * 64, Recipe("l", {"k": [1, "v", 2.5, True]}, [("w", arr)]))
    got = weights_cache.read(path, "a" * 64)
    assert got.layout == "l" and got.meta == {"k": [1, "v", 2.5, True]}
    np.testing.assert_array_equal(got.arrays["w"], arr)
    with pytest.raises(CacheInvalid, match="another model"):
        weights_cache.read(path, "b" * 64)
    with pytest.raises(CacheInvalid, match="cannot map"):
        weights_cache.read(tmp_path / "missing.kvw", "a" * 64)


def test_failed_write_leaves_the_old_file_and_no_debris(tmp_path: Path) -> None:
    path = tmp_path / "m.kvw"
    weights_cache.write(path, "a" * 64, Recipe("l", {}, [("w", np.ones(4, np.float32))]))
    before = path.read_bytes()

    def arrays_then_failure() -> Iterator[tuple[str, np.ndarray]]:
        yield "w", np.zeros(4, np.float32)
        raise ModelLoadError("tensor missing halfway")

    with pytest.raises(ModelLoadError):
        weights_cache.write(path, "a" * 64, Recipe("l", {}, arrays_then_failure()))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.kvw"]


def test_a_rebuild_never_writes_into_a_mapped_file(
    tiny_model_path: Path, config: CacheConfig, cache_file: Path, reference: np.ndarray
) -> None:
    engine = Engine.load(tiny_model_path, weights=config)
    old_inode = cache_file.stat().st_ino
    old_layout(cache_file)  # forces a rebuild on the next load
    Engine.load(tiny_model_path, weights=config)
    # The new file was renamed over the old one; a worker still running on the old mapping
    # keeps its pages (writing in place would corrupt it, or kill it with SIGBUS on truncation).
    assert cache_file.stat().st_ino != old_inode
    np.testing.assert_array_equal(logits(engine), reference)


def test_concurrent_first_loads_prepare_once(
    tiny_model_path: Path,
    config: CacheConfig,
    reference: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.engine.weights_cache")
    engines: list[Engine] = []
    threads = [
        threading.Thread(
            target=lambda: engines.append(Engine.load(tiny_model_path, weights=config))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(engines) == 3
    assert preparations(caplog) == 1, "the lock lets one loader prepare, the others map"
    for engine in engines:
        assert isinstance(engine.model.out_norm, np.memmap)
        np.testing.assert_array_equal(logits(engine), reference)


def test_unwritable_directory_falls_back_to_memory(
    tiny_model_path: Path, tmp_path: Path, reference: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = CacheConfig(directory=blocker / "weights", min_model_bytes=0)
    engine = Engine.load(tiny_model_path, weights=config)
    assert "preparing in memory" in reasons(caplog)
    assert not isinstance(engine.model.out_norm, np.memmap)
    np.testing.assert_array_equal(logits(engine), reference)


def test_small_models_and_disabled_cache_write_nothing(
    tiny_model_path: Path, tmp_path: Path, reference: np.ndarray
) -> None:
    directory = tmp_path / "weights"
    size = tiny_model_path.stat().st_size
    for config in (
        CacheConfig(directory=directory, min_model_bytes=size + 1),
        CacheConfig(directory=directory, enabled=False, min_model_bytes=0),
    ):
        engine = Engine.load(tiny_model_path, weights=config)
        np.testing.assert_array_equal(logits(engine), reference)
        assert not isinstance(engine.model.out_norm, np.memmap)
    assert not directory.exists()


def test_untied_head_round_trips(tmp_path: Path, config: CacheConfig) -> None:
    path = write_tiny_gguf(tmp_path / "untied.gguf", TinySpec(tied=False))
    memory = Engine.load(path, weights=CacheConfig(enabled=False))
    Engine.load(path, weights=config)
    mapped = Engine.load(path, weights=config)
    assert isinstance(mapped.model.embed, np.memmap)
    np.testing.assert_array_equal(logits(mapped), logits(memory))


def test_bad_model_file_is_a_model_load_error_and_caches_nothing(
    tmp_path: Path, config: CacheConfig
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(5000))
    with pytest.raises(ModelLoadError):
        Engine.load(bad, weights=config)
    with pytest.raises(ModelLoadError, match="no such model file"):
        Engine.load(tmp_path / "missing.gguf", weights=config)
    assert config.directory is not None
    assert not list(config.directory.glob("*.kvw")) and not list(config.directory.glob("*.part"))


@pytest.mark.model
def test_real_model_engine_maps_the_default_cache(engine: Engine) -> None:
    for arr in model_arrays(engine.model):
        assert isinstance(arr, np.memmap) and Path(arr.filename).parent == weights_dir()


def test_model_path_names_the_weights_cache_on_stderr(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvroute.cli import main
    from kvroute.engine.model_store import DEFAULT_MODEL_SHA256

    env = {"KVROUTE_HOME": str(tmp_path)}
    expected = weights_cache.cache_file(
        tmp_path / "weights", DEFAULT_MODEL_SHA256, form_for(quant.mode())
    )
    before = CliRunner().invoke(main, ["model", "path"], env=env)
    assert before.exit_code == 0
    assert f"weights cache: {expected} (not built yet" in before.stderr
    expected.parent.mkdir(parents=True)
    expected.write_bytes(bytes(3 << 20))
    after = CliRunner().invoke(main, ["model", "path"], env=env)
    assert f"weights cache: {expected} (3 MiB)" in after.stderr
    assert after.stdout.strip() == before.stdout.strip()  # stdout stays the model path alone


def test_building_a_form_removes_the_file_of_earlier_versions(
    tiny_model_path: Path, config: CacheConfig, cache_file: Path
) -> None:
    assert config.directory is not None
    legacy = config.directory / f"{sha256_of(tiny_model_path)}{weights_cache.SUFFIX}"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"an old single-form cache file")
    Engine.load(tiny_model_path, weights=config)
    assert cache_file.is_file() and not legacy.exists()
