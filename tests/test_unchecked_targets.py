"""``check_targets=False``: bad targets (neither ignore_index nor in [0, C)) give nan results
instead of an error, as fastce.spec defines, on every backend; on the GPU such a call reads
nothing back from the device.  Never an out-of-bounds read (the NUMBA_BOUNDSCHECK pass of CI
runs this file too)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastce
from fastce import spec
from conftest import SIMULATOR, Backend
from helpers import (assert_close, canonical, random_case, record_gpu_launches,
                     spec_loss_and_grad)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
RTOL = {np.float64: 1e-9, np.float32: 2e-4}


def _with_bad(rng, t, C, ignore_index, frac=0.3):
    """t with about ``frac`` of its positions (at least one) made bad: C, C + 5, -1, -7 or a
    huge value, none of them ignore_index."""
    t = np.array(t, dtype=np.int64)
    flat = t.reshape(-1)
    pick = rng.random(flat.size) < frac
    pick[rng.integers(flat.size)] = True
    values = np.array([C, C + 5, -1, -7, 10**12])
    values = values[values != ignore_index]
    flat[pick] = rng.choice(values, int(pick.sum()))
    return t


def test_spec_defines_bad_targets_as_nan_positions():
    """check_targets=False: a bad position counts in neither denominator, its loss terms and
    its gradient row are nan; every other number is the spec's for those positions ignored."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, 3)) * 3
    t = rng.integers(0, 7, (5, 3))
    bad = np.zeros((5, 3), bool)
    bad[1, 2] = bad[4, 0] = True
    tb = np.where(bad, 9, t)
    ti = np.where(bad, -100, t)
    w = rng.random(7) + 0.5
    with pytest.raises(ValueError, match="out of bounds"):
        spec.cross_entropy(x, tb, w)
    opts = dict(label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    per = spec.cross_entropy(x, tb, w, reduction="none", check_targets=False, **opts)
    want = spec.cross_entropy(x, ti, w, reduction="none", **opts)
    assert np.isnan(per[bad]).all() and np.array_equal(per[~bad], want[~bad])
    for reduction in ("mean", "sum"):
        assert np.isnan(spec.cross_entropy(x, tb, w, reduction=reduction, check_targets=False))
    _, grad = spec.cross_entropy_with_grad(x, tb, w, check_targets=False, **opts)
    _, want_g = spec.cross_entropy_with_grad(x, ti, w, **opts)
    rows = np.moveaxis(grad, 1, -1)
    assert np.isnan(rows[bad]).all()
    assert np.array_equal(rows[~bad], np.moveaxis(want_g, 1, -1)[~bad])


def _run(backend, fn, x, t, w, **opts):
    out = fn(backend.to(x), backend.to(t), weight=backend.to(w), check_targets=False, **opts)
    return tuple(backend.host(o) for o in out) if isinstance(out, tuple) else backend.host(out)


def _check(backend, x, t, w, grad_output=None, **opts):
    """Loss, loss+grad and gradient of unchecked bad targets against the spec."""
    rtol = RTOL[x.dtype.type]
    want_l, want_g = spec_loss_and_grad(x, t, w, grad_output=grad_output, check_targets=False,
                                        **opts)
    gb = backend.to(grad_output) if isinstance(grad_output, np.ndarray) else grad_output
    loss, grad = _run(backend, fastce.cross_entropy_with_grad, x, t, w, grad_output=gb, **opts)
    scale = max(1.0, float(np.abs(x).max()))
    assert_close(loss, want_l, rtol, atol=rtol * 1e-2 * scale, what="loss")
    assert_close(grad, want_g, rtol, what="grad")
    assert np.array_equal(np.isnan(grad), np.isnan(want_g))
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    only = _run(backend, fastce.cross_entropy, x, t, w, **opts)
    assert_close(only, want_l, rtol, atol=rtol * 1e-2 * scale, what="forward")
    back = _run(backend, fastce.cross_entropy_backward, x, t, w, grad_output=gb, **opts)
    np.testing.assert_array_equal(back, grad)


# The simulator runs every GPU thread in Python: fewer, smaller cases there.
SHAPES = ([(6, 9), (5, 3), (2, 3, 4), (3,)] if SIMULATOR else
          [(9, 5), (6, 40), (3, 300), (2, 6, 7), (2, 3, 4, 5), (3,)])
DTYPES = [np.float64] if SIMULATOR else [np.float64, np.float32]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [
    dict(), dict(reduction="none"), dict(reduction="sum", z_loss=0.01),
    dict(label_smoothing=0.2, weighted=True), dict(ignore_index=1, softcap=4.0, weighted=True),
    dict(reduction="none", z_loss=0.01, label_smoothing=0.1, weighted=True),
])
def test_bad_targets_match_spec(backend, shape, dtype, opts):
    opts = dict(opts)
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    weighted = opts.pop("weighted", False)
    ii = opts.get("ignore_index", -100)
    x, t = random_case(rng, shape, dtype, ignore_frac=0.2, ignore_index=ii)
    C = shape[1] if len(shape) > 1 else shape[0]
    t = _with_bad(rng, t, C, ii)
    w = (rng.random(C) + 0.1).astype(dtype) if weighted else None
    _check(backend, x, t, w, **opts)


@settings(max_examples=10 if SIMULATOR else 80, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), ndim=st.sampled_from([1, 2, 3]),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       dtype=st.sampled_from([np.float32, np.float64]), frac=st.sampled_from([0.05, 0.5, 1.0]),
       target_dtype=st.sampled_from([np.int64, np.int32, np.int16]),
       smoothing=st.sampled_from([0.0, 0.3]), z_loss=st.sampled_from([0.0, 1e-3]),
       weighted=st.booleans(), upstream=st.booleans())
def test_random_bad_targets_match_spec(backend, seed, ndim, reduction, dtype, frac,
                                       target_dtype, smoothing, z_loss, weighted, upstream):
    rng = np.random.default_rng(seed)
    hi = 4 if backend.small else 40
    shape = tuple(int(v) for v in rng.integers(1, hi, ndim))
    C = shape[1] if ndim > 1 else shape[0]
    x, t = random_case(rng, shape, dtype, ignore_frac=0.2)
    t = _with_bad(rng, t, C, -100, frac)
    if np.iinfo(target_dtype).max < 10**12:
        t = np.where(np.abs(t) > 10**4, C + 1, t)
    t = t.astype(target_dtype)
    w = (rng.random(C) + 0.1).astype(dtype) if weighted else None
    go = None
    if upstream:
        go = (rng.standard_normal(t.shape).astype(dtype) if reduction == "none"
              else float(rng.standard_normal()))
    _check(backend, x, t, w, grad_output=go, reduction=reduction, label_smoothing=smoothing,
           z_loss=z_loss)


@pytest.mark.parametrize("shape", [(7, 5), (4, 9 if SIMULATOR else 50), (2, 3, 4)])
def test_valid_targets_give_the_checked_bits(backend, shape):
    """Without a bad target, check_targets=False changes nothing: the same bits."""
    rng = np.random.default_rng(7)
    x, t = random_case(rng, shape, np.float32, ignore_frac=0.3)
    C = shape[1]
    w = (rng.random(C) + 0.5).astype(np.float32)
    for opts in (dict(), dict(reduction="none", z_loss=0.1), dict(label_smoothing=0.1)):
        args = backend.to(x), backend.to(t), backend.to(w)
        checked = fastce.cross_entropy_with_grad(*args, return_z_loss=True, **opts)
        unchecked = fastce.cross_entropy_with_grad(*args, return_z_loss=True,
                                                   check_targets=False, **opts)
        for a, b in [(checked[0].loss, unchecked[0].loss), (checked[0].z_loss,
                                                            unchecked[0].z_loss),
                     (checked[1], unchecked[1])]:
            np.testing.assert_array_equal(backend.host(a), backend.host(b))


def test_extras_and_out(backend):
    """Token accuracy counts the valid targets only; z-loss parts of bad positions are nan;
    lse is every position's; out= receives nan rows."""
    rng = np.random.default_rng(3)
    x, t = random_case(rng, (6, 9), np.float64)
    t[[1, 4]] = [9, -2]
    good = np.ones(6, bool)
    good[[1, 4]] = False
    r, grad = fastce.cross_entropy_with_grad(
        backend.to(x), backend.to(t), reduction="none", z_loss=0.1, return_z_loss=True,
        return_token_accuracy=True, return_lse=True, check_targets=False)
    loss, z, lse = backend.host(r.loss), backend.host(r.z_loss), backend.host(r.lse)
    assert np.isnan(loss[~good]).all() and np.isfinite(loss[good]).all()
    assert np.isnan(z[~good]).all() and np.isfinite(z[good]).all()
    x3, _ = canonical(x, t)
    assert_close(lse, spec.logsumexp(x3, axis=1)[:, 0], 1e-12)
    hits = (np.argmax(x, axis=1) == t)[good]
    assert r.token_accuracy == pytest.approx(hits.mean())
    out = backend.to(np.zeros_like(x))
    fastce.cross_entropy_backward(backend.to(x), backend.to(t), out=out, check_targets=False)
    got = backend.host(out)
    assert np.isnan(got[~good]).all() and np.isfinite(got[good]).all()


def test_no_classes(backend):
    """C == 0: every target that is not ignored is bad."""
    x = np.zeros((3, 0))
    t = np.array([-100, 0, 2])
    per = backend.host(fastce.cross_entropy(backend.to(x), backend.to(t), reduction="none",
                                            check_targets=False))
    assert per[0] == 0.0 and np.isnan(per[1:]).all()
    assert np.isnan(backend.host(fastce.cross_entropy(backend.to(x), backend.to(t),
                                                      reduction="sum", check_targets=False)))
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.cross_entropy(backend.to(x), backend.to(t))


def test_loss_object_and_argument_checks(backend):
    rng = np.random.default_rng(5)
    x, t = random_case(rng, (4, 6), np.float64)
    t[2] = 6
    loss_fn = fastce.CrossEntropyLoss(reduction="none", check_targets=False)
    assert "check_targets=False" in repr(loss_fn)
    per = backend.host(loss_fn(backend.to(x), backend.to(t)))
    assert np.isnan(per[2]) and np.isfinite(np.delete(per, 2)).all()
    assert np.isnan(backend.host(loss_fn.backward(backend.to(x), backend.to(t)))[2]).all()
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.CrossEntropyLoss()(backend.to(x), backend.to(t))
    for fn in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
        for args in ((x, t), (x, np.zeros_like(t))):            # (bad targets or none)
            with pytest.raises(TypeError, match="check_targets"):
                fn(*map(backend.to, args), check_targets=1)


@pytest.mark.parametrize("shape", [(7, 5), (2, 4, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss(backend, shape, reduction):
    """nll_loss(check_targets=False): a bad target's loss is nan (so is a reduced one); the
    mean's D counts the valid targets' weights."""
    rng = np.random.default_rng(9)
    x, t = random_case(rng, shape, np.float64, ignore_frac=0.2)
    C = shape[1]
    t = _with_bad(rng, t, C, -100, 0.3)
    w = rng.random(C) + 0.5
    bad = spec.bad_targets(t, -100, C)
    valid = (t != -100) & ~bad
    safe = np.where(valid, t, 0)
    picked = np.take_along_axis(x, np.expand_dims(safe, 1), axis=1)[:, 0]
    want = np.where(bad, np.nan, np.where(valid, -w[safe] * picked, 0.0))
    got = backend.host(fastce.nll_loss(backend.to(x), backend.to(t), backend.to(w),
                                       reduction=reduction, check_targets=False))
    if reduction == "none":
        assert_close(got, want, 1e-12)
    else:
        assert np.isnan(got)
    fixed = np.where(bad, -100, t)
    for r in ("mean", "sum"):              # the valid targets' part: as with bad ones ignored
        ok = backend.host(fastce.nll_loss(backend.to(x), backend.to(fixed), backend.to(w),
                                          reduction=r))
        assert_close(ok, (want[~bad].sum() / (w[safe] * valid).sum()) if r == "mean"
                     else want[~bad].sum(), 1e-12)
        unchecked = backend.host(fastce.nll_loss(backend.to(x), backend.to(fixed),
                                                 backend.to(w), reduction=r,
                                                 check_targets=False))
        np.testing.assert_array_equal(unchecked, ok)        # (the device's D: the same bits)
    # Weights that cancel (D == 0, the total not): torch's total / 0, +-inf, either way.
    wc = np.zeros(C)
    wc[[0, 1]] = [1.0, -1.0]
    tc = np.full(t.shape, -100)
    tc.flat[:2] = [0, 1]
    for check in (True, False):
        v = backend.host(fastce.nll_loss(backend.to(x), backend.to(tc), backend.to(wc),
                                         check_targets=check))
        assert np.isinf(v)
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.nll_loss(backend.to(x), backend.to(t))
    with pytest.raises(TypeError, match="check_targets"):
        fastce.nll_loss(backend.to(x), backend.to(fixed), check_targets=0)


def test_dask_arrays_refuse_unchecked_targets():
    da = pytest.importorskip("dask.array")
    x = da.zeros((4, 3), chunks=2)
    t = da.zeros(4, dtype=np.int64, chunks=2)
    for fn in (fastce.cross_entropy, fastce.cross_entropy_with_grad,
               fastce.cross_entropy_backward):
        with pytest.raises(NotImplementedError, match="check_targets"):
            fn(x, t, check_targets=False)


_GPU = Backend("gpu")


@pytest.mark.skipif(not SIMULATOR, reason="counts the simulator's host copies")
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_gpu_reads_nothing_back(monkeypatch, dtype):
    """No host copy at all for the loss, loss+grad and gradient (mean, sum, none, z-loss,
    label smoothing, weights in the compute dtype, bad targets or not); token accuracy (a
    Python float) still reads numbers back."""
    from fastce import gpu
    copies = []
    host_copy = gpu._host_copy
    monkeypatch.setattr(gpu, "_host_copy", lambda d: copies.append(d.size) or host_copy(d))
    rng = np.random.default_rng(11)
    cdt = np.float64 if dtype == np.float64 else np.float32
    for shape in [(3, 9), (2, 3, 2)]:               # the rows and the strided kernel
        x, t = random_case(rng, shape, dtype, ignore_frac=0.2)
        t = _with_bad(rng, t, shape[1], -100, 0.2)
        w = (rng.random(shape[1]) + 0.5).astype(cdt)
        xd, td, wd = _GPU.to(x), _GPU.to(t), _GPU.to(w)
        calls = [
            (lambda: fastce.cross_entropy(xd, td, wd, check_targets=False), 0),
            (lambda: fastce.cross_entropy(xd, td, reduction="sum", z_loss=0.1,
                                          check_targets=False), 0),
            (lambda: fastce.cross_entropy_with_grad(xd, td, wd, z_loss=0.1,
                                                    check_targets=False), 0),
            (lambda: fastce.cross_entropy_with_grad(xd, td, reduction="none",
                                                    check_targets=False), 0),
            (lambda: fastce.cross_entropy_backward(xd, td, 2.0, wd, check_targets=False), 0),
            (lambda: fastce.cross_entropy_with_grad(xd, td, label_smoothing=0.1,
                                                    check_targets=False), 0),
            (lambda: fastce.cross_entropy_with_grad(xd, td, wd, label_smoothing=0.1,
                                                    check_targets=False), 0),
            (lambda: fastce.cross_entropy(xd, td, wd, label_smoothing=0.1, z_loss=0.1,
                                          reduction="sum", check_targets=False), 0),
            (lambda: fastce.nll_loss(xd, td, wd, check_targets=False), 0),
            (lambda: fastce.cross_entropy(xd, td, return_token_accuracy=True,
                                          check_targets=False),
             2 if ((t >= 0) & (t < shape[1])).any() else 1),     # (no valid target: nan)
        ]
        for call, expected in calls:
            copies.clear()
            call()
            assert len(copies) == expected, (shape, expected, copies)
    # And the numbers: the CPU's (the GPU kernels make the nan rows themselves).
    x, t = random_case(rng, (5, 40), np.float64, ignore_frac=0.2)
    t = _with_bad(rng, t, 40, -100, 0.3)
    w = rng.random(40) + 0.5
    got_l, got_g = fastce.cross_entropy_with_grad(_GPU.to(x), _GPU.to(t), _GPU.to(w),
                                                  z_loss=0.01, label_smoothing=0.2,
                                                  reduction="none", check_targets=False)
    want_l, want_g = fastce.cross_entropy_with_grad(x, t, w, z_loss=0.01, label_smoothing=0.2,
                                                    reduction="none", check_targets=False)
    assert_close(_GPU.host(got_l), want_l, 1e-12)
    assert_close(_GPU.host(got_g), want_g, 1e-12)


@pytest.mark.skipif(not SIMULATOR, reason="records the simulator's launches")
def test_gpu_never_waits_and_launches_on_the_call_stream(monkeypatch):
    """The unchecked calls' kernels (the device denominators' included) all go to the call's
    stream, and the host never waits on it."""
    rng = np.random.default_rng(12)
    x, t = random_case(rng, (3, 9), np.float32, ignore_frac=0.2)
    t = _with_bad(rng, t, 9, -100, 0.3)
    x4, t4 = random_case(rng, (2, 3, 2), np.float32)
    xd, td, x4d, t4d = _GPU.to(x), _GPU.to(t), _GPU.to(x4), _GPU.to(t4)
    calls = [lambda: fastce.cross_entropy_with_grad(xd, td, z_loss=0.1, check_targets=False),
             lambda: fastce.cross_entropy(x4d, t4d, reduction="sum", check_targets=False),
             lambda: fastce.cross_entropy_backward(x4d, t4d, check_targets=False)]
    for call in calls:
        call()                          # (the cached arrays of ones are made and waited for)
    stream, launches = record_gpu_launches(monkeypatch)
    for call in calls:
        call()
    names = {name for name, _ in launches}
    assert {"_k_stats", "_k_stats_merge", "_k_grad_den", "_k_loss", "index_rows",
            "index_strided"} <= names, names
    assert all(len(cfg) == 3 and cfg[2] is stream for _, cfg in launches)
    assert stream.waits == 0
