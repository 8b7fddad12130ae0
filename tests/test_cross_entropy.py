"""fastce against its float64 spec and against PyTorch, on every backend (``backend`` fixture).

float64 inputs must agree to 1e-9 relative, float32 to 2e-4 (loss and gradient).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastce
from conftest import SIMULATOR
from helpers import assert_close, random_case, spec_loss_and_grad

RTOL = {np.float64: 1e-9, np.float32: 2e-4}
SEED_X1 = np.array([0, 1, 0, 0, 0, 1], np.float32).reshape(1, 3, 2)
SEED_X2 = np.array([0, 1, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0.5], np.float32).reshape(1, 3, 4)


@pytest.mark.parametrize("x,t,w,expected", [
    (SEED_X1, [[0, 1]], [1, 1, 1], 1.4803),
    (SEED_X1, [[0, 1]], [1, 2, 3], 1.6075),
    (SEED_X2, [[0, 1, 2, 2]], [1, 2, 3], 1.5472),
])
def test_seed_examples(backend, x, t, w, expected):
    """The seed article: with weights, the mean divides by the sum of the targets' weights."""
    xb, tb = backend.to(x), backend.to(np.array(t))
    wb = backend.to(np.array(w, np.float32))
    loss = backend.host(fastce.cross_entropy(xb, tb, wb, ignore_index=255))
    assert round(float(loss), 4) == expected
    loss_fn = fastce.CrossEntropyLoss(weight=wb, ignore_index=255)
    assert round(float(backend.host(loss_fn(xb, tb))), 4) == expected
    assert backend.host(loss).dtype == np.float32


def _run(backend, x, t, w, *, grad_output=None, **opts):
    xb, tb, wb = backend.to(x), backend.to(np.asarray(t)), backend.to(w)
    gb = backend.to(grad_output) if isinstance(grad_output, np.ndarray) else grad_output
    loss, grad = fastce.cross_entropy_with_grad(xb, tb, wb, grad_output=gb, **opts)
    return backend.host(loss), backend.host(grad)


def _check(backend, x, t, w, *, grad_output=None, **opts):
    rtol = RTOL[x.dtype.type]
    want_l, want_g = spec_loss_and_grad(x, t, w, grad_output=grad_output, **opts)
    got_l, got_g = _run(backend, x, t, w, grad_output=grad_output, **opts)
    assert got_l.dtype == x.dtype and got_g.dtype == x.dtype and got_g.shape == x.shape
    # A loss near 0 comes from cancellation (lse - s_t): its absolute error scales with the
    # logits' magnitude, so allow rtol/100 of that as absolute slack.
    finite = np.abs(x[np.isfinite(x)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    assert_close(got_l, want_l, rtol, atol=rtol * 1e-2 * scale, what="loss")
    assert_close(got_g, want_g, rtol, what="grad")
    # The three entry points agree with each other.
    xb, tb, wb = backend.to(x), backend.to(np.asarray(t)), backend.to(w)
    gb = backend.to(grad_output) if isinstance(grad_output, np.ndarray) else grad_output
    only_loss = backend.host(fastce.cross_entropy(xb, tb, wb, **opts))
    only_grad = backend.host(fastce.cross_entropy_backward(xb, tb, gb, wb, **opts))
    # The loss-only kernel may round its sum of exps differently (another vectorised order or
    # FMA contraction): lse ulps apart, an absolute difference on the logits' scale.
    same = 1e-6 if x.dtype == np.float32 else 1e-13
    assert_close(only_loss, got_l, same, atol=same * scale)
    np.testing.assert_array_equal(only_grad, got_g)


def _shapes(small):
    if small:
        return st.sampled_from([(5,), (3, 4), (2, 3, 5), (2, 3, 2, 2), (1, 7), (3, 9)])
    return st.one_of(
        st.tuples(st.integers(1, 40)),
        st.tuples(st.integers(1, 60), st.integers(1, 300)),
        st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 300)),
        st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 9), st.integers(1, 40)),
    )


@st.composite
def cases(draw, small):
    shape = draw(_shapes(small))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    prob = draw(st.booleans()) and draw(st.booleans())
    C = shape[1] if len(shape) > 1 else shape[0]
    ignore_index = draw(st.sampled_from([-100, 0, C - 1, 255]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x, t = random_case(rng, shape, dtype, prob=prob, ignore_frac=0.0 if prob else 0.25,
                       ignore_index=ignore_index, scale=draw(st.sampled_from([0.5, 3.0, 20.0])))
    opts = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.9, 1.0])))
    if not prob:
        opts["ignore_index"] = ignore_index
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([1.0, 5.0, 30.0]))
    if draw(st.booleans()):
        opts["z_loss"] = draw(st.sampled_from([1e-4, 0.1]))
    w = (rng.random(C) + 0.05).astype(dtype) if draw(st.booleans()) else None
    go = None
    if opts["reduction"] == "none":
        if draw(st.booleans()):
            lshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
            go = rng.standard_normal(lshape).astype(dtype)
    elif draw(st.booleans()):
        go = float(rng.standard_normal())
    return x, t, w, go, opts


@settings(max_examples=15 if SIMULATOR else 150, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_configurations_match_spec(backend, data):
    x, t, w, go, opts = data.draw(cases(backend.small))
    _check(backend, x, t, w, grad_output=go, **opts)


LAYOUT_SHAPES = [(7,), (33, 17), (4, 5, 6), (2, 21, 9, 11), (3, 1000), (2, 6, 700)]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", [
    dict(), dict(label_smoothing=0.2, weighted=True), dict(ignore_index=2, weighted=True),
    dict(reduction="sum", softcap=4.0), dict(reduction="none", z_loss=1e-3, weighted=True),
    dict(prob=True, weighted=True, label_smoothing=0.1),
])
def test_grid_matches_spec(backend, shape, dtype, opts):
    if backend.small and (np.prod(shape) > 400):
        pytest.skip("simulator: small shapes only")
    opts = dict(opts)
    rng = np.random.default_rng(len(shape) * 1000 + shape[-1])
    prob = opts.pop("prob", False)
    weighted = opts.pop("weighted", False)
    x, t = random_case(rng, shape, dtype, prob=prob, ignore_frac=0.2,
                       ignore_index=opts.get("ignore_index", -100))
    C = shape[1] if len(shape) > 1 else shape[0]
    w = (rng.random(C) + 0.1).astype(dtype) if weighted else None
    _check(backend, x, t, w, **opts)


@pytest.mark.parametrize("target_dtype", [np.int64, np.int32, np.uint8, np.int16, np.uint16,
                                          np.int8, np.uint32, np.uint64])
def test_integer_target_dtypes(backend, target_dtype):
    rng = np.random.default_rng(3)
    x, t = random_case(rng, (4, 5, 3), np.float64)
    ignore = 255 if np.dtype(target_dtype).kind == "u" else -1
    t = t.astype(target_dtype)
    t[0, 0] = ignore
    want = backend.host(fastce.cross_entropy(backend.to(x), backend.to(t.astype(np.int64)),
                                             ignore_index=ignore))
    got = backend.host(fastce.cross_entropy(backend.to(x), backend.to(t), ignore_index=ignore))
    np.testing.assert_array_equal(got, want)


def test_uint8_mask_with_ignore_255(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 21, 6, 5)).astype(np.float32)
    t = rng.integers(0, 21, (2, 6, 5)).astype(np.uint8)
    t[:, :2] = 255
    w = (rng.random(21) + 0.5).astype(np.float32)
    want_l, want_g = spec_loss_and_grad(x, t, w, ignore_index=255)
    got_l, got_g = _run(backend, x, t, w, ignore_index=255)
    assert_close(got_l, want_l, 2e-4)
    assert_close(got_g, want_g, 2e-4)


def test_float16_computed_in_float32(backend):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 9)) * 2).astype(np.float16)
    t = rng.integers(0, 9, 6)
    loss, grad = _run(backend, x, t, None)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    want_l, want_g = spec_loss_and_grad(x.astype(np.float64), t, None)
    assert_close(loss, want_l, 2e-3)
    assert_close(grad, want_g, 2e-3)


def test_views_fortran_and_lists(backend):
    """Non-contiguous views and Fortran order give the contiguous answer (CPU: and lists)."""
    rng = np.random.default_rng(6)
    big = rng.standard_normal((8, 12, 5))
    x = big[::2, ::3, 1]                      # (4, 4) strided view
    t = np.array([0, 3, 1, 2])
    want = spec_loss_and_grad(x, t)
    got = _run(backend, x, t, None)
    assert_close(got[0], want[0], 1e-9)
    assert_close(got[1], want[1], 1e-9)
    xf = np.asfortranarray(rng.standard_normal((5, 7, 3)))
    tf = rng.integers(0, 7, (5, 3))
    assert_close(_run(backend, xf, tf, None)[1], spec_loss_and_grad(xf, tf)[1], 1e-9)
    if backend.name == "cpu":
        loss = fastce.cross_entropy([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], [2, 0])
        assert_close(loss, spec_loss_and_grad(np.array([[1.0, 2, 3], [0.5, 0.5, 0]]),
                                               np.array([2, 0]))[0], 1e-12)


def test_class_axis_last_needs_no_transpose(backend):
    """(B, T, V) logits with class_axis=-1 equal the transposed (B, V, T) call."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 11))
    t = rng.integers(0, 11, (2, 5))
    t[0, 1] = -100
    l1, g1 = _run(backend, x, t, None, class_axis=-1, reduction="none")
    l2, g2 = _run(backend, np.ascontiguousarray(x.transpose(0, 2, 1)), t, None, reduction="none")
    assert_close(l1, l2, 1e-12)
    assert_close(g1, g2.transpose(0, 2, 1), 1e-12)


def test_inputs_are_not_modified(backend):
    rng = np.random.default_rng(8)
    x, t = random_case(rng, (6, 7, 3), np.float32, ignore_frac=0.3)
    w = rng.random(7).astype(np.float32)
    go = rng.standard_normal((6, 3)).astype(np.float32)
    xb, tb, wb, gb = (backend.to(a) for a in (x, t, w, go))
    copies = [backend.host(a).copy() for a in (xb, tb, wb, gb)]
    fastce.cross_entropy_with_grad(xb, tb, wb, grad_output=gb, reduction="none",
                                   label_smoothing=0.1, softcap=3.0)
    for a, c in zip((xb, tb, wb, gb), copies):
        np.testing.assert_array_equal(backend.host(a), c)


# ---------------------------------------------------------------------------------------------
# Special values and degenerate batches (torch's answers)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["rows", "rows_many_classes", "strided"])
def test_special_values_follow_torch(backend, layout):
    x = np.array([[np.nan, 0.0, 1.0],        # nan logit -> nan
                  [np.inf, 0.0, 1.0],        # +inf logit -> nan
                  [0.0, -np.inf, 1.0],       # target logit -inf -> inf
                  [1e4, -1e4, 0.0],          # huge logits: finite
                  [-np.inf, 2.0, 1.0]])      # masked class (not the target): fine
    t = np.array([1, 1, 1, 0, 1])
    if layout == "rows_many_classes":        # masked extra classes change nothing
        x = np.concatenate([x, np.full((5, 60), -np.inf)], axis=1)
    if layout == "strided":                  # (1, C, 5): the class axis strided
        x, t = np.ascontiguousarray(x.T[None]), t[None]

    def rows(a):
        return a[0].T if layout == "strided" else a

    loss = backend.host(fastce.cross_entropy(backend.to(x), backend.to(t), reduction="none"))
    loss = loss.reshape(-1)
    assert np.isnan(loss[0]) and np.isnan(loss[1])
    assert loss[2] == np.inf
    assert loss[3] == 0.0
    assert_close(loss[4], np.log1p(np.exp(-1.0)), 1e-12)
    _, grad = _run(backend, x, t, None, reduction="none")
    grad = rows(grad)
    assert np.all(np.isfinite(grad[3:])) and grad[4, 0] == 0.0   # exp(-inf) is exactly 0
    assert np.all(np.isnan(grad[0])) and np.all(np.isnan(grad[1]))


def test_empty_batch_and_all_ignored(backend):
    x = np.zeros((0, 4))
    t = np.zeros((0,), np.int64)
    assert np.isnan(backend.host(fastce.cross_entropy(backend.to(x), backend.to(t))))
    assert backend.host(fastce.cross_entropy(backend.to(x), backend.to(t), reduction="sum")) == 0
    assert backend.host(fastce.cross_entropy(backend.to(x), backend.to(t),
                                             reduction="none")).shape == (0,)
    x = np.random.default_rng(0).standard_normal((3, 4))
    t = np.full(3, -100)
    loss, grad = _run(backend, x, t, None)
    assert np.isnan(loss) and np.all(grad == 0)
    assert _run(backend, x, t, None, reduction="sum")[0] == 0


# ---------------------------------------------------------------------------------------------
# z-loss and token accuracy from the same pass
# ---------------------------------------------------------------------------------------------
def test_z_loss_and_token_accuracy_extras(backend):
    from fastce import spec
    rng = np.random.default_rng(9)
    x, t = random_case(rng, (12, 6), np.float64, ignore_frac=0.3)
    t[0] = int(np.argmax(x[0]))                 # at least one hit
    x[1, :] = 1.0                               # ties: the first maximum is the argmax
    t[1] = 2
    out = fastce.cross_entropy(backend.to(x), backend.to(t), z_loss=1e-2,
                               return_z_loss=True, return_token_accuracy=True)
    assert isinstance(out, fastce.CrossEntropyOutput)
    valid = t != -100
    lse = spec.logsumexp(x, axis=1)
    assert_close(backend.host(out.z_loss), 1e-2 * np.sum(lse[valid] ** 2) / valid.sum(), 1e-9)
    assert_close(backend.host(out.loss), spec_loss_and_grad(x, t, z_loss=1e-2)[0], 1e-9)
    assert out.token_accuracy == pytest.approx(spec.token_accuracy(x[:, :, None], t[:, None]))
    (loss2, _) = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), z_loss=1e-2,
                                                return_token_accuracy=True)
    assert loss2.z_loss is None and loss2.token_accuracy == out.token_accuracy


# ---------------------------------------------------------------------------------------------
# The other public functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((7,), -1), ((5, 9), -1), ((5, 9), 0), ((3, 4, 6), 1),
                                         ((2, 3, 300), -1)])
def test_softmax_family(backend, shape, axis):
    from fastce import spec
    x = np.random.default_rng(10).standard_normal(shape) * 4
    xb = backend.to(x)
    assert_close(backend.host(fastce.logsumexp(xb, axis)), spec.logsumexp(x, axis), 1e-12)
    assert_close(backend.host(fastce.log_softmax(xb, axis)), spec.log_softmax(x, axis), 1e-12)
    assert_close(backend.host(fastce.softmax(xb, axis)), spec.softmax(x, axis), 1e-12)
    x32 = x.astype(np.float32)
    assert_close(backend.host(fastce.softmax(backend.to(x32), axis)), spec.softmax(x, axis), 2e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_matches_cross_entropy(backend, reduction):
    from fastce import spec
    rng = np.random.default_rng(11)
    x, t = random_case(rng, (8, 5, 3), np.float64, ignore_frac=0.3)
    w = rng.random(5) + 0.1
    lp = spec.log_softmax(x, axis=1)
    got = backend.host(fastce.nll_loss(backend.to(lp), backend.to(t), backend.to(w),
                                       reduction=reduction))
    want = spec_loss_and_grad(x, t, w, reduction=reduction)[0]
    assert_close(got, want, 1e-9)


# ---------------------------------------------------------------------------------------------
# out=: the gradient into the caller's buffer, or over the logits themselves
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 300), (9, 7), (2, 5, 40)])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, weighted=True),
                                  dict(softcap=3.0), dict(prob=True), dict(z_loss=0.01)])
def test_gradient_into_out_and_in_place(backend, shape, opts):
    opts = dict(opts)
    rng = np.random.default_rng(12)
    prob = opts.pop("prob", False)
    w = (rng.random(shape[1]) + 0.1) if opts.pop("weighted", False) else None
    x, t = random_case(rng, shape, np.float64, prob=prob, ignore_frac=0.0 if prob else 0.3)
    want_l, want_g = spec_loss_and_grad(x, t, w, **opts)
    buf = backend.to(np.full(shape, 7.0))
    loss, grad = fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), backend.to(w),
                                                out=buf, **opts)
    assert grad is buf
    assert_close(backend.host(grad), want_g, 1e-9)
    xb = backend.to(x.copy())                      # in place: the logits become the gradient
    loss2, grad2 = fastce.cross_entropy_with_grad(xb, backend.to(t), backend.to(w), out=xb,
                                                  **opts)
    assert grad2 is xb
    assert_close(backend.host(loss2), want_l, 1e-9)
    assert_close(backend.host(xb), want_g, 1e-9)
    xb = backend.to(x.copy())
    g3 = fastce.cross_entropy_backward(xb, backend.to(t), None, backend.to(w), out=xb, **opts)
    assert_close(backend.host(g3), want_g, 1e-9)


def test_bad_out(backend):
    x = np.zeros((4, 5))
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="shape"):
        fastce.cross_entropy_with_grad(backend.to(x), backend.to(t), out=backend.to(np.zeros((4, 6))))
    with pytest.raises(ValueError, match="dtype"):
        fastce.cross_entropy_with_grad(backend.to(x), backend.to(t),
                                       out=backend.to(np.zeros((4, 5), np.float32)))
    with pytest.raises(ValueError, match="C-contiguous"):
        strided = backend.to(np.zeros((5, 4)))
        fastce.cross_entropy_backward(backend.to(x), backend.to(t), out=strided.T)


@pytest.mark.parametrize("shape", [(40, 6), (40, 70), (4, 6, 10)])
def test_token_accuracy_on_every_layout(backend, shape):
    from fastce import spec
    from helpers import canonical
    rng = np.random.default_rng(13)
    x, t = random_case(rng, shape, np.float64, ignore_frac=0.2)
    x = np.round(x)                               # ties: the first maximum is the argmax
    amax = np.argmax(x, axis=1)
    hit_some = rng.random(t.shape) < 0.5
    t = np.where(hit_some & (t != -100), amax, t)  # about half the targets are the argmax
    out = fastce.cross_entropy(backend.to(x), backend.to(t), return_token_accuracy=True)
    x3, t3 = canonical(x, t)
    assert out.token_accuracy == pytest.approx(spec.token_accuracy(x3, t3), abs=1e-12)
    assert 0.3 < out.token_accuracy < 1.0
