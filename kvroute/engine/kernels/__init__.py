"""Compiled kernels the engine calls from numpy (numba; imported only when used)."""
