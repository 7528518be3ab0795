"""KV at rest: f16 / Q8_0 / Q4_0 codes, their error bounds, sizes, and GGUF layout (no model)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants

from kvroute.engine.kv_codec import (
    QK,
    Packed,
    RestDtype,
    decode,
    encode,
    error_bound,
    packed_nbytes,
)

ALL = list(RestDtype)


def kv_like(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values shaped like a KV cache: mostly small, a few large outliers per head."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 3] *= 20.0  # an outlier channel, as keys have
    x[..., ::7] *= 1e-3  # and tiny values next to it
    return x


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (1, 1, 5, 4), (2, 2, 3, 40)])
def test_round_trip_within_bound(dtype: RestDtype, shape: tuple[int, ...]) -> None:
    x = kv_like(shape)
    p = encode(x, dtype)
    y = decode(p)
    assert y.shape == x.shape and y.dtype == np.float32
    err = np.abs(y - x)
    bound = error_bound(x, dtype)
    assert np.all(err <= bound), f"{dtype}: worst excess {np.max(err - bound)}"
    if dtype is RestDtype.NONE:
        assert np.array_equal(x, y)
    else:
        assert err.max() > 0  # a lossy code that lost nothing is not being exercised


@pytest.mark.parametrize("dtype", ALL)
def test_sizes_and_bytes_round_trip(dtype: RestDtype) -> None:
    shape = (30, 3, 50, 64)  # the default model's layers and KV heads, 50 positions
    x = kv_like(shape, seed=1)
    p = encode(x, dtype)
    assert p.nbytes == packed_nbytes(dtype, shape)
    ratio = p.nbytes / x.nbytes
    expected = {"none": 1.0, "f16": 0.5, "q8_0": 34 / 128, "q4_0": 18 / 128}[dtype]
    assert ratio == pytest.approx(expected)
    back = Packed.frombytes(dtype, shape, p.tobytes())
    assert np.array_equal(decode(back), decode(p))
    with pytest.raises(ValueError):
        Packed.frombytes(dtype, shape, p.tobytes()[:-1])


@pytest.mark.parametrize(
    ("dtype", "ggml"),
    [
        (RestDtype.Q8_0, gguf.GGMLQuantizationType.Q8_0),
        (RestDtype.Q4_0, gguf.GGMLQuantizationType.Q4_0),
    ],
)
def test_blocks_are_gguf_layout(dtype: RestDtype, ggml: gguf.GGMLQuantizationType) -> None:
    x = kv_like((4, 2 * QK), seed=2)
    raw = np.frombuffer(encode(x, dtype).tobytes(), np.uint8).reshape(4, -1)
    theirs = quants.dequantize(raw, ggml)
    assert np.allclose(theirs, decode(encode(x, dtype)), atol=0, rtol=0)
    if dtype is RestDtype.Q4_0:
        # And our codes are llama.cpp's own: gguf's reference quantizer gives the same bytes.
        assert np.array_equal(quants.quantize(x, ggml), raw)


def test_zero_blocks_and_decode_into() -> None:
    x = np.zeros((2, 64), np.float32)
    x[1, 40] = -3.0
    for dtype in ALL:
        p = encode(x, dtype)
        out = np.full(x.shape, np.nan, np.float32)
        assert decode(p, out) is out
        assert np.all(out[0] == 0) and np.all(np.isfinite(out))
