"""The lean path for small common calls (fastce.api._lean_call): taken when it should be, and
bitwise the general path's results and errors, for every layout (rows of few or many classes,
strided (N, C, d1, ...) logits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastce
from fastce import api

ROOT = Path(__file__).resolve().parents[1]


def _general(monkeypatch):
    """Make the lean path decline, so calls take _cross_entropy."""
    monkeypatch.setattr(api, "_lean_call", lambda *a, **k: None)


def _taken(monkeypatch):
    """Fail if a call reaches the general path."""
    def boom(*a, **k):
        raise AssertionError("took the general path")
    monkeypatch.setattr(api, "_cross_entropy", boom)


# rows of few classes (the block kernel, one block or several), of many classes (the rows
# kernel after the target pre-pass), strided logits (one block per row of positions or
# several), and the (N, C, 1, 1) spelling of rows
_SHAPES = [(256, 10), (7, 3), (1500, 10), (33, 100), (5, 1000), (2, 21, 8, 8), (3, 5, 700),
           (1, 40, 1030), (2, 3, 4, 5, 6), (60, 50, 1, 1), (9, 4, 1),
           (9000, 10), (70, 1000), (3, 21, 40, 40)]     # (the last three: threads)


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tdtype", [np.int64, np.int32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lean_matches_general_bitwise(monkeypatch, shape, dtype, tdtype, reduction):
    rng = np.random.default_rng(hash((shape, reduction)) % 2**32)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:]).astype(tdtype)
    t.reshape(-1)[::3] = -100
    x.reshape(-1)[0] = np.inf if x.size > shape[1] else x.reshape(-1)[0]
    with monkeypatch.context() as m:
        _taken(m)
        loss = fastce.cross_entropy(x, t, reduction=reduction)
        loss2, grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    with monkeypatch.context() as m:
        _general(m)
        want = fastce.cross_entropy(x, t, reduction=reduction)
        want2, want_g = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    for got, exp in ((loss, want), (loss2, want2)):
        assert type(got) is type(exp) and got.dtype == exp.dtype and got.shape == exp.shape
        assert np.array_equal(got, exp, equal_nan=True)
    if reduction == "none":             # new arrays, not a buffer the next call reuses
        again = fastce.cross_entropy(x, t, reduction=reduction)
        assert not np.shares_memory(again, loss) and np.array_equal(loss, want, equal_nan=True)
    assert grad.dtype == want_g.dtype and grad.shape == x.shape and grad.flags.c_contiguous
    assert np.array_equal(grad, want_g, equal_nan=True)


def _same(got, want):
    for u, v in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert type(u) is type(v) and u.dtype == v.dtype and np.shape(u) == np.shape(v)
        assert np.array_equal(u, v, equal_nan=True)


@pytest.mark.parametrize("shape, class_axis", [((256, 10), 1), ((40, 100), -1), ((2, 21, 8, 8), 1),
                                               ((3, 7, 50), -1), ((5, 3, 4), 0), ((4, 6, 9), -2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lean_class_axis_grad_output_and_out_match_general_bitwise(monkeypatch, shape,
                                                                   class_axis, reduction):
    """What the adapters pass (fastce.torch: class_axis=1, out= a new buffer, grad_output a
    float; fastce.jax: class_axis=-1, read-only logits) through the lean path: bitwise the
    general path's results, the gradient written into ``out`` itself."""
    rng = np.random.default_rng(abs(hash((shape, class_axis, reduction))) % 2**32)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    axis = class_axis % len(shape)
    C = shape[axis]
    t = rng.integers(0, C, shape[:axis] + shape[axis + 1:])
    t.reshape(-1)[::4] = -100
    ro = x.copy()
    ro.flags.writeable = False
    go = (rng.standard_normal(t.shape) if reduction == "none" else 0.75)
    go32 = np.asarray(go, np.float32)
    kw = dict(reduction=reduction, class_axis=class_axis)

    def calls(out):
        return [lambda: fastce.cross_entropy(x, t, **kw),
                lambda: fastce.cross_entropy(ro, t, **kw),
                lambda: fastce.cross_entropy_with_grad(x, t, **kw),
                lambda: fastce.cross_entropy_with_grad(ro, t, grad_output=go, **kw),
                lambda: fastce.cross_entropy_with_grad(x, t, grad_output=go32, out=out, **kw),
                lambda: fastce.cross_entropy_backward(x, t, go, out=out, **kw),
                lambda: fastce.cross_entropy_backward(ro, t, go32, **kw)]

    out = np.full_like(x, np.nan)
    with monkeypatch.context() as m:
        _taken(m)
        got = [c() for c in calls(out)]
    assert got[4][1] is out and got[5] is out
    got[4] = (got[4][0], got[4][1].copy())
    _general(monkeypatch)
    want = [c() for c in calls(np.full_like(x, np.nan))]
    for a, b in zip(got, want):
        _same(a, b)


@pytest.mark.parametrize("shape", [(256, 10), (40, 100), (2, 21, 8, 8), (3, 5, 700)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(z_loss=1e-3),
                                     dict(softcap=4.0), dict(label_smoothing=0.2, z_loss=0.01,
                                                             softcap=3.0)])
def test_lean_options_match_general_bitwise(monkeypatch, shape, reduction, options):
    """Label smoothing, z-loss and softcap (its kernel variants) through the lean path, with
    and without class weights, forward, loss+grad and backward: the general path's bits."""
    rng = np.random.default_rng(abs(hash((shape, reduction, str(options)))) % 2**32)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:])
    t.reshape(-1)[::3] = -100
    w = rng.uniform(0.2, 2.0, shape[1]).astype(np.float32)
    go = rng.standard_normal(t.shape) if reduction == "none" else 1.5
    kw = dict(reduction=reduction, **options)
    calls = [lambda: fastce.cross_entropy(x, t, **kw),
             lambda: fastce.cross_entropy(x, t, w, **kw),
             lambda: fastce.cross_entropy_with_grad(x, t, **kw),
             lambda: fastce.cross_entropy_with_grad(x, t, w, grad_output=go, **kw),
             lambda: fastce.cross_entropy_backward(x, t, go, w, **kw)]
    with monkeypatch.context() as m:
        _taken(m)
        got = [c() for c in calls]
    _general(monkeypatch)
    want = [c() for c in calls]
    for a, b in zip(got, want):
        _same(a, b)


def test_lean_option_errors_are_the_general_paths(monkeypatch):
    x = np.zeros((4, 5), np.float32)
    t = np.array([0, 1, 2, 9])
    bad = [dict(label_smoothing=1.5), dict(softcap=-1.0), dict(z_loss=np.nan),
           dict(label_smoothing=0.1, reduction="avg"), dict(label_smoothing="x"),
           dict(z_loss=0.1)]            # (the last: a valid option, then the bad target)
    for kw in bad:
        with pytest.raises((TypeError, ValueError)) as lean:
            fastce.cross_entropy_with_grad(x, t, **kw)
        with monkeypatch.context() as m:
            _general(m)
            with pytest.raises(type(lean.value)) as general:
                fastce.cross_entropy_with_grad(x, t, **kw)
        assert str(lean.value) == str(general.value)


def test_out_sharing_memory_takes_the_general_path(monkeypatch):
    """out= the logits (in place), or overlapping them, the targets or the weights: the general
    path, which computes in place or reads through copies."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    t = rng.integers(0, 6, 32)
    w = rng.uniform(0.5, 2, 6).astype(np.float32)
    want_loss, want_grad = fastce.cross_entropy_with_grad(x, t, w)
    calls = []
    real = api._cross_entropy
    monkeypatch.setattr(api, "_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    xi = x.copy()
    loss, grad = fastce.cross_entropy_with_grad(xi, t, w, out=xi)
    assert grad is xi and loss == want_loss and np.array_equal(grad, want_grad)
    big = np.zeros(2 * x.size, np.float32)
    big[:x.size] = x.reshape(-1)
    view = big[:x.size].reshape(x.shape)
    loss, grad = fastce.cross_entropy_with_grad(view, t, w, out=big[3:3 + x.size].reshape(x.shape))
    assert loss == want_loss and np.array_equal(grad, want_grad)
    assert len(calls) == 2


@pytest.mark.parametrize("shape", [(300, 10), (40, 100), (2, 21, 16, 16)])
def test_lean_uint8_targets_match_general_bitwise(monkeypatch, shape):
    """Segmentation's uint8 targets with ignore_index=255 (the kernels read their bytes)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:]).astype(np.uint8)
    t.reshape(-1)[::4] = 255
    with monkeypatch.context() as m:
        _taken(m)
        got = [fastce.cross_entropy(x, t, ignore_index=255),
               *fastce.cross_entropy_with_grad(x, t, ignore_index=255)]
    _general(monkeypatch)
    want = [fastce.cross_entropy(x, t, ignore_index=255),
            *fastce.cross_entropy_with_grad(x, t, ignore_index=255)]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b)


@pytest.mark.parametrize("shape", [(256, 10), (40, 100), (3, 21, 9, 9), (2, 7, 2000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lean_class_weights_match_general_bitwise(monkeypatch, shape, dtype):
    """The seed's weighted mean (divided by the targets' weights) through the lean path."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:])
    t.reshape(-1)[::5] = -100
    w = rng.uniform(0.1, 3.0, shape[1]).astype(dtype)
    calls = [lambda: fastce.cross_entropy(x, t, w),
             lambda: fastce.cross_entropy(x, t, w, reduction="sum"),
             lambda: fastce.cross_entropy_with_grad(x, t, w),
             lambda: fastce.cross_entropy_with_grad(x, t, w, reduction="sum"),
             lambda: fastce.cross_entropy(x, t, w, reduction="none"),
             lambda: fastce.cross_entropy_with_grad(x, t, w, reduction="none")]
    with monkeypatch.context() as m:
        _taken(m)
        got = [c() for c in calls]
    _general(monkeypatch)
    want = [c() for c in calls]
    for a, b in zip(got, want):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert u.dtype == v.dtype and np.shape(u) == np.shape(v)
            assert np.array_equal(u, v, equal_nan=True)


def test_weights_the_lean_path_declines_give_the_general_results(monkeypatch):
    """Weights of another dtype, read-only, strided, or with a non-finite sum take the general
    path (which casts, copies or checks them)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    t = rng.integers(0, 6, 16)
    w = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    ro = w.copy()
    ro.flags.writeable = False
    cases = [w.astype(np.float64), ro, np.repeat(w, 2)[::2], w.tolist(),
             np.array([1, 2, np.inf, 1, 1, 1], np.float32)]
    calls = []
    real = api._cross_entropy
    monkeypatch.setattr(api, "_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    for wi in cases[:4]:
        assert fastce.cross_entropy(x, t, wi) == pytest.approx(float(fastce.cross_entropy(x, t, w)),
                                                               rel=1e-6)
    fastce.cross_entropy(x, t, cases[4])
    assert len(calls) == len(cases)


def test_lean_all_ignored_is_nan_like_torch(monkeypatch):
    x = np.zeros((4, 5), np.float32)
    t = np.full(4, -100)
    _taken(monkeypatch)
    assert np.isnan(fastce.cross_entropy(x, t))
    loss, grad = fastce.cross_entropy_with_grad(x, t)
    assert np.isnan(loss) and not grad.any()


@pytest.mark.parametrize("C", [10, 1000])
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("N, bad_at", [(6, 2), (1300, 1100), (50, 40)])   # one block; the third
def test_lean_bad_targets_raise_as_general(monkeypatch, C, with_grad, N, bad_at):
    x = np.zeros((N, C), np.float32)
    t = np.arange(N) % 5
    t[bad_at] = C
    t[bad_at + 3] = -7                  # a later bad target is not the one reported
    call = fastce.cross_entropy_with_grad if with_grad else fastce.cross_entropy
    with pytest.raises(ValueError) as lean:
        call(x, t)
    _general(monkeypatch)
    with pytest.raises(ValueError) as general:
        call(x, t)
    assert str(lean.value) == str(general.value) and f"({bad_at},)" in str(lean.value)


@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("shape, bad_at", [((2, 21, 8, 8), (1, 3, 4)), ((3, 4, 1200), (2, 700))])
def test_lean_strided_bad_targets_raise_as_general(monkeypatch, with_grad, shape, bad_at):
    x = np.zeros(shape, np.float32)
    t = np.zeros(shape[:1] + shape[2:], np.int32)
    t[bad_at] = -3
    call = fastce.cross_entropy_with_grad if with_grad else fastce.cross_entropy
    with monkeypatch.context() as m:
        _taken(m)
        with pytest.raises(ValueError) as lean:
            call(x, t)
    _general(monkeypatch)
    with pytest.raises(ValueError) as general:
        call(x, t)
    assert str(lean.value) == str(general.value) and str(bad_at) in str(lean.value)


@pytest.mark.parametrize("kwargs", [dict(softcap=0.0), dict(label_smoothing=1.5),
                                    dict(z_loss=-1), dict(reduction="avg"),
                                    dict(ignore_index=True), dict(label_smoothing=[])])
def test_arguments_the_lean_path_declines_still_raise(kwargs):
    x = np.zeros((4, 5), np.float32)
    t = np.array([0, 1, 2, 3])
    with pytest.raises((TypeError, ValueError)):
        fastce.cross_entropy(x, t, **kwargs)


def test_declined_inputs_take_the_general_path(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    t = rng.integers(0, 6, 8)
    cases = [(x.astype(">f4"), t), (np.asfortranarray(x), t), (x, t.astype(np.int16)),
             (x, np.repeat(t, 2)[::2]), (x.astype(np.float16), t)]
    want = fastce.cross_entropy(x.astype(np.float64), t)
    calls = []
    real = api._cross_entropy
    monkeypatch.setattr(api, "_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    for xi, ti in cases:
        assert abs(float(fastce.cross_entropy(xi, ti)) - want) < 1e-3
    assert len(calls) == len(cases)


def test_lean_inputs_not_modified_and_grad_fresh():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    t = rng.integers(0, 10, 64)
    xc, tc = x.copy(), t.copy()
    _, g1 = fastce.cross_entropy_with_grad(x, t)
    _, g2 = fastce.cross_entropy_with_grad(x, t)
    assert np.array_equal(x, xc) and np.array_equal(t, tc)
    assert g1 is not g2 and not np.shares_memory(g1, g2) and g1.flags.writeable


def test_lean_plans_serve_one_thread_calls_of_every_layout():
    """A plan's forward through the entry points: one compiled entry per kernel and dtype pair,
    one block or several, rows of few classes (block kernel) or many (rows kernel), strided
    logits."""
    from fastce import cpu
    from fastce.options import LossOptions

    def call(shape, tdtype=np.int64):
        C = shape[1]
        x = np.zeros(shape, np.float32)
        N, S = shape[0], x.size // (shape[0] * C)
        t = np.zeros(shape[:1] + shape[2:], tdtype)
        plan = cpu.LeanPlan((N, C, S), x.dtype, t.dtype, True, True, len(shape) == 2)
        return plan.forward(x, t, np.ones(C, np.float32), np.ones(C),
                            LossOptions(weight_sum=float(C)), -100)

    for tdtype in (np.int64, np.int32):
        total, zsum, D, count, bad = call((256, 10), tdtype)
        assert total == pytest.approx(256 * np.log(10)) and (D, count, bad) == (256, 256, -1)
        assert zsum == 0
    f32, i64, i32 = (np.dtype(d).num for d in (np.float32, np.int64, np.int32))
    assert {(cpu._FWD_BLOCKS, (f32, i64, True, True)),
            (cpu._FWD_BLOCKS, (f32, i32, True, True))} <= set(cpu._LEAN_ENTRIES)
    for shape in ((3 * cpu.BLOCK + 7, 10), (4, 3, 3 * cpu.BLOCK + 7), (40, 100), (6, 40, 1, 1)):
        total, _, D, count, bad = call(shape)   # several blocks; strided; the rows kernel
        n = shape[0] * (shape[2] if len(shape) == 3 else 1)
        assert total == pytest.approx(n * np.log(shape[1])) and (D, count, bad) == (n, n, -1)
    assert (cpu._FWD_ROWS, (f32, i64, True, True)) in cpu._LEAN_ENTRIES


def test_lean_plans_are_per_problem_bounded_and_not_fooled_by_byte_order(monkeypatch):
    """Each thread keeps at most _LEAN_PLANS_MAX plans, keyed by everything the kernels' types
    and views depend on: a byte-swapped copy of the same logits (same shape, same dtype number)
    is no lean problem, and gets the general path's (converted) result."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 7)).astype(np.float32)
    t = rng.integers(0, 7, 40)
    want = fastce.cross_entropy(x, t)
    swapped = x.astype(x.dtype.newbyteorder())
    assert fastce.cross_entropy(swapped, t) == want
    assert fastce.cross_entropy(x, t) == want
    plans = api._lean_local.plans
    key = lambda a: (a.shape, t.shape, a.dtype, t.dtype, True, True, 1)   # noqa: E731
    assert plans[key(swapped)] is None and plans[key(x)] is not None
    for n in range(1, 2 * api._LEAN_PLANS_MAX):
        fastce.cross_entropy(x[:n], t[:n])
        assert len(api._lean_local.plans) <= api._LEAN_PLANS_MAX
    with monkeypatch.context() as m:
        _taken(m)
        assert fastce.cross_entropy(x, t) == want


_SAME_KERNELS = r"""
import json
import numpy as np
import fastce
from fastce import cpu
kernels = [cpu._KERNELS[k] for k in (("_index_blocks", False, False, False),
                                     ("_index_blocks", True, False, False), "_target_stats",
                                     ("_index_rows", False, False, False),
                                     ("_index_rows", True, False, False))]
rng = np.random.default_rng(0)
cases = [(rng.standard_normal((300, 10)).astype(np.float32), np.arange(300) % 10),
         (rng.standard_normal((30, 100)).astype(np.float32), np.arange(30, dtype=np.int32)),
         (rng.standard_normal((2, 5, 7, 9)).astype(np.float32), np.zeros((2, 7, 9), np.int32))]
lean = [float(f(x, t) if f is fastce.cross_entropy else f(x, t)[0])
        for x, t in cases for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad)]
after_lean = [len(k.signatures) for k in kernels]
general = []
fastce.api._lean_call = lambda *a, **k: None        # the general path from here on
for x, t in cases:
    general += [float(fastce.cross_entropy(x, t)),
                float(fastce.cross_entropy_with_grad(x, t)[0])]
print(json.dumps([after_lean, [len(k.signatures) for k in kernels], lean, general]))
"""


def test_lean_calls_compile_the_general_paths_kernels(tmp_path):
    """The lean path's compiled calls give the kernels the general path's argument types: in
    a fresh process and cache, the general path then compiles no kernel of its own."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SAME_KERNELS], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    after_lean, after_general, lean, general = json.loads(proc.stdout)
    assert after_lean == [1, 1, 1, 1, 1] and after_general == after_lean
    assert lean == general


_READ_ONLY = r"""
import json
import numpy as np
import fastce
from fastce import cpu
x = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
t = np.arange(64) % 10
ro = x.copy()
ro.flags.writeable = False
kernel = cpu._KERNELS[("_index_blocks", False, False, False)]
lean = [float(fastce.cross_entropy(ro, t)), float(fastce.cross_entropy(x, t))]
after_lean = len(kernel.signatures)
fastce.api._lean_call = lambda *a, **k: None        # the general path from here on
general = [float(fastce.cross_entropy(ro, t)), float(fastce.cross_entropy(x, t))]
print(json.dumps([after_lean, len(kernel.signatures), lean, general]))
"""


def test_lean_calls_of_read_only_logits_use_the_general_paths_signature(tmp_path):
    """Numba types a read-only array apart: read-only logits (np.asarray of a JAX array) and
    writeable ones each get the entry the dispatcher would pick, so the general path compiles
    nothing more (with one entry per dtype, the first call's decided for both)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _READ_ONLY], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    after_lean, after_general, lean, general = json.loads(proc.stdout)
    assert after_lean == 2 and after_general == 2 and lean == general


def test_lean_calls_from_many_threads_keep_their_own_results():
    """The lean path's one-block sums live in a buffer per thread (the kernels release the
    GIL, so a shared one would mix concurrent calls' results)."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(11)
    cases = [(rng.standard_normal((256, 10)).astype(np.float32) * (1 + i), rng.integers(0, 10, 256))
             for i in range(6)]
    cases[3][1][17] = 99                # a bad target: must raise in its own thread only
    want = []
    for i, (x, t) in enumerate(cases):
        want.append(None if i == 3 else (fastce.cross_entropy(x, t),
                                         fastce.cross_entropy_with_grad(x, t)))

    def work(k):
        i = k % len(cases)
        x, t = cases[i]
        try:
            return i, (fastce.cross_entropy(x, t), fastce.cross_entropy_with_grad(x, t))
        except ValueError:
            return i, None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(600)))
    for i, got in results:
        if want[i] is None:
            assert got is None
            continue
        assert got[0] == want[i][0] and got[1][0] == want[i][1][0]
        np.testing.assert_array_equal(got[1][1], want[i][1][1])
