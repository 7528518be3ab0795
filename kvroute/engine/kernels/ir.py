"""LLVM IR for the quantized decode kernels, built through numba intrinsics (see `tiles`).

A decode step multiplies 1..8 activation rows by each weight matrix. Like llama.cpp, the rows
are quantised to int8 per 32-block and the weights multiplied in integers: one ``vpdpbusd``
multiplies 64 unsigned weight bytes by 64 signed activation bytes and adds groups of 4 into 16
int32 lanes. The lanes are 16 *output columns*, so no horizontal sums are needed: the weights
are laid out in tiles of 16 columns (`kvroute.engine.quant`), each tile's blocks contiguous. The
``exact`` kernels keep float32 activations instead (the float32 product up to the order of
additions; about 4x the instructions, and only AVX2, FMA and F16C needed).

The int8 kernels need avx512f, avx512bw, avx512vnni and f16c: check `int8_supported` before the
first call, because compiling them for a CPU without these aborts the process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 32
LANES = 16  # output columns per tile: int32 / float32 lanes of a zmm register
STRIDE_Q4_1 = 4 * LANES * 4 + 2 * LANES * 2  # bytes per (tile, block): 320
STRIDE_Q8_0 = 8 * LANES * 4 + LANES * 2  # 544
STRIDE = {"Q4_1": STRIDE_Q4_1, "Q8_0": STRIDE_Q8_0}
MAX_ROWS = 8  # rows per pass (their accumulators fit in registers); more rows take more passes
INT8_FEATURES = ("avx512f", "avx512bw", "avx512vnni", "f16c")
EXACT_FEATURES = ("avx2", "fma", "f16c")

_i8, _i32, _i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_f32, _f16_t = ir.FloatType(), ir.HalfType()
_vi32, _vf32, _vf16 = (ir.VectorType(t, LANES) for t in (_i32, _f32, _f16_t))


def _host_has(*features: str) -> bool:
    """Whether numba compiles for a CPU with all ``features`` (LLVM names)."""
    import llvmlite.binding as ll
    from numba.core import config

    name, listed_features = getattr(config, "CPU_NAME", None), getattr(config, "CPU_FEATURES", "")
    if name and name != "host":  # a named target (NUMBA_CPU_NAME): only what it lists
        listed = set((listed_features or "").split(","))
        return all(f"+{f}" in listed for f in features)
    host = ll.get_host_cpu_features()
    return all(host.get(f, False) for f in features)


def int8_supported() -> bool:
    """Whether the host CPU, as LLVM sees it, has every instruction the int8 kernels use."""
    return _host_has(*INT8_FEATURES)


def exact_supported() -> bool:
    """Whether the host CPU has what the exact kernels need to be fast (they compile anywhere
    on x86-64, but without these LLVM emulates the float16 and FMA vector operations)."""
    return _host_has(*EXACT_FEATURES)


_AVX512F = _host_has("avx512f")  # the exact Q4_1 kernel unpacks nibbles with vpermps then


def _load(builder: ir.IRBuilder, addr: Any, offset: Any, ty: ir.Type, align: int = 1) -> Any:
    """``*(ty *)(addr + offset)`` for int64 byte addresses."""
    ptr = builder.inttoptr(builder.add(addr, offset), ir.PointerType(ty))
    return builder.load(ptr, align=align, typ=ty)


def _splat(builder: ir.IRBuilder, value: Any, ty: ir.VectorType) -> Any:
    """A vector of ``value`` in every lane (LLVM folds it into a {1to16} memory operand)."""
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), ir.Constant(_vi32, None))


def _i(n: int) -> ir.Constant:
    return ir.Constant(_i64, n)


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, *params: ir.Type) -> Any:
    """The LLVM function or intrinsic ``name`` declared in the builder's module."""
    fnty = ir.FunctionType(ret, list(params))
    return cgutils.get_or_insert_function(builder.module, fnty, name)  # type: ignore[no-untyped-call]


def make_kernel(kind: str, exact: bool = False) -> Callable[..., None]:
    """The tiles kernel: an intrinsic taking ten int64s ``(w, xq, xs, xm, xc, out, tiles, nb,
    out_stride, rows)``: the data addresses of the tiles, of xq (rows, K) int8, xs, xm (rows,
    nb) float32 and xc (rows, nb) int32 (see `quantize_rows`), of out (rows, .) float32; the
    number of tiles and blocks; out's row stride in bytes; the number of rows, 1 to 8 (one
    loop nest each, so that every row's accumulator is a register).

    Per tile and block, the nibble planes are unpacked once for all rows; each row then costs
    8 vpdpbusd (two chains), one int -> float conversion and ``y += d * (s * dot) + m * ms``
    (s: the row's block scale, ms: float16(s * sum(xq))); the float accumulators stay in
    registers across all blocks of the tile.

    With ``exact`` the activations stay float32: xq is the address of x (rows, K) float32, xm
    that of its exact block sums (rows, nb) float32, xs and xc are unused. The weights are then
    unpacked to float32 once per block for all rows (shift, mask, convert) and multiplied with
    FMAs: the float32 product up to the order of additions, at about 4 times the instructions.
    """
    groups, stride = (4, STRIDE["Q4_1"]) if kind == "Q4_1" else (8, STRIDE["Q8_0"])

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        for rows in range(1, MAX_ROWS + 1):
            with builder.if_then(builder.icmp_signed("==", args[-1], _i(rows))):
                _loops(builder, args[:-1], rows)
        return context.get_dummy_value()

    def _loops(builder: ir.IRBuilder, args: Sequence[Any], rows: int) -> None:
        w, _, _, _, _, out, tiles, nb, out_stride = args
        fma = _fn(builder, "llvm.fma.v16f32", _vf32, _vf32, _vf32, _vf32)
        # Entry-block allocas, which mem2reg turns into registers.
        accs = [cgutils.alloca_once(builder, _vf32) for _ in range(rows)]  # type: ignore[no-untyped-call]
        with cgutils.for_range(builder, tiles) as tile:
            tile_base = builder.add(w, builder.mul(builder.mul(tile.index, nb), _i(stride)))
            for acc in accs:
                builder.store(_vf32(None), acc)
            with cgutils.for_range(builder, nb) as block:
                base = builder.add(tile_base, builder.mul(block.index, _i(stride)))
                words = [_load(builder, base, _i(g * LANES * 4), _vi32) for g in range(groups)]
                scales = groups * LANES * 4
                d = builder.fpext(_load(builder, base, _i(scales), _vf16), _vf32)
                if kind == "Q4_1":
                    m = builder.fpext(_load(builder, base, _i(scales + 2 * LANES), _vf16), _vf32)
                elif exact:  # the bytes hold value + 128
                    m = builder.fmul(d, _vf32([-128.0] * LANES))
                else:
                    m = None
                body = _float_block if exact else _int8_block
                sums = body(builder, words, block.index, args, rows)
                for r, acc_ptr in enumerate(accs):
                    dot, scale, msum = sums[r]
                    acc = builder.load(acc_ptr)
                    if m is not None:
                        acc = builder.call(fma, [m, msum, acc])
                    if scale is not None:
                        dot = builder.fmul(dot, scale)
                    builder.store(builder.call(fma, [d, dot, acc]), acc_ptr)
            col = builder.mul(tile.index, _i(LANES * 4))
            for r, acc_ptr in enumerate(accs):
                row = builder.add(out, builder.add(builder.mul(_i(r), out_stride), col))
                dst = builder.inttoptr(row, ir.PointerType(_vf32))
                builder.store(builder.load(acc_ptr), dst, align=4)

    def _int8_block(
        builder: ir.IRBuilder, words: list[Any], b: Any, args: Sequence[Any], rows: int
    ) -> list[tuple[Any, Any, Any]]:
        """Per row: (dot as float, the row's block scale, its min-term factor), all (16,)."""
        _, xq, xs, xm, xc, _, _, nb, _ = args
        dpbusd = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", _vi32, _vi32, _vi32, _vi32)
        nibble, four, zero = ir.Constant(_vi32, 0x0F0F0F0F), ir.Constant(_vi32, 4), _vi32(None)
        planes = []  # (16 lanes of 4 unsigned weight bytes, their activations' offset)
        for g, word in enumerate(words):
            if kind == "Q4_1":
                planes.append((builder.and_(word, nibble), 4 * g))
                planes.append((builder.and_(builder.lshr(word, four), nibble), 16 + 4 * g))
            else:
                planes.append((word, 4 * g))
        k_bytes = builder.mul(nb, _i(BLOCK))
        block_at = builder.mul(b, _i(BLOCK))
        sums = []
        for r in range(rows):
            xrow = builder.add(xq, builder.add(builder.mul(_i(r), k_bytes), block_at))
            at = builder.mul(builder.add(builder.mul(_i(r), nb), b), _i(4))
            # Two independent chains of 4 (or 8 for Q8_0) dot products halve the latency.
            chains = [zero, zero]
            if kind == "Q8_0":
                chains[0] = _splat(builder, _load(builder, xc, at, _i32, 4), _vi32)
            for i, (u8, off) in enumerate(planes):
                x4 = _splat(builder, _load(builder, xrow, _i(off), _i32), _vi32)
                chains[i % 2] = builder.call(dpbusd, [chains[i % 2], u8, x4])
            dot = builder.sitofp(builder.add(chains[0], chains[1]), _vf32)
            sx = _splat(builder, _load(builder, xs, at, _f32, 4), _vf32)
            sm = _splat(builder, _load(builder, xm, at, _f32, 4), _vf32)
            sums.append((dot, sx, sm))
        return sums

    def _float_block(
        builder: ir.IRBuilder, words: list[Any], b: Any, args: Sequence[Any], rows: int
    ) -> list[tuple[Any, Any, Any]]:
        """Per row: (sum of unpacked weights * x, None, the block's sum of x), all (16,)."""
        _, x, _, xsum, _, _, _, nb, _ = args
        fma = _fn(builder, "llvm.fma.v16f32", _vf32, _vf32, _vf32, _vf32)
        width, mask = (4, 15) if kind == "Q4_1" else (8, 255)
        permps = _fn(builder, "llvm.x86.avx512.permvar.sf.512", _vf32, _vf32, _vi32)
        table = _vf32([float(v) for v in range(LANES)])
        nchains = 4 if rows == 1 else 2 if rows <= 4 else 1  # FMA latency vs registers
        chains = [[_vf32(None)] * nchains for _ in range(rows)]
        row_bytes = builder.mul(nb, _i(BLOCK * 4))
        block_at = builder.mul(b, _i(BLOCK * 4))
        xrows = [
            builder.add(x, builder.add(builder.mul(_i(r), row_bytes), block_at))
            for r in range(rows)
        ]
        n = 0
        for g, word in enumerate(words):
            for shift in range(0, 32, width):
                part = builder.lshr(word, ir.Constant(_vi32, shift)) if shift else word
                if kind == "Q4_1" and _AVX512F:  # vpermps reads only an index's low 4 bits
                    value = builder.call(permps, [table, part])
                else:
                    if shift + width < 32:
                        part = builder.and_(part, ir.Constant(_vi32, mask))
                    value = builder.sitofp(part, _vf32)
                byte, high = divmod(shift, 8)  # Q4_1: high nibble = element + 16
                elem = 4 * g + byte + (16 if high else 0)
                for r in range(rows):
                    xe = _splat(builder, _load(builder, xrows[r], _i(4 * elem), _f32, 4), _vf32)
                    c = n % nchains
                    chains[r][c] = builder.call(fma, [value, xe, chains[r][c]])
                n += 1
        sums = []
        for r in range(rows):
            total = chains[r][0]
            for c in chains[r][1:]:
                total = builder.fadd(total, c)
            at = builder.mul(builder.add(builder.mul(_i(r), nb), b), _i(4))
            sums.append((total, None, _splat(builder, _load(builder, xsum, at, _f32, 4), _vf32)))
        return sums

    def typer(typingctx, w, xq, xs, xm, xc, out, tiles, nb, out_stride, rows):  # type: ignore[no-untyped-def]
        return types.void(*([types.int64] * 10)), codegen

    typer.__name__ = f"_{kind.lower()}_{'float' if exact else 'int8'}_kernel"
    kernel: Callable[..., None] = intrinsic(typer)
    return kernel


def _f16_typing(typingctx, v):  # type: ignore[no-untyped-def]
    """A float32 rounded to the nearest float16 (ties to even: vcvtps2ph), as float32."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        return builder.fpext(builder.fptrunc(args[0], _f16_t), _f32)

    return types.float32(types.float32), codegen


f16: Any = intrinsic(_f16_typing)


_vf32x2, _vi32x2 = ir.VectorType(_f32, 2 * LANES), ir.VectorType(_i32, 2 * LANES)


def _absmax32_typing(typingctx, src):  # type: ignore[no-untyped-def]
    """max |x| over the 32 float32 at byte address ``src``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        fabs = _fn(builder, "llvm.fabs.v32f32", _vf32x2, _vf32x2)
        fmax = _fn(builder, "llvm.vector.reduce.fmax.v32f32", _f32, _vf32x2)
        return builder.call(
            fmax, [builder.call(fabs, [_load(builder, args[0], _i(0), _vf32x2, 4)])]
        )

    return types.float32(types.int64), codegen


absmax32: Any = intrinsic(_absmax32_typing)


def _quantize32_typing(typingctx, src, dst, inv):  # type: ignore[no-untyped-def]
    """Store ``rint(x * inv)`` as int8 for the 32 float32 at ``src`` into ``dst``; their sum."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        rint = _fn(builder, "llvm.rint.v32f32", _vf32x2, _vf32x2)
        add = _fn(builder, "llvm.vector.reduce.add.v32i32", _i32, _vi32x2)
        x = _load(builder, args[0], _i(0), _vf32x2, 4)
        inv = builder.shuffle_vector(
            builder.insert_element(ir.Constant(_vf32x2, ir.Undefined), args[2], _i32(0)),
            ir.Constant(_vf32x2, ir.Undefined),
            ir.Constant(_vi32x2, None),
        )
        q = builder.fptosi(builder.call(rint, [builder.fmul(x, inv)]), _vi32x2)
        q8 = ir.VectorType(_i8, 2 * LANES)
        builder.store(builder.trunc(q, q8), builder.inttoptr(args[1], ir.PointerType(q8)))
        return builder.call(add, [q])

    return types.int32(types.int64, types.int64, types.float32), codegen


quantize32: Any = intrinsic(_quantize32_typing)
