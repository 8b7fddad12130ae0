"""The CPU kernels' own machinery: the vectorised exp/log, the block partition of the strided and
small-class kernels (boundaries, the last block's prefetch, per-block partial sums) and the
forward's in-kernel target validation, which must agree exactly with the pre-pass of loss+grad.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from numba import njit

import fastce
from fastce import cpu
from fastce.options import LossOptions
from helpers import assert_close, random_case, spec_loss_and_grad

B = cpu.BLOCK


@njit
def _exp2_all(u, exact):
    out = np.empty_like(u)
    for i in range(u.size):
        out[i] = cpu.exp2_nonpos_exact(u[i]) if exact else cpu.exp2_nonpos(u[i])
    return out


@njit
def _log_all(s):
    out = np.empty_like(s)
    for i in range(s.size):
        out[i] = cpu.log_ge1(s[i])
    return out


@njit
def _in_place_helpers(a, b, n):
    """max2 / min2 over the pairs, then np_empty / np_zeros of n elements and (2, n)."""
    hi = np.empty_like(a)
    lo = np.empty_like(a)
    for i in range(a.size):
        hi[i] = cpu.max2(a[i], b[i])
        lo[i] = cpu.min2(a[i], b[i])
    z = cpu.np_zeros((2, n), np.float32)
    e = cpu.np_empty(n, np.int64)
    e[:] = 7
    return hi, lo, z, e, cpu.max2(n, 3), cpu.min2(np.uint8(5), np.uint8(2)), cpu.cast_like(
        1.0 / 3.0, z)


def test_in_place_helpers_match_numpy_and_python():
    """The intrinsics that replace np.empty / np.zeros, max / min and dtype casts (cold start)
    give what those give, NaN included: max(a, b) is b only where b > a."""
    vals = np.array([1.0, -2.0, np.nan, 0.0, -0.0, np.inf, 3.0], np.float64)
    a, b = np.repeat(vals, vals.size), np.tile(vals, vals.size)
    hi, lo, z, e, m, u, c = _in_place_helpers(a, b, 5)
    expect_hi = [max(x, y) for x, y in zip(a, b)]
    expect_lo = [min(x, y) for x, y in zip(a, b)]
    assert np.array_equal(hi, expect_hi, equal_nan=True)
    assert np.array_equal(lo, expect_lo, equal_nan=True)
    assert np.signbit(hi).tolist() == np.signbit(expect_hi).tolist()
    assert z.shape == (2, 5) and z.dtype == np.float32 and not z.any()
    assert e.shape == (5,) and e.dtype == np.int64 and (e == 7).all()
    assert (m, u) == (5, 2) and type(c) is float and c == float(np.float32(1.0 / 3.0))


def test_exp2_float32_within_a_few_ulp():
    rng = np.random.default_rng(1)
    u = np.concatenate([-rng.uniform(0, 125.9, 1_000_000), -np.linspace(0, 2, 20001),
                        [0.0, -0.5, -1.5, -125.5]]).astype(np.float32)
    got = _exp2_all(u, False).astype(np.float64)
    ref = np.exp2(u.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 4 * 2.0 ** -24


def test_exp2_float64_and_the_exact_variant_underflow():
    u = -np.random.default_rng(2).uniform(0, 1021, 200_000)
    ref = np.exp2(u)
    assert np.max(np.abs(_exp2_all(u, False) - ref) / ref) < 1e-15
    below = np.array([-126.5, -200.0, -np.inf], np.float32)
    assert np.all(_exp2_all(below, True) == 0)                 # gradients: exactly 0
    assert np.all(_exp2_all(below, False) <= 2.0 ** -126)      # sums: a floor that adds nothing


def test_log_ge1_float32():
    s = np.concatenate([1 + np.random.default_rng(3).uniform(0, 1e4, 500_000),
                        [1.0, 2.0, 1.41421356, 3e38]]).astype(np.float32)
    ref = np.log(s.astype(np.float64))
    got = _log_all(s).astype(np.float64)
    # within 2 float32 ulps of the result, or of 1 near s = 1 where log s is tiny
    assert np.all(np.abs(got - ref) <= 2 * 2.0 ** -23 * np.maximum(ref, 1.0))
    assert np.isnan(_log_all(np.array([np.nan], np.float32))[0])


# Block boundaries: one position short of a block, exactly one, one over, several with a tail;
# the parallel kernels start at cpu.SERIAL_BELOW logits, so both twins are exercised.
STRIDED = [(2, 3, B - 1), (2, 3, B), (3, 2, B + 1), (2, 5, 3 * B + 7), (1, 21, 4 * B)]
SMALL_ROWS = [(B - 1, 4), (B, 3), (2 * B + 3, 7), (9 * B + 5, 10)]


@pytest.mark.parametrize("shape", STRIDED + SMALL_ROWS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_partition_matches_spec(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x, t = random_case(rng, shape, dtype, ignore_frac=0.2, target_dtype=np.int32)
    w = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for reduction in ("mean", "sum", "none"):
        want_l, want_g = spec_loss_and_grad(x, t, w, reduction=reduction, label_smoothing=0.1,
                                            z_loss=1e-3)
        loss, grad = fastce.cross_entropy_with_grad(x, t, w, reduction=reduction,
                                                    label_smoothing=0.1, z_loss=1e-3)
        assert_close(loss, want_l, rtol, what=f"loss {reduction}")
        assert_close(grad, want_g, rtol, what=f"grad {reduction}")
        fwd = fastce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                   z_loss=1e-3)
        assert_close(fwd, want_l, rtol, what=f"forward {reduction}")


@pytest.mark.parametrize("shape", STRIDED + SMALL_ROWS + [(300, 40)], ids=str)
def test_forward_and_loss_grad_share_the_denominator_bitwise(shape):
    """The forward sums its targets' weights inside the loss kernel, loss+grad in a pre-pass:
    the same partition and order, so the same denominator to the last bit."""
    rng = np.random.default_rng(7)
    x, t = random_case(rng, shape, np.float32, ignore_frac=0.3)
    w = rng.uniform(0.1, 3.0, shape[1]).astype(np.float32)
    fwd = fastce.cross_entropy(x, t, w)
    both, _ = fastce.cross_entropy_with_grad(x, t, w)
    out = fastce.cross_entropy(x, t, w, return_z_loss=True, return_token_accuracy=True)
    # (the forward may add its exps in another order than loss+grad: ulps apart at most)
    np.testing.assert_allclose([both, out.loss], fwd, rtol=1e-6)
    N, C = shape[0], shape[1]
    S = int(np.prod(shape[2:], dtype=np.int64))
    t2 = np.ascontiguousarray(t).reshape(N, S)
    pre = cpu.target_stats(t2, w, -100, C)
    opts = LossOptions(weight_sum=float(w.sum()))
    *_, fused = cpu.index_loss(x.reshape(N, C, S), t2, w, opts, -100, None, np.ones(1), 0,
                               per_position=False, fuse_stats=True)
    assert fused == pre
    valid = t2 != -100
    assert pre[1] == int(valid.sum()) and pre[2] == -1
    np.testing.assert_allclose(pre[0], w[t2[valid]].astype(np.float64).sum(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 3 * B + 7), (2 * B + 3, 4), (600, 40)], ids=str)
def test_first_bad_target_in_flat_order_across_blocks(shape):
    """Two bad targets in different blocks (and the later block possibly finishing first on
    another thread): the error names the first in flat order, from the forward too."""
    rng = np.random.default_rng(11)
    x, t = random_case(rng, shape, np.float32)
    flat = t.reshape(-1)
    first, second = flat.size // 3, flat.size - 2
    flat[second] = -7
    flat[first] = shape[1] + 5
    where = np.unravel_index(first, t.shape)
    pattern = rf"target {shape[1] + 5} at position {re.escape(str(tuple(int(i) for i in where)))}"
    with pytest.raises(ValueError, match=pattern):
        fastce.cross_entropy(x, t)
    with pytest.raises(ValueError, match=pattern):
        fastce.cross_entropy_with_grad(x, t)
    with pytest.raises(ValueError, match=pattern):
        fastce.cross_entropy(x, t, reduction="none")


def test_per_block_sums_are_exact_sums_of_the_per_position_losses():
    rng = np.random.default_rng(5)
    x, t = random_case(rng, (2, 6, 5 * B + 3), np.float64, ignore_frac=0.1)
    per = fastce.cross_entropy(x, t, reduction="none")
    total = fastce.cross_entropy(x, t, reduction="sum")
    np.testing.assert_allclose(total, per.sum(), rtol=1e-13)
    acc = fastce.cross_entropy(x, t, return_token_accuracy=True).token_accuracy
    valid = t != -100
    hits = (np.argmax(x, axis=1) == t) & valid
    assert acc == pytest.approx(hits.sum() / valid.sum(), rel=1e-15)


_HITS_SCRIPT = r"""
import json
import numpy as np
import fastce
from fastce import cpu
rng = np.random.default_rng(5)
cases = []
for shape in ((300, 40), (2, 7, 600), (200, 5)):
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, shape[1], shape[:1] + shape[2:])
    fastce.cross_entropy(x, t)
    fastce.cross_entropy_with_grad(x, t)
    cases.append((x, t))
plain = sorted(str(k) for k, d in cpu._KERNELS.items() if d.signatures)
acc = [[float(fastce.cross_entropy(x, t, return_token_accuracy=True).token_accuracy),
        float((x.argmax(1) == t).mean())] for x, t in cases]
hits = sorted(str(k) for k, d in cpu._KERNELS.items() if d.signatures)
print(json.dumps([plain, acc, hits]))
"""


def test_token_accuracy_is_compiled_only_when_asked():
    """Calls without token accuracy compile no hits variant (a fresh process: the suite's
    other tests compile them); the variant, when asked for, counts argmax == target."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _HITS_SCRIPT], capture_output=True, text=True,
                          timeout=900, check=True)
    plain, acc, hits = json.loads(proc.stdout.splitlines()[-1])
    assert plain and not [k for k in plain if k.endswith("True)")], plain
    assert {"('_index_rows', False, False, True)", "('_index_blocks', False, False, True)"} \
        <= set(hits)
    for got, want in acc:
        assert got == pytest.approx(want)


@pytest.mark.parametrize("C", [33, 20000])
def test_strided_float32_sums_over_many_classes_stay_exact(C):
    """A strided layout sums over the classes per position; float32 sums over thousands of
    classes in one accumulator drifted by ~C/2 ulps (C = 20000: ~1e-6 relative), so they run in
    groups of cpu.SUM_GROUP classes totalled in float64: every strided kernel stays as exact as
    the rows kernels."""
    from fastce import spec
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((2, C, 7)) * 2).astype(np.float32)
    t = rng.integers(0, C, (2, 7))
    p = rng.random(x.shape).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    x64 = x.astype(np.float64)
    lse = spec.logsumexp(x64, axis=1)
    rel = lambda got, want: float(np.max(np.abs(np.asarray(got, np.float64) - want)
                                         / np.abs(want)))
    for kw in (dict(), dict(label_smoothing=0.1), dict(softcap=5.0)):
        out = fastce.cross_entropy(x, t, reduction="none", return_lse=True, **kw)
        want = spec.cross_entropy(x64, t, reduction="none", **kw)
        assert rel(out.loss, want) < 3e-7, kw
        _, g = fastce.cross_entropy_with_grad(x, t, **kw)
        _, want_g = spec.cross_entropy_with_grad(x64, t, **kw)
        assert np.max(np.abs(g - want_g)) < 3e-7 * np.abs(want_g).max(), kw
    assert rel(fastce.cross_entropy(x, t, reduction="none", return_lse=True).lse, lse) < 3e-7
    assert rel(fastce.cross_entropy(x, p, reduction="none"),
               spec.cross_entropy(x64, p.astype(np.float64), reduction="none")) < 3e-7
    assert rel(fastce.logsumexp(x, axis=1), lse) < 3e-7
    sm = fastce.softmax(x, axis=1)
    assert rel(sm, spec.softmax(x64, axis=1)) < 4e-6      # float32 exps of float32 x - max
    assert np.max(np.abs(sm.sum(1, dtype=np.float64) - 1.0)) < 1e-6
    st = fastce.finalize_stats(fastce.shard_stats(x, t, 0, C), t, reduction="none",
                               return_lse=True)
    assert rel(st.lse, lse) < 3e-7
