"""The fused attention kernels: float16 or float32 cache read as stored, float32 arithmetic.

They must compute the float64 attention of the widened cache (causal mask included) up to
float32 rounding, widen every float16 exactly (subnormals, zeros, infinities), never read past
the positions they are given, and leave the model's output as the numpy path computes it. With
the kernels off, or for a segment longer than they take, the numpy path runs instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute.engine.engine import Engine
from kvroute.engine.weights_cache import CacheConfig

try:
    from kvroute.engine.kernels import attention, ir
except ImportError:  # numba missing: only the numpy path runs
    attention = ir = None  # type: ignore[assignment]

needs_kernels = pytest.mark.skipif(
    ir is None or not ir.exact_supported(), reason="this CPU lacks AVX2/FMA/F16C"
)
DTYPES = (np.float16, np.float32)
# A segment longer than the kernels take for either dtype (always on the numpy path).
LONG = (max(attention.MAX_T.values()) if attention is not None else 0) + 4
RTOL, ATOL = 1e-5, 2e-5  # float32 rounding of scores, exponentials and sums


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, t_new: int) -> np.ndarray:
    """Float64 causal attention of q (KV, G*T, hd) over the widened k, v (KV, L, hd)."""
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    kv_heads, rows, _ = q.shape
    length = k.shape[1]
    out = np.empty(q.shape, np.float64)
    for h in range(kv_heads):
        for r in range(rows):
            seen = length - t_new + r % t_new + 1  # row g*T + t sees keys 0..L - T + t
            s = k64[h, :seen] @ q[h, r].astype(np.float64)
            p = np.exp(s - s.max())
            out[h, r] = (p / p.sum()) @ v64[h, :seen]
    return out


def cache_views(
    rng: np.random.Generator, dtype: type, kv_heads: int, length: int, hd: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (KV, L, hd) as views of a larger cache whose unused positions hold NaN,
    so that reading past ``length`` poisons the result."""
    shape = (kv_heads, length + 5, hd)
    k: np.ndarray = np.full(shape, np.nan, dtype)
    v: np.ndarray = np.full(shape, np.nan, dtype)
    k[:, :length] = rng.standard_normal((kv_heads, length, hd)) * scale
    v[:, :length] = rng.standard_normal((kv_heads, length, hd))
    return k[:, :length], v[:, :length]


SHAPES = [  # (KV heads, G, hd, L, T)
    (3, 3, 64, 1, 1),  # a single position
    (3, 3, 64, 700, 1),  # decode over a long context, SmolLM2's shape
    (2, 4, 32, 50, 2),
    (1, 8, 16, 33, 5),  # 40 rows: several passes of MAX_ROWS
    (2, 2, 128, 200, 16),  # the longest segment the model sends to the kernels
    (1, 1, 16, 7, 7),  # every position new: row t sees t + 1 keys
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kv_heads", "G", "hd", "length", "T"), SHAPES)
def test_kernel_computes_masked_attention(
    dtype: type, kv_heads: int, G: int, hd: int, length: int, T: int
) -> None:
    rng = np.random.default_rng(length * 31 + hd)
    k, v = cache_views(rng, dtype, kv_heads, length, hd, scale=2.0)
    q = rng.standard_normal((kv_heads, G * T, hd)).astype(np.float32)
    out = attention.attend(q, k, v, T)
    assert out.shape == q.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(q, k, v, T), rtol=RTOL, atol=ATOL)


@needs_kernels
def test_mask_hides_later_positions() -> None:
    """Row t of a 3-token segment must not see positions after its own: with a huge score
    there, any leak would take nearly all the weight."""
    rng = np.random.default_rng(1)
    k, v = cache_views(rng, np.float16, 1, 10, 16)
    k[0, 9] = 60.0  # the last new token's key: scores 60 * sum(q) for whoever sees it
    v[0, 9] = 100.0
    q = np.abs(rng.standard_normal((1, 2 * 3, 16))).astype(np.float32)
    out = attention.attend(q, k, v, 3)
    np.testing.assert_allclose(out, reference(q, k, v, 3), rtol=RTOL, atol=ATOL)
    for g in range(2):
        assert np.all(out[0, g * 3 : g * 3 + 2] < 10.0)  # tokens 0, 1 do not see position 9
        assert np.all(out[0, g * 3 + 2] > 99.0)  # token 2 does, and it dominates


@needs_kernels
def test_float16_values_are_widened_exactly() -> None:
    """All 65,536 float16 bit patterns as values at a single position (weight exactly 1): the
    output is the value widened exactly, NaN where it was NaN."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    v = bits.view(np.float16).reshape(2048, 1, 32)
    k = np.zeros_like(v)
    out = attention.attend(np.zeros((2048, 1, 32), np.float32), k, v, 1)
    want = v.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan], want[~nan])


@needs_kernels
def test_float16_keys_are_widened_exactly() -> None:
    """Subnormal, zero and extreme keys scaled by 2^20 through a one-hot query: flushing
    subnormals to zero or rounding them would move scores by up to 0.06."""
    subnormal = np.arange(1, 1 << 10, dtype=np.uint16)
    patterns = np.concatenate([subnormal, subnormal | 0x8000, [0, 0x8000, 0x0400, 0x8400]])
    k = np.zeros((1, len(patterns), 16), np.float16)
    k[0, :, 3] = patterns.astype(np.uint16).view(np.float16)
    v = np.random.default_rng(2).standard_normal(k.shape).astype(np.float16)
    q = np.zeros((1, 1, 16), np.float32)
    q[0, 0, 3] = 2.0**20
    np.testing.assert_allclose(
        attention.attend(q, k, v, 1), reference(q, k, v, 1), rtol=RTOL, atol=ATOL
    )
    big = np.full((1, 4, 16), 65504.0, np.float16)  # the largest float16: scores stay finite
    big[0, 1] = -65504.0
    q = np.full((1, 1, 16), 1e-6, np.float32)
    np.testing.assert_allclose(
        attention.attend(q, big, big, 1), reference(q, big, big, 1), rtol=RTOL, atol=ATOL
    )


@needs_kernels
def test_kernel_rejects_what_it_cannot_read() -> None:
    k = np.zeros((2, 8, 32), np.float16)
    q = np.zeros((2, 3, 32), np.float32)
    assert attention.supports(k) and not attention.supports(k[:, :, :16])
    assert not attention.supports(np.zeros((2, 8, 24), np.float32))  # hd not a multiple of 16
    assert not attention.supports(k.astype(np.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        attention.attend(q[:, :, :16], k[:, :, :16], k[:, :, :16], 1)
    with pytest.raises(ValueError, match="differ"):
        attention.attend(q, k, k.astype(np.float32), 1)
    with pytest.raises(ValueError, match="new tokens over"):
        attention.attend(q, k, k, 0)
    with pytest.raises(ValueError, match="do not fit"):
        attention.attend(q, k, k, 2)  # 3 rows are not G x 2 tokens


def prefill_and_decode(e: Engine, dtype: str) -> list[np.ndarray]:
    """Logits of every position of a prefill longer than the kernels take, a ragged batch of
    short segments, then decode steps."""
    caches = [e.new_cache(dtype) for _ in range(3)]
    long = [40 + i % 20 for i in range(LONG)]
    out = e.forward([(caches[0], long)], all_logits=True)
    out += e.forward([(caches[1], [5, 80, 81]), (caches[2], [72, 79, 79, 82, 3])], True)
    for t in (7, 9, 11):
        out += e.forward([(c, [t]) for c in caches])
    return out


def spy_on_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The segment lengths the model sends to `attention.attend`, as it does."""
    calls: list[int] = []
    fused = attention.attend

    def spy(q: np.ndarray, k: np.ndarray, v: np.ndarray, t_new: int) -> np.ndarray:
        calls.append(t_new)
        return fused(q, k, v, t_new)

    monkeypatch.setattr(attention, "attend", spy)
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", ["f16", "f32"])
@pytest.mark.parametrize("d_model", [64, 96])  # head_dim 16 (the kernels), 24 (numpy only)
def test_model_with_the_kernel_matches_the_numpy_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, d_model: int
) -> None:
    """The same engine, attention by the numpy path (no segment short enough) and by the
    kernel: the same logits up to float32 rounding."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(d_model=d_model))
    e = Engine.load(path, weights=CacheConfig(enabled=False), kernels="exact")
    calls = spy_on_kernel(monkeypatch)
    max_t = attention.MAX_T
    monkeypatch.setattr(attention, "MAX_T", {})
    want = prefill_and_decode(e, dtype)
    assert calls == []
    monkeypatch.setattr(attention, "MAX_T", max_t)
    got = prefill_and_decode(e, dtype)
    # A float16 cache rounds each new key and value to 11 bits, which turns a last-bit
    # difference of an earlier layer into one of 2^-11 now and then.
    rel = 1e-4 if dtype == "f16" else 1e-5
    for x, y in zip(want, got, strict=True):
        assert float(np.max(np.abs(x - y))) < rel * float(np.max(np.abs(x)))
    if d_model == 64:  # the two short segments, then each sequence per step; not the long one
        assert sorted(set(calls)) == [1, 3, 5]
    else:
        assert calls == []


@needs_kernels
@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_kernels_off_attend_with_numpy_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """With ``kernels="off"`` (or a CPU without F16C) attention never takes the kernel, and
    the logits are those of the kernels' engine up to the order of float32 additions (its
    matrix products differ in that way too)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    on = Engine.load(path, weights=CacheConfig(enabled=False), kernels="exact")
    off = Engine.load(path, weights=CacheConfig(enabled=False), kernels="off")
    calls = spy_on_kernel(monkeypatch)
    want = prefill_and_decode(off, dtype)
    assert calls == []
    got = prefill_and_decode(on, dtype)
    assert calls
    for x, y in zip(want, got, strict=True):
        assert float(np.max(np.abs(x - y))) < 1e-4 * float(np.max(np.abs(x)))


@needs_kernels
def test_loading_an_engine_compiles_the_kernel_for_both_cache_dtypes(tmp_path: Path) -> None:
    """`Engine.load` compiles (or loads from numba's cache) the one specialisation that serves
    float16 and float32 caches alike, so no turn compiles it, whatever ``--kv-dtype``."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type="Q4_1"))
    code = (
        "from kvroute.engine.engine import Engine\n"
        "from kvroute.engine.weights_cache import CacheConfig\n"
        "from kvroute.engine.kernels import attention\n"
        f"e = Engine.load({str(path)!r}, weights=CacheConfig(enabled=False), kernels='exact')\n"
        "n = len(attention.attend_heads.signatures)\n"
        "for dtype in ('f16', 'f32'):\n"
        "    c = e.new_cache(dtype)\n"
        "    e.forward([(c, [5, 6, 7])])\n"
        "    e.forward([(c, [8])])\n"
        "print(n, len(attention.attend_heads.signatures))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, after = map(int, out.stdout.split())
    assert loaded == after == 1


@needs_kernels
def test_softmax_exponential_is_accurate() -> None:
    """`_exp` (vectorisable, unlike libm's) within 1e-6 of exp over the softmax's range."""
    xs = np.concatenate([np.linspace(-87.0, 0.0, 4001), -np.logspace(-8, 0, 200), [0.0]])
    for x in xs.astype(np.float32):
        want = np.exp(np.float64(x))
        assert abs(attention._exp(x) - want) <= 1e-6 * want, x
    assert attention._exp(np.float32(-88.0)) == 0.0 and attention._exp(np.float32(-1e30)) == 0.0


@needs_kernels
@pytest.mark.parametrize(
    ("kernels", "d_model", "auto"),
    [("exact", 64, "f16"), ("exact", 96, "f32"), ("off", 64, "f32")],
)
def test_auto_live_kv_is_half_floats_where_the_kernel_reads_them(
    tmp_path: Path, kernels: str, d_model: int, auto: str
) -> None:
    """``--kv-dtype auto`` is f16 where the kernel runs (head_dim 16), f32 where numpy would
    widen every step (head_dim 24, or the kernels off); an explicit dtype is kept."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(d_model=d_model))
    e = Engine.load(path, weights=CacheConfig(enabled=False), kernels=kernels)
    assert e.live_kv_dtype("auto") == auto
    assert (e.live_kv_dtype("f32"), e.live_kv_dtype("f16")) == ("f32", "f16")


@needs_kernels
def test_prefill_chunks_take_the_kernel_on_float16_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20-token chunk: BLAS on a float32 cache, the kernel on a float16 one (BLAS would need
    the cache widened first)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    e = Engine.load(path, weights=CacheConfig(enabled=False), kernels="exact")
    calls = spy_on_kernel(monkeypatch)
    e.forward([(e.new_cache("f32"), list(range(40, 60)))])
    assert calls == []
    e.forward([(e.new_cache("f16"), list(range(40, 60)))])
    assert calls and set(calls) == {20}
