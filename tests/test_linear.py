"""fastce.linear_cross_entropy(_with_grad) against torch float64 autograd of the unfused model."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastce
from fastce.linear import chunk_rows

TOL = {np.float64: 1e-9, np.float32: 2e-4, np.float16: 2e-2}


def reference(h, c, t, b=None, *, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, softcap=None, z_loss=0.0, grad_output=None):
    """torch float64 autograd: loss, grad_hidden, grad_classifier, grad_bias."""
    ht = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    bt = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.int64)
    wt = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    logits = ht @ ct.T
    if bt is not None:
        logits = logits + bt
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, tt, weight=wt, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        keep = (tt != ignore_index).to(torch.float64)
        z = z_loss * torch.logsumexp(logits, dim=1) ** 2 * keep
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            loss = loss + z.sum() / keep.sum()
    if grad_output is None:
        go = torch.ones_like(loss)
    else:
        go = torch.as_tensor(np.asarray(grad_output, dtype=np.float64))
    loss.backward(go)
    grads = [ht.grad.numpy(), ct.grad.numpy(), None if bt is None else bt.grad.numpy()]
    return loss.detach().numpy(), grads


def close(got, want, tol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(1e-30, float(np.max(np.abs(want))) if want.size else 1.0)
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} * {scale:.3g}"


def problem(rng, N, H, V, dtype, *, bias, weight, ignore_frac, ignore_index=-100):
    h = rng.standard_normal((N, H)).astype(dtype)
    c = (rng.standard_normal((V, H)) / np.sqrt(H) * 2).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    t[rng.random(N) < ignore_frac] = ignore_index
    w = rng.uniform(0.2, 2.0, V) if weight else None
    return h, c, b, t, w


def check(h, c, t, b, dtype, chunk_size, **opts):
    got = fastce.linear_cross_entropy_with_grad(h, c, t, b, chunk_size=chunk_size, **opts)
    loss_only = fastce.linear_cross_entropy(
        h, c, t, b, chunk_size=chunk_size, **{k: v for k, v in opts.items() if k != "grad_output"})
    want_loss, want_grads = reference(h, c, t, b, **opts)
    tol = TOL[dtype]
    close(got[0], want_loss, tol, "loss")
    close(loss_only, want_loss, tol, "loss (no grad)")
    assert np.asarray(got[0]).dtype == dtype and np.asarray(loss_only).dtype == dtype
    for name, g, w in zip(("grad_hidden", "grad_classifier", "grad_bias"), got[1:], want_grads):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        close(g, w, tol, name)


# Every option, crossed: 2 reductions x (weight, bias) x smoothing x softcap x z_loss, with
# chunk sizes cycling through 1, 7 (not dividing N), N and auto.
GRID = list(itertools.product(["mean", "sum", "none"], [False, True], [False, True],
                              [0.0, 0.3], [None, 4.0], [0.0, 1e-2]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_grid(dtype):
    rng = np.random.default_rng(0)
    chunks = itertools.cycle([1, 7, None, 30, 4])
    for reduction, weight, bias, eps, cap, zl in GRID:
        h, c, b, t, w = problem(rng, 30, 8, 13, dtype, bias=bias, weight=weight, ignore_frac=0.2)
        check(h, c, t, b, dtype, next(chunks), weight=w, reduction=reduction,
              label_smoothing=eps, softcap=cap, z_loss=zl)


@pytest.mark.parametrize("seed", range(12))
def test_random(seed):
    rng = np.random.default_rng(100 + seed)
    dtype = [np.float64, np.float32][seed % 2]
    N, H, V = int(rng.integers(1, 90)), int(rng.integers(1, 40)), int(rng.integers(1, 300))
    ignore_index = int(rng.choice([-100, -1, 0, 3]))
    h, c, b, t, w = problem(rng, N, H, V, dtype, bias=rng.random() < 0.5,
                            weight=rng.random() < 0.5, ignore_frac=rng.random() * 0.5,
                            ignore_index=ignore_index)
    reduction = str(rng.choice(["mean", "sum", "none"]))
    go = None
    if rng.random() < 0.5:
        go = rng.standard_normal(N) if reduction == "none" else float(rng.standard_normal())
    check(h, c, t, b, dtype, int(rng.integers(1, N + 3)), weight=w, reduction=reduction,
          ignore_index=ignore_index, label_smoothing=float(rng.choice([0.0, 0.1, 1.0])),
          softcap=[None, 2.5][int(rng.integers(2))], z_loss=float(rng.choice([0.0, 1e-3, 0.5])),
          grad_output=go)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 65, None])
def test_chunk_sizes_agree(chunk_size):
    """Every chunk size gives the unchunked result (float64, 1e-12)."""
    rng = np.random.default_rng(7)
    h, c, b, t, w = problem(rng, 64, 16, 50, np.float64, bias=True, weight=True, ignore_frac=0.3)
    opts = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    one = fastce.linear_cross_entropy_with_grad(h, c, t, b, chunk_size=64, **opts)
    got = fastce.linear_cross_entropy_with_grad(h, c, t, b, chunk_size=chunk_size, **opts)
    for a, e in zip(got, one):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)


def test_matches_unfused_fastce():
    rng = np.random.default_rng(3)
    h, c, b, t, w = problem(rng, 100, 24, 77, np.float32, bias=True, weight=True, ignore_frac=0.1)
    logits = h @ c.T + b
    loss, gl = fastce.cross_entropy_with_grad(logits, t, w, z_loss=1e-3)
    got = fastce.linear_cross_entropy_with_grad(h, c, t, b, weight=w, z_loss=1e-3, chunk_size=9)
    np.testing.assert_allclose(got[0], loss, rtol=1e-5)
    np.testing.assert_allclose(got[1], gl @ c, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[2], gl.T @ h, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[3], gl.sum(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, reduction="sum"),
                                dict(reduction="none", z_loss=1e-3)])
def test_targets_are_counted_once_per_call(monkeypatch, kw):
    """The whole batch's targets and weights are checked once; the chunks count nothing again
    (on the GPU each count is a copy back to the host), with the same results."""
    from fastce import cpu
    calls = []
    count = cpu.CPUBackend.target_stats
    monkeypatch.setattr(cpu.CPUBackend, "target_stats",
                        staticmethod(lambda *a, **k: calls.append(1) or count(*a, **k)))
    rng = np.random.default_rng(5)
    h, c, b, t, w = problem(rng, 90, 8, 40, np.float64, bias=True, weight=True, ignore_frac=0.2)
    got = fastce.linear_cross_entropy_with_grad(h, c, t, b, weight=w, chunk_size=16, **kw)
    assert len(calls) == 1
    fastce.linear_cross_entropy(h, c, t, b, weight=w, chunk_size=16, **kw)
    assert len(calls) == 2
    monkeypatch.undo()
    loss, gl = fastce.cross_entropy_with_grad(h @ c.T + b, t, w, **kw)
    np.testing.assert_allclose(got[0], loss, rtol=1e-12)
    np.testing.assert_allclose(got[1], gl @ c, rtol=1e-10, atol=1e-14)


def test_float16():
    rng = np.random.default_rng(5)
    h, c, b, t, w = problem(rng, 40, 16, 30, np.float16, bias=True, weight=False, ignore_frac=0.1)
    got = fastce.linear_cross_entropy_with_grad(h, c, t, b, chunk_size=6)
    assert all(a.dtype == np.float16 for a in got)
    want_loss, want = reference(h, c, t, b)
    close(got[0], want_loss, 1e-2, "loss")
    for g, w_ in zip(got[1:], want):
        close(g, w_, 2e-2, "grad")


def test_all_ignored_and_empty():
    rng = np.random.default_rng(2)
    h, c, b, t, _ = problem(rng, 10, 4, 6, np.float64, bias=True, weight=False, ignore_frac=1.0)
    loss, gh, gc, gb = fastce.linear_cross_entropy_with_grad(h, c, t, b, chunk_size=3)
    assert np.isnan(loss)
    assert not gh.any() and not gc.any() and not gb.any()
    assert fastce.linear_cross_entropy(h, c, t, b, reduction="sum") == 0
    e = np.empty((0, 4))
    loss, gh, gc, gb = fastce.linear_cross_entropy_with_grad(e, c, np.empty(0, np.int64), b,
                                                             reduction="sum")
    assert loss == 0 and gh.shape == (0, 4) and not gc.any() and not gb.any()
    # The mean over no positions is nan, as cross_entropy's and torch's.
    for empty_mean in (fastce.linear_cross_entropy(e, c, np.empty(0, np.int64), b),
                       fastce.linear_cross_entropy_with_grad(e, c, np.empty(0, np.int64))[0]):
        assert np.isnan(empty_mean) and empty_mean.dtype == np.float64
    assert np.isnan(fastce.cross_entropy(e @ c.T, np.empty(0, np.int64)))


def test_target_dtypes_and_noncontiguous():
    rng = np.random.default_rng(4)
    h, c, b, t, _ = problem(rng, 20, 8, 11, np.float64, bias=False, weight=False, ignore_frac=0)
    base = fastce.linear_cross_entropy_with_grad(h, c, t, chunk_size=4)
    for tt in (t.astype(np.int32), t.astype(np.uint8), t.astype(np.int16)):
        got = fastce.linear_cross_entropy_with_grad(h, c, tt, chunk_size=4)
        np.testing.assert_array_equal(got[1], base[1])
    hf, cf = np.asfortranarray(h), np.asfortranarray(c)
    got = fastce.linear_cross_entropy_with_grad(hf, cf, t, chunk_size=4)
    for a, e in zip(got[:3], base[:3]):
        np.testing.assert_allclose(a, e, rtol=1e-12)


def test_auto_chunk_rows():
    assert chunk_rows(4096, 32000, 4) == 341            # 1/12 of N x V
    assert chunk_rows(10, 20, 8) == 10                   # small: one chunk
    assert chunk_rows(10 ** 6, 32000, 4) == 524          # capped at 64 MiB
    assert chunk_rows(10, 20, 8, 3) == 3
    assert chunk_rows(10, 20, 8, 100) == 10


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
H_, C_, T_ = np.zeros((4, 3)), np.zeros((5, 3)), np.array([0, 1, 2, 4])


@pytest.mark.parametrize("args, kw, exc, msg", [
    ((np.zeros(3), C_, T_), {}, ValueError, "hidden must be 2-D"),
    ((H_, np.zeros(5), T_), {}, ValueError, "classifier must be 2-D"),
    ((H_, np.zeros((5, 2)), T_), {}, ValueError, "classifier must have shape"),
    ((H_, np.zeros((0, 3)), T_), {}, ValueError, "no classes"),
    ((H_.astype(int), C_, T_), {}, TypeError, "hidden must be float16"),
    ((H_, C_.astype(np.float32), T_), {}, TypeError, "classifier dtype"),
    ((H_, C_, T_, np.zeros(4)), {}, ValueError, "bias must have shape"),
    ((H_, C_, T_, np.zeros(5, np.float32)), {}, TypeError, "bias dtype"),
    ((H_, C_, T_.astype(float)), {}, TypeError, "integer class indices"),
    ((H_, C_, T_.astype(bool)), {}, TypeError, "bool"),
    ((H_, C_, T_[:3]), {}, ValueError, r"target must have shape \(N,\)"),
    ((H_, C_, np.array([0, 1, 5, 2])), {}, ValueError, r"target 5 at position \(2,\)"),
    ((H_, C_, np.array([0, -3, 1, 2])), {}, ValueError, r"target -3 at position \(1,\)"),
    ((H_, C_, T_), dict(weight=np.ones(4)), ValueError, "weight must be a 1-D"),
    ((H_, C_, T_), dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    ((H_, C_, T_), dict(chunk_size=2.5), TypeError, "chunk_size"),
    ((H_, C_, T_), dict(chunk_size=True), TypeError, "chunk_size"),
    ((H_, C_, T_), dict(reduction="avg"), ValueError, "reduction"),
    ((H_, C_, T_), dict(label_smoothing=2.0), ValueError, "label_smoothing"),
    ((H_, C_, T_), dict(softcap=-1.0), ValueError, "softcap"),
    ((H_, C_, T_), dict(z_loss=-1.0), ValueError, "z_loss"),
    ((H_, C_, T_), dict(ignore_index=1.5), TypeError, "ignore_index"),
])
@pytest.mark.parametrize("fn", ["linear_cross_entropy", "linear_cross_entropy_with_grad"])
def test_bad_inputs(fn, args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        getattr(fastce, fn)(*args, **kw)


def test_bad_grad_output():
    with pytest.raises(ValueError, match="grad_output must have the loss's shape"):
        fastce.linear_cross_entropy_with_grad(H_, C_, T_, reduction="none",
                                              grad_output=np.ones(3))
    with pytest.raises(ValueError, match="grad_output must be a scalar"):
        fastce.linear_cross_entropy_with_grad(H_, C_, T_, grad_output=np.ones(3))
    with pytest.raises(TypeError, match="grad_output must be a real number or array"):
        fastce.linear_cross_entropy_with_grad(H_, C_, T_, grad_output="a")


def test_device_array_without_cupy():
    pytest.importorskip("numba")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy installed: the GPU path is tested on a GPU")
    except ImportError:
        pass

    class FakeDevice:          # anything with __cuda_array_interface__ counts as a CUDA array
        __cuda_array_interface__ = {}

    with pytest.raises(TypeError, match="CuPy"):
        fastce.linear_cross_entropy(FakeDevice(), FakeDevice(), FakeDevice())
    with pytest.raises(TypeError, match="same device"):
        fastce.linear_cross_entropy(H_, FakeDevice(), T_)
