"""Mergeable softmax statistics: cross-entropy over a vocabulary split into class shards.

A class shard is ``x[..., c0:c1, ...]`` (the classes ``c0 <= c < c1`` of logits with C classes
in all).  Per position (one entry of the target's shape), its statistics are, with s the
(softcapped) logits, q_c the class weight w_c (label smoothing) or the weighted smoothed
target probability w_c ((1 - eps) p_c + eps / C) (probability targets)::

    m      = max_c s_c                          sumexp = sum_c exp(s_c - m)
    s_t    = the target's logit (if the target is in the shard)
    dev    = sum_c q_c (m - s_c)                qfin   = sum of q_c over the finite s_c
    qsum   = sum_c q_c                          (amax, argmax) = the first maximum of raw x

``merge_stats`` combines shards a, b (in the given order; any number, folded left):

    M      = max(m_a, m_b)                                   (NaN propagates)
    sumexp = sumexp_a exp(m_a - M) + sumexp_b exp(m_b - M)   (exp(...) = 1 when m == M)
    dev    = dev_a + dev_b + qfin_a (M - m_a) + qfin_b (M - m_b)   (a term only when qfin != 0
             and M > m: an all -inf shard moves nothing; its dev is already q * inf)
    qfin, qsum add; s_t comes from the shard holding the target; the argmax with the larger
    value wins, the smaller class index on ties (a NaN maximum wins: no token hit).

``finalize_stats`` evaluates the loss exactly as the unsharded kernels do
(``fastce.elementwise``), with r = log(sumexp), lse = M + r, d_t = M - s_t::

    ce_i  = (1 - eps) w_t (d_t + r) + eps / C (W r + dev)     (class indices; W = sum_c w_c)
    ce_i  = qsum r + dev                                       (probabilities)
    z_i   = z_loss lse^2

and reduces it with the global denominators (the mean divides by the sum of the targets'
weights over the WHOLE batch, the z-loss mean by the count of non-ignored targets; pass
``denominators=`` when the targets are split too).  ``shard_grad`` gives d loss / d x of one
shard from the global lse alone (as Megatron's vocabulary-parallel cross-entropy):
softmax_c = exp(s_c - lse), and the coefficients of ``fastce.elementwise``.

NumPy shards run fastce's Numba kernels (``fastce._shard_kernels``); CuPy shards the same
formulas as array expressions (float64).  Every function takes the FULL class-weight vector
(length C, small enough for every device) and the full target of the positions.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

from . import _alloc, api
from . import elementwise as ew
from .dispatch import backend_for, cpu_backend

__all__ = ["ShardStats", "shard_stats", "merge_stats", "finalize_stats", "shard_grad",
           "target_denominators"]


class ShardStats(NamedTuple):
    """Per-position softmax statistics of a class shard (or of merged shards).

    Arrays have the target's shape (float64; ``has_target`` bool, ``argmax`` int64); fields
    that the options do not need are None.  The remaining fields describe the problem and are
    checked when merging: ``kind`` ("index" or "prob"), ``num_classes`` (C), ``classes`` (how
    many of the C classes the statistics cover), ``softcap``, ``label_smoothing``, ``dtype``
    (the compute dtype of the logits), ``ranges`` (the covered classes, as sorted disjoint
    ``(start, stop)`` pairs: merging overlapping shards raises), ``loss_dtype`` (the dtype of
    the loss, lse and z-loss that ``finalize_stats`` returns: the logits'), ``target`` (the
    class-index targets the statistics were computed with, int64: merging or finalizing with
    other targets raises).
    """
    max: object
    sumexp: object
    target_logit: object
    has_target: object
    dev: object
    qfin: object
    qsum: object
    amax: object
    argmax: object
    kind: str
    num_classes: int
    classes: int
    softcap: object
    label_smoothing: float
    dtype: object
    ranges: tuple = ()
    loss_dtype: object = None
    target: object = None


def _union(a, b):
    """The sorted union of two sets of disjoint class ranges; None where they overlap."""
    out = []
    for lo, hi in sorted(a + b):
        if out and lo < out[-1][1]:
            return None
        if out and lo == out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


class _CupyBackend:
    """The subset of a fastce backend that fastce.api's checks use, on CuPy arrays (the shard
    functions compute with CuPy expressions on the GPU, not with fastce.gpu's kernels)."""

    name = "cupy"

    def __init__(self, cupy):
        self.xp = cupy
        self.asarray = cupy.asarray
        self.contiguous = cupy.ascontiguousarray
        self.to_host = cupy.asnumpy

    def ones(self, shape, dtype):
        return self.xp.ones(shape, dtype)

    def cast(self, a, dtype):
        return a.astype(dtype, order="C", copy=False)

    def element(self, a, pos):
        return a.reshape(-1)[pos].item()

    def first_above(self, t, limit):
        pos = self.xp.flatnonzero(t.reshape(-1) > limit)
        return int(pos[0]) if pos.size else -1

    @staticmethod
    def total(a):
        return float(a.sum(dtype=np.float64))


_CUPY = []


def _backend(**named):
    """(backend, array module): fastce's CPU backend and NumPy for NumPy arrays; for CUDA
    arrays, CuPy (required) for both."""
    be = backend_for(**named)
    if be is cpu_backend():
        return be, np
    if not _CUPY:
        try:
            import cupy
        except ImportError:
            raise TypeError("fastce: the shard functions on the GPU need CuPy arrays (pip "
                            "install cupy-cuda12x)") from None
        _CUPY.append(_CupyBackend(cupy))
    return _CUPY[0], _CUPY[0].xp


def _check_num_classes(num_classes):
    if isinstance(num_classes, (bool, np.bool_)):
        raise TypeError(f"fastce: num_classes must be an int, got {num_classes!r}")
    try:
        C = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"fastce: num_classes must be an int, got {num_classes!r}") from None
    if C < 1:
        raise ValueError(f"fastce: num_classes must be >= 1, got {C}")
    return C


def _check_shard(c0, Cs, C):
    if isinstance(c0, (bool, np.bool_)):
        raise TypeError(f"fastce: c0 must be an int, got {c0!r}")
    try:
        c0 = operator.index(c0)
    except TypeError:
        raise TypeError(f"fastce: c0 must be an int, got {c0!r}") from None
    if c0 < 0 or c0 + Cs > C:
        raise ValueError(f"fastce: the shard's classes [{c0}, {c0 + Cs}) are not within "
                         f"[0, {C}) (num_classes={C})")
    return c0


def _rows_strided(x, axis):
    """A 2-D NumPy (N, Cs) shard, classes last, whose classes are contiguous but whose rows are
    not (x[:, c0:c1] of a C-contiguous array): the rows kernels read it in place."""
    return (isinstance(x, np.ndarray) and x.ndim == 2 and axis == 1 and x.shape[0] > 0
            and x.dtype in (np.float32, np.float64) and not x.flags.c_contiguous
            and x.strides[1] == x.itemsize and x.strides[0] % x.itemsize == 0
            and x.strides[0] >= x.shape[1] * x.itemsize)


class _Shard:
    """The validated, canonical pieces of one shard call."""

    def __init__(self, input, target, c0, num_classes, weight, ignore_index, label_smoothing,
                 softcap, class_axis, z_loss=0.0, reduction="none"):
        be, self.xp = _backend(input=input, target=target, weight=weight)
        self.be = be
        self.eps, self.cap, self.zl = api.check_options(reduction, label_smoothing, softcap,
                                                         z_loss)
        self.softcap = softcap if softcap is None else float(softcap)
        x = api._check_logits(be, input)
        self.in_dtype = x.dtype
        axis = api._class_axis(x, class_axis)
        C = self.C = _check_num_classes(num_classes)
        self.ignore_index = api.check_ignore_index(ignore_index)
        Cs = int(x.shape[axis])
        self.c0 = _check_shard(c0, Cs, C)
        kind, t = api._check_target(be, target, x, axis)
        self.kind = kind
        self.loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
        if _rows_strided(x, axis):       # a class chunk of a larger array: no copy
            x3, N, S = x[:, :, None], int(x.shape[0]), 1
        else:
            x3, N, Cs, S = api._canonical(be, x, axis)
        self.x3, self.N, self.Cs, self.S = x3, N, Cs, S
        cdt = self.dtype = x3.dtype
        w, W = api._check_weight(be, weight, C, cdt)
        self.w, self.W = w, W
        self.ws = be.contiguous(w[self.c0:self.c0 + Cs])
        xp = self.xp
        if kind == "index":
            self.D, self.Dz = api.index_denominators(t, weight, self.ignore_index, C, cdt)
            t2 = be.contiguous(t).reshape(N, S).astype(np.int64)
            self.t2 = t2
            local = t2 - self.c0
            inside = (t2 != self.ignore_index) & (local >= 0) & (local < Cs)
            self.tl = be.contiguous(xp.where(inside, local, -1))
            self.p3 = None
        else:
            if self.ignore_index >= 0:
                raise ValueError("fastce: ignore_index is not supported with probability "
                                 "targets (as in torch, which accepts only a negative one)")
            self.D = self.Dz = float(N * S)
            self.t2 = None
            self.tl = be.contiguous(xp.full((N, S), -1, dtype=np.int64))
            self.p3 = be.contiguous(t.astype(cdt)).reshape(N, Cs, S)
        self.keep = 1.0 - self.eps
        self.smooth_c = self.eps / C


# ---------------------------------------------------------------------------------------------
# Statistics of one shard
# ---------------------------------------------------------------------------------------------
def _stats_xp(xp, x3, tl, p3, ws, keep, smooth_c, cap, want_dev, want_argmax):
    """The statistics as float64 array expressions (CuPy shards; the kernels' reference)."""
    N, Cs, S = x3.shape
    out = xp.zeros((8, N, S))
    xf = x3.astype(np.float64)
    if Cs == 0:
        out[0] = -math.inf
        out[6] = -math.inf
        out[7] = -1
        return out
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        raw_m = xf.max(axis=1)
        s = cap * xp.tanh(xf / cap) if cap else xf
        ms = cap * xp.tanh(raw_m / cap) if cap else raw_m
        finite = (ms > -math.inf) & (ms < math.inf)
        shift = xp.where(finite, ms, 0.0)
        se = xp.exp(s - shift[:, None, :]).sum(axis=1)
        se = xp.where(finite, se, xp.where(ms == -math.inf, 0.0, math.nan))
        out[0], out[1] = ms, se
        st = xp.take_along_axis(s, xp.maximum(tl, 0)[:, None, :], axis=1)[:, 0, :]
        out[2] = xp.where(tl >= 0, st, 0.0)
        if want_dev:
            wf = ws.astype(np.float64)[None, :, None]
            q = wf * (keep * p3.astype(np.float64) + smooth_c) if p3 is not None else \
                xp.broadcast_to(wf, xf.shape)
            neg = s == -math.inf
            out[3] = xp.where(neg, q * math.inf, q * (ms[:, None, :] - s)).sum(axis=1)
            out[4] = xp.where(neg, 0.0, q).sum(axis=1)
            out[5] = q.sum(axis=1)
        if want_argmax:
            out[6] = raw_m
            out[7] = xp.argmax(xf, axis=1)
    return out


def _shard_stats(sh, want_argmax, exps=None):
    """(8, N, S) float64 statistics of the validated shard ``sh`` (exps: see
    ``_shard_stats_exps``)."""
    want_dev = sh.kind == "prob" or sh.eps != 0.0
    if sh.xp is np and sh.Cs > 0:
        from . import _shard_kernels
        return _shard_kernels.stats(sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                                    want_dev, want_argmax, exps)
    return _stats_xp(sh.xp, sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                     want_dev, want_argmax)


def _to_stats(sh, out, want_argmax):
    xp = sh.xp
    shp = sh.loss_shape
    want_dev = sh.kind == "prob" or sh.eps != 0.0
    return ShardStats(
        max=out[0].reshape(shp), sumexp=out[1].reshape(shp),
        target_logit=out[2].reshape(shp) if sh.kind == "index" else None,
        has_target=(sh.tl >= 0).reshape(shp) if sh.kind == "index" else None,
        dev=out[3].reshape(shp) if want_dev else None,
        qfin=out[4].reshape(shp) if want_dev else None,
        qsum=out[5].reshape(shp) if sh.kind == "prob" else None,
        amax=out[6].reshape(shp) if want_argmax else None,
        argmax=(xp.where(out[7] >= 0, out[7] + sh.c0, sh.C).astype(np.int64).reshape(shp)
                if want_argmax else None),
        kind=sh.kind, num_classes=sh.C, classes=sh.Cs, softcap=sh.softcap,
        label_smoothing=sh.eps, dtype=np.dtype(sh.dtype),
        ranges=((sh.c0, sh.c0 + sh.Cs),) if sh.Cs else (),
        loss_dtype=np.dtype(api._loss_dtype(sh.in_dtype)),
        target=sh.t2.reshape(shp) if sh.kind == "index" else None)


def shard_stats(input, target, c0, num_classes, weight=None, *, ignore_index=-100,
                label_smoothing=0.0, softcap=None, class_axis=None, argmax=False):
    """The mergeable statistics of the class shard ``input`` (its classes are
    ``c0 .. c0 + input.shape[class_axis] - 1`` of ``num_classes``).

    target: class indices of the positions (any class in [0, num_classes) or ignore_index;
        targets outside the shard are not errors) or the shard's slice of the class
        probabilities (float, the input's shape).
    weight: the FULL (num_classes,) class weights, or None.
    argmax: also keep the first argmax (for ``return_token_accuracy``).
    label_smoothing, softcap, class_axis, ignore_index: as ``fastce.cross_entropy``.
    """
    sh = _Shard(input, target, c0, num_classes, weight, ignore_index, label_smoothing, softcap,
                class_axis)
    return _to_stats(sh, _shard_stats(sh, argmax), argmax)


def _keeps_exps(sh):
    """Whether the statistics pass can keep its exps for the gradient: NumPy rows layout,
    class-index targets, no softcap (its derivative needs the softcapped logits again)."""
    return (sh.xp is np and sh.S == 1 and sh.kind == "index" and not sh.cap and sh.N > 0
            and sh.Cs > 0)


def _shard_stats_exps(input, target, c0, num_classes, weight=None, *, ignore_index=-100,
                      label_smoothing=0.0, softcap=None, class_axis=None, argmax=False,
                      out=None):
    """(shard_stats(...), exps): when the shard's gradient will be wanted, the statistics pass
    also stores exp(s_c - m) (m: the shard's max), gradient-sized, so that
    ``_shard_grad_exps`` rescales them in place instead of reading the logits and computing
    every exp again (the in-memory loss+grad kernel's trick, across the merge).  exps is None
    where the shard cannot (see _keeps_exps); else ``out`` (an (N, Cs) array of the logits'
    dtype whose rows are contiguous, where the gradient is wanted), or a new buffer."""
    sh = _Shard(input, target, c0, num_classes, weight, ignore_index, label_smoothing, softcap,
                class_axis)
    exps = None
    if _keeps_exps(sh):
        if out is None:
            exps = _alloc.empty((sh.N, sh.Cs), sh.dtype)
        elif tuple(out.shape) != (sh.N, sh.Cs) or out.dtype != sh.dtype:
            raise ValueError(f"fastce: out must be a {(sh.N, sh.Cs)} {sh.dtype} array, got "
                             f"{tuple(out.shape)} {out.dtype}")
        else:
            exps = out
    return _to_stats(sh, _shard_stats(sh, argmax, exps), argmax), exps


def _shard_grad_exps(exps, local, input, target, c0, num_classes, lse, weight=None, **kw):
    """shard_grad(input, target, c0, num_classes, lse, weight, **kw), from the exps and the
    shard's own statistics ``local`` of ``_shard_stats_exps`` (exps is overwritten by the
    gradient); shard_grad itself when exps is None."""
    if exps is None:
        return shard_grad(input, target, c0, num_classes, lse, weight, **kw)
    return _shard_grad(input, target, c0, num_classes, lse, weight, exps=exps,
                       local_max=local.max, **kw)


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------
def _module_of(a):
    if isinstance(a, (np.ndarray, np.generic)):     # (0-d statistics merge into scalars)
        return np
    import cupy                         # a device array: the statistics are CuPy arrays
    return cupy


def _merge2(a, b):
    xp = _module_of(a.max)
    with np.errstate(invalid="ignore", over="ignore"):
        M = xp.maximum(a.max, b.max)
        ea = xp.where(a.max == M, 1.0, xp.exp(a.max - M))
        eb = xp.where(b.max == M, 1.0, xp.exp(b.max - M))
        sumexp = a.sumexp * ea + b.sumexp * eb
        dev = qfin = None
        if a.dev is not None:
            dev = a.dev + b.dev
            dev = dev + xp.where((a.qfin != 0) & (M > a.max), a.qfin * (M - a.max), 0.0)
            dev = dev + xp.where((b.qfin != 0) & (M > b.max), b.qfin * (M - b.max), 0.0)
            qfin = a.qfin + b.qfin
    qsum = a.qsum + b.qsum if a.qsum is not None else None
    st = has = None
    if a.kind == "index":
        st = xp.where(a.has_target, a.target_logit, b.target_logit)
        has = a.has_target | b.has_target
    amax = arg = None
    if a.amax is not None and b.amax is not None:
        a_wins = ((a.amax > b.amax) | ((a.amax == b.amax) & (a.argmax <= b.argmax))
                  | xp.isnan(a.amax))
        amax = xp.where(a_wins, a.amax, b.amax)
        arg = xp.where(a_wins, a.argmax, b.argmax)
    if a.target is not None and not bool(xp.array_equal(a.target, b.target)):
        raise ValueError("fastce: cannot merge statistics computed with different targets")
    ranges = _union(a.ranges, b.ranges)
    if ranges is None:
        raise ValueError(f"fastce: cannot merge statistics of overlapping class ranges "
                         f"{_show(a.ranges)} and {_show(b.ranges)} (each shard once)")
    return a._replace(max=M, sumexp=sumexp, target_logit=st, has_target=has, dev=dev,
                      qfin=qfin, qsum=qsum, amax=amax, argmax=arg,
                      classes=a.classes + b.classes, ranges=ranges)


def _show(ranges):
    return ", ".join(f"[{lo}, {hi})" for lo, hi in ranges) or "none"


def merge_stats(*stats):
    """Merge the statistics of disjoint class shards, left to right (associative: any
    grouping gives the same numbers up to float rounding, and a fixed grouping the same bits).
    Takes ShardStats arguments or one sequence of them."""
    if len(stats) == 1 and not isinstance(stats[0], ShardStats):
        stats = tuple(stats[0])
    if not stats:
        raise ValueError("fastce: merge_stats needs at least one ShardStats")
    first = stats[0]
    for s in stats:
        if not isinstance(s, ShardStats):
            raise TypeError(f"fastce: merge_stats takes ShardStats, got {type(s).__name__}")
        for f in ("kind", "num_classes", "softcap", "label_smoothing", "dtype", "loss_dtype"):
            if getattr(s, f) != getattr(first, f):
                raise ValueError(f"fastce: cannot merge statistics with different {f}: "
                                 f"{getattr(first, f)!r} and {getattr(s, f)!r}")
        if tuple(s.max.shape) != tuple(first.max.shape):
            raise ValueError(f"fastce: cannot merge statistics of different positions: shapes "
                             f"{tuple(first.max.shape)} and {tuple(s.max.shape)}")
    out = first
    for s in stats[1:]:
        out = _merge2(out, s)
    if out.classes > out.num_classes:
        raise ValueError(f"fastce: the merged statistics cover {out.classes} classes, more than "
                         f"num_classes={out.num_classes}: shards overlap")
    return out


# ---------------------------------------------------------------------------------------------
# Finalize
# ---------------------------------------------------------------------------------------------
class _Parts(NamedTuple):
    ce: object          # per position (float64), 0 where ignored
    z: object           # per position z-loss, or None
    hit: object         # per position 0/1, or None
    lse: object         # per position float64
    D: float
    Dz: float
    count: int


def _check_complete(st):
    if st.classes != st.num_classes or st.ranges != ((0, st.num_classes),):
        raise ValueError(f"fastce: the statistics cover the classes {_show(st.ranges)} of "
                         f"num_classes={st.num_classes}: merge the statistics of every shard "
                         f"first")


def finalize_parts(st, target, weight=None, *, ignore_index=-100, z_loss=0.0,
                   want_hit=False):
    """Per-position loss pieces of complete statistics (fastce.dask_backend's building block)."""
    _check_complete(st)
    xp = _module_of(st.max)
    be, _ = _backend(target=target, weight=weight)
    ignore_index = api.check_ignore_index(ignore_index)
    zl = float(z_loss)
    C = st.num_classes
    keep, smooth_c = 1.0 - st.label_smoothing, st.label_smoothing / C
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = xp.log(st.sumexp)
        # the reported lse (elementwise.reported_lse): the max itself where it is +-inf
        lse = xp.where(xp.isinf(st.max), st.max, st.max + r)
        hit = None
        if st.kind == "index":
            t = be.asarray(target)
            if t.dtype.kind not in "iu":
                raise TypeError("fastce: these statistics are of class-index targets; target "
                                f"must be an integer array, got dtype {t.dtype}")
            if tuple(t.shape) != tuple(st.max.shape):
                raise ValueError(f"fastce: target must have the statistics' shape "
                                 f"{tuple(st.max.shape)}, got {tuple(t.shape)}")
            if st.target is not None and not bool(xp.array_equal(t, st.target)):
                raise ValueError("fastce: target differs from the targets the statistics were "
                                 "computed with")
            D, count = api.check_index_target(t, weight, ignore_index, C, st.dtype)
            w, W = api._check_weight(be, weight, C, st.dtype)
            t = t.astype(np.int64)
            valid = t != ignore_index
            if bool(xp.any(valid & ~st.has_target)):
                raise ValueError("fastce: the statistics hold no target logit for some "
                                 "positions: compute every shard with the same targets")
            safe = xp.where(valid, t, 0)
            w_t = w.astype(np.float64)[safe]
            dev = st.dev if st.dev is not None else 0.0
            ce = ew.index_loss(r, st.max - st.target_logit, w_t, W, dev, keep, smooth_c)
            ce = xp.where(valid, ce, 0.0)
            z = xp.where(valid, zl * lse * lse, 0.0) if zl else None
            if want_hit:
                if st.amax is None:
                    raise ValueError("fastce: token accuracy needs statistics computed with "
                                     "argmax=True")
                hit = (valid & (st.argmax == t) & ~xp.isnan(st.amax)).astype(np.float64)
            return _Parts(ce, z, hit, lse, D, float(count), int(count))
        ce = ew.prob_loss(r, st.qsum, st.dev)
        z = zl * lse * lse if zl else None
        n = int(math.prod(st.max.shape))
        return _Parts(ce, z, None, lse, float(n), float(n), n)


def _total(xp, a):
    return float(a.sum(dtype=np.float64)) if a.size else 0.0


def finalize_stats(stats, target, weight=None, *, ignore_index=-100, reduction="mean",
                   z_loss=0.0, denominators=None, return_lse=False, return_z_loss=False,
                   return_token_accuracy=False):
    """Loss (and extras) from the merged statistics of all C classes.

    target: the positions' class indices (the statistics' shape), ignored for probability
    targets (pass None).  weight: the full (C,) class weights.  reduction "none" | "sum" |
    "mean"; the mean divides by ``denominators=(D, Dz)`` when given (the whole batch's sum of
    target weights and count of non-ignored targets, when the positions are split as well),
    else by those of ``target``.  Returns the loss (in the logits' dtype), or a
    ``CrossEntropyOutput`` with the extras asked for; ``lse`` is per position.
    """
    st = stats
    if not isinstance(st, ShardStats):
        raise TypeError(f"fastce: finalize_stats takes ShardStats, got {type(st).__name__}")
    eps, _, zl = api.check_options(reduction, st.label_smoothing, st.softcap, z_loss)
    xp = _module_of(st.max)
    parts = finalize_parts(st, target, weight, ignore_index=ignore_index, z_loss=zl,
                           want_hit=return_token_accuracy and st.kind == "index")
    D, Dz = (parts.D, parts.Dz) if denominators is None else map(float, denominators)
    dt = st.loss_dtype
    mean = reduction == "mean"
    if reduction == "none":
        per = parts.ce + parts.z if parts.z is not None else parts.ce
        loss = per.astype(dt)
        zpart = (parts.z if parts.z is not None else xp.zeros(per.shape)).astype(dt)
    else:
        total = _total(xp, parts.ce)
        value = api._mean(total, D) if mean else total
        zs = _total(xp, parts.z) if parts.z is not None else 0.0
        zv = api._div(zs, Dz) if mean else zs
        if parts.z is not None:
            value = value + zv
        with np.errstate(over="ignore"):        # float16's inf beyond 65504, as torch's
            loss = dt.type(value)
            zpart = dt.type(zv)
    if not (return_lse or return_z_loss or return_token_accuracy):
        return loss
    acc = None
    if return_token_accuracy:
        acc = (api._div(_total(xp, parts.hit), parts.count)
               if (parts.hit is not None and parts.count) else math.nan)
    return api.CrossEntropyOutput(loss, zpart if return_z_loss else None, acc,
                                  parts.lse.astype(dt) if return_lse else None)


# ---------------------------------------------------------------------------------------------
# Gradient of one shard
# ---------------------------------------------------------------------------------------------
def _grad_output(xp, grad_output, reduction, shape):
    if grad_output is None:
        return 1.0
    g = xp.asarray(grad_output, dtype=np.float64)
    if reduction == "none":
        if tuple(g.shape) != tuple(shape):
            raise ValueError(f"fastce: with reduction='none', grad_output must have the loss's "
                             f"shape {tuple(shape)}, got {tuple(g.shape)}")
        return g
    if g.size != 1 or g.ndim > 1:
        raise ValueError(f"fastce: with reduction={reduction!r}, grad_output must be a scalar, "
                         f"got shape {tuple(g.shape)}")
    return float(g.reshape(()))


def shard_coefficients(sh, lse, A, g, D, Dz, mean):
    """(6, N, S) float64 per-position coefficients of ``_shard_kernels.grad``."""
    xp = sh.xp
    N, S = sh.N, sh.S
    lse = xp.asarray(lse, dtype=np.float64).reshape(N, S)
    inv_D = api._div(1.0, D) if mean else 1.0
    z2 = 2.0 * sh.zl * (api._div(1.0, Dz) if mean else 1.0)
    if not isinstance(g, float):
        g = g.reshape(N, S)
    coef = xp.zeros((6, N, S))
    with np.errstate(invalid="ignore", over="ignore"):
        if sh.kind == "index":
            valid = sh.t2 != sh.ignore_index
            w_t = sh.w.astype(np.float64)[xp.where(valid, sh.t2, 0)]
            alpha, beta, gamma = ew.index_grad_coefs(g, lse, w_t, sh.W, sh.keep, sh.smooth_c,
                                                     inv_D, z2)
            coef[2] = xp.where(valid, beta, 0.0)
            coef[3] = xp.where(valid, gamma, 0.0)
        else:
            valid = xp.ones((N, S), dtype=bool)
            alpha, beta = ew.prob_grad_coefs(g, lse, xp.asarray(A, dtype=np.float64).reshape(N, S),
                                             inv_D, z2)
            coef[2] = beta
        anchor = lse.astype(sh.dtype).astype(np.float64)
        k = xp.exp(anchor - lse)
        coef[0] = lse
        coef[1] = xp.where(valid, alpha * k, 0.0)
        coef[4] = valid
        coef[5] = anchor
    return coef


def _grad_xp(sh, coef):
    """The shard's gradient as array expressions (CuPy shards)."""
    xp = sh.xp
    xf = sh.x3.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = sh.cap * xp.tanh(xf / sh.cap) if sh.cap else xf
        lse, scale, beta, gamma, valid, anchor = (coef[i][:, None, :] for i in range(6))
        e = xp.exp(s - anchor) * scale
        wf = sh.ws.astype(np.float64)[None, :, None]
        if sh.kind == "index":
            g = e - gamma * wf
            cls = xp.arange(sh.Cs)[None, :, None]
            g = g - xp.where(cls == sh.tl[:, None, :], beta, 0.0)
        else:
            g = e - beta * wf * (sh.keep * sh.p3.astype(np.float64) + sh.smooth_c)
        if sh.cap:
            g = g * (1.0 - (s / sh.cap) ** 2)
        g = xp.where(lse != lse, math.nan, g)
        g = xp.where(valid != 0, g, 0.0)
    return g.astype(sh.dtype)


def shard_grad(input, target, c0, num_classes, lse, weight=None, *, grad_output=None,
               ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
               z_loss=0.0, class_axis=None, denominators=None, target_mass=None):
    """d loss / d input for the class shard ``input`` (classes c0 .. of num_classes), given
    the global per-position log-sum-exp ``lse`` (the target's shape; from ``finalize_stats(...,
    return_lse=True)``), or the merged ``ShardStats`` themselves.

    The options are those the loss was computed with.  ``denominators=(D, Dz)``: the mean's
    (default: those of ``target``).  Probability targets (``target`` is the shard's slice of
    the probabilities) also need ``target_mass``, sum_c w_c ((1 - eps) p_c + eps / C) over ALL
    classes per position (the merged statistics' ``qsum``; given when ``lse`` is a
    ShardStats).  Returns the gradient in the input's shape and dtype.
    """
    return _shard_grad(input, target, c0, num_classes, lse, weight, grad_output=grad_output,
                       ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
                       class_axis=class_axis, denominators=denominators,
                       target_mass=target_mass)


def _shard_grad(input, target, c0, num_classes, lse, weight, *, grad_output=None,
                ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
                z_loss=0.0, class_axis=None, denominators=None, target_mass=None, exps=None,
                local_max=None):
    sh = _Shard(input, target, c0, num_classes, weight, ignore_index, label_smoothing, softcap,
                class_axis, z_loss, reduction)
    xp = sh.xp
    if isinstance(lse, ShardStats):
        st = lse
        _check_complete(st)
        if sh.kind == "prob" and target_mass is None:
            target_mass = st.qsum
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = st.max + xp.log(st.sumexp)
    lse = xp.asarray(lse)
    if tuple(lse.shape) != sh.loss_shape:
        raise ValueError(f"fastce: lse must have the target's shape {sh.loss_shape}, got "
                         f"{tuple(lse.shape)}")
    if sh.kind == "prob":
        if target_mass is None:
            raise ValueError("fastce: the gradient for probability targets needs target_mass "
                             "(the merged statistics' qsum), or pass the merged ShardStats")
        target_mass = xp.asarray(target_mass)
    g = _grad_output(xp, grad_output, reduction, sh.loss_shape)
    D, Dz = (sh.D, sh.Dz) if denominators is None else map(float, denominators)
    out_shape = tuple(api._check_logits(sh.be, input).shape)
    if sh.N * sh.S == 0 or sh.Cs == 0:
        return xp.zeros(out_shape, sh.in_dtype)
    coef = shard_coefficients(sh, lse, target_mass, g, D, Dz, reduction == "mean")
    if exps is not None:
        from . import _shard_kernels
        grad = _shard_kernels.grad_stored(exps, sh.tl, sh.ws, coef, local_max)
    elif sh.xp is np:
        from . import _shard_kernels
        grad = _shard_kernels.grad(sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                                   coef)
    else:
        grad = _grad_xp(sh, coef)
    return _restore_layout(xp, grad, sh, input, class_axis).astype(sh.in_dtype, copy=False)


def _restore_layout(xp, grad3, sh, input, class_axis):
    """(N, Cs, S) -> the input's shape (the canonical view is a reshape of it)."""
    shape = tuple(xp.asarray(input).shape) if not hasattr(input, "shape") else tuple(input.shape)
    return grad3.reshape(shape)


def target_denominators(target, weight=None, *, num_classes, ignore_index=-100,
                        dtype=np.float32):
    """(D, Dz) of class-index targets: the sum of the non-ignored targets' weights (cast to
    the logits' compute ``dtype``) and their count.  Add them over the parts of a batch split
    by positions and pass the sums as ``denominators=`` for the whole batch's mean."""
    C = _check_num_classes(num_classes)
    dtype = np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)
    return api.index_denominators(target, weight, ignore_index, C, dtype)
