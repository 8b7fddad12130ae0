"""Numba CPU backend: the kernels behind fastce's public functions for NumPy arrays.

Layouts (see ``fastce.spec``): logits are viewed as (N, C, S).
- ``S == 1`` ("rows"): each row of C logits is contiguous; one row per task, three passes over a
  row that stays in cache (max, exp-sum, gradient), vectorised along the class axis.
- ``S > 1`` ("strided", e.g. (N, C, H, W)): the class axis has stride S; a task is a block of
  BLOCK spatial positions of one n, vectorised along the contiguous spatial axis.  While a block
  computes its exps, the next block's logits are prefetched into L2, so that its memory-bound
  first pass overlaps this one's compute-bound second pass.  Rows of few classes are transposed
  per block into the same layout.

The exp is ours (``exp2_nonpos``): the llvmlite wheels have no vector math library, so a call
to libm's expf per element would make the loss compute-bound at ~4x the cost of reading the
logits.  A range reduction plus a polynomial, with the power of two assembled from integer
bits, is accurate to ~3 ulp and lets LLVM vectorise every pass.

Each kernel is compiled once, serially, over a range of its tasks: a small problem runs whole
in the caller's thread (waking threads would cost more than the work), a large one in
contiguous shares on a pool of threads (``launch``).  Per-row results, or per-block sums over a
fixed partition, are written to arrays and reduced on the host in a fixed order, so the loss
is bitwise identical whatever the thread count.  The forward validates each block's
targets inside the loss kernel (a bad target is never used as an index and is reported after
the kernel); loss+grad needs the mean's denominator before its gradient pass, so it runs the
target pre-pass first, over the same partition (the same denominator to the last bit).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from . import _alloc
from . import _pipelines
from . import elementwise as ew
from .bfloat16 import is_bfloat16, to_bf16, to_f32
from .options import LossOptions, ieee_div, mean_div

__all__ = ["index_loss", "prob_loss", "target_stats", "softmax_family", "launch"]

# No 'nnan'/'ninf': NaN and inf logits must propagate as in torch.  'reassoc' lets LLVM
# vectorise the sum reductions.
FASTMATH = {"reassoc", "nsz", "contract", "arcp", "afn"}
_JIT = dict(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
# Helpers that LLVM inlines into the kernels; only kernels call them, so they need no wrappers
# callable from Python or C (~10% of a kernel's compile time).  The overloads below take the
# same options: Numba compiles an overload once per set of its callers' options, so helpers
# and overloads that call one another with one set compile each implementation once.
_INLINE = dict(fastmath=FASTMATH, error_model="numpy", no_cpython_wrapper=True,
               no_cfunc_wrapper=True)
if _pipelines.HELPER is not None:       # no machine code of their own (fastce._pipelines)
    _INLINE["pipeline_class"] = _pipelines.HELPER

LOG2E = 1.4426950408889634
# Positions per task of the block kernels: a block's C segments (C * BLOCK logits, 2 MiB of
# float32 for C = 1000) stay in L2 between the passes, and its per-position scratch in L1.
BLOCK = 512
# The block kernels sum over the classes per position (a strided layout has no other order):
# in the logits' dtype over SUM_GROUP classes at a time, each group's sums then added into
# float64 totals.  One float32 accumulator over all C drifts by ~C/2 ulps (C = 256000: 7e-6
# relative in the loss), a group by ~SUM_GROUP/2; one flush per group costs a pass over the
# block's positions.  Calls with C <= SUM_GROUP run exactly as without groups.
SUM_GROUP = 32
# Logits below which a kernel runs in one thread: waking the pool costs tens of microseconds,
# more than the whole loss of a problem this small (W3, 256 x 10, runs serial).
SERIAL_BELOW = 1 << 16
SMALL_C = 32                   # rows of at most this many classes take _index_blocks
# Chunks per thread of a split call, claimed dynamically (see in_parts): more balance a late or
# slow thread, each costs a kernel call.
CHUNKS_PER_PART = 2


# ---------------------------------------------------------------------------------------------
# Scalar building blocks (compiled into the kernels)
# ---------------------------------------------------------------------------------------------
@intrinsic
def fmaximum(typingctx, a, b):
    """IEEE maximum that propagates NaN (llvm.maximum): vectorises, unlike a compare+select."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type, args[0].type])
        fn = builder.module.declare_intrinsic("llvm.maximum", [args[0].type], fnty)
        return builder.call(fn, args)

    return a(a, b), codegen


def _pick(pred):
    """An intrinsic (a, b) -> b if b `pred` a else a, in their common type: Python's (and
    Numba's) max / min of two numbers (pred ">" / "<"), NaN handling included, without the
    function that Numba's overload of the builtin compiles per pair of types (cold start)."""
    @intrinsic
    def pick(typingctx, a, b):
        ty = typingctx.unify_types(a, b)
        if not isinstance(ty, types.Number):
            return None

        def codegen(context, builder, sig, args):
            x = context.cast(builder, args[0], sig.args[0], ty)
            y = context.cast(builder, args[1], sig.args[1], ty)
            if isinstance(ty, types.Float):
                better = builder.fcmp_ordered(pred, y, x)
            elif ty.signed:
                better = builder.icmp_signed(pred, y, x)
            else:
                better = builder.icmp_unsigned(pred, y, x)
            return builder.select(better, y, x)

        return ty(a, b), codegen
    return pick


max2 = _pick(">")
min2 = _pick("<")


def _allocator(zero):
    """np.empty (``zero`` False) or np.zeros (True) of (shape, dtype): a new C-ordered array,
    allocated where it is called.  NumPy's overloads compile a function of their own for each
    (shape, dtype) pair (ten in the cold start table, ~50 ms each); this lowers the
    allocation in place with Numba's own helpers."""
    @intrinsic
    def alloc(typingctx, shape, dtype):
        if isinstance(shape, types.Integer):
            ndim = 1
        elif isinstance(shape, types.BaseTuple) and all(isinstance(d, types.Integer)
                                                        for d in shape):
            ndim = len(shape)
        else:
            return None
        if not isinstance(dtype, (types.DType, types.NumberClass)):
            return None
        arrtype = types.Array(dtype.dtype, ndim, "C")

        def codegen(context, builder, sig, args):
            shapes = _parse_shape(context, builder, sig.args[0], args[0])
            ary = _empty_nd_impl(context, builder, arrtype, shapes)
            if zero:
                cgutils.memset(builder, ary.data, builder.mul(ary.itemsize, ary.nitems), 0)
            return ary._getvalue()

        return arrtype(shape, dtype), codegen
    return alloc


try:
    from numba.np.arrayobj import _empty_nd_impl, _parse_shape
    np_empty, np_zeros = _allocator(False), _allocator(True)
except ImportError:         # (internal helpers; a Numba without them: NumPy's overloads)
    np_empty = register_jitable(lambda shape, dtype: np.empty(shape, dtype))
    np_zeros = register_jitable(lambda shape, dtype: np.zeros(shape, dtype))


@intrinsic
def _bits_to_float(typingctx, i):
    """Reinterpret int32 bits as float32 (int64 as float64)."""
    if i == types.int32:
        sig, llty = types.float32(types.int32), ir.FloatType()
    elif i == types.int64:
        sig, llty = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, sig_, args):
        return builder.bitcast(args[0], llty)

    return sig, codegen


@intrinsic
def _rint(typingctx, a):
    """Round to nearest even (llvm.rint): one vroundps, where floor(a + 0.5) takes two ops."""
    if not isinstance(a, types.Float):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type])
        fn = builder.module.declare_intrinsic("llvm.rint", [args[0].type], fnty)
        return builder.call(fn, args)

    return a(a), codegen


@intrinsic
def _pow2i(typingctx, n):
    """2**n for an integral float n in the normal exponent range, its bits built in an integer
    of the float's own width (float32 -> int32: 8 lanes per AVX2 op, where Numba's int64
    arithmetic would convert through 64-bit lanes)."""
    if n == types.float32:
        width, bias, shift, llty = 32, 127, 23, ir.FloatType()
    elif n == types.float64:
        width, bias, shift, llty = 64, 1023, 52, ir.DoubleType()
    else:
        return None

    def codegen(context, builder, sig, args):
        ity = ir.IntType(width)
        k = builder.fptosi(args[0], ity)
        k = builder.add(k, ir.Constant(ity, bias))
        k = builder.shl(k, ir.Constant(ity, shift))
        return builder.bitcast(k, llty)

    return n(n), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the cache to fetch arr.flat[index] into L2 (llvm.prefetch; never faults)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        # read, locality 2 (L2: a block of logits outgrows L1), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


@intrinsic
def _float_to_bits(typingctx, f):
    """Reinterpret float32 bits as int32."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig_, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


# bfloat16 logits reach the kernels as their uint16 bits (NumPy's view, zero-copy: Numba has
# no bfloat16 type), are widened per row into float32 and computed as float32 rows.
_bf16_to_f32, _f32_to_bf16 = to_f32, to_bf16


def _byte_loader(bits):
    """An intrinsic loading element j of a C-contiguous uint8 array read as int<bits> (native
    byte order), sign-extended to int64.  Used instead of ``.view``, whose overload (shape and
    stride checks, their error messages) costs ~0.2 s of compilation per use.  Unchecked even
    under NUMBA_BOUNDSCHECK: callers keep j < len(arr) * 8 // bits (_seg_widen's loops)."""
    @intrinsic
    def load(typingctx, arr, index):
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 1
                and arr.layout == "C" and isinstance(index, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            it = ir.IntType(bits)
            j = context.cast(builder, args[1], sig.args[1], types.intp)
            ptr = builder.gep(builder.bitcast(ary.data, it.as_pointer()), [j])
            value = builder.load(ptr, align=1)
            return builder.sext(value, ir.IntType(64)) if bits < 64 else value

        return types.int64(arr, index), codegen
    return load


_load_int32 = _byte_loader(32)
_load_int64 = _byte_loader(64)

@intrinsic
def holds_bf16(typingctx, a):
    """Whether array ``a`` holds bfloat16 bits (uint16): a constant of the compiled code."""
    flag = isinstance(a, types.Array) and a.dtype == types.uint16

    def codegen(context, builder, sig, args):
        return context.get_constant(types.boolean, flag)

    return types.boolean(a), codegen


def widen_max(src, scratch):
    """(the row of logits as floats, its max): a bfloat16 (uint16) row widened into
    ``scratch`` (float32, one element per class) in the same pass as its max, a float row
    itself."""
    return src, src.max()


@overload(widen_max, jit_options=_INLINE)
def _widen_max_impl(src, scratch):
    if src.dtype == types.uint16:
        def impl(src, scratch):
            out = scratch
            m = _bf16_to_f32(src[0])
            for c in range(src.shape[0]):
                v = _bf16_to_f32(src[c])
                out[c] = v
                m = fmaximum(m, v)
            return out, m
        return impl
    return lambda src, scratch: (src, _row_max(src))


def grad_row(grad, i, row):
    """Where row i's gradient is computed: grad[i], or, for a bfloat16 gradient, the widened
    float32 row itself (ours: its exps overwrite it, as for out=input)."""
    return grad[i]


@overload(grad_row, jit_options=_INLINE)
def _grad_row_impl(grad, i, row):
    if grad.dtype == types.uint16:
        return lambda grad, i, row: row
    return lambda grad, i, row: grad[i]


def store_grad_row(gr, grad, i):
    """grad[i] <- gr rounded to bfloat16, for a bfloat16 gradient (else gr is grad[i])."""


@overload(store_grad_row, jit_options=_INLINE)
def _store_grad_row_impl(gr, grad, i):
    if grad.dtype == types.uint16:
        def impl(gr, grad, i):
            dst = grad[i]
            for c in range(gr.shape[0]):
                dst[c] = _f32_to_bf16(gr[c])
        return impl
    return lambda gr, grad, i: None


def finish_grad_row(gr, grad, i, scale, gamma, w, smoothing, ti, beta):
    """The gradient of row i from its exps in gr (see _row_grad), less beta at the target."""


@overload(finish_grad_row, jit_options=_INLINE)
def _finish_grad_row_impl(gr, grad, i, scale, gamma, w, smoothing, ti, beta):
    if grad.dtype == types.uint16:
        def impl(gr, grad, i, scale, gamma, w, smoothing, ti, beta):
            # bfloat16: rounded in the same pass (one pass fewer over the row); the target's
            # entry recomputed from its exp, still in gr, as the float32 path computes it.
            dst = grad[i]
            _row_grad_narrow(gr, scale, gamma, w, smoothing, dst)
            e = gr[ti] * scale - gamma * w[ti] if smoothing else gr[ti] * scale
            dst[ti] = _f32_to_bf16(e - beta)
        return impl

    def impl(gr, grad, i, scale, gamma, w, smoothing, ti, beta):
        _row_grad(gr, scale, gamma, w, smoothing)
        gr[ti] -= beta
    return impl


# The scalar building blocks below are Numba overloads compiled once per type as functions of
# their own, which LLVM inlines into every loop that calls them (the same machine code).
# Inlined in Numba's IR instead (inline="always"), each call site typed their body again:
# ~0.1-0.2 s of compile time a call site, ~13% of the first calls' compile time in all.
def log_ge1(s):
    """log(s) for s >= 1 (a sum of exps whose largest term is 1), vectorisable in float32."""
    return math.log(s)


_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)


def _log_ge1_f32(s):
    # s = m 2^k with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(z), z = (m-1)/(m+1), |z| < 0.172:
    # the series to z^9 is within 4e-10 of log m.
    bits = _float_to_bits(s)
    k = (bits >> 23) - 127
    m = _bits_to_float(np.int32((bits & 0x007FFFFF) | 0x3F800000))
    big = m > np.float32(_SQRT2)
    m = m * np.float32(0.5) if big else m
    k = k + 1 if big else k
    z = (m - np.float32(1.0)) / (m + np.float32(1.0))
    z2 = z * z
    p = np.float32(1 / 9)
    p = p * z2 + np.float32(1 / 7)
    p = p * z2 + np.float32(1 / 5)
    p = p * z2 + np.float32(1 / 3)
    p = p * z2 + np.float32(1.0)
    r = np.float32(k) * np.float32(_LN2) + np.float32(2.0) * z * p
    return r if s == s else s             # NaN stays NaN (a NaN sum from an +inf logit)


@overload(log_ge1, jit_options=_INLINE)
def _log_ge1_impl(s):
    if s == types.float32:
        return _log_ge1_f32
    if s == types.float64:
        return lambda s: math.log(s)
    return None


def exp2_nonpos(u):
    """2**u for u <= 0, flushed to 2**-126 (float32) / 2**-1022 (float64) below that: added to
    a sum >= 1 such a floor changes nothing.  NaN in, anything out: callers route NaN through
    the row max.  ``exp2_nonpos_exact`` returns exactly 0 below the floor (for gradients)."""
    return 2.0 ** u


def exp2_nonpos_exact(u):
    """2**u for u <= 0, exactly 0 for u below -126 (float32) / -1022 (float64)."""
    return 2.0 ** u if u > -126 else 0.0


# 2**f on |f| <= 1/2.  float32: a degree-5 polynomial fitted for least maximum relative error
# (9e-8, below float32's half ulp; evaluated in float32: within 3.2 ulp, where Taylor's degree 6
# gives 4 ulp with one more multiply-add).  float64: Taylor's degree 12, < 2e-16.
_C32 = (1.0, 0.6931469775950491, 0.24022242078980532, 0.05550733747383977,
        0.009671513021455427, 0.001326472682199684)
_C64 = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(13))


def _exp2_f32(u):
    uc = max2(u, np.float32(-126.0))
    n = _rint(uc)
    f = uc - n                        # |f| <= 1/2
    p = np.float32(_C32[5])
    p = p * f + np.float32(_C32[4])
    p = p * f + np.float32(_C32[3])
    p = p * f + np.float32(_C32[2])
    p = p * f + np.float32(_C32[1])
    p = p * f + np.float32(1.0)
    return p * _pow2i(n)


def _exp2_f64(u):
    uc = max2(u, -1022.0)
    n = _rint(uc)
    f = uc - n
    p = _C64[12]
    p = p * f + _C64[11]
    p = p * f + _C64[10]
    p = p * f + _C64[9]
    p = p * f + _C64[8]
    p = p * f + _C64[7]
    p = p * f + _C64[6]
    p = p * f + _C64[5]
    p = p * f + _C64[4]
    p = p * f + _C64[3]
    p = p * f + _C64[2]
    p = p * f + _C64[1]
    p = p * f + 1.0
    return p * _pow2i(n)


@overload(exp2_nonpos, jit_options=_INLINE)
def _exp2_nonpos_impl(u):
    if u == types.float32:
        return _exp2_f32
    if u == types.float64:
        return _exp2_f64
    return None


@overload(exp2_nonpos_exact, jit_options=_INLINE)
def _exp2_nonpos_exact_impl(u):
    if isinstance(u, types.Float):
        lo = u(-126.0 if u == types.float32 else -1022.0)

        def impl(u):
            return exp2_nonpos(u) * (u > lo)   # bool -> 0/1: vectorises as a mask, no branch
        return impl
    return None


@njit(**_INLINE)
def exp2_exact_call(u):
    """exp2_nonpos_exact as a called function, for loops that LLVM does not vectorise anyway
    (one copy of its code).  Vectorised loops live in the small helpers below, which inline
    exp2_nonpos themselves."""
    return exp2_nonpos_exact(u)


@intrinsic
def cast_like(typingctx, value, arr):
    """``value`` converted to the dtype of ``arr`` (an array or a number), as ``dtype(value)``
    converts it: keeps float32 loops in float32.  An intrinsic, not an overload: an overload
    compiles a function of its own for each pair of types (~50 ms each on a cold start)."""
    dt = arr.dtype if isinstance(arr, types.Array) else arr
    if not (isinstance(value, types.Number) and isinstance(dt, types.Number)):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[0], sig.args[0], sig.return_type)

    return dt(value, arr), codegen


def _tanh_taylor(n_terms):
    """Taylor coefficients of tanh(y)/y in y**2: 2^2k (2^2k - 1) B_2k / (2k)!."""
    from fractions import Fraction
    B = [Fraction(1)]                      # Bernoulli numbers B_0..B_2n (B_1 = -1/2)
    for m in range(1, 2 * n_terms + 1):
        B.append(-sum(math.comb(m + 1, k) * B[k] for k in range(m)) / (m + 1))
    return tuple(float(4 ** k * (4 ** k - 1) * B[2 * k] / math.factorial(2 * k))
                 for k in range(1, n_terms + 1))


# |y| < 1/4: tanh(y) = y P(y^2).  Terms until the next is below the dtype's half ulp relative
# to y: through y^11 for float32 (next 2e-10), y^21 for float64 (next 2e-18).  Above 1/4 the
# exp form loses at most a factor e/(1-e) < 1.6 to cancellation.
_TANH32 = _tanh_taylor(6)
_TANH64 = _tanh_taylor(11)
TANH_SMALL = 0.25


def _tanh_small(y):
    return y * np.tanh(y)


def _odd_horner(c):
    """y * (c0 + c1 y^2 + c2 y^4 + ...) for the constant tuple c (unrolled by LLVM)."""
    def impl(y):
        y2 = y * y
        p = c[len(c) - 1]
        for k in range(len(c) - 2, -1, -1):
            p = p * y2 + c[k]
        return y * p
    return impl


@overload(_tanh_small, jit_options=_INLINE)
def _tanh_small_impl(y):
    if y == types.float32:
        return _odd_horner(tuple(np.float32(v) for v in _TANH32))
    if y == types.float64:
        return _odd_horner(_TANH64)
    return None


@njit(**_INLINE)
def softcap_fast(x, cap, inv_cap):
    """cap * tanh(x / cap): an odd polynomial for |x / cap| < 1/4 (where the exp form cancels:
    softcap=1e8 would lose every digit), else tanh(y) = sign(y) (1 - e) / (1 + e) with
    e = exp(-2|y|).  Both are computed and one selected, so loops stay branch-free."""
    y = x * inv_cap
    e = exp2_nonpos(abs(y) * cast_like(-2.0 * LOG2E, y))
    t = (1 - e) / (1 + e)
    t = t if y >= 0 else -t
    t = _tanh_small(y) if abs(y) < cast_like(TANH_SMALL, y) else t
    return cap * t if x == x else x


# The per-element formulas keep IEEE order ('contract' alone): with 'reassoc', LLVM rewrites
# (max - s_t) + log(sum) into lse - s_t, reusing the lse it computed beside, and loses every
# digit of the loss for logits near 1e100 (the very cancellation the formulas avoid).
_STRICT = dict(_INLINE, fastmath={"contract"})
_index_loss = njit(**_STRICT)(ew.index_loss)
_index_grad_coefs = njit(**_STRICT)(ew.index_grad_coefs)
_prob_weight = njit(**_STRICT)(ew.prob_weight)
_prob_loss = njit(**_STRICT)(ew.prob_loss)
_prob_grad_coefs = njit(**_STRICT)(ew.prob_grad_coefs)
_softcap_grad_factor = njit(**_STRICT)(ew.softcap_grad_factor)
_z_term = njit(**_STRICT)(ew.z_term)
_reported_lse = njit(**_STRICT)(ew.reported_lse)


@njit(**_INLINE)
def _row_prob_sums(prow, w, srow, ms, keep, smooth_c):
    """(A, D) = (sum_c q_c, sum_c q_c (ms - s_c)) in float64, q_c = prob_weight(p_c, w_c)."""
    A = 0.0
    D = 0.0
    m = np.float64(ms)
    for c in range(prow.shape[0]):
        q = _prob_weight(np.float64(prow[c]), np.float64(w[c]), keep, smooth_c)
        A += q
        D += q * (m - np.float64(srow[c]))
    return A, D


@njit(**_INLINE)
def _seg_prob_acc(ps, wc, ss, ms, keep, smooth_c, A, D):
    """A[j] += q_j and D[j] += q_j (ms_j - s_j) in float64, q_j = prob_weight(p_j, w_c)."""
    for j in range(ps.shape[0]):
        q = _prob_weight(np.float64(ps[j]), wc, keep, smooth_c)
        A[j] += q
        D[j] += q * (np.float64(ms[j]) - np.float64(ss[j]))


@njit(**_INLINE)
def _seg_prob_grad(gs, ps, wc, scale_v, beta_v, keep, smooth_c, ss, inv_cap, has_cap):
    """gs[j] <- e_j scale_j - beta_j q_j (times softcap's derivative at s_j = ss[j]), gs
    holding the exps e_j."""
    for j in range(gs.shape[0]):
        q = _prob_weight(np.float64(ps[j]), wc, keep, smooth_c)
        v = np.float64(gs[j]) * scale_v[j] - beta_v[j] * q
        if has_cap:
            v *= _softcap_grad_factor(np.float64(ss[j]), inv_cap)
        gs[j] = v


# Row passes: small loops LLVM vectorises.  Each is called with one array per call site (the
# raw row, or the softcapped scratch row), so LLVM can prove what aliases what.
@njit(**_INLINE)
def _row_max(row):
    m = row[0]
    for c in range(1, row.shape[0]):
        m = fmaximum(m, row[c])
    return m


@njit(**_INLINE)
def _row_exp_sum(src, ms, log2e):
    """sum_c exp(src_c - ms), as 2**((src_c - ms) log2e): exact 1 at the max."""
    acc = ms - ms                     # 0 of src's dtype
    for c in range(src.shape[0]):
        acc += exp2_nonpos((src[c] - ms) * log2e)
    return acc


@njit(**_INLINE)
def _row_exp_sum_store(src, ms, log2e, out):
    """_row_exp_sum, also storing each exp into ``out`` (the gradient row)."""
    acc = ms - ms
    for c in range(src.shape[0]):
        e = exp2_nonpos_exact((src[c] - ms) * log2e)
        out[c] = e
        acc += e
    return acc


@njit(**_INLINE)
def _row_exp_sum_inplace(buf, ms, log2e):
    """_row_exp_sum_store when the gradient row is the logits row itself (out=input): one
    array read and written, so LLVM needs no overlap check to vectorise."""
    acc = ms - ms
    for c in range(buf.shape[0]):
        e = exp2_nonpos_exact((buf[c] - ms) * log2e)
        buf[c] = e
        acc += e
    return acc


@njit(**_INLINE)
def _row_dot_dev(w, src, ms):
    """sum_c w_c (ms - src_c): label smoothing's weighted sum relative to the row max, so that
    it neither cancels nor overflows near float64's limit; a -inf logit gives +inf."""
    acc = cast_like(0.0, src)
    for c in range(src.shape[0]):
        acc += w[c] * (ms - src[c])
    return acc


@njit(**_INLINE)
def _row_grad(gr, scale, gamma, w, smoothing):
    """gr_c <- gr_c * scale - gamma w_c  (gr holds exp(s_c - max) on entry)."""
    if smoothing:
        for c in range(gr.shape[0]):
            gr[c] = gr[c] * scale - gamma * w[c]
    else:
        for c in range(gr.shape[0]):
            gr[c] = gr[c] * scale


@njit(**_INLINE)
def _row_grad_narrow(gr, scale, gamma, w, smoothing, dst):
    """_row_grad into the bfloat16 bits dst (gr is left as it was)."""
    if smoothing:
        for c in range(gr.shape[0]):
            dst[c] = _f32_to_bf16(gr[c] * scale - gamma * w[c])
    else:
        for c in range(gr.shape[0]):
            dst[c] = _f32_to_bf16(gr[c] * scale)


@njit(**_INLINE)
def _row_grad_softcap(gr, scale, gamma, w, srow, inv_cap):
    """As _row_grad, times ds/dx = 1 - (s_c / cap)^2."""
    one = inv_cap - inv_cap + 1
    for c in range(gr.shape[0]):
        q = srow[c] * inv_cap
        gr[c] = (gr[c] * scale - gamma * w[c]) * (one - q * q)


# ---------------------------------------------------------------------------------------------
# Target pre-pass: validation and the mean's denominators, before any kernel indexes with them
# ---------------------------------------------------------------------------------------------
# Targets are summed in the block partition of the block kernels (BLOCK positions of one n;
# rows viewed as (1, N)), so that the forward, which computes these statistics inside its own
# blocks, and the pre-pass of loss+grad add the same numbers in the same order.
@njit(**_INLINE)
def _seg_widen(tb, tk, out):
    """out[j] <- target j of the segment whose bytes are ``tb``, ``tk`` bytes each (1: uint8,
    4: int32, 8: int64).  Targets reach the kernels as bytes, so that one compilation serves
    every target dtype, widened per block into a small int64 scratch (cheaper than widening
    the whole array on the host: W2's uint8 targets would cost ~10% more memory traffic)."""
    if tk == 1:
        for j in range(out.shape[0]):
            out[j] = tb[j]
    elif tk == 4:
        for j in range(out.shape[0]):
            out[j] = _load_int32(tb, j)
    else:
        for j in range(out.shape[0]):
            out[j] = _load_int64(tb, j)


@njit(**_INLINE)
def _seg_targets(ts, w, ignore_index, C, valid_v, wt_v, tc):
    """Per target of a segment: valid_v (1 unless ignored or out of range) and wt_v (w[t], 0
    where not valid); returns the number of bad targets (neither ignore_index nor in [0, C)).
    tc: int64 scratch (the target, 0 where not valid).  Two loops: the checks vectorise on
    any CPU, and the loads by index, which AVX2 code runs one by one (LLVM emits gathers only
    where they are fast), carry nothing else (W2 forward, haswell code, A/B: ~5% faster than
    one loop)."""
    nbad = 0
    for j in range(ts.shape[0]):
        tj = np.int64(ts[j])
        in_range = (tj >= 0) & (tj < C)
        ok = in_range & (tj != ignore_index)
        valid_v[j] = 1 if ok else 0
        tc[j] = tj if ok else 0
        nbad += 1 if (not in_range) & (tj != ignore_index) else 0
    for j in range(ts.shape[0]):
        # (behind the test: C may be 0, w empty, with every target ignored)
        wt_v[j] = w[tc[j]] if valid_v[j] != 0 else 0
    return nbad


@njit(**_INLINE)
def _seg_targets_logits(ts, w, ignore_index, C, xt2, xs0, valid_v, wt_v, st_v, tc):
    """_seg_targets, and the target logits st_v[j] = xt2[t_j, xs0 + j] (0 where not valid)."""
    nbad = _seg_targets(ts, w, ignore_index, C, valid_v, wt_v, tc)
    for j in range(ts.shape[0]):
        st = xt2[tc[j], xs0 + j]
        st_v[j] = st if valid_v[j] != 0 else 0
    return nbad


@njit(**_INLINE)
def _seg_sum(v):
    acc = 0.0
    for j in range(v.shape[0]):
        acc += v[j]
    return acc


@njit(**_INLINE)
def _seg_stats(ts, ignore_index, C, valid_v, wt_v, nbad, stats, slot, flat0):
    """stats[:, slot] = (sum of w[t], count, first bad flat position or -1) of a segment whose
    _seg_targets gave valid_v, wt_v and nbad; flat0 is its first target's flat position."""
    stats[0, slot] = _seg_sum(wt_v)
    stats[1, slot] = _seg_sum(valid_v)
    first = -1
    if nbad:
        for j in range(ts.shape[0]):
            tj = np.int64(ts[j])
            if tj != ignore_index and (tj < 0 or tj >= C):
                first = flat0 + j
                break
    stats[2, slot] = first


@register_jitable
def blocks_per_row(S):
    """Blocks of BLOCK positions per n of an (N, C, S) view (the host and the kernels agree)."""
    return (S + BLOCK - 1) // BLOCK


@register_jitable
def task_range(K, part, nparts):
    """Tasks lo:hi of a kernel's K tasks that thread ``part`` of ``nparts`` runs (see launch):
    contiguous shares of sizes differing by at most one.  Every task writes its own outputs, so
    results do not depend on nparts."""
    q, r = divmod(np.int64(K), np.int64(nparts))
    lo = part * q + (part if part < r else r)      # (min: also called from Python)
    return lo, lo + q + (1 if part < r else 0)


@register_jitable
def block_bounds(task, nblk, S):
    """(n, s0, L): block ``task`` of the fixed partition, positions s0:s0 + L of row n."""
    n = task // nblk
    s0 = (task - n * nblk) * BLOCK
    return n, s0, (BLOCK if BLOCK < S - s0 else S - s0)


def _target_stats(t, tk, w, ignore_index, C, stats, part, nparts):
    """stats[:, task] = (sum of w[t], count, first bad flat position or -1) per block of the
    targets (M, S), whose bytes are t (M, S * tk) (see _seg_widen)."""
    M = t.shape[0]
    S = t.shape[1] // tk
    nblk = blocks_per_row(S)
    lo, hi = task_range(M * nblk, part, nparts)
    for task in range(lo, hi):
        n, s0, L = block_bounds(np.int64(task), nblk, S)
        ti = np_empty((2, L), np.int64)
        ts = ti[0]
        _seg_widen(t[n, s0 * tk:(s0 + L) * tk], tk, ts)
        v = np_empty((2, L), w.dtype)
        nbad = _seg_targets(ts, w, ignore_index, C, v[0], v[1], ti[1])
        _seg_stats(ts, ignore_index, C, v[0], v[1], nbad, stats, task, n * S + s0)


# ---------------------------------------------------------------------------------------------
# Class-index targets
# ---------------------------------------------------------------------------------------------
def _index_rows(x, t, w, opts, ignore_index, g, g_stride, grad, ce_out, zl_out, hit_out, lse_out,
                part, nparts):
    """Rows layout.  opts: fastce.options.LossOptions (in_place: grad is x itself, and there
    is no softcap).  The WANT_HITS variants compute token accuracy; the others leave hit_out 0.

    Writes ce_out (the cross-entropy of each row), zl_out (its z-loss), hit_out (argmax ==
    target) and, unless it is empty, lse_out (its log-sum-exp); in the WANT_GRAD variants, the
    gradient into grad.  x (and grad) may hold bfloat16 bits (uint16): each row is then
    widened into float32 and computed as a float32 row, its gradient rounded back to bfloat16
    (a float32 grad takes it as it is).
    """
    N, C = x.shape
    keep, smooth_c, W, cap = opts.keep, opts.smooth_c, opts.weight_sum, opts.softcap
    inv_D, z2, zl = opts.grad_scale, opts.z_grad, opts.z_loss
    want_grad = WANT_GRAD               # compile-time constants of the variant (see _variants)
    has_cap = HAS_CAP
    inv_cap = 1.0 / cap if has_cap else 0.0
    smoothing = smooth_c != 0.0
    # A bfloat16 gradient is computed in the widened row itself, as out=input would be.
    in_place = opts.in_place or holds_bf16(grad)
    want_hit = WANT_HITS
    # bfloat16 logits: one float32 row per thread, the rows widened into it one after another
    wide = np_empty(x.shape[1] if holds_bf16(x) else 0, np.float32)
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        row, m = widen_max(x[i], wide)
        capf = cast_like(cap, row)
        inv_capf = cast_like(inv_cap, row)
        log2e = cast_like(LOG2E, row)
        # Pass 1: the row max, of the raw logits (softcap is monotonic).  NaN propagates.
        ti = np.int64(t[i])
        valid = not (ti == ignore_index or ti < 0 or ti >= C)
        # Every read of the logits comes before pass 2 writes the gradient row, which may be
        # the logits themselves (cross_entropy_with_grad(..., out=input)).
        hit = False
        if valid and want_hit:
            # Token accuracy: the target is the first maximum of the row.
            hit = row[ti] == m
            if hit:
                for c in range(ti):
                    if row[c] == m:
                        hit = False
                        break
        sum_wd = 0.0
        if has_cap:
            srow = np_empty(C, row.dtype)
            for c in range(C):
                srow[c] = softcap_fast(row[c], capf, inv_capf)
            ms = softcap_fast(m, capf, inv_capf)
        else:
            srow = row[:0]
            ms = np.float64(m)      # the type of softcap_fast's result: one code for both
        if smoothing and valid:
            sum_wd = np.float64(_row_dot_dev(w, srow if has_cap else row, ms))
        if valid:
            s_t = np.float64(srow[ti]) if has_cap else np.float64(row[ti])
        else:
            s_t = 0.0
        # Pass 2: sum of exp(s - max), stored into the gradient row when one is wanted.  The
        # exps run in the row's dtype: with ms in float64, a float32 row's exps would be float64
        # ones (half the lanes, twice the polynomial).  ms is a float32 value already (the max
        # of the row, or of its float32 softcapped copy), so the cast is exact.
        msr = cast_like(ms, row)
        gr = grad_row(grad, i, row) if want_grad else row
        if has_cap:
            if want_grad:
                ssum = _row_exp_sum_store(srow, msr, log2e, gr)
            else:
                ssum = _row_exp_sum(srow, msr, log2e)
        else:
            if want_grad and in_place:
                ssum = _row_exp_sum_inplace(gr, msr, log2e)
            elif want_grad:
                ssum = _row_exp_sum_store(row, msr, log2e, gr)
            else:
                ssum = _row_exp_sum(row, msr, log2e)
        r = math.log(np.float64(ssum))
        lse = np.float64(ms) + r
        rl = _reported_lse(lse, np.float64(ms))
        if lse_out.shape[0]:
            lse_out[i] = rl
        if not valid:
            ce_out[i] = 0.0
            zl_out[i] = 0.0
            hit_out[i] = 0
            if want_grad:
                grad[i, :] = 0
            continue
        w_t = np.float64(w[ti])
        ce_out[i] = _index_loss(r, np.float64(ms) - s_t, w_t, W, sum_wd, keep, smooth_c)
        zl_out[i] = _z_term(rl, zl)
        hit_out[i] = 1 if hit else 0
        if want_grad:
            alpha, beta, gamma = _index_grad_coefs(g[i * g_stride], lse, w_t, W, keep, smooth_c,
                                                   inv_D, z2)
            scale = alpha / np.float64(ssum)
            if lse != lse:          # NaN row: the exps above are meaningless, poison the gradient
                scale = lse
            if has_cap:
                _row_grad_softcap(gr, cast_like(scale, row), cast_like(gamma, row), w, srow,
                                  inv_capf)
                gr[ti] -= cast_like(beta * _softcap_grad_factor(s_t, inv_cap), row)
                store_grad_row(gr, grad, i)
            else:
                finish_grad_row(gr, grad, i, cast_like(scale, row), cast_like(gamma, row), w,
                                smoothing, ti, cast_like(beta, row))


# Strided passes: each works on contiguous segments of BLOCK spatial positions (one class c of
# one n), element-wise across the segment, so LLVM vectorises them like the row passes.
@njit(**_INLINE)
def _seg_copy(src, dst):
    for j in range(src.shape[0]):
        dst[j] = src[j]


@njit(**_INLINE)
def _seg_flush(v, tot, first, last):
    """A class group's sums v into the float64 totals tot (SUM_GROUP): tot_j <- tot_j + v_j
    (v_j alone for the ``first`` group); v_j <- 0 for the next group, or, after the ``last``,
    the total rounded to v's dtype, where the sums are read."""
    for j in range(v.shape[0]):
        t = np.float64(v[j]) + (0.0 if first else tot[j])
        tot[j] = t
        v[j] = t if last else 0


@njit(**_INLINE)
def _seg_exp_acc(xs, ms, log2e, ssum):
    for j in range(xs.shape[0]):
        ssum[j] += exp2_nonpos((xs[j] - ms[j]) * log2e)


@njit(**_INLINE)
def _seg_exp_acc2(xa, xb, ms, log2e, ssum):
    """_seg_exp_acc of two classes at once: half the loads and stores of the running sums."""
    for j in range(xa.shape[0]):
        ssum[j] += exp2_nonpos((xa[j] - ms[j]) * log2e) + exp2_nonpos((xb[j] - ms[j]) * log2e)


@njit(**_INLINE)
def _seg_exp_acc_store2(xa, xb, ms, log2e, ssum, ga, gb):
    """_seg_exp_acc_store of two classes at once."""
    for j in range(xa.shape[0]):
        ea = exp2_nonpos_exact((xa[j] - ms[j]) * log2e)
        eb = exp2_nonpos_exact((xb[j] - ms[j]) * log2e)
        ssum[j] += ea + eb
        ga[j] = ea
        gb[j] = eb


# The max passes write each sweep into another array than they read (see _block_max).
@njit(**_INLINE)
def _seg_max_pair(xa, xb, m_out):
    for j in range(xa.shape[0]):
        m_out[j] = fmaximum(xa[j], xb[j])


@njit(**_INLINE)
def _seg_max_into(xs, m_in, m_out):
    for j in range(xs.shape[0]):
        m_out[j] = fmaximum(m_in[j], xs[j])


@njit(**_INLINE)
def _seg_max2_into(xa, xb, m_in, m_out):
    for j in range(xa.shape[0]):
        m_out[j] = fmaximum(m_in[j], fmaximum(xa[j], xb[j]))


@njit(**_INLINE)
def _seg_exp_acc_store(xs, ms, log2e, ssum, gs):
    for j in range(xs.shape[0]):
        e = exp2_nonpos_exact((xs[j] - ms[j]) * log2e)
        ssum[j] += e
        gs[j] = e


@njit(**_INLINE)
def _seg_exp_acc_inplace(gs, ms, log2e, ssum):
    """_seg_exp_acc_store when the gradient is the logits themselves (out=input)."""
    for j in range(gs.shape[0]):
        e = exp2_nonpos_exact((gs[j] - ms[j]) * log2e)
        ssum[j] += e
        gs[j] = e


@njit(**_INLINE)
def _seg_prefetch(flat, start, n):
    """Prefetch flat[start:start + n], one hint per 64-byte line."""
    step = max2(1, 64 // flat.itemsize)
    for k in range(0, n, step):
        prefetch(flat, start + k)


@njit(**_INLINE)
def _seg_first_argmax(xs, m, c, first):
    """first_j <- c where xs_j == m_j (classes visited last to first: the first maximum wins)."""
    for j in range(xs.shape[0]):
        first[j] = c if xs[j] == m[j] else first[j]


@njit(**_INLINE)
def _seg_index_loss(ms, ssum, st_v, wt_v, valid_v, swd, W, keep, smooth_c, zl, lse_v, ce, zls,
                    rv):
    """Per position: lse = ms + log(ssum) (the log vectorised: float32 within ~1 ulp), ce =
    index_loss(...) and its z-loss (into zls, unless empty), 0 where not valid.  rv: scratch
    for the logs, computed in a loop of their own: beside the float64 loss, the float32 log
    ran at float64's lane count (W2 forward, haswell code, A/B: ~4% faster)."""
    for j in range(ms.shape[0]):
        rv[j] = log_ge1(ssum[j])
    for j in range(ms.shape[0]):
        r = np.float64(rv[j])
        lse_v[j] = np.float64(ms[j]) + r
        v = _index_loss(r, np.float64(ms[j]) - np.float64(st_v[j]), np.float64(wt_v[j]), W,
                        np.float64(swd[j]), keep, smooth_c)
        ce[j] = v if valid_v[j] != 0.0 else 0.0
    if zls.shape[0]:
        for j in range(ms.shape[0]):
            rl = _reported_lse(lse_v[j], np.float64(ms[j]))
            zls[j] = _z_term(rl, zl) if valid_v[j] != 0.0 else 0.0


@njit(**_INLINE)
def _seg_reported_lse(lse_v, ms, out):
    for j in range(out.shape[0]):
        out[j] = _reported_lse(lse_v[j], np.float64(ms[j]))


@njit(**_INLINE)
def _seg_axpy_dev(wc, xs, ms, acc):
    """acc_j += wc (ms_j - xs_j): _row_dot_dev along a segment."""
    for j in range(xs.shape[0]):
        acc[j] += wc * (ms[j] - xs[j])


@njit(**_INLINE)
def _seg_mul(gs, scale_v):
    for j in range(gs.shape[0]):
        gs[j] = gs[j] * scale_v[j]


# Pass 3 selects an exact 0 for positions that are not valid (ignored): their stored exps may
# be nan (a row of nan or +-inf logits), and nan * 0 is nan.
@njit(**_INLINE)
def _seg_grad(gs, scale_v, gamma_v, wc, valid_v):
    for j in range(gs.shape[0]):
        v = gs[j] * scale_v[j] - gamma_v[j] * wc
        gs[j] = v if valid_v[j] != 0 else 0


@njit(**_INLINE)
def _seg_scale(gs, scale_v, valid_v):
    for j in range(gs.shape[0]):
        v = gs[j] * scale_v[j]
        gs[j] = v if valid_v[j] != 0 else 0


@njit(**_INLINE)
def _seg_softcap(xs, capf, inv_capf, out):
    for j in range(xs.shape[0]):
        out[j] = softcap_fast(xs[j], capf, inv_capf)


@njit(**_INLINE)
def _seg_grad_softcap(gs, scale_v, gamma_v, wc, ss, inv_capf, valid_v):
    one = inv_capf - inv_capf + 1
    for j in range(gs.shape[0]):
        q = ss[j] * inv_capf
        v = (gs[j] * scale_v[j] - gamma_v[j] * wc) * (one - q * q)
        gs[j] = v if valid_v[j] != 0 else 0


@njit(**_INLINE)
def _block_max(xb, xs0, m, scratch):
    """m_j <- max_c xb[c, xs0 + j] (C >= 1 classes; NaN propagates), two classes per sweep.
    Each sweep reads one of m and ``scratch`` and writes the other (the last one m): a max
    written back where it was read compiled to a masked store (LLVM stores nothing where the
    old max is NaN), vmaskmovps, which AMD's cores run ~10x slower than a plain store
    (W3 forward on Zen 3: ~15% of the kernel)."""
    L = m.shape[0]
    C = xb.shape[0]
    if C == 1:
        # (a loop: an array-to-array slice assignment compiles a shape check whose error
        # message formatting alone costs seconds of compile time)
        _seg_copy(xb[0, xs0:xs0 + L], m)
        return
    sweeps = 1 + (C - 2) // 2 + C % 2
    a, b = (m, scratch) if sweeps % 2 == 1 else (scratch, m)
    _seg_max_pair(xb[0, xs0:xs0 + L], xb[1, xs0:xs0 + L], a)
    for c in range(2, C - 1, 2):
        _seg_max2_into(xb[c, xs0:xs0 + L], xb[c + 1, xs0:xs0 + L], a, b)
        a, b = b, a
    if C % 2 == 1:
        _seg_max_into(xb[C - 1, xs0:xs0 + L], a, b)


@njit(**_INLINE)
def _block_hits(xb, xs0, m, ts, valid_v, first, hit_v):
    """Token accuracy: hit_v_j <- 1.0 where the target is the first maximum of position j."""
    L = m.shape[0]
    C = xb.shape[0]
    first[:] = C
    for c in range(C - 1, -1, -1):
        _seg_first_argmax(xb[c, xs0:xs0 + L], m, c, first)
    for j in range(L):
        hit_v[j] = 1.0 if valid_v[j] != 0.0 and first[j] == np.float64(ts[j]) else 0.0


def _block_exp_sums(xb, gb, xs0, w, opts, in_place, ms, ssum, swd, sc, flat, next0, next_len,
                    tot):
    """Pass 2: ssum_j <- sum_c exp(s_cj - ms_j), stored into gb[c, xs0 + j] in the WANT_GRAD
    variants, and swd_j <- sum_c w_c (ms_j - s_cj) when smoothing (s: the softcapped logits, via
    the scratch row sc), by groups of SUM_GROUP classes totalled in tot (2, L) float64.
    next_len > 0: prefetch the next block, class c at flat[next0 + c S]."""
    L = ms.shape[0]
    C = xb.shape[0]
    S = xb.shape[1]
    want_grad = WANT_GRAD
    has_cap = HAS_CAP
    smoothing = opts.smooth_c != 0.0
    capf = cast_like(opts.softcap, ms)
    inv_capf = cast_like(1.0 / opts.softcap if has_cap else 0.0, ms)
    log2e = cast_like(LOG2E, ms)
    pairs = not has_cap and not (want_grad and in_place)    # two classes per sweep of the sums
    ssum[:] = 0
    swd[:] = 0
    for c0 in range(0, C, SUM_GROUP):
        c1 = min2(C, c0 + SUM_GROUP)
        c_pairs = c1 - (c1 - c0) % 2 if pairs else c0
        for c in range(c0, c_pairs, 2):
            if next_len:
                _seg_prefetch(flat, next0 + c * S, next_len)
                _seg_prefetch(flat, next0 + (c + 1) * S, next_len)
            xa = xb[c, xs0:xs0 + L]
            xc = xb[c + 1, xs0:xs0 + L]
            if smoothing:
                _seg_axpy_dev(w[c], xa, ms, swd)
                _seg_axpy_dev(w[c + 1], xc, ms, swd)
            if want_grad:
                _seg_exp_acc_store2(xa, xc, ms, log2e, ssum, gb[c, xs0:xs0 + L],
                                    gb[c + 1, xs0:xs0 + L])
            else:
                _seg_exp_acc2(xa, xc, ms, log2e, ssum)
        for c in range(c_pairs, c1):
            if next_len:
                _seg_prefetch(flat, next0 + c * S, next_len)
            xs = xb[c, xs0:xs0 + L]
            if has_cap:
                _seg_softcap(xs, capf, inv_capf, sc)
                if smoothing:
                    _seg_axpy_dev(w[c], sc, ms, swd)
                if want_grad:
                    _seg_exp_acc_store(sc, ms, log2e, ssum, gb[c, xs0:xs0 + L])
                else:
                    _seg_exp_acc(sc, ms, log2e, ssum)
            else:
                if smoothing:
                    _seg_axpy_dev(w[c], xs, ms, swd)
                if want_grad and in_place:
                    _seg_exp_acc_inplace(gb[c, xs0:xs0 + L], ms, log2e, ssum)
                elif want_grad:
                    _seg_exp_acc_store(xs, ms, log2e, ssum, gb[c, xs0:xs0 + L])
                else:
                    _seg_exp_acc(xs, ms, log2e, ssum)
        if C > SUM_GROUP:
            _seg_flush(ssum, tot[0], c0 == 0, c1 == C)
            if smoothing:
                _seg_flush(swd, tot[1], c0 == 0, c1 == C)


def _block_grad_coefs(opts, g, g_off, g_stride, lse_v, ssum, valid_v, wt_v, st_v, scale_v,
                      gamma_v, beta_v):
    """Per position: the gradient's coefficients (ew.index_grad_coefs), 0 where not valid;
    scale and gamma in the logits' dtype, so that pass 3 runs in float32 lanes for float32."""
    has_cap = HAS_CAP
    inv_cap = 1.0 / opts.softcap if has_cap else 0.0
    for j in range(lse_v.shape[0]):
        lse = lse_v[j]
        alpha, beta, gamma = _index_grad_coefs(g[(g_off + j) * g_stride], lse,
                                               np.float64(wt_v[j]), opts.weight_sum, opts.keep,
                                               opts.smooth_c, opts.grad_scale, opts.z_grad)
        scale = alpha / np.float64(ssum[j])
        if lse != lse:          # NaN position: the exps are meaningless, poison the gradient
            scale = lse
        ok = valid_v[j] != 0.0
        scale_v[j] = cast_like(scale if ok else 0.0, scale_v)
        gamma_v[j] = cast_like(gamma if ok else 0.0, gamma_v)
        beta_v[j] = (beta * (_softcap_grad_factor(np.float64(st_v[j]), inv_cap)
                             if has_cap else 1.0)
                     if ok else 0.0)


def _block_grad(xb, gb, xs0, ts, w, opts, scale_v, gamma_v, beta_v, valid_v, sc):
    """Pass 3: gb[c, xs0 + j] (holding exp(s - max)) <- the gradient: the dense part, then
    the one-hot part at the targets."""
    L = scale_v.shape[0]
    has_cap = HAS_CAP
    smoothing = opts.smooth_c != 0.0
    capf = cast_like(opts.softcap, sc)
    inv_capf = cast_like(1.0 / opts.softcap if has_cap else 0.0, sc)
    for c in range(xb.shape[0]):
        gs = gb[c, xs0:xs0 + L]
        if has_cap:
            _seg_softcap(xb[c, xs0:xs0 + L], capf, inv_capf, sc)
            _seg_grad_softcap(gs, scale_v, gamma_v, w[c], sc, inv_capf, valid_v)
        elif smoothing:
            _seg_grad(gs, scale_v, gamma_v, w[c], valid_v)
        else:
            _seg_scale(gs, scale_v, valid_v)
    for j in range(L):
        if valid_v[j] != 0.0:
            gb[np.int64(ts[j]), xs0 + j] -= beta_v[j]


def _index_block(x, xn, xs0, L, t, tk, on, os0, w, opts, ignore_index, in_place, g, g_off,
                 g_stride, grad, per_position, slot, ce_out, zl_out, hit_out, lse_out, stats,
                 prefetch_next):
    """Class-index loss of the L positions whose logits are x[xn, :, xs0:xs0+L] (C-contiguous
    3-D, positions contiguous) and targets t[on, os0:os0+L] (t: their bytes, tk per target, see
    _seg_widen); every pass runs along contiguous segments of the L positions, which LLVM
    vectorises.  opts: fastce.options.LossOptions (in_place: the caller's, grad is x).

    per_position: ce/zl/hit_out[on, os0 + j] per
    position; else their sums over the block in ce/zl/hit_out[0, slot] (a fixed partition: the
    same numbers whatever the thread count).  lse_out, unless empty: each position's
    log-sum-exp into lse_out[on, os0 + j].  stats (3, tasks), unless empty: the block's target
    statistics into stats[:, slot] (the forward validates its targets here, instead of in a
    pre-pass).  WANT_GRAD: the gradient into grad[xn, :, xs0:xs0+L];
    g[(g_off + j) * g_stride] is the upstream gradient.  prefetch_next: hint the next block of
    x (the next task of this thread) into L2 while this one computes its exps."""
    C = x.shape[1]
    S = x.shape[2]
    want_grad = WANT_GRAD               # compile-time constants of the variant (see _variants)
    has_cap = HAS_CAP
    want_hit = WANT_HITS
    xb = x[xn]
    gb = grad[xn if want_grad else 0]
    # The block's per-position vectors: one allocation in the logits' dtype, one in float64.
    vx = np_empty((11, L), x.dtype)
    m, ms, sc, ssum, swd = vx[0], vx[1], vx[2], vx[3], vx[4]
    scale_v, gamma_v, valid_v, wt_v, st_v, rv = vx[5], vx[6], vx[7], vx[8], vx[9], vx[10]
    v64 = np_empty((8, L), np.float64)
    lse_v, ce_v, zl_v, first, hit_v, beta_v = v64[0], v64[1], v64[2], v64[3], v64[4], v64[5]
    ti = np_empty((2, L), np.int64)
    ts, tc = ti[0], ti[1]               # the widened targets, and a scratch
    _seg_widen(t[on, os0 * tk:(os0 + L) * tk], tk, ts)
    # Pass 1: per-position max over the classes (ms: scratch until the softcap below).
    _block_max(xb, xs0, m, ms)
    # Everything read from the logits by position (target logits, token hits) is read before
    # pass 2 may overwrite them with the gradient (out=input), and after pass 1 has brought the
    # block into cache (W2 forward, A/B: ~4% faster than before it).
    nbad = _seg_targets_logits(ts, w, ignore_index, C, xb, xs0, valid_v, wt_v, st_v, tc)
    if stats.shape[1]:
        # Summed as float64 arrays, as the pre-pass (target_stats) sums its own: the same
        # compiled code on the same values, so the same bits on any CPU.  (ce_v and zl_v are
        # free until the loss.)
        valid64, wt64 = v64[1], v64[2]
        _seg_copy(valid_v, valid64)
        _seg_copy(wt_v, wt64)
        _seg_stats(ts, ignore_index, C, valid64, wt64, nbad, stats, slot,
                   on * (t.shape[1] // tk) + os0)
    if has_cap:
        capf = cast_like(opts.softcap, x)
        inv_capf = cast_like(1.0 / opts.softcap, x)
        _seg_softcap(m, capf, inv_capf, ms)
        _seg_softcap(st_v, capf, inv_capf, st_v)
    else:
        ms = m
    if want_hit:
        _block_hits(xb, xs0, m, ts, valid_v, first, hit_v)
    # Pass 2, prefetching the next block (this thread's next task) unless it is the last.
    next_n, next_s0 = (xn, xs0 + L) if xs0 + L < S else (xn + 1, 0)
    next_len = min2(L, S - next_s0) if prefetch_next and next_n < x.shape[0] else 0
    _block_exp_sums(xb, gb, xs0, w, opts, in_place, ms, ssum, swd, sc, x.reshape(-1),
                    next_n * C * S + next_s0, next_len, v64[6:8])
    # Per position: loss and z-loss (vectorised), then the block's sums or per-position values.
    if per_position:
        ce_v = ce_out[on, os0:os0 + L]
        zl_v = zl_out[on, os0:os0 + L]
    elif opts.z_loss == 0.0:
        zl_v = zl_v[:0]                 # the z-loss terms are all 0: skip them
    _seg_index_loss(ms, ssum, st_v, wt_v, valid_v, swd, opts.weight_sum, opts.keep,
                    opts.smooth_c, opts.z_loss, lse_v, ce_v, zl_v, rv)
    if lse_out.shape[0]:
        _seg_reported_lse(lse_v, ms, lse_out[on, os0:os0 + L])
    if per_position:
        if want_hit:
            _seg_copy(hit_v, hit_out[on, os0:os0 + L])
    else:
        ce_out[0, slot] = _seg_sum(ce_v)
        zl_out[0, slot] = _seg_sum(zl_v)
        hit_out[0, slot] = _seg_sum(hit_v) if want_hit else 0.0
    if want_grad:
        _block_grad_coefs(opts, g, g_off, g_stride, lse_v, ssum, valid_v, wt_v, st_v, scale_v,
                          gamma_v, beta_v)
        _block_grad(xb, gb, xs0, ts, w, opts, scale_v, gamma_v, beta_v, valid_v, sc)


def _index_blocks(x, t, tk, w, opts, ignore_index, g, g_stride, grad, per_position,
                  ce_out, zl_out, hit_out, lse_out, stats, rows, part, nparts):
    """The block kernel of two layouts, one compilation (a second kernel compiled the block
    code again: ~3.5 s of a cold start).
    - strided (rows False): x (N, C, S), targets t (N, S); task = BLOCK positions of one n.
    - rows of few classes (rows True, C <= SMALL_C): x (N, C, 1), targets t (1, N); a task
      transposes BLOCK rows into a (1, C, BLOCK) scratch, so that the block code vectorises
      across rows, and transposes their gradient back."""
    N, C, S = x.shape
    nblk = blocks_per_row(N if rows else S)
    lo, hi = task_range(nblk if rows else N * nblk, part, nparts)
    # (A run-time test, true in the gradient variants: with the compile-time constant alone,
    # the rows ran ~15% slower at W3, 256 x 10, A/B in one process.)
    wg = WANT_GRAD and rows and grad.shape[0] == N
    for task in range(lo, hi):
        slot = np.int64(task)
        if rows:
            _, i0, L = block_bounds(slot, nblk, N)
            xb = np_empty((1, C, L), x.dtype)
            # Class outer: strided loads (gathers), contiguous stores.  Rows outer stored
            # through scatters, a third of a W3 forward's time (AVX-512); A/B: 1.0-2.1x faster.
            for c in range(C):
                _seg_copy(x[i0:i0 + L, c, 0], xb[0, c])
            gb = np_empty((1, C, L) if wg else (1, 1, 1), x.dtype)
            xn, xs0, on, os0, g_off = 0, 0, 0, i0, i0
        else:
            n, s0, L = block_bounds(slot, nblk, S)
            xb, gb = x, grad
            xn, xs0, on, os0, g_off = n, s0, n, s0, n * S + s0
        _index_block(xb, xn, xs0, L, t, tk, on, os0, w, opts, ignore_index,
                     opts.in_place and not rows, g, g_off, g_stride, gb, per_position, slot,
                     ce_out, zl_out, hit_out, lse_out, stats, not rows)
        if wg:
            for j in range(L):
                for c in range(C):
                    grad[i0 + j, c, 0] = gb[0, c, j]


# ---------------------------------------------------------------------------------------------
# Probability targets (one kernel for both layouts: blocks of the spatial axis, L = 1 for rows)
# ---------------------------------------------------------------------------------------------
def _prob_blocks(x, p, w, opts, g, g_stride, grad, ce_out, zl_out, lse_out, part, nparts):
    """opts: fastce.options.LossOptions (weight_sum, in_place and want_hits unused); lse_out,
    unless empty, receives each position's log-sum-exp."""
    N, C, S = x.shape
    keep, smooth_c, cap = opts.keep, opts.smooth_c, opts.softcap
    inv_D, z2, zl = opts.grad_scale, opts.z_grad, opts.z_loss
    want_grad = WANT_GRAD
    has_cap = HAS_CAP
    inv_cap = 1.0 / cap if has_cap else 0.0
    nblk = blocks_per_row(S)
    lo, hi = task_range(N * nblk, part, nparts)
    capf = cast_like(cap, x)
    inv_capf = cast_like(inv_cap, x)
    log2e = cast_like(LOG2E, x)
    # Rows (S == 1): one row per task, each pass a loop over its contiguous classes (a block
    # of one position would not vectorise at all: ~2.5x torch's time).
    xr, pr = x.reshape(N, C * S), p.reshape(N, C * S)
    gr = grad.reshape(grad.shape[0], grad.shape[1] * grad.shape[2])
    capped = np_empty(C if has_cap and S == 1 else 0, x.dtype)
    for task in range(lo, hi):
        n, s0, L = block_bounds(np.int64(task), nblk, S)
        if S == 1:
            row, prow = xr[n], pr[n]
            m0 = _row_max(row)
            if has_cap:
                for c in range(C):
                    capped[c] = softcap_fast(row[c], capf, inv_capf)
                srow = capped
                m0 = softcap_fast(m0, capf, inv_capf)
            else:
                srow = row
            # (before the exps: with out=input, storing them overwrites the row)
            A0, D0 = _row_prob_sums(prow, w, srow, m0, keep, smooth_c)
            if want_grad:
                se = _row_exp_sum_store(srow, m0, log2e, gr[n])
            else:
                se = _row_exp_sum(srow, m0, log2e)
            r = math.log(se)
            lse = np.float64(m0) + r
            rl = _reported_lse(lse, np.float64(m0))
            if lse_out.shape[0]:
                lse_out[n, 0] = rl
            zl_out[n, 0] = _z_term(rl, zl)
            ce_out[n, 0] = _prob_loss(r, A0, D0)
            if want_grad:
                alpha, beta = _prob_grad_coefs(g[n * g_stride], lse, A0, inv_D, z2)
                scale = alpha / se
                if lse != lse:
                    scale = lse
                grow = gr[n]
                for c in range(C):
                    q = _prob_weight(np.float64(prow[c]), np.float64(w[c]), keep, smooth_c)
                    v = np.float64(grow[c]) * scale - beta * q
                    if has_cap:
                        v *= _softcap_grad_factor(np.float64(srow[c]), inv_cap)
                    grow[c] = v
            continue
        # Blocks: each pass a loop over a contiguous segment of L positions of one class.
        xb, pb = x[n], p[n]
        gb = grad[n if want_grad else 0]
        v = np_empty((3, L), x.dtype)
        m, ss, ssum = v[0], v[1], v[2]
        _block_max(xb, s0, m, ss)           # (ss: scratch until the softcap pass)
        if has_cap:
            ms = np_empty(L, x.dtype)
            _seg_softcap(m, capf, inv_capf, ms)
        else:
            ms = m
        for j in range(L):
            ssum[j] = 0
        # float64 per position: sums of q and of q (max - s), coefs, the exp sums' group totals
        acc = np_zeros((5, L), np.float64)
        A, D, scale_v, beta_v = acc[0], acc[1], acc[2], acc[3]
        for c in range(C):
            xc = xb[c, s0:s0 + L]
            if has_cap:
                _seg_softcap(xc, capf, inv_capf, ss)
                sc = ss
            else:
                sc = xc
            # (before the exps: with out=input, storing them overwrites the logits)
            _seg_prob_acc(pb[c, s0:s0 + L], np.float64(w[c]), sc, ms, keep, smooth_c, A, D)
            if want_grad:
                _seg_exp_acc_store(sc, ms, log2e, ssum, gb[c, s0:s0 + L])
            else:
                _seg_exp_acc(sc, ms, log2e, ssum)
            if C > SUM_GROUP and ((c + 1) % SUM_GROUP == 0 or c + 1 == C):
                _seg_flush(ssum, acc[4], c < SUM_GROUP, c + 1 == C)
        for j in range(L):
            r = math.log(ssum[j])
            lse = np.float64(ms[j]) + r
            rl = _reported_lse(lse, np.float64(ms[j]))
            if lse_out.shape[0]:
                lse_out[n, s0 + j] = rl
            zl_out[n, s0 + j] = _z_term(rl, zl)
            ce_out[n, s0 + j] = _prob_loss(r, A[j], D[j])
            if want_grad:
                alpha, beta = _prob_grad_coefs(g[(n * S + s0 + j) * g_stride], lse, A[j], inv_D, z2)
                scale_v[j] = alpha / ssum[j] if lse == lse else lse
                beta_v[j] = beta
        if want_grad:
            for c in range(C):
                if has_cap:             # (softcap never runs in place: x is intact)
                    _seg_softcap(xb[c, s0:s0 + L], capf, inv_capf, ss)
                _seg_prob_grad(gb[c, s0:s0 + L], pb[c, s0:s0 + L], np.float64(w[c]), scale_v,
                               beta_v, keep, smooth_c, ss, inv_cap, has_cap)


# ---------------------------------------------------------------------------------------------
# log_softmax / softmax / logsumexp (mode 0: lse only, 1: log_softmax, 2: softmax)
# ---------------------------------------------------------------------------------------------
# SciPy's rules for a group whose max m is not finite: lse = m (-inf for all -inf, +inf with a
# +inf, NaN with a NaN); softmax NaN; log_softmax (x - m) - 0 (NaN, or -inf beside a +inf).
# log_softmax is (x - m) - log(sum), not x - lse: no cancellation when x is close to m.  Its
# loops are compiled without 'reassoc', which would let LLVM fold them into x - (m + log(sum)).
_NO_REASSOC = dict(_INLINE, fastmath=FASTMATH - {"reassoc"})
# Elements per task when few long rows are split (axis=None): 64 KiB of float32, enough work
# per task to hide the scheduling cost, small enough to split a 1M-class row 64 ways.
CHUNK = 16384
# Rows fewer than this are split into chunks, whatever the thread count (the price of
# machine-independent bits: on 2 cores, 4-7 rows of 50k-200k float32 take ~1.5x the row
# kernel's time this way; with more than 8 threads, 8 rows or more leave some idle).
SPLIT_ROWS_BELOW = 8


@njit(**_NO_REASSOC)
def _row_sub2(row, a, b, out):
    for c in range(row.shape[0]):
        out[c] = (row[c] - a) - b


@njit(**_INLINE)
def _row_scale(row, f):
    for c in range(row.shape[0]):
        row[c] = row[c] * f


@njit(**_NO_REASSOC)
def _seg_sub2(xs, a, b, out):
    for j in range(xs.shape[0]):
        out[j] = (xs[j] - a[j]) - b[j]


def _softmax_rows(x, mode, out, lse_out, part, nparts):
    N, C = x.shape
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        row = x[i]
        m = row[0]
        for c in range(1, C):
            m = fmaximum(m, row[c])
        log2e = cast_like(LOG2E, row)
        m64 = np.float64(m)
        finite = m64 - m64 == 0.0
        one = cast_like(1.0, row)
        if mode == 2:       # softmax: one exp per entry, stored, then scaled by 1 / sum
            o = out[i]
            ssum = _row_exp_sum_store(row, m, log2e, o) if finite else one
        else:
            ssum = _row_exp_sum(row, m, log2e) if finite else one
        logs = math.log(np.float64(ssum)) if finite else 0.0
        lse_out[i] = m64 + logs
        if mode == 1:
            _row_sub2(row, m, cast_like(logs, row), out[i])
        elif mode == 2:
            o = out[i]
            _row_scale(o, cast_like(1.0 / np.float64(ssum) if finite else math.nan, row))


def _softmax_strided(x, mode, out, lse_out, part, nparts):
    N, C, S = x.shape
    nblk = blocks_per_row(S)
    lo, hi = task_range(N * nblk, part, nparts)
    for task in range(lo, hi):
        n, s0, L = block_bounds(np.int64(task), nblk, S)
        log2e = cast_like(LOG2E, x)
        mm = np_empty((2, L), x.dtype)
        m = mm[0]
        _block_max(x[n], s0, m, mm[1])
        ssum = np_zeros(L, x.dtype)
        tot = np_empty(L if C > SUM_GROUP else 0, np.float64)
        for c in range(C):
            if mode == 2:       # softmax: one exp per entry, stored, then scaled by 1 / sum
                _seg_exp_acc_store(x[n, c, s0:s0 + L], m, log2e, ssum, out[n, c, s0:s0 + L])
            else:
                _seg_exp_acc(x[n, c, s0:s0 + L], m, log2e, ssum)
            if C > SUM_GROUP and ((c + 1) % SUM_GROUP == 0 or c + 1 == C):
                _seg_flush(ssum, tot, c < SUM_GROUP, c + 1 == C)
        logs = np_zeros(L, x.dtype)
        inv = np_empty(L, x.dtype)
        for j in range(L):
            m64 = np.float64(m[j])
            lse = m64
            if m64 - m64 == 0.0:
                lg = math.log(np.float64(ssum[j]))
                lse = m64 + lg
                logs[j] = lg
                inv[j] = 1.0 / np.float64(ssum[j])
            else:
                inv[j] = math.nan
            lse_out[n, s0 + j] = lse
        if mode == 1:
            for c in range(C):
                _seg_sub2(x[n, c, s0:s0 + L], m, logs, out[n, c, s0:s0 + L])
        elif mode == 2:
            for c in range(C):
                _seg_mul(out[n, c, s0:s0 + L], inv)        # *= 1 / sum


# Few long rows (axis=None, trailing tuple axes): each row is split into K chunks, one task
# each; a chunk's (max, sum of b * exp(x - max)) are merged per row in float64, and a second
# pass writes softmax / log_softmax.  The same partials carry scipy's weights ``b``.
@njit(**_INLINE)
def _chunk_plain(seg):
    """(max, sum exp(seg - max)) of a non-empty segment, as float64."""
    m = _row_max(seg)
    m64 = np.float64(m)
    if m64 - m64 == 0.0:
        return m64, np.float64(_row_exp_sum(seg, m, cast_like(LOG2E, seg)))
    if m64 > 0.0:
        return m64, math.inf             # +inf entries: the sum is +inf
    return m64, m64 - m64 if m64 != m64 else 0.0     # NaN: NaN; all -inf: 0


@njit(**_INLINE)
def _seg_masked_max(seg, bs):
    """Max of seg over the entries whose weight is nonzero (scipy: b == 0 is -inf)."""
    ninf = cast_like(-math.inf, seg)
    m = ninf
    for c in range(seg.shape[0]):
        m = fmaximum(m, seg[c] if bs[c] != 0.0 else ninf)
    return m


@njit(**_INLINE)
def _seg_weighted_sum(seg, bs, m):
    """sum_c b_c exp(seg_c - m) in float64 (entries with b_c == 0 add exactly 0)."""
    acc = 0.0
    for c in range(seg.shape[0]):
        bv = bs[c]
        v = np.float64(seg[c]) if bv != 0.0 else -math.inf
        acc += bv * exp2_nonpos_exact((v - m) * LOG2E)
    return acc


@njit(**_INLINE)
def _seg_poisoned(seg, bs):
    """1.0 if an entry with b == 0 holds +inf or NaN (scipy then returns NaN where the
    weighted result is not finite: its fallback sums b * exp(x) unmasked), else 0.0."""
    p = 0.0
    for c in range(seg.shape[0]):
        p = max2(p, 1.0 if (bs[c] == 0.0 and not seg[c] < math.inf) else 0.0)
    return p


@njit(**_INLINE)
def _chunk_weighted(seg, bs):
    m64 = np.float64(_seg_masked_max(seg, bs))
    if m64 - m64 == 0.0:
        return m64, _seg_weighted_sum(seg, bs, m64)
    if m64 > 0.0:
        # +inf entries dominate: b * inf summed, as scipy's direct sum (mixed signs: NaN)
        acc = 0.0
        for c in range(seg.shape[0]):
            if seg[c] == math.inf and bs[c] != 0.0:
                acc += bs[c] * math.inf
        return m64, acc
    return m64, m64 - m64 if m64 != m64 else 0.0


@register_jitable
def _chunk_bounds(task, K, C):
    """(i, k, c0, c1): task i * K + k of the split-row kernels is chunk k, classes c0:c1
    (possibly empty), of row i."""
    i = task // K
    k = task - i * K
    L = (C + K - 1) // K
    c0 = min2(C, k * L)
    return i, k, c0, min2(C, c0 + L)


def _lse_chunks(x, b, K, pm, ps, pp, part, nparts):
    """pm, ps (N, K): max and sum of (b *) exp(x - max) of the K chunks of each row of x; pp:
    _seg_poisoned of each chunk (with b).  b None: no weights (a compilation of its own,
    without the weighted code)."""
    N, C = x.shape
    lo, hi = task_range(N * K, part, nparts)
    for task in range(lo, hi):
        i, k, c0, c1 = _chunk_bounds(np.int64(task), K, C)
        pp[i, k] = 0.0
        if c0 == c1:
            pm[i, k] = -math.inf
            ps[i, k] = 0.0
        elif b is not None:
            pm[i, k], ps[i, k] = _chunk_weighted(x[i, c0:c1], b[i, c0:c1])
            pp[i, k] = _seg_poisoned(x[i, c0:c1], b[i, c0:c1])
        else:
            pm[i, k], ps[i, k] = _chunk_plain(x[i, c0:c1])


def _lse_combine(pm, ps, pp, signed, lse, sgn, mx, logs, inv, part, nparts):
    """Per row: lse = log|sum| + max and sign(sum) from the chunk partials (scipy's rules:
    an all -inf or zero sum gives -inf and sign 0, a negative sum NaN unless ``signed``, a
    non-finite result NaN if a zero weight sits on +inf or NaN); mx,
    logs, inv: the max, log(sum) and 1/sum that softmax / log_softmax use (0, 0, NaN when the
    max is not finite)."""
    N, K = pm.shape
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        m = -math.inf
        for k in range(K):
            m = fmaximum(m, pm[i, k])
        s = 0.0
        if m - m == 0.0:
            for k in range(K):
                if ps[i, k] != 0.0:
                    s += ps[i, k] * math.exp(pm[i, k] - m)
        elif m != m:
            s = m
        elif m > 0.0:
            for k in range(K):
                if pm[i, k] == m:
                    s += ps[i, k]
        sg = 1.0 if s > 0.0 else (-1.0 if s < 0.0 else (0.0 if s == 0.0 else s))
        a = abs(s)
        if m - m == 0.0:
            lg = math.log(a) if a != 0.0 else -math.inf
            r = m + lg
            logs[i] = lg
            inv[i] = 1.0 / s
        else:
            r = m if m < 0.0 or m != m else (math.log(a) if a == a else a)
            logs[i] = 0.0
            inv[i] = math.nan
        if sg < 0.0 and not signed:
            r = math.nan
        if r - r != 0.0:
            poisoned = 0.0
            for k in range(K):
                poisoned = max2(poisoned, pp[i, k])
            if poisoned > 0.0:
                r = math.nan
                sg = math.nan
        lse[i] = r
        sgn[i] = sg
        mx[i] = m


def _softmax_chunks_out(x, K, mode, mx, logs, inv, out, part, nparts):
    N, C = x.shape
    lo, hi = task_range(N * K, part, nparts)
    for task in range(lo, hi):
        i, _, c0, c1 = _chunk_bounds(np.int64(task), K, C)
        if c0 == c1:
            continue
        seg = x[i, c0:c1]
        o = out[i, c0:c1]
        m = cast_like(mx[i], seg)
        if mode == 1:
            _row_sub2(seg, m, cast_like(logs[i], seg), o)
        else:
            _row_exp_sum_store(seg, m, cast_like(LOG2E, seg), o)
            _row_scale(o, cast_like(inv[i], seg))        # o *= 1 / sum


# ---------------------------------------------------------------------------------------------
# Compilation (lazy, cached) and launching
# ---------------------------------------------------------------------------------------------
def _renamed(fn, suffix, consts=None):
    """A copy of the Python function ``fn`` named ``fn.__name__ + suffix``, whose globals
    ``consts`` (a dict) override.

    Numba's on-disk cache keys a function by its qualified name and signature, not by its
    compile flags nor its globals: every copy compiled differently needs a name of its own, so
    that no two ever load each other's machine code."""
    glb = fn.__globals__
    if consts:
        glb = dict(glb)
        glb.update(consts)
    out = type(fn)(fn.__code__, glb, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    out.__qualname__ = fn.__qualname__ + suffix
    out.__doc__ = fn.__doc__
    return out


def _kernel(fn):
    """The one compilation of a kernel body (serial, nogil: launch runs it on several threads
    at once over disjoint task ranges), compiled on its first call only."""
    return njit(**_JIT)(fn)


# Variants: what a call never needs is not compiled.  WANT_GRAD, HAS_CAP and (class-index
# kernels) WANT_HITS are compile-time constants of each variant (Numba prunes the branches on
# them before typing), so that a forward call compiles no gradient code, a call without softcap
# no softcap code and one without token accuracy no argmax pass (~10% of the block kernel's
# first call).  Each kernel compiled at once would be ~2.5x the code of the plain forward.
WANT_GRAD = True
HAS_CAP = True
WANT_HITS = True
VARIANTS = {(grad, cap): ("_grad" if grad else "_fwd") + ("_cap" if cap else "")
            for grad in (False, True) for cap in (False, True)}
HIT_VARIANTS = {key + (hits,): suffix + ("_hits" if hits else "")
                for key, suffix in VARIANTS.items() for hits in (False, True)}


def _variants(fn, callees=None, hits=False):
    """{(want_grad, has_cap): fn's variant}, or {(want_grad, has_cap, want_hits): ...} when
    ``hits``; ``callees`` {name: {key: dispatcher}} are the variants of helpers compiled in
    place of their name (keyed by the same tuple, or by its first two entries)."""
    out = {}
    for key, suffix in (HIT_VARIANTS if hits else VARIANTS).items():
        consts = {"WANT_GRAD": key[0], "HAS_CAP": key[1], "WANT_HITS": key[-1] if hits else False}
        for name, by_key in (callees or {}).items():
            consts[name] = by_key[key] if key in by_key else by_key[key[:2]]
        out[key] = _renamed(fn, suffix, consts)
    return out


# The block code, inlined into the block kernel (_index_blocks) in Numba's IR (as a function of
# its own it was typed, optimised and emitted once more, then re-optimised inside the kernel:
# ~1 s of a first call), and its passes that depend on the variant.
_BLOCK_PASSES = {fn.__name__: {key: njit(**_INLINE)(f) for key, f in _variants(fn).items()}
                 for fn in (_block_exp_sums, _block_grad_coefs, _block_grad)}
_BLOCK = {"_index_block": {key: njit(inline="always", **_INLINE)(f)
                           for key, f in _variants(_index_block, _BLOCK_PASSES, True).items()}}
_KERNELS = {fn.__name__: _kernel(fn) for fn in (_target_stats, _softmax_rows, _softmax_strided,
                                                _lse_chunks, _lse_combine,
                                                _softmax_chunks_out)}
for _fn, _callees, _hits in ((_index_rows, None, True), (_index_blocks, _BLOCK, True),
                             (_prob_blocks, None, False)):
    for _key, _variant in _variants(_fn, _callees, _hits).items():
        _KERNELS[(_fn.__name__,) + _key] = _kernel(_variant)


# Threads.  Kernels are compiled serially and split their tasks with task_range; large calls
# run the parts on Python threads (the kernels release the GIL).  Numba's parallel=True would
# compile every kernel a second time, through its parfor passes: ~30% of a cold start.  One
# pool per process, of NUMBA_NUM_THREADS - 1 workers (the most any call uses; a call submits
# only its own parts), made on first use; a forked child starts without one.  Its workers only
# ever run kernels, so any number of threads may call fastce at once.
_pool = None
_pool_lock = threading.Lock()


def _forget_pool_in_child():
    global _pool, _pool_lock
    _pool = None                        # the parent's worker threads do not exist here
    _pool_lock = threading.Lock()       # and its lock may have been held at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def num_threads():
    """Threads of a large call: Numba's thread count (``numba.set_num_threads`` is honoured
    once Numba's own pool runs; starting that pool just to ask would cost its threads), else
    ``NUMBA_NUM_THREADS`` (default: the CPU count)."""
    from numba.np.ufunc import parallel
    if parallel._is_initialized:
        return numba.get_num_threads()
    return numba.config.NUMBA_NUM_THREADS


_task = threading.local()


class serial:
    """``with cpu.serial():`` fastce's kernels run on the calling thread only, unsplit: for
    the tasks of a parallel scheduler (Dask's threads), where splitting each task again would
    put two threads on every core."""

    def __enter__(self):
        self.old = getattr(_task, "serial", False)
        _task.serial = True

    def __exit__(self, *exc):
        _task.serial = self.old


def _executor():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                from concurrent.futures import ThreadPoolExecutor
                _pool = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                           thread_name_prefix="fastce")
    return _pool


def launch(name, work, *args):
    """Run kernel ``name`` (a name, or (name, want_grad, has_cap[, want_hits]) for the loss
    kernels' variants) on ``args``; ``work`` (element count) decides whether its tasks are split over threads."""
    return run_parts(_KERNELS[name], n_parts(work), *args)


def n_parts(work):
    """How many parts a kernel call of ``work`` elements runs in (1: in the caller's thread)."""
    if work < SERIAL_BELOW or getattr(_task, "serial", False):
        return 1
    n = num_threads()
    return n if n > 1 and work >= _split_threshold() else 1


# Where the pool is slow to answer (a VM's idle vCPU can take ~0.1-0.5 ms to wake), splitting a
# call pays off only for more work than SERIAL_BELOW: the split must save at least two round
# trips to the pool.  Measured once per process, on the first call large enough to split, and
# capped (a pool busy with another caller's chunks at that moment would measure them too).
ELEMENTS_PER_SECOND = 1e9       # a kernel's serial speed, roughly (~1 ns a logit: rows, EPYC)
SPLIT_BELOW_MAX = 1 << 21       # ~2 ms of serial work: split calls always pay off there
_split_below = None


def _split_threshold():
    """SERIAL_BELOW, or more, up to SPLIT_BELOW_MAX: 2 x the pool's round trip (median of 5
    empty tasks) x ELEMENTS_PER_SECOND.  (2-core EPYC VM: 0.07-0.16 ms, ~0.3 M logits; bare
    metal: tens of microseconds, SERIAL_BELOW.)"""
    global _split_below
    if _split_below is None:
        pool = _executor()
        trips = []
        for _ in range(5):
            t0 = time.perf_counter()
            pool.submit(int).result()
            trips.append(time.perf_counter() - t0)
        below = int(2 * sorted(trips)[2] * ELEMENTS_PER_SECOND)
        _split_below = min(max(SERIAL_BELOW, below), SPLIT_BELOW_MAX)
    return _split_below


def run_parts(fn, nparts, *args):
    """fn(*args, part, nparts) for every part (see in_parts); one part: here, directly."""
    if nparts <= 1:
        return fn(*args, 0, 1)
    in_parts(fn, nparts, *args)


def in_parts(fn, nparts, *args):
    """fn(*args, chunk, nchunks) for every chunk of a fixed partition of the work into
    CHUNKS_PER_PART * nparts chunks, each run once, claimed one at a time by this thread and
    by the nparts - 1 pool workers it wakes (fn must release the GIL to run in parallel: Numba's
    nogil kernels, NumPy's ufuncs).  An idle worker can take hundreds of microseconds to wake
    (a 2-core EPYC VM: ~0.45 ms, so that a call of 0.1 ms split in two fixed halves took
    0.5 ms); a late worker finds the chunks taken and costs the call nothing.  Chunks are
    fixed task ranges (task_range), so which thread runs one does not change its results."""
    nchunks = CHUNKS_PER_PART * nparts
    next_chunk = itertools.count().__next__         # (atomic: called holding the GIL)

    def work():
        chunk = next_chunk()
        while chunk < nchunks:
            fn(*args, chunk, nchunks)
            chunk = next_chunk()

    futures = [_executor().submit(work) for _ in range(1, nparts)]
    try:
        work()
    finally:
        next_chunk = lambda: nchunks                # (after an error: start no more chunks)
        for future in futures:
            if not future.cancel():     # a worker started: wait for it (and its errors)
                future.result()


# ---------------------------------------------------------------------------------------------
# Backend entry points used by fastce.api (arrays already validated and canonical)
# ---------------------------------------------------------------------------------------------
def _stats_view(t2):
    """Targets (N, S) in the block partition of the kernels: rows (S == 1) as one row (1, N)."""
    return t2.reshape(1, -1) if t2.shape[1] == 1 else t2


def _sum_stats(part):
    """(D, count, first bad flat position or -1) from per-block statistics, in block order."""
    if part.shape[1] == 1:              # one block (small problems): skip NumPy's reductions
        d, cnt, bad = part[:, 0].tolist()
        return d, int(cnt), int(bad)
    bad = part[2][part[2] >= 0]
    return float(part[0].sum()), int(part[1].sum()), (int(bad[0]) if bad.size else -1)


def _n_blocks(tv):
    return tv.shape[0] * blocks_per_row(tv.shape[1])


_BYTE_TARGETS = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8))


def _int64_targets(t):
    """Targets as int64 (the rows kernel's: N targets for N * C logits, C > SMALL_C)."""
    return t if t.dtype == np.int64 else t.astype(np.int64)


def _target_bytes(tv):
    """(the bytes of the (M, S) targets as (M, S * tk) uint8, tk): the block kernels read
    int64, int32 and uint8 targets through one compilation (see _seg_widen); other integer
    dtypes are widened to int64 first.  (uint64 above int64's range was rejected before.)"""
    if tv.dtype not in _BYTE_TARGETS:
        tv = tv.astype(np.int64)
    elif not tv.flags.c_contiguous:
        tv = np.ascontiguousarray(tv)
    return tv.view(np.uint8), tv.itemsize      # (M, S * itemsize): the last axis's bytes


def _writeable(a):
    """A small input (weights, upstream gradient) as a writeable array, copied if it is
    read-only: Numba's type of an array includes its read-only flag, so a read-only weight
    would compile each kernel a second time (seconds) to spare a copy of C numbers."""
    return a if a.flags.writeable else a.copy()


def target_stats(t2, w, ignore_index, C):
    """(D, count, bad_flat_position or -1) over the (N, S) integer targets ``t2``.  The
    weights go in as float64, whatever the logits' dtype: one compilation serves them all, and
    the forward kernels, which sum the same float64 values per block with the same code
    (_seg_stats), get the same bits."""
    tv = _stats_view(t2)
    part = np.empty((3, _n_blocks(tv)))
    tb, tk = _target_bytes(tv)
    launch("_target_stats", tv.size, tb, tk, _writeable(w.astype(np.float64, copy=False)),
           np.int64(ignore_index), np.int64(C), part)
    return _sum_stats(part)


_NO_STATS = np.empty((3, 0))
_NO_LSE = {1: np.empty(0), 2: np.empty((0, 0))}     # lse_out not wanted, by the kernel's ndim
_NO_GRAD = {}


def _no_grad(dtype):
    """The (1, 1, 1) stand-in for the gradient of a forward call (never written: the forward
    variants compile no gradient code), one per logits dtype (float32 for bfloat16)."""
    a = _NO_GRAD.get(dtype)
    if a is None:
        a = _NO_GRAD[dtype] = np.empty((1, 1, 1), np.float32 if is_bfloat16(dtype) else dtype)
    return a


def _float32_copies(x3, grad, opts):
    """(float32 copy of bfloat16 logits, float32 gradient buffer) for the kernels that do not
    read bfloat16 themselves; _round_back then fills grad from the buffer."""
    xf = x3.astype(np.float32)
    gf = grad
    if grad is not None and grad.dtype != np.float32:
        gf = xf if opts.in_place else np.empty(x3.shape, np.float32)   # out=input: in xf
    return xf, gf


def _round_back(gf, grad):
    if gf is not grad:
        grad[...] = gf.astype(grad.dtype)     # to nearest even; NaN stays NaN


def _bf16_bits(a):
    """bfloat16 arrays as their uint16 bits (zero-copy), what the rows kernel reads."""
    return a.view(np.uint16) if is_bfloat16(a.dtype) else a


# The lean path (fastce.api._lean_call: class-index calls of any layout and options, no extra
# outputs): the general path's kernels and arguments (so the same compiled code and the same bits), called
# through their compiled entry points (Numba's dispatcher would resolve the types of 14-18
# arguments on every call, ~3 us) by a LeanPlan holding every argument that does not change
# between calls.  (A compiled wrapper calling the kernels saved ~2.7 us more a call (W3,
# EPYC), but Numba optimises and emits a kernel again inside each function that calls it: +2 s
# on a first call.)
_LEAN_ENTRIES = {}
# (kernel, want_grad, softcap) -> the variant's name in _KERNELS (no token hits)
_LEAN_VARIANTS = {(k, grad, cap): (k, grad, cap, False) for k in ("_index_blocks", "_index_rows")
                  for grad in (False, True) for cap in (False, True)}
_FWD_BLOCKS = _LEAN_VARIANTS[("_index_blocks", False, False)]
_FWD_ROWS = _LEAN_VARIANTS[("_index_rows", False, False)]
_U8 = np.dtype(np.uint8)
_I64 = np.dtype(np.int64)
# A plan keeps the rows kernel's per-row outputs up to this many rows (larger calls allocate
# them: their kernels take far longer than the allocation).
_PLAN_ROWS_MAX = 1 << 12


def _entry(name, key, args):
    """Kernel ``name``'s compiled entry point for ``args``, whose types ``key`` (dtype numbers
    and writeable flags) decides."""
    entry = _LEAN_ENTRIES.get((name, key))
    if entry is None:                   # (a plain function under NUMBA_DISABLE_JIT)
        kernel = _KERNELS[name]
        entry = (kernel.compile(tuple(map(kernel.typeof_pyval, args)))
                 if hasattr(kernel, "compile") else kernel)
        _LEAN_ENTRIES[(name, key)] = entry
    return entry


class LeanPlan:
    """The kernel calls of one lean problem (see fastce.api._lean_call): C-contiguous logits
    viewed as (N, C, S) = ``shape3`` (N: the axes before the class axis, S: those after;
    ``flat``: (N, C) logits), targets of the logits' shape without the class axis, of
    ``tdtype``; ``xw``, ``tw``: whether they are writeable (Numba types a read-only array
    apart: the entry points must be those the dispatcher would pick).

    fastce.api keeps one plan per problem and thread: the sums buffers below are the thread's
    own, written by the kernels and read back within each call."""

    def __init__(self, shape3, xdtype, tdtype, xw, tw, flat, unit=None):
        N, C, S = shape3
        self.unit = unit        # fastce.api's unit weights and options, when it caches them
        self.shape3, self.flat, self.work = shape3, flat, N * C * S
        self.rows = S == 1 and C > SMALL_C      # the rows kernel, after the target pre-pass
        self.tk = tdtype.itemsize               # the targets reach the kernels as bytes
        self.tshape = (1, N * self.tk) if S == 1 else (N, S * self.tk)
        self.nblk = blocks_per_row(N) if S == 1 else N * blocks_per_row(S)
        self.key = (xdtype.num, tdtype.num, xw, tw)
        sums = np.zeros((6, self.nblk))         # the blocks' sums and target statistics
        self.first = sums[:, 0]
        self.ce, self.zl, self.hit, self.stats = sums[0:1], sums[1:2], sums[2:3], sums[3:6]
        self.row_sums = np.empty((3, N)) if self.rows and N <= _PLAN_ROWS_MAX else None
        self.no_grad = _no_grad(xdtype)
        self.one = np.ones(1)                   # the upstream gradient
        self.result = np.empty(1, xdtype)
        self.entries = {}
        # the block kernels' arguments after (x3, tb, tk, w, opts, ignore_index)
        rows = S == 1                   # rows of few classes: the block kernel transposes them
        self.fwd_tail = (self.one, 0, self.no_grad, False, self.ce, self.zl, self.hit,
                         _NO_LSE[2], self.stats, rows)
        # A problem this small runs in the caller's thread whatever the thread count (n_parts):
        # its forward calls the entry point with the part arguments joined once here.
        self.serial = self.work < SERIAL_BELOW
        self.fwd_serial = self.fwd_tail + (0, 1)
        self.grad_tail = (self.ce, self.zl, self.hit, _NO_LSE[2], _NO_STATS, rows)

    def views(self, x, t):
        """The logits (N, C, S) and the targets' bytes as the block kernels take them."""
        if self.flat:
            return x[..., None], t.view(_U8)[None]
        return x.reshape(self.shape3), t.view(_U8).reshape(self.tshape)

    def scalar(self, value):
        """``value`` as a NumPy scalar of the logits' dtype (cheaper than dtype.type)."""
        self.result[0] = value
        return self.result[0]

    def _run(self, name, nparts, args):
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = _entry(name, self.key, args + (0, 1))
        if nparts == 1:
            entry(*args, 0, 1)
        else:
            in_parts(entry, nparts, *args)

    def _target_stats(self, tb, w64, ignore_index):
        """target_stats through its entry point: (D, count, first bad position or -1)."""
        N, C, S = self.shape3
        self._run("_target_stats", n_parts(N * S),
                  (tb, self.tk, w64, ignore_index, C, self.stats))
        return _sum_stats(self.stats)

    def _row_losses(self, name, x3, t, w, opts, ignore_index, grad2, fresh, g, g_stride):
        """The rows kernel ``name``: the per-row losses and z-loss terms (N,) each (new arrays
        when ``fresh``, else maybe the plan's buffers), the gradient into grad2 in the gradient
        variants (upstream gradient g[i * g_stride])."""
        N, C, _ = self.shape3
        ce, zl, hit = (self.row_sums if self.row_sums is not None and not fresh
                       else np.empty((3, N)))
        t = t.reshape(N)
        self._run(name, n_parts(self.work),
                  (x3.reshape(N, C), t if t.dtype == _I64 else t.astype(_I64), w, opts,
                   ignore_index, g, g_stride, grad2, ce, zl, hit, _NO_LSE[1]))
        return ce, zl

    def _per_position(self):
        """New float64 per-position losses and z-loss terms, and scratch for the hits, shaped
        as the block kernels write them ((1, N) for rows, (N, S))."""
        shape = (self.tshape[0], self.tshape[1] // self.tk)
        return np.empty((3,) + shape)

    def forward(self, x, t, w, w64, opts, ignore_index, per_position=False):
        """(losses, z-loss terms, D, count, first bad position or -1) as index_loss(x3, t2, w,
        opts, ignore_index, None, g, 0, per_position, fuse_stats=True) and total() give them:
        w the class weights in the logits' dtype (ones without weights), w64 the same as
        float64, opts the forward's LossOptions, ignore_index a Python int in int64's range.
        The losses and terms are their sums, or new float64 arrays per position
        (``per_position``: reduction="none"); None when a target is bad."""
        x3, tb = self.views(x, t)
        cap = opts.softcap > 0.0
        if self.rows:
            D, count, bad = self._target_stats(tb, w64, ignore_index)
            if bad >= 0:
                return None, None, D, count, bad
            ce, zl = self._row_losses(_LEAN_VARIANTS[("_index_rows", False, cap)], x3, t, w,
                                      opts, ignore_index, self.no_grad[0], per_position,
                                      self.one, 0)
            if per_position:
                return ce, zl, D, count, -1
            return CPUBackend.total(ce), CPUBackend.total(zl), D, count, -1
        name = _LEAN_VARIANTS[("_index_blocks", False, cap)]
        if per_position:
            pos = self._per_position()
            self._run(name, n_parts(self.work),
                      (x3, tb, self.tk, w, opts, ignore_index, self.one, 0, self.no_grad, True,
                       pos[0], pos[1], pos[2], _NO_LSE[2], self.stats, self.fwd_tail[-1]))
            return (pos[0], pos[1]) + _sum_stats(self.stats)
        entry = self.entries.get(name)
        if entry is not None and self.serial:      # (W3: ~0.3 us less than through _run)
            entry(x3, tb, self.tk, w, opts, ignore_index, *self.fwd_serial)
        else:
            self._run(name, n_parts(self.work),
                      (x3, tb, self.tk, w, opts, ignore_index) + self.fwd_tail)
        if self.nblk > 1:
            return ((CPUBackend.total(self.ce), CPUBackend.total(self.zl))
                    + _sum_stats(self.stats))
        total, zsum, _, d, cnt, bad = self.first.tolist()
        return total, zsum, d, int(cnt), int(bad)

    def loss_grad(self, x, t, w, w64, ignore_index, options, mean, per_position=False, g=None,
                  g_stride=0, out=None):
        """(losses, z-loss terms, D, count, first bad position or -1, gradient (N, C, S)) as
        target_stats and index_loss give them to the general path for loss+grad, on forward's
        arguments and ``options`` (label_smoothing, softcap, z_loss, the weights' sum), the
        gradient's scales following from D, count and ``mean``; no gradient (None) when a
        target is bad.  g: the upstream gradient as _check_grad_output gives it,
        g[position * g_stride] (None: 1).  out: the gradient's buffer (C-contiguous, the
        logits' shape and dtype, sharing no memory with any argument), else a new array."""
        x3, tb = self.views(x, t)
        D, count, bad = self._target_stats(tb, w64, ignore_index)
        if bad >= 0:
            return None, None, D, count, bad, None
        if g is None:
            g = self.one
        eps, cap, zl, W = options
        Dz = float(count)
        opts = LossOptions.make(label_smoothing=eps, C=self.shape3[1], weight_sum=W, softcap=cap,
                                grad_scale=ieee_div(1.0, D) if mean else 1.0,
                                z_grad=2.0 * zl * (ieee_div(1.0, Dz) if mean else 1.0),
                                z_loss=zl)
        grad = _alloc.empty(self.shape3, x3.dtype) if out is None else out.reshape(self.shape3)
        if self.rows:
            N, C, _ = self.shape3
            ce, zls = self._row_losses(_LEAN_VARIANTS[("_index_rows", True, cap > 0.0)], x3, t,
                                       w, opts, ignore_index, grad.reshape(N, C), per_position,
                                       g, g_stride)
        else:
            name = _LEAN_VARIANTS[("_index_blocks", True, cap > 0.0)]
            if per_position:
                pos = self._per_position()
                ce, zls = pos[0], pos[1]
                self._run(name, n_parts(self.work),
                          (x3, tb, self.tk, w, opts, ignore_index, g, g_stride, grad, True, ce,
                           zls, pos[2]) + self.grad_tail[3:])
            else:
                self._run(name, n_parts(self.work),
                          (x3, tb, self.tk, w, opts, ignore_index, g, g_stride, grad, False)
                          + self.grad_tail)
                ce, zls = self.ce, self.zl
        if not per_position:
            ce, zls = CPUBackend.total(ce), CPUBackend.total(zls)
        return ce, zls, D, count, -1, grad


def index_loss(x3, t2, w, opts, ignore_index, grad, g, g_stride, per_position=True,
               fuse_stats=False, lse_out=None, den=None):
    """(ce, z-loss, hit, stats).  per_position: ce/z-loss/hit per position (N, S); else arrays
    whose sums are theirs (per-block partial sums, in a fixed partition).  Fills ``grad``
    (N, C, S) when given, and ``lse_out`` (N, S) float64, each position's log-sum-exp, in the
    same pass.  fuse_stats: stats = target_stats(...) computed by the loss kernel
    itself (forward only: the gradient needs the mean's denominator first); when it finds a bad
    target the other outputs are meaningless (but no out-of-range read happened).  Else None.
    den: unused (the host reads the target statistics: see Backend.defers_target_stats)."""
    N, C, S = x3.shape
    if is_bfloat16(x3.dtype) and not (S == 1 and C > SMALL_C):
        # Only the rows kernel reads bfloat16 itself; the others get a float32 copy.
        xf, gf = _float32_copies(x3, grad, opts)
        out = index_loss(xf, t2, w, opts, ignore_index, gf, g, g_stride, per_position,
                         fuse_stats, lse_out)
        _round_back(gf, grad)
        return out
    want = grad is not None
    gbuf = _bf16_bits(grad) if want else _no_grad(x3.dtype)
    work = x3.size
    x3 = _bf16_bits(x3)
    args = (_writeable(w), opts, np.int64(ignore_index), _writeable(g), np.int64(g_stride))
    variant = (want, opts.softcap > 0.0, bool(opts.want_hits))     # (gradient, softcap, hits)
    if S == 1 and C > SMALL_C:
        # Rows: per-row outputs are small; the target statistics come from the pre-pass.
        stats = target_stats(t2, w, ignore_index, C) if fuse_stats else None
        if stats is not None and stats[2] >= 0:
            return None, None, None, stats
        ce, zl, hit = np.empty(N), np.empty(N), np.empty(N)
        launch(("_index_rows",) + variant, work, x3.reshape(N, C),
               _int64_targets(t2.reshape(N)), *args,
               gbuf.reshape(gbuf.shape[0], gbuf.shape[1]), ce, zl, hit,
               _NO_LSE[1] if lse_out is None else lse_out.reshape(N))
        return ce, zl, hit, stats
    tv = _stats_view(t2)
    nblk = _n_blocks(tv)
    if per_position:
        ce, zl, hit = np.empty(tv.shape), np.empty(tv.shape), np.zeros(tv.shape)
        part = np.empty((3, nblk)) if fuse_stats else _NO_STATS
    else:                               # one allocation: block sums and target statistics
        buf = np.zeros((6 if fuse_stats else 3, nblk))
        ce, zl, hit, part = buf[0:1], buf[1:2], buf[2:3], (buf[3:] if fuse_stats else _NO_STATS)
    tb, tk = _target_bytes(tv)
    launch(("_index_blocks",) + variant, work, x3, tb, tk, *args, gbuf, per_position, ce, zl,
           hit, _NO_LSE[2] if lse_out is None else lse_out.reshape(tv.shape), part, S == 1)
    return ce, zl, hit, (_sum_stats(part) if fuse_stats else None)


def prob_loss(x3, p3, w, opts, grad, g, g_stride, lse_out=None):
    N, C, S = x3.shape
    if is_bfloat16(x3.dtype):
        xf, gf = _float32_copies(x3, grad, opts)
        out = prob_loss(xf, p3, w, opts, gf, g, g_stride, lse_out)
        _round_back(gf, grad)
        return out
    ce = np.empty((N, S))
    zl = np.empty((N, S))
    want = grad is not None
    gbuf = grad if want else np.empty((1, 1, 1), x3.dtype)
    launch(("_prob_blocks", want, opts.softcap > 0.0), x3.size, x3, p3, _writeable(w), opts,
           _writeable(g), np.int64(g_stride), gbuf, ce, zl,
           _NO_LSE[2] if lse_out is None else lse_out)
    return ce, zl


def _n_chunks(N, C):
    """Chunks per row for the split-row kernels: 1 (the row kernel) unless the rows are few
    (below SPLIT_ROWS_BELOW) and long enough to split.  A fixed threshold, not the thread
    count: the two paths round differently, and the softmax family's bits must not depend on
    the machine (before stop 16, (2, 100000) float32 softmax differed by ~1e-7 between 1 and 2
    threads)."""
    if C < 2 * CHUNK or N >= SPLIT_ROWS_BELOW:
        return 1
    return -(-C // CHUNK)


def _chunk_stats(x2, b2, K, signed):
    N = x2.shape[0]
    pm, ps, pp = np.empty((N, K)), np.empty((N, K)), np.empty((N, K))
    launch("_lse_chunks", x2.size, x2, b2, np.int64(K),
           pm, ps, pp)
    lse, sgn, mx, logs, inv = (np.empty(N) for _ in range(5))
    launch("_lse_combine", pm.size, pm, ps, pp, signed, lse, sgn, mx, logs, inv)
    return lse, sgn, mx, logs, inv


def softmax_family(x3, mode):
    """mode 0: lse (N, S); 1: (log_softmax, lse); 2: (softmax, lse)."""
    N, C, S = x3.shape
    out = _alloc.empty(x3.shape if mode else (1, 1, 1), x3.dtype)
    if S == 1 and _n_chunks(N, C) > 1:
        x2 = x3.reshape(N, C)
        K = _n_chunks(N, C)
        lse, _, mx, logs, inv = _chunk_stats(x2, None, K, True)
        if mode:
            launch("_softmax_chunks_out", x2.size, x2, np.int64(K), np.int64(mode), mx, logs,
                   inv, out.reshape(N, C))
        return out, lse.reshape(N, 1)
    lse = np.empty((N, S))
    if S == 1:
        launch("_softmax_rows", x3.size, x3.reshape(N, C), np.int64(mode),
               out.reshape(out.shape[0], out.shape[1]), lse.reshape(N))
    else:
        launch("_softmax_strided", x3.size, x3, np.int64(mode), out, lse)
    return out, lse


def lse_weighted(x2, b2, signed):
    """scipy's logsumexp(x, b=b) of each row of x2 (N, C), b2 (N, C) float64: (lse, sign),
    (N,) float64 each; a negative sum gives NaN unless ``signed``."""
    N, C = x2.shape
    lse, sgn, _, _, _ = _chunk_stats(x2, b2, _n_chunks(N, C), signed)
    return lse, sgn


def transpose_copy(x, perm):
    """A C-contiguous copy of x with its axes permuted."""
    return np.ascontiguousarray(np.transpose(x, perm))


def broadcast_copy(x, shape):
    """A C-contiguous copy of x broadcast to ``shape``."""
    return np.ascontiguousarray(np.broadcast_to(x, shape))


# Arrays of ones stand in for absent class weights.  Small ones are cached (never handed out,
# never written); the cache holds at most ONES_CACHE_ENTRIES arrays of at most ONES_CACHE_BYTES.
# They stay writeable: Numba types a read-only array apart, and compiles every kernel once
# more for it (see _writeable).
ONES_CACHE_BYTES = 1 << 18
ONES_CACHE_ENTRIES = 32


@functools.lru_cache(maxsize=ONES_CACHE_ENTRIES)
def _cached_ones(shape, dtype):
    return np.ones(shape, dtype)


def _ones(shape, dtype):
    if math.prod(shape) * dtype.itemsize > ONES_CACHE_BYTES:
        return np.ones(shape, dtype)
    return _cached_ones(shape, dtype)


def _data_pointer(a):
    return a.__array_interface__["data"][0]


class CPUBackend:
    """The ``fastce.backend.Backend`` protocol for NumPy arrays."""

    array_kind = "a NumPy array"
    fuses_target_stats = True       # index_loss(..., fuse_stats=True) is supported
    defers_target_stats = False     # the host reads the target statistics (they cost nothing)
    reads_bfloat16 = True           # ml_dtypes.bfloat16 logits (see index_loss)
    reads_float16 = False           # float16 logits arrive as a float32 copy
    casts_complex = True

    @staticmethod
    def asarray(a):
        return np.asarray(a)

    @staticmethod
    def is_array(a):
        return isinstance(a, np.ndarray)

    @staticmethod
    def is_writeable_c_contiguous(a):
        a = np.asarray(a)
        return bool(a.flags.c_contiguous and a.flags.writeable)

    @staticmethod
    def same_memory(a, b):
        """a and b (C-contiguous) are the same bytes."""
        return _data_pointer(a) == _data_pointer(b) and a.nbytes == b.nbytes

    may_share_memory = staticmethod(np.may_share_memory)

    @staticmethod
    def first_above(t, limit):
        """Flat position of the first element of t above limit, or -1."""
        pos = np.flatnonzero(t.reshape(-1) > limit)
        return int(pos[0]) if pos.size else -1

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype)

    @staticmethod
    def to_host(a):
        return np.asarray(a)

    @staticmethod
    def contiguous(a):
        return np.ascontiguousarray(a)

    @staticmethod
    def cast(a, dtype):
        # (not ascontiguousarray: it makes 0-d arrays 1-d)
        return a.astype(dtype, order="C", copy=False)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def element(a, pos):
        return a.reshape(-1)[pos].item()

    @staticmethod
    def empty(shape, dtype):
        """Large ones from fastce._alloc's pool of recycled buffers (results handed out)."""
        return _alloc.empty(shape, dtype)

    @staticmethod
    def ones(shape, dtype):
        """Ones, cached per shape and dtype (fastce.api only reads them, never hands them out)."""
        return _ones(shape if isinstance(shape, tuple) else (shape,), np.dtype(dtype))

    full = staticmethod(np.full)

    @staticmethod
    def total(a) -> float:
        """Deterministic float64 sum (pairwise, fixed order)."""
        if a.size == 1:                 # a single partial sum (small problems)
            return float(a.reshape(-1)[0])
        return float(a.sum() if a.dtype == np.float64 else a.sum(dtype=np.float64))

    @staticmethod
    def scalar(value, dtype):
        """The loss of a mean/sum reduction: a NumPy scalar of the input's dtype."""
        return np.dtype(dtype).type(value)

    @staticmethod
    def reduce_loss(ce, zl, mean, D, Dz, dtype, dev_den=None, ieee=False):
        total = CPUBackend.total(ce)
        value = (ieee_div(total, D) if ieee else mean_div(total, D)) if mean else total
        if zl is not None:
            zsum = CPUBackend.total(zl)
            value = value + (ieee_div(zsum, Dz) if mean else zsum)
        with np.errstate(over="ignore"):        # float16's inf beyond 65504, as torch's
            return np.dtype(dtype).type(value)

    @staticmethod
    def finish_per_position(ce, zl, shape, dtype):
        per = ce if zl is None else ce + zl
        return per.reshape(shape).astype(dtype, copy=False)

    @staticmethod
    def nll_loss(x3, t2, w, ignore_index):
        ignored = t2 == ignore_index
        safe = np.where(ignored, 0, t2).astype(np.int64)
        picked = np.take_along_axis(x3, safe[:, None, :], axis=1)[:, 0, :].astype(np.float64)
        return np.where(ignored, 0.0, -w[safe] * picked)

    @staticmethod
    def lse_sign(lse):
        return np.where(lse == -math.inf, 0.0, np.where(lse != lse, math.nan, 1.0))

    @staticmethod
    def wrap(a, like, unwrap_0d=False):
        if unwrap_0d and getattr(a, "ndim", None) == 0:
            return a[()]                # a NumPy scalar, as SciPy
        return a

    target_stats = staticmethod(target_stats)
    index_loss = staticmethod(index_loss)
    lean_plan = LeanPlan
    prob_loss = staticmethod(prob_loss)
    softmax_family = staticmethod(softmax_family)
    lse_weighted = staticmethod(lse_weighted)
    transpose_copy = staticmethod(transpose_copy)
    broadcast_copy = staticmethod(broadcast_copy)


BACKEND = CPUBackend()
