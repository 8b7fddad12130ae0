"""Case generation and comparison helpers shared by the test modules."""
from __future__ import annotations

import math

import numpy as np

from fastce import spec


def canonical(x, target, class_axis=1):
    """(N, C, S) logits and (N, S) / (N, C, S) targets, as fastce.spec expects."""
    x = np.asarray(x)
    axis = 0 if x.ndim == 1 else class_axis % x.ndim
    N = math.prod(x.shape[:axis])
    C = x.shape[axis]
    S = math.prod(x.shape[axis + 1:])
    x3 = np.moveaxis(x, axis, -1).reshape(N, S, C).transpose(0, 2, 1)
    t = np.asarray(target)
    if t.shape == x.shape and t.dtype.kind == "f":
        t3 = np.moveaxis(t, axis, -1).reshape(N, S, C).transpose(0, 2, 1)
    else:
        t3 = t.reshape(N, S)
    return x3.astype(np.float64), t3


def from_canonical(g3, shape, class_axis=1):
    """Inverse of ``canonical`` for an (N, C, S) array (the gradient)."""
    ndim = len(shape)
    axis = 0 if ndim == 1 else class_axis % ndim
    moved = list(shape[:axis]) + list(shape[axis + 1:]) + [shape[axis]]
    return np.moveaxis(g3.transpose(0, 2, 1).reshape(moved), -1, axis)


def spec_loss_and_grad(x, target, weight=None, *, class_axis=1, grad_output=None,
                       reduction="mean", **options):
    """fastce.spec's loss (reduced, target-shaped for 'none') and gradient (x's shape)."""
    x3, t3 = canonical(x, target, class_axis)
    g = 1.0
    if grad_output is not None:
        g = np.asarray(grad_output, dtype=np.float64)
        if reduction == "none":
            g = g.reshape(t3.shape[:1] + t3.shape[-1:]) if g.ndim else g
    loss, grad = spec.cross_entropy_with_grad(x3, t3, weight, reduction=reduction,
                                              grad_output=g, **options)
    if reduction == "none":
        xa = np.asarray(x)
        axis = 0 if xa.ndim == 1 else class_axis % xa.ndim
        loss = np.asarray(loss).reshape(xa.shape[:axis] + xa.shape[axis + 1:])
    return loss, from_canonical(grad, np.shape(x), class_axis)


def random_case(rng, shape, dtype=np.float64, *, prob=False, ignore_frac=0.0, ignore_index=-100,
                target_dtype=np.int64, scale=3.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    if prob:
        axis = 1 if len(shape) > 1 else 0
        t = rng.random(shape) ** 3
        t = (t / t.sum(axis=axis, keepdims=True)).astype(dtype)
        return x, t
    tshape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
    t = rng.integers(0, C, tshape)
    if ignore_frac and t.ndim:
        t[rng.random(tshape) < ignore_frac] = ignore_index
    elif ignore_frac and rng.random() < ignore_frac:
        t = np.array(ignore_index)
    return x, t.astype(target_dtype)


def assert_close(actual, expected, rtol, atol=None, what=""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if atol is None:
        # relative to the array's scale: gradients have many tiny entries
        finite = np.abs(expected[np.isfinite(expected)])
        atol = rtol * max(1e-2, float(finite.max()) if finite.size else 0.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               err_msg=what)


def record_gpu_launches(monkeypatch):
    """Under the CUDA simulator, route fastce.gpu's calls to a stream of their own that counts
    the host's waits on it, and record every kernel launch: (stream, [(kernel name,
    launch configuration), ...])."""
    from numba import cuda
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    from fastce import gpu

    class Stream:
        def __init__(self):
            self.inner, self.waits = cuda.stream(), 0

        def synchronize(self):
            self.waits += 1
            self.inner.synchronize()

    stream, launches = Stream(), []
    getitem = FakeCUDAKernel.__getitem__

    def record(kernel, configuration):
        launches.append((kernel.fn.__name__, configuration))
        return getitem(kernel, configuration)

    monkeypatch.setattr(FakeCUDAKernel, "__getitem__", record)
    monkeypatch.setattr(gpu, "_stream", lambda: stream)
    return stream, launches
