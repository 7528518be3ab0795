"""PackedBytes (the tokenizer's packed vocabulary) and release_freed."""

from __future__ import annotations

import platform

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.engine.memory import release_freed
from kvroute.engine.packed import PackedBytes


@given(st.lists(st.binary(max_size=12), max_size=60))
def test_packed_bytes_equals_the_list_it_packs(items: list[bytes]) -> None:
    packed = PackedBytes(items)
    assert len(packed) == len(items)
    assert [packed[i] for i in range(len(items))] == items


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_packed_bytes_refuses_indexes_outside_it(index: int) -> None:
    with pytest.raises(IndexError):
        PackedBytes([b"a", b"", b"bc"])[index]


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_release_freed_trims_on_glibc() -> None:
    assert release_freed() is True
