"""fastce.shards: class-sharded statistics agree with the unsharded call and the spec, for
every option, with 1..7 uneven shards (shards of one class too)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastce
from fastce import shards, spec
from helpers import canonical

OPTIONS = [
    dict(),
    dict(label_smoothing=0.15),
    dict(softcap=2.5),
    dict(z_loss=1e-2),
    dict(label_smoothing=0.1, softcap=4.0, z_loss=1e-3),
]


def _cuts(rng, C, k):
    """k uneven shards of [0, C) (k <= C), at least one of a single class when k > 1."""
    inner = sorted(rng.choice(np.arange(1, C), size=k - 1, replace=False)) if k > 1 else []
    cuts = [0, *map(int, inner), C]
    if k > 1 and all(b - a > 1 for a, b in zip(cuts[:-1], cuts[1:])) and C > k:
        cuts[1] = 1                          # one shard of one class
        cuts = sorted(set(cuts))
    return list(zip(cuts[:-1], cuts[1:]))


def _split(x, cuts, axis):
    return [np.take(x, np.arange(a, b), axis=axis) for a, b in cuts]


def _case(rng, shape, axis, dtype, prob=False):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[axis]
    if prob:
        t = rng.random(shape) ** 3
        t = (t / t.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        tshape = tuple(s for i, s in enumerate(shape) if i != axis)
        t = rng.integers(0, C, tshape)
        t.reshape(-1)[::4] = -100
    w = (rng.random(C) + 0.25).astype(dtype)
    return x, t, w, C


def _sharded(x, t, w, C, cuts, axis, reduction, opts, prob=False):
    zl = opts.get("z_loss", 0.0)
    o = {k: v for k, v in opts.items() if k != "z_loss"}
    xs = _split(x, cuts, axis)
    ts = _split(t, cuts, axis) if prob else [t] * len(cuts)
    st = shards.merge_stats([shards.shard_stats(xk, tk, a, C, w, class_axis=axis,
                                                argmax=not prob, **o)
                             for xk, tk, (a, _) in zip(xs, ts, cuts)])
    out = shards.finalize_stats(st, None if prob else t, w, reduction=reduction, z_loss=zl,
                                return_lse=True, return_z_loss=True,
                                return_token_accuracy=not prob)
    grads = [shards.shard_grad(xk, tk, a, C, st, w, reduction=reduction, z_loss=zl,
                               class_axis=axis, **o) for xk, tk, (a, _) in zip(xs, ts, cuts)]
    return out, np.concatenate(grads, axis=axis)


@pytest.mark.parametrize("k", range(1, 8))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_index_targets_match_unsharded(k, dtype):
    rng = np.random.default_rng(k + (10 if dtype == np.float64 else 0))
    layouts = [((19, 23), 1), ((3, 11, 37), 1), ((2, 5, 9, 13), -1)]
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for shape, axis in layouts:
        x, t, w, C = _case(rng, shape, axis % len(shape), dtype)
        axis = axis % len(shape)
        if C < k:
            continue
        cuts = _cuts(rng, C, k)
        for opts in OPTIONS:
            for reduction in ("none", "mean", "sum"):
                out, grad = _sharded(x, t, w, C, cuts, axis, reduction, opts)
                ref, rgrad = fastce.cross_entropy_with_grad(
                    x, t, w, reduction=reduction, class_axis=axis, return_lse=True,
                    return_z_loss=True, return_token_accuracy=True, **opts)
                scale = max(1.0, float(np.max(np.abs(ref.loss))))
                np.testing.assert_allclose(out.loss, ref.loss, rtol=tol, atol=tol * scale)
                np.testing.assert_allclose(out.z_loss, ref.z_loss, rtol=tol, atol=tol)
                np.testing.assert_allclose(out.lse, ref.lse, rtol=tol, atol=tol)
                assert out.token_accuracy == ref.token_accuracy
                gs = max(float(np.max(np.abs(rgrad))), 1e-30)
                np.testing.assert_allclose(grad, rgrad, rtol=0, atol=4 * tol * gs)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_probability_targets_match_spec(k):
    rng = np.random.default_rng(100 + k)
    for shape, axis in [((13, 17), 1), ((2, 9, 21), 1)]:
        x, p, w, C = _case(rng, shape, axis, np.float64, prob=True)
        cuts = _cuts(rng, C, k)
        for opts in OPTIONS:
            for reduction in ("none", "mean"):
                out, grad = _sharded(x, p, w, C, cuts, axis, reduction, opts, prob=True)
                x3, p3 = canonical(x, p, axis)
                sl, sg = spec.cross_entropy_with_grad(x3, p3, w, reduction=reduction, **opts)
                ref = fastce.cross_entropy(x, p, w, reduction=reduction, **opts)
                np.testing.assert_allclose(np.reshape(out.loss, -1), np.reshape(sl, -1),
                                           rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(out.loss, ref, rtol=1e-12, atol=1e-12)
                g3, _ = canonical(grad, p, axis)
                np.testing.assert_allclose(g3, sg, rtol=0, atol=1e-13)


def test_masked_logits_nan_and_extremes():
    """-inf masked logits (whole shards of them too), NaN rows and logits near float64's
    limit: the same answers as the unsharded call (inf, nan, exact)."""
    x = np.array([[0.0, -np.inf, 1.0, -np.inf, -np.inf, 2.0],
                  [-np.inf, -np.inf, -np.inf, 3.0, 1.0, 0.5],
                  [1.0, np.nan, 0.0, 0.0, 1.0, 2.0],
                  [1e308, -1e308, 1e307, 5e307, 1.7e308, 1e308],
                  [-np.inf] * 6])
    t = np.array([2, 3, 0, 4, -100])
    C = 6
    for opts in [dict(), dict(label_smoothing=0.2), dict(softcap=10.0)]:
        for cuts in ([(0, 6)], [(0, 2), (2, 3), (3, 6)], [(0, 1), (1, 2), (2, 3), (3, 4),
                                                          (4, 5), (5, 6)]):
            out, grad = _sharded(x, t, None, C, cuts, 1, "none", opts)
            ref, rgrad = fastce.cross_entropy_with_grad(
                x, t, reduction="none", return_lse=True, return_token_accuracy=True, **opts)
            np.testing.assert_array_equal(np.isnan(out.loss), np.isnan(ref.loss))
            np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-14)
            np.testing.assert_allclose(out.lse, ref.lse, rtol=1e-14)
            assert out.token_accuracy == ref.token_accuracy
            np.testing.assert_allclose(grad[:4], rgrad[:4], rtol=1e-12, atol=1e-300)


def test_merge_is_associative_and_checks():
    rng = np.random.default_rng(7)
    x, t, w, C = _case(rng, (31, 40), 1, np.float64)
    st = [shards.shard_stats(x[:, a:b], t, a, C, w, label_smoothing=0.1, argmax=True)
          for a, b in [(0, 7), (7, 8), (8, 25), (25, 40)]]
    left = shards.merge_stats(st)
    right = shards.merge_stats(st[0], shards.merge_stats(st[1], shards.merge_stats(st[2:])))
    again = shards.merge_stats(*st)
    for f in ("max", "sumexp", "target_logit", "dev", "qfin", "amax", "argmax"):
        np.testing.assert_array_equal(getattr(left, f), getattr(again, f))   # deterministic
        np.testing.assert_allclose(getattr(left, f), getattr(right, f), rtol=1e-14)
    with pytest.raises(ValueError, match="cover"):
        shards.finalize_stats(shards.merge_stats(st[:2]), t, w)
    with pytest.raises(ValueError, match="label_smoothing"):
        shards.merge_stats(st[0], shards.shard_stats(x[:, 7:8], t, 7, C, w))
    with pytest.raises(ValueError, match="out of bounds"):
        shards.shard_stats(x[:, :7], np.full(31, C), 0, C)
    with pytest.raises(ValueError, match="within"):
        shards.shard_stats(x[:, :7], t, 35, C)
    # targets outside the shard are fine; a denominators override scales the mean
    D, Dz = shards.target_denominators(t, w, num_classes=C, dtype=np.float64)
    full = shards.finalize_stats(left, t, w, reduction="sum")
    half = shards.finalize_stats(left, t, w, reduction="mean", denominators=(2 * D, Dz))
    assert float(half) == pytest.approx(float(full) / (2 * D), rel=1e-14)


def test_merge_checks_the_class_ranges_and_targets():
    """What a count of classes cannot see: a shard merged twice (with another making up the
    count), or statistics finalized or merged with other targets, raise instead of giving a
    wrong loss."""
    rng = np.random.default_rng(8)
    x, t, w, C = _case(rng, (5, 10), 1, np.float64)
    a = shards.shard_stats(x[:, 0:4], t, 0, C)
    b = shards.shard_stats(x[:, 4:8], t, 4, C)
    c = shards.shard_stats(x[:, 8:10], t, 8, C)
    with pytest.raises(ValueError, match=r"overlapping class ranges \[0, 4\) and \[0, 4\)"):
        shards.merge_stats(a, a, c)
    with pytest.raises(ValueError, match=r"cover the classes \[0, 4\), \[8, 10\)"):
        shards.finalize_stats(shards.merge_stats(a, c), t)
    whole = shards.merge_stats(c, a, b)                 # any order covers [0, 10)
    assert whole.ranges == ((0, 10),)
    assert float(shards.finalize_stats(whole, t)) == pytest.approx(
        float(fastce.cross_entropy(x, t)), rel=1e-12)
    other = np.where(t == -100, -100, (t + 1) % C)
    with pytest.raises(ValueError, match="target differs"):
        shards.finalize_stats(whole, other)
    with pytest.raises(ValueError, match="different targets"):
        shards.merge_stats(a, shards.shard_stats(x[:, 4:10], other, 4, C))


def test_unbatched_statistics_merge_and_16_bit_losses_keep_the_logits_dtype():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(9)
    y = np.array(4)
    st = shards.merge_stats([shards.shard_stats(x[a:b], y, a, 9) for a, b in [(0, 3), (3, 6),
                                                                               (6, 9)]])
    assert float(shards.finalize_stats(st, y)) == pytest.approx(float(fastce.cross_entropy(x, y)),
                                                                rel=1e-12)
    x16 = (rng.standard_normal((4, 10)) * 3).astype(np.float16)
    t = np.array([0, 3, 5, 9])
    st = shards.merge_stats(shards.shard_stats(x16[:, :6], t, 0, 10),
                            shards.shard_stats(x16[:, 6:], t, 6, 10))
    out = shards.finalize_stats(st, t, return_lse=True, return_z_loss=True)
    mem = fastce.cross_entropy(x16, t, return_lse=True, return_z_loss=True)
    assert out.loss.dtype == out.lse.dtype == out.z_loss.dtype == np.float16
    assert float(out.loss) == float(mem.loss)
    big = np.zeros((3000, 2), np.float16)
    big[:, 1] = 40
    tb = np.zeros(3000, np.int64)
    st = shards.merge_stats(shards.shard_stats(big[:, :1], tb, 0, 2),
                            shards.shard_stats(big[:, 1:], tb, 1, 2))
    assert np.isinf(shards.finalize_stats(st, tb, reduction="sum"))      # beyond float16
    assert np.isinf(fastce.cross_entropy(big, tb, reduction="sum"))


def test_array_expressions_match_kernels():
    """The CuPy path's float64 expressions (run here with NumPy) agree with the kernels."""
    from fastce import _shard_kernels
    rng = np.random.default_rng(3)
    for shape, prob in [((9, 30), False), ((2, 12, 700), False), ((3, 8, 5), True)]:
        x, t, w, C = _case(rng, shape, 1, np.float32, prob=prob)
        xs, ts = x[:, 3:11], (t[:, 3:11] if prob else t)
        for opts in [dict(), dict(label_smoothing=0.2, softcap=3.0)]:
            sh = shards._Shard(xs, ts, 3, C, w, -100, opts.get("label_smoothing", 0.0),
                               opts.get("softcap"), None, 1e-3, "mean")
            want_dev = prob or sh.eps != 0
            a = _shard_kernels.stats(sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                                     want_dev, True)
            b = shards._stats_xp(np, sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                                 want_dev, True)
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-5)
            lse = a[0] + np.log(a[1])
            coef = shards.shard_coefficients(sh, lse, a[5] + 1.0, 1.0, 7.0, 9.0, True)
            ga = _shard_kernels.grad(sh.x3, sh.tl, sh.p3, sh.ws, sh.keep, sh.smooth_c, sh.cap,
                                     coef)
            np.testing.assert_allclose(ga, shards._grad_xp(sh, coef), rtol=1e-5, atol=1e-7)


def test_return_lse_api():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 11, 4)).astype(np.float32)
    t = rng.integers(0, 11, (6, 4))
    out = fastce.cross_entropy(x, t, return_lse=True, softcap=3.0)
    assert out.z_loss is None and out.token_accuracy is None
    ref = spec.logsumexp(spec.softcap_logits(x.astype(np.float64), 3.0), axis=1)
    np.testing.assert_allclose(out.lse, ref, rtol=1e-6)
    assert out.lse.dtype == np.float32 and out.lse.shape == t.shape
    # out=input: the lse is taken before the gradient overwrites the logits
    y = x.copy()
    o2, g = fastce.cross_entropy_with_grad(y, t, return_lse=True, out=y)
    np.testing.assert_allclose(o2.lse, spec.logsumexp(x, axis=1), rtol=1e-6)
    assert g is y
    empty = fastce.cross_entropy(np.zeros((3, 0)), np.full(3, -100), return_lse=True,
                                 reduction="none")
    assert np.all(empty.lse == -math.inf)


@pytest.mark.parametrize("shape", [(5, 40), (7, 5), (3, 6, 4)])    # rows, few classes, strided
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("with_grad", [False, True])
def test_return_lse_comes_from_the_loss_pass(backend, shape, prob, softcap, with_grad):
    """Every loss kernel writes the lse itself (no second pass): it matches the float64 spec
    and leaves the loss and gradient exactly as they are without it."""
    rng = np.random.default_rng(abs(hash((shape, prob, softcap, with_grad))) % 2**32)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[0, 1] = np.inf if not softcap else x[0, 1]        # an inf row: lse inf, as the spec's
    x[1] = -np.inf                                      # all -inf: lse -inf (or -cap's)
    x[2, 0] = np.nan                                    # a NaN logit: NaN
    C = shape[1]
    tshape = (shape[0],) + shape[2:]
    if prob:
        p = rng.random(shape)
        t = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    else:
        t = rng.integers(0, C, tshape)
        t.reshape(-1)[::3] = -100                        # ignored positions still get an lse
    kw = dict(reduction="none", softcap=softcap, label_smoothing=0.1)
    xb, tb = backend.to(x), backend.to(t)
    call = fastce.cross_entropy_with_grad if with_grad else fastce.cross_entropy
    got, plain = call(xb, tb, return_lse=True, **kw), call(xb, tb, **kw)
    out, ref = (got[0], plain[0]) if with_grad else (got, plain)
    want = spec.logsumexp(spec.softcap_logits(x.astype(np.float64), softcap), axis=1)
    lse = backend.host(out.lse)
    assert lse.shape == tshape and lse.dtype == np.float32
    np.testing.assert_allclose(lse, want, rtol=2e-6, atol=1e-6)
    assert np.array_equal(backend.host(out.loss), backend.host(ref), equal_nan=True)
    if with_grad:
        assert np.array_equal(backend.host(got[1]), backend.host(plain[1]), equal_nan=True)


@pytest.mark.gpu
def test_cupy_shards_match_numpy():
    import cupy
    rng = np.random.default_rng(9)
    x, t, w, C = _case(rng, (17, 29), 1, np.float32)
    cuts = [(0, 5), (5, 6), (6, 29)]
    host, hgrad = _sharded(x, t, w, C, cuts, 1, "mean", dict(label_smoothing=0.1))
    st = shards.merge_stats([shards.shard_stats(cupy.asarray(x[:, a:b]), cupy.asarray(t), a, C,
                                                cupy.asarray(w), label_smoothing=0.1)
                             for a, b in cuts])
    loss = shards.finalize_stats(st, cupy.asarray(t), cupy.asarray(w))
    assert float(loss) == pytest.approx(float(host.loss), rel=1e-5)
    g = shards.shard_grad(cupy.asarray(x[:, 5:6]), cupy.asarray(t), 5, C, st, cupy.asarray(w),
                          label_smoothing=0.1)
    np.testing.assert_allclose(cupy.asnumpy(g), hgrad[:, 5:6], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_class_chunk_views_are_read_in_place_and_match_copies(opts, prob, dtype):
    """x[:, a:b] of a C-contiguous array (how Dask hands over class chunks of an in-memory
    array): the rows kernels read it without a copy; statistics and gradient bitwise those of
    the contiguous copy."""
    rng = np.random.default_rng(7)
    x, t, w, C = _case(rng, (37, 50), 1, dtype, prob=prob)
    o = {k: v for k, v in opts.items() if k != "z_loss"}
    for a, b in [(0, 1), (3, 29), (29, 50)]:
        view = x[:, a:b]
        tk = t[:, a:b] if prob else t
        assert shards._rows_strided(view, 1) == (b - a < C)
        kw = dict(argmax=not prob, **o)
        sv = shards.shard_stats(view, tk, a, C, w, **kw)
        sc = shards.shard_stats(np.ascontiguousarray(view), tk, a, C, w, **kw)
        for f in sv._fields:
            va, vc = getattr(sv, f), getattr(sc, f)
            if isinstance(va, np.ndarray):
                np.testing.assert_array_equal(va, vc, err_msg=f)
        full = shards.merge_stats(shards.shard_stats(x, t, 0, C, w, **kw))
        gv = shards.shard_grad(view, tk, a, C, full, w, **o)
        gc = shards.shard_grad(np.ascontiguousarray(view), tk, a, C, full, w, **o)
        np.testing.assert_array_equal(gv, gc)
        assert gv.shape == view.shape and gv.dtype == x.dtype


@pytest.mark.parametrize("opts", [o for o in OPTIONS if "softcap" not in o] + [dict(softcap=3.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_from_the_stored_exps_matches_shard_grad(opts, dtype):
    """The Dask class-chunk path: statistics that keep their exps, then the gradient rescaled
    from them in place, as shard_grad from the logits, to rounding; special rows (a chunk of
    -inf only, NaN, +inf, ignored) as well.  With softcap no exps are kept (shard_grad runs)."""
    rng = np.random.default_rng(11)
    x, t, w, C = _case(rng, (23, 30), 1, dtype)
    x[3, :12] = -np.inf
    x[5, 4] = np.nan
    x[7, 20] = np.inf
    zl = opts.get("z_loss", 0.0)
    o = {k: v for k, v in opts.items() if k != "z_loss"}
    cuts = [(0, 12), (12, 13), (13, 30)]
    own = [shards._shard_stats_exps(x[:, a:b], t, a, C, w, argmax=True, **o) for a, b in cuts]
    assert all((ex is None) == ("softcap" in opts) for _, ex in own)
    merged = shards.merge_stats(*[st for st, _ in own])
    plain = shards.merge_stats(*[shards.shard_stats(x[:, a:b], t, a, C, w, argmax=True, **o)
                                 for a, b in cuts])
    np.testing.assert_allclose(merged.sumexp, plain.sumexp, rtol=4e-7 if dtype == np.float32
                               else 1e-15)
    kw = dict(grad_output=0.7, reduction="sum", z_loss=zl, **o)
    for (a, b), (local, ex) in zip(cuts, own):
        want = shards.shard_grad(x[:, a:b], t, a, C, plain, w, **kw)
        got = shards._shard_grad_exps(ex, local, x[:, a:b], t, a, C, merged, w, **kw)
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = float(np.nanmax(np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=0, equal_nan=True,
                                   atol=scale * (2e-6 if dtype == np.float32 else 1e-14))
