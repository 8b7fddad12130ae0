"""Numba CPU kernels of ``fastce.shards``: the mergeable softmax statistics of a class shard and
the gradient of a shard given the global log-sum-exp (imported on first use).

Logits are canonical (N, C, S) as everywhere in fastce (C: the shard's classes); in the rows
layout the rows may be strided (a class chunk of a larger array: see ``_rows_of``).  Two layouts,
as in ``fastce.cpu``: rows (S == 1, one task per row, loops along the contiguous classes) and
strided (S > 1, a task is BLOCK positions of one n, loops along the contiguous positions), so
that LLVM vectorises every pass.  The exp, softcap and NaN-propagating max are fastce.cpu's;
the kernels run through ``fastce.cpu.launch`` (one thread, or shares of their tasks on its
thread pool), registered under their own names.

Statistics rows of ``out`` (K, N, S), float64:
    0 m      max of the (softcapped) logits (NaN if any is NaN; -inf when all are -inf)
    1 sumexp sum_c exp(s_c - m)   (0 for an all -inf shard, NaN for a NaN or +inf max)
    2 s_t    the softcapped target logit where the target is in the shard (tl >= 0), else 0
    3 dev    sum_c q_c (m - s_c), a -inf logit adding q_c * inf     (want_dev only)
    4 qfin   sum of q_c over the finite logits                        (want_dev only)
    5 qsum   sum of q_c over all classes                              (probability targets)
    6 amax   max of the raw logits                                    (want_argmax only)
    7 argmax first local index of amax (-1 if none)                   (want_argmax only)
q_c is the class weight w_c (label smoothing with class-index targets) or the weighted,
smoothed target probability w_c ((1 - eps) p_c + eps / C) (probability targets).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _alloc, cpu
from .cpu import (_INLINE, LOG2E, cast_like, exp2_nonpos, exp2_nonpos_exact, fmaximum,
                  softcap_fast)
from .cpu import (SUM_GROUP, _block_max, _row_exp_sum_store, _seg_copy,  # shared passes
                  _seg_exp_acc, _seg_flush, _seg_softcap)
from .cpu import (_softcap_grad_factor, block_bounds, blocks_per_row, np_empty, np_zeros,
                  task_range)
from .options import ShardOptions

K_STATS = 8
_INF = math.inf


# ---------------------------------------------------------------------------------------------
# Small vectorisable helpers
# ---------------------------------------------------------------------------------------------
@njit(**_INLINE)
def _max(row):
    m = cast_like(-_INF, row)
    for c in range(row.shape[0]):
        m = fmaximum(m, row[c])
    return m


@njit(**_INLINE)
def _exp_sum(row, ms, log2e):
    acc = ms - ms
    for c in range(row.shape[0]):
        acc += exp2_nonpos((row[c] - ms) * log2e)
    return acc


@njit(**_INLINE)
def _exp_sum_cap(row, ms, log2e, capf, inv_capf):
    acc = ms - ms
    for c in range(row.shape[0]):
        acc += exp2_nonpos((cast_like(softcap_fast(row[c], capf, inv_capf), row) - ms) * log2e)
    return acc


@njit(**_INLINE)
def _capped(v, has_cap, capf, inv_capf):
    """v softcapped, in v's dtype (softcap_fast widens float32 to float64: the loops that use
    the result would then run in float64, 2.8x slower)."""
    return cast_like(softcap_fast(v, capf, inv_capf), v) if has_cap else v


@njit(**_INLINE)
def _sumexp_of(ms, acc):
    """The shard's sum of exps from the loop's accumulator; its special cases by the max."""
    if ms != ms or ms == _INF:
        return math.nan
    if ms == -_INF:
        return 0.0                      # every logit is -inf (a NaN would have made m NaN)
    return np.float64(acc)


@njit(**_INLINE)
def _dev_add(s, ms, q, dev, qfin):
    if s == -_INF:
        return dev + q * _INF, qfin
    return dev + q * (np.float64(ms) - np.float64(s)), qfin + q


@njit(**_INLINE)
def _q(wc, opts, p, at):
    """q_c: the class weight wc, times the smoothed target probability p[at] for probability
    targets (p is only read then: else it is a (1, 1[, 1]) placeholder)."""
    return wc * (opts.keep * np.float64(p[at]) + opts.smooth_c) if opts.is_prob else wc


@njit(**_INLINE)
def _caps(opts, like):
    """(has_cap, cap, 1 / cap) of opts' softcap, the last two in like's dtype."""
    has_cap = opts.softcap > 0.0
    return (has_cap, cast_like(opts.softcap, like),
            cast_like(1.0 / opts.softcap if has_cap else 0.0, like))


# ---------------------------------------------------------------------------------------------
# Statistics (opts: fastce.options.ShardOptions)
# ---------------------------------------------------------------------------------------------
def _stats_rows(xf, ld, N, C, tl, p, w, opts, out, ex, eld, part, nparts):
    """Row i of the shard is xf[i * ld : i * ld + C].  ex: where to store each exp(s_c - m)
    (no softcap), for grad_rows_stored, row i at ex[i * eld : i * eld + C]; or an empty
    placeholder."""
    store = ex.shape[0] > 0
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        row = xf[i * ld:i * ld + C]
        has_cap, capf, inv_capf = _caps(opts, row)
        log2e = cast_like(LOG2E, row)
        m = _max(row)
        ms = _capped(m, has_cap, capf, inv_capf)
        if ms > -_INF and ms < _INF:
            if store:
                acc = _row_exp_sum_store(row, ms, log2e, ex[i * eld:i * eld + C])
            elif has_cap:
                acc = _exp_sum_cap(row, ms, log2e, capf, inv_capf)
            else:
                acc = _exp_sum(row, ms, log2e)
        else:
            acc = ms - ms
            if store:           # every exp is 0 (ms = -inf); else the gradient row is NaN
                ex[i * eld:i * eld + C] = 0
        out[0, i] = np.float64(ms)
        out[1, i] = _sumexp_of(ms, acc)
        ti = tl[i]
        out[2, i] = np.float64(_capped(row[ti], has_cap, capf, inv_capf)) if ti >= 0 else 0.0
        if opts.want_dev:
            dev = 0.0
            qfin = 0.0
            qsum = 0.0
            for c in range(C):
                q = _q(np.float64(w[c]), opts, p, (i, c))
                qsum += q
                dev, qfin = _dev_add(_capped(row[c], has_cap, capf, inv_capf), ms, q, dev, qfin)
            out[3, i] = dev
            out[4, i] = qfin
            out[5, i] = qsum
        if opts.want_argmax:
            out[6, i] = np.float64(m)
            idx = -1
            for c in range(C):
                if row[c] == m:
                    idx = c
                    break
            out[7, i] = idx


@njit(**_INLINE)
def _block_sumexp(x, n, s0, ms, capf, inv_capf, has_cap, m, acc, sc):
    """acc_j <- sum_c exp(s_cj - ms_j) over block positions s0 + j of x[n] (m: scratch);
    positions whose max is not finite are shifted by 0 (their special cases are taken later)."""
    L = ms.shape[0]
    log2e = cast_like(LOG2E, x)
    for j in range(L):
        m[j] = ms[j] if ms[j] > -_INF and ms[j] < _INF else 0
    acc[:] = 0
    C = x.shape[1]
    tot = np_empty(L if C > SUM_GROUP else 0, np.float64)      # (see fastce.cpu.SUM_GROUP)
    for c in range(C):
        if has_cap:
            _seg_softcap(x[n, c, s0:s0 + L], capf, inv_capf, sc)
            _seg_exp_acc(sc, m, log2e, acc)
        else:
            _seg_exp_acc(x[n, c, s0:s0 + L], m, log2e, acc)
        if C > SUM_GROUP and ((c + 1) % SUM_GROUP == 0 or c + 1 == C):
            _seg_flush(acc, tot, c < SUM_GROUP, c + 1 == C)


@njit(**_INLINE)
def _block_dev(x, n, s0, p, w, opts, ms, capf, inv_capf, has_cap, out):
    """Statistics rows 3-5 (dev, qfin, qsum) of the block's positions."""
    L = ms.shape[0]
    f64 = np_zeros((3, L), np.float64)
    for c in range(x.shape[1]):
        wc = np.float64(w[c])
        for j in range(L):
            s = _capped(x[n, c, s0 + j], has_cap, capf, inv_capf)
            q = _q(wc, opts, p, (n, c, s0 + j))
            f64[2, j] += q
            f64[0, j], f64[1, j] = _dev_add(s, ms[j], q, f64[0, j], f64[1, j])
    for j in range(L):
        out[3, n, s0 + j] = f64[0, j]
        out[4, n, s0 + j] = f64[1, j]
        out[5, n, s0 + j] = f64[2, j]


@njit(**_INLINE)
def _block_argmax(x, n, s0, m, out):
    """Statistics rows 6-7 (amax, first argmax) of the block's positions; m: their max."""
    L = m.shape[0]
    first = np_empty(L, np.float64)
    for j in range(L):
        first[j] = -1.0
    for c in range(x.shape[1] - 1, -1, -1):
        for j in range(L):
            if x[n, c, s0 + j] == m[j]:
                first[j] = c
    for j in range(L):
        out[6, n, s0 + j] = np.float64(m[j])
        out[7, n, s0 + j] = first[j]


def _stats_strided(x, tl, p, w, opts, out, part, nparts):
    N, C, S = x.shape
    nblk = blocks_per_row(S)
    lo, hi = task_range(N * nblk, part, nparts)
    for task in range(lo, hi):
        n, s0, L = block_bounds(np.int64(task), nblk, S)
        has_cap, capf, inv_capf = _caps(opts, x)
        scratch = np_empty((4, L), x.dtype)
        m, ms, acc, sc = scratch[0], scratch[1], scratch[2], scratch[3]
        if C:
            _block_max(x[n], s0, m, ms)     # (ms: scratch until below)
        else:
            m[:] = -_INF
        if has_cap:
            _seg_softcap(m, capf, inv_capf, ms)
        else:
            _seg_copy(m, ms)        # (a slice assignment compiles NumPy's shape-error path)
        if opts.want_argmax:
            _block_argmax(x, n, s0, m, out)
        _block_sumexp(x, n, s0, ms, capf, inv_capf, has_cap, m, acc, sc)   # (m: scratch now)
        for j in range(L):
            out[0, n, s0 + j] = np.float64(ms[j])
            out[1, n, s0 + j] = _sumexp_of(ms[j], acc[j])
            ti = tl[n, s0 + j]
            out[2, n, s0 + j] = (np.float64(_capped(x[n, ti, s0 + j], has_cap, capf, inv_capf))
                                 if ti >= 0 else 0.0)
        if opts.want_dev:
            _block_dev(x, n, s0, p, w, opts, ms, capf, inv_capf, has_cap, out)


# ---------------------------------------------------------------------------------------------
# Gradient of a shard.  coef (6, N, S) float64: lse, alpha, beta, gamma, valid, k; where
#   dL/ds_c = alpha softmax_c - beta [c == t] - gamma w_c            (class-index targets)
#   dL/ds_c = alpha softmax_c - beta q_c                             (probability targets)
# softmax_c = exp(s_c - a) * k with a = lse rounded to the logits' dtype and k = exp(a - lse):
# s_c - a is exact (both in the logits' dtype), so float32 loses nothing to lse's magnitude.
# opts: fastce.options.ShardOptions.
# ---------------------------------------------------------------------------------------------
@njit(**_INLINE)
def _row_grad(row, gr, a, scale, gmw, w, log2e):
    for c in range(row.shape[0]):
        gr[c] = exp2_nonpos_exact((row[c] - a) * log2e) * scale - gmw * w[c]


@njit(**_INLINE)
def _row_grad_cap(row, gr, a, scale, gmw, w, log2e, capf, inv_capf):
    one = capf - capf + 1
    for c in range(row.shape[0]):
        s = cast_like(softcap_fast(row[c], capf, inv_capf), row)
        q = s * inv_capf
        gr[c] = (exp2_nonpos_exact((s - a) * log2e) * scale - gmw * w[c]) * (one - q * q)


@njit(**_INLINE)
def _grad_entry(xv, wc, is_target, opts, p, at, has_cap, capf, inv_capf, a, alpha, beta,
                gamma):
    """dL/dx of one logit xv (is_target: c == t; p[at]: its target probability, see _q): the
    shared element formula of the probability-target rows and the strided layout."""
    sf = _capped(xv, has_cap, capf, inv_capf)
    e = np.float64(exp2_nonpos_exact((sf - a) * cast_like(LOG2E, a)))
    if opts.is_prob:
        v = e * alpha - beta * _q(wc, opts, p, at)
    else:
        v = e * alpha - gamma * wc
        if is_target:
            v -= beta
    if has_cap:
        v *= _softcap_grad_factor(np.float64(sf), 1.0 / opts.softcap)
    return v


def _grad_rows(xf, ld, N, C, tl, p, w, opts, coef, grad, part, nparts):
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        row = xf[i * ld:i * ld + C]
        gr = grad[i]
        if coef[4, i] == 0.0:
            gr[:] = 0
            continue
        lse = coef[0, i]
        if lse != lse:
            gr[:] = math.nan
            continue
        has_cap, capf, inv_capf = _caps(opts, row)
        a = cast_like(coef[5, i], row)
        beta = coef[2, i]
        if opts.is_prob:
            for c in range(C):
                gr[c] = _grad_entry(row[c], np.float64(w[c]), False, opts, p, (i, c), has_cap,
                                    capf, inv_capf, a, coef[1, i], beta, 0.0)
            continue
        log2e = cast_like(LOG2E, row)
        scale = cast_like(coef[1, i], row)
        gmw = cast_like(coef[3, i], row)
        if has_cap:
            _row_grad_cap(row, gr, a, scale, gmw, w, log2e, capf, inv_capf)
        else:
            _row_grad(row, gr, a, scale, gmw, w, log2e)
        ti = tl[i]
        if ti >= 0:
            f = 1.0
            if has_cap:
                f = _softcap_grad_factor(np.float64(softcap_fast(row[ti], capf, inv_capf)),
                                         1.0 / opts.softcap)
            gr[ti] -= cast_like(beta * f, row)


def _grad_rows_stored(ex, eld, N, C, tl, w, coef, ms, part, nparts):
    """_grad_rows (index targets, no softcap) in place on the exps that _stats_rows stored
    (row i at ex[i * eld : i * eld + C]) relative to the shard's max ms:
    exp(s_c - a) = ex_c exp(ms - a), so no exp per element."""
    lo, hi = task_range(N, part, nparts)
    for i in range(lo, hi):
        gr = ex[i * eld:i * eld + C]
        if coef[4, i] == 0.0:
            gr[:] = 0
            continue
        if coef[0, i] != coef[0, i]:
            gr[:] = math.nan
            continue
        f = cast_like(coef[1, i] * math.exp(ms[i] - coef[5, i]), gr)   # ms = -inf: f = 0
        gmw = cast_like(coef[3, i], gr)
        for c in range(C):
            gr[c] = gr[c] * f - gmw * w[c]
        ti = tl[i]
        if ti >= 0:
            gr[ti] -= cast_like(coef[2, i], gr)


def _grad_strided(x, tl, p, w, opts, coef, grad, part, nparts):
    N, C, S = x.shape
    nblk = blocks_per_row(S)
    lo, hi = task_range(N * nblk, part, nparts)
    for task in range(lo, hi):
        n, s0, L = block_bounds(np.int64(task), nblk, S)
        has_cap, capf, inv_capf = _caps(opts, x)
        for c in range(C):
            wc = np.float64(w[c])
            for j in range(L):
                pos = s0 + j
                lse = coef[0, n, pos]
                if coef[4, n, pos] == 0.0:
                    grad[n, c, pos] = 0
                elif lse != lse:
                    grad[n, c, pos] = math.nan
                else:
                    grad[n, c, pos] = _grad_entry(
                        x[n, c, pos], wc, tl[n, pos] == c, opts, p, (n, c, pos), has_cap, capf,
                        inv_capf, cast_like(coef[5, n, pos], x), coef[1, n, pos],
                        coef[2, n, pos], coef[3, n, pos])


_NAMES = {"stats_rows": _stats_rows, "stats_strided": _stats_strided,
          "grad_rows": _grad_rows, "grad_strided": _grad_strided,
          "grad_rows_stored": _grad_rows_stored}
_REGISTERED = {}


def _register():
    if not _REGISTERED:
        for short, fn in _NAMES.items():
            name = "_shard_" + short
            fn.__name__ = name
            fn.__qualname__ = name
            cpu._KERNELS.setdefault(name, cpu._kernel(fn))
            _REGISTERED[short] = name
    return _REGISTERED


_EMPTY3 = {}


def _dummy(dtype):
    a = _EMPTY3.get(np.dtype(dtype))
    if a is None:
        a = _EMPTY3[np.dtype(dtype)] = np.zeros((1, 1, 1), dtype)
    return a


def _span(x2, writeable=False):
    """(flat, ld): the rows of the 2-D x2 as one contiguous 1-D span of its memory, from its
    first element to its last, and the distance between row starts (elements); None unless
    only the rows are strided, as in a class chunk x[:, c0:c1] of a C-contiguous array (Dask's
    chunks of an in-memory array, or a tile of a gradient slab)."""
    N, C = x2.shape
    it = x2.itemsize
    if x2.flags.c_contiguous:
        return x2.reshape(-1), C
    if (N > 0 and (C == 1 or x2.strides[1] == it) and x2.strides[0] % it == 0
            and x2.strides[0] >= C * it):
        ld = x2.strides[0] // it
        return np.lib.stride_tricks.as_strided(x2, shape=((N - 1) * ld + C,), strides=(it,),
                                               writeable=writeable), ld
    return None


def _rows_of(x2):
    """_span of the logits x2, or of a contiguous copy of them."""
    span = _span(x2)
    return span if span is not None else (np.ascontiguousarray(x2).reshape(-1), x2.shape[1])


_NO_EXPS = {}


def _exps_span(exps, dtype):
    """(flat, ld) of the (N, C) exps to write (see _span), or an empty placeholder."""
    if exps is None:
        a = _NO_EXPS.get(np.dtype(dtype))
        if a is None:
            a = _NO_EXPS[np.dtype(dtype)] = np.zeros(0, dtype)
        return a, 0
    span = _span(exps, writeable=True)
    if span is None or not exps.flags.writeable:
        raise ValueError("fastce: exps must be a writeable array whose rows are contiguous")
    return span


def stats(x3, tl, p3, w, keep, smooth_c, cap, want_dev, want_argmax, exps=None):
    """(K_STATS, N, S) float64 statistics of the shard x3 (N, C, S); see the module doc.
    exps: an (N, C) array to store each exp(s_c - m) in (rows layout, no softcap), for
    grad_stored."""
    names = _register()
    N, C, S = x3.shape
    out = np.zeros((K_STATS, N, S))
    is_prob = p3 is not None
    opts = ShardOptions(float(keep), float(smooth_c), float(cap), is_prob, bool(want_dev),
                        bool(want_argmax))
    p = p3 if is_prob else _dummy(x3.dtype)
    if S == 1:
        p2 = p.reshape(p.shape[0], p.shape[1])
        xf, ld = _rows_of(x3.reshape(N, C))
        ex, eld = _exps_span(exps, x3.dtype)
        cpu.launch(names["stats_rows"], x3.size, xf, ld, N, C, tl.reshape(N), p2, w, opts,
                   out.reshape(K_STATS, N), ex, eld)
    else:
        cpu.launch(names["stats_strided"], x3.size, x3, tl, p, w, opts, out)
    return out


def grad(x3, tl, p3, w, keep, smooth_c, cap, coef, out=None):
    """dL/dx of the shard x3 (N, C, S) in its dtype, from the per-position coefficients."""
    names = _register()
    N, C, S = x3.shape
    g = _alloc.empty(x3.shape, x3.dtype) if out is None else out   # recycled, see _alloc
    is_prob = p3 is not None
    opts = ShardOptions(float(keep), float(smooth_c), float(cap), is_prob)
    p = p3 if is_prob else _dummy(x3.dtype)
    if S == 1:
        p2 = p.reshape(p.shape[0], p.shape[1])
        xf, ld = _rows_of(x3.reshape(N, C))
        cpu.launch(names["grad_rows"], x3.size, xf, ld, N, C, tl.reshape(N), p2, w, opts,
                   coef.reshape(coef.shape[0], N), g.reshape(N, C))
    else:
        cpu.launch(names["grad_strided"], x3.size, x3, tl, p, w, opts, coef, g)
    return g


def grad_stored(exps, tl, w, coef, ms):
    """The gradient of a rows-layout shard (index targets, no softcap), written over the
    (N, C) exps that stats(..., exps=) stored; ms: the shard's (N,) max from those stats."""
    names = _register()
    N, C = exps.shape
    ex, eld = _exps_span(exps, exps.dtype)
    cpu.launch(names["grad_rows_stored"], exps.size, ex, eld, N, C, tl.reshape(N), w,
               coef.reshape(coef.shape[0], N), np.ascontiguousarray(ms, np.float64).reshape(N))
    return exps
