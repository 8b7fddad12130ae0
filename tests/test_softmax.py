"""fastce.logsumexp / softmax / log_softmax against scipy.special (and torch's OpInfo samples).

Backend-neutral tests take the ``backend`` fixture (ids "cpu" / "gpu"; the GPU cases run under
the Numba CUDA simulator with ``-k gpu`` and keep their shapes small).  Hypothesis sweeps and
the split-row (long row) kernels run on the CPU only.
"""
from __future__ import annotations

import math
import sys
import types
import unittest
import warnings

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastce

fsm = sys.modules["fastce.softmax"]     # the module (fastce.softmax is the function)

# SciPy (and the simulator's NumPy scalars) warn on exp overflow, log(0), inf - inf.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FUNCS = ("logsumexp", "softmax", "log_softmax")
INF, NAN = math.inf, math.nan
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3}
# Absolute floors, for results near 0 (log_softmax near the max: (x - max) - log(sum) carries
# the sum's rounding, an absolute error): float64 100x tighter than its relative tolerance.
ATOL = {np.dtype(np.float64): 1e-14, np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3}


def scipy_ref(name, x, axis=None, **kw):
    """scipy.special's result computed in float64 (float16/32 inputs: their values upcast)."""
    x64 = np.asarray(x).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "b" in kw and kw["b"] is not None:
            kw = dict(kw, b=np.asarray(kw["b"], np.float64))
        return getattr(sp, name)(x64, axis=axis, **kw)


def check(got, want, dtype, what="", cond=None):
    """got (a backend result, as NumPy) equals want: shape, dtype, NaN/inf pattern, values
    within the dtype's relative tolerance plus an absolute floor (times ``cond``, the condition
    number of a weighted sum, where given)."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype} != {np.dtype(dtype)}"
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    rtol = RTOL[np.dtype(dtype)]
    assert np.array_equal(np.isnan(g), np.isnan(w)), f"{what}: NaNs differ\n{g}\n{w}"
    inf = np.isinf(w)
    assert np.array_equal(g[inf], w[inf]), f"{what}: infs differ\n{g}\n{w}"
    fin = np.isfinite(w)
    if fin.any():
        scale = 1.0 if cond is None else np.asarray(cond, np.float64)
        err = np.abs(g - w)
        lim = rtol * np.abs(w) + ATOL[np.dtype(dtype)] * scale
        bad = fin & ~(err <= lim)
        assert not bad.any(), (f"{what}: max rel err {np.max(err[fin] / np.abs(w[fin]).clip(1e-300))}"
                               f"\n{g[bad][:5]}\n{w[bad][:5]}")


def call(backend, name, x, *args, **kw):
    out = getattr(fastce, name)(backend.to(x), *args, **kw)
    if isinstance(out, tuple):
        return tuple(backend.host(o) for o in out)
    return backend.host(out)


def axes_for(ndim):
    """Axis forms worth testing for an ndim-d array."""
    forms = [None, -1, 0, ()]
    if ndim >= 2:
        forms += [(0, ndim - 1), (-1, 0), tuple(range(ndim))]
    if ndim >= 3:
        forms += [(1, 2), (0, 2), (-2,)]
    out = []
    for f in forms:
        if f not in out:
            out.append(f)
    return out


# ---------------------------------------------------------------------------------------------
# Every axis form, keepdims, on both backends
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_axis_forms_match_scipy(backend, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    for axis in axes_for(len(shape)):
        for name in FUNCS:
            check(call(backend, name, x, axis), scipy_ref(name, x, axis), dtype, f"{name} {axis}")
        got = call(backend, "logsumexp", x, axis, keepdims=True)
        check(got, scipy_ref("logsumexp", x, axis, keepdims=True), dtype, f"keepdims {axis}")


def test_default_axis_is_none(backend):
    x = np.random.default_rng(1).standard_normal((3, 4))
    for name in FUNCS:
        check(call(backend, name, x), getattr(sp, name)(x), np.float64, name)
    assert np.asarray(call(backend, "logsumexp", x)).shape == ()


def test_results_are_numpy_scalars_and_c_contiguous():
    x = np.random.default_rng(2).standard_normal((3, 4, 5))
    assert isinstance(fastce.logsumexp(x), np.float64)
    assert isinstance(fastce.logsumexp(x.astype(np.float32)), np.float32)
    out = fastce.softmax(x, axis=(0, 2))           # moved axes: transposed back into place
    assert out.flags.c_contiguous and out.shape == x.shape
    np.testing.assert_allclose(out.sum(axis=(0, 2)), 1.0, rtol=1e-12)


_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def _case(draw):
    shape = draw(_shapes)
    nd = len(shape)
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-nd, nd - 1))
    else:
        axes = draw(st.lists(st.integers(0, nd - 1), unique=True, max_size=nd))
        axis = tuple(a - nd if draw(st.booleans()) else a for a in axes)
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, axis, seed


@settings(max_examples=150, deadline=None)
@given(_case(), st.sampled_from([np.float64, np.float32, np.float16]), st.booleans())
def test_hypothesis_random_shapes_and_axes(case, dtype, keepdims):
    shape, axis, seed = case
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    for name in ("softmax", "log_softmax"):
        check(getattr(fastce, name)(x, axis), scipy_ref(name, x, axis).astype(dtype), dtype,
              f"{name} {shape} {axis}")
    check(fastce.logsumexp(x, axis, keepdims=keepdims),
          scipy_ref("logsumexp", x, axis, keepdims=keepdims).astype(dtype), dtype, "logsumexp")


def _weighted_cond(x, b, axis):
    """sum |b exp(x)| / |sum b exp(x)| per group: the condition number of the weighted sum."""
    with np.errstate(all="ignore"):
        m = np.max(np.where(b != 0, x, -np.inf), axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(x - m)
        num = np.sum(np.abs(b) * e, axis=axis)
        den = np.abs(np.sum(b * e, axis=axis))
        return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_case(), st.booleans(), st.booleans(), st.sampled_from(["signs", "positive", "zeros"]))
def test_hypothesis_weights_and_signs(case, keepdims, return_sign, bkind):
    shape, axis, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    b = rng.standard_normal(shape)
    if bkind == "positive":
        b = np.abs(b)
    elif bkind == "zeros":
        b[rng.random(shape) < 0.4] = 0.0
    got = fastce.logsumexp(x, axis, b=b, keepdims=keepdims, return_sign=return_sign)
    want = sp.logsumexp(x, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign)
    cond = np.reshape(_weighted_cond(x, b, axis), np.shape(want[0] if return_sign else want))
    if return_sign:
        check(got[0], want[0], np.float64, "lse", cond=cond)
        well = np.asarray(cond) < 1e6
        np.testing.assert_array_equal(np.asarray(got[1])[well], np.asarray(want[1])[well])
    else:
        well = np.asarray(cond) < 1e6          # the sign of a cancelling sum is rounding
        g, w = np.asarray(got), np.asarray(want)
        check(np.where(well, g, 0.0), np.where(well, w, 0.0), np.float64, "lse",
              cond=cond)


@pytest.mark.parametrize("axis", [None, 1, (0, 2), -1])
def test_weights_signs_and_zeros(backend, axis):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5)) * 2
    b = rng.standard_normal((3, 4, 5))
    b[rng.random(b.shape) < 0.3] = 0.0
    x[b == 0] = rng.choice([INF, -INF, NAN], size=int((b == 0).sum()))  # ignored where b == 0
    for keepdims in (False, True):
        lse, sgn = call(backend, "logsumexp", x, axis, b=backend.to(b), keepdims=keepdims,
                        return_sign=True)
        want, wsgn = sp.logsumexp(x, axis=axis, b=b, keepdims=keepdims, return_sign=True)
        cond = _weighted_cond(x, b, axis)
        well = np.reshape(cond, np.shape(want)) < 1e6
        check(np.where(well, lse, 0), np.where(well, want, 0), np.float64, "lse")
        np.testing.assert_array_equal(np.asarray(sgn)[well], np.asarray(wsgn)[well])
        plain = call(backend, "logsumexp", x, axis, b=backend.to(b), keepdims=keepdims)
        ref = sp.logsumexp(x, axis=axis, b=b, keepdims=keepdims)
        check(np.where(well, plain, 0), np.where(well, ref, 0), np.float64, "no sign")


def test_weights_broadcast_and_promote():
    rng = np.random.default_rng(4)
    x32 = rng.standard_normal((3, 4)).astype(np.float32)
    for b in (2.0, np.float32(2.0), rng.random(4).astype(np.float32), [1, -1, 2, 0.5],
              rng.random((2, 1, 4)), np.int8(3)):
        for axis in (None, -1, 0):
            want = sp.logsumexp(x32, axis=axis, b=b, return_sign=True)
            got = fastce.logsumexp(x32, axis, b=b, return_sign=True)
            check(got[0], want[0], np.asarray(want[0]).dtype, f"b={b!r} axis={axis}")
            np.testing.assert_array_equal(got[1], want[1])
    got = fastce.logsumexp(rng.standard_normal(4), b=rng.random((3, 4)), axis=-1)
    assert got.shape == (3,)                    # a broadcast against b, as SciPy


def test_weights_on_the_gpu(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3))
    b = rng.standard_normal(3)                  # broadcast along axis 0 on the device
    for axis in (None, 1, 0):
        got = call(backend, "logsumexp", x, axis, b=backend.to(b), return_sign=True)
        want = sp.logsumexp(x, axis=axis, b=b, return_sign=True)
        check(got[0], want[0], np.float64, "lse")
        np.testing.assert_array_equal(got[1], want[1])
    check(call(backend, "logsumexp", x, 1, b=2.0), sp.logsumexp(x, axis=1, b=2.0), np.float64,
          "scalar b")
    a1 = rng.standard_normal(3)                 # a broadcast against b
    check(call(backend, "logsumexp", a1, -1, b=backend.to(x)), sp.logsumexp(a1, axis=-1, b=x),
          np.float64, "a broadcast")


# ---------------------------------------------------------------------------------------------
# Special values: NaN, +-inf, all -inf groups, zero sums
# ---------------------------------------------------------------------------------------------
ROWS = [
    [-INF, -INF], [INF, 1.0], [INF, INF, 1.0], [NAN, 1.0], [INF, NAN], [-INF, 1.0],
    [INF, -INF], [1000.0, 990.0], [1e6, 1e6 - 20], [-1e4, -1e4 - 1], [0.0], [-INF], [INF],
    [NAN], [3.0, 3.0, 3.0],
]


@pytest.mark.parametrize("row", ROWS, ids=[str(r) for r in ROWS])
@pytest.mark.parametrize("layout", ["rows", "strided"])
def test_special_values_match_scipy(backend, row, layout):
    r = np.array(row)
    x = np.stack([r, np.linspace(-1, 1, len(row))])   # one special row, one plain row
    axis = 1
    if layout == "strided":                           # the class axis first: (C, 2)
        x, axis = np.ascontiguousarray(x.T), 0
    for name in FUNCS:
        check(call(backend, name, x, axis), sp.__dict__[name](x, axis=axis), np.float64, name)
    lse, sgn = call(backend, "logsumexp", x, axis, return_sign=True)
    want, wsgn = sp.logsumexp(x, axis=axis, return_sign=True)
    check(lse, want, np.float64, "lse")
    np.testing.assert_array_equal(sgn, wsgn)


WEIGHTED = [
    ([1.0, 1.0], [1, -1]), ([INF, 1.0], [-1, 1]), ([INF, INF], [2, -1]), ([INF, INF], [2, 1]),
    ([NAN, 2.0], [0, 1]), ([1.0, 2.0], [0, 0]), ([1.0, 2.0], [1, -1]), ([0.0, 0.0], [-1, -2]),
    ([INF, 1.0], [0, 1]), ([-INF, -INF], [1, -1]), ([1.0, 2.0], [NAN, 1.0]),
    ([INF, NAN], [1, 0]), ([1.0, INF], [1, 0]), ([1.0, 1.0, NAN], [1, -1, 0]),
    ([1.0, 1.0, -INF], [1, -1, 0]), ([-INF, INF], [1, 0]),
]


@pytest.mark.parametrize("a,b", WEIGHTED, ids=[f"{a}-{b}" for a, b in WEIGHTED])
def test_special_weighted_values_match_scipy(backend, a, b):
    a, b = np.array(a), np.array(b, np.float64)
    for return_sign in (False, True):
        got = call(backend, "logsumexp", a, b=backend.to(b), return_sign=return_sign)
        want = sp.logsumexp(a, b=b, return_sign=return_sign)
        if return_sign:
            check(got[0], want[0], np.float64, "lse")
            np.testing.assert_array_equal(got[1], want[1])
        else:
            check(got, want, np.float64, "lse")


def test_log_softmax_has_no_cancellation_near_the_max():
    x = np.array([[1e6, 1e6 - 20]])
    got = fastce.log_softmax(x, axis=1)
    assert got[0, 0] == pytest.approx(-math.exp(-20), rel=1e-12)
    xs = np.repeat(x.T[None], 700, axis=2)               # (1, 2, 700): the strided kernel
    assert fastce.log_softmax(xs, axis=1)[0, 0, 5] == pytest.approx(-math.exp(-20), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Empty and 0-d inputs, dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((3, 0), 1), ((3, 0), 0), ((0,), None), ((5, 0, 0), -1),
                                        ((0, 4), (0, 1)), ((2, 0, 3), (0, 2))])
def test_empty_inputs(backend, shape, axis):
    x = np.zeros(shape)
    for keepdims in (False, True):
        lse, sgn = call(backend, "logsumexp", x, axis, keepdims=keepdims, return_sign=True)
        red = fsm.normalize_axis(axis, x.ndim)
        kept = tuple(1 if d in red else n for d, n in enumerate(shape))
        want = np.full(kept if keepdims else tuple(n for d, n in enumerate(shape)
                                                   if d not in red), -INF)
        check(lse, want, np.float64, "lse")
        np.testing.assert_array_equal(sgn, np.full(want.shape, -1.0))  # SciPy's empty sign
        if not isinstance(axis, tuple):   # SciPy 1.17 raises IndexError for tuples here
            check(lse, sp.logsumexp(x, axis=axis, keepdims=keepdims), np.float64, "scipy")
    for name in ("softmax", "log_softmax"):
        got = call(backend, name, x.astype(np.float32), axis)
        assert got.shape == shape and got.dtype == np.float32   # as torch (SciPy may raise)


@pytest.mark.parametrize("value", [3.0, -INF, INF, NAN])
def test_zero_dim_inputs(backend, value):
    x = np.array(value)
    for axis in (None, 0, -1, ()):
        # SciPy's logsumexp treats 0-d input as 1-d (axis=() keeps shape (1,)); its softmax
        # rejects axis 0 of a 0-d array, where fastce follows torch (a group of one).
        check(call(backend, "logsumexp", x, axis), sp.logsumexp(x, axis=axis), np.float64,
              f"logsumexp {axis}")
        for name in ("softmax", "log_softmax"):
            got = call(backend, name, x, axis)
            check(got, scipy_ref(name, np.atleast_1d(x), axis).reshape(()), np.float64, name)
    keep = call(backend, "logsumexp", x, keepdims=True)
    check(keep, sp.logsumexp(x, keepdims=True), np.float64, "keepdims")      # (1,), as SciPy
    assert isinstance(fastce.softmax(3.0), np.float64) and fastce.softmax(3.0) == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_input_dtypes_are_kept(backend, dtype):
    x = (np.random.default_rng(6).standard_normal((4, 6)) * 3).astype(dtype)
    for name in FUNCS:
        for axis in (None, 1, (0, 1)):
            got = call(backend, name, x, axis)
            check(got, scipy_ref(name, x, axis).astype(dtype), dtype, f"{name} {axis}")


def test_integer_and_bool_inputs_compute_in_float64(backend):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    for name in FUNCS:
        check(call(backend, name, x, 1), getattr(sp, name)(x, axis=1), np.float64, name)
    check(call(backend, "logsumexp", x.astype(bool), 1),
          sp.logsumexp(x.astype(bool).astype(np.float64), axis=1), np.float64, "bool")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_keyword(backend, dtype):
    x = np.random.default_rng(7).standard_normal((3, 5)) * 3
    for src in (np.float64, np.float32, np.int64):
        xs = x.astype(src)
        cast = xs.astype(dtype)                          # torch: the input is cast first
        for name in FUNCS:
            got = call(backend, name, xs, -1, dtype=dtype)
            check(got, scipy_ref(name, cast, -1).astype(dtype), dtype, f"{name} {src}")
    b = np.random.default_rng(8).random((3, 5))
    got = call(backend, "logsumexp", x, -1, b=backend.to(b), dtype=dtype)
    check(got, sp.logsumexp(x.astype(dtype).astype(np.float64), axis=-1,
                            b=b.astype(dtype).astype(np.float64)).astype(dtype), dtype, "b")


# ---------------------------------------------------------------------------------------------
# Layout: adjacent axes are a view (no transposed copy); long rows are split across threads
# ---------------------------------------------------------------------------------------------
def test_layout_of_axis_forms():
    assert fsm._layout((4, 5, 6), (1, 2)) == ("view", (4, 30, 1))
    assert fsm._layout((4, 5, 6), (0, 1, 2)) == ("view", (1, 120, 1))
    assert fsm._layout((4, 5, 6), (0, 1)) == ("view", (1, 20, 6))
    assert fsm._layout((4, 5, 6), (1,)) == ("view", (4, 5, 6))
    assert fsm._layout((4, 1, 6), (0, 2)) == ("view", (1, 24, 1))    # size-1 axes ignored
    assert fsm._layout((4, 5, 6), ()) == ("view", (120, 1, 1))
    assert fsm._layout((4, 5, 6), (0, 2)) == ("move", (1, 0, 2), (5, 24))


def test_adjacent_axes_make_no_transposed_copy(monkeypatch):
    from fastce import cpu

    def fail(*a, **k):
        raise AssertionError("transposed copy")
    monkeypatch.setattr(cpu.BACKEND, "transpose_copy", fail)
    x = np.random.default_rng(9).standard_normal((3, 4, 5))
    for axis in (None, (1, 2), (0, 1), (-1, -2), 1):
        for name in FUNCS:
            check(getattr(fastce, name)(x, axis), scipy_ref(name, x, axis), np.float64, name)
    for axis in ((0, 2), (-1, 0)):       # logsumexp: one run of adjacent axes after another
        check(fastce.logsumexp(x, axis, keepdims=True),
              scipy_ref("logsumexp", x, axis, keepdims=True), np.float64, f"lse {axis}")
    with pytest.raises(AssertionError, match="transposed copy"):
        fastce.softmax(x, axis=(0, 2))
    with pytest.raises(AssertionError, match="transposed copy"):
        fastce.logsumexp(x, axis=(0, 2), b=np.ones(5))     # weights: moved axes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_split_across_threads(dtype):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((3, 150_001)) * 4).astype(dtype)
    x[1, 7] = INF
    x[2, :] = -INF
    x[2, 99_999] = 1.0
    for axis in (-1, None):
        for name in FUNCS:
            check(getattr(fastce, name)(x, axis), scipy_ref(name, x, axis).astype(dtype), dtype,
                  f"{name} {axis}")
    b = rng.standard_normal(x.shape)
    x64 = np.where(np.isfinite(x), x, 0.0)
    lse, sgn = fastce.logsumexp(x64, None, b=b, return_sign=True)
    want, wsgn = sp.logsumexp(x64, b=b, return_sign=True)
    check(lse, want, np.float64, "weighted", cond=_weighted_cond(x64, b, None))
    assert sgn == wsgn


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis,err,msg", [
    (2, ValueError, "axis 2 is out of range"), (-3, ValueError, "axis -3 is out of range"),
    ((0, 2), ValueError, "axis 2 is out of range"), ((0, -2), ValueError, "axis 0 twice"),
    ((1, 1), ValueError, "axis 1 twice"), (1.0, TypeError, "axis must be None, an int"),
    ("x", TypeError, "axis must be None"), ((0, "1"), TypeError, "axis must be None"),
    (True, TypeError, "axis must be None"), (np.array([0, 1]), TypeError, "axis must be"),
])
def test_bad_axis(backend, axis, err, msg):
    x = backend.to(np.zeros((2, 3)))
    for name in FUNCS:
        with pytest.raises(err, match="fastce: .*" + msg):
            getattr(fastce, name)(x, axis)
    with pytest.raises(IndexError if err is ValueError and "range" in msg else err):
        fastce.logsumexp(x, axis)                 # out of range: NumPy's AxisError, as SciPy


def test_bad_dtype_input_and_weights(backend):
    x = backend.to(np.zeros((2, 3)))
    for dtype in ("int32", np.complex128, "not a dtype"):
        with pytest.raises(TypeError, match="fastce: dtype must be"):
            fastce.softmax(x, dtype=dtype)
    with pytest.raises(ValueError, match="fastce: b of shape"):
        fastce.logsumexp(x, b=backend.to(np.ones(4)))
    if backend.name == "cpu":
        for name in FUNCS:
            with pytest.raises(TypeError, match="fastce: x must be a real array|fastce: a must"):
                getattr(fastce, name)(np.zeros(3, np.complex128))
            with pytest.raises(TypeError, match="must be a real array"):
                getattr(fastce, name)(np.array(["a", "b"]))


def test_numpy_weights_with_device_input_raise(backend):
    if backend.name == "cpu":
        pytest.skip("mixing devices needs a device")
    with pytest.raises(TypeError, match="'b'"):
        fastce.logsumexp(backend.to(np.zeros(3)), b=np.ones(3))


# ---------------------------------------------------------------------------------------------
# torch's OpInfo samples for softmax, log_softmax, logsumexp (with the with_dtype variants)
# ---------------------------------------------------------------------------------------------
def _op_db():
    torch = pytest.importorskip("torch")
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            # torch.testing._internal imports expecttest (a torch test dependency) only for a
            # TestCase base class; OpInfo sample generation does not use it.
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
            sys.modules["expecttest"] = stub
    from torch.testing._internal.common_methods_invocations import op_db
    return torch, [op for op in op_db if op.name in FUNCS]


def _np_dtype(tdtype):
    return np.dtype(str(tdtype).replace("torch.", ""))


def _torch_cases(float64_only=False):
    """[(op, sample)] over every supported dtype with a NumPy equivalent."""
    torch, ops = _op_db()
    cases = []
    for op in ops:
        for tdt in sorted(op.supported_dtypes("cpu"), key=str):
            if tdt in (torch.bfloat16, torch.complex32):
                continue                        # no NumPy dtype
            if float64_only and tdt != torch.float64:
                continue
            for s in op.sample_inputs("cpu", tdt, requires_grad=False):
                cases.append((op, s))
    return torch, cases


def _run_torch_case(backend, torch, op, s):
    """'ok' / 'raises' (complex input, as documented) after comparing with torch's result."""
    x = s.input.numpy()
    if op.name == "logsumexp":
        dims, keep = s.args
        kw = dict(axis=dims, keepdims=keep)
    else:
        kw = dict(axis=s.args[0])
    if "dtype" in s.kwargs:
        kw["dtype"] = _np_dtype(s.kwargs["dtype"])
    fn = getattr(fastce, op.name)
    if x.dtype.kind == "c" and ("dtype" not in kw or backend.name != "cpu"):
        with pytest.raises(TypeError, match="real array"):
            fn(backend.to(x), **kw)
        return "raises"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # casting complex to real (torch does the same)
        want = op(s.input, *s.args, **s.kwargs).numpy()
        got = np.asarray(backend.host(fn(backend.to(x), **kw)))
    # fastce follows SciPy where torch differs: integer and bool logsumexp in float64 (torch:
    # float32), and a 0-d input with keepdims=True gives shape (1,).
    if op.name == "logsumexp" and x.ndim == 0 and kw["keepdims"]:
        assert got.shape == (1,)
        got = got.reshape(())
    if op.name == "logsumexp" and x.dtype.kind in "iub" and "dtype" not in kw:
        assert got.dtype == np.float64
        got = got.astype(want.dtype)
    check(got, want, want.dtype, f"{op.name}{op.variant_test_name} {x.dtype} {x.shape} {kw}")
    return "ok"


def test_torch_opinfo_samples():
    torch, cases = _torch_cases()
    assert len(cases) > 250
    results = [_run_torch_case(_CPU, torch, op, s) for op, s in cases]
    complex_lse = sum(op.name == "logsumexp" and s.input.is_complex() for op, s in cases)
    assert results.count("raises") == complex_lse        # complex logsumexp: not supported
    assert results.count("ok") == len(cases) - complex_lse


def test_torch_opinfo_samples_gpu(backend):
    if backend.name == "cpu":
        pytest.skip("the CPU run is test_torch_opinfo_samples")
    torch, cases = _torch_cases(float64_only=True)      # the simulator is slow
    for op, s in cases:
        _run_torch_case(backend, torch, op, s)


class _CPUBackend:
    name = "cpu"

    @staticmethod
    def to(a):
        return a

    @staticmethod
    def host(a):
        return a


_CPU = _CPUBackend()
