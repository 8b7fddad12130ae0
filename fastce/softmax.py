"""The softmax family as a drop-in for ``scipy.special``: logsumexp, softmax, log_softmax.

SciPy's signatures and semantics (``axis`` None = all axes, an int or a tuple of ints;
``keepdims``; ``b`` scale factors, possibly negative or zero, with ``return_sign``; NaN, inf,
empty and 0-d inputs as SciPy), plus torch's keyword-only ``dtype=`` (the input is cast to it,
computed and returned in it).  Backend-neutral: this module normalises the axes, views the
input as (N, C, S) with the reduced axes merged into C, and hands that to the backend's kernels
(``softmax_family`` and ``lse_weighted``), which apply SciPy's rules for non-finite groups.

Layout: the reduced axes, once size-1 axes are ignored, are merged into one axis without a
copy when they are adjacent (axes (1, 2) of a C-contiguous (A, B, C) array is (A, B*C, 1);
``axis=None`` is (1, size, 1)).  Otherwise logsumexp (without ``b``) reduces one run of
adjacent axes after another, each a view; softmax, log_softmax and weighted logsumexp move the
reduced axes last in one transposed copy (and softmax / log_softmax transpose their result
back: another copy).
"""
from __future__ import annotations

import math
import operator

import numpy as np

from .dispatch import backend_for

__all__ = ["logsumexp", "softmax", "log_softmax"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------
def _axis_error(msg):
    """ValueError (NumPy's AxisError, which is also an IndexError, as SciPy raises)."""
    try:
        return np.exceptions.AxisError(msg)
    except AttributeError:                  # NumPy < 1.25
        return np.AxisError(msg)


def normalize_axis(axis, ndim):
    """Sorted tuple of the distinct axes in [0, ndim) named by ``axis`` (None: all)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        items, single = list(axis), False
    else:
        items, single = [axis], True
    out = []
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            raise TypeError(f"fastce: axis must be None, an int or a tuple of ints, got "
                            f"{axis!r}")
        try:
            i = operator.index(a)
        except TypeError:
            raise TypeError(f"fastce: axis must be None, an int or a tuple of ints, got "
                            f"{axis!r}") from None
        if not -ndim <= i < ndim:
            raise _axis_error(f"fastce: axis {i} is out of range for an array of {ndim} "
                              f"dimension{'s' if ndim != 1 else ''}"
                              + ("" if single else f" (axis={axis!r})"))
        i %= ndim
        if i in out:
            raise ValueError(f"fastce: axis={axis!r} names axis {i} twice")
        out.append(i)
    return tuple(sorted(out))


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"fastce: dtype must be float16, float32 or float64, got "
                        f"{dtype!r}") from None
    if dt not in _FLOATS:
        raise TypeError(f"fastce: dtype must be float16, float32 or float64, got {dt}")
    return dt


def _check_input(be, a, name, dtype=None):
    x = be.asarray(a)
    if x.dtype.kind == "c" and dtype is not None and be.casts_complex:
        return x                            # torch's dtype=: cast first (the imaginary part goes)
    if x.dtype.kind in "fiu" and not x.dtype.isnative:
        x = be.cast(x, x.dtype.newbyteorder("="))   # big-endian: one native-order copy
    if x.dtype.kind not in "fiub" or (x.dtype.kind == "f" and x.dtype not in _FLOATS):
        raise TypeError(f"fastce: {name} must be a real array (float16, float32, float64, or "
                        f"integers / bools, computed in float64), got dtype {x.dtype}")
    return x


def _float_dtype(dt):
    """SciPy's promotion: floating dtypes stay, integers and bools become float64."""
    dt = np.dtype(dt)
    if dt.kind != "f":
        return np.dtype(np.float64)
    if dt not in _FLOATS:
        raise TypeError(f"fastce: unsupported floating dtype {dt} (float16/32/64 only)")
    return dt


def _compute_dtype(dt):
    """float16 is computed in float32."""
    return np.dtype(np.float32) if dt == np.float16 else dt


# ---------------------------------------------------------------------------------------------
# Layout: the reduced axes as the C of an (N, C, S) view
# ---------------------------------------------------------------------------------------------
def _layout(shape, axes):
    """('view', (N, C, S)) when the reduced axes are adjacent once size-1 axes are ignored
    (a reshape of a C-contiguous array), else ('move', perm, (N, C)): the reduced axes moved
    last by one transposed copy."""
    if len(axes) == 1:                  # one axis: always a view
        a = axes[0]
        return "view", (math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:]))
    big = [d for d in range(len(shape)) if shape[d] != 1]
    red = [d for d in big if d in axes]
    if not red:                         # nothing of size > 1 is reduced: groups of one
        return "view", (math.prod(shape), 1, 1)
    i0 = big.index(red[0])
    if big[i0:i0 + len(red)] == red:
        N = math.prod(shape[d] for d in big[:i0])
        C = math.prod(shape[d] for d in red)
        S = math.prod(shape[d] for d in big[i0 + len(red):])
        return "view", (N, C, S)
    kept = [d for d in range(len(shape)) if d not in axes]
    perm = tuple(kept + list(axes))
    return "move", perm, (math.prod(shape[d] for d in kept), math.prod(shape[d] for d in axes))


def _grouped(be, x, layout, rows=False):
    """x as (N, C, S) (or (N, C, 1) when ``rows``), copied only when it must be."""
    if layout[0] == "view" and (layout[1][2] == 1 or not rows):
        return be.contiguous(x).reshape(layout[1])
    if layout[0] == "view":             # strided groups, rows wanted: move the axes
        N, C, S = layout[1]
        x3 = be.contiguous(x).reshape(N, C, S)
        return be.transpose_copy(x3, (0, 2, 1)).reshape(N * S, C, 1)
    _, perm, (N, C) = layout
    return be.transpose_copy(x, perm).reshape(N, C, 1)


def _lse_runs(be, x, shape, axes):
    """float64 logsumexp of x over ``axes`` (keepdims shape).  Axes that are not adjacent are
    reduced one run of adjacent axes at a time, the last run first: lse over (0, 2) is lse over
    0 of lse over 2, each a view, with no transposed copy of x (the special values compose:
    NaN stays NaN, +inf stays +inf, all -inf stays -inf)."""
    layout = _layout(shape, axes)
    kept = tuple(1 if d in axes else n for d, n in enumerate(shape))
    if layout[0] == "view":
        _, lse = be.softmax_family(be.contiguous(x).reshape(layout[1]), 0)
        return lse.reshape(kept)
    big = [d for d in range(len(shape)) if shape[d] != 1]
    red = [d for d in big if d in axes]
    run = [red[-1]]
    while len(run) < len(red) and big.index(red[-len(run) - 1]) == big.index(run[0]) - 1:
        run.insert(0, red[-len(run) - 1])
    inner = _lse_runs(be, x, shape, tuple(run))
    rest = tuple(a for a in axes if a not in run)
    return _lse_runs(be, inner, tuple(inner.shape), rest)


def _broadcast(be, x, shape):
    if tuple(x.shape) == shape:
        return x
    if math.prod(x.shape) == math.prod(shape):      # only size-1 axes differ
        return be.contiguous(x).reshape(shape)
    return be.broadcast_copy(x.reshape(tuple(x.shape) or (1,)), shape)


def _host_result(be, r, like):
    return be.wrap(r, like, unwrap_0d=True)     # NumPy: a scalar, as SciPy


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, *, dtype=None):
    """``log(sum(b * exp(a), axis))``, as ``scipy.special.logsumexp``.

    a: array_like (float16/32/64; integers and bools are computed in float64).
    axis: None (all axes, the default), an int or a tuple of ints; negative axes count from
        the end.  A 0-d ``a`` is treated as 1-d (axis 0 or -1 allowed), as SciPy.
    b: scale factors broadcastable with ``a`` (may be negative, or zero: an entry with
        ``b == 0`` adds nothing even when ``a`` is inf or NaN).  The result's dtype is SciPy's
        promotion of a and b (a Python scalar b does not widen it).
    keepdims: keep the reduced axes with size 1.
    return_sign: return ``(log|sum|, sign(sum))``; without it a negative sum gives NaN.
    dtype: (keyword-only, as torch) cast ``a`` (and ``b``) to this float dtype and compute and
        return in it.

    Special values, as SciPy: a NaN in a group gives NaN; a +inf gives +inf (with weights:
    +inf times the sign of its weight, NaN for mixed signs); a group of -inf only (or of zero
    weights, or summing to exactly zero) gives -inf with sign 0; an empty input gives -inf with
    sign -1.  float16 is computed in float32.
    """
    be = backend_for(a=a, b=b)
    x = _check_input(be, a, "a", dtype)
    bb, bspec = None, None
    if b is not None:
        if isinstance(b, (bool, int, float)) and not isinstance(b, np.generic):
            bspec = b                      # a Python scalar: weak in NumPy 2's promotion
            bb = be.asarray(np.float64(b))
        else:
            bb = _check_input(be, b, "b")
            bspec = bb.dtype
    if dtype is not None:
        rdt = _check_dtype(dtype)
    elif bb is None:
        rdt = _float_dtype(x.dtype)
    else:
        rdt = _float_dtype(np.result_type(x.dtype, bspec))
    cdt = _compute_dtype(rdt)

    shape = tuple(x.shape)
    if bb is not None:
        try:
            shape = tuple(np.broadcast_shapes(shape, tuple(bb.shape)))
        except ValueError:
            raise ValueError(f"fastce: b of shape {tuple(bb.shape)} does not broadcast with a "
                             f"of shape {tuple(x.shape)}") from None
    eff = shape if shape else (1,)          # SciPy: at least 1-d
    axes = normalize_axis(axis, len(eff))
    kept_shape = tuple(1 if d in axes else n for d, n in enumerate(eff))
    out_shape = kept_shape if keepdims else tuple(n for d, n in enumerate(eff) if d not in axes)

    if math.prod(eff) == 0:
        lse = be.full(out_shape, -math.inf, rdt)
        sgn = be.full(out_shape, -1.0, rdt) if return_sign else None
    else:
        if dtype is not None and rdt != x.dtype:
            x = be.cast(x, rdt)             # torch: cast first (float16 rounds the input)
        x = _broadcast(be, be.cast(x, cdt), eff)
        layout = _layout(eff, axes)
        if bb is None:
            lse = _lse_runs(be, x, eff, axes)
            sgn = None
            if return_sign:
                sgn = be.lse_sign(lse)
        else:
            if rdt != np.float64:           # b as the result dtype (SciPy promotes both)
                bb = be.cast(bb, rdt)
            bb = be.cast(bb, np.float64)
            bb = _broadcast(be, bb, eff)
            x3 = _grouped(be, x, layout, rows=True)
            b3 = _grouped(be, bb, layout, rows=True)
            N, C, _ = x3.shape
            lse, sgn = be.lse_weighted(x3.reshape(N, C), b3.reshape(N, C), bool(return_sign))
            if not return_sign:
                sgn = None
        lse = be.cast(lse.reshape(out_shape), rdt)
        if sgn is not None:
            sgn = be.cast(sgn.reshape(out_shape), rdt)
    lse = _host_result(be, lse, a)
    if return_sign:
        return lse, _host_result(be, sgn, a)
    return lse


def _softmax_call(x_in, axis, dtype, mode):
    be = backend_for(x=x_in)
    x = _check_input(be, x_in, "x", dtype)
    rdt = _check_dtype(dtype) if dtype is not None else _float_dtype(x.dtype)
    cdt = _compute_dtype(rdt)
    shape = tuple(x.shape)
    eff = shape if shape else (1,)
    axes = normalize_axis(axis, len(eff))
    if math.prod(eff) == 0:                 # as torch (SciPy's max of nothing raises)
        return be.wrap(be.empty(shape, rdt), x_in)
    if dtype is not None and rdt != x.dtype:
        x = be.cast(x, rdt)                 # torch: cast first (float16 rounds the input)
    x = be.cast(x, cdt)
    layout = _layout(eff, axes)
    out, _ = be.softmax_family(_grouped(be, x, layout), mode)
    if layout[0] == "move":
        perm = layout[1]
        moved = tuple(eff[d] for d in perm)
        out = be.transpose_copy(out.reshape(moved), tuple(int(i) for i in np.argsort(perm)))
    out = be.cast(out.reshape(shape), rdt)
    return _host_result(be, out, x_in)


def softmax(x, axis=None, *, dtype=None):
    """``exp(x) / sum(exp(x), axis)``, as ``scipy.special.softmax`` (torch's ``dtype=`` too).

    axis: None (all axes, the default), an int or a tuple of ints.  A group whose max is not
    finite (a NaN, a +inf, or only -inf) gives NaN, as SciPy.  Empty input: an empty result
    (as torch; SciPy raises).  0-d input: 1.0 (axis None, 0 or -1).
    """
    return _softmax_call(x, axis, dtype, 2)


def log_softmax(x, axis=None, *, dtype=None):
    """``x - logsumexp(x, axis)`` computed as ``(x - max) - log(sum(exp(x - max)))``, as
    ``scipy.special.log_softmax`` (and torch's ``dtype=``).

    Special values as SciPy: NaN where the group holds a NaN or only -inf; with a +inf in the
    group, NaN at the +inf entries and -inf elsewhere.  Empty and 0-d input as ``softmax``.
    """
    return _softmax_call(x, axis, dtype, 1)
