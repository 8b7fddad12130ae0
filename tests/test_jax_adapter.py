"""fastce.jax: losses and gradients against optax and torch (float64), the float64 spec for
softcap / z-loss, finite differences (jax.test_util.check_grads), jit / grad / value_and_grad /
vmap, linear_cross_entropy, dtypes and errors.  jax, jaxlib and optax are in the test extra."""
from __future__ import annotations

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import fastce.jax as fj
from fastce import spec


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 for this module only (JAX's default is float32)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def _problem(shape, class_axis=-1, seed=0, ignore=-100, ignore_frac=0.2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    axis = class_axis % len(shape)
    C = shape[axis]
    tshape = shape[:axis] + shape[axis + 1:]
    t = rng.integers(0, C, tshape)
    t[rng.random(tshape) < ignore_frac] = ignore
    return x, t, C


def _vjp(f, x, seed=3):
    loss, pull = jax.vjp(f, x)
    g = jnp.asarray(np.random.default_rng(seed).standard_normal(np.shape(loss)), loss.dtype)
    return loss, g, pull(g)[0]


# ---------------------------------------------------------------------------------------------
# Against optax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_integer_labels_match_optax(dtype, tol):
    x, t, _ = _problem((32, 11), ignore_frac=0.0, dtype=dtype)
    x, t = jnp.asarray(x), jnp.asarray(t)
    ref = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, t)   # noqa: E731
    ours = lambda x: fj.cross_entropy(x, t, reduction="none")                # noqa: E731
    np.testing.assert_allclose(ours(x), ref(x), rtol=tol, atol=tol)
    assert ours(x).dtype == x.dtype
    for red, agg in (("mean", jnp.mean), ("sum", jnp.sum)):
        f = jax.jit(jax.value_and_grad(lambda x, red=red: fj.cross_entropy(x, t, reduction=red)))
        r = jax.value_and_grad(lambda x, agg=agg: agg(ref(x)))
        (lf, gf), (lr, gr) = f(x), r(x)
        np.testing.assert_allclose(lf, lr, rtol=tol)
        np.testing.assert_allclose(gf, gr, rtol=tol, atol=tol)
    _, g, gf = _vjp(ours, x)
    _, _, gr = _vjp(ref, x)
    np.testing.assert_allclose(gf, gr, rtol=tol, atol=tol)


def test_probability_labels_match_optax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 7)))
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((16, 7))))
    f = lambda x: fj.cross_entropy(x, p, reduction="sum")                    # noqa: E731
    r = lambda x: optax.softmax_cross_entropy(x, p).sum()                    # noqa: E731
    np.testing.assert_allclose(f(x), r(x), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(r)(x), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Against torch float64 over the options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,class_axis,weighted,ignore,eps,reduction", list(
    itertools.product([(12, 7), (3, 5, 4)], [1, -1], [False, True], [-100, 2], [0.0, 0.1],
                      ["mean", "sum", "none"])))
def test_match_torch(shape, class_axis, weighted, ignore, eps, reduction):
    x, t, C = _problem(shape, class_axis=class_axis, ignore=ignore)
    w = np.random.default_rng(5).random(C) + 0.5 if weighted else None
    kw = dict(ignore_index=ignore, reduction=reduction, label_smoothing=eps)
    f = lambda x: fj.cross_entropy(x, jnp.asarray(t), None if w is None else jnp.asarray(w),  # noqa: E731
                                   class_axis=class_axis, **kw)
    loss, g, gx = _vjp(jax.jit(f), jnp.asarray(x))
    xt = torch.tensor(x, requires_grad=True)
    xin = xt if class_axis == 1 else xt.movedim(-1, 1)
    lt = F.cross_entropy(xin, torch.tensor(t), None if w is None else torch.tensor(w), **kw)
    (gt,) = torch.autograd.grad(lt, xt, torch.tensor(np.asarray(g)))
    np.testing.assert_allclose(loss, lt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx, gt.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("softcap,z_loss,reduction", list(itertools.product(
    [None, 2.5], [0.0, 1e-2], ["mean", "none"])))
def test_softcap_and_z_loss_match_spec(softcap, z_loss, reduction):
    x, t, C = _problem((4, 6, 3), class_axis=1)
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=softcap, z_loss=z_loss)
    loss, g, gx = _vjp(lambda x: fj.cross_entropy(x, jnp.asarray(t), class_axis=1, **kw),
                       jnp.asarray(x))
    ref_loss, ref_grad = spec.cross_entropy_with_grad(x, t, grad_output=np.asarray(g), **kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_check_grads_finite_differences(reduction):
    from jax.test_util import check_grads
    x, t, C = _problem((5, 6))
    w = jnp.asarray(np.linspace(0.5, 2.0, C))
    f = lambda x: fj.cross_entropy(x, jnp.asarray(t), w, reduction=reduction,  # noqa: E731
                                   label_smoothing=0.1, softcap=3.0, z_loss=0.01)
    check_grads(f, (jnp.asarray(x),), order=1, modes=["rev"])


# ---------------------------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------------------------
def test_vmap_jit_grad_compose():
    rng = np.random.default_rng(2)
    xb = jnp.asarray(rng.standard_normal((3, 8, 5)))
    tb = jnp.asarray(rng.integers(0, 5, (3, 8)))
    ref = lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x, t).mean()  # noqa: E731
    ours = lambda x, t: fj.cross_entropy(x, t)                                      # noqa: E731
    np.testing.assert_allclose(jax.vmap(ours)(xb, tb), jax.vmap(ref)(xb, tb), rtol=1e-12)
    vg = jax.jit(jax.vmap(jax.value_and_grad(ours)))
    rg = jax.vmap(jax.value_and_grad(ref))
    for a, b in zip(vg(xb, tb), rg(xb, tb)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # shared labels (in_axes None), and grad of a vmapped sum
    shared = jax.grad(lambda x: jax.vmap(ours, in_axes=(0, None))(x, tb[0]).sum())(xb)
    shared_ref = jax.grad(lambda x: jax.vmap(ref, in_axes=(0, None))(x, tb[0]).sum())(xb)
    np.testing.assert_allclose(shared, shared_ref, rtol=1e-10, atol=1e-14)
    # reduction="none" under vmap of vjp
    per = jax.vmap(lambda x, t: fj.cross_entropy(x, t, reduction="none"))(xb, tb)
    assert per.shape == (3, 8)


def test_no_gradient_to_labels_or_weight():
    x, t, C = _problem((6, 4), ignore_frac=0.0)
    p = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((6, 4))))
    g = jax.grad(lambda x, p: fj.cross_entropy(x, p), argnums=1)(jnp.asarray(x), p)
    assert not np.any(np.asarray(g))              # documented: zero (None) cotangent
    gw = jax.grad(lambda w: fj.cross_entropy(jnp.asarray(x), jnp.asarray(t), w))(jnp.ones(C))
    assert not np.any(np.asarray(gw))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_low_precision(dtype):
    x, t, _ = _problem((64, 40), dtype=np.float32)
    xl = jnp.asarray(x).astype(dtype)
    loss, grad = jax.jit(jax.value_and_grad(lambda x: fj.cross_entropy(x, jnp.asarray(t))))(xl)
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_l, ref_g = jax.value_and_grad(
        lambda x: fj.cross_entropy(x, jnp.asarray(t)))(xl.astype(jnp.float32))
    tol = {jnp.float32: 1e-6, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np.float32(loss), ref_l, rtol=tol)
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref_g, rtol=tol, atol=tol * 1e-2)


def test_errors():
    x, t, _ = _problem((4, 3))
    with pytest.raises(ValueError, match="reduction"):
        fj.cross_entropy(jnp.asarray(x), jnp.asarray(t), reduction="avg")
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fj.cross_entropy(jnp.zeros((4, 3), jnp.int32), jnp.asarray(t))
    with pytest.raises(Exception, match="out of bounds"):     # raised in the callback
        jax.block_until_ready(fj.cross_entropy(jnp.zeros((3, 4)), jnp.asarray([0, 1, 7])))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unchecked_bad_labels_give_nan_inside_jit(reduction):
    """check_targets=False: no error from the callback; a bad label's loss and gradient row
    are nan, the others as with that label ignored."""
    x, t, C = _problem((6, 5), seed=8, ignore_frac=0.0)
    tb = t.copy()
    tb[[1, 4]] = [C, -2]
    bad = np.isin(np.arange(6), [1, 4])

    def f(xv, labels):
        return jnp.sum(fj.cross_entropy(xv, labels, reduction=reduction, check_targets=False))

    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(x), jnp.asarray(tb))
    ref_l, ref_g = jax.value_and_grad(
        lambda xv: jnp.sum(fj.cross_entropy(xv, jnp.asarray(np.where(bad, -100, t)),
                                            reduction=reduction)))(jnp.asarray(x))
    assert np.isnan(loss)
    grad, ref_g = np.asarray(grad), np.asarray(ref_g)
    assert np.isnan(grad[bad]).all()
    np.testing.assert_allclose(grad[~bad], ref_g[~bad], rtol=1e-12)
    with pytest.raises(TypeError, match="check_targets"):
        fj.cross_entropy(jnp.asarray(x), jnp.asarray(t), check_targets=None)


def test_import_fastce_does_not_import_jax():
    code = "import sys, fastce; assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------
def _lin_problem(N=13, H=6, V=9, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((N, H)))
    c = jnp.asarray(rng.standard_normal((V, H)) / H ** 0.5)
    b = jnp.asarray(rng.standard_normal(V))
    t = rng.integers(0, V, N)
    t[rng.random(N) < 0.2] = -100
    return h, c, b, jnp.asarray(t)


@pytest.mark.parametrize("reduction,with_bias,weighted", list(itertools.product(
    ["mean", "sum", "none"], [False, True], [False, True])))
def test_linear_cross_entropy_matches_unfused(reduction, with_bias, weighted):
    h, c, b, t = _lin_problem()
    b = b if with_bias else None
    w = jnp.asarray(np.linspace(0.5, 1.5, 9)) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def ours(h, c, b):
        return fj.linear_cross_entropy(h, c, t, b, weight=w, chunk_size=4, **kw)

    def ref(h, c, b):
        logits = h @ c.T + (0.0 if b is None else b)
        return fj.cross_entropy(logits, t, w, **kw)

    lo, po = jax.vjp(jax.jit(ours), h, c, b)
    lr, pr = jax.vjp(ref, h, c, b)
    np.testing.assert_allclose(lo, lr, rtol=1e-10, atol=1e-12)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(np.shape(lo)))
    for a, r in zip(jax.tree.leaves(po(g)), jax.tree.leaves(pr(g))):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12)


def test_linear_cross_entropy_3d_hidden_and_vmap():
    h, c, b, t = _lin_problem(N=12)
    h3, t3 = h.reshape(3, 4, 6), t.reshape(3, 4)
    per = fj.linear_cross_entropy(h3, c, t3, b, reduction="none")
    assert per.shape == (3, 4)
    ref = fj.cross_entropy(h @ c.T + b, t, reduction="none").reshape(3, 4)
    np.testing.assert_allclose(per, ref, rtol=1e-10)
    vm = jax.vmap(jax.grad(lambda h, t: fj.linear_cross_entropy(h, c, t, b)))(h3, t3)
    vr = jax.vmap(jax.grad(lambda h, t: fj.cross_entropy(h @ c.T + b, t)))(h3, t3)
    np.testing.assert_allclose(vm, vr, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Host callbacks: XLA's own buffers (buffer_callback) and the pure_callback fallback
# ---------------------------------------------------------------------------------------------
def _steps(x, t, w):
    """value_and_grad of mean (cotangent 1, skipped), of 0.5 * sum (scaled in place) and the
    vjp of "none" (an XLA multiply), jitted and eager."""
    mean = jax.value_and_grad(lambda x: fj.cross_entropy(x, t, w, label_smoothing=0.1))
    half = jax.value_and_grad(lambda x: 0.5 * fj.cross_entropy(x, t, w, reduction="sum"))
    g = jnp.asarray(np.random.default_rng(5).standard_normal(np.shape(t)))
    none = lambda x: jax.vjp(lambda x: fj.cross_entropy(x, t, reduction="none"), x)[1](g)[0]  # noqa: E731,E501
    return [mean(x), jax.jit(mean)(x), half(x), jax.jit(half)(x), none(x), jax.jit(none)(x)]


def _torch_steps(x, t, w):
    out = []
    xt, tt, wt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(t)), torch.tensor(w)
    g = torch.tensor(np.random.default_rng(5).standard_normal(np.shape(t)))
    for fn in (lambda x: F.cross_entropy(x, tt, wt, label_smoothing=0.1),
               lambda x: 0.5 * F.cross_entropy(x, tt, wt, reduction="sum"),
               lambda x: (F.cross_entropy(x, tt, reduction="none") * g).sum()):
        xr = xt.clone().requires_grad_()
        loss = fn(xr)
        loss.backward()
        out += [(loss.detach().numpy(), xr.grad.numpy())] * 2
    return out


@pytest.mark.parametrize("zero_copy", [True, False])
def test_both_callback_paths_match_torch_and_leave_inputs_alone(zero_copy, monkeypatch):
    if zero_copy and not fj.ZERO_COPY:
        pytest.skip("this JAX has no jax.experimental.buffer_callback")
    calls = []
    if not zero_copy:
        real = jax.pure_callback
        monkeypatch.setattr(fj, "ZERO_COPY", False)
        monkeypatch.setattr(jax, "pure_callback", lambda *a, **k: calls.append(1) or real(*a, **k))
    # a shape of its own per path: JAX caches traces of the custom_vjp rules
    x, t, C = _problem((11 + zero_copy, 7), seed=zero_copy)
    w = np.linspace(0.5, 2.0, C)
    x_before = x.copy()
    xj = jnp.asarray(x)
    ours = _steps(xj, jnp.asarray(t), jnp.asarray(w))
    ref = _torch_steps(x, t, w)
    for i, (o, r) in enumerate(zip(ours, ref)):
        if i >= 4:                                  # vjp only: the gradient
            np.testing.assert_allclose(o, r[1], rtol=1e-10, atol=1e-13)
            continue
        np.testing.assert_allclose(o[0], r[0], rtol=1e-12)
        np.testing.assert_allclose(o[1], r[1], rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(xj), x_before)   # the logits are never written
    assert bool(calls) == (not zero_copy)


def test_large_gradient_is_written_in_place_on_huge_pages():
    """W1-sized rows, a gradient above _alloc.POOL_MIN (so advise_huge acts on it): loss and gradient as optax's, in
    float32, jitted; and twice in a row (XLA reuses or frees the buffers between calls)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((80, 32000), dtype=np.float32))    # 10 MB
    t = jnp.asarray(rng.integers(0, 32000, 80))
    f = jax.jit(jax.value_and_grad(lambda x: fj.cross_entropy(x, t)))
    r = jax.jit(jax.value_and_grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, t).mean()))(x)
    for _ in range(2):
        loss, grad = f(x)
        assert loss.dtype == grad.dtype == jnp.float32
        np.testing.assert_allclose(loss, r[0], rtol=1e-6)
        np.testing.assert_allclose(grad, r[1], rtol=1e-5, atol=1e-10)
