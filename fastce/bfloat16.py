"""bfloat16 <-> float32 through their bits, for the CPU and the GPU kernels alike.

Numba has no bfloat16 type: bfloat16 arrays (``ml_dtypes.bfloat16``; torch exports its own as
the 2-byte void typestr ``<V2``) reach the kernels as their uint16 bits, a zero-copy view, and
are widened to float32 on load and rounded back on store by the two intrinsics below.  They
are plain LLVM IR, so ``numba.njit`` and ``numba.cuda.jit`` compile the same code.  The CUDA
simulator runs kernels as Python, where an intrinsic cannot run: ``to_f32_py`` and
``to_bf16_py`` are their NumPy twins (the tests check all 65536 bit patterns against both).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def is_bfloat16(dtype):
    """ml_dtypes.bfloat16, recognised by name (ml_dtypes is never imported here; kind first:
    ``dtype.name`` is computed in Python)."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


@intrinsic
def to_f32(typingctx, u):
    """The float32 value of bfloat16 bits: the bits shifted into a float32's high half."""
    if u != types.uint16:
        return None

    def codegen(context, builder, sig_, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def to_bf16(typingctx, f):
    """bfloat16 bits of a float32, rounded to nearest even (ml_dtypes' and torch's rounding); a
    NaN stays a (quiet) NaN.  Integer ops and a select only, so the narrowing loop vectorises."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig_, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        hi = builder.lshr(bits, ir.Constant(i32, 16))
        odd = builder.and_(hi, ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(bits, builder.add(odd, ir.Constant(i32, 0x7FFF))),
                               ir.Constant(i32, 16))
        quiet = builder.or_(hi, ir.Constant(i32, 0x40))
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(isnan, quiet, rounded), ir.IntType(16))

    return types.uint16(types.float32), codegen


def to_f32_py(u):
    """to_f32 in NumPy (the simulator's)."""
    return (np.uint32(u) << np.uint32(16)).view(np.float32)


def to_bf16_py(f):
    """to_bf16 in NumPy (the simulator's)."""
    f = np.float32(f)
    bits = int(f.view(np.uint32))
    hi = bits >> 16
    if f != f:
        return np.uint16(hi | 0x40)
    return np.uint16(((bits + (hi & 1) + 0x7FFF) >> 16) & 0xFFFF)
