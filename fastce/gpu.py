"""numba.cuda GPU backend: the kernels behind fastce's public functions for CUDA arrays.

Inputs may be CuPy arrays, Numba device arrays (real, or the CUDA simulator's fake ones) or any
object with ``__cuda_array_interface__``.  Internally every array is a C-contiguous Numba device
array (zero-copy views of CuPy memory; new buffers come from CuPy's memory pool when CuPy is
installed); the few array operations of the backend protocol (``fastce.backend``: casts and
copies, fill, ...) are small kernels here.  Results are
handed back as CuPy arrays for CuPy (and foreign CUDA) inputs when CuPy is installed, and as
Numba device arrays otherwise.  CuPy is imported lazily: ``import fastce`` needs neither CuPy
nor a GPU.

Layouts (see ``fastce.spec``): logits are viewed as (N, C, S).
- ``S == 1`` and C > SMALL_C ("rows", index or probability targets): one thread block per
  row.  Each thread runs a single-pass online softmax (running max, rescaled sum) over its
  strided share of the row; the block combines the partial (max, sum) pairs with a
  fixed-order shared-memory tree (``_block_tree``).  The logits are read once for the loss
  and twice for loss+grad (the second pass writes the gradient).
- otherwise ("strided", e.g. (N, C, H, W), or rows with few classes): one thread per (n, s)
  position, consecutive threads on consecutive s (coalesced along S).

Per-element outputs (ce, z-loss, hit) are written to O(N*S) arrays exactly as on the CPU and
summed by a fixed-order two-stage reduction (no float atomics): the loss is deterministic.
Index arithmetic is 64-bit.  The per-element formulas are those of ``fastce.elementwise``,
compiled as CUDA device functions.  Block reductions use a shared-memory tree (the CUDA simulator
has no warp shuffles, and the tree keeps one code path for both).

Streams: every launch, allocation and copy of a call goes to one stream, CuPy's current
stream (``with cupy.cuda.Stream(): ...`` applies, as it does to CuPy's own operations and to
fastce's cuBLAS products), or Numba's default stream without CuPy.  An argument whose
``__cuda_array_interface__`` (v3) names another stream is waited for with an event on the
device, not by the host (torch 2.13 exports v2, no stream: fastce.torch makes torch's current
stream CuPy's for the call).  A call copies three numbers back, the targets' statistics (the
mean's denominator; bad targets raise before any logit is read with them), waiting for the
call's stream only; the reduced loss stays on the device (``reduce_loss``).
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import numpy as np
from numba import config, cuda

from . import bfloat16 as bf
from . import elementwise as ew
from .options import LossOptions
from .dispatch import is_device_array

__all__ = ["BACKEND", "GPUBackend"]

SIM = bool(config.ENABLE_CUDASIM)
# Block sizes are powers of 2: the shared-memory tree halves the active threads each step.
# The simulator runs every thread as a Python thread: keep blocks small there.
ROW_MAX = 32 if SIM else 512          # max threads per block of the row kernels: their shared
#                                       state (<= 52 B a thread: 26 KiB) stays under the 48 KiB a
#                                       block may declare statically; _row_cfg gives each 8+ classes
RED_T = 32 if SIM else 256            # threads per block of the reductions (8 warps)
RED_BLOCKS = 4 if SIM else 1024       # max blocks of the first reduction stage: its <= 1024
#                                       partials take one second-stage block or one small copy
ELEM_T = 32 if SIM else 256           # threads per block of the one-thread-per-item kernels
SMALL_C = 4 if SIM else 64            # rows with at most this many classes: one thread per row
#                                       (a block per row would leave most threads 0-2 classes)
MAX_GRID = 1 << 30                    # most blocks per launch (CUDA allows 2**31 - 1 in x): the
#                                       kernels' grid-stride loops cover larger N

_f8 = np.float64
_i8 = np.int64
IGNORED_ROW = -1        # index_finish's target code of an ignored element: zero gradient row
BAD_ROW = -2            # and of a bad target (check_targets=False): nan gradient row

# Kernels are cached on disk as the CPU's are (compiled once per machine, not per process);
# FASTCE_GPU_CACHE=0 turns that off.
GPU_CACHE = os.environ.get("FASTCE_GPU_CACHE", "1") != "0"


class _SoftCache:
    """Numba's kernel cache, but a cache that fails to load or save an entry costs a compile
    (and a warning), never a launch: the cache path is untested on hardware."""

    def __init__(self, cache):
        self._cache = cache

    def load_overload(self, *args, **kwargs):
        try:
            return self._cache.load_overload(*args, **kwargs)
        except Exception as e:                              # pragma: no cover - GPU only
            warnings.warn(f"fastce: GPU kernel cache not loaded ({type(e).__name__}: {e})")
            return None

    def save_overload(self, *args, **kwargs):
        try:
            self._cache.save_overload(*args, **kwargs)
        except Exception as e:                              # pragma: no cover - GPU only
            warnings.warn(f"fastce: GPU kernel cache not saved ({type(e).__name__}: {e})")

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _kernel(f):
    """``cuda.jit(f)``, cached on disk (see GPU_CACHE; the simulator compiles nothing)."""
    if SIM or not GPU_CACHE:
        return cuda.jit(f)
    try:
        k = cuda.jit(f, cache=True)
    except Exception:               # no writable cache directory: compile per process
        return cuda.jit(f)
    if hasattr(getattr(k, "_cache", None), "save_overload"):
        k._cache = _SoftCache(k._cache)
    return k

# ---------------------------------------------------------------------------------------------
# Shared per-element math (fastce.elementwise) as CUDA device functions
# ---------------------------------------------------------------------------------------------
_index_loss = cuda.jit(device=True)(ew.index_loss)
_index_grad_coefs = cuda.jit(device=True)(ew.index_grad_coefs)
_prob_weight = cuda.jit(device=True)(ew.prob_weight)
_prob_loss = cuda.jit(device=True)(ew.prob_loss)
_prob_grad_coefs = cuda.jit(device=True)(ew.prob_grad_coefs)
_softcap_grad_factor = cuda.jit(device=True)(ew.softcap_grad_factor)
_z_term = cuda.jit(device=True)(ew.z_term)
_reported_lse = cuda.jit(device=True)(ew.reported_lse)

# How the loss kernels load a logit and store a gradient entry: as they are (float16/32/64:
# the arithmetic widens, the store narrows), or as bfloat16 bits (uint16 views) widened to
# float32 and rounded back (fastce.bfloat16; its NumPy twins under the simulator).
_bf16_to_f32 = bf.to_f32_py if SIM else bf.to_f32
_f32_to_bf16 = bf.to_bf16_py if SIM else bf.to_bf16


@cuda.jit(device=True)
def _as_is(v):
    return v


@cuda.jit(device=True)
def _load_bf16(u):
    return _bf16_to_f32(u)


@cuda.jit(device=True)
def _store_bf16(v):
    return _f32_to_bf16(np.float32(v))


def _io(bf16):
    """(load, store) of the loss kernels: bfloat16 bits, or values as they are."""
    return (_load_bf16, _store_bf16) if bf16 else (_as_is, _as_is)


@cuda.jit(device=True)
def _combine(m1, s1, m2, s2):
    """Merge two online-softmax partials (max, sum of exp(v - max)), in float64."""
    m = m1 if m1 >= m2 else m2
    r = 0.0
    if s1 != 0.0:
        r += s1 * math.exp(m1 - m)
    if s2 != 0.0:
        r += s2 * math.exp(m2 - m)
    return m, r


@cuda.jit(device=True)
def _finish_lse_r(m, s, nan):
    """(lse, r = log s) of a row from its (max, sum); NaN for a NaN logit or a +inf
    (softcapped) max.  lse - s_c is computed as (m - s_c) + r, exact near float64's limit."""
    if nan != 0 or m == math.inf:
        return math.nan, math.nan
    r = math.log(s) if s > 0.0 else -math.inf      # all -inf: the simulator's log(0) raises
    return m + r, r


@cuda.jit(device=True)
def _dev_step(m_old, m, dev, q_fin, v, q):
    """Add q (m - v) to dev, the weighted sum of distances to the running max m (m_old before
    v was seen): when the max rises, every weight seen so far (q_fin, finite logits only)
    moves by the rise.  A -inf logit adds q * inf (+inf, as torch's -log_softmax)."""
    if m > m_old and q_fin != 0:
        dev += q_fin * (m - m_old)
    if v == -math.inf:
        dev += q * math.inf
    else:
        dev += q * (m - v)
        q_fin += q
    return dev, q_fin


@cuda.jit(device=True)
def _dev_merge(m1, dev1, q1, m2, dev2, q2, m):
    """Merge two (max, dev, q_fin) partials of _dev_step under the merged max m."""
    dev = dev1 + dev2
    if q1 != 0 and m > m1:
        dev += q1 * (m - m1)
    if q2 != 0 and m > m2:
        dev += q2 * (m - m2)
    return dev, q1 + q2


@cuda.jit(device=True)
def _softmax_finish(m, s, nan):
    """SciPy's rules for one softmax-family group from its online (max, sum): (lse, shift,
    log-sum, 1/sum), the outputs being log_softmax = (x - shift) - log-sum and softmax =
    exp(x - shift) / sum.  A NaN gives NaN; a max of +-inf gives lse = max, log_softmax
    x - max, softmax NaN."""
    if nan != 0:
        return math.nan, math.nan, 0.0, math.nan
    if math.isinf(m):
        return m, m, 0.0, math.nan
    lg = math.log(s)
    return m + lg, m, lg, 1.0 / s


@cuda.jit(device=True)
def _signed_finish(m, s, signed, poisoned):
    """scipy's logsumexp(b=...) of a group from its max m and sum s of b exp(x - m) (for an
    infinite m, the sum of b * inf over the +inf entries): (log|sum| + m, sign(sum)); a
    negative sum gives NaN unless ``signed``; a zero sum -inf with sign 0; a non-finite result
    NaN when ``poisoned`` (a zero weight on +inf or NaN: scipy's fallback sums b * exp(x))."""
    sg = 1.0 if s > 0.0 else (-1.0 if s < 0.0 else (0.0 if s == 0.0 else s))
    a = abs(s)
    if m != m:
        r = m
    elif math.isinf(m):
        r = m if m < 0.0 else (math.log(a) if a == a else a)
    else:
        r = m + (math.log(a) if a != 0.0 else -math.inf)
    if sg < 0.0 and not signed:
        r = math.nan
    if poisoned and (math.isinf(r) or r != r):
        r = math.nan
        sg = math.nan
    return r, sg


# ---------------------------------------------------------------------------------------------
# Grid loops and block reductions, shared by every kernel
# ---------------------------------------------------------------------------------------------
@cuda.jit(device=True)
def _thread_range():
    """(first item, step) of a grid-stride loop with one thread per item (64-bit)."""
    return (_i8(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x,
            _i8(cuda.gridDim.x) * cuda.blockDim.x)


@cuda.jit(device=True)
def _block_range():
    """(first item, step) of a grid-stride loop with one block per item (a row)."""
    return _i8(cuda.blockIdx.x), _i8(cuda.gridDim.x)


def _block_tree(merge):
    """A device function ``reduce(sh, tid, bd)`` folding the block's bd shared-memory slots
    (``sh``, a tuple of shared arrays, one slot per thread) into slot 0 by a fixed-order tree
    (deterministic, no warp shuffles: the simulator has none); ``merge(sh, i, o)`` folds slot o
    into slot i.  It synchronises before (the threads' writes) and after each step."""

    @cuda.jit(device=True)
    def reduce(sh, tid, bd):
        cuda.syncthreads()
        stride = bd // 2
        while stride > 0:
            if tid < stride:
                merge(sh, tid, tid + stride)
            cuda.syncthreads()
            stride //= 2
    return reduce


@cuda.jit(device=True)
def _fold_online(sh_m, sh_s, sh_n, i, o):
    """Slot i absorbs slot o's online softmax (max, sum of exp(v - max), NaN flag); returns
    both maxima before the merge and the merged one (what _dev_merge needs)."""
    m1 = sh_m[i]
    m2 = sh_m[o]
    m, s = _combine(m1, sh_s[i], m2, sh_s[o])
    sh_m[i] = m
    sh_s[i] = s
    sh_n[i] = sh_n[i] | sh_n[o]
    return m1, m2, m


@cuda.jit(device=True)
def _merge_lse(sh, i, o):
    """sh = (max, sum, NaN flag)."""
    _fold_online(sh[0], sh[1], sh[2], i, o)


@cuda.jit(device=True)
def _merge_index(sh, i, o):
    """sh = (max, sum, NaN flag, dev, q_fin of _dev_step, argmax value, argmax class)."""
    sh_m, sh_s, sh_n, sh_d, sh_q, sh_r, sh_i = sh
    m1, m2, m = _fold_online(sh_m, sh_s, sh_n, i, o)
    sh_d[i], sh_q[i] = _dev_merge(m1, sh_d[i], sh_q[i], m2, sh_d[o], sh_q[o], m)
    if sh_r[o] > sh_r[i] or (sh_r[o] == sh_r[i] and sh_i[o] < sh_i[i]):   # first maximum
        sh_r[i] = sh_r[o]
        sh_i[i] = sh_i[o]


@cuda.jit(device=True)
def _merge_prob(sh, i, o):
    """sh = (max, sum, NaN flag, dev, q_fin of _dev_step, sum of the weights q)."""
    sh_m, sh_s, sh_n, sh_d, sh_q, sh_a = sh
    m1, m2, m = _fold_online(sh_m, sh_s, sh_n, i, o)
    sh_d[i], sh_q[i] = _dev_merge(m1, sh_d[i], sh_q[i], m2, sh_d[o], sh_q[o], m)
    sh_a[i] = sh_a[i] + sh_a[o]


@cuda.jit(device=True)
def _merge_sum(sh, i, o):
    sh[0][i] = sh[0][i] + sh[0][o]


@cuda.jit(device=True)
def _merge_stats(sh, i, o):
    """sh = (sum of w[t], count, first bad position)."""
    sh_d, sh_c, sh_b = sh
    sh_d[i] = sh_d[i] + sh_d[o]
    sh_c[i] = sh_c[i] + sh_c[o]
    if sh_b[o] < sh_b[i]:
        sh_b[i] = sh_b[o]


_tree_lse = _block_tree(_merge_lse)
_tree_index = _block_tree(_merge_index)
_tree_prob = _block_tree(_merge_prob)
_tree_sum = _block_tree(_merge_sum)
_tree_stats = _block_tree(_merge_stats)


# ---------------------------------------------------------------------------------------------
# Loss kernels, one set per compute dtype F (float32 or float64)
# ---------------------------------------------------------------------------------------------
# The options arrive as typed scalars named as LossOptions' fields (scalar kernel arguments are
# the portable kind); the kernels rebuild a LossOptions, the fields a kernel does not take at
# their defaults, so the device functions read every option by name.
@cuda.jit(device=True)
def _index_options(keep, smooth_c, weight_sum, softcap, grad_scale, z_grad, z_loss, want_hits):
    return LossOptions(keep, smooth_c, weight_sum, softcap, grad_scale, z_grad, z_loss, False,
                       want_hits)


@cuda.jit(device=True)
def _prob_options(keep, smooth_c, softcap, grad_scale, z_grad, z_loss):
    return LossOptions(keep, smooth_c, 0.0, softcap, grad_scale, z_grad, z_loss, False, False)


@cuda.jit(device=True)
def _prob_finish(m, ssum, nan, A, qd, o, want_grad, g, gi, n, s, ce_out, zl_out, lse_out):
    """Writes element (n, s)'s loss terms (and its lse, unless lse_out is empty) from its
    float64 row state; returns the gradient's (scale, beta): dL/dx_c = (exp(x_c - m) scale -
    beta q_c) (times the softcap factor)."""
    lse, r = _finish_lse_r(m, ssum, nan)
    rl = lse if nan != 0 else _reported_lse(lse, m)
    if lse_out.shape[0]:
        lse_out[n, s] = rl
    zl_out[n, s] = _z_term(rl, o.z_loss)
    ce_out[n, s] = _prob_loss(r, A, qd)
    scale = 0.0
    beta = 0.0
    if want_grad:
        alpha, beta = _prob_grad_coefs(g[gi], lse, A, o.grad_scale, o.z_grad)
        scale = alpha / ssum
        if lse != lse:          # NaN element: poison its gradient, as on the CPU
            scale = lse
    return scale, beta


@functools.lru_cache(maxsize=None)
def _bf16_kernels():
    """The index kernels reading bfloat16 logits and writing a bfloat16 gradient (computed in
    float32): ({name: kernel}, {name: Python function}).  The other kernels get float32
    copies."""
    fns = _index_kernels(np.float32, bf16=True)
    return {k: _kernel(f) for k, f in fns.items()}, fns


@functools.lru_cache(maxsize=None)
def _kernels(F):
    """Compile (lazily, once per dtype signature) the loss and softmax kernels computing in
    dtype F: ({name: kernel}, {name: Python function})."""
    fns = {**_index_kernels(F), **_prob_kernels(F), **_softmax_kernels(F)}
    return {k: _kernel(f) for k, f in fns.items()}, fns


@functools.lru_cache(maxsize=None)
def _steps(F):
    """(online, capped, cap_consts): the per-logit steps in dtype F (F's constants keep float32
    arithmetic in float32)."""

    @cuda.jit(device=True)
    def online(m, s, v):
        """Add logit v to the running (max m, sum s); NaN and -inf logits are skipped."""
        if v > m:
            s = s * math.exp(m - v) + F(1.0)
            m = v
        elif v > F(-math.inf):
            s = s + math.exp(v - m)
        return m, s

    @cuda.jit(device=True)
    def capped(v, has_cap, capf, inv_capf):
        if has_cap:
            return capf * math.tanh(v * inv_capf)
        return v

    @cuda.jit(device=True)
    def cap_consts(cap):
        """(has_cap, 1/cap in float64, cap and 1/cap in F); 1/cap is 0 without a cap."""
        has_cap = cap > 0.0
        inv_cap = 1.0 / cap if has_cap else 0.0
        return has_cap, inv_cap, F(cap), F(inv_cap)

    return online, capped, cap_consts


@functools.lru_cache(maxsize=None)
def _index_steps(F, bf16=False):
    """(row_start, row_step, index_finish, grad_value): index-target math of one element in
    dtype F (logits read as bfloat16 bits when ``bf16``)."""
    online, capped, cap_consts = _steps(F)
    load, _ = _io(bf16)

    @cuda.jit(device=True)
    def row_start(C):
        """The empty row state: (max, sum, dev, q_fin, argmax value, argmax class, NaN seen)."""
        return F(-math.inf), F(0.0), F(0.0), F(0.0), F(-math.inf), _i8(C), 0

    @cuda.jit(device=True)
    def row_step(v, c, w, m, ssum, wd, wq, mr, ir, nan, C, has_cap, has_smooth, capf,
                 inv_capf):
        """Add logit v of class c to a thread's running row state."""
        if v != v:
            nan = 1
        else:
            if v > mr or ir == C:
                mr = v
                ir = c
            sv = capped(v, has_cap, capf, inv_capf)
            m_old = m
            m, ssum = online(m, ssum, sv)
            if has_smooth:
                wd, wq = _dev_step(m_old, m, wd, wq, sv, w[c])
        return m, ssum, wd, wq, mr, ir, nan

    @cuda.jit(device=True)
    def index_finish(x, n, s, t, w, o, ignore_index, want_grad, g, gi, m, ssum, nan, wdev,
                     ir, C, ce_out, zl_out, hit_out, lse_out):
        """Per-element outputs of one element (its lse too, unless lse_out is empty); returns
        (target, scale, gamma, beta) for the gradient (target -1 where ignored).  x is
        (N, C, S) and the element is (n, s)."""
        has_cap, inv_cap, capf, inv_capf = cap_consts(o.softcap)
        lse, r = _finish_lse_r(m, ssum, nan)
        rl = lse if nan != 0 else _reported_lse(lse, m)
        if lse_out.shape[0]:
            lse_out[n, s] = rl
        ti = _i8(t[n, s])
        if ti == ignore_index or ti < 0 or ti >= C:
            # A bad target (only reached with check_targets=False): nan loss terms, and
            # BAD_ROW tells the caller to fill the gradient row with nan.
            bad = ti != ignore_index
            ce_out[n, s] = math.nan if bad else 0.0
            zl_out[n, s] = math.nan if bad else 0.0
            hit_out[n, s] = 0
            return _i8(BAD_ROW if bad else IGNORED_ROW), 0.0, 0.0, 0.0
        w_t = _f8(w[ti])
        s_t = _f8(capped(load(x[n, ti, s]), has_cap, capf, inv_capf))
        ce_out[n, s] = _index_loss(r, m - s_t, w_t, o.weight_sum, wdev, o.keep, o.smooth_c)
        zl_out[n, s] = _z_term(rl, o.z_loss)
        hit_out[n, s] = 1 if (nan == 0 and ir == ti) else 0
        scale = 0.0
        gamma = 0.0
        beta = 0.0
        if want_grad:
            alpha, beta, gamma = _index_grad_coefs(g[gi], lse, w_t, o.weight_sum, o.keep,
                                                   o.smooth_c, o.grad_scale, o.z_grad)
            scale = alpha / ssum
            if lse != lse:          # NaN element: poison its gradient, as on the CPU
                scale = lse
            if has_cap:
                beta = beta * _softcap_grad_factor(s_t, inv_cap)
        return ti, scale, gamma, beta

    @cuda.jit(device=True)
    def grad_value(v, c, ti, ms, scale_f, gamma_f, beta_f, w, has_cap, has_smooth, capf,
                   inv_capf):
        """dL/dx of class c (w[c] its weight, read only when smoothing needs it)."""
        sv = capped(v, has_cap, capf, inv_capf)
        e = math.exp(sv - ms)
        if has_cap:
            q = sv * inv_capf
            gw = gamma_f * w[c] if has_smooth else F(0.0)
            r = (e * scale_f - gw) * (F(1.0) - q * q)
        elif has_smooth:
            r = e * scale_f - gamma_f * w[c]
        else:
            r = e * scale_f
        if c == ti:
            r -= beta_f
        return r

    return row_start, row_step, index_finish, grad_value


@functools.lru_cache(maxsize=None)
def _index_row_passes(F, bf16=False):
    """(row_share, row_grad): a thread's two passes over its share of a row in index_rows."""
    row_start, row_step, _, grad_value = _index_steps(F, bf16)
    load, store = _io(bf16)

    @cuda.jit(device=True)
    def row_share(x, row, w, C, tid, bd, has_cap, has_smooth, capf, inv_capf):
        """A thread's running state over its strided share c = tid, tid + bd, ... of a row."""
        m, ssum, wd, wq, mr, ir, nan = row_start(C)
        c = _i8(tid)
        # Four independent loads in flight per thread, then the updates in class order.
        while c + 3 * bd < C:
            v0 = load(x[row, c, 0])
            v1 = load(x[row, c + bd, 0])
            v2 = load(x[row, c + 2 * bd, 0])
            v3 = load(x[row, c + 3 * bd, 0])
            m, ssum, wd, wq, mr, ir, nan = row_step(v0, c, w, m, ssum, wd, wq, mr, ir, nan, C,
                                                    has_cap, has_smooth, capf, inv_capf)
            m, ssum, wd, wq, mr, ir, nan = row_step(v1, c + bd, w, m, ssum, wd, wq, mr, ir, nan,
                                                    C, has_cap, has_smooth, capf, inv_capf)
            m, ssum, wd, wq, mr, ir, nan = row_step(v2, c + 2 * bd, w, m, ssum, wd, wq, mr, ir,
                                                    nan, C, has_cap, has_smooth, capf, inv_capf)
            m, ssum, wd, wq, mr, ir, nan = row_step(v3, c + 3 * bd, w, m, ssum, wd, wq, mr, ir,
                                                    nan, C, has_cap, has_smooth, capf, inv_capf)
            c += 4 * bd
        while c < C:
            m, ssum, wd, wq, mr, ir, nan = row_step(load(x[row, c, 0]), c, w, m, ssum, wd, wq,
                                                    mr, ir, nan, C, has_cap, has_smooth, capf,
                                                    inv_capf)
            c += bd
        return m, ssum, wd, wq, mr, ir, nan

    @cuda.jit(device=True)
    def row_grad(x, w, row, ti, ms, scale_f, gamma_f, beta_f, grad, C, tid, bd, has_cap,
                 has_smooth, capf, inv_capf):
        """Write a row's gradient over the thread's share (zeros for an ignored target, nan
        for a bad one)."""
        c = _i8(tid)
        if ti < 0:
            fill = store(F(0.0) if ti == IGNORED_ROW else F(math.nan))
            while c < C:
                grad[row, c, 0] = fill
                c += bd
        while c + bd < C:           # two loads in flight per thread
            v0 = load(x[row, c, 0])
            v1 = load(x[row, c + bd, 0])
            grad[row, c, 0] = store(grad_value(v0, c, ti, ms, scale_f, gamma_f, beta_f, w,
                                               has_cap, has_smooth, capf, inv_capf))
            grad[row, c + bd, 0] = store(grad_value(v1, c + bd, ti, ms, scale_f, gamma_f,
                                                    beta_f, w, has_cap, has_smooth, capf,
                                                    inv_capf))
            c += 2 * bd
        while c < C:
            grad[row, c, 0] = store(grad_value(load(x[row, c, 0]), c, ti, ms, scale_f, gamma_f,
                                               beta_f, w, has_cap, has_smooth, capf, inv_capf))
            c += bd

    return row_share, row_grad


def _index_kernels(F, bf16=False):
    """index_rows (S == 1, C > SMALL_C: one block per row) and index_strided (one thread per
    (n, s)).  Arguments: x (N, C, S), targets t (N, S), class weights w, the LossOptions
    fields, den (float64 (2,): factors of grad_scale and z_grad, the mean's 1/D and 1/Dz when
    only the device knows them, else ones; a third entry: the weights' sum, which then
    replaces weight_sum), ignore_index, want_grad, g (dL/dloss_i at
    g[i * g_stride]), grad (N, C, S) and the per-element outputs ce, z-loss, hit (N, S).
    ``bf16``: x and grad are bfloat16 bits (uint16), computed in F = float32."""
    row_start, row_step, index_finish, grad_value = _index_steps(F, bf16)
    _, _, cap_consts = _steps(F)
    row_share, row_grad = _index_row_passes(F, bf16)
    load, store = _io(bf16)

    def index_rows(x, t, w, keep, smooth_c, weight_sum, softcap, grad_scale, z_grad, z_loss,
                   want_hits, den, ignore_index, want_grad, g, g_stride, grad, ce_out, zl_out,
                   hit_out, lse_out):
        o = _index_options(keep, smooth_c, weight_sum if den.shape[0] < 3 else den[2], softcap,
                           grad_scale * den[0], z_grad * den[1], z_loss, want_hits)
        sh_m = cuda.shared.array(ROW_MAX, np.float64)
        sh_s = cuda.shared.array(ROW_MAX, np.float64)
        sh_n = cuda.shared.array(ROW_MAX, np.int32)
        sh_d = cuda.shared.array(ROW_MAX, np.float64)
        sh_q = cuda.shared.array(ROW_MAX, np.float64)
        sh_r = cuda.shared.array(ROW_MAX, np.float64)
        sh_i = cuda.shared.array(ROW_MAX, np.int64)
        sh_c = cuda.shared.array(3, np.float64)       # the row's (scale, gamma, beta)
        sh_t = cuda.shared.array(1, np.int64)         # and target (-1: ignored)
        C = x.shape[1]
        tid = cuda.threadIdx.x
        bd = cuda.blockDim.x
        has_cap, _, capf, inv_capf = cap_consts(softcap)
        has_smooth = smooth_c != 0.0
        row, step = _block_range()
        while row < x.shape[0]:
            (sh_m[tid], sh_s[tid], sh_d[tid], sh_q[tid], sh_r[tid], sh_i[tid],
             sh_n[tid]) = row_share(x, row, w, C, tid, bd, has_cap, has_smooth, capf, inv_capf)
            _tree_index((sh_m, sh_s, sh_n, sh_d, sh_q, sh_r, sh_i), tid, bd)
            if tid == 0:
                sh_t[0], sh_c[0], sh_c[1], sh_c[2] = index_finish(
                    x, row, 0, t, w, o, ignore_index, want_grad, g, row * g_stride, sh_m[0],
                    sh_s[0], sh_n[0], sh_d[0], sh_i[0], C, ce_out, zl_out, hit_out, lse_out)
            cuda.syncthreads()
            if want_grad:
                row_grad(x, w, row, sh_t[0], F(sh_m[0]), F(sh_c[0]), F(sh_c[1]), F(sh_c[2]),
                         grad, C, tid, bd, has_cap, has_smooth, capf, inv_capf)
            cuda.syncthreads()          # shared memory is reused by the next row
            row += step

    def index_strided(x, t, w, keep, smooth_c, weight_sum, softcap, grad_scale, z_grad, z_loss,
                      want_hits, den, ignore_index, want_grad, g, g_stride, grad, ce_out, zl_out,
                      hit_out, lse_out):
        o = _index_options(keep, smooth_c, weight_sum if den.shape[0] < 3 else den[2], softcap,
                           grad_scale * den[0], z_grad * den[1], z_loss, want_hits)
        C = x.shape[1]
        S = x.shape[2]
        has_cap, _, capf, inv_capf = cap_consts(softcap)
        has_smooth = smooth_c != 0.0
        total = _i8(x.shape[0]) * S
        pos, step = _thread_range()
        while pos < total:
            n = pos // S
            s = pos - n * S
            m, ssum, wd, wq, mr, ir, nan = row_start(C)
            for c in range(C):
                m, ssum, wd, wq, mr, ir, nan = row_step(load(x[n, c, s]), c, w, m, ssum, wd, wq,
                                                        mr, ir, nan, C, has_cap, has_smooth,
                                                        capf, inv_capf)
            ti, scale, gamma, beta = index_finish(
                x, n, s, t, w, o, ignore_index, want_grad, g, pos * g_stride, _f8(m),
                _f8(ssum), nan, _f8(wd), ir, C, ce_out, zl_out, hit_out, lse_out)
            if want_grad:
                for c in range(C):
                    if ti < 0:
                        grad[n, c, s] = store(F(0.0) if ti == IGNORED_ROW else F(math.nan))
                    else:
                        grad[n, c, s] = store(grad_value(load(x[n, c, s]), c, ti, m, F(scale),
                                                         F(gamma), F(beta), w, has_cap,
                                                         has_smooth, capf, inv_capf))
            pos += step

    return dict(index_rows=index_rows, index_strided=index_strided)


def _prob_kernels(F):
    """prob_rows (S == 1, C > SMALL_C: one block per row) and prob_elems (one thread per
    (n, s)) for probability targets p (N, C, S); arguments as the index kernels'."""
    online, capped, cap_consts = _steps(F)

    @cuda.jit(device=True)
    def prob_step(v, pv, wc, o, m, ssum, A, qd, qf, nan, has_cap, capf, inv_capf):
        """Add logit v (target probability pv, class weight wc) to the running state: the
        online softmax, A = sum of the weights q and _dev_step's (dev, q_fin)."""
        sv = capped(v, has_cap, capf, inv_capf)
        q = _prob_weight(_f8(pv), _f8(wc), o.keep, o.smooth_c)
        A += q
        if v != v:
            nan = 1
        else:
            m_old = m
            m, ssum = online(m, ssum, sv)
            qd, qf = _dev_step(_f8(m_old), _f8(m), qd, qf, _f8(sv), q)
        return m, ssum, A, qd, qf, nan

    @cuda.jit(device=True)
    def prob_grad(v, pv, wc, o, mf, scale, beta, has_cap, inv_cap, capf, inv_capf):
        """dL/dx of one class from the element's (scale, beta) of _prob_finish."""
        sv = capped(v, has_cap, capf, inv_capf)
        q = _prob_weight(_f8(pv), _f8(wc), o.keep, o.smooth_c)
        val = _f8(math.exp(sv - mf)) * scale - beta * q
        if has_cap:
            val *= _softcap_grad_factor(_f8(sv), inv_cap)
        return val

    def prob_elems(x, p, w, keep, smooth_c, softcap, grad_scale, z_grad, z_loss, want_grad, g,
                   g_stride, grad, ce_out, zl_out, lse_out):
        o = _prob_options(keep, smooth_c, softcap, grad_scale, z_grad, z_loss)
        C = x.shape[1]
        S = x.shape[2]
        has_cap, inv_cap, capf, inv_capf = cap_consts(softcap)
        total = _i8(x.shape[0]) * S
        pos, step = _thread_range()
        while pos < total:
            n = pos // S
            s = pos - n * S
            m, ssum, A, qd, qf, nan = F(-math.inf), F(0.0), 0.0, 0.0, 0.0, 0
            for c in range(C):
                m, ssum, A, qd, qf, nan = prob_step(x[n, c, s], p[n, c, s], w[c], o, m, ssum, A,
                                                    qd, qf, nan, has_cap, capf, inv_capf)
            scale, beta = _prob_finish(_f8(m), _f8(ssum), nan, A, qd, o, want_grad, g,
                                       pos * g_stride, n, s, ce_out, zl_out, lse_out)
            if want_grad:
                for c in range(C):
                    grad[n, c, s] = prob_grad(x[n, c, s], p[n, c, s], w[c], o, m, scale, beta,
                                              has_cap, inv_cap, capf, inv_capf)
            pos += step

    def prob_rows(x, p, w, keep, smooth_c, softcap, grad_scale, z_grad, z_loss, want_grad, g,
                  g_stride, grad, ce_out, zl_out, lse_out):
        o = _prob_options(keep, smooth_c, softcap, grad_scale, z_grad, z_loss)
        sh_m = cuda.shared.array(ROW_MAX, np.float64)
        sh_s = cuda.shared.array(ROW_MAX, np.float64)
        sh_n = cuda.shared.array(ROW_MAX, np.int32)
        sh_d = cuda.shared.array(ROW_MAX, np.float64)
        sh_q = cuda.shared.array(ROW_MAX, np.float64)
        sh_a = cuda.shared.array(ROW_MAX, np.float64)
        sh_c = cuda.shared.array(2, np.float64)       # the row's (scale, beta)
        C = x.shape[1]
        tid = cuda.threadIdx.x
        bd = cuda.blockDim.x
        has_cap, inv_cap, capf, inv_capf = cap_consts(softcap)
        row, step = _block_range()
        while row < x.shape[0]:
            m, ssum, A, qd, qf, nan = F(-math.inf), F(0.0), 0.0, 0.0, 0.0, 0
            c = _i8(tid)
            while c < C:
                m, ssum, A, qd, qf, nan = prob_step(x[row, c, 0], p[row, c, 0], w[c], o, m, ssum,
                                                    A, qd, qf, nan, has_cap, capf, inv_capf)
                c += bd
            sh_m[tid], sh_s[tid], sh_a[tid], sh_d[tid], sh_q[tid], sh_n[tid] = (m, ssum, A, qd,
                                                                                qf, nan)
            _tree_prob((sh_m, sh_s, sh_n, sh_d, sh_q, sh_a), tid, bd)
            if tid == 0:
                sh_c[0], sh_c[1] = _prob_finish(sh_m[0], sh_s[0], sh_n[0], sh_a[0], sh_d[0], o,
                                                want_grad, g, row * g_stride, row, 0, ce_out,
                                                zl_out, lse_out)
            cuda.syncthreads()
            if want_grad:
                mf = F(sh_m[0])
                c = _i8(tid)
                while c < C:
                    grad[row, c, 0] = prob_grad(x[row, c, 0], p[row, c, 0], w[c], o, mf,
                                                sh_c[0], sh_c[1], has_cap, inv_cap, capf,
                                                inv_capf)
                    c += bd
            cuda.syncthreads()          # shared memory is reused by the next row
            row += step

    return dict(prob_elems=prob_elems, prob_rows=prob_rows)


def _softmax_kernels(F):
    """softmax_rows (S == 1, C > SMALL_C: one block per row) and softmax_strided (one thread
    per (n, s)): x (N, C, S), mode 0 lse only, 1 log_softmax, 2 softmax into out (N, C, S), the
    lse into lse_out (N, S)."""
    online, _, _ = _steps(F)

    @cuda.jit(device=True)
    def softmax_out(x, n, c, s, mode, shift, logs, inv, out):
        v = x[n, c, s]
        if mode == 1:
            out[n, c, s] = (v - shift) - F(logs)     # not v - lse: no cancellation near max
        else:
            out[n, c, s] = math.exp(v - shift) * F(inv)

    @cuda.jit(device=True)
    def lse_step(v, m, ssum, nan):
        if v != v:
            nan = 1
        else:
            m, ssum = online(m, ssum, v)
        return m, ssum, nan

    def softmax_rows(x, mode, out, lse_out):
        sh_m = cuda.shared.array(ROW_MAX, np.float64)
        sh_s = cuda.shared.array(ROW_MAX, np.float64)
        sh_n = cuda.shared.array(ROW_MAX, np.int32)
        C = x.shape[1]
        tid = cuda.threadIdx.x
        bd = cuda.blockDim.x
        row, step = _block_range()
        while row < x.shape[0]:
            m, ssum, nan = F(-math.inf), F(0.0), 0
            c = _i8(tid)
            while c + 3 * bd < C:       # four loads in flight, updates in class order
                v0 = x[row, c, 0]
                v1 = x[row, c + bd, 0]
                v2 = x[row, c + 2 * bd, 0]
                v3 = x[row, c + 3 * bd, 0]
                m, ssum, nan = lse_step(v0, m, ssum, nan)
                m, ssum, nan = lse_step(v1, m, ssum, nan)
                m, ssum, nan = lse_step(v2, m, ssum, nan)
                m, ssum, nan = lse_step(v3, m, ssum, nan)
                c += 4 * bd
            while c < C:
                m, ssum, nan = lse_step(x[row, c, 0], m, ssum, nan)
                c += bd
            sh_m[tid], sh_s[tid], sh_n[tid] = m, ssum, nan
            _tree_lse((sh_m, sh_s, sh_n), tid, bd)
            lse, shift, logs, inv = _softmax_finish(sh_m[0], sh_s[0], sh_n[0])
            if tid == 0:
                lse_out[row, 0] = lse
            if mode != 0:
                c = _i8(tid)
                while c < C:
                    softmax_out(x, row, c, 0, mode, F(shift), logs, inv, out)
                    c += bd
            cuda.syncthreads()          # shared memory is reused by the next row
            row += step

    def softmax_strided(x, mode, out, lse_out):
        C = x.shape[1]
        S = x.shape[2]
        total = _i8(x.shape[0]) * S
        pos, step = _thread_range()
        while pos < total:
            n = pos // S
            s = pos - n * S
            m, ssum, nan = F(-math.inf), F(0.0), 0
            for c in range(C):
                m, ssum, nan = lse_step(x[n, c, s], m, ssum, nan)
            lse, shift, logs, inv = _softmax_finish(_f8(m), _f8(ssum), nan)
            lse_out[n, s] = lse
            if mode != 0:
                for c in range(C):
                    softmax_out(x, n, c, s, mode, F(shift), logs, inv, out)
            pos += step

    return dict(softmax_rows=softmax_rows, softmax_strided=softmax_strided)


# ---------------------------------------------------------------------------------------------
# Reductions and the target pre-pass (fixed-order two-stage, no atomics)
# ---------------------------------------------------------------------------------------------
@_kernel
def _k_sum(a, n, chunk, out):
    """out[b] = float64 sum of a[b*chunk : (b+1)*chunk] in a fixed order."""
    sh = cuda.shared.array(RED_T, np.float64)
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    lo = _i8(cuda.blockIdx.x) * chunk
    hi = lo + chunk if lo + chunk < n else n
    acc = 0.0
    i = lo + tid
    while i < hi:
        acc += _f8(a[i])
        i += bd
    sh[tid] = acc
    _tree_sum((sh,), tid, bd)
    if tid == 0:
        out[cuda.blockIdx.x] = sh[0]


@cuda.jit(device=True)
def _block_stats(d, cnt, bad, tid, bd):
    """The block's (sum of d, sum of cnt, min of bad) over its threads, by the fixed-order
    tree, in every thread."""
    sh_d = cuda.shared.array(RED_T, np.float64)
    sh_c = cuda.shared.array(RED_T, np.int64)
    sh_b = cuda.shared.array(RED_T, np.int64)
    sh_d[tid] = d
    sh_c[tid] = cnt
    sh_b[tid] = bad
    _tree_stats((sh_d, sh_c, sh_b), tid, bd)
    return sh_d[0], sh_c[0], sh_b[0]


@_kernel
def _k_stats(t, w, ignore_index, C, n, chunk, part_D, part_n, part_bad):
    """Per block: sum of w[t] and count over non-ignored targets, first bad position (or n)."""
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    lo = _i8(cuda.blockIdx.x) * chunk
    hi = lo + chunk if lo + chunk < n else n
    d = 0.0
    cnt = _i8(0)
    bad = _i8(n)
    i = lo + tid
    while i < hi:
        tj = _i8(t[i])
        if tj != ignore_index:
            if tj < 0 or tj >= C:
                if bad == n:
                    bad = i
            else:
                d += _f8(w[tj])
                cnt += 1
        i += bd
    d, cnt, bad = _block_stats(d, cnt, bad, tid, bd)
    if tid == 0:
        b = cuda.blockIdx.x
        part_D[b] = d
        part_n[b] = cnt
        part_bad[b] = bad


@_kernel
def _k_stats_merge(part_D, part_n, part_bad, out):
    """One block: out = (sum of part_D, sum of part_n, min of part_bad), _k_stats's partials
    folded in a fixed order (each thread its strided share, then the tree)."""
    tid = cuda.threadIdx.x
    bd = cuda.blockDim.x
    d = 0.0
    cnt = _i8(0)
    bad = _i8(part_bad[0])
    i = tid
    while i < part_D.shape[0]:
        d += part_D[i]
        cnt += _i8(part_n[i])
        if _i8(part_bad[i]) < bad:
            bad = _i8(part_bad[i])
        i += bd
    d, cnt, bad = _block_stats(d, cnt, bad, tid, bd)
    if tid == 0:
        out[0] = d
        out[1] = cnt
        out[2] = bad




# ---------------------------------------------------------------------------------------------
# Small element-wise kernels: copies and casts (any ndim, any strides), fill, finishing
# ---------------------------------------------------------------------------------------------
@_kernel
def _k_gather_nd(out, src, base, dims, strides):
    """out[i] = src[base + sum_k idx_k(i) * strides[k]], idx(i) the C-order index of i in
    ``dims``, cast to out's dtype on the store: casts, contiguous copies of strided arrays
    (negative strides included), transposed (permuted strides) and broadcast (stride 0)
    copies, of any number of dimensions."""
    n = out.shape[0]
    nd = dims.shape[0]
    i, step = _thread_range()
    while i < n:
        r = i
        off = base
        for k in range(nd - 1, -1, -1):
            d = dims[k]
            q = r // d
            off += (r - q * d) * strides[k]
            r = q
        out[i] = src[off]
        i += step


@_kernel
def _k_loss(ce_tot, zl_tot, has_z, mean, ieee, D, Dz, dev_den, out):
    """out[0] = ce_tot[0] (/ D for the mean, nan where D == 0 unless ``ieee``: then IEEE's
    x / 0) + zl_tot[0] (/ Dz for the mean) when has_z, cast to out's dtype on the store: the
    reduced loss (fastce.api._loss).  D (and Dz) are read from dev_den[0] (and dev_den[1])
    when it holds them."""
    if cuda.grid(1) == 0:
        if dev_den.shape[0] > 0:
            D = dev_den[0]
        if dev_den.shape[0] > 1:
            Dz = dev_den[1]
        value = ce_tot[0]
        if mean:
            value = value / D if (ieee or D != 0.0) else math.nan
        if has_z:
            z = zl_tot[0]
            value += z / Dz if mean else z
        out[0] = value


@cuda.jit(device=True)
def _inverse(d):
    """1 / d as fastce.options.ieee_div(1.0, d) gives it on the host (+inf for d == 0)."""
    return math.inf if d == 0.0 else 1.0 / d


@_kernel
def _k_grad_den(stats, mean, w_sum, out):
    """The index kernels' den when the host does not read the target statistics (D, count,
    ...): the mean's gradient factors (1 / D, 1 / Dz) (ones unless ``mean``), then, when
    out has a third entry, the weights' sum w_sum[0]."""
    if cuda.grid(1) == 0:
        out[0] = _inverse(stats[0]) if mean else 1.0
        out[1] = _inverse(stats[1]) if mean else 1.0
        if out.shape[0] > 2:
            out[2] = w_sum[0]


def _map_kernel(fn):
    """A grid-stride kernel out[i] = fn(src[i]) over flat arrays."""
    def k_map(out, src):
        i, step = _thread_range()
        while i < out.shape[0]:
            out[i] = fn(src[i])
            i += step
    return _kernel(k_map)


_k_widen_bf16 = _map_kernel(_load_bf16)      # float32 values of bfloat16 bits
_k_narrow_bf16 = _map_kernel(_store_bf16)    # bfloat16 bits, rounded to nearest even


@_kernel
def _k_fill(out, value):
    i, step = _thread_range()
    while i < out.shape[0]:
        out[i] = value
        i += step


@_kernel
def _k_add(out, a, b):
    """out = a + b (float64), cast to out's dtype: the unreduced loss ce + z-loss."""
    i, step = _thread_range()
    while i < out.shape[0]:
        out[i] = a[i] + b[i]
        i += step


@_kernel
def _k_nll(out, x, t, w, ignore_index):
    """out[n, s] = -w[t] * x[n, t, s] in float64 (0 where t == ignore_index; nan for a bad t,
    met only with check_targets=False): nll_loss."""
    N = x.shape[0]
    C = x.shape[1]
    S = x.shape[2]
    i, step = _thread_range()
    while i < _i8(N) * S:
        n = i // S
        s = i - n * S
        c = _i8(t[n, s])
        if c == ignore_index:
            out[n, s] = 0.0
        elif c < 0 or c >= C:
            out[n, s] = math.nan
        else:
            out[n, s] = -_f8(w[c]) * _f8(x[n, c, s])
        i += step


@_kernel
def _k_lse_sign(out, lse):
    """SciPy's sign of an unweighted logsumexp: 0 for -inf, NaN for NaN, else 1."""
    i, step = _thread_range()
    while i < out.shape[0]:
        v = lse[i]
        out[i] = 0.0 if v == -math.inf else (math.nan if v != v else 1.0)
        i += step


@_kernel
def _k_lse_weighted(x, b, signed, lse_out, sgn_out):
    """scipy's logsumexp(x, b=b) of each row of x (N, C), b (N, C) float64: one thread per
    row, in float64; entries with b == 0 are skipped (even inf or NaN ones)."""
    N = x.shape[0]
    C = x.shape[1]
    i, step = _thread_range()
    while i < N:
        m = -math.inf
        nan = False
        poisoned = False
        for c in range(C):
            v = _f8(x[i, c])
            if b[i, c] != 0.0:
                if v != v:
                    nan = True
                elif v > m:
                    m = v
            elif not v < math.inf:
                poisoned = True
        s = 0.0
        if nan:
            m = math.nan
            s = math.nan
        elif m == math.inf:
            for c in range(C):
                if b[i, c] != 0.0 and x[i, c] == math.inf:
                    s += b[i, c] * math.inf
        elif m > -math.inf:
            for c in range(C):
                bv = b[i, c]
                if bv != 0.0:
                    s += bv * math.exp(_f8(x[i, c]) - m)
        r, sg = _signed_finish(m, s, signed, poisoned)
        lse_out[i] = r
        sgn_out[i] = sg
        i += step


# ---------------------------------------------------------------------------------------------
# Launch configurations (cached per shape class) and allocation
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _max_blocks():
    if SIM:
        return 64
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT) * 32
    except Exception:
        return 4096


@functools.lru_cache(maxsize=1024)
def _elem_cfg(n):
    """(blocks, threads) of a grid-stride launch over n items."""
    return max(1, min(-(-n // ELEM_T), _max_blocks())), ELEM_T


def _launch(kernel, n, *args):
    """A grid-stride launch of ``kernel`` over n items (none when n is 0)."""
    if n:
        blocks, threads = _elem_cfg(n)
        kernel[blocks, threads, _stream()](*args)


@functools.lru_cache(maxsize=1024)
def _row_cfg(N, C):
    """(blocks, threads) of the row kernels: about 8+ classes per thread, a power of 2."""
    threads = 32
    while threads * 8 < C and threads < ROW_MAX:
        threads *= 2
    return max(1, min(N, MAX_GRID)), threads


@functools.lru_cache(maxsize=1024)
def _red_cfg(n):
    nblocks = max(1, min(-(-n // RED_T), RED_BLOCKS))
    return nblocks, max(1, -(-n // nblocks))


@functools.lru_cache(maxsize=None)
def _cupy():
    """CuPy when it is installed and a device is present (never under the simulator)."""
    if SIM:
        return None
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Streams (see the module docstring): the handles are those of __cuda_array_interface__ v3
# ---------------------------------------------------------------------------------------------
LEGACY_STREAM, PER_THREAD_STREAM = 1, 2     # the interface's names of the two default streams


def _stream_handle():
    """The handle of the stream the current call runs on: CuPy's current stream (its null
    stream, pointer 0, is the legacy default stream), else Numba's default stream."""
    cp = _cupy()
    if cp is not None:
        return cp.cuda.get_current_stream().ptr or LEGACY_STREAM
    return PER_THREAD_STREAM if config.CUDA_PER_THREAD_DEFAULT_STREAM else LEGACY_STREAM


def _stream():
    """Numba's stream object for the current call (launches, copies, event waits)."""
    return _numba_stream(_device_id(), _stream_handle())


@functools.lru_cache(maxsize=64)
def _numba_stream(device, handle):
    """Numba's view of stream ``handle`` on ``device`` (it does not own the stream); the
    simulator's one stream there."""
    if SIM:
        return _SIM_STREAM
    if handle == LEGACY_STREAM:
        return cuda.legacy_default_stream()
    if handle == PER_THREAD_STREAM:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


_SIM_STREAM = cuda.stream() if SIM else None


def _wait_for_producer(handle):
    """Order the call's stream after the work queued on stream ``handle`` (an argument's
    interface: None means none is pending), with an event on the device: the host never
    waits."""
    if handle is None or handle == _stream_handle():
        return
    event = cuda.event(timing=False)
    event.record(stream=_numba_stream(_device_id(), int(handle)))
    event.wait(stream=_stream())


def _host_copy(d):
    """``d`` as a NumPy array, once the call's stream has written it."""
    stream = _stream()
    host = d.copy_to_host(stream=stream)
    stream.synchronize()
    return host


def _shape(shape):
    return tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))


def _alloc(shape, dtype):
    """A C-contiguous Numba device array (memory from CuPy's pool when CuPy is available;
    the Numba array keeps the CuPy one alive)."""
    shape = _shape(shape)
    dtype = np.dtype(dtype)
    if bf.is_bfloat16(dtype):       # (neither CuPy nor Numba has the type: its bits, viewed)
        return _alloc(shape, np.uint16).view(dtype)
    cp = _cupy()
    if cp is not None and math.prod(shape) > 0:     # CuPy's pool, on the current stream
        return cuda.as_cuda_array(cp.empty(shape, dtype), sync=False)
    return cuda.device_array(shape, dtype, stream=_stream())


def _to_dev(host):
    """A device copy of a host array (CuPy's pool when CuPy is available)."""
    host = np.asarray(host)
    cp = _cupy()
    if cp is not None and host.size > 0:
        return cuda.as_cuda_array(cp.asarray(host), sync=False)
    return cuda.to_device(host, stream=_stream())


def _is_numba_array(a):
    return bool(getattr(a, "__cuda_ndarray__", False))


def _flat(d):
    """The 1-D view of a C-contiguous device array (for the flat kernels)."""
    return d.reshape(d.size)


def _c_strides(shape):
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return st[::-1]


@functools.lru_cache(maxsize=1024)
def _geometry(dims, strides, device):
    """_k_gather_nd's (dims, strides) on the device, uploaded once per shape (and complete
    before any stream reads them)."""
    arrays = _to_dev(np.array(dims, np.int64)), _to_dev(np.array(strides, np.int64))
    _stream().synchronize()
    return arrays


class _Span:
    """The memory under a strided device array, as a flat array (for ``_k_gather_nd``)."""

    def __init__(self, owner, ptr, n, typestr):
        self.owner = owner          # keeps the memory alive
        self.__cuda_array_interface__ = {"shape": (n,), "strides": None, "typestr": typestr,
                                         "data": (ptr, False), "version": 3}


def _source(d):
    """(flat, base, strides): ``d`` (size > 0, any strides) as a flat device array, the flat
    index of d's first element in it and d's strides in elements, for ``_k_gather_nd``."""
    shape = tuple(int(s) for s in d.shape)
    if d.is_c_contiguous():
        return _flat(d), 0, tuple(_c_strides(shape))
    itemsize = np.dtype(d.dtype).itemsize
    if SIM:
        byte_strides = d._ary.strides
    else:
        cai = d.__cuda_array_interface__
        byte_strides = cai["strides"]
    if any(s % itemsize for s in byte_strides):
        raise ValueError("fastce: CUDA arrays with strides that are not a multiple of the item "
                         "size are not supported; pass a contiguous array")
    st = tuple(s // itemsize for s in byte_strides)
    base = sum((n - 1) * -s for n, s in zip(shape, st) if s < 0)     # lowest address: 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(shape, st))
    if SIM:
        low = d._ary[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in st)]
        flat = type(d)(np.lib.stride_tricks.as_strided(low, (span,), (itemsize,)))
    else:
        ptr = cai["data"][0] - base * itemsize
        flat = cuda.as_cuda_array(_Span(d, ptr, span, cai["typestr"]), sync=False)
    return flat, base, st


def _gather(d, shape, strides_of, dtype):
    """A new C-contiguous array of ``shape`` and ``dtype`` read from ``d`` through
    ``strides_of(d's strides in elements)`` (see _k_gather_nd)."""
    out = _alloc(shape, dtype)
    n = math.prod(shape)
    if n:
        flat, base, st = _source(d)
        # A 0-d copy as one element of stride 0 (no zero-length geometry arrays).
        strides = tuple(strides_of(st)) or (0,)
        dims, stv = _geometry(tuple(shape) or (1,), strides, _device_id())
        _launch(_k_gather_nd, n, _flat(out), flat, _i8(base), dims, stv)
    return out


def _copy_as(d, dtype):
    """A C-contiguous copy of the device array ``d`` (any strides) in ``dtype``; bfloat16 is
    copied as its bits, widened to float32 or rounded from it."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in d.shape)
    if bf.is_bfloat16(d.dtype):
        bits = _gather(d.view(np.uint16), shape, lambda st: st, np.uint16)
        if bf.is_bfloat16(dtype):
            return bits.view(dtype)
        wide = _alloc(shape, np.float32)
        _launch(_k_widen_bf16, wide.size, _flat(wide), _flat(bits))
        return wide if dtype == np.float32 else _copy_as(wide, dtype)
    if bf.is_bfloat16(dtype):
        out = _alloc(shape, dtype)
        _narrow_into(d, out)
        return out
    return _gather(d, shape, lambda st: st, dtype)


def _bits(d):
    """A bfloat16 device array as its uint16 bits (zero-copy), what the kernels read."""
    return d.view(np.uint16) if bf.is_bfloat16(d.dtype) else d


def _narrow_into(src, out):
    """out (a C-contiguous bfloat16 array) = src's values rounded to bfloat16."""
    if src.dtype != np.float32 or not src.is_c_contiguous():
        src = _copy_as(src, np.float32)
    _launch(_k_narrow_bf16, out.size, _flat(_bits(out)), _flat(src))


# ---------------------------------------------------------------------------------------------
# Backend entry points used by fastce.api
# ---------------------------------------------------------------------------------------------
def _compute_kernels(dtype):
    F = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return _kernels(F)[0]


def target_stats(t2, w, ignore_index, C, on_device=False):
    """(D, count, bad_flat_position or -1) over the (N, S) integer targets ``t2``.

    One kernel writes per-block partials (sum of w[t], count, first bad position), a second
    folds them, both in a fixed order; the host reads the three numbers (the call's one copy
    back).  ``on_device``: no copy back; the (3,) float64 device array of the three numbers
    (the first bad position is t2.size when there is none)."""
    n = t2.size
    if n == 0:
        if on_device:
            return full((3,), 0.0, np.float64)
        return 0.0, 0, -1
    nblocks, chunk = _red_cfg(n)
    part = _alloc((3, nblocks), np.float64)
    _k_stats[nblocks, RED_T, _stream()](_flat(t2), _flat(w), _i8(ignore_index), _i8(C), _i8(n),
                                        _i8(chunk), part[0], part[1], part[2])
    if nblocks > 1 or on_device:
        folded = _alloc((3,), np.float64)
        _k_stats_merge[1, RED_T, _stream()](part[0], part[1], part[2], folded)
        if on_device:
            return folded
        host = _host_copy(folded)
    else:
        host = _host_copy(part)[:, 0]
    bad = int(host[2])
    return float(host[0]), int(host[1]), (bad if bad < n else -1)


def grad_den(stats, mean, w_sum=None):
    """The index kernels' ``den`` from target_stats(..., on_device=True): the mean's factors
    (ones unless ``mean``), and the weights' sum ``w_sum`` ((1,) on the device) if given."""
    out = _alloc((2 if w_sum is None else 3,), np.float64)
    _k_grad_den[1, 1, _stream()](stats, bool(mean), _no_den() if w_sum is None else w_sum,
                                 out)
    return out


def _total_dev(a):
    """The deterministic float64 sum of the device array ``a`` (size > 0), left on the device
    as a (1,) array: a fixed-order two-stage reduction."""
    n = a.size
    nblocks, chunk = _red_cfg(n)
    part = _alloc((nblocks,), np.float64)
    _k_sum[nblocks, RED_T, _stream()](_flat(a), _i8(n), _i8(chunk), part)
    if nblocks > 1:
        one = _alloc((1,), np.float64)
        _k_sum[1, RED_T, _stream()](part, _i8(nblocks), _i8(nblocks), one)
        part = one
    return part


def total(a) -> float:
    """Deterministic float64 sum: fixed-order two-stage reduction."""
    a = BACKEND.asarray(a)
    if a.size == 0:
        return 0.0
    return float(_host_copy(_total_dev(a))[0])


def reduce_loss(ce, zl, mean, D, Dz, dtype, dev_den=None, ieee=False):
    """The reduced loss (see fastce.backend), computed and kept on the device: the totals of
    ``total`` and the divisions of the host's ``options.mean_div`` / ``ieee_div`` (IEEE
    division on the device; ``ieee``: the mean's too), in one single-thread kernel, written
    as a 0-d array.  ``dev_den``: a float64 device array holding D (and Dz) instead of the
    host's numbers."""
    out = _alloc((), dtype)
    ce_tot = _total_dev(ce)
    zl_tot = _total_dev(zl) if zl is not None else ce_tot
    if dev_den is None:
        dev_den = _no_den()
    else:
        D = Dz = 0.0
    _k_loss[1, 1, _stream()](ce_tot, zl_tot, zl is not None, bool(mean), bool(ieee), _f8(D),
                             _f8(Dz), dev_den, _flat(out))
    return out


def _index_scalars(o):
    """The LossOptions fields the index kernels take, in their parameter order (typed: a
    kernel is compiled once per argument types)."""
    return (float(o.keep), float(o.smooth_c), float(o.weight_sum), float(o.softcap),
            float(o.grad_scale), float(o.z_grad), float(o.z_loss), bool(o.want_hits))


def _prob_scalars(o):
    """The LossOptions fields the probability kernels take, in their parameter order."""
    return (float(o.keep), float(o.smooth_c), float(o.softcap), float(o.grad_scale),
            float(o.z_grad), float(o.z_loss))


def index_loss(x3, t2, w, opts, ignore_index, grad, g, g_stride, per_position=True,
               fuse_stats=False, lse_out=None, den=None):
    """(ce, z-loss, hit, None): per-element arrays (N, S) (whatever ``per_position``); fills
    ``grad`` (N, C, S) and ``lse_out`` (N, S) when given.  The targets are validated by
    ``target_stats`` beforehand (``fuse_stats`` is not supported here: fuses_target_stats is
    False), or not at all (check_targets=False: a bad target's loss terms and gradient row are
    nan).  den: grad_den's factors of opts' grad_scale and z_grad (None: ones), and maybe
    the weights' sum."""
    if fuse_stats:
        raise NotImplementedError("fastce.gpu: the target statistics come from target_stats")
    N, C, S = x3.shape
    if bf.is_bfloat16(x3.dtype) and grad is not None and not bf.is_bfloat16(grad.dtype):
        # bfloat16 logits into a float32 gradient (out=): through a float32 copy
        return index_loss(_copy_as(x3, np.float32), t2, w, opts, ignore_index, grad, g,
                          g_stride, per_position, fuse_stats, lse_out, den)
    ce = _alloc((N, S), np.float64)
    zl = _alloc((N, S), np.float64)
    hit = _alloc((N, S), np.uint8)
    if N * S == 0:
        return ce, zl, hit, None
    want = grad is not None
    gbuf = _bits(grad) if want else _alloc((1, 1, 1), _bits(x3).dtype)
    ks = _bf16_kernels()[0] if bf.is_bfloat16(x3.dtype) else _compute_kernels(x3.dtype)
    x3 = _bits(x3)
    if den is None:
        den = _cached_ones((2,), "<f8", _device_id())
    args = (x3, t2, w, *_index_scalars(opts), den, _i8(ignore_index), want, g, _i8(g_stride),
            gbuf, ce, zl, hit, _no_lse() if lse_out is None else lse_out)
    if S == 1 and C > SMALL_C:
        blocks, threads = _row_cfg(N, C)
        ks["index_rows"][blocks, threads, _stream()](*args)
    else:
        blocks, threads = _elem_cfg(N * S)
        ks["index_strided"][blocks, threads, _stream()](*args)
    return ce, zl, hit, None


def prob_loss(x3, p3, w, opts, grad, g, g_stride, lse_out=None):
    if bf.is_bfloat16(x3.dtype):        # through a float32 copy of the logits and gradient
        gf = grad
        if grad is not None and bf.is_bfloat16(grad.dtype):
            gf = _alloc(grad.shape, np.float32)
        out = prob_loss(_copy_as(x3, np.float32), p3, w, opts, gf, g, g_stride, lse_out)
        if gf is not grad:
            _narrow_into(gf, grad)
        return out
    N, C, S = x3.shape
    ce = _alloc((N, S), np.float64)
    zl = _alloc((N, S), np.float64)
    if N * S == 0:
        return ce, zl
    want = grad is not None
    gbuf = grad if want else _alloc((1, 1, 1), x3.dtype)
    if S == 1 and C > SMALL_C:
        name, (blocks, threads) = "prob_rows", _row_cfg(N, C)
    else:
        name, (blocks, threads) = "prob_elems", _elem_cfg(N * S)
    _compute_kernels(x3.dtype)[name][blocks, threads, _stream()](
        x3, p3, w, *_prob_scalars(opts), want, g, _i8(g_stride), gbuf, ce, zl,
        _no_lse() if lse_out is None else lse_out)
    return ce, zl


def _no_lse():
    """The empty (0, 0) lse_out of a call that does not want the lse."""
    return _alloc((0, 0), np.float64)


def _no_den():
    """The empty dev_den of _k_loss: the denominators are its scalar arguments."""
    return _alloc((0,), np.float64)


def softmax_family(x3, mode):
    """mode 0: lse (N, S); 1: (log_softmax, lse); 2: (softmax, lse)."""
    N, C, S = x3.shape
    lse = _alloc((N, S), np.float64)
    out = _alloc(x3.shape if mode else (1, 1, 1), x3.dtype)
    if N * S == 0:
        return out, lse
    ks = _compute_kernels(x3.dtype)
    if S == 1 and C > SMALL_C:
        blocks, threads = _row_cfg(N, C)
        ks["softmax_rows"][blocks, threads, _stream()](x3, _i8(mode), out, lse)
    else:
        blocks, threads = _elem_cfg(N * S)
        ks["softmax_strided"][blocks, threads, _stream()](x3, _i8(mode), out, lse)
    return out, lse


def lse_weighted(x2, b2, signed):
    """scipy's logsumexp(x, b=b) of each row of x2 (N, C), b2 (N, C) float64: (lse, sign),
    (N,) float64 each; a negative sum gives NaN unless ``signed``."""
    N = x2.shape[0]
    lse = _alloc((N,), np.float64)
    sgn = _alloc((N,), np.float64)
    _launch(_k_lse_weighted, N, x2, b2, bool(signed), lse, sgn)
    return lse, sgn


def nll_loss(x3, t2, w, ignore_index):
    """Per-element -w[t] * x3[n, t, s] (0 where ignored), float64 (N, S)."""
    if bf.is_bfloat16(x3.dtype):
        x3 = _copy_as(x3, np.float32)
    N, _, S = x3.shape
    out = _alloc((N, S), np.float64)
    _launch(_k_nll, N * S, out, x3, t2, w, _i8(ignore_index))
    return out


def transpose_copy(x, perm):
    """A C-contiguous copy of x with its axes permuted."""
    x = BACKEND.asarray(x)
    shape = tuple(int(x.shape[p]) for p in perm)
    return _gather(x, shape, lambda st: (st[p] for p in perm), x.dtype)


def broadcast_copy(x, shape):
    """A C-contiguous copy of x broadcast to ``shape`` (NumPy's rules)."""
    x = BACKEND.asarray(x)
    shape = _shape(shape)
    pad = len(shape) - x.ndim
    xs = (1,) * pad + tuple(int(n) for n in x.shape)
    return _gather(x, shape, lambda st: (0 if xs[d] == 1 else ((0,) * pad + tuple(st))[d]
                                         for d in range(len(shape))), x.dtype)


def full(shape, value, dtype):
    """A new device array of ``shape`` filled with ``value``."""
    out = _alloc(shape, dtype)
    _launch(_k_fill, out.size, _flat(out), np.dtype(dtype).type(value))
    return out


@functools.lru_cache(maxsize=None)
def _scalar_class(base):
    """``base`` (a Numba device array class) plus float()/int()/item() for 0-d losses."""
    def item(self):
        return _host_copy(self).reshape(-1)[0].item()
    ns = {"__float__": lambda self: float(item(self)), "__int__": lambda self: int(item(self)),
          "item": item}
    return type(base.__name__, (base,), ns)


def _device_id():
    """The current CUDA device (the caches of ones and geometries are per device)."""
    cp = _cupy()
    if cp is not None:
        return cp.cuda.runtime.getDevice()
    if SIM:
        return 0
    return cuda.get_current_device().id


ONES_CACHE_BYTES = 1 << 20      # larger arrays of ones are made per call, not kept


def _ones(shape, dtype, device):
    if math.prod(shape) * np.dtype(dtype).itemsize > ONES_CACHE_BYTES:
        return full(shape, 1, dtype)
    return _cached_ones(shape, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_ones(shape, dtype, device):
    ones = full(shape, 1, dtype)
    _stream().synchronize()         # complete before calls on other streams read it
    return ones


def _is_writeable_c_contiguous(a):
    """Probe a caller's CUDA array of any type (CuPy, Numba, __cuda_array_interface__)."""
    flags = getattr(a, "flags", None)
    if flags is not None and hasattr(flags, "c_contiguous"):       # CuPy
        return bool(flags.c_contiguous) and bool(getattr(flags, "writeable", True))
    if hasattr(a, "is_c_contiguous"):                               # Numba device arrays
        return bool(a.is_c_contiguous())
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        strides, shape = cai.get("strides"), cai["shape"]
        if strides is None:
            return True
        itemsize = np.dtype(cai["typestr"]).itemsize
        expected = []
        for n in reversed(shape):
            expected.append(itemsize)
            itemsize *= n
        return tuple(strides) == tuple(reversed(expected)) or math.prod(shape) <= 1
    return False


class GPUBackend:
    """The ``fastce.backend.Backend`` protocol for CUDA arrays: its arrays are Numba device
    arrays (zero-copy views of CuPy and other ``__cuda_array_interface__`` arrays)."""

    array_kind = "a CUDA device array (CuPy, Numba or __cuda_array_interface__)"
    fuses_target_stats = False
    defers_target_stats = True      # check_targets=False: the statistics stay on the device
    reads_bfloat16 = True           # the index kernels read and write bfloat16 bits
    reads_float16 = True            # the loss kernels load float16 and compute in float32
    casts_complex = False

    @staticmethod
    def is_array(a):
        return is_device_array(a)

    is_writeable_c_contiguous = staticmethod(_is_writeable_c_contiguous)

    @staticmethod
    def same_memory(a, b):
        (pa, na), (pb, nb) = _extent(a), _extent(b)
        return pa == pb and na == nb

    @staticmethod
    def may_share_memory(a, b):
        (pa, na), (pb, nb) = _extent(a), _extent(b)
        return na > 0 and nb > 0 and pa < pb + nb and pb < pa + na

    @staticmethod
    def first_above(t, limit):
        """Flat position of the first element of t above limit, or -1 (a host copy: only
        uint64 targets need this)."""
        host = GPUBackend.to_host(t).reshape(-1)
        pos = np.flatnonzero(host > limit)
        return int(pos[0]) if pos.size else -1

    @staticmethod
    def zeros(shape, dtype):
        return full(shape, 0, dtype)

    @staticmethod
    def to_host(a):
        return _host_copy(GPUBackend.asarray(a))

    @staticmethod
    def asarray(a):
        """A C-contiguous Numba device array (a view of the caller's memory unless that is
        strided; host scalars and 0-d arrays, e.g. a grad_output of 1.0, are copied over)."""
        if _is_numba_array(a):
            d = a
        elif is_device_array(a):
            if type(a).__module__.startswith("torch") and getattr(a, "requires_grad", False):
                a = a.detach()      # torch refuses the interface on tensors that require grad
            cai = a.__cuda_array_interface__
            bf16 = _bfloat16_typestr(cai["typestr"])
            _wait_for_producer(cai.get("stream"))
            if bf16:                # (Numba cannot type a void: its bits, then the dtype)
                cai = dict(cai, typestr="<u2", descr=[("", "<u2")])
            d = cuda.from_cuda_array_interface(cai, owner=a, sync=False)
            if bf16:
                import ml_dtypes
                d = d.view(ml_dtypes.bfloat16)
        else:
            return _to_dev(np.array(a, order="C"))
        if not d.is_c_contiguous():
            d = _copy_as(d, d.dtype)
        return d

    contiguous = asarray

    @staticmethod
    def cast(a, dtype):
        d = GPUBackend.asarray(a)
        return d if d.dtype == np.dtype(dtype) else _copy_as(d, dtype)

    @staticmethod
    def copy(a):
        d = GPUBackend.asarray(a)
        return _copy_as(d, d.dtype)

    @staticmethod
    def element(a, pos):
        d = _flat(GPUBackend.asarray(a))
        return _host_copy(d[pos:pos + 1])[0].item()

    @staticmethod
    def empty(shape, dtype):
        return _alloc(shape, dtype)

    @staticmethod
    def ones(shape, dtype):
        """Ones (cached per shape and dtype: fastce.api only reads them)."""
        return _ones(_shape(shape), np.dtype(dtype).str, _device_id())

    total = staticmethod(total)
    total_device = staticmethod(_total_dev)
    reduce_loss = staticmethod(reduce_loss)
    full = staticmethod(full)

    @staticmethod
    def scalar(value, dtype):
        """The loss of a mean/sum reduction: a 0-d device array of the input's dtype."""
        return _to_dev(np.array(value, dtype=dtype))

    @staticmethod
    def finish_per_position(ce, zl, shape, dtype):
        if zl is None:
            return GPUBackend.cast(ce.reshape(shape), dtype)
        out = _alloc(shape, dtype)
        _launch(_k_add, ce.size, _flat(out), _flat(ce), _flat(zl))
        return out

    @staticmethod
    def lse_sign(lse):
        out = _alloc(lse.shape, np.float64)
        _launch(_k_lse_sign, lse.size, _flat(out), _flat(lse))
        return out

    @staticmethod
    def wrap(a, like, unwrap_0d=False):
        """A result in the caller's array type: CuPy for CuPy/foreign inputs (when CuPy is
        installed), a Numba device array (0-d ones with float()) for Numba inputs.  A
        caller's own array (``out=``) is returned as it is."""
        if not _is_numba_array(a):
            return a
        if (not _is_numba_array(like) and hasattr(like, "__cuda_array_interface__")
                and not bf.is_bfloat16(a.dtype)):       # (CuPy has no bfloat16)
            cp = _cupy()
            if cp is not None:
                return cp.asarray(a)
        if a.ndim == 0:
            try:
                a.__class__ = _scalar_class(type(a))
            except TypeError:
                pass
        return a

    target_stats = staticmethod(target_stats)
    grad_den = staticmethod(grad_den)
    index_loss = staticmethod(index_loss)
    prob_loss = staticmethod(prob_loss)
    nll_loss = staticmethod(nll_loss)
    softmax_family = staticmethod(softmax_family)
    lse_weighted = staticmethod(lse_weighted)
    transpose_copy = staticmethod(transpose_copy)
    broadcast_copy = staticmethod(broadcast_copy)


def _bfloat16_typestr(typestr):
    """Whether an interface's typestr is bfloat16: the 2-byte void that torch and ml_dtypes
    export it as (read through a uint16 view, then viewed as ml_dtypes.bfloat16, which that
    needs).  Other voids, which Numba cannot type either, are rejected."""
    dt = np.dtype(typestr)
    if dt.kind != "V":
        return False
    if dt.itemsize != 2:
        raise TypeError(f"fastce: CUDA arrays of typestr {typestr!r} are not supported")
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        raise TypeError(f"fastce: a CUDA array of typestr {typestr!r} is read as bfloat16, "
                        f"which needs ml_dtypes (pip install 'fastce[bf16]')") from None
    return True


def _extent(a):
    """(first byte address, byte length) of a device array's memory."""
    d = GPUBackend.asarray(a)
    if SIM:
        return d._ary.__array_interface__["data"][0], d._ary.nbytes
    return d.__cuda_array_interface__["data"][0], d.nbytes


BACKEND = GPUBackend()
