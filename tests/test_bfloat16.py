"""bfloat16 (ml_dtypes) logits on the CPU: the float64 loss of the same bf16 values, computed in
float32 (loss float32), the gradient rounded to bfloat16 (or float32 with out= float32)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastce
from helpers import assert_close, random_case, spec_loss_and_grad

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

# Shapes: rows of a C that is no multiple of any lane width, rows of few classes, the class
# axis not last (strided), and big enough ones that run the parallel kernels.
SHAPES = [(33, 100), (17, 257), (64, 10), (5, 7, 3, 4), (40, 1999), (2, 40, 33, 30)]
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(softcap=5.0), dict(z_loss=1e-3),
           dict(weight=True, ignore_frac=0.3), dict(label_smoothing=0.2, softcap=3.0, z_loss=1e-4,
                                                    weight=True, ignore_frac=0.2)]


def _case(seed, shape, opts, prob=False):
    rng = np.random.default_rng(seed)
    opts = dict(opts)
    x, t = random_case(rng, shape, np.float32, prob=prob, ignore_frac=opts.pop("ignore_frac", 0))
    x = (x * 2).astype(BF16)
    if opts.pop("weight", False):
        opts["weight"] = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    return x, t, opts


def _bf16_ulp(v):
    """The spacing of bfloat16 at each bfloat16 value (its magnitude's next value up)."""
    bits = np.abs(v.astype(BF16)).view(np.uint16)
    return (bits + 1).view(BF16).astype(np.float64) - bits.view(BF16).astype(np.float64)


def assert_bf16_grad(grad, ref):
    """Within one bfloat16 ulp of the float64 reference rounded to bfloat16, give or take the
    float32 computation's own absolute error (entries that cancel, e.g. p - eps w, near 0)."""
    assert grad.dtype == BF16
    r = ref.astype(BF16)
    diff = np.abs(grad.astype(np.float64) - r.astype(np.float64))
    finite = np.abs(ref[np.isfinite(ref)])
    f32_err = 1e-6 * (finite.max() if finite.size else 0.0)
    ok = (diff <= _bf16_ulp(r) + f32_err) | (np.isnan(grad.astype(np.float32)) & np.isnan(ref))
    assert ok.all(), (grad[~ok][:5], r[~ok][:5])


def _grid():
    k = 0
    for shape in SHAPES:
        for opts in OPTIONS:
            for reduction in ("mean", "sum", "none"):
                k += 1
                if k % 2 == 0 or reduction == "mean":     # a deterministic half of the grid
                    yield pytest.param(k, shape, opts, reduction, id=f"{shape}-{opts}-{reduction}")


@pytest.mark.parametrize("seed,shape,opts,reduction", list(_grid()))
def test_matches_spec_of_the_bf16_values(seed, shape, opts, reduction):
    x, t, kw = _case(seed, shape, opts)
    x_before = x.copy()
    ref_loss, ref_grad = spec_loss_and_grad(x.astype(np.float64), t, reduction=reduction, **kw)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction, **kw)
    assert np.asarray(loss).dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6, atol=2e-6)
    assert_bf16_grad(grad, ref_grad)
    fwd = fastce.cross_entropy(x, t, reduction=reduction, **kw)
    assert np.asarray(fwd).dtype == np.float32
    np.testing.assert_allclose(fwd, ref_loss, rtol=2e-6, atol=2e-6)
    # out= a bfloat16 buffer: the same bits; a float32 one: the float32 gradient
    out = np.full(x.shape, np.nan, BF16)
    _, g2 = fastce.cross_entropy_with_grad(x, t, reduction=reduction, out=out, **kw)
    assert g2 is out
    np.testing.assert_array_equal(out.view(np.uint16), grad.view(np.uint16))
    out32 = np.empty(x.shape, np.float32)
    fastce.cross_entropy_with_grad(x, t, reduction=reduction, out=out32, **kw)
    assert_close(out32, ref_grad, 1e-5, what="float32 out=")
    np.testing.assert_array_equal(out32.astype(BF16).view(np.uint16), grad.view(np.uint16))
    back = fastce.cross_entropy_backward(x, t, reduction=reduction, **kw)
    np.testing.assert_array_equal(back.view(np.uint16), grad.view(np.uint16))
    np.testing.assert_array_equal(x.view(np.uint16), x_before.view(np.uint16))


@pytest.mark.parametrize("shape", [(33, 100), (64, 10), (5, 7, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_float64_of_bf16_logits(shape, reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 2.0, shape[1])
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    t[rng.random(t.shape) < 0.2] = -100
    xt = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).to(torch.bfloat16)
    x = xt.view(torch.int16).numpy().view(BF16)     # the same bits as an ml_dtypes array
    x64 = xt.to(torch.float64).requires_grad_()
    ref = F.cross_entropy(x64, torch.from_numpy(t), torch.from_numpy(w), reduction=reduction,
                          label_smoothing=0.1)
    ref.backward(torch.ones_like(ref))
    loss, grad = fastce.cross_entropy_with_grad(x, t, w, reduction=reduction,
                                                label_smoothing=0.1)
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=2e-6, atol=2e-6)
    assert_bf16_grad(grad, x64.grad.numpy())
    nll = fastce.nll_loss(x, t, w, reduction=reduction)
    assert np.asarray(nll).dtype == np.float32
    ref_nll = F.nll_loss(xt.to(torch.float64), torch.from_numpy(t), torch.from_numpy(w),
                         reduction=reduction)
    np.testing.assert_allclose(nll, ref_nll.numpy(), rtol=1e-6, atol=1e-7)


def test_probability_targets_and_in_place():
    for shape in [(33, 100), (5, 7, 3, 4)]:
        x, p, _ = _case(5, shape, {}, prob=True)
        ref_loss, ref_grad = spec_loss_and_grad(x.astype(np.float64), p, label_smoothing=0.1)
        loss, grad = fastce.cross_entropy_with_grad(x, p, label_smoothing=0.1)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
        assert_bf16_grad(grad, ref_grad)
    for shape in [(33, 100), (64, 10), (5, 7, 3, 4)]:          # out=input, every layout
        x, t, _ = _case(6, shape, {})
        loss, grad = fastce.cross_entropy_with_grad(x, t)
        buf = x.copy()
        loss2, g2 = fastce.cross_entropy_with_grad(buf, t, out=buf)
        assert g2 is buf and loss2 == loss
        np.testing.assert_array_equal(buf.view(np.uint16), grad.view(np.uint16))


def test_nan_inf_and_extreme_logits():
    x = np.zeros((3, 40), BF16)
    x[0, 5] = np.nan
    x[1, :] = -np.inf
    x[1, 3] = 1e38
    x[2, :] = 3e38
    t = np.array([5, 3, 0])
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    ref_loss, ref_grad = spec_loss_and_grad(x.astype(np.float64), t, reduction="none")
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6, atol=1e-6)
    assert_bf16_grad(grad, ref_grad)
    assert np.isnan(grad[0].astype(np.float32)).all()


def test_rounding_is_to_nearest_even():
    """The kernel's float32 -> bfloat16 narrowing, through the gradient: as ml_dtypes rounds."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 300)) * 6).astype(BF16)
    t = rng.integers(0, 300, 64)
    out32 = np.empty(x.shape, np.float32)
    fastce.cross_entropy_with_grad(x, t, out=out32, reduction="sum")
    _, grad = fastce.cross_entropy_with_grad(x, t, reduction="sum")
    np.testing.assert_array_equal(grad.view(np.uint16), out32.astype(BF16).view(np.uint16))


THREADS = textwrap.dedent("""
    import numpy as np, ml_dtypes, fastce, hashlib
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3000, 1500)) * 3).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, 1500, 3000)
    x2 = (rng.standard_normal((2, 7, 300, 200)) * 3).astype(ml_dtypes.bfloat16)
    t2 = rng.integers(0, 7, (2, 300, 200))
    a, g = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1, z_loss=1e-4)
    b, g2 = fastce.cross_entropy_with_grad(x2, t2)
    c = fastce.cross_entropy(x, t, softcap=20.0)
    print(repr(float(a)), repr(float(b)), repr(float(c)), hashlib.sha1(g.tobytes()).hexdigest(),
          hashlib.sha1(g2.tobytes()).hexdigest())
""")


def test_bitwise_identical_across_thread_counts():
    outs = []
    for n in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=n)
        outs.append(subprocess.run([sys.executable, "-c", THREADS], env=env, check=True,
                                   capture_output=True, text=True, timeout=900).stdout)
    assert outs[0] == outs[1] and outs[0].strip()


def test_bad_inputs_are_clear_errors():
    x = np.zeros((4, 50), BF16)
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="dtype"):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((4, 50), np.float16))
    with pytest.raises(ValueError, match="dtype"):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((4, 50), np.float64))
    with pytest.raises(ValueError, match="shape"):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((4, 49), BF16))
    with pytest.raises(ValueError, match="contiguous"):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((50, 4), BF16).T)
    with pytest.raises(ValueError):
        fastce.cross_entropy(x, np.full(4, 50))        # a target out of range
    for fn in (fastce.softmax, fastce.log_softmax, fastce.logsumexp):
        with pytest.raises(TypeError, match="bfloat16"):
            fn(x, axis=1)


def test_import_does_not_import_ml_dtypes():
    code = "import sys, numpy, fastce; print('ml_dtypes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=300).stdout
    assert out.strip() == "False"


def test_return_lse_and_stats():
    x, t, _ = _case(9, (33, 100), {})
    r = fastce.cross_entropy(x, t, return_lse=True, return_z_loss=True,
                             return_token_accuracy=True, z_loss=1e-3)
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    ref_lse = m + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    assert r.lse.dtype == np.float32 and np.asarray(r.z_loss).dtype == np.float32
    np.testing.assert_allclose(r.lse, ref_lse, rtol=2e-6)
    assert r.token_accuracy == np.mean(x64.argmax(axis=1) == t)


def test_bench_rows_run_and_print_ratios_to_float32():
    import io

    from fastce import bench
    p = bench.make_workload("W1", quick=True)
    times = {("W1", bench.FWD, bench.FASTCE): 2.0}
    for op, fns in bench.bf16_impls(p).items():
        for row, fn in fns.items():
            fn()
            times[("W1", op, row)] = 1.0
    buf = io.StringIO()
    bench._print_bf16(times, buf)
    text = buf.getvalue()
    assert "bfloat16 forward: 1000.0 ms = 0.500x float32" in text
    assert "bfloat16 loss+grad out=: 1000.0 ms = 1.000x float32" in text


def test_shared_conversions_and_their_simulator_twins():
    """fastce.bfloat16's intrinsics (compiled for the CPU here; the GPU compiles the same IR)
    and their NumPy twins (the CUDA simulator's) agree with ml_dtypes on every bfloat16 bit
    pattern, and on float32 values around every rounding case (ties to even, NaN, inf)."""
    from numba import njit
    from fastce import bfloat16 as bf

    widen = njit(lambda u: bf.to_f32(u))
    narrow = njit(lambda f: bf.to_bf16(f))
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(BF16).astype(np.float32)
    for u in bits[::97].tolist() + [0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8000]:
        for g in (widen(np.uint16(u)), bf.to_f32_py(np.uint16(u))):
            g = np.float32(g)
            assert g.view(np.uint32) == want[u].view(np.uint32) or (np.isnan(g) and
                                                                     np.isnan(want[u]))
    rng = np.random.default_rng(2)
    f = np.concatenate([rng.standard_normal(3000).astype(np.float32) * 1e3,
                        (rng.integers(0, 1 << 32, 3000, dtype=np.uint64).astype(np.uint32)
                         .view(np.float32)),
                        (np.arange(4000, dtype=np.uint32) * 0x8000).view(np.float32),  # ties
                        np.array([np.inf, -np.inf, np.nan, 3.4e38, -0.0], np.float32)])
    with np.errstate(invalid="ignore"):             # (NaN bit patterns)
        want = f.astype(BF16).view(np.uint16)
    for i, v in enumerate(f.tolist()):
        v = np.float32(v)
        for g in (narrow(v), bf.to_bf16_py(v)):
            if np.isnan(v):
                assert np.isnan(np.uint16(g).view(BF16).astype(np.float32))
            else:
                assert g == want[i], (v, g, want[i])
