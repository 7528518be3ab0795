"""Give the memory that loading freed back to the operating system.

Loading parses metadata, builds the tokenizer and compiles kernels, then drops most of what it
made. glibc keeps freed heap pages for reuse, so without a trim each worker process would keep
them as private memory for its whole life; with several workers on a host that adds up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_freed() -> bool:
    """Collect garbage, then ask the C allocator to return free pages (glibc's ``malloc_trim``).

    Returns whether a trim ran; False on a C library without it (musl, macOS), where this is
    only a garbage collection.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
