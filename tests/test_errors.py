"""Bad input gets a clear error, never a crash or a wrong number."""
from __future__ import annotations

import numpy as np
import pytest

import fastce

X = np.random.default_rng(0).standard_normal((4, 3, 5))
T = np.zeros((4, 5), np.int64)


def call(backend, x=X, t=T, w=None, **kw):
    return fastce.cross_entropy(backend.to(x), backend.to(t), backend.to(w), **kw)


@pytest.mark.parametrize("bad,where", [(3, (1, 2)), (-1, (0, 4)), (-100, (3, 0)), (255, (2, 2))])
def test_out_of_range_target_names_value_and_position(backend, bad, where):
    t = T.copy()
    t[where] = bad
    ignore = 7 if bad == -100 else -100
    with pytest.raises(ValueError, match=rf"target {bad} at position \({where[0]}, {where[1]}\)"):
        call(backend, t=t, ignore_index=ignore)
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.cross_entropy_with_grad(backend.to(X), backend.to(t), ignore_index=ignore)


def test_uint8_target_without_matching_ignore_index(backend):
    t = T.astype(np.uint8)
    t[0, 0] = 255
    with pytest.raises(ValueError, match="target 255"):
        call(backend, t=t)                  # ignore_index stays -100: 255 is out of range
    call(backend, t=t, ignore_index=255)    # fine


@pytest.mark.parametrize("t,err,msg", [
    (np.zeros((4, 5), bool), TypeError, "bool"),
    (np.zeros((4, 6), np.int64), ValueError, r"shape \(4, 5\)"),
    (np.zeros((4,), np.int64), ValueError, "class-index target must have shape"),
    (np.zeros((4, 5), np.float32), ValueError, "probabilities"),
    (np.array(["a"] * 20).reshape(4, 5), TypeError, "target must be"),
])
def test_bad_target_shape_or_dtype(backend, t, err, msg):
    if backend.name != "cpu" and t.dtype.kind in "U":
        pytest.skip("strings cannot live on a GPU")
    with pytest.raises(err, match=msg):
        call(backend, t=t)


@pytest.mark.parametrize("w,msg", [(np.ones(4), "length C=3"), (np.ones((3, 1)), "1-D"),
                                   (np.ones(2), "weight")])
def test_bad_weight(backend, w, msg):
    with pytest.raises(ValueError, match=msg):
        call(backend, w=w)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_bad_label_smoothing(backend, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        call(backend, label_smoothing=eps)


def test_bad_options(backend):
    with pytest.raises(ValueError, match="reduction"):
        call(backend, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        call(backend, softcap=-1.0)
    with pytest.raises(ValueError, match="z_loss"):
        call(backend, z_loss=float("inf"))
    with pytest.raises(TypeError, match="ignore_index"):
        call(backend, ignore_index=1.5)
    with pytest.raises(ValueError, match="class_axis"):
        call(backend, class_axis=3)
    with pytest.raises(ValueError, match="reduction"):
        fastce.CrossEntropyLoss(reduction="bad")


def test_bad_logits(backend):
    with pytest.raises(ValueError, match="0-d"):
        call(backend, x=np.array(1.0), t=np.array(0))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        call(backend, x=X.astype(np.int64))
    # no classes: every target is out of range unless ignored (see test_reliability)
    with pytest.raises(ValueError, match=r"target 0 at position \(0,\) is out of bounds"):
        call(backend, x=np.zeros((4, 0)), t=np.zeros(4, np.int64))
    if backend.name == "cpu":
        with pytest.raises(TypeError, match="float16, float32 or float64"):
            fastce.cross_entropy(np.array([["a", "b"]]), np.array([0]))


def test_ignore_index_with_probability_targets(backend):
    p = np.full(X.shape, 1 / 3)
    with pytest.raises(ValueError, match="ignore_index is not supported"):
        call(backend, t=p, ignore_index=0)
    call(backend, t=p, ignore_index=-100)   # the default, as torch accepts


@pytest.mark.parametrize("reduction,go,msg", [
    ("mean", np.ones(3), "scalar"),
    ("sum", np.ones((4, 5)), "scalar"),
    ("none", np.ones((4, 4)), r"loss's shape \(4, 5\)"),
    ("none", 1.0, "loss's shape"),
])
def test_bad_grad_output(backend, reduction, go, msg):
    gb = backend.to(go) if isinstance(go, np.ndarray) else go
    with pytest.raises(ValueError, match=msg):
        fastce.cross_entropy_backward(backend.to(X), backend.to(T), gb, reduction=reduction)


def test_error_leaves_no_partial_work(backend):
    """A bad target is reported before any kernel reads with it (NUMBA_BOUNDSCHECK run too)."""
    t = T.copy()
    t[3, 4] = 10**9
    with pytest.raises(ValueError, match="1000000000"):
        fastce.cross_entropy_backward(backend.to(X), backend.to(t))


def test_nll_loss_errors(backend):
    with pytest.raises(ValueError, match="out of bounds"):
        fastce.nll_loss(backend.to(X), backend.to(np.full((4, 5), 3)))
    with pytest.raises(TypeError, match="class-index"):
        fastce.nll_loss(backend.to(X), backend.to(np.full(X.shape, 0.5)))
