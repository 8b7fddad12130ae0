"""Defects found by hostile use, each with the class it belongs to: PyTorch's answer (float64
autograd) or a clear error, never a wrong number, on every kernel path and backend."""
from __future__ import annotations

import math
import multiprocessing
import os
import sys

import numpy as np
import pytest

import fastce
from fastce import cpu, dispatch

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from helpers import assert_close  # noqa: E402

# Shapes that reach every CPU kernel: rows of few classes (block kernel over transposed rows),
# rows of many (rows kernel), strided (N, C, S) blocks; one past a block boundary; one large
# enough for the parallel twins.  Under the CUDA simulator: its row and per-position kernels.
CPU_SHAPES = [(7, 3), (9, cpu.SMALL_C), (6, cpu.SMALL_C + 1), (5, 40), (3, 5, 6), (2, 4, 7, 3),
              (cpu.BLOCK + 3, 5), (2, 3, cpu.BLOCK + 5), (40, 1700)]
SIM_SHAPES = [(3, 3), (3, 9), (2, 3, 4)]


def shapes(backend):
    return SIM_SHAPES if backend.small else CPU_SHAPES


def torch_reference(x, t, w=None, *, grad_output=None, reduction="mean", **kw):
    """torch F.cross_entropy in float64 with autograd: (loss, d loss / d x)."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = None if w is None else torch.tensor(np.asarray(w, np.float64))
    tt = torch.tensor(np.asarray(t, np.float64) if np.asarray(t).dtype.kind == "f"
                      else np.asarray(t, np.int64))
    loss = F.cross_entropy(xt, tt, weight=wt, reduction=reduction, **kw)
    g = torch.ones_like(loss) if grad_output is None else torch.tensor(grad_output)
    loss.backward(g)
    return loss.detach().numpy(), xt.grad.numpy()


def fastce_both(backend, x, t, w=None, **kw):
    loss = fastce.cross_entropy(backend.to(x), backend.to(t), backend.to(w), **kw)
    loss2, grad = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), backend.to(w),
                                                 **kw)
    return backend.host(loss), backend.host(loss2), backend.host(grad)


def masked_case(rng, shape, dtype, *, frac_inf, weights, ignore_frac):
    """Random logits with -inf entries (first/last class, vector-lane boundaries, targets),
    targets with some ignored, weights with zeros."""
    x = rng.standard_normal(shape) * 3
    C = shape[1] if len(shape) > 1 else shape[0]
    mask = rng.random(shape) < frac_inf
    for c in {0, C - 1, min(C - 1, 7), min(C - 1, 8), min(C - 1, 16), min(C - 1, 31)}:
        sl = [slice(None)] * len(shape)
        sl[1] = c
        mask[tuple(sl)] |= rng.random(mask[tuple(sl)].shape) < 0.3
    x[mask] = -np.inf
    loss_shape = shape[:1] + shape[2:]
    t = rng.integers(0, C, loss_shape)
    t[rng.random(loss_shape) < ignore_frac] = -100
    w = None
    if weights == "positive":
        w = rng.random(C) + 0.1
    elif weights == "zeros":
        w = rng.random(C) + 0.1
        w[rng.random(C) < 0.3] = 0.0
    return x.astype(dtype), t, w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_logits_with_smoothing_weights_ignore_match_torch(backend, dtype):
    """The randomized differential test: -inf masks x label smoothing x weights (zeros too) x
    ignore_index, every layout and kernel size class, loss (3 reductions) and gradient."""
    rng = np.random.default_rng(1234 if dtype == np.float32 else 4321)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    for shape in shapes(backend):
        for trial in range(2 if backend.small else 3):
            eps = [0.0, 0.1, 0.6][trial % 3]
            weights = [None, "positive", "zeros"][(trial + len(shape)) % 3]
            x, t, w = masked_case(rng, shape, dtype, frac_inf=0.2, weights=weights,
                                  ignore_frac=0.2)
            for reduction in ("mean", "sum", "none"):
                want_l, want_g = torch_reference(x, t, w, reduction=reduction,
                                                 label_smoothing=eps)
                # Ignored positions get an exactly-zero gradient (a documented difference:
                # torch's is nan there when the whole row is -inf).
                want_g = np.where(np.expand_dims(t == -100, 1), 0.0, want_g)
                got_l, got_l2, got_g = fastce_both(backend, x, t, w, reduction=reduction,
                                                   label_smoothing=eps)
                what = f"{shape} {np.dtype(dtype)} eps={eps} w={weights} {reduction}"
                assert_close(got_l, want_l, tol, what=what + " loss")
                assert_close(got_l2, want_l, tol, what=what + " loss (with grad)")
                assert_close(got_g, want_g, tol, what=what + " grad")


@pytest.mark.parametrize("C,pos", [(C, p) for C in (20, 40)
                                   for p in (0, 1, 7, 8, 15, 16, 19, 31, 32, 38, 39) if p < C])
def test_neg_inf_logit_anywhere_with_smoothing(backend, pos, C):
    """Issue example: x = linspace(0, 1, 40), x[0] = -inf, smoothing 0.1 -> inf, not nan."""
    x = np.linspace(0, 1, C)
    x[pos] = -np.inf
    for dtype in (np.float32, np.float64):
        got = backend.host(fastce.cross_entropy(backend.to(x.astype(dtype)),
                                                backend.to(np.array(1)), label_smoothing=0.1))
        assert np.isposinf(got), (pos, C, dtype, got)
        _, grad = fastce.cross_entropy_with_grad(backend.to(x.astype(dtype)),
                                                 backend.to(np.array(1)), label_smoothing=0.1)
        _, want = torch_reference(x, np.array(1), label_smoothing=0.1)
        assert_close(backend.host(grad), want, 1e-5)


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_ignored_positions_get_exact_zero_gradient(backend, fill):
    """The documented difference from torch: an ignored position's gradient is exactly 0 even
    when its logits are nan or infinite (stored exps are nan there, and nan * 0 is nan)."""
    rng = np.random.default_rng(18)
    for shape in shapes(backend):
        for opts in (dict(), dict(label_smoothing=0.1), dict(softcap=5.0)):
            x = rng.standard_normal(shape)
            t = rng.integers(0, shape[1], shape[:1] + shape[2:])
            x[0] = fill
            t[0] = -100
            _, grad = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), **opts)
            g = backend.host(grad)
            assert np.all(g[0] == 0), (shape, opts)
            assert np.all(np.isfinite(g[1:])), (shape, opts)


def test_out_partly_overlapping_input_is_read_through_a_copy(backend):
    """out= that overlaps the logits without being them: the right answer (never the in-place
    path's), on every kernel path, for both dtypes."""
    rng = np.random.default_rng(7)
    for shape in shapes(backend):
        n = math.prod(shape)
        for dtype in (np.float32, np.float64):
            for shift in (n // 2, 1, -(n // 3)):
                buf = rng.standard_normal(n + abs(shift)).astype(dtype)
                lo_x, lo_o = (0, shift) if shift > 0 else (-shift, 0)
                x_host = buf[lo_x:lo_x + n].reshape(shape).copy()
                loss_shape = shape[:1] + shape[2:]
                t = rng.integers(0, shape[1], loss_shape)
                want_l, want_g = torch_reference(x_host, t, label_smoothing=0.2)
                dev = backend.to(buf)
                x, o = dev[lo_x:lo_x + n].reshape(shape), dev[lo_o:lo_o + n].reshape(shape)
                loss, grad = fastce.cross_entropy_with_grad(x, backend.to(t), out=o,
                                                            label_smoothing=0.2)
                assert grad is o
                tol = 2e-5 if dtype == np.float32 else 1e-10
                assert_close(backend.host(loss), want_l, tol, what=f"{shape} {shift}")
                assert_close(backend.host(grad), want_g, tol, what=f"{shape} {shift}")


def test_out_is_input_still_in_place(backend):
    rng = np.random.default_rng(8)
    for shape in shapes(backend):
        x = rng.standard_normal(shape).astype(np.float32)
        t = rng.integers(0, shape[1], shape[:1] + shape[2:])
        want_l, want_g = torch_reference(x, t)
        xd = backend.to(x)
        loss, grad = fastce.cross_entropy_with_grad(xd, backend.to(t), out=xd)
        assert grad is xd
        assert_close(backend.host(loss), want_l, 2e-5)
        assert_close(backend.host(xd), want_g, 2e-5)


def test_out_overlapping_weight_or_grad_output(backend):
    """out may even overlap the small arguments: they are copied first."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 40))
    t = rng.integers(0, 40, 6)
    go = rng.standard_normal(6)
    w = rng.random(40) + 0.5
    want_l, want_g = torch_reference(x, t, w, reduction="none", grad_output=go)
    buf = np.concatenate([w, go, np.zeros(6 * 40 - 46)])
    o = backend.to(buf)
    wd, god, od = o[:40], o[40:46], o.reshape(6, 40)
    loss, grad = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), wd,
                                                grad_output=god, reduction="none", out=od)
    assert_close(backend.host(loss), want_l, 1e-10)
    assert_close(backend.host(grad), want_g, 1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_of_unused_class_without_smoothing(backend, bad):
    """label_smoothing=0 never evaluates the smoothing term (0 * inf = nan)."""
    rng = np.random.default_rng(10)
    for shape in shapes(backend):
        C = shape[1]
        x = rng.standard_normal(shape)
        t = rng.integers(0, C - 1, shape[:1] + shape[2:])      # class C-1 unused
        w = rng.random(C) + 0.5
        w[C - 1] = bad
        want_l, want_g = torch_reference(x, t, w)
        got_l, got_l2, got_g = fastce_both(backend, x, t, w)
        assert np.isfinite(got_l) and np.isfinite(got_l2), (shape, got_l, got_l2)
        assert_close(got_l, want_l, 1e-10)
        assert_close(got_g, want_g, 1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_logits_near_float64_limit(backend, eps):
    """(m - s_t) + log(sum): [[1e308, 1e308, 0]] -> 0.6931 (3.3e306 with smoothing)."""
    for C in ([3, 5] if backend.small else [3, 40]):
        for layout in ("rows", "strided"):
            x = np.zeros((2, C))
            x[:, :2] = [1e308, 1e308]
            x[1, :2] = [-1e308, 1e308 * 0.5]
            t = np.array([0, 1])
            if layout == "strided":
                x, t = x[:, :, None], t[:, None]
            want_l, want_g = torch_reference(x, t, label_smoothing=eps, reduction="none")
            got_l, got_l2, got_g = fastce_both(backend, x, t, label_smoothing=eps,
                                               reduction="none")
            assert_close(got_l, want_l, 1e-12, what=f"{C} {layout}")
            assert_close(got_l2, want_l, 1e-12, what=f"{C} {layout}")
            assert_close(got_g, want_g, 1e-12, what=f"{C} {layout}")


def test_logits_near_float64_limit_probability_targets(backend):
    x = np.array([[1e308, 1e308, 0.0], [5.0, 1e307, -1e307]])
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    want_l, want_g = torch_reference(x, p, reduction="none", label_smoothing=0.1)
    got_l, got_l2, got_g = fastce_both(backend, x, p, reduction="none", label_smoothing=0.1)
    assert_close(got_l, want_l, 1e-12)
    assert_close(got_g, want_g, 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap", [1e8, 1e4, 50.0, 0.5])
def test_large_softcap_keeps_precision(backend, dtype, cap):
    """softcap=1e8 on [[1, 2, 3]], target 2: 0.4076 (the exp form of tanh cancelled)."""
    x = np.array([[1.0, 2, 3], [0.3, -2e-3, 7.5]])
    t = np.array([2, 0])
    xt = torch.tensor(x, requires_grad=True)
    loss = F.cross_entropy(cap * torch.tanh(xt / cap), torch.tensor(t), reduction="sum")
    loss.backward()
    for shaped in (x, np.tile(x, (1, 15))[:, :40]):
        if shaped.shape[1] != 3:
            continue
        got_l, _, got_g = fastce_both(backend, shaped.astype(dtype), t, softcap=cap,
                                      reduction="sum")
        tol = 1e-6 if dtype == np.float32 else 1e-13
        assert_close(got_l, loss.item(), tol)
        assert_close(got_g, xt.grad.numpy(), tol)


@pytest.mark.parametrize("cap", [2.0, 30.0])
def test_softcap_maps_infinite_logits_to_the_cap(backend, cap):
    """softcap * tanh(+-inf / softcap) = +-softcap: finite, as in torch (no +inf -> nan)."""
    rng = np.random.default_rng(17)
    for shape in shapes(backend):
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape) * 3
            x[0, 1] = np.inf
            x[1, 0] = -np.inf
            t = np.ones(shape[:1] + shape[2:], np.int64)
            xt = torch.tensor(x, requires_grad=True)
            loss = F.cross_entropy(cap * torch.tanh(xt / cap), torch.tensor(t), reduction="sum",
                                   label_smoothing=0.1)
            loss.backward()
            got_l, _, got_g = fastce_both(backend, x.astype(dtype), t, reduction="sum",
                                          label_smoothing=0.1, softcap=cap)
            tol = 2e-5 if dtype == np.float32 else 1e-12
            assert_close(got_l, loss.item(), tol, what=str(shape))
            assert_close(got_g, xt.grad.numpy(), tol, what=str(shape))


def test_softcap_tanh_accuracy():
    """cpu.softcap_fast against float64 tanh over 60 decades: within 4 ulp of the dtype."""
    from numba import njit

    @njit
    def capped(x, cap):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = cpu.softcap_fast(x[i], cap, x.dtype.type(1.0) / cap)
        return out

    for dtype in (np.float32, np.float64):
        y = np.concatenate([np.geomspace(1e-30, 40, 20001), -np.geomspace(1e-30, 40, 201),
                            [0.0]]).astype(dtype)
        got = capped(y, dtype(1.0)).astype(np.float64)
        ref = np.tanh(y.astype(np.float64))
        ulp = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
        assert np.all(np.abs(got - ref) <= 4 * ulp), dtype


# ---------------------------------------------------------------------------------------------
# Targets, options and arguments
# ---------------------------------------------------------------------------------------------
def test_uint64_targets_beyond_int64_are_out_of_range(backend):
    t = np.array([1, 2**64 - 100], np.uint64)
    x = np.zeros((2, 3))
    for ignore in (-100, -100 + 2**64 - 2**64):
        with pytest.raises(ValueError, match=rf"target {2**64 - 100} at position \(1,\)"):
            fastce.cross_entropy(backend.to(x), backend.to(t), ignore_index=ignore)
        with pytest.raises(ValueError, match=rf"target {2**64 - 100}"):
            fastce.cross_entropy_with_grad(backend.to(x), backend.to(t))
        with pytest.raises(ValueError, match=rf"target {2**64 - 100}"):
            fastce.nll_loss(backend.to(x), backend.to(t))
    ok = np.array([1, 2], np.uint64)
    assert np.isfinite(backend.host(fastce.cross_entropy(backend.to(x), backend.to(ok))))


def test_uint64_targets_linear_cross_entropy():
    h, c = np.ones((2, 4)), np.ones((3, 4))
    with pytest.raises(ValueError, match=rf"target {2**64 - 100} at position \(1,\)"):
        fastce.linear_cross_entropy(h, c, np.array([1, 2**64 - 100], np.uint64))
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.linear_cross_entropy_with_grad(h, c, np.array([1, 2**63], np.uint64))


@pytest.mark.parametrize("weight", [-np.ones(30), np.r_[np.zeros(29), 1.0], None])
@pytest.mark.parametrize("chunk", [None, 3])
def test_linear_negative_or_zero_weight_sum_with_z_loss(weight, chunk):
    """No spurious 'z_loss must be >= 0': the chunks use the batch's denominators directly."""
    rng = np.random.default_rng(11)
    h, c = rng.standard_normal((10, 6)), rng.standard_normal((30, 6))
    t = rng.integers(0, 29, 10)
    full = h @ c.T
    for eps in (0.0, 0.2):
        want = fastce.cross_entropy(full, t, weight, z_loss=1e-3, label_smoothing=eps)
        got = fastce.linear_cross_entropy(h, c, t, weight=weight, z_loss=1e-3,
                                          label_smoothing=eps, chunk_size=chunk)
        assert_close(got, want, 1e-12)
        loss, gh, gc, _ = fastce.linear_cross_entropy_with_grad(
            h, c, t, weight=weight, z_loss=1e-3, label_smoothing=eps, chunk_size=chunk)
        _, gl = fastce.cross_entropy_with_grad(full, t, weight, z_loss=1e-3,
                                               label_smoothing=eps)
        assert_close(loss, want, 1e-12)
        assert_close(gh, gl @ c, 1e-10)
        assert_close(gc, gl.T @ h, 1e-10)


def test_out_must_be_an_array_of_the_backend(backend):
    x, t = np.array([[1.0, 2.0, 3.0]]), np.array([1])
    if backend.name == "cpu":
        for out in ([[0.0, 0.0, 0.0]], x.tolist()):
            with pytest.raises(TypeError, match="out must be a NumPy array"):
                fastce.cross_entropy_with_grad(x.tolist(), [1], out=out)
    else:
        with pytest.raises(TypeError, match="out must be a CUDA device array"):
            fastce.cross_entropy_backward(backend.to(x), backend.to(t), out=np.zeros((1, 3)))


@pytest.mark.parametrize("reduction,expected", [("mean", np.nan), ("sum", 0.0), ("none", None)])
def test_no_classes_all_ignored_gives_torch_values(backend, reduction, expected):
    x = np.zeros((2, 0))
    t = np.array([-100, -100])
    for fn in (fastce.nll_loss, fastce.cross_entropy):
        got = backend.host(fn(backend.to(x), backend.to(t), reduction=reduction))
        want = F.nll_loss(torch.zeros(2, 0, dtype=torch.float64), torch.tensor(t),
                          reduction=reduction).numpy()
        if expected is None:
            assert got.shape == (2,) and np.all(got == 0)
        assert_close(got, want, 0, atol=0)
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.nll_loss(backend.to(x), backend.to(np.array([0, -100])))
    loss, grad = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), reduction="sum")
    assert backend.host(grad).shape == (2, 0) and backend.host(loss) == 0


def test_empty_batch_with_huge_vocabulary_allocates_nothing_of_size_C():
    import tracemalloc
    x = np.zeros((0, 400_000_000), np.float32)
    tracemalloc.start()
    try:
        loss = fastce.cross_entropy(x, np.zeros(0, np.int64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isnan(loss) and peak < 1 << 20


def test_ones_cache_is_bounded():
    """Small arrays of ones are cached (at most ONES_CACHE_ENTRIES), large ones never kept."""
    f32 = np.dtype(np.float32)
    small = cpu._ones((1000,), f32)
    assert small is cpu._ones((1000,), f32)
    big_n = cpu.ONES_CACHE_BYTES // f32.itemsize + 1
    assert cpu._ones((big_n,), f32) is not cpu._ones((big_n,), f32)
    assert cpu._cached_ones.cache_info().maxsize == cpu.ONES_CACHE_ENTRIES
    fastce.cross_entropy(np.zeros((1, 5_000_000), np.float32), np.zeros(1, np.int64))
    assert cpu._cached_ones.cache_info().currsize <= cpu.ONES_CACHE_ENTRIES


def test_cached_ones_stay_ones():
    """The cached ones are writeable (see the next test) and no call writes them, in place
    or not."""
    rng = np.random.default_rng(3)
    for shape in ((5, 7), (300, 7), (2, 7, 9)):
        x = rng.standard_normal(shape)
        t = rng.integers(0, 7, shape[:1] + shape[2:])
        fastce.cross_entropy_with_grad(x, t, out=x)
        fastce.cross_entropy(rng.standard_normal(shape), t)
    assert (cpu._ones((7,), np.dtype(np.float64)) == 1.0).all()


@pytest.mark.parametrize("shape", [(64, 40), (300, 7), (2, 7, 600)], ids=str)
def test_read_only_weights_and_grad_output_compile_nothing_new(shape):
    """Numba types a read-only array apart: read-only weights or grad_output would compile
    every kernel once more.  They are copied instead, with the same results."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:])
    w = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    g = np.array(2.0)
    want = (fastce.cross_entropy(x, t, w), fastce.cross_entropy_with_grad(x, t, w, grad_output=g))

    def n_compiled():
        return sum(len(d.signatures) for d in cpu._KERNELS.values())

    before = n_compiled()
    w.flags.writeable = False
    g.flags.writeable = False
    got = (fastce.cross_entropy(x, t, w), fastce.cross_entropy_with_grad(x, t, w, grad_output=g))
    assert n_compiled() == before
    assert got[0] == want[0] and got[1][0] == want[1][0]
    np.testing.assert_array_equal(got[1][1], want[1][1])


def test_probability_targets_accept_negative_ignore_index(backend):
    x = np.random.default_rng(12).standard_normal((3, 4))
    p = np.full((3, 4), 0.25)
    want = backend.host(fastce.cross_entropy(backend.to(x), backend.to(p)))
    for ii in (-1, -100, -(2**40)):
        got = backend.host(fastce.cross_entropy(backend.to(x), backend.to(p), ignore_index=ii))
        assert got == want
    for ii in (0, 3, 255):
        with pytest.raises(ValueError, match="ignore_index"):
            fastce.cross_entropy(backend.to(x), backend.to(p), ignore_index=ii)


@pytest.mark.parametrize("axis,err", [("bogus", TypeError), (1.0, TypeError), (True, TypeError),
                                      (1, ValueError), (-2, ValueError)])
def test_one_dimensional_input_validates_class_axis(axis, err):
    with pytest.raises(err, match="class_axis"):
        fastce.cross_entropy(np.zeros(3), np.array(1), class_axis=axis)
    with pytest.raises(err, match="class_axis"):
        fastce.nll_loss(np.zeros(3), np.array(1), class_axis=axis)
    for ok in (0, -1, None):
        assert np.isclose(fastce.cross_entropy(np.zeros(3), np.array(1), class_axis=ok),
                          math.log(3))


@pytest.mark.parametrize("order", [">", "<"])
def test_byte_order_of_every_argument(order):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 3, 5))
    t = rng.integers(0, 3, (4, 5))
    w = rng.random(3) + 0.5
    go = rng.standard_normal((4, 5))
    want_l, want_g = torch_reference(x, t, w, reduction="none", grad_output=go)
    for f in ("f4", "f8"):
        xs = x.astype(order + f)
        loss, grad = fastce.cross_entropy_with_grad(
            xs, t.astype(order + "i8"), w.astype(order + "f8"), reduction="none",
            grad_output=go.astype(order + "f8"))
        tol = 2e-5 if f == "f4" else 1e-12
        assert_close(loss, want_l, tol)
        assert_close(grad, want_g, tol)
        assert np.array_equal(xs, x.astype(order + f))          # input untouched
        assert_close(fastce.log_softmax(xs, axis=1), torch.log_softmax(torch.tensor(x), 1), tol)


@pytest.mark.parametrize("ii", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_beyond_int64_is_rejected(ii):
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastce.cross_entropy(np.zeros((2, 3)), np.array([1, 1]), ignore_index=ii)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fastce.linear_cross_entropy(np.ones((2, 4)), np.ones((3, 4)), np.array([1, 1]),
                                    ignore_index=ii)


@pytest.mark.parametrize("go", ["a", b"a", 1 + 2j, np.complex128(1), np.array([1 + 1j]),
                                np.array(["x"]), np.array(True)])
def test_grad_output_must_be_real(go):
    for reduction in ("mean", "none"):
        with pytest.raises(TypeError, match="grad_output"):
            fastce.cross_entropy_backward(np.zeros((1, 3)), np.array([1]), go,
                                          reduction=reduction)


def test_weight_overflowing_float32_is_rejected():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"weight 1e\+39 of class 1 overflows .*float32"):
        fastce.cross_entropy(x, np.array([1, 1]), np.array([1, 1e39, 1]))
    with pytest.raises(ValueError, match="overflows"):
        fastce.cross_entropy(x.astype(np.float16), np.array([1, 1]), np.array([1, 1e39, 1]))
    # float64 logits keep the weight; an inf weight given as such is the caller's (torch: nan/inf)
    assert np.isfinite(fastce.cross_entropy(x.astype(np.float64), np.array([0, 0]),
                                            np.array([1, 1e39, 1])))


def test_inputs_never_modified(backend):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    t = rng.integers(0, 40, 6)
    w = rng.random(40).astype(np.float32)
    xd, td, wd = backend.to(x), backend.to(t), backend.to(w)
    fastce.cross_entropy_with_grad(xd, td, wd, label_smoothing=0.1, softcap=5.0)
    fastce.cross_entropy_backward(xd, td, None, wd, reduction="sum")
    assert np.array_equal(backend.host(xd), x)
    assert np.array_equal(backend.host(td), t)
    assert np.array_equal(backend.host(wd), w)


# ---------------------------------------------------------------------------------------------
# Dispatch of foreign CUDA objects
# ---------------------------------------------------------------------------------------------
class _RefusingCudaArray:
    """Like a torch CUDA tensor that requires grad: the interface property raises."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


def test_dispatch_survives_an_interface_that_raises():
    assert dispatch.is_device_array(_RefusingCudaArray())
    with pytest.raises(TypeError, match="'target' is not"):
        dispatch.backend_for(input=_RefusingCudaArray(), target=np.zeros(3))


def test_gpu_void_typestrs(monkeypatch):
    """A 2-byte void (torch's and ml_dtypes' bfloat16) is read as bfloat16, which needs
    ml_dtypes (a clear TypeError without it); other voids are rejected."""
    gpu = pytest.importorskip("fastce.gpu")
    assert gpu._bfloat16_typestr("<V2") and not gpu._bfloat16_typestr("<f4")
    with pytest.raises(TypeError, match="not supported"):
        gpu._bfloat16_typestr("<V4")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)       # (import then fails)
    with pytest.raises(TypeError, match="needs ml_dtypes"):
        gpu._bfloat16_typestr("<V2")


# ---------------------------------------------------------------------------------------------
# Process safety: forked children after parallel kernels in the parent
# ---------------------------------------------------------------------------------------------
_FORK_X = np.random.default_rng(15).standard_normal((64, 2048)).astype(np.float32)
_FORK_T = np.random.default_rng(16).integers(0, 2048, 64)


def _child_loss(seed):
    x = np.roll(_FORK_X, seed, axis=0)
    loss, grad = fastce.cross_entropy_with_grad(x, np.roll(_FORK_T, seed))
    return float(loss), float(np.abs(grad).sum()), os.getpid()


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_pool_after_parallel_kernels():
    assert _FORK_X.size >= cpu.SERIAL_BELOW          # the parent uses the thread pool
    want = [_child_loss(s)[:2] for s in range(4)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map_async(_child_loss, range(4)).get(timeout=300)
    assert [g[:2] for g in got] == want             # the children's own pools: the same numbers
    assert all(g[2] != os.getpid() for g in got)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_over_zero_weight_targets_is_nan_like_torch(backend, smoothing, dtype):
    """Every target of zero weight: torch's mean is nan even with label smoothing (its nll
    part is 0/0), not +inf; the gradient is nan; "sum" stays finite."""
    rng = np.random.default_rng(7)
    for shape in shapes(backend):
        C = shape[1]
        x = rng.standard_normal(shape).astype(dtype)
        t = rng.integers(0, C, shape[:1] + shape[2:])
        w = rng.random(C) + 0.5
        w[np.unique(t)] = 0.0
        w = w.astype(dtype)
        for reduction in ("mean", "sum"):
            want_l, want_g = torch_reference(x, t, w, reduction=reduction,
                                             label_smoothing=smoothing)
            loss, loss2, grad = fastce_both(backend, x, t, w, reduction=reduction,
                                            label_smoothing=smoothing)
            for got in (loss, loss2):
                assert np.isnan(got) == np.isnan(want_l), (shape, reduction, got, want_l)
            assert np.array_equal(np.isnan(grad), np.isnan(want_g)), (shape, reduction)
            if reduction == "sum":
                assert_close(loss, want_l, 1e-5 if dtype == np.float32 else 1e-10)
    # the sharded and Dask paths divide through the same rule
    x = rng.standard_normal((6, 5)).astype(dtype)
    t = np.array([1, 3, 1, 3, 1, 3])
    w = np.array([1.0, 0.0, 2.0, 0.0, 1.5], dtype)
    st = fastce.merge_stats([fastce.shard_stats(x[:, :2], t, 0, 5, w, label_smoothing=smoothing),
                             fastce.shard_stats(x[:, 2:], t, 2, 5, w, label_smoothing=smoothing)])
    assert np.isnan(fastce.finalize_stats(st, t, w))
    if not backend.small:
        da = pytest.importorskip("dask.array")
        got = fastce.cross_entropy(da.from_array(x, chunks=(3, 2)), da.from_array(t, chunks=3),
                                   w, label_smoothing=smoothing).compute(scheduler="sync")
        assert np.isnan(got)


def test_z_loss_where_the_max_is_infinite_follows_the_spec(backend):
    """A row with a +inf logit or only -inf: lse is the max (+-inf) and the z-loss term
    z_loss * lse^2 is +inf, as in fastce.spec (the loss itself is nan there), on every
    layout and for probability targets."""
    from fastce import spec
    x = np.array([[np.inf, 1.0, 2.0], [-np.inf] * 3, [0.0, 1.0, 2.0]])
    t = np.array([1, 0, 2])
    p = np.full((3, 3), 1 / 3)
    xs = np.repeat(x[:, :, None], 2, 2)
    cases = [(x, t, x[:, :, None], t[:, None]), (x, p, x[:, :, None], p[:, :, None]),
             (xs, t[:, None].repeat(2, 1), xs, t[:, None].repeat(2, 1)),
             (xs, p[:, :, None].repeat(2, 2), xs, p[:, :, None].repeat(2, 2))]
    for xc, tc, x3, t3 in cases:
        prob = tc.dtype.kind == "f"
        fn = spec.cross_entropy_prob if prob else spec.cross_entropy_index
        _, want_z, want_lse, *_ = fn(x3, t3, z_loss=0.1)
        out = fastce.cross_entropy(backend.to(xc), backend.to(tc), reduction="none",
                                   z_loss=0.1, return_z_loss=True, return_lse=True)
        got_z = backend.host(out.z_loss).reshape(want_z.shape)
        got_lse = backend.host(out.lse).reshape(want_lse.shape)
        assert np.array_equal(got_z[:2], want_z[:2]) and np.all(np.isinf(got_z[:2]))
        assert np.array_equal(got_lse[:2], want_lse[:2])
        assert_close(got_z[2:], want_z[2:], 1e-12)
    st = fastce.merge_stats([fastce.shard_stats(x[:, :1], t, 0, 3),
                             fastce.shard_stats(x[:, 1:], t, 1, 3)])
    out = fastce.finalize_stats(st, t, reduction="none", z_loss=0.1, return_z_loss=True,
                                return_lse=True)
    assert list(out.lse[:2]) == [np.inf, -np.inf] and list(out.z_loss[:2]) == [np.inf, np.inf]
