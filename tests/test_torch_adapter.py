"""fastce.torch: losses and gradients against torch's own F.cross_entropy (float64), the float64
spec for softcap / z-loss, gradcheck, opcheck, torch.compile(fullgraph=True), dtypes, errors."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

import torch                                      # in the test extra (not optional here)
import torch.nn.functional as F

import fastce.torch as ft
from fastce import spec

F64 = torch.float64


def _problem(shape, C_axis=1, seed=0, ignore=-100, ignore_frac=0.2, prob=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=F64, generator=g) * 2
    C = shape[C_axis] if len(shape) > 1 else shape[0]
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=F64, generator=g), dim=C_axis if len(shape) > 1 else 0)
        return x, t, C
    tshape = shape[:C_axis] + shape[C_axis + 1:] if len(shape) > 1 else ()
    t = torch.randint(0, C, tshape, generator=g)
    if t.dim():
        mask = torch.rand(tshape, generator=g) < ignore_frac
        t[mask] = ignore
    return x, t, C


def _grads(loss, x, seed=1):
    g = torch.randn(loss.shape, dtype=loss.dtype,
                    generator=torch.Generator().manual_seed(seed)) if loss.dim() else \
        torch.tensor(0.7, dtype=loss.dtype)
    (gx,) = torch.autograd.grad(loss, x, g)
    return gx


def _close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Against torch's F.cross_entropy, float64
# ---------------------------------------------------------------------------------------------
GRID = list(itertools.product(
    [(16, 7), (4, 5, 6)],                  # rows and strided (N, C, d)
    [False, True],                         # class weights
    [-100, 2],                             # ignore_index (2: a valid class)
    [0.0, 0.15],                           # label smoothing
    ["mean", "sum", "none"],
    [False, True],                         # fused
))


@pytest.mark.parametrize("shape,weighted,ignore,eps,reduction,fused", GRID)
def test_index_targets_match_torch(shape, weighted, ignore, eps, reduction, fused):
    x, t, C = _problem(shape, ignore=ignore)
    w = torch.rand(C, dtype=F64) + 0.5 if weighted else None
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    kw = dict(ignore_index=ignore, reduction=reduction, label_smoothing=eps)
    la = ft.cross_entropy(xa, t, w, fused=fused, **kw)
    lb = F.cross_entropy(xb, t, w, **kw)
    assert la.dtype == lb.dtype and la.shape == lb.shape
    _close(la, lb)
    _close(_grads(la, xa), _grads(lb, xb))


@pytest.mark.parametrize("weighted,eps,reduction,fused", list(itertools.product(
    [False, True], [0.0, 0.2], ["mean", "sum", "none"], [False, True])))
def test_probability_targets_match_torch(weighted, eps, reduction, fused):
    x, p, C = _problem((4, 6, 3), prob=True)
    w = torch.rand(C, dtype=F64) + 0.5 if weighted else None
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    kw = dict(reduction=reduction, label_smoothing=eps)
    la, lb = ft.cross_entropy(xa, p, w, fused=fused, **kw), F.cross_entropy(xb, p, w, **kw)
    _close(la, lb)
    _close(_grads(la, xa), _grads(lb, xb))


@pytest.mark.parametrize("fused", [False, True])
def test_one_dimensional_input_and_all_ignored(fused):
    x = torch.randn(9, dtype=F64, requires_grad=True)
    t = torch.tensor(4)
    _close(ft.cross_entropy(x, t, fused=fused), F.cross_entropy(x, t))
    _close(_grads(ft.cross_entropy(x, t, fused=fused), x), _grads(F.cross_entropy(x, t), x))
    x2 = torch.randn(3, 5, dtype=F64, requires_grad=True)
    t2 = torch.full((3,), -100)
    la, lb = ft.cross_entropy(x2, t2, fused=fused), F.cross_entropy(x2, t2)
    assert torch.isnan(la) and torch.isnan(lb)          # 0 / 0, as in torch


@pytest.mark.parametrize("reduction,fused", list(itertools.product(["mean", "none"],
                                                                    [False, True])))
def test_class_axis_last_needs_no_transpose(reduction, fused):
    x, t, C = _problem((2, 5, 11), C_axis=2)             # (B, T, V)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la = ft.cross_entropy(xa, t, class_axis=-1, reduction=reduction, fused=fused)
    lb = F.cross_entropy(xb.transpose(1, 2), t, reduction=reduction)
    _close(la, lb)
    _close(_grads(la, xa), _grads(lb, xb))


@pytest.mark.parametrize("softcap,z_loss,weighted,reduction,fused", list(itertools.product(
    [None, 3.0], [0.0, 1e-2], [False, True], ["mean", "none"], [False, True])))
def test_softcap_and_z_loss_match_spec(softcap, z_loss, weighted, reduction, fused):
    x, t, C = _problem((6, 8, 2), ignore=-100)
    w = torch.rand(C, dtype=F64) + 0.5 if weighted else None
    xa = x.clone().requires_grad_(True)
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=softcap, z_loss=z_loss)
    loss = ft.cross_entropy(xa, t, w, fused=fused, **kw)
    g = torch.randn(loss.shape, dtype=F64) if loss.dim() else torch.tensor(1.3, dtype=F64)
    (gx,) = torch.autograd.grad(loss, xa, g)
    ref_loss, ref_grad = spec.cross_entropy_with_grad(
        x.numpy(), t.numpy(), None if w is None else w.numpy(), grad_output=g.numpy(), **kw)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx.numpy(), ref_grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# gradcheck and opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", ["index_none_softcap_z", "prob_mean", "weighted_sum_ignore"])
def test_gradcheck(case, fused):
    x, t, C = _problem((5, 4, 2), prob=case.startswith("prob"))
    x.requires_grad_(True)
    w = torch.rand(C, dtype=F64) + 0.5
    kw = {"index_none_softcap_z": dict(reduction="none", softcap=2.5, z_loss=0.05),
          "prob_mean": dict(label_smoothing=0.1),
          "weighted_sum_ignore": dict(reduction="sum", weight=w, label_smoothing=0.2)}[case]
    assert torch.autograd.gradcheck(lambda x: ft.cross_entropy(x, t, fused=fused, **kw), (x,))


def _opcheck(op, args):
    res = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in res.values()), res


def test_opcheck_cross_entropy_ops():
    x, t, C = _problem((6, 5))
    x.requires_grad_(True)
    w = torch.rand(C, dtype=F64)
    ops = torch.ops.fastce
    _opcheck(ops.cross_entropy.default, (x, t, w, -100, "mean", 0.1, None, 0.0, 1, True))
    _opcheck(ops.cross_entropy.default, (x, t, None, -100, "none", 0.0, 2.0, 0.1, 1, False))
    _opcheck(ops.cross_entropy_fused.default, (x, t, w, -100, "sum", 0.1, None, 0.0, 1, True))
    _opcheck(ops.cross_entropy_fused.default,
             (x, t, None, -100, "none", 0.0, None, 0.0, -1, False))
    _opcheck(ops.cross_entropy_backward.default,
             (torch.tensor(2.0, dtype=F64), x.detach(), t, w, -100, "mean", 0.1, None, 0.0, 1,
              True))


def test_opcheck_linear_ops():
    h, c, b, t = _linear_problem(6, 4, 7)
    ops = torch.ops.fastce
    _opcheck(ops.linear_cross_entropy.default, (h, c, t, b, None, -100, "none", 0.0, None, 0.0, 2))
    _opcheck(ops.linear_cross_entropy_fused.default,
             (h, c, t, None, None, -100, "mean", 0.1, None, 0.0, 4))
    _opcheck(ops.linear_cross_entropy_backward.default,
             (torch.ones(6, dtype=F64), h.detach(), c.detach(), t, b.detach(), None, -100,
              "none", 0.0, None, 0.0, None))


# ---------------------------------------------------------------------------------------------
# Autograd details
# ---------------------------------------------------------------------------------------------
def test_fused_retain_graph_and_scaled_backward():
    """fused=True returns its saved gradient as is for grad_output == 1, scales it out of place
    otherwise: a second backward through a retained graph sees the unscaled gradient."""
    x, t, _ = _problem((8, 6))
    xa = x.clone().requires_grad_(True)
    loss = ft.cross_entropy(xa, t, fused=True)
    (g1,) = torch.autograd.grad(loss, xa, torch.tensor(3.0, dtype=F64), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xa, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, xa, torch.tensor(0.5, dtype=F64))
    xb = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.cross_entropy(xb, t), xb)
    _close(g1, 3 * ref)
    _close(g2, ref)
    _close(g3, 0.5 * ref)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kw", [dict(), dict(reduction="none"), dict(label_smoothing=0.1),
                                dict(reduction="sum", weight=True), dict(z_loss=1e-3)])
def test_eager_calls_match_the_custom_ops_bitwise(monkeypatch, fused, kw):
    """Eager calls run the custom ops' bodies in a torch.autograd.Function (no custom-op
    dispatch); the ops themselves stay for torch.compile, tracing and functorch: both routes
    give the same bits, loss and gradient."""
    x, t, C = _problem((16, 7), seed=3)
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=F64) + 0.5

    def run():
        xa = x.clone().requires_grad_(True)
        loss = ft.cross_entropy(xa, t, fused=fused, **kw)
        (g,) = torch.autograd.grad(loss, xa, torch.rand(loss.shape, dtype=F64,
                                                        generator=torch.Generator().manual_seed(2)))
        return loss.detach(), g, loss.grad_fn

    eager_loss, eager_grad, fn = run()
    assert type(fn).__name__.startswith("_EagerCrossEntropy")
    monkeypatch.setattr(ft, "_eager", lambda *a: False)
    op_loss, op_grad, fn = run()
    assert not type(fn).__name__.startswith("_EagerCrossEntropy")
    assert torch.equal(eager_loss, op_loss) and torch.equal(eager_grad, op_grad)


def test_backward_accumulates_into_leaf_grad():
    x, t, _ = _problem((8, 6))
    xa = x.clone().requires_grad_(True)
    for _ in range(2):
        ft.cross_entropy(xa, t, fused=True).backward()
    xb = x.clone().requires_grad_(True)
    for _ in range(2):
        F.cross_entropy(xb, t).backward()
    _close(xa.grad, xb.grad)


def test_no_grad_mode_and_no_requires_grad_run_the_forward_only():
    x, t, _ = _problem((8, 6))
    with torch.no_grad():
        la = ft.cross_entropy(x.clone().requires_grad_(True), t, fused=True)
    assert la.grad_fn is None
    _close(la, F.cross_entropy(x, t))
    _close(ft.cross_entropy(x, t, fused=True), F.cross_entropy(x, t))


def test_no_gradient_to_target_or_weight():
    x, p, C = _problem((4, 5), prob=True)
    x.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="target"):
        ft.cross_entropy(x, p.clone().requires_grad_(True))
    with pytest.raises(NotImplementedError, match="weight"):
        ft.cross_entropy(x, p, torch.ones(C, dtype=F64, requires_grad=True))


def test_errors():
    x, t, _ = _problem((4, 5))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        ft.cross_entropy(torch.zeros(4, 5, dtype=torch.int32), t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ft.cross_entropy(x.numpy(), t)
    with pytest.raises(ValueError, match="out of bounds"):
        ft.cross_entropy(x, torch.tensor([0, 1, 9, 2]))
    with pytest.raises(ValueError, match="reduction"):
        ft.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ft.CrossEntropyLoss(reduction="avg")


# ---------------------------------------------------------------------------------------------
# dtypes and layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_dtypes_against_torch_float32(dtype, fused):
    x, t, C = _problem((64, 50))
    x = x.to(dtype)
    w = torch.rand(C) + 0.5
    xa = x.clone().requires_grad_(True)
    la = ft.cross_entropy(xa, t, w.to(dtype), label_smoothing=0.1, fused=fused)
    assert la.dtype == dtype
    la.backward(torch.tensor(2.0, dtype=dtype))
    assert xa.grad.dtype == dtype and xa.grad.shape == x.shape
    xb = x.float().requires_grad_(True)
    lb = F.cross_entropy(xb, t, w.to(dtype).float(), label_smoothing=0.1)
    lb.backward(torch.tensor(2.0))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(la.float(), lb, rtol=tol, atol=tol)
    torch.testing.assert_close(xa.grad.float(), xb.grad.to(dtype).float(), rtol=tol, atol=tol)


def test_non_contiguous_input():
    x, t, _ = _problem((6, 9))
    big = x.t().contiguous().t()                          # (6, 9) with column-major strides
    assert not big.is_contiguous()
    xa = big.clone().requires_grad_(True)
    xa_nc = xa.t().contiguous().t()
    la = ft.cross_entropy(xa_nc, t)
    xb = x.clone().requires_grad_(True)
    _close(la, F.cross_entropy(xb, t))
    _close(_grads(la, xa), _grads(F.cross_entropy(xb, t), xb))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unchecked_bad_targets_give_nan_positions(fused, reduction):
    """check_targets=False: a bad target's loss and gradient row are nan (a reduced loss is
    nan); the other rows' gradients are torch's for those targets ignored."""
    x, t, C = _problem((8, 5), seed=4)
    t[t == -100] = 0
    t[[2, 5]] = torch.tensor([C, -3])
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 5]] = True
    xa = x.clone().requires_grad_(True)
    loss = ft.cross_entropy(xa, t, reduction=reduction, fused=fused, check_targets=False)
    with pytest.raises(ValueError, match="out of bounds"):
        ft.cross_entropy(x, t)
    xb = x.clone().requires_grad_(True)
    ref = F.cross_entropy(xb, torch.where(bad, -100, t), reduction=reduction)
    if reduction == "none":
        assert torch.isnan(loss[bad]).all()
        _close(loss[~bad], ref[~bad])
        loss, ref = loss[~bad].sum(), ref[~bad].sum()
    else:
        assert torch.isnan(loss)
        ref = ref * 1.0
    (ga,) = torch.autograd.grad(loss, xa)       # (a nan loss still has its gradient)
    (gb,) = torch.autograd.grad(ref, xb)
    assert torch.isnan(ga[bad]).all()
    _close(ga[~bad], gb[~bad])
    m = ft.CrossEntropyLoss(check_targets=False)
    assert "check_targets=False" in repr(m) and torch.isnan(m(x, t))
    with pytest.raises(TypeError, match="check_targets"):
        ft.cross_entropy(x, t, check_targets=1)


def test_module():
    x, t, C = _problem((10, 7))
    w = torch.rand(C, dtype=F64)
    m = ft.CrossEntropyLoss(w, ignore_index=-100, label_smoothing=0.05, fused=True)
    assert "fused=True" in repr(m) and "weight" in dict(m.named_buffers())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la = m(xa, t)
    lb = torch.nn.CrossEntropyLoss(w, label_smoothing=0.05)(xb, t)
    _close(la, lb)
    _close(_grads(la, xa), _grads(lb, xb))
    assert ft.CrossEntropyLoss().weight is None


def test_import_fastce_does_not_import_torch():
    code = "import sys, fastce; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------
def _linear_problem(N, H, V, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, dtype=F64, generator=g).requires_grad_(True)
    c = (torch.randn(V, H, dtype=F64, generator=g) / H ** 0.5).requires_grad_(True)
    b = torch.randn(V, dtype=F64, generator=g).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, c, b, t


@pytest.mark.parametrize("reduction,with_bias,weighted,eps", list(itertools.product(
    ["mean", "sum", "none"], [False, True], [False, True], [0.0, 0.1])))
def test_linear_cross_entropy_matches_torch(reduction, with_bias, weighted, eps):
    h, c, b, t = _linear_problem(13, 6, 9)
    b = b if with_bias else None
    w = torch.rand(9, dtype=F64) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=eps)
    la = ft.linear_cross_entropy(h, c, t, b, weight=w, chunk_size=4, **kw)
    lb = F.cross_entropy(F.linear(h, c, b), t, w, **kw)
    _close(la, lb)
    params = [h, c] + ([b] if b is not None else [])
    g = torch.randn(lb.shape, dtype=F64) if lb.dim() else torch.tensor(1.7, dtype=F64)
    ga = torch.autograd.grad(la, params, g)
    gb = torch.autograd.grad(lb, params, g)
    for a_, b_ in zip(ga, gb):
        _close(a_, b_)


def test_linear_cross_entropy_3d_hidden_softcap_z_loss_and_partial_grads():
    h, c, b, t = _linear_problem(12, 5, 8)
    h3, t3 = h.detach().reshape(3, 4, 5).requires_grad_(True), t.reshape(3, 4)
    kw = dict(softcap=4.0, z_loss=1e-2)
    la = ft.linear_cross_entropy(h3, c.detach(), t3, reduction="none", **kw)   # no grad to c
    assert la.shape == (3, 4)
    logits = (h3.detach().reshape(12, 5) @ c.detach().T).numpy()[:, :, None]
    ref = spec.cross_entropy(logits, t.numpy()[:, None], reduction="none", **kw)
    np.testing.assert_allclose(la.detach().numpy().reshape(-1), ref.reshape(-1), rtol=1e-10)
    la.sum().backward()
    assert h3.grad is not None and h3.grad.shape == (3, 4, 5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_gradcheck(reduction):
    h, c, b, t = _linear_problem(6, 3, 5)
    assert torch.autograd.gradcheck(
        lambda h, c, b: ft.linear_cross_entropy(h, c, t, b, reduction=reduction,
                                                label_smoothing=0.1, chunk_size=4), (h, c, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_low_precision(dtype):
    h, c, b, t = _linear_problem(16, 8, 11)
    h, c = h.detach().to(dtype).requires_grad_(True), c.detach().to(dtype).requires_grad_(True)
    loss = ft.linear_cross_entropy(h, c, t)
    assert loss.dtype == dtype
    loss.backward()
    assert h.grad.dtype == dtype and c.grad.dtype == dtype
    ref = F.cross_entropy(h.detach().float() @ c.detach().float().T, t)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one small model, both modes (inductor; a few seconds each)
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(32, 16)
    t = torch.randint(0, 10, (32,))
    t[:3] = -100

    def step(fused):
        def f(x, t):
            return ft.cross_entropy(lin(x).tanh() * 3, t, label_smoothing=0.1, fused=fused)
        return f

    torch._dynamo.reset()
    for fused in (False, True):
        compiled = torch.compile(step(fused), fullgraph=True)
        lc = compiled(x, t)
        (gc,) = torch.autograd.grad(lc, lin.weight)
        le = F.cross_entropy(lin(x).tanh() * 3, t, label_smoothing=0.1)
        (ge,) = torch.autograd.grad(le, lin.weight)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_large_gradient_on_huge_pages_matches_torch(fused):
    """Gradients of 8 MiB and more are allocated on (transparent) huge pages: same values,
    and the buffer is an ordinary, writable, contiguous tensor."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4096, generator=g)                 # 8 MiB float32
    t = torch.randint(0, 4096, (512,), generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ft.cross_entropy(xa, t, fused=fused).backward()
    F.cross_entropy(xb, t).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-9)
    assert xa.grad.is_contiguous()
    xa.grad.mul_(2.0)                                       # writable
    buf = ft._host_empty((1024, 4096), torch.float32)
    assert buf.shape == (1024, 4096) and buf.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# CUDA tensors (a machine with a GPU and a CUDA build of torch; run by fastce.gpu_check)
# ---------------------------------------------------------------------------------------------
def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    try:
        from numba import cuda
        return cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA build of torch and numba-cuda on a GPU")
@pytest.mark.parametrize("fused,side_stream", list(itertools.product([False, True], [False, True])))
def test_cuda_tensors_match_torch_gpu(fused, side_stream):
    """Loss and gradient of CUDA tensors as torch's, also when torch's current stream is a side
    stream with the producer's work still queued on it."""
    x, t, C = _problem((64, 1000, 3), ignore_frac=0.2)
    w = torch.rand(C, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5
    ref_x = x.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, w, label_smoothing=0.1)
    ref_g = _grads(ref, ref_x)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        xc = (x.cuda() * 1.0).requires_grad_()        # produced on the (side) stream
        loss = ft.cross_entropy(xc, t.cuda(), w.cuda(), label_smoothing=0.1, fused=fused)
        gc = _grads(loss, xc)
    torch.cuda.synchronize()
    assert loss.device.type == "cuda" and gc.device.type == "cuda"
    _close(loss.cpu(), ref.detach())
    _close(gc.cpu(), ref_g)
